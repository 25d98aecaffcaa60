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
//! swept every few seconds, however busy the projector is, which is what notices a silence.
//! The deliverer ([`deliver`]) sends what is due: the transactional outbox is what makes a
//! notification survive a crash between deciding and sending.
//!
//! One tenant cannot hold back another's alerts: tenants are evaluated side by side in
//! [`LANES`] lanes, on a pool of their own whose every statement (or wait for a lock) is
//! cancelled after [`STATEMENT_TIMEOUT`]; a rule or budget that fails or is cancelled is
//! logged and counted and the others go on; and a tenant's turn ends with the rule or budget
//! under way once [`TURN`] has passed (what it did not reach goes first in its next turn,
//! which follows at once). One rule reads at most eight windows (an anomaly's, each cut at
//! [`STATEMENT_TIMEOUT`]), so a turn holds its lane for at most [`TURN`] plus 16 s, then
//! twice that for the budgets (a crossed budget's forecast reads its spend again).

pub mod deliver;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use shared::budgets::{self, Budget};
use shared::rules::{self, Rule};
use shared::tenant::TenantId;
use sqlx::PgPool;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

/// How often every tenant with budgets is evaluated even without new events (budgets made
/// or changed since, a period that began).
const SWEEP: Duration = Duration::from_secs(15);
/// How long the set of tenants with budgets is trusted between sweeps.
const KNOWN_FOR: Duration = Duration::from_secs(2);
/// How many tenants are evaluated at once (and the evaluation pool's connections).
pub const LANES: usize = 2;
/// The longest one statement of an evaluation may run, a wait for a lock included: a window
/// read over a tenant's enormous rollups, or a table a migration holds.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);
/// After how long a tenant's turn stops taking up more rules, and then more budgets.
const TURN: Duration = Duration::from_secs(5);

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

/// The tenants being evaluated, each with whether it is to be evaluated again when its turn
/// ends (it was touched meanwhile, or its turn ran out).
type Running = Arc<Mutex<HashMap<TenantId, bool>>>;

/// A tenant's turn in a lane: while it lives the tenant is not evaluated by another lane;
/// dropped however the turn ends, it frees the tenant and, if asked, touches it again.
struct Turn {
    tenant: TenantId,
    running: Running,
    touched: Touched,
}

impl Turn {
    /// The tenant's turn, or `None` (and it is marked to go again) while it has one.
    fn take(running: &Running, touched: &Touched, tenant: TenantId) -> Option<Turn> {
        let mut map = running.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(again) = map.get_mut(&tenant) {
            *again = true;
            return None;
        }
        map.insert(tenant, false);
        Some(Turn {
            tenant,
            running: running.clone(),
            touched: touched.clone(),
        })
    }

    fn again(&self) {
        let mut map = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        map.insert(self.tenant, true);
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let again = self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.tenant);
        if again == Some(true) {
            self.touched.touch([self.tenant]);
        }
    }
}

/// What the alerting tasks need.
#[derive(Clone)]
pub struct Alerts {
    pub pool: PgPool,
    /// The evaluator's own connections: [`LANES`] of them, each statement bounded by
    /// [`STATEMENT_TIMEOUT`] ([`evaluation_pool`]).
    pub evaluation: PgPool,
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
    /// When this evaluator last looked at each rule and budget (by id), so that a tenant's
    /// next turn begins with what its last one did not reach or could not finish.
    pub seen: Arc<Mutex<Seen>>,
}

/// When each rule and budget was last looked at. Ids not looked at for [`Seen::FORGET`] go
/// (checked at most once a [`Seen::FORGET`]): rules and budgets deleted meanwhile, which a
/// tenant creating and deleting them in a loop would otherwise pile up here for good. Every
/// live one is looked at each sweep (15 s), and one forgotten is merely taken up first.
#[derive(Debug)]
pub struct Seen {
    at: HashMap<Uuid, Instant>,
    pruned: Instant,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            at: HashMap::new(),
            pruned: Instant::now(),
        }
    }
}

impl Seen {
    const FORGET: Duration = Duration::from_secs(3600);

    fn insert(&mut self, id: Uuid, now: Instant) {
        self.at.insert(id, now);
        if now.duration_since(self.pruned) >= Self::FORGET {
            self.at.retain(|_, t| now.duration_since(*t) < Self::FORGET);
            self.pruned = now;
        }
    }
}

impl Alerts {
    fn seen(&self, id: Uuid) {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.insert(id, Instant::now());
    }

