//! Budgets and alert rules evaluated as the projections move, and the notifications they
//! fire delivered.
//!
//! After each committed batch the consume loop marks its tenants touched ([`Touched`]); the
//! evaluator then reads where each of their budgets stands (from the active projection) and,
//! for every threshold crossed in the current period, inserts a firing keyed by budget,
//! period and threshold together with one delivery per channel, in one transaction. The key
//! makes a crossing fire once however many projector instances evaluate it, through restarts,
//! rebalances and replays (a replay rebuilds the same sums, and only the current period is
//! evaluated). A rule fires when its condition starts to hold: the rule's row goes from `ok`
//! to `firing` (once, under its row lock) in the transaction that writes the firing, keyed by
//! the rule's crossing count; it returns to `ok` when the condition clears. Tenants are also
//! swept every few seconds, which is what notices a silence. The deliverer ([`deliver`]) sends what is due: the transactional outbox is
//! what makes a notification survive a crash between deciding and sending.

pub mod deliver;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use shared::budgets::{self, Budget};
use shared::rules::{self, Rule};
use shared::tenant::TenantId;
use sqlx::PgPool;
use tokio::sync::{watch, Notify};
use uuid::Uuid;

/// How often every tenant with budgets is evaluated even without new events (budgets made
/// or changed since, a period that began).
const SWEEP: Duration = Duration::from_secs(15);
/// How long the set of tenants with budgets is trusted between sweeps.
const KNOWN_FOR: Duration = Duration::from_secs(2);

/// Tenants whose projection advanced since the evaluator last looked.
#[derive(Clone, Default)]
pub struct Touched {
    tenants: Arc<Mutex<BTreeSet<TenantId>>>,
    wake: Arc<Notify>,
}

impl Touched {
    pub fn touch(&self, tenants: impl IntoIterator<Item = TenantId>) {
        let mut set = self.tenants.lock().expect("touched set");
        let before = set.len();
        set.extend(tenants);
        if set.len() != before {
            self.wake.notify_one();
        }
    }

    fn take(&self) -> BTreeSet<TenantId> {
        std::mem::take(&mut *self.tenants.lock().expect("touched set"))
    }
}

/// What the alerting tasks need.
#[derive(Clone)]
pub struct Alerts {
    pub pool: PgPool,
    pub touched: Touched,
    /// Wakes the deliverer when a firing was just written.
    pub fired: Arc<Notify>,
    /// Where notifications link to (query-api's dashboard page).
    pub dashboard_url: String,
    /// Where notifications may go.
    pub policy: shared::webhooks::Policy,
    /// Opens channels' URLs and secrets; without it nothing can be delivered.
    pub key: Option<shared::secretbox::SecretKey>,
    /// Wakes query-api's live feeds of a tenant that fired (they show it as an `alert`).
    pub redis: Option<redis::aio::ConnectionManager>,
}

/// Starts the evaluator and the deliverer; both stop when `stop` flips.
pub fn spawn(alerts: Alerts, stop: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    let client = match alerts.policy.client(deliver::ATTEMPT_TIMEOUT) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the notification client; alerting is off");
            return Vec::new();
        }
    };
    if alerts.key.is_none() {
        tracing::warn!("secret_key is not configured: notifications cannot be delivered");
    }
    let deliverer = Arc::new(deliver::Deliverer {
        pool: alerts.pool.clone(),
        key: alerts.key.clone(),
        client,
        wake: alerts.fired.clone(),
    });
    vec![
        tokio::spawn(deliverer.run(stop.clone())),
        tokio::spawn(evaluate_continuously(alerts, stop)),
    ]
}

