//! Alert rules: a condition on what the dashboards show, over a window ending now — error
//! rate, p95 duration, cost, tokens or events above (or below) a threshold, a scope that has
//! gone silent, or a value far outside its own baseline (a z-score against the same window
//! at the same time on each of the previous days). The projector evaluates them after each
//! batch and every few seconds (a silence has no batch); each crossing fires once.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::budgets::Scope;
use crate::histogram;
use crate::tenant::TenantId;
use crate::tenant_sql;

/// Days of history an anomaly rule compares with.
pub const BASELINE_DAYS: i64 = 7;
/// An anomaly's spread is never taken below this share of the baseline's mean (nor below
/// 1): a perfectly steady history would otherwise make any wobble infinitely anomalous.
const MIN_SPREAD: f64 = 0.1;

pub const KINDS: [&str; 7] = [
    "error_rate",
    "p95_duration",
    "cost",
    "tokens",
    "events",
    "silence",
    "anomaly",
];
pub const MEASURES: [&str; 4] = ["events", "errors", "cost_usd", "tokens"];

/// A rule as stored in `control.alert_rules`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Rule {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant_id: Uuid,
    pub name: String,
    /// One of [`KINDS`].
    pub kind: String,
    pub scope: String,
    pub scope_id: String,
    pub event_type: Option<String>,
    pub name_filter: Option<String>,
    /// What an anomaly rule watches, one of [`MEASURES`].
    pub measure: Option<String>,
    pub op: String,
    pub threshold: f64,
    pub window_minutes: i32,
    pub cooldown_minutes: i32,
    pub min_events: i32,
    pub channels: Vec<Uuid>,
    pub state: String,
    pub last_fired_at: Option<DateTime<Utc>>,
    pub last_value: Option<f64>,
    pub evaluated_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, tenant_id, name, kind, scope, scope_id, event_type, name_filter, \
    measure, op, threshold, window_minutes, cooldown_minutes, min_events, channels, state, \
    last_fired_at, last_value, evaluated_at";

impl Rule {
    pub async fn of_tenant(conn: &mut PgConnection, tenant: TenantId) -> sqlx::Result<Vec<Rule>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM control.alert_rules WHERE tenant_id = $1 ORDER BY name, id"
        )))
        .bind(tenant.0)
        .fetch_all(conn)
        .await
    }

    pub async fn get(
        conn: &mut PgConnection,
        tenant: TenantId,
        id: Uuid,
    ) -> sqlx::Result<Option<Rule>> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM control.alert_rules WHERE tenant_id = $1 AND id = $2"
        )))
        .bind(tenant.0)
        .bind(id)
        .fetch_optional(conn)
        .await
    }

    fn scope(&self) -> Scope {
        Scope::parse(&self.scope).unwrap_or(Scope::Tenant)
    }
}

/// What a window holds, summed over the rule's scope and filters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub events: f64,
    pub errors: f64,
    pub cost_usd: f64,
    pub tokens: f64,
    pub duration_hist: Vec<i64>,
}

impl Window {
    fn measure(&self, m: &str) -> f64 {
        match m {
            "errors" => self.errors,
            "cost_usd" => self.cost_usd,
            "tokens" => self.tokens,
            _ => self.events,
        }
    }
}

