//! Login for people: `/v1/auth/login`, `/refresh`, `/logout`, `/logout-all`, `/password`, and
//! the JWKS at `/.well-known/jwks.json`.
//!
//! Access tokens are 15-minute EdDSA JWTs. Refresh tokens are opaque, stored as SHA-256,
//! valid 7 days and rotated on every use; presenting one that was already used revokes its
//! whole family (every token descended from the same login).

use axum::extract::rejection::JsonRejection;
use std::net::SocketAddr;

use crate::extract::{json_body, Body};
use crate::password;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use shared::jwt::{self, Claims, Jwks, Role};
use shared::problem::Problem;
use shared::tenant::TenantId;
use uuid::Uuid;

use crate::outbox;
use shared::events::{Actor, AuthEvent, AuthKind};

use crate::state::AppState;

/// Writes an auth event of `tenant` to the outbox on `conn` (the caller's transaction when
/// there is a change to go with it).
pub(crate) async fn audit(
    s: &AppState,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    kind: AuthKind,
    event: AuthEvent,
) -> Result<(), Problem> {
    let actor = Actor {
        user_id: event.user_id,
        api_key_id: None,
    };
    audit_as(s, conn, tenant, kind, actor, event).await
}

/// [`audit`] with an explicit actor (who acted, when that is not the person concerned).
pub(crate) async fn audit_as(
    s: &AppState,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    kind: AuthKind,
    actor: Actor,
    event: AuthEvent,
) -> Result<(), Problem> {
    let env = outbox::auth_event(tenant, kind, actor, event);
    outbox::record(conn, &s.config.common.topic_prefix, &env)
        .await
        .map_err(db)
}

/// [`audit`] outside a transaction: the record is committed at once, so the relay is woken.
async fn audit_now(
    s: &AppState,
    conn: &mut sqlx::PgConnection,
    tenant: TenantId,
    kind: AuthKind,
    event: AuthEvent,
) -> Result<(), Problem> {
    audit(s, conn, tenant, kind, event).await?;
    wake_relay(s);
    Ok(())
}

/// Lets the relay send what was just written.
fn wake_relay(s: &AppState) {
    s.outbox_wake.notify_one();
}

/// Lifetime of a refresh token.
pub const REFRESH_TTL_DAYS: i64 = 7;
const REFRESH_PREFIX: &str = "tlr_";

#[derive(Debug, Deserialize)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
    /// The tenant to sign in to, when the address has an account with this password in
    /// several (the 409 `choose-tenant` lists them).
    #[serde(default)]
    pub tenant: Option<Uuid>,
}

/// The most accounts of one address a login checks the password against (each check is an
/// argon2id hash); an address in more tenants names its `tenant`.
const MAX_ACCOUNTS_PER_LOGIN: i64 = 4;

#[derive(Debug, Deserialize)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

#[derive(Debug, Deserialize)]
pub struct PasswordChange {
    pub current_password: String,
    pub new_password: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_at: DateTime<Utc>,
}

fn denied() -> Problem {
    Problem::unauthorized("invalid email or password")
}

fn db(e: sqlx::Error) -> Problem {
    tracing::error!(error = %e, "auth query failed");
    Problem::unavailable("credentials cannot be checked right now", 2)
}

/// Checks a password off the async threads (argon2id is deliberately slow and takes 19 MiB)
/// within a hash slot; no stored hash (an unknown person) is checked against a dummy one, so
/// unknown e-mail addresses cannot be told apart by timing.
pub(crate) async fn verify_password(
    s: &AppState,
    password: String,
    hash: Option<String>,
) -> Result<bool, Problem> {
    let permit = s.hashes.acquire().await?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        metrics::counter!("auth_password_verifications_total").increment(1);
        match hash {
            Some(h) => password::verify(&password, &h),
            None => password::verify(&password, &DUMMY_HASH),
        }
    })
    .await
    .map_err(|_| Problem::internal())
}

/// Hashes a new password off the async threads, within a hash slot.
pub(crate) async fn hash_password(s: &AppState, password: String) -> Result<String, Problem> {
    let permit = s.hashes.acquire().await?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        password::hash(&password)
    })
    .await
    .map_err(|_| Problem::internal())
}

