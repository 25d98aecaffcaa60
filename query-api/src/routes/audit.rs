//! `GET /v1/audit`: the tenant's audit log (auth and control events), newest first, for its
//! owners and admins, with cursor pagination.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::FieldError;
use shared::problem::Problem;
use shared::tenant_sql;
use uuid::Uuid;

use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct AuditParams {
    pub range: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Entry {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub user_id: Option<Uuid>,
    pub email: Option<String>,
    pub ip: Option<String>,
    pub target: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AuditPage {
    pub entries: Vec<Entry>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn bad(field: &str, reason: &str) -> Problem {
    let e = FieldError::new(field, reason);
    Problem::bad_request("invalid-parameter", format!("{field}: {reason}")).with_errors(vec![e])
}

pub async fn audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, Problem> {
    let reader = crate::auth::reader(&s, &headers).await?;
    reader.require_admin()?;
    let Query(p) = params.map_err(|e| Problem::bad_request("invalid-parameter", e.body_text()))?;
    let range = crate::range::TimeRange::parse(
        p.range.as_deref(),
        p.from.as_deref(),
        p.to.as_deref(),
        Utc::now(),
        s.config.max_range_days,
    )
    .map_err(|e| bad(&e.field, &e.reason))?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(bad("limit", "must be 1..=1000"));
    }
    let cursor = p
        .cursor
        .as_deref()
        .map(crate::cursor::decode::<Uuid>)
        .transpose()?;
    let db = super::dashboard::db_error;
    let mut tx = s.pool.begin().await.map_err(db)?;
    let entered = tenant_sql::enter_active_readonly(&mut tx, reader.tenant)
        .await
        .map_err(db)?;
    if entered.is_none() {
        return Ok(Json(AuditPage {
            entries: vec![],
            next_cursor: None,
        }));
    }
    let (before_t, before_id) = cursor.map_or((None, None), |(t, id)| (Some(t), Some(id)));
    let entries: Vec<Entry> = sqlx::query_as(
        "SELECT event_id, occurred_at, type AS event_type, user_id, email, ip, target, detail
           FROM audit_log
          WHERE occurred_at >= $1 AND occurred_at < $2
            AND ($3::text IS NULL OR type = $3)
            AND ($4::timestamptz IS NULL OR (occurred_at, event_id) < ($4, $5))
          ORDER BY occurred_at DESC, event_id DESC
          LIMIT $6",
    )
    .bind(range.from)
    .bind(range.to)
    .bind(p.event_type.as_deref())
    .bind(before_t)
    .bind(before_id)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    let next_cursor = (entries.len() as i64 == limit)
        .then(|| {
            entries
                .last()
                .map(|e| crate::cursor::encode(e.occurred_at, e.event_id))
        })
        .flatten();
    Ok(Json(AuditPage {
        entries,
        next_cursor,
    }))
}
