//! Budgets: what counts against one, its calendar period in the tenant's time zone, what was
//! spent in it (from the tenant's active projection), and the forecast of when it runs out.
//! The projector evaluates them after each batch (`projector::alerts`); query-api shows them.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::tenant::TenantId;
use crate::tenant_sql;

/// Thresholds when none are given, in percent of the amount.
pub const DEFAULT_THRESHOLDS: [i32; 3] = [50, 80, 100];

/// Whose usage counts against a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Tenant,
    Team,
    User,
    Project,
}

impl Scope {
    pub fn parse(s: &str) -> Option<Scope> {
        serde_json::from_value(serde_json::Value::from(s)).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Team => "team",
            Scope::User => "user",
            Scope::Project => "project",
        }
    }
}

/// What a budget limits: agents' cost in US dollars, or their input and output tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    CostUsd,
    Tokens,
}

impl Metric {
    pub fn parse(s: &str) -> Option<Metric> {
        serde_json::from_value(serde_json::Value::from(s)).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::CostUsd => "cost_usd",
            Metric::Tokens => "tokens",
        }
    }
}

/// A budget's calendar period, in the tenant's time zone (weeks start on Monday).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        serde_json::from_value(serde_json::Value::from(s)).ok()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// A budget as stored in `control.budgets`.
#[derive(Debug, Clone, Serialize)]
pub struct Budget {
    pub id: Uuid,
    #[serde(skip)]
    pub tenant: TenantId,
    pub name: String,
    pub scope: Scope,
    /// The team, user or project; empty for the tenant.
    pub scope_id: String,
    pub metric: Metric,
    pub period: Period,
    pub amount: f64,
    pub thresholds: Vec<i32>,
    /// Channels notified; empty means all of the tenant's.
    pub channels: Vec<Uuid>,
}

type BudgetRow = (
    Uuid,
    Uuid,
    String,
    String,
    String,
    String,
    String,
    f64,
    Vec<i32>,
    Vec<Uuid>,
);

const BUDGET_COLUMNS: &str =
    "id, tenant_id, name, scope, scope_id, metric, period, amount, thresholds, channels";

impl Budget {
    fn from_row(r: BudgetRow) -> Option<Budget> {
        Some(Budget {
            id: r.0,
            tenant: TenantId(r.1),
            name: r.2,
            scope: Scope::parse(&r.3)?,
            scope_id: r.4,
            metric: Metric::parse(&r.5)?,
            period: Period::parse(&r.6)?,
            amount: r.7,
            thresholds: r.8,
            channels: r.9,
        })
    }

    /// The tenant's budgets, by name.
    pub async fn of_tenant(conn: &mut PgConnection, tenant: TenantId) -> sqlx::Result<Vec<Budget>> {
        let rows: Vec<BudgetRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BUDGET_COLUMNS} FROM control.budgets WHERE tenant_id = $1 ORDER BY name, id"
        )))
        .bind(tenant.0)
        .fetch_all(conn)
        .await?;
        Ok(rows.into_iter().filter_map(Budget::from_row).collect())
    }

    /// One budget of the tenant.
    pub async fn get(
        conn: &mut PgConnection,
        tenant: TenantId,
        id: Uuid,
    ) -> sqlx::Result<Option<Budget>> {
        let row: Option<BudgetRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {BUDGET_COLUMNS} FROM control.budgets WHERE tenant_id = $1 AND id = $2"
        )))
        .bind(tenant.0)
        .bind(id)
        .fetch_optional(conn)
        .await?;
        Ok(row.and_then(Budget::from_row))
    }
}

/// The calendar period holding `at` in `time_zone` (an IANA name PostgreSQL knows):
/// `[start, end)`, computed by PostgreSQL so that daylight-saving days are 23 or 25 hours.
pub async fn period_bounds(
    conn: &mut PgConnection,
    period: Period,
    time_zone: &str,
    at: DateTime<Utc>,
) -> sqlx::Result<(DateTime<Utc>, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT s AT TIME ZONE $2, (s + ('1 ' || $1)::interval) AT TIME ZONE $2
           FROM (SELECT date_trunc($1, $3 AT TIME ZONE $2) AS s) p",
    )
    .bind(period.as_str())
    .bind(time_zone)
    .bind(at)
    .fetch_one(conn)
    .await
}