/// Runs the evaluator until `stop` flips.
pub async fn evaluate_continuously(mut alerts: Alerts, mut stop: watch::Receiver<bool>) {
    // The tenants that have budgets or rules, looked up again at every sweep and at most every
    // [`KNOWN_FOR`] on a wake: a batch of a tenant without any costs no query.
    let mut known: Option<(Instant, BTreeSet<TenantId>)> = None;
    loop {
        let sweep = tokio::select! {
            _ = stop.changed() => return,
            _ = alerts.touched.wake.notified() => false,
            _ = tokio::time::sleep(SWEEP) => true,
        };
        let stale = known
            .as_ref()
            .is_none_or(|(at, _)| sweep || at.elapsed() > KNOWN_FOR);
        if stale {
            match tenants_with_alerts(&alerts.pool).await {
                Ok(all) => known = Some((Instant::now(), all)),
                Err(e) => tracing::warn!(error = %e, "cannot list the tenants with alerts"),
            }
        }
        let Some((_, with_budgets)) = &known else {
            continue;
        };
        let tenants: Vec<TenantId> = match sweep {
            true => with_budgets.iter().copied().collect(),
            false => alerts
                .touched
                .take()
                .into_iter()
                .filter(|t| with_budgets.contains(t))
                .collect(),
        };
        for tenant in tenants {
            match evaluate_tenant(&alerts, tenant).await {
                Ok(0) => {}
                Ok(n) => {
                    metrics::counter!("alerts_fired_total").increment(n);
                    alerts.fired.notify_one();
                    if let Some(redis) = alerts.redis.as_mut() {
                        shared::watermark::publish(redis, [(tenant, 0)]).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "alert evaluation failed; retried at the next batch or sweep")
                }
            }
        }
    }
}

async fn tenants_with_alerts(pool: &PgPool) -> sqlx::Result<BTreeSet<TenantId>> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT tenant_id FROM control.budgets UNION SELECT tenant_id FROM control.alert_rules",
    )
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(TenantId).collect())
}

/// Evaluates the tenant's budgets and rules; returns how many new firings it wrote.
pub async fn evaluate_tenant(alerts: &Alerts, tenant: TenantId) -> sqlx::Result<u64> {
    let mut conn = alerts.pool.acquire().await?;
    let fired = evaluate_rules(alerts, &mut conn, tenant).await?;
    Ok(fired + evaluate_budgets(alerts, &mut conn, tenant).await?)
}

