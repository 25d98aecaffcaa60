//! Sessions and `metric.sample` series.

use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::events::FieldError;
use shared::problem::Problem;
use shared::tenant::TenantId;

use crate::range::Bucket;
use crate::read::csv::{respond, wants_csv};
use crate::read::privacy::ids_in;
use crate::read::{db_error, invalid, ranged, Read, TenantRead};

#[derive(Debug, Deserialize)]
pub struct SessionParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub user: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    pub format: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct SessionRow {
    pub session_id: String,
    pub user_id: String,
    pub team_id: String,
    pub project_id: String,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub duration_s: Option<f64>,
    pub commands_executed: Option<i64>,
    pub productivity_score: Option<f64>,
    pub agents_used: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SessionPage {
    pub as_of: Option<DateTime<Utc>>,
    pub sessions: Vec<SessionRow>,
    pub next_cursor: Option<String>,
}

// The sessions query's `agents_used[1:100]`.
const _: () = assert!(shared::events::MAX_AGENTS_USED == 100);

/// `GET /v1/dashboard/sessions`: sessions that started (or ended) in the range, newest first.
pub async fn sessions(read: Read<SessionParams>) -> Result<Response, Problem> {
    read.reader.require_individual_view("the session list")?;
    let p = &read.params;
    let range = read.range()?;
    let csv = wants_csv(p.format.as_deref())?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid(FieldError::new("limit", "must be 1..=1000")));
    }
    let cursor: Option<(DateTime<Utc>, String)> =
        p.cursor.as_deref().map(crate::cursor::decode).transpose()?;
    let visibility = &read.reader.visibility;
    let key = format!("sessions:{:?}:{limit}:{:?}", p.user, p.cursor);
    let res = read.answer(&range, &key, |ctx| async move {
        let mut page = SessionPage {
            as_of: None,
            sessions: Vec::new(),
            next_cursor: None,
        };
        let Some(TenantRead { mut tx, fresh, .. }) = ctx else { return Ok(page) };
        page.as_of = fresh.as_of;
        let (user_filter, team_filter) = visibility.filters();
        let (before_t, before_id) = cursor.map_or((None, None), |(t, id)| (Some(t), Some(id)));
        page.sessions = sqlx::query_as(
            "SELECT session_id, user_id, team_id, project_id, started_at, ended_at,
                    extract(epoch FROM ended_at - started_at)::float8 AS duration_s,
                    commands_executed, productivity_score,
                    -- As many as ingest takes now (MAX_AGENTS_USED; a session stored before
                    -- may list more).
                    agents_used[1:100] AS agents_used
               FROM sessions
              WHERE coalesce(started_at, ended_at) >= $1 AND coalesce(started_at, ended_at) < $2
                AND ($3::text IS NULL OR user_id = $3)
                AND ($4::timestamptz IS NULL OR (coalesce(started_at, ended_at), session_id) < ($4, $5))
                AND ($6::text IS NULL OR user_id = $6) AND ($7::text[] IS NULL OR team_id = ANY($7))
              ORDER BY coalesce(started_at, ended_at) DESC, session_id DESC
              LIMIT $8",
        )
        .bind(range.from)
        .bind(range.to)
        .bind(p.user.as_deref())
        .bind(before_t)
        .bind(before_id)
        .bind(user_filter)
        .bind(team_filter)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        if page.sessions.len() as i64 == limit {
            page.next_cursor = page.sessions.last().and_then(|r| {
                r.started_at
                    .or(r.ended_at)
                    .map(|t| crate::cursor::encode(t, &r.session_id))
            });
        }
        Ok(page)
    })
    .await?;
    let res = read
        .audited("sessions", res, |a| ids_in(a, "sessions", "user_id"))
        .await?;
    respond(res, csv, "sessions").await
}

#[derive(Debug, Deserialize)]
pub struct MetricParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub name: Option<String>,
    /// Label matchers `k=v,k2=v2` (all must match).
    pub labels: Option<String>,
    pub step: Option<String>,
    /// sum, avg, min, max, count or rate (sum per second).
    pub agg: Option<String>,
    /// A label whose values split the series.
    pub group_by: Option<String>,
    /// With `group_by`: how many label values get their own series (the most sampled; the
    /// rest are aggregated into one `other` series). Default and maximum: `max_series`.
    pub limit: Option<usize>,
}

ranged!(SessionParams, MetricParams);