/// A valid argon2id hash of a random password: verifying against it costs what a real check
/// costs.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| password::hash(&Uuid::new_v4().to_string()));

/// An account a login may open: user, tenant, hash, role, token version, the user's and the
/// tenant's status, and how many accounts the address has in all tenants.
type LoginRow = (Uuid, Uuid, String, String, i32, String, String, i64);

fn usable(row: &LoginRow) -> bool {
    row.5 == "active" && row.6 == "active"
}

/// `POST /v1/auth/login`
///
/// The attempt is counted before anything else; the password is checked with no database
/// connection held. An address is unique within a tenant only: the password is checked
/// against its accounts in every tenant (at most [`MAX_ACCOUNTS_PER_LOGIN`], or the one of
/// `tenant`), and the account it matches is signed in; when it matches several, the answer is
/// 409 `choose-tenant` naming them, for the client to send again with `tenant`.
pub async fn login(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Body(req): Body<LoginRequest>,
) -> Result<Json<Tokens>, Problem> {
    let email = req.email.trim().to_lowercase();
    let ip = peer.ip().to_string();
    let attempt = s.throttle.reserve(&email, &ip).await?;
    let rows: Result<Vec<LoginRow>, Problem> = sqlx::query_as(
        "SELECT u.id, u.tenant_id, u.password_hash, u.role, u.token_version, u.status, t.status,
                (SELECT count(*) FROM control.users a WHERE a.email = $1)
           FROM control.users u JOIN control.tenants t ON t.id = u.tenant_id
          WHERE u.email = $1 AND ($2::uuid IS NULL OR u.tenant_id = $2)
          ORDER BY (u.status = 'active' AND t.status = 'active') DESC, u.created_at, u.id
          LIMIT $3",
    )
    .bind(&email)
    .bind(req.tenant)
    .bind(MAX_ACCOUNTS_PER_LOGIN)
    .fetch_all(&s.pool)
    .await
    .map_err(db);
    let rows = match rows {
        Ok(rows) => rows,
        Err(p) => {
            s.throttle.release(attempt).await;
            return Err(p);
        }
    };
    // An address with accounts in several tenants: one account's success must not clear the
    // failures counted against the others (a second account's owner would reset the count at
    // will), so a success only gives its own attempt back.
    let shared_address = rows.first().is_some_and(|r| r.7 > 1);
    // A login naming no tenant that checked several accounts tells whether the password opens
    // more than one (200 or 409): whatever it answers, it stays counted against the address,
    // or whoever holds one account (and sets its password at will) could test guesses at the
    // others for free.
    let probing = req.tenant.is_none() && rows.len() > 1;
    // Checked against each account (against a dummy hash without any, so that an unknown
    // address costs what a known one does), side by side: the time taken says little about
    // how many there are while the hash slots are free.
    let candidates: Vec<Option<&LoginRow>> = match rows.is_empty() {
        true => vec![None],
        false => rows.iter().map(Some).collect(),
    };
    let checks = candidates.iter().map(|row| {
        let stored = row.map(|r| r.2.clone());
        verify_password(&s, req.password.clone(), stored)
    });
    let mut matched = Vec::new();
    for (row, check) in candidates
        .iter()
        .zip(futures::future::join_all(checks).await)
    {
        match check {
            Ok(true) => matched.extend(row.cloned()),
            Ok(false) => {}
            Err(p) => {
                s.throttle.release(attempt).await;
                return Err(p);
            }
        }
    }
    // A deactivated account counts only when no usable one opened.
    if matched.iter().any(usable) {
        matched.retain(usable);
    }
    if matched.len() > 1 {
        // The person holds accounts in several tenants with this password: they choose. Only
        // a login naming no tenant gets here, which stays counted (`probing`).
        let ids: Vec<Uuid> = matched.iter().map(|r| r.1).collect();
        let names: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT id, name FROM control.tenants WHERE id = ANY($1) ORDER BY name, id",
        )
        .bind(&ids)
        .fetch_all(&s.pool)
        .await
        .map_err(db)?;
        let tenants: Vec<serde_json::Value> = names
            .into_iter()
            .map(|(id, name)| serde_json::json!({"id": id, "name": name}))
            .collect();
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "choose-tenant",
            "Choose a tenant",
            "this address and password sign in to several tenants; send the login again with `tenant`",
        )
        .with_extension("tenants", serde_json::Value::Array(tenants)));
    }
    let Some((user, tenant, _, role, ver, status, tenant_status, _)) = matched.pop() else {
        metrics::counter!("auth_logins_total", "outcome" => "failed").increment(1);
        // Each account of the address tried is its tenant's to see; where the address has
        // accounts in several tenants and the login named none, without the address it came
        // from (one tenant would otherwise learn where another's person signs in from).
        let ip = match shared_address && req.tenant.is_none() {
            true => None,
            false => Some(ip.clone()),
        };
        for (user, tenant, ..) in &rows {
            tracing::info!(%user, "login failed");
            let event = AuthEvent {
                user_id: Some(*user),
                email: Some(email.clone()),
                ip: ip.clone(),
                detail: Some("wrong password".into()),
                ..Default::default()
            };
            let mut conn = s.pool.acquire().await.map_err(db)?;
            audit_now(
                &s,
                &mut conn,
                TenantId(*tenant),
                AuthKind::LoginFailed,
                event,
            )
            .await?;
        }
        s.throttle.failed(attempt).await;
        return Err(denied());
    };
    let event = AuthEvent {
        user_id: Some(user),
        email: Some(email.clone()),
        ip: Some(ip.clone()),
        ..Default::default()
    };
    match (shared_address, probing) {
        (_, true) => {}
        (true, false) => s.throttle.release(attempt).await,
        (false, false) => s.throttle.succeeded(attempt).await,
    }
    let mut conn = s.pool.acquire().await.map_err(db)?;
    if status != "active" || tenant_status != "active" {
        let event = AuthEvent {
            detail: Some("account deactivated".into()),
            ..event
        };
        audit_now(
            &s,
            &mut conn,
            TenantId(tenant),
            AuthKind::LoginFailed,
            event,
        )
        .await?;
        return Err(Problem::forbidden("this account is deactivated"));
    }
    let role = Role::parse(&role).ok_or_else(Problem::internal)?;
    let family = Uuid::now_v7();
    let tokens = issue_on(&s, &mut conn, user, TenantId(tenant), role, ver, family).await?;
    let event = AuthEvent {
        target: Some(format!("family:{family}")),
        ..event
    };
    audit_now(
        &s,
        &mut conn,
        TenantId(tenant),
        AuthKind::LoginSucceeded,
        event,
    )
    .await?;
    metrics::counter!("auth_logins_total", "outcome" => "succeeded").increment(1);
    Ok(Json(tokens))
}