/// Evaluates the tenant's rules: a rule whose condition starts to hold fires once (unless
/// it fired within its cool-down), and is `firing` until the condition clears.
async fn evaluate_rules(
    alerts: &Alerts,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
) -> sqlx::Result<u64> {
    let now = Utc::now();
    let mut fired = 0;
    for rule in Rule::of_tenant(&mut *conn, tenant).await? {
        let Some(e) = rules::evaluate(&mut *conn, tenant, &rule, now).await? else {
            continue;
        };
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        // The transition, taken by one evaluator only (the row is locked until commit).
        let crossing: Option<i64> = match e.holds {
            true => {
                sqlx::query_scalar(
                    "UPDATE control.alert_rules
                        SET state = 'firing', crossings = crossings + 1, last_fired_at = now(),
                            last_value = $2, evaluated_at = now()
                      WHERE id = $1 AND state = 'ok'
                        AND (last_fired_at IS NULL
                             OR last_fired_at <= now() - make_interval(mins => cooldown_minutes))
                     RETURNING crossings",
                )
                .bind(rule.id)
                .bind(e.value)
                .fetch_optional(&mut *tx)
                .await?
            }
            false => None,
        };
        if crossing.is_none() {
            sqlx::query(
                "UPDATE control.alert_rules
                    SET last_value = $2, evaluated_at = now(),
                        state = CASE WHEN $3 THEN state ELSE 'ok' END
                  WHERE id = $1",
            )
            .bind(rule.id)
            .bind(e.value)
            .bind(e.holds)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(n) = crossing {
            let id = Uuid::now_v7();
            let payload = json!({
                "type": "rule.triggered",
                "timestamp": Utc::now(),
                "data": {
                    "firing_id": id,
                    "tenant_id": tenant.0,
                    "rule": rule,
                    "evaluation": e,
                    "dashboard_url": alerts.dashboard_url,
                }
            });
            let firing = Firing {
                id,
                source: "rule",
                source_id: rule.id,
                scope: &rule.scope,
                scope_id: &rule.scope_id,
                channels: &rule.channels,
                dedup: format!("rule:{}:{n}", rule.id),
                payload,
            };
            if fire_in(&mut tx, tenant, firing).await? {
                fired += 1;
                tracing::info!(%tenant, rule = %rule.id, kind = %rule.kind, "alert rule triggered");
            }
        }
        tx.commit().await?;
    }
    Ok(fired)
}

/// Evaluates the tenant's budgets: every threshold crossed in the current period fires once.
async fn evaluate_budgets(
    alerts: &Alerts,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
) -> sqlx::Result<u64> {
    let list = Budget::of_tenant(&mut *conn, tenant).await?;
    if list.is_empty() {
        return Ok(0);
    }
    let tz = budgets::time_zone(&mut *conn, tenant).await?;
    let now = Utc::now();
    let mut fired = 0;
    for budget in &list {
        let (start, end) = budgets::period_bounds(&mut *conn, budget.period, &tz, now).await?;
        let spent = budgets::spent(&mut *conn, budget, start, end).await?;
        let percent = spent / budget.amount * 100.0;
        let crossed: Vec<i32> = budget
            .thresholds
            .iter()
            .copied()
            .filter(|t| percent >= f64::from(*t))
            .collect();
        if crossed.is_empty() {
            continue;
        }
        // Where it stands, forecast included, for the notification's body.
        let status = budgets::status(&mut *conn, budget, &tz, now).await?;
        for threshold in crossed {
            let dedup = format!("budget:{}:{}:{threshold}", budget.id, start.timestamp());
            let id = Uuid::now_v7();
            let payload = budget_payload(alerts, tenant, id, budget, threshold, &status);
            let firing = Firing {
                id,
                source: "budget",
                source_id: budget.id,
                scope: budget.scope.as_str(),
                scope_id: &budget.scope_id,
                channels: &budget.channels,
                dedup,
                payload,
            };
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            if fire_in(&mut tx, tenant, firing).await? {
                fired += 1;
                tracing::info!(%tenant, budget = %budget.id, threshold, "budget threshold crossed");
            }
            tx.commit().await?;
        }
    }
    Ok(fired)
}

fn budget_payload(
    alerts: &Alerts,
    tenant: TenantId,
    id: Uuid,
    budget: &Budget,
    threshold: i32,
    status: &budgets::Status,
) -> Value {
    json!({
        "type": "budget.threshold_crossed",
        "timestamp": Utc::now(),
        "data": {
            "firing_id": id,
            "tenant_id": tenant.0,
            "budget": budget,
            "threshold": threshold,
            "spent": status.spent,
            "remaining": status.remaining,
            "percent": status.percent,
            "period_start": status.period_start,
            "period_end": status.period_end,
            "burn_rate_per_hour": status.burn_rate_per_hour,
            "forecast": status.forecast,
            "dashboard_url": alerts.dashboard_url,
        }
    })
}

/// A firing about to be written.
struct Firing<'a> {
    id: Uuid,
    source: &'static str,
    source_id: Uuid,
    scope: &'a str,
    scope_id: &'a str,
    /// Channels told; empty: all of the tenant's.
    channels: &'a [Uuid],
    /// What makes it once: budget, period and threshold; rule and crossing.
    dedup: String,
    payload: Value,
}

/// Writes `f` and one delivery per channel in `tx`, unless a firing with its `dedup` was
/// written before; returns whether this call wrote it.
async fn fire_in(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    f: Firing<'_>,
) -> sqlx::Result<bool> {
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO control.firings (id, tenant_id, source, source_id, dedup, scope, scope_id, payload)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (tenant_id, dedup) DO NOTHING RETURNING id",
    )
    .bind(f.id)
    .bind(tenant.0)
    .bind(f.source)
    .bind(f.source_id)
    .bind(&f.dedup)
    .bind(f.scope)
    .bind(f.scope_id)
    .bind(f.payload)
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_none() {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO control.deliveries (id, tenant_id, firing_id, channel_id)
         SELECT gen_random_uuid(), $1, $2, id FROM control.channels
          WHERE tenant_id = $1 AND (cardinality($3::uuid[]) = 0 OR id = ANY($3))",
    )
    .bind(tenant.0)
    .bind(f.id)
    .bind(f.channels)
    .execute(&mut *tx)
    .await?;
    Ok(true)
}
