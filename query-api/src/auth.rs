//! Who is reading, and what they may see: a `read` API key sees the whole tenant; a person
//! (access token from ingest-api, verified against its JWKS) sees what their role allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::{header, HeaderMap};
use shared::apikey::Scope;
use shared::auth::KEY_CACHE_TTL;
use shared::jwt::{self, Role};
use shared::problem::Problem;
use shared::tenant::TenantId;
use uuid::Uuid;

use crate::state::AppState;

/// The rows a reader may see within their tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// Everything (read keys, owners, admins).
    Tenant,
    /// Rows of these teams (managers, viewers).
    Teams(Vec<String>),
    /// Rows of this user id (developers).
    Own(String),
}

impl Visibility {
    /// For cache keys: two readers share an answer only if they see the same rows.
    pub fn cache_label(&self) -> String {
        match self {
            Visibility::Tenant => "all".into(),
            Visibility::Teams(t) => format!("teams={}", t.join("\u{1f}")),
            Visibility::Own(u) => format!("user={u}"),
        }
    }

    /// SQL parameters: (user filter, team filter); `None` means unfiltered.
    pub fn filters(&self) -> (Option<&str>, Option<&[String]>) {
        match self {
            Visibility::Tenant => (None, None),
            Visibility::Teams(t) => (None, Some(t.as_slice())),
            Visibility::Own(u) => (Some(u.as_str()), None),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Reader {
    pub tenant: TenantId,
    pub visibility: Visibility,
    /// The person's role; `None` for an API key.
    pub role: Option<Role>,
}

impl Reader {
    /// Owners and admins only (the audit log).
    pub fn require_admin(&self) -> Result<(), Problem> {
        match self.role {
            Some(Role::Owner | Role::Admin) => Ok(()),
            _ => Err(Problem::forbidden(
                "only a tenant's owners and admins may read its audit log",
            )),
        }
    }
}

/// What query-api caches about a user between checks.
#[derive(Debug, Clone)]
struct UserRow {
    tenant: Uuid,
    role: String,
    external_id: String,
    teams: Vec<String>,
    token_version: i32,
    active: bool,
}

#[derive(Clone, Default)]
pub struct UserCache(Arc<Mutex<HashMap<Uuid, (UserRow, Instant)>>>);

/// Authenticates the request: a JWT in `Authorization: Bearer`, else an API key.
pub async fn reader(s: &AppState, headers: &HeaderMap) -> Result<Reader, Problem> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("Bearer "))
        .map(str::trim);
    match bearer {
        Some(token) if jwt::looks_like_jwt(token) => person(s, token).await,
        _ => {
            let key = s.keys.authenticate(headers, Scope::Read).await?;
            Ok(Reader {
                tenant: key.tenant_id,
                visibility: Visibility::Tenant,
                role: None,
            })
        }
    }
}

async fn person(s: &AppState, token: &str) -> Result<Reader, Problem> {
    let claims = s.verifier.verify(token).await?;
    let mut user = lookup(s, claims.sub, false).await?;
    if user.token_version != claims.ver {
        // The cached row may predate a password change that issued this very token.
        user = lookup(s, claims.sub, true).await?;
    }
    let gone = || Problem::unauthorized("this access token is no longer valid");
    // The token must still match the user as the control plane has them now.
    if !user.active || user.tenant != claims.tid.0 || user.token_version != claims.ver {
        return Err(gone());
    }
    let role = Role::parse(&user.role).ok_or_else(gone)?;
    let visibility = match role {
        Role::Owner | Role::Admin => Visibility::Tenant,
        Role::Manager | Role::Viewer => Visibility::Teams(user.teams),
        Role::Developer => Visibility::Own(user.external_id),
    };
    Ok(Reader {
        tenant: claims.tid,
        visibility,
        role: Some(role),
    })
}

async fn lookup(s: &AppState, id: Uuid, fresh: bool) -> Result<UserRow, Problem> {
    if !fresh {
        if let Some((row, at)) = s.users.0.lock().expect("user cache").get(&id).cloned() {
            if at.elapsed() < KEY_CACHE_TTL {
                return Ok(row);
            }
        }
    }
    #[derive(sqlx::FromRow)]
    struct Row {
        tenant_id: Uuid,
        role: String,
        external_id: String,
        teams: Vec<String>,
        token_version: i32,
        status: String,
        tenant_status: String,
    }
    let row: Option<Row> = sqlx::query_as(
        "SELECT u.tenant_id, u.role, u.external_id, u.teams, u.token_version, u.status,
                t.status AS tenant_status
           FROM control.users u JOIN control.tenants t ON t.id = u.tenant_id
          WHERE u.id = $1",
    )
    .bind(id)
    .fetch_optional(&s.pool)
    .await
    .map_err(|e| {
        tracing::error!(error = %e, "user lookup failed");
        Problem::unavailable("credentials cannot be checked right now", 2)
    })?;
    let row = row.ok_or_else(|| Problem::unauthorized("unknown user"))?;
    let user = UserRow {
        tenant: row.tenant_id,
        role: row.role,
        external_id: row.external_id,
        teams: row.teams,
        token_version: row.token_version,
        active: row.status == "active" && row.tenant_status == "active",
    };
    s.users
        .0
        .lock()
        .expect("user cache")
        .insert(id, (user.clone(), Instant::now()));
    Ok(user)
}