/// Signs an access token and stores a new refresh token of `family`.
pub(crate) async fn issue(
    s: &AppState,
    user: Uuid,
    tenant: TenantId,
    role: Role,
    ver: i32,
    family: Uuid,
) -> Result<Tokens, Problem> {
    let mut conn = s.pool.acquire().await.map_err(db)?;
    issue_on(s, &mut conn, user, tenant, role, ver, family).await
}

/// [`issue`] on `conn` (the caller's transaction when the token must appear with a change).
async fn issue_on(
    s: &AppState,
    conn: &mut sqlx::PgConnection,
    user: Uuid,
    tenant: TenantId,
    role: Role,
    ver: i32,
    family: Uuid,
) -> Result<Tokens, Problem> {
    let access = s
        .keyring
        .sign(&Claims::new(user, tenant, role, ver))
        .map_err(|e| {
            tracing::error!(error = %e, "signing failed");
            Problem::internal()
        })?;
    let (refresh, expires_at) = store_refresh(conn, user, family).await?;
    Ok(Tokens {
        access_token: access,
        token_type: "Bearer".into(),
        expires_in: jwt::ACCESS_TTL.as_secs(),
        refresh_token: refresh,
        refresh_expires_at: expires_at,
    })
}

async fn store_refresh(
    conn: &mut sqlx::PgConnection,
    user: Uuid,
    family: Uuid,
) -> Result<(String, DateTime<Utc>), Problem> {
    let token = crate::secrets::generate(REFRESH_PREFIX);
    let expires_at = Utc::now() + Duration::days(REFRESH_TTL_DAYS);
    sqlx::query(
        "INSERT INTO control.refresh_tokens (id, family_id, user_id, token_hash, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(family)
    .bind(user)
    .bind(&token.hash)
    .bind(expires_at)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok((token.secret, expires_at))
}

/// Locks `family`, with a transaction-level advisory lock of its own. A rotation and a
/// revocation of the same family thus run one after the other: a child inserted by a
/// rotation is seen by the revocation that waited for it, and a rotation that waited for a
/// revocation sees its token revoked. (Before, every token of the family was locked, so the
/// n-th rotation locked n rows: a family refreshed in a loop cost more with every refresh.)
async fn lock_family(conn: &mut sqlx::PgConnection, family: Uuid) -> Result<(), Problem> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.refresh_family'), hashtext($1))")
        .bind(family.to_string())
        .execute(conn)
        .await
        .map_err(db)?;
    Ok(())
}