/// A rule's condition at one moment.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Evaluation {
    /// The value compared (for an anomaly, the window's measure; its z-score is `score`).
    pub value: Option<f64>,
    pub holds: bool,
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    /// Anomaly: the baseline's mean and spread, and the z-score.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_spread: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    /// Why the rule does not judge (too few events, no history).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What `rule` watches in `[from, to)`, from the tenant's active projection (read-only, in a
/// transaction of its own); `None` when the tenant has no projection yet.
pub async fn window(
    conn: &mut PgConnection,
    tenant: TenantId,
    rule: &Rule,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> sqlx::Result<Option<Window>> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if tenant_sql::enter_active_readonly(&mut tx, tenant)
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let keyed = rule.scope() != Scope::Tenant || rule.name_filter.is_some();
    let filter = match rule.scope() {
        Scope::Tenant => "",
        Scope::Team => " AND team_id = $3",
        Scope::User => " AND user_id = $3",
        Scope::Project => " AND project_id = $3",
    };
    let name = if rule.name_filter.is_some() {
        " AND name = $5"
    } else {
        ""
    };
    let source = match keyed {
        true => "activity_hours($1, $2)",
        false => "activity_all_hours($1, $2)",
    };
    let sql = format!(
        "SELECT coalesce(sum(count), 0)::float8, coalesce(sum(errors), 0)::float8,
                coalesce(sum(value_sum) FILTER (WHERE event_type = 'agent.interacted'), 0)::float8,
                coalesce(sum(input_tokens + output_tokens), 0)::float8,
                coalesce(string_agg(duration_hist::text, '') FILTER (WHERE count > 0), '')
           FROM {source}
          WHERE ($4::text IS NULL OR event_type = $4){filter}{name}"
    );
    let (events, errors, cost_usd, tokens, hists): (f64, f64, f64, f64, String) =
        sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(from)
            .bind(to)
            .bind(&rule.scope_id)
            .bind(rule.event_type.as_deref())
            .bind(rule.name_filter.as_deref())
            .fetch_one(&mut *tx)
            .await?;
    tx.rollback().await?;
    Ok(Some(Window {
        events,
        errors,
        cost_usd,
        tokens,
        duration_hist: merged_histograms(&hists),
    }))
}

/// The histograms of a window's rows (their text forms, one after the other: `{1,2}{0,1,3}`),
/// merged.
fn merged_histograms(text: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for part in text.split('}') {
        let digits = part.trim_start_matches([',', '{']);
        if digits.is_empty() {
            continue;
        }
        let hist: Vec<i64> = digits
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        histogram::merge(&mut out, &hist);
    }
    out
}

/// The window of `minutes` ending with `now`'s minute (the minute under way included, so
/// that a sum crossing its line is seen at once).
pub fn window_bounds(now: DateTime<Utc>, minutes: i32) -> (DateTime<Utc>, DateTime<Utc>) {
    let end = now
        .duration_trunc(TimeDelta::minutes(1))
        .expect("a minute fits")
        + TimeDelta::minutes(1);
    (end - TimeDelta::minutes(i64::from(minutes)), end)
}