    /// Orders `items` by when they were last looked at, never first.
    fn least_recently_seen<T>(&self, items: &mut [T], id: impl Fn(&T) -> Uuid) {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        items.sort_by_key(|i| seen.at.get(&id(i)).copied());
    }
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

/// The evaluator's pool: [`LANES`] connections whose every statement is cancelled after
/// [`STATEMENT_TIMEOUT`].
pub fn evaluation_pool(common: &shared::config::Common) -> Result<PgPool, sqlx::Error> {
    shared::db::bounded_pool(
        common,
        "tally-projector-alerts",
        LANES as u32,
        STATEMENT_TIMEOUT,
    )
}

/// Runs the evaluator until `stop` flips.
pub async fn evaluate_continuously(alerts: Alerts, mut stop: watch::Receiver<bool>) {
    // The tenants that have budgets or rules, looked up again at every sweep and at most every
    // [`KNOWN_FOR`] on a wake: a batch of a tenant without any costs no query.
    let mut known: Option<(Instant, BTreeSet<TenantId>)> = None;
    // A deadline, not a sleep restarted at every wake: batches every few seconds must not
    // put off the sweep that notices a silence.
    let mut next_sweep = tokio::time::Instant::now() + SWEEP;
    let lanes = Arc::new(Semaphore::new(LANES));
    let running = Running::default();
    let mut turns = JoinSet::new();
    'evaluating: loop {
        while let Some(ended) = turns.try_join_next() {
            if let Err(e) = ended {
                if e.is_panic() {
                    tracing::error!(error = %e, "an alert evaluation turn panicked");
                }
            }
        }
        let sweep = tokio::select! {
            _ = stop.changed() => break,
            _ = alerts.touched.wake.notified() => false,
            _ = tokio::time::sleep_until(next_sweep) => true,
        };
        if sweep {
            next_sweep = tokio::time::Instant::now() + SWEEP;
        }
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
            true => {
                // Every tenant is evaluated now: those touched meanwhile too.
                alerts.touched.take();
                with_budgets.iter().copied().collect()
            }
            false => alerts
                .touched
                .take()
                .into_iter()
                .filter(|t| with_budgets.contains(t))
                .collect(),
        };
        for tenant in tenants {
            let Some(turn) = Turn::take(&running, &alerts.touched, tenant) else {
                continue;
            };
            let lane = tokio::select! {
                _ = stop.changed() => break 'evaluating,
                lane = lanes.clone().acquire_owned() => lane.expect("the lanes are never closed"),
            };
            let alerts = alerts.clone();
            turns.spawn(async move {
                let _lane = lane;
                if !evaluate_and_tell(alerts, tenant).await {
                    turn.again();
                }
                drop(turn);
            });
        }
    }
    turns.shutdown().await;
}

/// Evaluates the tenant in one turn and tells what fired; returns whether the turn saw all
/// of its rules and budgets.
async fn evaluate_and_tell(mut alerts: Alerts, tenant: TenantId) -> bool {
    match evaluate_tenant(&alerts, tenant).await {
        Ok(Outcome { fired, finished }) => {
            if fired > 0 {
                metrics::counter!("alerts_fired_total").increment(fired);
                alerts.fired.notify_one();
                if let Some(redis) = alerts.redis.as_mut() {
                    // Bounded: a hanging Redis must not hold the lane.
                    let publish = shared::watermark::publish(redis, [(tenant, 0)]);
                    let _ = tokio::time::timeout(Duration::from_secs(1), publish).await;
                }
            }
            finished
        }
        Err(e) => {
            tracing::warn!(%tenant, error = %e, "alert evaluation failed; retried at the next batch or sweep");
            true
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

/// What one turn of a tenant did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// New firings written.
    pub fired: u64,
    /// Whether every rule and budget was evaluated (else the turn ran out).
    pub finished: bool,
}

/// Evaluates the tenant's rules, then its budgets, each for at most [`TURN`], on the
/// evaluation pool.
pub async fn evaluate_tenant(alerts: &Alerts, tenant: TenantId) -> sqlx::Result<Outcome> {
    let mut conn = alerts.evaluation.acquire().await?;
    let rules = evaluate_rules(alerts, &mut conn, tenant).await?;
    let budgets = evaluate_budgets(alerts, &mut conn, tenant).await?;
    Ok(Outcome {
        fired: rules.fired + budgets.fired,
        finished: rules.finished && budgets.finished,
    })
}

/// Whether `e` is PostgreSQL cancelling a statement that ran past its timeout.
fn timed_out(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "57014")
}

/// Evaluates the tenant's rules, the least recently looked at first (so that a turn that
/// runs out leaves different rules behind the next time), each on its own: one that fails or
/// is too slow is logged and counted and the others go on. A rule whose condition starts to
/// hold fires once (unless it fired within its cool-down), and is `firing` until it clears.
async fn evaluate_rules(
    alerts: &Alerts,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
) -> sqlx::Result<Outcome> {
    let now = Utc::now();
    let turn = Instant::now();
    let mut fired = 0;
    let mut rules = Rule::of_tenant(&mut *conn, tenant).await?;
    alerts.least_recently_seen(&mut rules, |r| r.id);
    for rule in rules {
        if turn.elapsed() > TURN {
            metrics::counter!("alert_turns_cut_total").increment(1);
            return Ok(Outcome {
                fired,
                finished: false,
            });
        }
        alerts.seen(rule.id);
        match evaluate_rule(alerts, conn, tenant, &rule, now).await {
            Ok(true) => fired += 1,
            Ok(false) => {}
            Err(e) => skipped(tenant, "rule", rule.id, &e),
        }
    }
    Ok(Outcome {
        fired,
        finished: true,
    })
}

/// A rule or budget whose evaluation failed or was cancelled: logged and counted; the turn
/// goes on with the next.
fn skipped(tenant: TenantId, what: &'static str, id: Uuid, e: &sqlx::Error) {
    if timed_out(e) {
        metrics::counter!("alert_evaluations_timed_out_total").increment(1);
        tracing::warn!(%tenant, %id, "alert {what} evaluation cancelled after {STATEMENT_TIMEOUT:?}");
    } else {
        metrics::counter!("alert_evaluations_failed_total").increment(1);
        tracing::warn!(%tenant, %id, error = %e, "alert {what} evaluation failed");
    }
}

/// Evaluates one rule; returns whether it fired.
async fn evaluate_rule(
    alerts: &Alerts,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    rule: &Rule,
    now: chrono::DateTime<Utc>,
) -> sqlx::Result<bool> {
    let Some(e) = rules::evaluate(&mut *conn, tenant, rule, now).await? else {
        return Ok(false);
    };
    let mut fired = false;
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
                         OR last_fired_at <= now() - make_interval(mins => greatest(cooldown_minutes, 1)))
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
            fired = true;
            tracing::info!(%tenant, rule = %rule.id, kind = %rule.kind, "alert rule triggered");
        }
    }
    tx.commit().await?;
    Ok(fired)
}

