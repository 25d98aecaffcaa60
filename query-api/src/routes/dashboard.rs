//! Dashboard answers, read from the tenant's projection only.
//!
//! Every request runs in the read context ([`crate::read`]): one read-only transaction whose
//! `search_path` is the caller's tenant schema (taken from the credential); the SQL below
//! never names a schema.

use std::collections::BTreeMap;

use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::{EventType, FieldError};
use shared::histogram;
use shared::problem::Problem;
use shared::tenant::TenantId;
use sqlx::PgConnection;

use crate::auth::Visibility;
use crate::range::{Bucket, Grain, TimeRange};
use crate::read::privacy::Cells;
use crate::read::{db_error, invalid, ranged, Read, TenantRead};

#[derive(Debug, Deserialize)]
pub struct RangeParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct SeriesParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub bucket: Option<String>,
    pub group_by: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// With `group_by`: how many groups get their own series (the largest by count; the rest
    /// are summed into one `other` series). Default and maximum: the `max_series` setting.
    pub limit: Option<usize>,
}

ranged!(RangeParams, SeriesParams);

#[derive(Debug, Serialize, Deserialize)]
pub struct Overview {
    pub tenant_id: TenantId,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub as_of: Option<DateTime<Utc>>,
    pub events_total: i64,
    pub events: BTreeMap<String, i64>,
    pub commands: Activity,
    pub agents: Activity,
    pub tools: Activity,
    pub tokens: Tokens,
    /// What the agent interactions cost, in US dollars (as their senders reported it).
    pub cost_usd: f64,
    pub active_users: i64,
    pub sessions: i64,
    /// In privacy mode, for readers who see only aggregates: the smallest group counted.
    /// The answer then sums only (team, UTC day) cells with at least this many active
    /// people, over whole days, and leaves out single values (`duration_max_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_group: Option<u32>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Activity {
    pub count: i64,
    pub errors: i64,
    pub error_rate: f64,
    pub duration_sum_ms: i64,
    pub duration_avg_ms: Option<f64>,
    /// Estimated from the rollups' histograms (within ±12.5 %; exact under 8 ms).
    pub duration_p95_ms: Option<f64>,
    pub duration_max_ms: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tokens {
    pub input: i64,
    pub output: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TimeSeries {
    pub tenant_id: TenantId,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub as_of: Option<DateTime<Utc>>,
    pub bucket: String,
    pub group_by: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// How many distinct groups the range has (with `group_by`; 1 without).
    pub groups: i64,
    pub series: Vec<Series>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Series {
    /// The group's value (user id, command name, …); absent without `group_by` and for the
    /// `other` series.
    pub group: Option<String>,
    /// The sum of every group beyond the limit (last, and only when there are such groups).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other: bool,
    pub points: Vec<Point>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Point {
    pub t: DateTime<Utc>,
    pub count: i64,
    pub errors: i64,
    pub duration_sum_ms: i64,
    pub duration_avg_ms: Option<f64>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub value_sum: f64,
}

/// `GET /v1/dashboard/overview`
pub async fn overview(read: Read<RangeParams>) -> Result<Response, Problem> {
    let cells = read.cells().await?;
    let k = read.reader.aggregates_only();
    let range = read.range()?;
    let (tenant, visibility) = (read.reader.tenant, &read.reader.visibility);
    let key = cells
        .as_ref()
        .map_or("overview".into(), |c| format!("overview:{}", c.digest()));
    let cells = cells.as_ref();
    read.answer(&range, &key, |ctx| async move {
        let mut o = Overview {
            tenant_id: tenant,
            from: range.from,
            to: range.to,
            as_of: None,
            events_total: 0,
            events: BTreeMap::new(),
            commands: Activity::default(),
            agents: Activity::default(),
            tools: Activity::default(),
            tokens: Tokens::default(),
            cost_usd: 0.0,
            active_users: 0,
            sessions: 0,
            min_group: k,
        };
        if let Some(TenantRead { mut tx, fresh, .. }) = ctx {
            // The newest event's time would tell when someone in a withheld cell worked.
            o.as_of = fresh.as_of.filter(|_| k.is_none());
            compute_overview(&mut tx, &range, visibility, cells, &mut o)
                .await
                .map_err(db_error)?;
        }
        Ok(o)
    })
    .await
}

/// Per event type: count, errors, duration sum and max, input and output tokens, value sum.
type OverviewRow = (String, i64, i64, i64, i64, i64, i64, f64);

/// What the overview reads: the sums per event type, the duration histogram per event type,
/// and the number of distinct active users.
type OverviewParts = (Vec<OverviewRow>, BTreeMap<String, Vec<i64>>, i64);

async fn compute_overview(
    conn: &mut PgConnection,
    range: &TimeRange,
    visibility: &Visibility,
    cells: Option<&Cells>,
    o: &mut Overview,
) -> sqlx::Result<()> {
    let k = cells.map(|c| c.k);
    let (rows, hist_of, active_users) = match (visibility, cells) {
        (Visibility::Tenant, None) => tenant_overview(conn, range).await?,
        _ => keyed_overview(conn, range, visibility, cells).await?,
    };
    for (t, count, errors, dsum, dmax, tin, tout, vsum) in rows {
        o.events_total += count;
        o.tokens.input += tin;
        o.tokens.output += tout;
        let activity = Activity {
            count,
            errors,
            error_rate: if count > 0 {
                errors as f64 / count as f64
            } else {
                0.0
            },
            duration_sum_ms: dsum,
            duration_avg_ms: (count > 0).then(|| dsum as f64 / count as f64),
            duration_p95_ms: hist_of.get(&t).and_then(|h| histogram::quantile(h, 0.95)),
            // One person's slowest run is theirs alone.
            duration_max_ms: (count > 0 && k.is_none()).then_some(dmax),
        };
        match EventType::parse(&t) {
            Some(EventType::CommandExecuted) => o.commands = activity,
            Some(EventType::AgentInteracted) => {
                o.agents = activity;
                o.cost_usd = vsum;
            }
            Some(EventType::ToolExecuted) => o.tools = activity,
            Some(EventType::SessionStarted) => o.sessions = count,
            _ => {}
        }
        o.events.insert(t, count);
    }
    o.active_users = active_users;
    Ok(())
}

/// The overview of a reader who sees the whole tenant, from the tenant-wide rollups: a few
/// rows per bucket and event type, summed and their histograms merged here.
async fn tenant_overview(
    conn: &mut PgConnection,
    range: &TimeRange,
) -> sqlx::Result<OverviewParts> {
    let grain = Grain::for_range(range);
    type Row = (String, i64, i64, i64, i64, i64, i64, f64, Vec<i64>);
    let rows: Vec<Row> = sqlx::query_as(by_grain!(
        grain,
        "activity_all",
        "SELECT event_type, count, errors, duration_sum, duration_max, input_tokens,
                output_tokens, value_sum, duration_hist
           FROM ",
        " WHERE bucket >= $1 AND bucket < $2"
    ))
    .bind(range.from)
    .bind(range.to)
    .fetch_all(&mut *conn)
    .await?;
    let mut sums: BTreeMap<String, OverviewRow> = BTreeMap::new();
    let mut hist_of: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (t, count, errors, dsum, dmax, tin, tout, vsum, hist) in rows {
        let s = sums
            .entry(t.clone())
            .or_insert_with(|| (t.clone(), 0, 0, 0, 0, 0, 0, 0.0));
        s.1 += count;
        s.2 += errors;
        s.3 += dsum;
        s.4 = s.4.max(dmax);
        s.5 += tin;
        s.6 += tout;
        s.7 += vsum;
        histogram::merge(hist_of.entry(t).or_default(), &hist);
    }
    let active_users: i64 = sqlx::query_scalar(by_grain!(
        grain,
        "active_users",
        "SELECT count(DISTINCT user_id) FROM ",
        " WHERE bucket >= $1 AND bucket < $2"
    ))
    .bind(range.from)
    .bind(range.to)
    .fetch_one(&mut *conn)
    .await?;
    Ok((sums.into_values().collect(), hist_of, active_users))
}

/// The overview of a reader who sees some teams or only themself, from the per-key rollups
/// filtered to what they see; with `k`, only from the (team, day) cells of at least `k`
/// active people (`range` is then whole days, read from the daily rollups).
async fn keyed_overview(
    conn: &mut PgConnection,
    range: &TimeRange,
    visibility: &Visibility,
    cells: Option<&Cells>,
) -> sqlx::Result<OverviewParts> {
    let (user_filter, team_filter) = visibility.filters();
    let (k, ids, teams) = Cells::binds(cells);
    let grain = Cells::grain(cells, Grain::for_range(range));
    let rows: Vec<OverviewRow> = sqlx::query_as(by_grain!(
        grain,
        "SELECT event_type, sum(count)::bigint, sum(errors)::bigint, sum(duration_sum)::bigint,
                max(duration_max), sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                sum(value_sum)
           FROM ",
        " WHERE bucket >= $1 AND bucket < $2 AND ($3::text IS NULL OR user_id = $3) AND ($4::text[] IS NULL OR team_id = ANY($4))
            AND ($5::int IS NULL OR (bucket, team_id, event_type) IN (SELECT * FROM private_cells($1, $2, $5, $6, $7)))
          GROUP BY event_type"
    ))
    .bind(range.from)
    .bind(range.to)
    .bind(user_filter)
    .bind(team_filter)
    .bind(k)
    .bind(ids)
    .bind(teams)
    .fetch_all(&mut *conn)
    .await?;
    let hists: Vec<(String, i64, i64)> = sqlx::query_as(by_grain!(
        grain,
        "SELECT a.event_type, h.i, sum(h.n)::bigint
           FROM ",
        " a, unnest(a.duration_hist) WITH ORDINALITY AS h(n, i)
          WHERE a.bucket >= $1 AND a.bucket < $2 AND h.n > 0
            AND ($3::text IS NULL OR a.user_id = $3) AND ($4::text[] IS NULL OR a.team_id = ANY($4))
            AND a.event_type IN ('command.executed', 'agent.interacted', 'tool.executed')
            AND ($5::int IS NULL OR (a.bucket, a.team_id, a.event_type) IN (SELECT * FROM private_cells($1, $2, $5, $6, $7)))
          GROUP BY 1, 2"
    ))
    .bind(range.from)
    .bind(range.to)
    .bind(user_filter)
    .bind(team_filter)
    .bind(k)
    .bind(ids)
    .bind(teams)
    .fetch_all(&mut *conn)
    .await?;
    let mut hist_of: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (t, i, n) in hists {
        let h = hist_of
            .entry(t)
            .or_insert_with(|| vec![0; histogram::BUCKETS]);
        if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| h.get_mut(i)) {
            *slot += n;
        }
    }
    let active_users: i64 = sqlx::query_scalar(by_grain!(
        grain,
        "SELECT count(DISTINCT user_id) FROM ",
        " WHERE bucket >= $1 AND bucket < $2 AND user_id <> '' AND ($3::text IS NULL OR user_id = $3) AND ($4::text[] IS NULL OR team_id = ANY($4))
            AND ($5::int IS NULL OR (bucket, team_id, event_type) IN (SELECT * FROM private_cells($1, $2, $5, $6, $7)))"
    ))
    .bind(range.from)
    .bind(range.to)
    .bind(user_filter)
    .bind(team_filter)
    .bind(k)
    .bind(ids)
    .bind(teams)
    .fetch_one(&mut *conn)
    .await?;
    Ok((rows, hist_of, active_users))
}

/// Which rollup column a `group_by` reads, and the event type it implies.
fn group_column(group_by: &str) -> Result<(&'static str, Option<EventType>), FieldError> {
    Ok(match group_by {
        "user" => ("user", None),
        "team" => ("team", None),
        "project" => ("project", None),
        "command" => ("name", Some(EventType::CommandExecuted)),
        "agent" => ("name", Some(EventType::AgentInteracted)),
        "tool" => ("name", Some(EventType::ToolExecuted)),
        other => {
            return Err(FieldError::new(
                "group_by",
                format!(
                    "unknown group_by `{other}`; use user, team, project, command, agent or tool"
                ),
            ))
        }
    })
}

/// `GET /v1/dashboard/timeseries`
pub async fn timeseries(read: Read<SeriesParams>) -> Result<Response, Problem> {
    let (p, config) = (&read.params, read.config());
    let cells = read.cells().await?;
    let k = read.reader.aggregates_only();
    let range = read.range()?;
    let mut bucket = Bucket::parse(p.bucket.as_deref().unwrap_or("1h")).map_err(invalid)?;
    if k.is_some() {
        // Aggregates of k people are (team, day) cells: a series of them is daily or weekly.
        if !matches!(bucket, Bucket::D1 | Bucket::W1) {
            bucket = Bucket::D1;
        }
        if p.group_by.as_deref().is_some_and(|g| g != "team") {
            read.reader
                .require_individual_view("a series grouped by anything but team")?;
        }
    }
    let points = (range.to - range.from).num_seconds() / bucket.width().num_seconds();
    if points > config.max_points {
        return Err(invalid(FieldError::new(
            "bucket",
            format!("{points} buckets requested; at most {} per series — pick a wider bucket or a shorter range", config.max_points),
        )));
    }
    let (column, implied) = match p.group_by.as_deref() {
        Some(g) => {
            let (c, t) = group_column(g).map_err(invalid)?;
            (Some(c), t)
        }
        None => (None, None),
    };
    let explicit = match p.event_type.as_deref() {
        Some(t) => Some(EventType::parse(t).ok_or_else(|| {
            invalid(FieldError::new("type", format!("unknown event type `{t}`")))
        })?),
        None => None,
    };
    if let (Some(i), Some(e)) = (implied, explicit) {
        if i != e {
            return Err(invalid(FieldError::new(
                "type",
                format!(
                    "group_by {} implies type {i}",
                    p.group_by.as_deref().unwrap_or_default()
                ),
            )));
        }
    }
    let event_type = explicit.or(implied);
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
        "series:{}:{}:{}:{limit}:{}",
        bucket.as_str(),
        p.group_by.as_deref().unwrap_or("-"),
        event_type.map_or("-", EventType::as_str),
        cells.as_ref().map_or(String::new(), Cells::digest)
    );
    let group_by = p.group_by.clone();
    let cells = cells.as_ref();
    let res = read
        .answer(&range, &key, |ctx| async move {
            let mut ts = TimeSeries {
                tenant_id: tenant,
                from: range.from,
                to: range.to,
                as_of: None,
                bucket: bucket.as_str().into(),
                group_by,
                event_type: event_type.map(|t| t.as_str().to_string()),
                groups: 0,
                series: Vec::new(),
            };
            if let Some(TenantRead { mut tx, fresh, .. }) = ctx {
                ts.as_of = fresh.as_of.filter(|_| k.is_none());
                let query = SeriesQuery {
                    range: &range,
                    visibility,
                    bucket,
                    column,
                    event_type,
                    limit,
                    cells,
                };
                (ts.groups, ts.series) = compute_series(&mut tx, query).await.map_err(db_error)?;
            }
            Ok(ts)
        })
        .await?;
    let by_user = read.params.group_by.as_deref() == Some("user");
    read.audited("time series by user", res, |a| {
        if by_user {
            crate::read::privacy::ids_in(a, "series", "group")
        } else {
            Vec::new()
        }
    })
    .await
}

/// Bucket, whether the group is one of the kept ones, the group (`''` for `other`), the
/// number of distinct groups, then the sums.
type SeriesRow = (
    DateTime<Utc>,
    bool,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    f64,
);

/// What one time series reads.
struct SeriesQuery<'a> {
    range: &'a TimeRange,
    visibility: &'a Visibility,
    bucket: Bucket,
    column: Option<&'static str>,
    event_type: Option<EventType>,
    /// How many groups get their own series.
    limit: usize,
    /// Only privacy mode's cells (with whole days and a daily or weekly bucket).
    cells: Option<&'a Cells>,
}

/// The number of distinct groups, and the series: the `limit` largest groups by count (in
/// group order), then `other` (the sum of the rest) if any.
async fn compute_series(
    conn: &mut PgConnection,
    q: SeriesQuery<'_>,
) -> sqlx::Result<(i64, Vec<Series>)> {
    let SeriesQuery {
        range,
        visibility,
        bucket,
        column,
        event_type,
        limit,
        cells,
    } = q;
    let (k, ids, teams) = Cells::binds(cells);
    let (user_filter, team_filter) = visibility.filters();
    let grain = Cells::grain(cells, Grain::for_series(bucket, range));
    let width = bucket.width();
    let interval = sqlx::postgres::types::PgInterval {
        months: 0,
        days: 0,
        microseconds: width.num_microseconds().expect("bucket widths are small"),
    };
    // Weeks start on Monday: 2000-01-03 was one, and every smaller width divides a week.
    let rows: Vec<SeriesRow> = if column.is_none()
        && *visibility == Visibility::Tenant
        && k.is_none()
    {
        // One series of the whole tenant: from the tenant-wide rollups (one group, kept).
        sqlx::query_as(by_grain!(
            grain,
            "activity_all",
            "SELECT date_bin($3, bucket, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS t, true, '',
                    1::bigint, sum(count)::bigint, sum(errors)::bigint,
                    sum(duration_sum)::bigint, sum(input_tokens)::bigint,
                    sum(output_tokens)::bigint, sum(value_sum)
               FROM ",
            " WHERE bucket >= $1 AND bucket < $2 AND ($4::text IS NULL OR event_type = $4)
              GROUP BY 1 ORDER BY 1"
        ))
        .bind(range.from)
        .bind(range.to)
        .bind(interval)
        .bind(event_type.map(EventType::as_str))
        .fetch_all(&mut *conn)
        .await?
    } else {
        sqlx::query_as(by_grain!(
            grain,
            "WITH r AS (
             SELECT date_bin($3, bucket, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS t,
                    CASE $4 WHEN 'user' THEN user_id WHEN 'team' THEN team_id
                            WHEN 'project' THEN project_id WHEN 'name' THEN name ELSE '' END AS g,
                    sum(count) AS c, sum(errors) AS e, sum(duration_sum) AS ds,
                    sum(input_tokens) AS ti, sum(output_tokens) AS tout, sum(value_sum) AS vs
               FROM ",
            " WHERE bucket >= $1 AND bucket < $2 AND ($5::text IS NULL OR event_type = $5)
                AND ($6::text IS NULL OR user_id = $6) AND ($7::text[] IS NULL OR team_id = ANY($7))
                AND ($9::int IS NULL OR (bucket, team_id, event_type) IN (SELECT * FROM private_cells($1, $2, $9, $10, $11)))
              GROUP BY 1, 2),
         kept AS (SELECT g FROM r GROUP BY g ORDER BY sum(c) DESC, g LIMIT $8),
         k AS (SELECT r.*, r.g IN (SELECT g FROM kept) AS is_kept FROM r)
         SELECT t, is_kept, CASE WHEN is_kept THEN g ELSE '' END AS gg,
                (SELECT count(DISTINCT g) FROM r),
                sum(c)::bigint, sum(e)::bigint, sum(ds)::bigint, sum(ti)::bigint,
                sum(tout)::bigint, sum(vs)
           FROM k GROUP BY 1, 2, 3 ORDER BY 2 DESC, 3, 1"
        ))
        .bind(range.from)
        .bind(range.to)
        .bind(interval)
        .bind(column.unwrap_or(""))
        .bind(event_type.map(EventType::as_str))
        .bind(user_filter)
        .bind(team_filter)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(k)
        .bind(ids)
        .bind(teams)
        .fetch_all(&mut *conn)
        .await?
    };
    let mut series: Vec<Series> = Vec::new();
    let mut groups = 0;
    for (t, kept, g, distinct, count, errors, dsum, tin, tout, vsum) in rows {
        groups = distinct;
        let group = column.filter(|_| kept).map(|_| g);
        let other = !kept;
        if series
            .last()
            .is_none_or(|s| s.group != group || s.other != other)
        {
            series.push(Series {
                group: group.clone(),
                other,
                points: Vec::new(),
            });
        }
        series.last_mut().expect("just pushed").points.push(Point {
            t,
            count,
            errors,
            duration_sum_ms: dsum,
            duration_avg_ms: (count > 0).then(|| dsum as f64 / count as f64),
            input_tokens: tin,
            output_tokens: tout,
            value_sum: vsum,
        });
    }
    Ok((groups, series))
}