/// Revokes every token of `family` (locked by the caller).
async fn revoke_family(conn: &mut sqlx::PgConnection, family: Uuid) -> Result<(), Problem> {
    sqlx::query(
        "UPDATE control.refresh_tokens SET revoked_at = coalesce(revoked_at, now())
          WHERE family_id = $1",
    )
    .bind(family)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

type RefreshUser = (Uuid, String, i32, String, String);
type RefreshState = (DateTime<Utc>, Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// `POST /v1/auth/refresh`
///
/// One transaction marks the token used and stores its successor, after locking the user
/// (so a deactivation or "log out everywhere" is either seen or sees the successor) and the
/// token's family (so a concurrent reuse detection is either seen or sees the successor).
pub async fn refresh(
    State(s): State<AppState>,
    Body(req): Body<RefreshRequest>,
) -> Result<Json<Tokens>, Problem> {
    let invalid = || Problem::unauthorized("invalid or expired refresh token");
    let token_hash = shared::apikey::hash(&req.refresh_token);
    let mut tx = s.pool.begin().await.map_err(db)?;
    let owner: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT family_id, user_id FROM control.refresh_tokens WHERE token_hash = $1",
    )
    .bind(&token_hash)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let Some((family, user)) = owner else {
        return Err(invalid());
    };
    let person: Option<RefreshUser> = sqlx::query_as(
        "SELECT u.tenant_id, u.role, u.token_version, u.status, t.status
           FROM control.users u JOIN control.tenants t ON t.id = u.tenant_id
          WHERE u.id = $1
            FOR SHARE OF u",
    )
    .bind(user)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    // Removed while this waited for the row (their tokens went with them).
    let (tenant, role, ver, status, tstatus) = person.ok_or_else(invalid)?;
    lock_family(&mut tx, family).await?;
    // Read after the locks: what a transaction we waited for changed is seen.
    let (expires_at, used_at, revoked_at): RefreshState = sqlx::query_as(
        "SELECT expires_at, used_at, revoked_at FROM control.refresh_tokens WHERE token_hash = $1",
    )
    .bind(&token_hash)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    if used_at.is_some() || revoked_at.is_some() {
        // A used token presented again: it was stolen, or the client is confused. Either way
        // the whole family goes.
        revoke_family(&mut tx, family).await?;
        let event = AuthEvent {
            user_id: Some(user),
            target: Some(format!("family:{family}")),
            detail: Some("a used refresh token was presented again; family revoked".into()),
            ..Default::default()
        };
        audit(
            &s,
            &mut tx,
            TenantId(tenant),
            AuthKind::RefreshReuseDetected,
            event,
        )
        .await?;
        tx.commit().await.map_err(db)?;
        wake_relay(&s);
        metrics::counter!("auth_refresh_reuse_detected_total").increment(1);
        tracing::warn!(%user, %family, "auth.refresh_reuse_detected: token family revoked");
        return Err(Problem::unauthorized(
            "this refresh token was already used; every session of this login was revoked",
        ));
    }
    if expires_at < Utc::now() || status != "active" || tstatus != "active" {
        return Err(invalid());
    }
    sqlx::query("UPDATE control.refresh_tokens SET used_at = now() WHERE token_hash = $1")
        .bind(&token_hash)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let role = Role::parse(&role).ok_or_else(Problem::internal)?;
    let tokens = issue_on(&s, &mut tx, user, TenantId(tenant), role, ver, family).await?;
    let event = AuthEvent {
        user_id: Some(user),
        target: Some(format!("family:{family}")),
        ..Default::default()
    };
    audit(
        &s,
        &mut tx,
        TenantId(tenant),
        AuthKind::TokenRefreshed,
        event,
    )
    .await?;
    tx.commit().await.map_err(db)?;
    wake_relay(&s);
    Ok(Json(tokens))
}

/// `POST /v1/auth/logout`: ends the login the refresh token belongs to.
pub async fn logout(
    State(s): State<AppState>,
    Body(req): Body<RefreshRequest>,
) -> Result<StatusCode, Problem> {
    let mut tx = s.pool.begin().await.map_err(db)?;
    let owner: Option<(Uuid, Uuid, Uuid)> = sqlx::query_as(
        "SELECT r.family_id, r.user_id, u.tenant_id FROM control.refresh_tokens r
           JOIN control.users u ON u.id = r.user_id WHERE r.token_hash = $1",
    )
    .bind(shared::apikey::hash(&req.refresh_token))
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    // An unknown token gets the same answer: logout is idempotent and reveals nothing.
    if let Some((family, user, tenant)) = owner {
        lock_family(&mut tx, family).await?;
        revoke_family(&mut tx, family).await?;
        let event = AuthEvent {
            user_id: Some(user),
            target: Some(format!("family:{family}")),
            ..Default::default()
        };
        audit(&s, &mut tx, TenantId(tenant), AuthKind::LoggedOut, event).await?;
    }
    tx.commit().await.map_err(db)?;
    wake_relay(&s);
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's access token, verified with this instance's own keys.
pub(crate) async fn caller(s: &AppState, headers: &HeaderMap) -> Result<Claims, Problem> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Problem::unauthorized("an access token is required"))?;
    let claims = s.keyring.verifier.verify(token.trim()).await?;
    let current: Option<(i32, String, String)> = sqlx::query_as(
        "SELECT u.token_version, u.status, t.status
           FROM control.users u JOIN control.tenants t ON t.id = u.tenant_id
          WHERE u.id = $1 AND u.tenant_id = $2",
    )
    .bind(claims.sub)
    .bind(claims.tid.0)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    match current {
        Some((ver, status, tenant_status))
            if ver == claims.ver && status == "active" && tenant_status == "active" =>
        {
            Ok(claims)
        }
        _ => Err(Problem::unauthorized(
            "this access token is no longer valid",
        )),
    }
}

