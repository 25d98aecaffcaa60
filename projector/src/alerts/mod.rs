//! Budgets evaluated as the projections move, and the notifications they fire delivered.
//!
//! After each committed batch the consume loop marks its tenants touched ([`Touched`]); the
//! evaluator then reads where each of their budgets stands (from the active projection) and,
//! for every threshold crossed in the current period, inserts a firing keyed by budget,
//! period and threshold together with one delivery per channel, in one transaction. The key
//! makes a crossing fire once however many projector instances evaluate it, through restarts,
//! rebalances and replays (a replay rebuilds the same sums, and only the current period is
//! evaluated). The deliverer ([`deliver`]) sends what is due: the transactional outbox is
//! what makes a notification survive a crash between deciding and sending.

pub mod deliver;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use shared::budgets::{self, Budget};
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
pub async fn evaluate_continuously(alerts: Alerts, mut stop: watch::Receiver<bool>) {
    // The tenants that have budgets, looked up again at every sweep and at most every
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
            match tenants_with_budgets(&alerts.pool).await {
                Ok(all) => known = Some((Instant::now(), all)),
                Err(e) => tracing::warn!(error = %e, "cannot list the tenants with budgets"),
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
                }
                Err(e) => {
                    tracing::warn!(%tenant, error = %e, "budget evaluation failed; retried at the next batch or sweep")
                }
            }
        }
    }
}

async fn tenants_with_budgets(pool: &PgPool) -> sqlx::Result<BTreeSet<TenantId>> {
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT tenant_id FROM control.budgets")
        .fetch_all(pool)
        .await?;
    Ok(ids.into_iter().map(TenantId).collect())
}

/// Evaluates the tenant's budgets; returns how many new firings it wrote.
pub async fn evaluate_tenant(alerts: &Alerts, tenant: TenantId) -> sqlx::Result<u64> {
    let mut conn = alerts.pool.acquire().await?;
    let list = Budget::of_tenant(&mut conn, tenant).await?;
    if list.is_empty() {
        return Ok(0);
    }
    let tz = budgets::time_zone(&mut conn, tenant).await?;
    let now = Utc::now();
    let mut fired = 0;
    for budget in &list {
        let (start, end) = budgets::period_bounds(&mut conn, budget.period, &tz, now).await?;
        let spent = budgets::spent(&mut conn, budget, start, end).await?;
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
        let status = budgets::status(&mut conn, budget, &tz, now).await?;
        for threshold in crossed {
            let dedup = format!("budget:{}:{}:{threshold}", budget.id, start.timestamp());
            let id = Uuid::now_v7();
            let payload = budget_payload(alerts, tenant, id, budget, threshold, &status);
            if fire(&mut conn, tenant, budget, &dedup, id, payload).await? {
                fired += 1;
            }
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

/// Writes the firing `dedup` names (as `id`) and its deliveries, unless it was written
/// before; returns whether this call wrote it.
async fn fire(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    budget: &Budget,
    dedup: &str,
    id: Uuid,
    payload: Value,
) -> sqlx::Result<bool> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO control.firings (id, tenant_id, source, source_id, dedup, scope, scope_id, payload)
         VALUES ($1, $2, 'budget', $3, $4, $5, $6, $7)
         ON CONFLICT (tenant_id, dedup) DO NOTHING RETURNING id",
    )
    .bind(id)
    .bind(tenant.0)
    .bind(budget.id)
    .bind(dedup)
    .bind(budget.scope.as_str())
    .bind(&budget.scope_id)
    .bind(payload)
    .fetch_optional(&mut *tx)
    .await?;
    if inserted.is_none() {
        return Ok(false);
    }
    let channels: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM control.channels
          WHERE tenant_id = $1 AND (cardinality($2::uuid[]) = 0 OR id = ANY($2))",
    )
    .bind(tenant.0)
    .bind(&budget.channels)
    .fetch_all(&mut *tx)
    .await?;
    for channel in channels {
        sqlx::query(
            "INSERT INTO control.deliveries (id, tenant_id, firing_id, channel_id)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(Uuid::now_v7())
        .bind(tenant.0)
        .bind(id)
        .bind(channel)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    tracing::info!(%tenant, budget = %budget.id, %dedup, "budget threshold crossed");
    Ok(true)
}
