//! The control plane over HTTP (`/v1/admin/…`).
//!
//! Tenants are managed by platform operators (an operator key, `tlo_…`). A tenant's users and
//! API keys are managed by its owners and admins (their access token) or by an API key with
//! the `admin` scope; the tenant always comes from the credential, so another tenant's ids in
//! the path simply are not found.

use std::net::IpAddr;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::apikey::{self, Scope};
use shared::events::{Actor, AuthEvent, AuthKind};
use shared::jwt::Role;
use shared::problem::Problem;
use shared::serve::Peer;
use shared::tenant::TenantId;
use uuid::Uuid;

use super::store;
use crate::extract::{json_body, Body, Id};
use crate::routes::auth::hash_password;
use crate::state::AppState;

/// A page of a list: `limit` (1 to [`MAX_PAGE`], default [`PAGE`]) rows after `cursor` (the
/// one the previous page's `Link: <…>; rel="next"` carries).
#[derive(Debug, Deserialize)]
pub struct Page {
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// Rows of a list page by default.
pub const PAGE: i64 = 100;
/// Most rows of a list page.
pub const MAX_PAGE: i64 = 1000;

impl Page {
    /// The page asked for, or 400 `invalid-parameter` naming what is wrong.
    pub fn asked(q: Result<Query<Page>, QueryRejection>) -> Result<Page, Problem> {
        let Query(page) =
            q.map_err(|e| Problem::bad_request("invalid-parameter", e.body_text()))?;
        if page.limit.is_some_and(|l| !(1..=MAX_PAGE).contains(&l)) {
            let reason = format!("must be 1 to {MAX_PAGE}");
            return Err(Problem::invalid_parameter("limit", reason));
        }
        Ok(page)
    }

    pub fn limit(&self) -> i64 {
        self.limit.unwrap_or(PAGE)
    }

    /// The position a `(time, id)` cursor names; the start without one.
    pub fn after_time(&self) -> Result<(Option<DateTime<Utc>>, Uuid), Problem> {
        match self.cursor.as_deref() {
            None => Ok((None, Uuid::nil())),
            Some(c) => shared::cursor::decode::<Uuid>(c).map(|(t, id)| (Some(t), id)),
        }
    }

    /// The answer: the page's rows (read one past `limit`) as JSON, with a `Link` to the next
    /// page when there is one.
    pub fn answer<T: Serialize>(
        &self,
        path: &str,
        mut rows: Vec<T>,
        cursor: impl Fn(&T) -> String,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let limit = self.limit();
        let next = (rows.len() as i64 > limit).then(|| {
            rows.truncate(limit as usize);
            rows.last().map(&cursor)
        });
        let mut res = Json(rows).into_response();
        if let Some(Some(c)) = next {
            let link = format!("<{path}?limit={limit}&cursor={c}>; rel=\"next\"");
            if let Ok(v) = header::HeaderValue::from_str(&link) {
                res.headers_mut().insert(header::LINK, v);
            }
        }
        res
    }
}

fn failed(e: anyhow::Error) -> Problem {
    if let Some(l) = e.downcast_ref::<store::LimitReached>() {
        return Problem::from(*l);
    }
    if let Some(gone) = e.downcast_ref::<store::RightsGone>() {
        return Problem::forbidden(gone.to_string());
    }
    let unique = e
        .downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .is_some_and(|d| d.is_unique_violation());
    if unique {
        return Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "Conflict",
            "that e-mail address, or that user id, is already taken in this tenant",
        );
    }
    if e.downcast_ref::<sqlx::Error>()
        .is_some_and(shared::db::unavailable)
    {
        tracing::warn!(error = %e, "control plane: the database is unavailable");
        return Problem::unavailable("the control plane cannot reach its database now", 2);
    }
    tracing::error!(error = %e, "control-plane change failed");
    Problem::internal()
}

fn ns(s: &AppState) -> &str {
    &s.config.common.topic_prefix
}

/// A request made with a valid, unrevoked operator key: the guard of the tenant routes, as
/// an extractor (it runs before the body is read).
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Problem> {
        operator(s, &parts.headers).await.map(|()| Operator)
    }
}

