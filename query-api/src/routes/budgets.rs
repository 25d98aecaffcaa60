//! `GET /v1/budgets` and `GET /v1/budgets/{id}`: where each budget the reader may see stands
//! — spent in the current period, remaining, the burn rate and the forecast of when it runs
//! out — and `GET /v1/firings`, what fired recently. Owners, admins and read keys see every budget; managers and viewers those of their
//! teams; developers their own (scope `user`, their user id). Budgets are managed on
//! ingest-api's control plane (`/v1/admin/budgets`).

use axum::extract::{Path, State};
use axum::Json;
use chrono::Utc;
use serde_json::{json, Value};
use shared::budgets::{self, Budget, Scope};
use shared::problem::Problem;
use uuid::Uuid;

use crate::auth::{Reader, Visibility};
use crate::read::db_error;
use crate::state::AppState;

fn visible(reader: &Reader, b: &Budget) -> bool {
    match &reader.visibility {
        Visibility::Tenant => true,
        Visibility::Teams(teams) => b.scope == Scope::Team && teams.contains(&b.scope_id),
        Visibility::Own(user) => b.scope == Scope::User && &b.scope_id == user,
    }
}

/// In privacy mode, for a reader of aggregates: the teams of at least k active members, the
/// only ones whose budgets and firings they see (and no person's or project's). `None` for
/// everyone else.
async fn large_teams(pool: &sqlx::PgPool, reader: &Reader) -> sqlx::Result<Option<Vec<String>>> {
    shared::auth::large_teams(pool, reader.tenant, reader.aggregates_only()).await
}

async fn with_status(
    s: &AppState,
    reader: &Reader,
    list: Vec<Budget>,
) -> Result<Vec<Value>, Problem> {
    // Each budget's status reads the tenant's spend: one of the tenant's connections, and
    // one connection at a time.
    let _share = s.shares.take(reader.tenant).await.map_err(db_error)?;
    let large = large_teams(&s.pool, reader).await.map_err(db_error)?;
    let mut conn = s.pool.acquire().await.map_err(db_error)?;
    let tz = budgets::time_zone(&mut conn, reader.tenant)
        .await
        .map_err(db_error)?;
    let now = Utc::now();
    let private = |b: &Budget| match &large {
        None => false,
        Some(large) => match b.scope {
            Scope::Tenant => false,
            Scope::Team => !large.contains(&b.scope_id),
            Scope::User | Scope::Project => true,
        },
    };
    let mut out = Vec::new();
    for b in list
        .into_iter()
        .filter(|b| visible(reader, b) && !private(b))
    {
        let status = budgets::status(&mut conn, &b, &tz, now)
            .await
            .map_err(db_error)?;
        out.push(json!({"budget": b, "time_zone": tz, "status": status}));
    }
    Ok(out)
}

/// `GET /v1/budgets`
pub async fn list(State(s): State<AppState>, reader: Reader) -> Result<Json<Vec<Value>>, Problem> {
    let mut conn = s.pool.acquire().await.map_err(db_error)?;
    let all = Budget::of_tenant(&mut conn, reader.tenant)
        .await
        .map_err(db_error)?;
    drop(conn);
    Ok(Json(with_status(&s, &reader, all).await?))
}

/// `GET /v1/budgets/{id}`: 404 for a budget of another tenant or one the reader may not see.
pub async fn get(
    State(s): State<AppState>,
    reader: Reader,
    id: Result<Path<Uuid>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, Problem> {
    let Ok(Path(id)) = id else {
        return Err(Problem::not_found("no such budget"));
    };
    let mut conn = s.pool.acquire().await.map_err(db_error)?;
    let found = Budget::get(&mut conn, reader.tenant, id)
        .await
        .map_err(db_error)?;
    drop(conn);
    let list = with_status(&s, &reader, found.into_iter().collect()).await?;
    list.into_iter()
        .next()
        .map(Json)
        .ok_or_else(|| Problem::not_found("no such budget"))
}

#[derive(Debug, serde::Deserialize)]
pub struct FiringParams {
    /// At most this many, newest first (default 20, at most 200).
    pub limit: Option<i64>,
}

/// `GET /v1/firings`: what fired recently that the reader may see (budget thresholds of the
/// tenant, their teams or themself; channel pauses for those who see the whole tenant).
pub async fn firings(
    State(s): State<AppState>,
    reader: Reader,
    crate::read::Params(p): crate::read::Params<FiringParams>,
) -> Result<Json<Vec<Value>>, Problem> {
    let limit = p.limit.unwrap_or(20);
    if !(1..=200).contains(&limit) {
        return Err(crate::read::invalid(shared::events::FieldError::new(
            "limit",
            "must be 1..=200",
        )));
    }
    let list = visible_firings(&s.pool, &reader, None, limit)
        .await
        .map_err(db_error)?;
    Ok(Json(list.into_iter().map(|(_, _, v)| v).collect()))
}

/// Firings the reader may see — newest first, or, `after` a (time, id), oldest first — each
/// with its time and id (a cursor) and as the API shows it.
pub async fn visible_firings(
    pool: &sqlx::PgPool,
    reader: &Reader,
    after: Option<(chrono::DateTime<Utc>, Uuid)>,
    limit: i64,
) -> sqlx::Result<Vec<(chrono::DateTime<Utc>, Uuid, Value)>> {
    let (scope, ids): (Option<&str>, Vec<String>) = match &reader.visibility {
        Visibility::Tenant => (None, Vec::new()),
        Visibility::Teams(teams) => (Some("team"), teams.clone()),
        Visibility::Own(user) => (Some("user"), vec![user.clone()]),
    };
    let large = large_teams(pool, reader).await?;
    let order = match after {
        None => "DESC",
        Some(_) => "ASC",
    };
    let rows: Vec<(Uuid, String, chrono::DateTime<Utc>, Value)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, source, fired_at, payload FROM control.firings
              WHERE tenant_id = $1 AND ($2::text IS NULL OR (scope = $2 AND scope_id = ANY($3)))
                AND ($5::timestamptz IS NULL OR (fired_at, id) > ($5, $6))
                AND ($7::text[] IS NULL OR scope = 'tenant'
                     OR (scope = 'team' AND scope_id = ANY($7)))
              ORDER BY fired_at {order}, id {order} LIMIT $4"
        )))
        .bind(reader.tenant.0)
        .bind(scope)
        .bind(&ids)
        .bind(limit)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(large)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, source, fired_at, payload)| {
            let v = json!({"id": id, "source": source, "fired_at": fired_at,
                           "type": payload["type"], "data": payload["data"]});
            (fired_at, id, v)
        })
        .collect())
}