#[derive(Debug, Serialize, Deserialize)]
pub struct MetricSeries {
    pub tenant_id: TenantId,
    pub name: String,
    pub agg: String,
    pub step: String,
    pub as_of: Option<DateTime<Utc>>,
    /// How many distinct values of the `group_by` label the range has (1 without it).
    pub groups: i64,
    pub series: Vec<MetricLine>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct MetricLine {
    /// The label's value (null: samples without the label, and the `other` series).
    pub group: Option<String>,
    /// The aggregate of every value beyond the limit (last, and only when there are such).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other: bool,
    pub points: Vec<(DateTime<Utc>, f64)>,
}

/// Bucket, whether the label value is one of the kept ones, the value (null for `other`),
/// the number of distinct values, and the aggregate.
type MetricRow = (DateTime<Utc>, bool, Option<String>, i64, f64);

/// `GET /v1/dashboard/metrics`: a `metric.sample` series by name and label matchers.
pub async fn metrics(read: Read<MetricParams>) -> Result<Response, Problem> {
    read.reader.require_individual_view("a metric series")?;
    let (p, config) = (&read.params, read.config());
    let range = read.range()?;
    let name = p
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid(FieldError::new("name", "is required")))?;
    let step = Bucket::parse(p.step.as_deref().unwrap_or("1h")).map_err(|mut e| {
        e.field = "step".into();
        invalid(e)
    })?;
    let agg = p.agg.clone().unwrap_or_else(|| "sum".into());
    if !["sum", "avg", "min", "max", "count", "rate"].contains(&agg.as_str()) {
        return Err(invalid(FieldError::new(
            "agg",
            "use sum, avg, min, max, count or rate",
        )));
    }
    let points = (range.to - range.from).num_seconds() / step.width().num_seconds();
    if points > config.max_points {
        return Err(invalid(FieldError::new(
            "step",
            "too many points; pick a wider step",
        )));
    }
    let mut matchers = serde_json::Map::new();
    for pair in p
        .labels
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|x| !x.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            invalid(FieldError::new(
                "labels",
                format!("`{pair}` is not key=value"),
            ))
        })?;
        matchers.insert(k.trim().to_string(), Value::from(v.trim()));
    }
    let max_series = config.max_series;
    let limit = p.limit.unwrap_or(max_series);
    if !(1..=max_series).contains(&limit) {
        return Err(invalid(FieldError::new(
            "limit",
            format!("must be 1..={max_series}"),
        )));
    }
    let (tenant, visibility) = (read.reader.tenant, &read.reader.visibility);
    let key = format!(
        "metrics:{name}:{:?}:{}:{agg}:{:?}:{limit}",
        p.labels,
        step.as_str(),
        p.group_by
    );
    let group_by = p.group_by.clone();
    let res = read.answer(&range, &key, |ctx| async move {
        let mut out = MetricSeries {
            tenant_id: tenant,
            name: name.clone(),
            agg: agg.clone(),
            step: step.as_str().into(),
            as_of: None,
            groups: 0,
            series: Vec::new(),
        };
        let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
            return Ok(out);
        };
        out.as_of = fresh.as_of;
        let (user_filter, team_filter) = visibility.filters();
        let interval = sqlx::postgres::types::PgInterval {
            months: 0,
            days: 0,
            microseconds: step.width().num_microseconds().expect("small"),
        };
        // The kept label values are the most sampled; samples of every other value are
        // aggregated together (so `avg`, `min` and `max` of `other` are over its samples).
        let rows: Vec<MetricRow> = sqlx::query_as(
            "WITH s AS (
                 SELECT occurred_at, value,
                        CASE WHEN $6::text IS NULL THEN NULL ELSE data->'labels'->>$6 END AS g
                   FROM metric_samples
                  WHERE occurred_at >= $1 AND occurred_at < $2 AND name = $4
                    AND data->'labels' @> $7::jsonb
                    AND ($8::text IS NULL OR user_id = $8) AND ($9::text[] IS NULL OR team_id = ANY($9))),
             kept AS (SELECT g FROM s GROUP BY g ORDER BY count(*) DESC, g NULLS FIRST LIMIT $10),
             k AS (SELECT s.*, EXISTS (SELECT 1 FROM kept WHERE kept.g IS NOT DISTINCT FROM s.g)
                                  AS is_kept
                     FROM s)
             SELECT date_bin($3, occurred_at, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS t,
                    is_kept, CASE WHEN is_kept THEN g END AS gg,
                    (SELECT count(*) FROM (SELECT DISTINCT g FROM s) AS d),
                    CASE $5 WHEN 'avg' THEN avg(value) WHEN 'min' THEN min(value)
                            WHEN 'max' THEN max(value) WHEN 'count' THEN count(*)::float8
                            WHEN 'rate' THEN sum(value) / extract(epoch FROM $3::interval)
                            ELSE sum(value) END
               FROM k
              GROUP BY 1, 2, 3 ORDER BY 2 DESC, 3 NULLS FIRST, 1",
        )
        .bind(range.from)
        .bind(range.to)
        .bind(interval)
        .bind(&name)
        .bind(&agg)
        .bind(group_by.as_deref())
        .bind(Value::Object(matchers))
        .bind(user_filter)
        .bind(team_filter)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        for (t, kept, g, groups, v) in rows {
            out.groups = groups;
            let other = !kept;
            if out
                .series
                .last()
                .is_none_or(|l| l.group != g || l.other != other)
            {
                out.series.push(MetricLine {
                    group: g.clone(),
                    other,
                    points: Vec::new(),
                });
            }
            out.series.last_mut().expect("pushed").points.push((t, v));
        }
        Ok(out)
    })
    .await?;
    // Samples carry people's ids in their labels: a grouped series names the groups, any
    // other read is audited as of the samples' people, unnamed.
    read.audited("metric series", res, |a| {
        let mut groups = ids_in(a, "series", "group");
        if groups.is_empty() {
            groups.push("people of the metric's samples".into());
        }
        groups
    })
    .await
}