/// The caller must present a valid, unrevoked operator key.
async fn operator(s: &AppState, headers: &HeaderMap) -> Result<(), Problem> {
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| k.starts_with(apikey::OPERATOR_PREFIX))
        .ok_or_else(|| Problem::unauthorized("an operator key is required"))?;
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.operator_keys WHERE key_hash = $1 AND revoked_at IS NULL)",
    )
    .bind(apikey::hash(key))
    .fetch_one(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    if known {
        Ok(())
    } else {
        Err(Problem::unauthorized("unknown or revoked operator key"))
    }
}

/// Who administers a tenant: an owner or admin (access token), or an `admin` API key.
pub struct TenantAdmin {
    pub tenant: TenantId,
    /// Only owners may create, promote, demote or deactivate owners, or change SSO settings.
    pub is_owner: bool,
    /// The person or key acting, for the audit log.
    pub actor: Actor,
}

impl TenantAdmin {
    /// Whose rights the caller acts with: the person's, or those its key was made with.
    pub async fn person(&self, s: &AppState) -> Result<Option<Uuid>, Problem> {
        match (self.actor.user_id, self.actor.api_key_id) {
            (Some(user), _) => Ok(Some(user)),
            (None, Some(key)) => Ok(sqlx::query_scalar(
                "SELECT on_behalf_of FROM control.api_keys WHERE id = $1",
            )
            .bind(key)
            .fetch_optional(&s.pool)
            .await
            .map_err(|e| failed(e.into()))?
            .flatten()),
            (None, None) => Ok(None),
        }
    }

    /// Audits a refused change (`auth.access_denied`) and returns the 403 to answer with.
    pub async fn refuse(&self, s: &AppState, detail: &str, target: String) -> Problem {
        let event = AuthEvent {
            user_id: self.actor.user_id,
            target: Some(target),
            detail: Some(detail.to_string()),
            ..Default::default()
        };
        let written = async {
            let mut conn = s.pool.acquire().await.map_err(|e| failed(e.into()))?;
            crate::routes::auth::audit_as(
                s,
                &mut conn,
                self.tenant,
                AuthKind::AccessDenied,
                self.actor.clone(),
                event,
            )
            .await
        };
        match written.await {
            Ok(()) => {
                s.outbox_wake.notify_one();
                metrics::counter!("control_access_denied_total").increment(1);
                Problem::forbidden(detail)
            }
            Err(p) => p,
        }
    }
}

/// The guard of a tenant's control plane, as an extractor: the credential (access token or
/// `admin` key) is parsed once, before the body is read.
impl FromRequestParts<AppState> for TenantAdmin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Problem> {
        tenant_admin(s, &parts.headers, Peer::of(&parts.extensions)).await
    }
}

async fn tenant_admin(
    s: &AppState,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Result<TenantAdmin, Problem> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if shared::jwt::looks_like_jwt(bearer) {
        let claims = crate::routes::auth::caller(s, headers).await?;
        return match claims.role {
            Role::Owner | Role::Admin => Ok(TenantAdmin {
                tenant: claims.tid,
                is_owner: claims.role == Role::Owner,
                actor: Actor {
                    user_id: Some(claims.sub),
                    api_key_id: None,
                },
            }),
            _ => Err(Problem::forbidden(
                "only the tenant's owners and admins may do this",
            )),
        };
    }
    let key = s.keys.authenticate(headers, Scope::Admin, peer).await?;
    // The key cache may be up to its TTL behind; the control plane checks the key and its
    // tenant now, so a revoked key or a deactivated tenant loses it at once.
    let live: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.api_keys k JOIN control.tenants t ON t.id = k.tenant_id
                         WHERE k.id = $1 AND k.revoked_at IS NULL AND t.status = 'active')",
    )
    .bind(key.key_id)
    .fetch_one(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    if !live {
        return Err(Problem::unauthorized("unknown or revoked API key"));
    }
    Ok(TenantAdmin {
        tenant: key.tenant_id,
        is_owner: false,
        actor: Actor {
            user_id: None,
            api_key_id: Some(key.key_id),
        },
    })
}