/// Ends every session of the user: access tokens invalidated, refresh tokens revoked. The
/// user row is locked first, as a refresh does, so a rotation in flight either finishes
/// before (and its successor is revoked here) or waits and finds its token revoked.
async fn end_all_sessions(conn: &mut sqlx::PgConnection, user: Uuid) -> Result<i32, Problem> {
    let ver: Option<i32> = sqlx::query_scalar(
        "UPDATE control.users SET token_version = token_version + 1, updated_at = now()
          WHERE id = $1 RETURNING token_version",
    )
    .bind(user)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    // Removed since their access token was checked.
    let ver = ver.ok_or_else(|| Problem::unauthorized("this access token is no longer valid"))?;
    sqlx::query(
        "UPDATE control.refresh_tokens SET revoked_at = now()
          WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user)
    .execute(&mut *conn)
    .await
    .map_err(db)?;
    Ok(ver)
}

/// `POST /v1/auth/logout-all`
pub async fn logout_all(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<StatusCode, Problem> {
    let claims = caller(&s, &headers).await?;
    let mut tx = s.pool.begin().await.map_err(db)?;
    end_all_sessions(&mut tx, claims.sub).await?;
    let event = AuthEvent {
        user_id: Some(claims.sub),
        detail: Some("all sessions".into()),
        ..Default::default()
    };
    audit(&s, &mut tx, claims.tid, AuthKind::LoggedOut, event).await?;
    tx.commit().await.map_err(db)?;
    wake_relay(&s);
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in person's address and password hash, for a route that asks for their password
/// again; 401 when they were removed since their access token was checked.
pub(crate) async fn address_and_hash(
    s: &AppState,
    user: Uuid,
) -> Result<(String, String), Problem> {
    let person: Option<(String, String)> =
        sqlx::query_as("SELECT email, password_hash FROM control.users WHERE id = $1")
            .bind(user)
            .fetch_optional(&s.pool)
            .await
            .map_err(db)?;
    person.ok_or_else(|| Problem::unauthorized("this access token is no longer valid"))
}

/// The throttle's key for guesses at a signed-in person's password (the password change and
/// the single sign-on link share it): theirs, not their address's, which the login form counts.
pub(super) fn guesses_of(person: Uuid) -> String {
    format!("user:{person}")
}

/// `POST /v1/auth/password`: changes the password, ends every other session, and returns
/// fresh tokens for this one.
pub async fn change_password(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    req: Result<Json<PasswordChange>, JsonRejection>,
) -> Result<Json<Tokens>, Problem> {
    let claims = caller(&s, &headers).await?;
    let req = json_body(req)?;
    password::check_policy("new_password", &req.new_password)
        .map_err(|e| Problem::validation("the new password is too weak", vec![e]))?;
    let (email, hash) = address_and_hash(&s, claims.sub).await?;
    // Guesses at the current password are counted before the hash, per person and per client
    // address as logins are, with the login's allowance. Counted under the person rather than
    // their address, so that whoever hammers the address's login form does not also keep its
    // signed-in owner from changing the password; a stolen access token thus has this
    // allowance besides the login form's (twice the login's in all, per window).
    let ip = peer.ip().to_string();
    let attempt = s.throttle.reserve(&guesses_of(claims.sub), &ip).await?;
    let opened = match verify_password(&s, req.current_password, Some(hash)).await {
        Ok(opened) => opened,
        Err(p) => {
            s.throttle.release(attempt).await;
            return Err(p);
        }
    };
    if !opened {
        let event = AuthEvent {
            user_id: Some(claims.sub),
            email: Some(email),
            ip: Some(ip),
            detail: Some("wrong current password at a password change".into()),
            ..Default::default()
        };
        let mut conn = s.pool.acquire().await.map_err(db)?;
        audit_now(&s, &mut conn, claims.tid, AuthKind::LoginFailed, event).await?;
        drop(conn);
        s.throttle.failed(attempt).await;
        return Err(Problem::forbidden("current_password is wrong"));
    }
    // Only this attempt is given back: the failures counted before it stay.
    s.throttle.release(attempt).await;
    let new_hash = hash_password(&s, req.new_password).await?;
    let mut tx = s.pool.begin().await.map_err(db)?;
    // Still theirs after the hashes, as the token said: not deactivated, removed, given
    // another role or signed out everywhere meanwhile (each moves `token_version`). The new
    // token carries the role read here, under the lock, never the old token's.
    let current: Option<(String, String, i32)> = sqlx::query_as(
        "SELECT status, role, token_version FROM control.users WHERE id = $1 FOR NO KEY UPDATE",
    )
    .bind(claims.sub)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let role = match current {
        Some((status, role, ver)) if status == "active" && ver == claims.ver => {
            Role::parse(&role).ok_or_else(Problem::internal)?
        }
        _ => {
            return Err(Problem::unauthorized(
                "this access token is no longer valid",
            ))
        }
    };
    sqlx::query("UPDATE control.users SET password_hash = $2 WHERE id = $1")
        .bind(claims.sub)
        .bind(new_hash)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let ver = end_all_sessions(&mut tx, claims.sub).await?;
    let event = AuthEvent {
        user_id: Some(claims.sub),
        detail: Some("password changed; other sessions ended".into()),
        ..Default::default()
    };
    audit(&s, &mut tx, claims.tid, AuthKind::PasswordChanged, event).await?;
    tx.commit().await.map_err(db)?;
    wake_relay(&s);
    Ok(Json(
        issue(&s, claims.sub, claims.tid, role, ver, Uuid::now_v7()).await?,
    ))
}

/// `GET /.well-known/jwks.json`: the current and previous signing keys.
pub async fn jwks(State(s): State<AppState>) -> Response {
    let jwks: Jwks = s.keyring.jwks();
    (
        [(axum::http::header::CACHE_CONTROL, "public, max-age=60")],
        Json(jwks),
    )
        .into_response()
}
