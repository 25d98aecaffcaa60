//! Single sign-on: OpenID Connect authorization code flow with PKCE, state and nonce, per
//! tenant (Google, Microsoft Entra ID, Okta, or any issuer by discovery).
//!
//! `GET /v1/auth/sso/start?tenant=<id>` redirects to the identity provider;
//! `GET /v1/auth/sso/callback` checks the state, redeems the code with the PKCE verifier,
//! verifies the ID token, finds the person by (issuer, subject) — provisioning a new one only
//! from the tenant's allowed e-mail domains — and answers with Tally tokens.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use shared::events::{AuthEvent, AuthKind};
use shared::jwt::Role;
use shared::problem::{json_body, Problem};
use shared::tenant::TenantId;
use uuid::Uuid;

use crate::oidc;
use crate::state::AppState;

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
    shared::secretbox::SecretKey::from_hex(&s.config.secret_key).map_err(|_| {
        Problem::unavailable(
            "single sign-on needs the service's secret_key to be configured",
            60,
        )
    })
}

/// `PUT /v1/admin/sso` (tenant owners/admins): the tenant's identity provider.
pub async fn put_settings(
    State(s): State<AppState>,
    headers: HeaderMap,
    req: Result<Json<SsoSettings>, JsonRejection>,
) -> Result<StatusCode, Problem> {
    let caller = super::control::tenant_admin(&s, &headers).await?;
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
    .execute(&s.pool)
    .await
    .map_err(db)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/admin/sso` (tenant owners/admins): the settings, without the secret.
pub async fn get_settings(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SsoSettingsView>, Problem> {
    let caller = super::control::tenant_admin(&s, &headers).await?;
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

/// `GET /v1/auth/sso/start?tenant=<id>`: 302 to the identity provider.
pub async fn start(
    State(s): State<AppState>,
    params: Result<Query<StartParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(p) = params.map_err(query_problem)?;
    let tenant = p
        .tenant
        .as_deref()
        .and_then(|t| Uuid::parse_str(t).ok())
        .ok_or_else(|| Problem::invalid_field("tenant", "a tenant id is required"))?;
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
    sqlx::query(
        "DELETE FROM control.sso_logins WHERE created_at < now() - interval '10 minutes';
         ",
    )
    .execute(&s.pool)
    .await
    .map_err(db)?;
    sqlx::query(
        "INSERT INTO control.sso_logins (state, tenant_id, nonce, code_verifier) VALUES ($1, $2, $3, $4)",
    )
    .bind(&state)
    .bind(tenant)
    .bind(&nonce)
    .bind(&verifier)
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
        .append_pair("redirect_uri", &redirect_uri(&s))
        .append_pair("scope", "openid email profile")
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    Ok((StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response())
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
    // Single use: the row is gone whatever happens next.
    let login: Option<(Uuid, String, String)> = sqlx::query_as(
        "DELETE FROM control.sso_logins WHERE state = $1 AND created_at > now() - interval '10 minutes'
         RETURNING tenant_id, nonce, code_verifier",
    )
    .bind(&state)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    let (tenant, nonce, verifier) = login.ok_or_else(|| {
        Problem::invalid_field("state", "unknown, used or expired login; start again")
    })?;
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
    let tokens: TokenResponse = res
        .json()
        .await
        .map_err(|_| Problem::unauthorized("the identity provider answered nonsense"))?;
    let id_token = tokens
        .id_token
        .ok_or_else(|| Problem::unauthorized("the identity provider sent no ID token"))?;
    let claims = oidc::verify_id_token(&s.oidc, &d, &client_id, &nonce, &id_token)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, %tenant, "ID token rejected");
            Problem::unauthorized(format!("invalid ID token: {e}"))
        })?;
    let tenant = TenantId(tenant);
    let user = find_or_provision(&s, tenant, &d.issuer, &claims, &domains, &default_role).await?;
    let (role, ver, status): (String, i32, String) =
        sqlx::query_as("SELECT role, token_version, status FROM control.users WHERE id = $1")
            .bind(user)
            .fetch_one(&s.pool)
            .await
            .map_err(db)?;
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
    let known: Option<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT i.user_id, u.tenant_id FROM control.user_identities i
           JOIN control.users u ON u.id = i.user_id WHERE i.issuer = $1 AND i.subject = $2",
    )
    .bind(issuer)
    .bind(&claims.sub)
    .fetch_optional(&s.pool)
    .await
    .map_err(db)?;
    if let Some((user, user_tenant)) = known {
        if user_tenant != tenant.0 {
            return Err(Problem::forbidden(
                "this identity belongs to another tenant",
            ));
        }
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
    let mut tx = s.pool.begin().await.map_err(db)?;
    let existing: Option<(Uuid, Uuid)> =
        sqlx::query_as("SELECT id, tenant_id FROM control.users WHERE email = $1")
            .bind(&email)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
    let user = match existing {
        Some((id, t)) if t == tenant.0 => id,
        Some(_) => {
            return Err(Problem::forbidden(
                "this e-mail address belongs to another tenant",
            ))
        }
        None => {
            let id = Uuid::now_v7();
            // No usable password: this person signs in through the identity provider.
            let unusable = shared::password::hash(&oidc::random_token(32));
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
            .map_err(db)?;
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
        "INSERT INTO control.user_identities (issuer, subject, user_id) VALUES ($1, $2, $3)",
    )
    .bind(issuer)
    .bind(&claims.sub)
    .bind(user)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    Ok(user)
}
