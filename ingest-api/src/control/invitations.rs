//! Invitations: an owner or admin invites a person by e-mail with a role; the person accepts
//! with the link token (valid 1–168 hours, default 72, once) and their own password. Owners
//! and admins list the tenant's invitations and take back open ones; every invitation and
//! revocation is audited as `invitation.changed`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use shared::events::{AuthEvent, AuthKind};
use shared::jwt::Role;
use shared::problem::Problem;
use shared::tenant::TenantId;
use uuid::Uuid;

use crate::control::http::{Page, TenantAdmin};
use crate::extract::{Body, Id};
use crate::state::AppState;

const INVITE_PREFIX: &str = "tli_";

/// An invitation that can still be accepted, as SQL over `control.invitations`.
const OPEN: &str = "accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now()";

/// Audits what happened to invitation `id` (to `email`) as `invitation.changed`, in `tx`.
async fn audited(
    s: &AppState,
    tx: &mut sqlx::PgConnection,
    caller: &TenantAdmin,
    (id, email): (Uuid, &str),
    detail: String,
) -> Result<(), Problem> {
    let event = AuthEvent {
        email: Some(email.to_string()),
        target: Some(format!("invitation:{id}")),
        detail: Some(detail),
        ..Default::default()
    };
    let kind = AuthKind::InvitationChanged;
    crate::routes::auth::audit_as(s, tx, caller.tenant, kind, caller.actor.clone(), event).await
}

