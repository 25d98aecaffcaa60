//! Single sign-on: OpenID Connect authorization code flow with PKCE, state and nonce, per
//! tenant (Google, Microsoft Entra ID, Okta, or any issuer by discovery).
//!
//! `GET /v1/auth/sso/start?tenant=<id>` redirects to the identity provider;
//! `GET /v1/auth/sso/callback` checks the state, redeems the code with the PKCE verifier,
//! verifies the ID token, finds the person by (issuer, subject) — provisioning a new one only
//! from the tenant's allowed e-mail domains — and answers with Tally tokens.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use shared::events::{Actor, AuthEvent, AuthKind};
use shared::jwt::Role;
use shared::problem::Problem;
use shared::tenant::TenantId;
use uuid::Uuid;

use crate::control::http::TenantAdmin;
use crate::extract::json_body;
use crate::oidc;
use crate::state::AppState;

/// The most e-mail domains one tenant's single sign-on provisions people from.
pub const MAX_ALLOWED_DOMAINS: usize = 100;

#[derive(Debug, Deserialize)]
pub struct SsoSettings {
    pub provider: String,
    pub issuer: Option<String>,
    pub client_id: String,
    pub client_secret: String,
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    pub default_role: Option<String>,
    /// Microsoft Entra ID preset: the directory (tenant) id or domain.
    pub directory: Option<String>,
    /// Okta preset: the Okta domain (uses its default authorization server).
    pub okta_domain: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SsoSettingsView {
    pub provider: String,
    pub issuer: String,
    pub client_id: String,
    pub allowed_domains: Vec<String>,
    pub default_role: String,
}

fn db(e: sqlx::Error) -> Problem {
    tracing::error!(error = %e, "sso query failed");
    Problem::unavailable("single sign-on is unavailable right now", 2)
}

/// A query string that does not parse (a repeated parameter, say), as a problem.
fn query_problem(e: QueryRejection) -> Problem {
    Problem::bad_request("invalid-parameter", e.body_text())
}

fn secret_key(s: &AppState) -> Result<shared::secretbox::SecretKey, Problem> {
    shared::secretbox::SecretKey::from_hex(&s.config.common.secret_key).map_err(|_| {
        Problem::unavailable(
            "single sign-on needs the service's secret_key to be configured",
            60,
        )
    })
}

/// `PUT /v1/admin/sso` (tenant owners only): the tenant's identity provider. Whoever runs the
/// provider vouches for who logs in, so admins and `admin` keys are refused (and audited).
pub async fn put_settings(
    State(s): State<AppState>,
    caller: TenantAdmin,
    req: Result<Json<SsoSettings>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    if !caller.is_owner {
        return Err(caller
            .refuse(
                &s,
                "only an owner may change single sign-on settings",
                "sso".into(),
            )
            .await);
    }
    let req = json_body(req)?;
    let key = secret_key(&s)?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    };
    let issuer = match (req.provider.as_str(), req.issuer.as_deref()) {
        ("google" | "microsoft" | "okta" | "oidc", Some(i)) => i.trim_end_matches('/').to_string(),
        ("google", None) => "https://accounts.google.com".to_string(),
        ("microsoft", None) => match req.directory.as_deref() {
            Some(d) if plain(d) => format!("https://login.microsoftonline.com/{d}/v2.0"),
            _ => {
                return Err(Problem::invalid_field(
                    "directory",
                    "the Entra ID directory (tenant) id is required",
                ))
            }
        },
        ("okta", None) => match req.okta_domain.as_deref() {
            Some(d) if plain(d) => format!("https://{d}/oauth2/default"),
            _ => {
                return Err(Problem::invalid_field(
                    "okta_domain",
                    "the Okta domain is required",
                ))
            }
        },
        ("oidc", None) => return Err(Problem::invalid_field("issuer", "is required")),
        _ => {
            return Err(Problem::invalid_field(
                "provider",
                "must be google, microsoft, okta or oidc",
            ))
        }
    };
    if req.client_id.is_empty() || req.client_secret.is_empty() {
        return Err(Problem::invalid_field(
            "client_id",
            "client_id and client_secret are required",
        ));
    }
    // What every login carries (the client id is in the provider's URL) and every callback
    // checks: bounded, as names are.
    crate::control::http::check_len("client_id", &req.client_id, 255)?;
    crate::control::http::check_len("client_secret", &req.client_secret, 1024)?;
    if req.allowed_domains.len() > MAX_ALLOWED_DOMAINS {
        return Err(Problem::invalid_field(
            "allowed_domains",
            format!("at most {MAX_ALLOWED_DOMAINS} domains"),
        ));
    }
    if let Some(i) = req
        .allowed_domains
        .iter()
        .position(|d| d.chars().count() > 253)
    {
        return Err(Problem::invalid_field(
            &format!("allowed_domains[{i}]"),
            "a domain has at most 253 characters",
        ));
    }
    let role = req.default_role.as_deref().unwrap_or("developer");
    if !matches!(Role::parse(role), Some(r) if r != Role::Owner) {
        return Err(Problem::invalid_field(
            "default_role",
            "must be admin, manager, developer or viewer",
        ));
    }
    // The issuer must answer discovery now, not at the first login.
    oidc::discover(&s.oidc, &issuer)
        .await
        .map_err(|e| Problem::invalid_field("issuer", e))?;
    let domains: Vec<String> = req
        .allowed_domains
        .iter()
        .map(|d| d.trim().trim_start_matches('@').to_lowercase())
        .filter(|d| !d.is_empty())
        .collect();
    let mut tx = s.pool.begin().await.map_err(db)?;
    sqlx::query(
        "INSERT INTO control.sso_settings
                (tenant_id, provider, issuer, client_id, client_secret_enc, allowed_domains, default_role)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (tenant_id) DO UPDATE SET provider = $2, issuer = $3, client_id = $4,
                client_secret_enc = $5, allowed_domains = $6, default_role = $7, updated_at = now()",
    )
    .bind(caller.tenant.0)
    .bind(&req.provider)
    .bind(&issuer)
    .bind(&req.client_id)
    .bind(key.seal(req.client_secret.as_bytes()))
    .bind(&domains)
    .bind(role)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let event = AuthEvent {
        user_id: caller.actor.user_id,
        target: Some(format!("idp:{issuer}")),
        detail: Some(format!(
            "provider {}, client {}, default role {role}, domains [{}]",
            req.provider,
            req.client_id,
            domains.join(", ")
        )),
        ..Default::default()
    };
    super::auth::audit_as(
        &s,
        &mut tx,
        caller.tenant,
        AuthKind::SsoSettingsChanged,
        caller.actor.clone(),
        event,
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/admin/sso` (tenant owners/admins): the settings, without the secret.
pub async fn get_settings(
    State(s): State<AppState>,
    caller: TenantAdmin,
) -> Result<Json<SsoSettingsView>, Problem> {
    let row: Option<(String, String, String, Vec<String>, String)> = sqlx::query_as(
        "SELECT provider, issuer, client_id, allowed_domains, default_role
           FROM control.sso_settings WHERE tenant_id = $1",
    )
    .bind(caller.tenant.0)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    let (provider, issuer, client_id, allowed_domains, default_role) =
        row.ok_or_else(|| Problem::not_found("single sign-on is not configured"))?;
    Ok(Json(SsoSettingsView {
        provider,
        issuer,
        client_id,
        allowed_domains,
        default_role,
    }))
}

#[derive(Debug, Deserialize)]
pub struct StartParams {
    pub tenant: Option<String>,
}

fn redirect_uri(s: &AppState) -> String {
    format!(
        "{}/v1/auth/sso/callback",
        s.config.public_url.trim_end_matches('/')
    )
}

/// `GET /v1/auth/sso/start?tenant=<id>`: 302 to the identity provider. Anyone may call it,
/// so each client address has `sso_starts_per_minute` (429 with `Retry-After` past them).
pub async fn start(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    params: Result<Query<StartParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(p) = params.map_err(query_problem)?;
    let tenant = p
        .tenant
        .as_deref()
        .and_then(|t| Uuid::parse_str(t).ok())
        .ok_or_else(|| Problem::invalid_field("tenant", "a tenant id is required"))?;
    // Counted for good: a start is never given back.
    let _counted = s
        .sso_starts
        .reserve(&tenant.to_string(), &peer.ip().to_string())
        .await
        .map_err(|locked| {
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "sso-start-limited",
                "Too many sign-in starts",
                "too many single sign-on starts from this address; try again shortly",
            )
            .with_retry_after(locked.retry_after.map_or(60, u64::from))
        })?;
    let url = authorization_url(&s, tenant, None).await?;
    Ok((StatusCode::FOUND, [(header::LOCATION, url)]).into_response())
}

#[derive(Debug, Deserialize)]
pub struct LinkRequest {
    /// The signed-in person's own password: linking gives the identity provider their rights.
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LinkStart {
    /// Where the browser goes next; the callback links the identity to this person.
    pub authorization_url: String,
}

/// `POST /v1/auth/sso/link` (a signed-in person, with their password): starts a login at the
/// tenant's identity provider whose identity the callback links to this person. This is the
/// only way an identity reaches an account with more rights than the provider's default role.
pub async fn link(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    req: Result<Json<LinkRequest>, JsonRejection>,
) -> Result<Json<LinkStart>, Problem> {
    let claims = super::auth::caller(&s, &headers).await?;
    let req = json_body(req)?;
    let (email, hash) = super::auth::address_and_hash(&s, claims.sub).await?;
    let ip = peer.ip().to_string();
    // Counted as the password change counts (per person, their allowance shared with it):
    // whoever hammers the address's login form does not keep its signed-in owner from linking.
    let attempt = s
        .throttle
        .reserve(&super::auth::guesses_of(claims.sub), &ip)
        .await?;
    let matches = match super::auth::verify_password(&s, req.password, Some(hash)).await {
        Ok(m) => m,
        Err(p) => {
            s.throttle.release(attempt).await;
            return Err(p);
        }
    };
    if !matches {
        let event = AuthEvent {
            user_id: Some(claims.sub),
            email: Some(email),
            ip: Some(ip),
            detail: Some("wrong password to link a single sign-on identity".into()),
            ..Default::default()
        };
        let mut conn = s.pool.acquire().await.map_err(db)?;
        super::auth::audit(&s, &mut conn, claims.tid, AuthKind::LoginFailed, event).await?;
        drop(conn);
        s.outbox_wake.notify_one();
        s.throttle.failed(attempt).await;
        return Err(Problem::forbidden("password is wrong"));
    }
    // Only this attempt is given back: the failures counted before it stay.
    s.throttle.release(attempt).await;
    Ok(Json(LinkStart {
        authorization_url: authorization_url(&s, claims.tid.0, Some(claims.sub)).await?,
    }))
}

/// Records a login in flight (state, nonce, PKCE verifier, and the person to link, if any)
/// and returns the provider's authorization URL for it.
async fn authorization_url(
    s: &AppState,
    tenant: Uuid,
    link_user: Option<Uuid>,
) -> Result<String, Problem> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT s.issuer, s.client_id FROM control.sso_settings s
           JOIN control.tenants t ON t.id = s.tenant_id
          WHERE s.tenant_id = $1 AND t.status = 'active'",
    )
    .bind(tenant)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    let (issuer, client_id) =
        row.ok_or_else(|| Problem::not_found("single sign-on is not configured for this tenant"))?;
    let d = oidc::discover(&s.oidc, &issuer).await.map_err(|e| {
        tracing::warn!(error = %e, "identity provider discovery failed");
        Problem::unavailable("the identity provider is unreachable", 5)
    })?;
    let state = oidc::random_token(24);
    let nonce = oidc::random_token(24);
    let (verifier, challenge) = oidc::pkce();
    sqlx::query("DELETE FROM control.sso_logins WHERE created_at < now() - interval '10 minutes'")
        .execute(&s.pool)
        .await
        .map_err(db)?;
    sqlx::query(
        "INSERT INTO control.sso_logins (state, tenant_id, nonce, code_verifier, link_user_id)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&state)
    .bind(tenant)
    .bind(&nonce)
    .bind(&verifier)
    .bind(link_user)
    .execute(&s.pool)
    .await
    .map_err(db)?;
    let mut url = reqwest::Url::parse(&d.authorization_endpoint).map_err(|_| {
        Problem::unavailable(
            "the identity provider's authorization endpoint is invalid",
            60,
        )
    })?;
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &client_id)
        .append_pair("redirect_uri", &redirect_uri(s))
        .append_pair("scope", "openid email profile")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    Ok(url.to_string())
}

#[derive(Debug, Deserialize)]
pub struct CallbackParams {
    pub state: Option<String>,
    pub code: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    id_token: Option<String>,
}

/// `GET /v1/auth/sso/callback`: Tally tokens for the person the identity provider vouches for.
pub async fn callback(
    State(s): State<AppState>,
    params: Result<Query<CallbackParams>, QueryRejection>,
) -> Result<Json<super::auth::Tokens>, Problem> {
    let Query(p) = params.map_err(query_problem)?;
    if let Some(e) = p.error {
        return Err(Problem::unauthorized(format!(
            "the identity provider refused: {e}"
        )));
    }
    let state = p
        .state
        .ok_or_else(|| Problem::invalid_field("state", "is required"))?;
    let code = p
        .code
        .ok_or_else(|| Problem::invalid_field("code", "is required"))?;
    let unknown = || Problem::invalid_field("state", "unknown, used or expired login; start again");
    // A state Tally issued is URL-safe base64 (`oidc::random_token`); anything else is no
    // login of ours, and is not sent to the database (which refuses a NUL with an error).
    if state.len() > 64
        || !state
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(unknown());
    }
    // Single use: the row is gone whatever happens next.
    let login: Option<(Uuid, String, String, Option<Uuid>)> = sqlx::query_as(
        "DELETE FROM control.sso_logins WHERE state = $1 AND created_at > now() - interval '10 minutes'
         RETURNING tenant_id, nonce, code_verifier, link_user_id",
    )
    .bind(&state)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    let (tenant, nonce, verifier, link_user) = login.ok_or_else(unknown)?;
    let (issuer, client_id, secret_enc, domains, default_role): (
        String,
        String,
        Vec<u8>,
        Vec<String>,
        String,
    ) = sqlx::query_as(
        "SELECT issuer, client_id, client_secret_enc, allowed_domains, default_role
               FROM control.sso_settings WHERE tenant_id = $1",
    )
    .bind(tenant)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?
    .ok_or_else(|| Problem::not_found("single sign-on is not configured for this tenant"))?;
    let secret = secret_key(&s)?
        .open(&secret_enc)
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            tracing::error!(%tenant, "SSO client secret cannot be opened with the current secret_key");
            Problem::unavailable("single sign-on is misconfigured", 60)
        })?;
    let d = oidc::discover(&s.oidc, &issuer)
        .await
        .map_err(|_| Problem::unavailable("the identity provider is unreachable", 5))?;
    let res = s
        .oidc
        .http
        .post(&d.token_endpoint)
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", redirect_uri(&s).as_str()),
            ("client_id", client_id.as_str()),
            ("client_secret", secret.as_str()),
            ("code_verifier", verifier.as_str()),
        ])
        .send()
        .await
        .map_err(|_| Problem::unavailable("the identity provider is unreachable", 5))?;
    if !res.status().is_success() {
        return Err(Problem::unauthorized(
            "the identity provider refused the authorization code",
        ));
    }
    let tokens: TokenResponse = oidc::json_within(res)
        .await
        .map_err(|_| Problem::unauthorized("the identity provider answered nonsense"))?;
    let id_token = tokens
        .id_token
        .ok_or_else(|| Problem::unauthorized("the identity provider sent no ID token"))?;
    let claims = oidc::verify_id_token(&s.oidc.http, &d, &client_id, &nonce, &id_token)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, %tenant, "ID token rejected");
            Problem::unauthorized(format!("invalid ID token: {e}"))
        })?;
    let tenant = TenantId(tenant);
    let user = match link_user {
        Some(person) => link_identity(&s, tenant, &d.issuer, &claims, person).await?,
        None => find_or_provision(&s, tenant, &d.issuer, &claims, &domains, &default_role).await?,
    };
    let person: Option<(String, i32, String)> =
        sqlx::query_as("SELECT role, token_version, status FROM control.users WHERE id = $1")
            .bind(user)
            .fetch_optional(&s.pool)
            .await
            .map_err(db)?;
    // Removed since its identity was read: as a deactivated account.
    let (role, ver, status) = person.unwrap_or_default();
    if status != "active" {
        return Err(Problem::forbidden("this account is deactivated"));
    }
    let role = Role::parse(&role).ok_or_else(Problem::internal)?;
    let out = super::auth::issue(&s, user, tenant, role, ver, Uuid::now_v7()).await?;
    let mut conn = s.pool.acquire().await.map_err(db)?;
    let event = AuthEvent {
        user_id: Some(user),
        email: claims.verified_email(),
        target: Some(format!("idp:{}", d.issuer)),
        detail: link_user.map(|_| "identity linked from a password-confirmed session".into()),
        ..Default::default()
    };
    super::auth::audit(&s, &mut conn, tenant, AuthKind::SsoLogin, event).await?;
    s.outbox_wake.notify_one();
    Ok(Json(out))
}

/// The user behind (issuer, subject); a first login links an existing account of the tenant
/// with the same verified e-mail, or provisions one — only for an allowed domain.
async fn find_or_provision(
    s: &AppState,
    tenant: TenantId,
    issuer: &str,
    claims: &oidc::IdClaims,
    domains: &[String],
    default_role: &str,
) -> Result<Uuid, Problem> {
    // The identity's person in this tenant; the same identity may be someone in another
    // tenant that uses the same provider, which is that tenant's business.
    let known: Option<Uuid> = sqlx::query_scalar(
        "SELECT user_id FROM control.user_identities
          WHERE tenant_id = $1 AND issuer = $2 AND subject = $3",
    )
    .bind(tenant.0)
    .bind(issuer)
    .bind(&claims.sub)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    if let Some(user) = known {
        return Ok(user);
    }
    let email = claims.verified_email().ok_or_else(|| {
        Problem::forbidden("the identity provider did not vouch for an e-mail address")
    })?;
    let domain = email.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    if !domains.iter().any(|d| d == domain) {
        return Err(Problem::forbidden(format!(
            "people from `{domain}` are not provisioned in this tenant"
        )));
    }
    // No usable password: a person provisioned here signs in through the identity provider.
    // Hashed before the transaction (no connection held across it), and only when needed.
    let taken: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.users WHERE tenant_id = $1 AND email = $2)",
    )
    .bind(tenant.0)
    .bind(&email)
    .fetch_one(&s.pool)
    .await
    .map_err(db)?;
    let unusable = match taken {
        true => None,
        false => {
            // Refused before a hash slot is taken: a full tenant, an address removed.
            crate::control::store::room_for_a_person_now(&s.pool, tenant)
                .await
                .map_err(db)??;
            if removed_from(&s.pool, tenant, &email).await.map_err(db)? {
                return Err(removed());
            }
            Some(super::auth::hash_password(s, oidc::random_token(32)).await?)
        }
    };
    let mut tx = s.pool.begin().await.map_err(db)?;
    // The address's account in this tenant; another tenant's account of the same address is
    // that tenant's business.
    // Held until the identity is stored: a removal waits, or is seen.
    let existing: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT id, role FROM control.users WHERE tenant_id = $1 AND email = $2 FOR KEY SHARE",
    )
    .bind(tenant.0)
    .bind(&email)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let user = match existing {
        Some((id, role)) => {
            if rank(&role) > rank(default_role) {
                drop(tx);
                return Err(refuse_link(s, tenant, id, &email, issuer, &claims.sub, &role).await);
            }
            id
        }
        None => {
            // A person an admin removed comes back only when an admin gives them a place.
            if removed_from(&mut *tx, tenant, &email).await.map_err(db)? {
                return Err(removed());
            }
            let unusable = unusable.ok_or_else(|| {
                Problem::unavailable("this account changed meanwhile; try again", 1)
            })?;
            crate::control::store::room_for_a_person(&mut tx, tenant)
                .await
                .map_err(db)??;
            let id = Uuid::now_v7();
            sqlx::query(
                "INSERT INTO control.users (id, tenant_id, email, password_hash, role, external_id)
                 VALUES ($1, $2, $3, $4, $5, $3)",
            )
            .bind(id)
            .bind(tenant.0)
            .bind(&email)
            .bind(unusable)
            .bind(default_role)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                // Another active member already carries this address as their user id.
                if e.as_database_error().and_then(|d| d.constraint()) == Some("users_external_id") {
                    Problem::new(
                        StatusCode::CONFLICT,
                        "conflict",
                        "Conflict",
                        "another member of this tenant already has this address as their user id; \
                         ask an admin to link the accounts",
                    )
                } else {
                    db(e)
                }
            })?;
            let event = AuthEvent {
                user_id: Some(id),
                email: Some(email.clone()),
                detail: Some(format!(
                    "provisioned by single sign-on, role {default_role}"
                )),
                ..Default::default()
            };
            super::auth::audit(s, &mut tx, tenant, AuthKind::UserCreated, event).await?;
            id
        }
    };
    sqlx::query(
        "INSERT INTO control.user_identities (tenant_id, issuer, subject, user_id)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(tenant.0)
    .bind(issuer)
    .bind(&claims.sub)
    .bind(user)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(user)
}

/// Whether an admin removed `email` from `tenant` (and no admin gave it a place since).
async fn removed_from<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    tenant: TenantId,
    email: &str,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.removed_people
                         WHERE tenant_id = $1 AND email_hash = sha256(convert_to($2, 'UTF8')))",
    )
    .bind(tenant.0)
    .bind(email)
    .fetch_one(conn)
    .await
}

fn removed() -> Problem {
    Problem::forbidden(
        "this address was removed from the tenant; it signs in again once an admin creates it \
         or it accepts an invitation",
    )
}

/// A role's rights, for comparing an account with what single sign-on grants.
fn rank(role: &str) -> u8 {
    match Role::parse(role) {
        Some(Role::Owner) => 4,
        Some(Role::Admin) => 3,
        Some(Role::Manager) => 2,
        Some(Role::Developer) => 1,
        Some(Role::Viewer) | None => 0,
    }
}

/// Audits and refuses an identity linking itself to an account with more rights than the
/// provider's default role: whoever runs the provider could otherwise log in as that person.
async fn refuse_link(
    s: &AppState,
    tenant: TenantId,
    user: Uuid,
    email: &str,
    issuer: &str,
    subject: &str,
    role: &str,
) -> Problem {
    let detail = format!(
        "`{email}` is an existing account with role {role}, above what single sign-on grants; \
         sign in with its password and link the identity with POST /v1/auth/sso/link"
    );
    let event = AuthEvent {
        user_id: Some(user),
        email: Some(email.to_string()),
        target: Some(format!("idp:{issuer}#{subject}")),
        detail: Some(
            "single sign-on refused to link itself to an account above its default role".into(),
        ),
        ..Default::default()
    };
    let written = async {
        let mut conn = s.pool.acquire().await.map_err(db)?;
        super::auth::audit_as(
            s,
            &mut conn,
            tenant,
            AuthKind::AccessDenied,
            Actor::default(),
            event,
        )
        .await
    };
    if let Err(p) = written.await {
        return p;
    }
    s.outbox_wake.notify_one();
    tracing::warn!(%tenant, %user, %issuer, "SSO identity refused to link itself to a privileged account");
    Problem::new(
        StatusCode::FORBIDDEN,
        "sso-link-needs-password",
        "Linking needs the account's password",
        detail,
    )
}

/// Links the identity to `person`, who proved their password when the login started.
async fn link_identity(
    s: &AppState,
    tenant: TenantId,
    issuer: &str,
    claims: &oidc::IdClaims,
    person: Uuid,
) -> Result<Uuid, Problem> {
    let mut tx = s.pool.begin().await.map_err(db)?;
    let known: Option<Uuid> = sqlx::query_scalar(
        "SELECT user_id FROM control.user_identities
          WHERE tenant_id = $1 AND issuer = $2 AND subject = $3",
    )
    .bind(tenant.0)
    .bind(issuer)
    .bind(&claims.sub)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    match known {
        Some(u) if u == person => return Ok(person),
        Some(_) => {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "identity-taken",
                "Identity already linked",
                "this identity is already linked to another person",
            ))
        }
        None => {}
    }
    // Held until the identity is stored: a removal waits, or is seen.
    let same_tenant: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM control.users WHERE id = $1 AND tenant_id = $2 FOR KEY SHARE",
    )
    .bind(person)
    .bind(tenant.0)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    if same_tenant.is_none() {
        return Err(Problem::forbidden("this person is not in the tenant"));
    }
    sqlx::query(
        "INSERT INTO control.user_identities (tenant_id, issuer, subject, user_id)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(tenant.0)
    .bind(issuer)
    .bind(&claims.sub)
    .bind(person)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(person)
}