#[derive(Debug, Deserialize)]
pub struct NewTenant {
    pub name: String,
    pub plan: Option<String>,
    pub rate_limit_per_min: Option<i32>,
    /// Privacy mode from the start (default off), and its group size (default 5).
    pub privacy_mode: Option<bool>,
    pub privacy_k: Option<i32>,
    pub owner: NewPerson,
}

#[derive(Debug, Deserialize)]
pub struct NewPerson {
    pub email: String,
    pub password: String,
    pub role: Option<String>,
    pub external_id: Option<String>,
    #[serde(default)]
    pub teams: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedTenant {
    pub tenant_id: TenantId,
    pub owner_id: Uuid,
}

/// A name-like field must have 1 to `max` characters.
pub(crate) fn check_len(field: &str, value: &str, max: usize) -> Result<(), Problem> {
    if (1..=max).contains(&value.chars().count()) {
        Ok(())
    } else {
        Err(Problem::invalid_field(
            field,
            format!("must have 1 to {max} characters"),
        ))
    }
}

/// The most teams one person belongs to.
pub const MAX_TEAMS_PER_PERSON: usize = 100;

/// A person's teams: at most [`MAX_TEAMS_PER_PERSON`], each a team's key (1 to 255
/// characters, as `PUT /v1/admin/teams/{key}` takes). They are copied into the person's
/// tokens, their outbox snapshots and every team's member list.
pub(crate) fn check_teams(field: &str, teams: &[String]) -> Result<(), Problem> {
    if teams.len() > MAX_TEAMS_PER_PERSON {
        return Err(Problem::invalid_field(
            field,
            format!("at most {MAX_TEAMS_PER_PERSON} teams"),
        ));
    }
    match teams
        .iter()
        .position(|t| !(1..=255).contains(&t.chars().count()))
    {
        Some(i) => Err(Problem::invalid_field(
            &format!("{field}[{i}]"),
            "must have 1 to 255 characters",
        )),
        None => Ok(()),
    }
}

fn check_plan(plan: Option<&str>, limit: Option<i32>) -> Result<(), Problem> {
    if let Some(p) = plan {
        if !["free", "professional", "enterprise"].contains(&p) {
            return Err(Problem::invalid_field(
                "plan",
                "must be free, professional or enterprise",
            ));
        }
    }
    if limit.is_some_and(|l| l < 1) {
        return Err(Problem::invalid_field(
            "rate_limit_per_min",
            "must be positive",
        ));
    }
    Ok(())
}

fn check_person(p: &NewPerson, prefix: &str) -> Result<Role, Problem> {
    let email = p.email.trim();
    if !email.contains('@') || !(3..=254).contains(&email.len()) {
        return Err(Problem::invalid_field(
            &format!("{prefix}email"),
            "must be an e-mail address",
        ));
    }
    crate::password::check_policy(&format!("{prefix}password"), &p.password)
        .map_err(|e| Problem::validation(format!("{}: {}", e.field, e.reason), vec![e]))?;
    // Indexed (one person per id in a tenant), so bounded as a name is.
    if let Some(id) = &p.external_id {
        check_len(&format!("{prefix}external_id"), id, 255)?;
    }
    check_teams(&format!("{prefix}teams"), &p.teams)?;
    match p.role.as_deref() {
        None => Ok(Role::Developer),
        Some(r) => Role::parse(r).ok_or_else(|| {
            Problem::invalid_field(
                &format!("{prefix}role"),
                "must be owner, admin, manager, developer or viewer",
            )
        }),
    }
}

/// `POST /v1/admin/tenants` (operator): a tenant with its first owner.
pub async fn create_tenant(
    State(s): State<AppState>,
    _: Operator,
    Body(req): Body<NewTenant>,
) -> Result<(StatusCode, Json<CreatedTenant>), Problem> {
    check_len("name", &req.name, 200)?;
    check_plan(req.plan.as_deref(), req.rate_limit_per_min)?;
    check_person(&req.owner, "owner.")?;
    if req.privacy_k.is_some_and(|k| !(2..=1000).contains(&k)) {
        return Err(Problem::invalid_field("privacy_k", "must be 2..=1000"));
    }
    let privacy = req.privacy_mode.unwrap_or(false);
    // Hashed first, within the service's hash slots: a request refused for want of one leaves
    // no tenant without its owner behind.
    let owner_hash = hash_password(&s, req.owner.password.clone()).await?;
    let tenant =
        store::create_tenant_with_privacy(&s.pool, ns(&s), &req.name, privacy, req.privacy_k)
            .await
            .map_err(failed)?;
    if req.plan.is_some() || req.rate_limit_per_min.is_some() {
        let plan = req.plan.as_deref().unwrap_or("professional");
        store::set_plan(&s.pool, tenant, plan, req.rate_limit_per_min)
            .await
            .map_err(failed)?;
    }
    let owner_id = store::create_user_hashed(
        &s.pool,
        ns(&s),
        store::NewUser {
            tenant,
            email: &req.owner.email,
            password: &req.owner.password,
            role: Role::Owner,
            external_id: req.owner.external_id.as_deref(),
            teams: &req.owner.teams,
        },
        owner_hash,
    )
    .await
    .map_err(failed)?;
    s.outbox_wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(CreatedTenant {
            tenant_id: tenant,
            owner_id,
        }),
    ))
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct TenantRow {
    pub id: Uuid,
    pub name: String,
    pub status: String,
    pub plan: String,
    pub rate_limit_per_min: Option<i32>,
    pub raw_retention_days: i32,
    pub rollup_retention_days: i32,
    pub compress_after_days: i32,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/admin/tenants` (operator)
pub async fn list_tenants(
    State(s): State<AppState>,
    _: Operator,
) -> Result<Json<Vec<TenantRow>>, Problem> {
    let rows = sqlx::query_as(
        "SELECT id, name, status, plan, rate_limit_per_min, raw_retention_days, rollup_retention_days,
                compress_after_days, created_at
           FROM control.tenants ORDER BY created_at",
    )
    .fetch_all(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    Ok(Json(rows))
}

#[derive(Debug, Deserialize)]
pub struct TenantPatch {
    pub name: Option<String>,
    pub plan: Option<String>,
    pub rate_limit_per_min: Option<i32>,
    pub status: Option<String>,
    /// Days raw rows (and minute rollups) are kept.
    pub raw_retention_days: Option<i32>,
    /// Days hourly and daily rollups are kept (at least the raw window).
    pub rollup_retention_days: Option<i32>,
    /// Raw chunks older than this many days are compressed (TimescaleDB).
    pub compress_after_days: Option<i32>,
}

/// `PATCH /v1/admin/tenants/{id}` (operator): plan, limit, deactivate/reactivate.
pub async fn update_tenant(
    State(s): State<AppState>,
    _: Operator,
    Id(id): Id,
    Body(req): Body<TenantPatch>,
) -> Result<StatusCode, Problem> {
    check_plan(req.plan.as_deref(), req.rate_limit_per_min)?;
    let exists: Option<String> =
        sqlx::query_scalar("SELECT plan FROM control.tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&s.pool)
            .await
            .map_err(|e| failed(e.into()))?;
    let current_plan = exists.ok_or_else(|| Problem::not_found("no such tenant"))?;
    let tenant = TenantId(id);
    if let Some(name) = req.name.as_deref() {
        check_len("name", name, 200)?;
        sqlx::query("UPDATE control.tenants SET name = $2, updated_at = now() WHERE id = $1")
            .bind(id)
            .bind(name)
            .execute(&s.pool)
            .await
            .map_err(|e| failed(e.into()))?;
    }
    if req.raw_retention_days.is_some() || req.rollup_retention_days.is_some() {
        set_retention(&s, id, req.raw_retention_days, req.rollup_retention_days).await?;
    }
    if let Some(days) = req.compress_after_days {
        if !(1..=3650).contains(&days) {
            return Err(Problem::invalid_field(
                "compress_after_days",
                "must be 1 to 3650 days",
            ));
        }
        sqlx::query(
            "UPDATE control.tenants SET compress_after_days = $2, updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(days)
        .execute(&s.pool)
        .await
        .map_err(|e| failed(e.into()))?;
    }
    if req.plan.is_some() || req.rate_limit_per_min.is_some() {
        let plan = req.plan.unwrap_or(current_plan);
        store::set_plan(&s.pool, tenant, &plan, req.rate_limit_per_min)
            .await
            .map_err(failed)?;
    }
    if let Some(status) = req.status.as_deref() {
        if !["active", "deactivated"].contains(&status) {
            return Err(Problem::invalid_field(
                "status",
                "must be active or deactivated",
            ));
        }
        store::set_status(&s.pool, ns(&s), tenant, status)
            .await
            .map_err(failed)?;
        s.outbox_wake.notify_one();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Sets a tenant's retention windows, checked against each other.
async fn set_retention(
    s: &AppState,
    id: Uuid,
    raw: Option<i32>,
    rollups: Option<i32>,
) -> Result<(), Problem> {
    for (field, v) in [
        ("raw_retention_days", raw),
        ("rollup_retention_days", rollups),
    ] {
        if v.is_some_and(|d| !(1..=3650).contains(&d)) {
            return Err(Problem::invalid_field(field, "must be 1 to 3650 days"));
        }
    }
    let updated = sqlx::query(
        "UPDATE control.tenants
            SET raw_retention_days = coalesce($2, raw_retention_days),
                rollup_retention_days = coalesce($3, rollup_retention_days),
                updated_at = now()
          WHERE id = $1 AND coalesce($3, rollup_retention_days) >= coalesce($2, raw_retention_days)",
    )
    .bind(id)
    .bind(raw)
    .bind(rollups)
    .execute(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    if updated.rows_affected() == 0 {
        return Err(Problem::invalid_field(
            "rollup_retention_days",
            "must be at least raw_retention_days",
        ));
    }
    Ok(())
}

/// `POST /v1/admin/users` (tenant admin)
pub async fn create_user(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Body(req): Body<NewPerson>,
) -> Result<(StatusCode, Json<serde_json::Value>), Problem> {
    let role = check_person(&req, "")?;
    if role == Role::Owner && !caller.is_owner {
        return Err(caller
            .refuse(
                &s,
                "only an owner may create another owner",
                format!("user:{}", req.email.trim().to_lowercase()),
            )
            .await);
    }
    store::room_for_a_person_now(&s.pool, caller.tenant)
        .await
        .map_err(|e| failed(e.into()))??;
    let hash = hash_password(&s, req.password.clone()).await?;
    let id = store::create_user_hashed(
        &s.pool,
        ns(&s),
        store::NewUser {
            tenant: caller.tenant,
            email: &req.email,
            password: &req.password,
            role,
            external_id: req.external_id.as_deref(),
            teams: &req.teams,
        },
        hash,
    )
    .await
    .map_err(failed)?;
    s.outbox_wake.notify_one();
    Ok((StatusCode::CREATED, Json(serde_json::json!({"id": id}))))
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub status: String,
    pub external_id: String,
    pub teams: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// `GET /v1/admin/users?limit=&cursor=` (tenant admin): a page, oldest first.
pub async fn list_users(
    State(s): State<AppState>,
    caller: TenantAdmin,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<axum::response::Response, Problem> {
    let page = Page::asked(page)?;
    let (at, id) = page.after_time()?;
    let rows: Vec<UserRow> = sqlx::query_as(
        "SELECT id, email, role, status, external_id, teams, created_at
           FROM control.users
          WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
          ORDER BY created_at, id LIMIT $4",
    )
    .bind(caller.tenant.0)
    .bind(at)
    .bind(id)
    .bind(page.limit() + 1)
    .fetch_all(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    Ok(page.answer("/v1/admin/users", rows, |u| {
        shared::cursor::encode(u.created_at, u.id)
    }))
}

#[derive(Debug, Deserialize)]
pub struct UserPatch {
    pub role: Option<String>,
    pub teams: Option<Vec<String>>,
    pub status: Option<String>,
}

/// `PATCH /v1/admin/users/{id}` (tenant admin): role, teams, deactivate/reactivate.
pub async fn update_user(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
    Body(req): Body<UserPatch>,
) -> Result<StatusCode, Problem> {
    let role = match req.role.as_deref() {
        None => None,
        Some(r) => {
            Some(Role::parse(r).ok_or_else(|| Problem::invalid_field("role", "unknown role"))?)
        }
    };
    if let Some(teams) = &req.teams {
        check_teams("teams", teams)?;
    }
    let active = match req.status.as_deref() {
        None => None,
        Some("active") => Some(true),
        Some("deactivated") => Some(false),
        Some(_) => {
            return Err(Problem::invalid_field(
                "status",
                "must be active or deactivated",
            ))
        }
    };
    let outcome = store::update_user(
        &s.pool,
        ns(&s),
        store::UserChange {
            tenant: caller.tenant,
            id,
            role,
            teams: req.teams.as_deref(),
            active,
            by_owner: caller.is_owner,
            actor: caller.actor.clone(),
        },
    )
    .await
    .map_err(failed)?;
    match outcome {
        store::UserUpdate::Updated => {
            s.outbox_wake.notify_one();
            Ok(StatusCode::NO_CONTENT)
        }
        store::UserUpdate::NotFound => Err(Problem::not_found("no such user in this tenant")),
        store::UserUpdate::LastOwner => Err(Problem::new(
            StatusCode::CONFLICT,
            "last-owner",
            "Last owner",
            "a tenant keeps at least one active owner; make another owner first",
        )),
        store::UserUpdate::OwnerOnly => Err(caller
            .refuse(
                &s,
                "only an owner may make, demote or deactivate an owner",
                format!("user:{id}"),
            )
            .await),
    }
}

/// `DELETE /v1/admin/users/{id}` (tenant admin; an owner only by an owner): removes a
/// deactivated person for good ([`store::remove_user`]). 409 `still-active` for an active one.
pub async fn remove_user(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    let asker = (caller.is_owner, caller.actor.clone());
    let outcome = store::remove_user(&s.pool, ns(&s), caller.tenant, id, asker)
        .await
        .map_err(failed)?;
    match outcome {
        store::UserRemoval::Removed => {
            s.outbox_wake.notify_one();
            Ok(StatusCode::NO_CONTENT)
        }
        store::UserRemoval::NotFound => Err(Problem::not_found("no such user in this tenant")),
        store::UserRemoval::StillActive => Err(Problem::new(
            StatusCode::CONFLICT,
            "still-active",
            "Still active",
            "only a deactivated person is removed; deactivate them first",
        )),
        store::UserRemoval::OwnerOnly => Err(caller
            .refuse(
                &s,
                "only an owner may remove an owner",
                format!("user:{id}"),
            )
            .await),
    }
}

#[derive(Debug, Deserialize)]
pub struct NewApiKey {
    pub name: String,
    pub scope: String,
}

/// `POST /v1/admin/api-keys` (tenant admin): the secret is in this answer only.
pub async fn create_api_key(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Body(req): Body<NewApiKey>,
) -> Result<(StatusCode, Json<serde_json::Value>), Problem> {
    let scope = Scope::parse(&req.scope)
        .ok_or_else(|| Problem::invalid_field("scope", "must be ingest, read or admin"))?;
    check_len("name", &req.name, 100)?;
    let on_behalf_of = caller.person(&s).await?;
    let (id, key) = store::create_api_key_for(
        &s.pool,
        ns(&s),
        caller.tenant,
        scope,
        &req.name,
        on_behalf_of,
    )
    .await
    .map_err(failed)?;
    s.outbox_wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"id": id, "key": key, "scope": scope.as_str(), "name": req.name})),
    ))
}

#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct KeyRow {
    pub id: Uuid,
    pub name: String,
    pub scope: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// `GET /v1/admin/api-keys?limit=&cursor=` (tenant admin): a page, oldest first; never the
/// secrets.
pub async fn list_api_keys(
    State(s): State<AppState>,
    caller: TenantAdmin,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<axum::response::Response, Problem> {
    let page = Page::asked(page)?;
    let (at, id) = page.after_time()?;
    let rows: Vec<KeyRow> = sqlx::query_as(
        "SELECT id, name, scope, created_at, revoked_at FROM control.api_keys
          WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
          ORDER BY created_at, id LIMIT $4",
    )
    .bind(caller.tenant.0)
    .bind(at)
    .bind(id)
    .bind(page.limit() + 1)
    .fetch_all(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    Ok(page.answer("/v1/admin/api-keys", rows, |k| {
        shared::cursor::encode(k.created_at, k.id)
    }))
}

/// `DELETE /v1/admin/api-keys/{id}` (tenant admin): revokes (services forget it within 10 s).
pub async fn revoke_api_key(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    let mine: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.api_keys WHERE id = $1 AND tenant_id = $2 AND revoked_at IS NULL)",
    )
    .bind(id)
    .bind(caller.tenant.0)
    .fetch_one(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    if !mine {
        return Err(Problem::not_found("no such active key in this tenant"));
    }
    store::revoke_api_key(&s.pool, ns(&s), id)
        .await
        .map_err(failed)?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct TeamPut {
    pub name: String,
    #[serde(default)]
    pub members: Vec<Uuid>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TeamView {
    pub key: String,
    pub name: String,
    pub members: Vec<Uuid>,
}

/// `PUT /v1/admin/teams/{key}` (tenant admin): creates or renames a team and sets exactly
/// its members. `key` is the team id the tenant's events carry.
pub async fn put_team(
    State(s): State<AppState>,
    caller: TenantAdmin,
    key: Result<Path<String>, PathRejection>,
    req: Result<Json<TeamPut>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    let key = key
        .map(|Path(k)| k)
        .map_err(|_| Problem::not_found("no such team"))?;
    let req = json_body(req)?;
    check_len("key", &key, 255)?;
    check_len("name", &req.name, 200)?;
    let db = |e: sqlx::Error| failed(e.into());
    let mut tx = s.pool.begin().await.map_err(db)?;
    // The tenant's teams counted under its lock, taken first whatever this PUT turns out to
    // be: a new team is checked against the cap with no other PUT or DELETE in between.
    let teams = store::count_locked(&mut tx, "teams", "true", caller.tenant)
        .await
        .map_err(db)?;
    // Held until the team is stored: a member's removal waits, or is seen. A key-share lock
    // keeps only deletions out; the updates of people (their teams, role, status) go on.
    let known: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM control.users WHERE tenant_id = $1 AND id = ANY($2)
          ORDER BY id FOR KEY SHARE",
    )
    .bind(caller.tenant.0)
    .bind(&req.members)
    .fetch_all(&mut *tx)
    .await
    .map_err(db)?;
    if let Some(stranger) = req.members.iter().find(|m| !known.contains(m)) {
        return Err(Problem::invalid_field(
            "members",
            format!("{stranger} is not a user of this tenant"),
        ));
    }
    let new: bool = sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM control.teams WHERE tenant_id = $1 AND key = $2)",
    )
    .bind(caller.tenant.0)
    .bind(&key)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    if new && teams >= store::MAX_TEAMS {
        return Err(store::LimitReached {
            what: "teams",
            max: store::MAX_TEAMS,
        }
        .into());
    }
    sqlx::query(
        "INSERT INTO control.teams (tenant_id, key, name) VALUES ($1, $2, $3)
         ON CONFLICT (tenant_id, key) DO UPDATE SET name = $3, updated_at = now()",
    )
    .bind(caller.tenant.0)
    .bind(&key)
    .bind(&req.name)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    set_members(&mut tx, caller.tenant, &key, &req.members)
        .await
        .map_err(db)?;
    // A member left without the team had MAX_TEAMS_PER_PERSON already (checked under each
    // person's row lock by the update that adds it): nothing of this PUT is kept.
    let full: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM control.users
          WHERE tenant_id = $1 AND id = ANY($2) AND NOT ($3 = ANY(teams)) LIMIT 1",
    )
    .bind(caller.tenant.0)
    .bind(&req.members)
    .bind(&key)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    if let Some(full) = full {
        return Err(Problem::invalid_field(
            "members",
            format!("{full} is in {MAX_TEAMS_PER_PERSON} teams already"),
        ));
    }
    team_changed(&s, &mut tx, caller.tenant, &key).await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// Makes `members` exactly the users whose `teams` hold `key`.
async fn set_members(
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    key: &str,
    members: &[Uuid],
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE control.users SET teams = array_remove(teams, $2), updated_at = now()
          WHERE tenant_id = $1 AND $2 = ANY(teams) AND NOT (id = ANY($3))",
    )
    .bind(tenant.0)
    .bind(key)
    .bind(members)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE control.users SET teams = array_append(teams, $2), updated_at = now()
          WHERE tenant_id = $1 AND id = ANY($3) AND NOT ($2 = ANY(teams))
            AND cardinality(teams) < $4",
    )
    .bind(tenant.0)
    .bind(key)
    .bind(members)
    .bind(MAX_TEAMS_PER_PERSON as i32)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn team_changed(
    s: &AppState,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    key: &str,
) -> Result<(), Problem> {
    let extra = crate::outbox::team_snapshot(conn, tenant, key)
        .await
        .map_err(|e| failed(e.into()))?;
    let event = shared::events::AuthEvent {
        target: Some(format!("team:{key}")),
        extra,
        ..Default::default()
    };
    crate::routes::auth::audit(
        s,
        conn,
        tenant,
        shared::events::AuthKind::TeamChanged,
        event,
    )
    .await
}

/// `GET /v1/admin/teams?limit=&cursor=` (tenant admin): a page, by key.
pub async fn list_teams(
    State(s): State<AppState>,
    caller: TenantAdmin,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<axum::response::Response, Problem> {
    let page = Page::asked(page)?;
    let after = page
        .cursor
        .as_deref()
        .map(shared::cursor::decode_key)
        .transpose()?;
    let rows: Vec<(String, String, Vec<Uuid>)> = sqlx::query_as(
        "WITH page AS MATERIALIZED (
             SELECT key, name FROM control.teams
              WHERE tenant_id = $1 AND ($2::text IS NULL OR key > $2)
              ORDER BY key LIMIT $3),
         -- The tenant's people read once, not once per team.
         member AS MATERIALIZED (
             SELECT m.key, u.id FROM control.users u CROSS JOIN LATERAL unnest(u.teams) m(key)
              WHERE u.tenant_id = $1 AND m.key IN (SELECT key FROM page))
         SELECT p.key, p.name,
                coalesce(array_agg(m.id ORDER BY m.id) FILTER (WHERE m.id IS NOT NULL), '{}')
           FROM page p LEFT JOIN member m ON m.key = p.key
          GROUP BY p.key, p.name ORDER BY p.key",
    )
    .bind(caller.tenant.0)
    .bind(after)
    .bind(page.limit() + 1)
    .fetch_all(&s.pool)
    .await
    .map_err(|e| failed(e.into()))?;
    let teams = rows
        .into_iter()
        .map(|(key, name, members)| TeamView { key, name, members })
        .collect();
    Ok(page.answer("/v1/admin/teams", teams, |t| {
        shared::cursor::encode_key(&t.key)
    }))
}

/// `DELETE /v1/admin/teams/{key}` (tenant admin): the team goes, and with it the memberships.
pub async fn delete_team(
    State(s): State<AppState>,
    caller: TenantAdmin,
    key: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, Problem> {
    let key = key
        .map(|Path(k)| k)
        .map_err(|_| Problem::not_found("no such team"))?;
    let db = |e: sqlx::Error| failed(e.into());
    let mut tx = s.pool.begin().await.map_err(db)?;
    // Under the teams' lock, as a PUT: a PUT that found this team cannot re-create it past
    // the cap after this delete.
    store::count_locked(&mut tx, "teams", "true", caller.tenant)
        .await
        .map_err(db)?;
    let n = sqlx::query("DELETE FROM control.teams WHERE tenant_id = $1 AND key = $2")
        .bind(caller.tenant.0)
        .bind(&key)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
    if n == 0 {
        return Err(Problem::not_found("no such team in this tenant"));
    }
    set_members(&mut tx, caller.tenant, &key, &[])
        .await
        .map_err(db)?;
    team_changed(&s, &mut tx, caller.tenant, &key).await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::failed;

    #[test]
    fn a_database_outage_is_a_503_and_a_fault_a_500() {
        let outage = failed(anyhow::Error::new(sqlx::Error::PoolTimedOut));
        assert_eq!((outage.status, outage.retry_after), (503, Some(2)));
        let fault = failed(anyhow::Error::new(sqlx::Error::RowNotFound));
        assert_eq!(fault.status, 500);
    }
}
