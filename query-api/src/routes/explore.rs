//! Top-N lists (from the rollups) and the activity feed (from the raw tables, newest first,
//! with cursor pagination and filters). Both follow the caller's visibility.

use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::{EventType, FieldError};
use shared::histogram;
use shared::problem::Problem;
use shared::tenant::TenantId;
use uuid::Uuid;

use crate::range::Grain;
use crate::read::csv::{respond, wants_csv};
use crate::read::privacy::ids_in;
use crate::read::{db_error, invalid, ranged, Read, TenantRead};

#[derive(Debug, Deserialize)]
pub struct TopParams {
    /// `json` (default) or `csv`.
    pub format: Option<String>,
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// command, agent, tool, user, team or project.
    pub dimension: Option<String>,
    /// count, errors or duration (average).
    pub by: Option<String>,
    pub limit: Option<i64>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TopItem {
    pub key: String,
    pub count: i64,
    pub errors: i64,
    pub error_rate: f64,
    pub duration_avg_ms: Option<f64>,
    pub duration_p95_ms: Option<f64>,
    pub duration_max_ms: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TopList {
    pub tenant_id: TenantId,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub as_of: Option<DateTime<Utc>>,
    pub dimension: String,
    pub by: String,
    pub items: Vec<TopItem>,
}

/// `GET /v1/dashboard/top`
pub async fn top(read: Read<TopParams>) -> Result<Response, Problem> {
    read.reader.require_individual_view("a top list")?;
    let p = &read.params;
    let csv = wants_csv(p.format.as_deref())?;
    let range = read.range()?;
    let dimension = p.dimension.clone().unwrap_or_else(|| "command".into());
    let (column, implied) = match dimension.as_str() {
        "command" => ("name", Some(EventType::CommandExecuted)),
        "agent" => ("name", Some(EventType::AgentInteracted)),
        "tool" => ("name", Some(EventType::ToolExecuted)),
        "user" | "team" | "project" => (dimension.as_str(), None),
        other => {
            return Err(invalid(FieldError::new(
                "dimension",
                format!(
                    "unknown dimension `{other}`; use command, agent, tool, user, team or project"
                ),
            )))
        }
    };
    let column = column.to_string();
    let by = p.by.clone().unwrap_or_else(|| "count".into());
    if !["count", "errors", "duration"].contains(&by.as_str()) {
        return Err(invalid(FieldError::new(
            "by",
            "use count, errors or duration",
        )));
    }
    let limit = p.limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(invalid(FieldError::new("limit", "must be 1..=100")));
    }
    let event_type = match (p.event_type.as_deref(), implied) {
        (None, t) => t,
        (Some(t), implied) => {
            let t = EventType::parse(t)
                .filter(|t| t.from_clients())
                .ok_or_else(|| {
                    invalid(FieldError::new("type", format!("unknown event type `{t}`")))
                })?;
            if implied.is_some_and(|i| i != t) {
                return Err(invalid(FieldError::new(
                    "type",
                    format!("dimension {dimension} implies its own type"),
                )));
            }
            Some(t)
        }
    };
    let (tenant, visibility) = (read.reader.tenant, &read.reader.visibility);
    let key = format!(
        "top:{dimension}:{by}:{limit}:{}",
        event_type.map_or("-", EventType::as_str)
    );
    let res = read.answer(&range, &key, |ctx| async move {
        let mut list = TopList {
            tenant_id: tenant,
            from: range.from,
            to: range.to,
            as_of: None,
            dimension,
            by: by.clone(),
            items: Vec::new(),
        };
        let Some(TenantRead { mut tx, fresh, .. }) = ctx else { return Ok(list) };
        list.as_of = fresh.as_of;
        let (user_filter, team_filter) = visibility.filters();
        let grain = Grain::for_range(&range);
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(by_grain!(
            grain,
            "SELECT CASE $3 WHEN 'user' THEN user_id WHEN 'team' THEN team_id
                            WHEN 'project' THEN project_id ELSE name END AS k,
                    sum(count)::bigint, sum(errors)::bigint, sum(duration_sum)::bigint,
                    max(duration_max)
               FROM ",
            " WHERE bucket >= $1 AND bucket < $2 AND ($4::text IS NULL OR event_type = $4)
                AND ($5::text IS NULL OR user_id = $5) AND ($6::text[] IS NULL OR team_id = ANY($6))
              GROUP BY 1
             HAVING (CASE $3 WHEN 'user' THEN min(user_id) WHEN 'team' THEN min(team_id)
                             WHEN 'project' THEN min(project_id) ELSE min(name) END) <> ''
              ORDER BY CASE $7 WHEN 'errors' THEN sum(errors)::float8
                               WHEN 'duration' THEN sum(duration_sum)::float8 / greatest(sum(count), 1)
                               ELSE sum(count)::float8 END DESC, 1
              LIMIT $8"
        ))
        .bind(range.from)
        .bind(range.to)
        .bind(&column)
        .bind(event_type.map(EventType::as_str))
        .bind(user_filter)
        .bind(team_filter)
        .bind(&by)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let keys: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let hists: Vec<(String, i64, i64)> = sqlx::query_as(by_grain!(
            grain,
            "SELECT CASE $3 WHEN 'user' THEN a.user_id WHEN 'team' THEN a.team_id
                            WHEN 'project' THEN a.project_id ELSE a.name END AS k, h.i, sum(h.n)::bigint
               FROM ",
            " a, unnest(a.duration_hist) WITH ORDINALITY AS h(n, i)
              WHERE a.bucket >= $1 AND a.bucket < $2 AND ($4::text IS NULL OR a.event_type = $4)
                AND ($5::text IS NULL OR a.user_id = $5) AND ($6::text[] IS NULL OR a.team_id = ANY($6))
                AND h.n > 0
                AND (CASE $3 WHEN 'user' THEN a.user_id WHEN 'team' THEN a.team_id
                             WHEN 'project' THEN a.project_id ELSE a.name END) = ANY($7)
              GROUP BY 1, 2"
        ))
        .bind(range.from)
        .bind(range.to)
        .bind(&column)
        .bind(event_type.map(EventType::as_str))
        .bind(user_filter)
        .bind(team_filter)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let mut hist_of: std::collections::HashMap<String, Vec<i64>> = Default::default();
        for (k, i, n) in hists {
            let h = hist_of.entry(k).or_insert_with(|| vec![0; histogram::BUCKETS]);
            if let Some(slot) = usize::try_from(i - 1).ok().and_then(|i| h.get_mut(i)) {
                *slot += n;
            }
        }
        list.items = rows
            .into_iter()
            .map(|(key, count, errors, dsum, dmax)| TopItem {
                duration_p95_ms: hist_of.get(&key).and_then(|h| histogram::quantile(h, 0.95)),
                key,
                count,
                errors,
                error_rate: if count > 0 { errors as f64 / count as f64 } else { 0.0 },
                duration_avg_ms: (count > 0).then(|| dsum as f64 / count as f64),
                duration_max_ms: dmax,
            })
            .collect();
        Ok(list)
    })
    .await?;
    let res = read
        .audited("top users", res, |a| {
            let by_user = a.get("dimension").and_then(|d| d.as_str()) == Some("user");
            if by_user {
                ids_in(a, "items", "key")
            } else {
                Vec::new()
            }
        })
        .await?;
    respond(res, csv, "items").await
}

#[derive(Debug, Deserialize)]
pub struct ActivityParams {
    /// `json` (default) or `csv`.
    pub format: Option<String>,
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub user: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub status: Option<String>,
    pub name: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

ranged!(TopParams, ActivityParams);

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct ActivityItem {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub user_id: String,
    pub team_id: String,
    pub project_id: String,
    pub session_id: String,
    pub name: String,
    pub status: String,
    pub duration_ms: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub value: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ActivityPage {
    pub as_of: Option<DateTime<Utc>>,
    pub items: Vec<ActivityItem>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

const FEED_SQL: &str = "SELECT event_id, occurred_at, event_type, user_id, team_id, project_id,
        session_id, name, status, duration_ms, input_tokens, output_tokens, value
   FROM activity_events
  WHERE occurred_at >= $1 AND occurred_at < $2
    AND ($3::text IS NULL OR user_id = $3)
    AND ($4::text IS NULL OR event_type = $4)
    AND ($5::text IS NULL OR status = $5)
    AND ($6::text IS NULL OR name = $6)
    AND ($7::timestamptz IS NULL OR (occurred_at, event_id) < ($7, $8))
    AND ($9::text IS NULL OR user_id = $9)
    AND ($10::text[] IS NULL OR team_id = ANY($10))
  ORDER BY occurred_at DESC, event_id DESC
  LIMIT $11";

/// `GET /v1/dashboard/activity`
pub async fn activity(read: Read<ActivityParams>) -> Result<Response, Problem> {
    read.reader.require_individual_view("the activity list")?;
    let p = &read.params;
    let csv = wants_csv(p.format.as_deref())?;
    let range = read.range()?;
    let limit = p.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(invalid(FieldError::new("limit", "must be 1..=1000")));
    }
    if let Some(t) = p.event_type.as_deref() {
        if !EventType::parse(t).is_some_and(|t| t.from_clients()) {
            return Err(invalid(FieldError::new(
                "type",
                format!("unknown event type `{t}`"),
            )));
        }
    }
    let cursor = p
        .cursor
        .as_deref()
        .map(crate::cursor::decode::<Uuid>)
        .transpose()?;
    let visibility = &read.reader.visibility;
    let key = format!(
        "activity:{:?}:{:?}:{:?}:{:?}:{limit}:{:?}",
        p.user, p.event_type, p.status, p.name, p.cursor
    );
    let res = read
        .answer(&range, &key, |ctx| async move {
            let mut page = ActivityPage {
                as_of: None,
                items: Vec::new(),
                next_cursor: None,
            };
            let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
                return Ok(page);
            };
            page.as_of = fresh.as_of;
            let (user_filter, team_filter) = visibility.filters();
            let (before_t, before_id) = cursor.map_or((None, None), |(t, id)| (Some(t), Some(id)));
            page.items = sqlx::query_as(FEED_SQL)
                .bind(range.from)
                .bind(range.to)
                .bind(p.user.as_deref())
                .bind(p.event_type.as_deref())
                .bind(p.status.as_deref())
                .bind(p.name.as_deref())
                .bind(before_t)
                .bind(before_id)
                .bind(user_filter)
                .bind(team_filter)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
            if page.items.len() as i64 == limit {
                page.next_cursor = page
                    .items
                    .last()
                    .map(|i| crate::cursor::encode(i.occurred_at, i.event_id));
            }
            Ok(page)
        })
        .await?;
    let res = read
        .audited("activity", res, |a| ids_in(a, "items", "user_id"))
        .await?;
    respond(res, csv, "items").await
}