/// Whether PostgreSQL knows `time_zone`.
pub async fn valid_time_zone(conn: &mut PgConnection, time_zone: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = $1)")
        .bind(time_zone)
        .fetch_one(conn)
        .await
}

/// The tenant's time zone.
pub async fn time_zone(conn: &mut PgConnection, tenant: TenantId) -> sqlx::Result<String> {
    sqlx::query_scalar("SELECT time_zone FROM control.tenants WHERE id = $1")
        .bind(tenant.0)
        .fetch_optional(conn)
        .await
        .map(|tz| tz.unwrap_or_else(|| "UTC".into()))
}

/// A budget where it stands now.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub spent: f64,
    pub remaining: f64,
    /// `spent` in percent of the amount.
    pub percent: f64,
    /// Spent in the last hour (the burn rate the forecast uses), per hour.
    pub burn_rate_per_hour: f64,
    /// Spent since the period began, per hour of it.
    pub average_rate_per_hour: f64,
    pub forecast: Forecast,
    /// The thresholds already crossed in this period, in percent.
    pub crossed: Vec<i32>,
}

/// When the budget runs out at the current rate.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Forecast {
    /// `reached`, `will_reach` (within this period) or `will_not_reach`.
    pub outcome: &'static str,
    /// At the last hour's rate.
    pub reaches_at: Option<DateTime<Utc>>,
    /// How sure: the same at the period's average rate (the later of the two when usage
    /// is speeding up), so `earliest`–`latest` brackets the forecast.
    pub earliest: Option<DateTime<Utc>>,
    pub latest: Option<DateTime<Utc>>,
    /// `high` when both rates agree within 25 %, `medium` within a factor of 2, else `low`
    /// (and `low` while less than an hour of the period has passed).
    pub confidence: &'static str,
}