#[derive(Debug, Deserialize)]
pub struct NewInvitation {
    pub email: String,
    pub role: Option<String>,
    #[serde(default)]
    pub teams: Vec<String>,
    pub valid_hours: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Invitation {
    pub id: Uuid,
    /// The link token: shown only in this answer.
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

/// One invitation as its tenant's owners and admins see it (never its token).
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct InvitationView {
    pub id: Uuid,
    pub email: String,
    pub role: String,
    pub teams: Vec<String>,
    /// `open`, `accepted`, `revoked` or `expired`.
    pub state: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub accepted_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// The person who accepted it.
    pub user_id: Option<Uuid>,
}

#[derive(Debug, Deserialize)]
pub struct Acceptance {
    pub token: String,
    pub password: String,
}

fn db(e: sqlx::Error) -> Problem {
    if e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
    {
        return Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "Conflict",
            "that e-mail address already has an account in this tenant",
        );
    }
    tracing::error!(error = %e, "invitation query failed");
    Problem::unavailable("invitations are unavailable right now", 2)
}

/// `POST /v1/admin/invitations` (tenant owners/admins)
pub async fn invite(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Body(req): Body<NewInvitation>,
) -> Result<(StatusCode, Json<Invitation>), Problem> {
    let email = req.email.trim().to_lowercase();
    if !email.contains('@') || !(3..=254).contains(&email.len()) {
        return Err(Problem::invalid_field("email", "must be an e-mail address"));
    }
    let role = match req.role.as_deref() {
        None => Role::Developer,
        Some(r) => Role::parse(r).ok_or_else(|| Problem::invalid_field("role", "unknown role"))?,
    };
    if role == Role::Owner && !caller.is_owner {
        return Err(caller
            .refuse(
                &s,
                "only an owner may invite an owner",
                format!("invitation:{email}"),
            )
            .await);
    }
    super::http::check_teams("teams", &req.teams)?;
    let hours = req.valid_hours.unwrap_or(72);
    if !(1..=168).contains(&hours) {
        return Err(Problem::invalid_field("valid_hours", "must be 1 to 168"));
    }
    let token = crate::secrets::generate(INVITE_PREFIX);
    let id = Uuid::now_v7();
    let expires_at = Utc::now() + Duration::hours(hours);
    let inviter = caller.person(&s).await?;
    let mut tx = s.pool.begin().await.map_err(db)?;
    if let Some(person) = inviter {
        // Their rights as they stand, held until the invitation is stored: a demotion or
        // deactivation either comes first (and is seen here) or waits, and then revokes it
        // with the invitations made with the rights it takes (`store::revoke_keys_of`).
        let rights: Option<String> = sqlx::query_scalar(
            "SELECT role FROM control.users
              WHERE id = $1 AND tenant_id = $2 AND status = 'active' FOR SHARE",
        )
        .bind(person)
        .bind(caller.tenant.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let may = match rights.as_deref().and_then(Role::parse) {
            Some(Role::Owner) => true,
            Some(Role::Admin) => role != Role::Owner,
            _ => false,
        };
        if !may {
            drop(tx);
            return Err(caller
                .refuse(
                    &s,
                    "the rights this invitation would be made with are gone",
                    format!("invitation:{email}"),
                )
                .await);
        }
    }
    super::store::room_for_one(
        &mut tx,
        ("invitations", OPEN),
        caller.tenant,
        super::store::MAX_OPEN_INVITATIONS,
        "open invitations",
    )
    .await
    .map_err(db)??;
    sqlx::query(
        "INSERT INTO control.invitations (id, tenant_id, email, role, teams, token_hash, expires_at,
                                          invited_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(id)
    .bind(caller.tenant.0)
    .bind(&email)
    .bind(role.as_str())
    .bind(&req.teams)
    .bind(&token.hash)
    .bind(expires_at)
    .bind(inviter)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let detail = format!("invited as {}, valid {hours} hours", role.as_str());
    audited(&s, &mut tx, &caller, (id, &email), detail).await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(Invitation {
            id,
            token: token.secret,
            expires_at,
        }),
    ))
}

/// `GET /v1/admin/invitations?limit=&cursor=` (tenant owners/admins): a page, oldest first,
/// whatever their state.
pub async fn list(
    State(s): State<AppState>,
    caller: TenantAdmin,
    page: Result<Query<Page>, QueryRejection>,
) -> Result<axum::response::Response, Problem> {
    let page = Page::asked(page)?;
    let (at, id) = page.after_time()?;
    let rows: Vec<InvitationView> = sqlx::query_as(
        "SELECT id, email, role, teams,
                CASE WHEN revoked_at IS NOT NULL THEN 'revoked'
                     WHEN accepted_at IS NOT NULL THEN 'accepted'
                     WHEN expires_at <= now() THEN 'expired'
                     ELSE 'open' END AS state,
                created_at, expires_at, accepted_at, revoked_at, user_id
           FROM control.invitations
          WHERE tenant_id = $1 AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
          ORDER BY created_at, id LIMIT $4",
    )
    .bind(caller.tenant.0)
    .bind(at)
    .bind(id)
    .bind(page.limit() + 1)
    .fetch_all(&s.pool)
    .await
    .map_err(db)?;
    Ok(page.answer("/v1/admin/invitations", rows, |i| {
        shared::cursor::encode(i.created_at, i.id)
    }))
}

/// `DELETE /v1/admin/invitations/{id}` (tenant owners/admins; an owner's invitation only by an
/// owner): the invitation can no longer be accepted. 404 unless it is open in this tenant.
pub async fn revoke(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    let mut tx = s.pool.begin().await.map_err(db)?;
    let sql = format!(
        "SELECT email, role FROM control.invitations
          WHERE id = $1 AND tenant_id = $2 AND {OPEN} FOR UPDATE"
    );
    let open: Option<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .bind(caller.tenant.0)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
    let Some((email, role)) = open else {
        return Err(Problem::not_found("no such open invitation in this tenant"));
    };
    if role == Role::Owner.as_str() && !caller.is_owner {
        drop(tx);
        let target = format!("invitation:{id}");
        return Err(caller
            .refuse(&s, "only an owner may revoke an owner's invitation", target)
            .await);
    }
    sqlx::query("UPDATE control.invitations SET revoked_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    audited(&s, &mut tx, &caller, (id, &email), "revoked".into()).await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/auth/invitations/accept`: creates the person and signs them in.
pub async fn accept(
    State(s): State<AppState>,
    Body(req): Body<Acceptance>,
) -> Result<Json<crate::routes::auth::Tokens>, Problem> {
    crate::password::check_policy("password", &req.password)
        .map_err(|e| Problem::validation(format!("{}: {}", e.field, e.reason), vec![e]))?;
    let gone = || {
        Problem::new(
            StatusCode::GONE,
            "invitation-invalid",
            "Invitation not valid",
            "this invitation is unknown, used or expired",
        )
    };
    let token_hash = shared::apikey::hash(&req.token);
    // Hash only for an invitation that can be accepted into a tenant with room, and with no
    // connection held.
    let open: Option<Uuid> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT tenant_id FROM control.invitations WHERE token_hash = $1 AND {OPEN}"
    )))
    .bind(&token_hash)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    let tenant = open.ok_or_else(gone)?;
    super::store::room_for_a_person_now(&s.pool, TenantId(tenant))
        .await
        .map_err(db)??;
    let hash = crate::routes::auth::hash_password(&s, req.password.clone()).await?;
    let mut tx = s.pool.begin().await.map_err(db)?;
    let row: Option<(Uuid, Uuid, String, String, Vec<String>)> = sqlx::query_as(
        "SELECT i.id, i.tenant_id, i.email, i.role, i.teams FROM control.invitations i
           JOIN control.tenants t ON t.id = i.tenant_id
          WHERE i.token_hash = $1 AND i.accepted_at IS NULL AND i.revoked_at IS NULL
            AND i.expires_at > now() AND t.status = 'active'
            FOR UPDATE OF i",
    )
    .bind(&token_hash)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let (invitation, tenant, email, role, teams) = row.ok_or_else(gone)?;
    super::store::room_for_a_person(&mut tx, TenantId(tenant))
        .await
        .map_err(db)??;
    super::store::lift_removal(&mut tx, TenantId(tenant), &email)
        .await
        .map_err(db)?;
    let user = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO control.users (id, tenant_id, email, password_hash, role, external_id, teams)
         VALUES ($1, $2, $3, $4, $5, $3, $6)",
    )
    .bind(user)
    .bind(tenant)
    .bind(&email)
    .bind(hash)
    .bind(&role)
    .bind(&teams)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    sqlx::query("UPDATE control.invitations SET accepted_at = now(), user_id = $2 WHERE id = $1")
        .bind(invitation)
        .bind(user)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let event = AuthEvent {
        user_id: Some(user),
        email: Some(email),
        detail: Some(format!("joined by invitation, role {role}")),
        target: Some(format!("invitation:{invitation}")),
        extra: crate::outbox::user_snapshot(&mut tx, user)
            .await
            .map_err(db)?,
        ..Default::default()
    };
    crate::routes::auth::audit(&s, &mut tx, TenantId(tenant), AuthKind::UserCreated, event).await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    let role = Role::parse(&role).ok_or_else(Problem::internal)?;
    Ok(Json(
        crate::routes::auth::issue(&s, user, TenantId(tenant), role, 0, Uuid::now_v7()).await?,
    ))
}