/// Evaluates the tenant's budgets, the least recently looked at first, each on its own:
/// every threshold crossed in the current period fires once.
async fn evaluate_budgets(
    alerts: &Alerts,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
) -> sqlx::Result<Outcome> {
    let mut list = Budget::of_tenant(&mut *conn, tenant).await?;
    if list.is_empty() {
        return Ok(Outcome {
            fired: 0,
            finished: true,
        });
    }
    alerts.least_recently_seen(&mut list, |b| b.id);
    let tz = budgets::time_zone(&mut *conn, tenant).await?;
    let now = Utc::now();
    let turn = Instant::now();
    let mut fired = 0;
    for budget in &list {
        if turn.elapsed() > TURN {
            metrics::counter!("alert_turns_cut_total").increment(1);
            return Ok(Outcome {
                fired,
                finished: false,
            });
        }
        alerts.seen(budget.id);
        match evaluate_budget(alerts, conn, tenant, budget, &tz, now).await {
            Ok(n) => fired += n,
            Err(e) => skipped(tenant, "budget", budget.id, &e),
        }
    }
    Ok(Outcome {
        fired,
        finished: true,
    })
}

/// Evaluates one budget; returns how many of its thresholds fired.
async fn evaluate_budget(
    alerts: &Alerts,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    budget: &Budget,
    tz: &str,
    now: chrono::DateTime<Utc>,
) -> sqlx::Result<u64> {
    let (start, end) = budgets::period_bounds(&mut *conn, budget.period, tz, now).await?;
    let spent = budgets::spent(&mut *conn, budget, start, end).await?;
    let mut fired = 0;
    let percent = spent / budget.amount * 100.0;
    let crossed: Vec<i32> = budget
        .thresholds
        .iter()
        .copied()
        .filter(|t| percent >= f64::from(*t))
        .collect();
    if crossed.is_empty() {
        return Ok(0);
    }
    // Where it stands, forecast included, for the notification's body.
    let status = budgets::status(&mut *conn, budget, tz, now).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids not looked at for an hour are forgotten, at most once an hour; the others stay.
    #[test]
    fn seen_forgets_what_is_no_longer_looked_at() {
        let start = Instant::now();
        let mut seen = Seen {
            at: HashMap::new(),
            pruned: start,
        };
        let (gone, live) = (Uuid::now_v7(), Uuid::now_v7());
        seen.insert(gone, start);
        seen.insert(live, start);
        seen.insert(live, start + Duration::from_secs(1800));
        assert_eq!(seen.at.len(), 2, "not pruned within the hour");
        seen.insert(live, start + Seen::FORGET);
        assert_eq!(seen.at.len(), 1);
        assert!(seen.at.contains_key(&live) && !seen.at.contains_key(&gone));
    }
}
