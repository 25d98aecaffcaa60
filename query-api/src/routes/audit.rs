//! `GET /v1/audit`: the tenant's audit log (auth and control events), newest first, for its
//! owners and admins, with cursor pagination.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::FieldError;
use shared::problem::Problem;
use uuid::Uuid;

use crate::read::{db_error, invalid, parse_range, ranged, tenant, Admin, Params};
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

ranged!(AuditParams);

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

/// `GET /v1/audit` (not cached: the audit log is not part of the projection's watermark).
pub async fn audit(
    State(s): State<AppState>,
    Admin(reader): Admin,
    Params(p): Params<AuditParams>,
) -> Result<Json<AuditPage>, Problem> {
    let range = parse_range(&s.config, &p)?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid(FieldError::new("limit", "must be 1..=1000")));
    }
    let cursor = p
        .cursor
        .as_deref()
        .map(crate::cursor::decode::<Uuid>)
        .transpose()?;
    let Some(mut entered) = tenant::enter(&s, reader.tenant).await.map_err(db_error)? else {
        return Ok(Json(AuditPage {
            entries: vec![],
            next_cursor: None,
        }));
    };
    let tx = &mut *entered.tx;
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
    .map_err(db_error)?;
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