/// Evaluates `rule` at `now`; `None` when the tenant has no projection yet.
pub async fn evaluate(
    conn: &mut PgConnection,
    tenant: TenantId,
    rule: &Rule,
    now: DateTime<Utc>,
) -> sqlx::Result<Option<Evaluation>> {
    let (mut from, mut to) = window_bounds(now, rule.window_minutes);
    if rule.kind == "silence" {
        // Whole minutes only: the minute under way has had no time to see anything yet.
        (from, to) = (from - TimeDelta::minutes(1), to - TimeDelta::minutes(1));
    }
    let Some(w) = window(&mut *conn, tenant, rule, from, to).await? else {
        return Ok(None);
    };
    let mut e = Evaluation {
        value: None,
        holds: false,
        window_start: from,
        window_end: to,
        baseline_mean: None,
        baseline_spread: None,
        score: None,
        note: None,
    };
    let compare = |v: f64| match rule.op.as_str() {
        "below" => v < rule.threshold,
        _ => v > rule.threshold,
    };
    let enough = w.events >= f64::from(rule.min_events);
    match rule.kind.as_str() {
        "error_rate" => {
            let rate = (w.events > 0.0).then(|| w.errors / w.events * 100.0);
            e.value = rate;
            e.holds = enough && rate.is_some_and(compare);
            if !enough {
                e.note = Some(format!("fewer than {} events", rule.min_events));
            }
        }
        "p95_duration" => {
            let p95 = histogram::quantile(&w.duration_hist, 0.95);
            e.value = p95;
            e.holds = enough && p95.is_some_and(compare);
            if !enough {
                e.note = Some(format!("fewer than {} events", rule.min_events));
            }
        }
        "cost" => (e.value, e.holds) = (Some(w.cost_usd), compare(w.cost_usd)),
        "tokens" => (e.value, e.holds) = (Some(w.tokens), compare(w.tokens)),
        "events" => (e.value, e.holds) = (Some(w.events), compare(w.events)),
        "silence" => {
            // Silent: nothing in the window, after something in the window before it (a
            // scope that never sent anything is not "gone silent").
            let span = to - from;
            let before = window(&mut *conn, tenant, rule, from - span, from)
                .await?
                .unwrap_or_default();
            e.value = Some(w.events);
            e.holds = w.events == 0.0 && before.events > 0.0;
            if before.events == 0.0 && w.events == 0.0 {
                e.note = Some("nothing before the window either".into());
            }
        }
        "anomaly" => {
            let measure = rule.measure.as_deref().unwrap_or("events");
            let value = w.measure(measure);
            let mut history = Vec::new();
            for day in 1..=BASELINE_DAYS {
                let shift = TimeDelta::days(day);
                if let Some(h) = window(&mut *conn, tenant, rule, from - shift, to - shift).await? {
                    history.push(h.measure(measure));
                }
            }
            e.value = Some(value);
            match zscore(value, &history) {
                Some((mean, spread, z)) => {
                    e.baseline_mean = Some(mean);
                    e.baseline_spread = Some(spread);
                    e.score = Some(z);
                    e.holds = match rule.op.as_str() {
                        "below" => z < -rule.threshold,
                        _ => z > rule.threshold,
                    };
                }
                None => e.note = Some("no history to compare with".into()),
            }
        }
        _ => e.note = Some(format!("unknown kind {}", rule.kind)),
    }
    Ok(Some(e))
}

/// The baseline's mean, its spread (the standard deviation, floored at [`MIN_SPREAD`] of the
/// mean and at 1) and `value`'s z-score; `None` without any day of history that saw
/// anything.
pub fn zscore(value: f64, history: &[f64]) -> Option<(f64, f64, f64)> {
    if history.iter().all(|v| *v == 0.0) {
        return None;
    }
    let n = history.len() as f64;
    let mean = history.iter().sum::<f64>() / n;
    let var = history.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let spread = var.sqrt().max(mean.abs() * MIN_SPREAD).max(1.0);
    Some((mean, spread, (value - mean) / spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenfold_jump_is_an_anomaly_and_noise_is_not() {
        let history = [98.0, 105.0, 101.0, 95.0, 110.0, 92.0, 100.0];
        let (mean, _, z) = zscore(1000.0, &history).unwrap();
        assert!((mean - 100.14).abs() < 0.01);
        assert!(z > 50.0, "{z}");
        let (_, _, z) = zscore(112.0, &history).unwrap();
        assert!(z < 3.0, "{z}");
        // A perfectly steady history still needs a real departure.
        let (_, spread, z) = zscore(104.0, &[100.0; 7]).unwrap();
        assert_eq!(spread, 10.0);
        assert!(z < 3.0);
        assert_eq!(zscore(5.0, &[0.0; 7]), None);
    }

    #[test]
    fn histograms_of_a_window_merge() {
        assert_eq!(merged_histograms("{1,2,0}{0,1,3}"), vec![1, 3, 3]);
        assert_eq!(merged_histograms("{0,5}"), vec![0, 5]);
        assert_eq!(merged_histograms(""), Vec::<i64>::new());
    }

    #[test]
    fn windows_end_after_the_current_minute() {
        let now: DateTime<Utc> = "2026-12-02T10:05:30Z".parse().unwrap();
        let (from, to) = window_bounds(now, 5);
        assert_eq!(to.to_rfc3339(), "2026-12-02T10:06:00+00:00");
        assert_eq!(from.to_rfc3339(), "2026-12-02T10:01:00+00:00");
    }
}