/// The forecast of a budget with `spent` of `amount` at `now`, given the last hour's spend
/// and the period so far.
pub fn forecast(
    amount: f64,
    spent: f64,
    last_hour: f64,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Forecast {
    let elapsed_h = ((now - start).num_milliseconds() as f64 / 3.6e6).max(1.0 / 60.0);
    let average = spent / elapsed_h;
    let remaining = amount - spent;
    let at = |rate: f64| -> Option<DateTime<Utc>> {
        if rate <= 0.0 {
            return None;
        }
        let ms = (remaining / rate * 3.6e6).min(1e13) as i64;
        Some(now + TimeDelta::milliseconds(ms)).filter(|t| *t < end)
    };
    if remaining <= 0.0 {
        return Forecast {
            outcome: "reached",
            reaches_at: None,
            earliest: None,
            latest: None,
            confidence: "high",
        };
    }
    let (recent, overall) = (at(last_hour), at(average));
    let reaches_at = recent.or(overall);
    let both = [recent, overall];
    let (earliest, latest) = (
        both.iter().flatten().min().copied(),
        both.iter().flatten().max().copied(),
    );
    let ratio = match (last_hour, average) {
        (a, b) if a > 0.0 && b > 0.0 => a.max(b) / a.min(b),
        _ => f64::INFINITY,
    };
    let confidence = if elapsed_h < 1.0 || ratio > 2.0 {
        "low"
    } else if ratio > 1.25 {
        "medium"
    } else {
        "high"
    };
    Forecast {
        outcome: if reaches_at.is_some() {
            "will_reach"
        } else {
            "will_not_reach"
        },
        reaches_at,
        earliest,
        latest,
        confidence,
    }
}

/// What counts against `budget` in `[from, to)`, from the tenant's active projection
/// (entered read-only in a transaction of its own); 0 when it has none yet.
pub async fn spent(
    conn: &mut PgConnection,
    budget: &Budget,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> sqlx::Result<f64> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if tenant_sql::enter_active_readonly(&mut tx, budget.tenant)
        .await?
        .is_none()
    {
        return Ok(0.0);
    }
    let measure = match budget.metric {
        Metric::CostUsd => "coalesce(sum(value_sum), 0)::float8",
        Metric::Tokens => "coalesce(sum(input_tokens + output_tokens), 0)::float8",
    };
    let filter = match budget.scope {
        Scope::Tenant => "",
        Scope::Team => " AND team_id = $3",
        Scope::User => " AND user_id = $3",
        Scope::Project => " AND project_id = $3",
    };
    // The tenant-wide rollups when the whole tenant counts: a few rows per bucket.
    let from_rows = match (budget.scope, to - from > TimeDelta::hours(2)) {
        (Scope::Tenant, true) => "activity_all_days($1, $2)",
        (Scope::Tenant, false) => "activity_all_hours($1, $2)",
        (_, true) => "activity_days($1, $2)",
        (_, false) => "activity_hours($1, $2)",
    };
    let sql =
        format!("SELECT {measure} FROM {from_rows} WHERE event_type = 'agent.interacted'{filter}");
    let v: f64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(from)
        .bind(to)
        .bind(&budget.scope_id)
        .fetch_one(&mut *tx)
        .await?;
    tx.rollback().await?;
    Ok(v)
}

/// Where `budget` stands at `now` in `time_zone`.
pub async fn status(
    conn: &mut PgConnection,
    budget: &Budget,
    time_zone: &str,
    now: DateTime<Utc>,
) -> sqlx::Result<Status> {
    let (start, end) = period_bounds(&mut *conn, budget.period, time_zone, now).await?;
    let total = spent(&mut *conn, budget, start, end).await?;
    let hour_ago = (now - TimeDelta::hours(1)).max(start);
    let last_hour = match hour_ago < now {
        true => spent(conn, budget, hour_ago, end).await?,
        false => 0.0,
    };
    // Per hour, over the part of the last hour inside the period.
    let window_h = ((now - hour_ago).num_milliseconds() as f64 / 3.6e6).max(1.0 / 60.0);
    let elapsed_h = ((now - start).num_milliseconds() as f64 / 3.6e6).max(1.0 / 60.0);
    let rate = last_hour / window_h;
    let percent = total / budget.amount * 100.0;
    Ok(Status {
        period_start: start,
        period_end: end,
        spent: total,
        remaining: (budget.amount - total).max(0.0),
        percent,
        burn_rate_per_hour: rate,
        average_rate_per_hour: total / elapsed_h,
        forecast: forecast(budget.amount, total, rate, start, end, now),
        crossed: budget
            .thresholds
            .iter()
            .copied()
            .filter(|t| percent >= f64::from(*t))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(h: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap() + TimeDelta::minutes(h)
    }

    #[test]
    fn forecast_uses_the_last_hour_and_brackets_with_the_average() {
        // 10 h into a day; 4 of 10 spent, all in the last hour: 6 more take 1.5 h at that
        // rate, 15 h at the average (after the day ends).
        let (start, end, now) = (t(0), t(24 * 60), t(10 * 60));
        let f = forecast(10.0, 4.0, 4.0, start, end, now);
        assert_eq!(f.outcome, "will_reach");
        assert_eq!(f.reaches_at, Some(now + TimeDelta::minutes(90)));
        assert_eq!(f.earliest, f.reaches_at);
        assert_eq!(
            f.latest, f.reaches_at,
            "the average's date is past the period"
        );
        assert_eq!(f.confidence, "low");
    }

    #[test]
    fn steady_spend_is_forecast_with_high_confidence() {
        let (start, end, now) = (t(0), t(24 * 60), t(12 * 60));
        // 6 over 12 hours, 0.5 in the last: 4 more take 8 hours.
        let f = forecast(10.0, 6.0, 0.5, start, end, now);
        assert_eq!(f.reaches_at, Some(now + TimeDelta::hours(8)));
        assert_eq!(f.confidence, "high");
        assert_eq!(f.earliest, f.latest);
    }

    #[test]
    fn a_budget_reached_or_out_of_reach_says_so() {
        let (start, end, now) = (t(0), t(24 * 60), t(23 * 60));
        assert_eq!(
            forecast(10.0, 11.0, 1.0, start, end, now).outcome,
            "reached"
        );
        let f = forecast(10.0, 1.0, 0.1, start, end, now);
        assert_eq!((f.outcome, f.reaches_at), ("will_not_reach", None));
        let idle = forecast(10.0, 0.0, 0.0, start, end, t(60));
        assert_eq!((idle.outcome, idle.confidence), ("will_not_reach", "low"));
    }
}
