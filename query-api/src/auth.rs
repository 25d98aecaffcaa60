//! Who is reading, and what they may see: a `read` API key sees the whole tenant; a person
//! (access token from ingest-api, verified against its JWKS) sees what their role allows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::{header, HeaderMap};
use shared::apikey::Scope;
use shared::auth::{ApiKeyStore, Privacy, KEY_CACHE_TTL};
use shared::jwt::{self, Role, Verifier};
use shared::problem::Problem;
use shared::tenant::TenantId;
use sqlx::PgPool;
use uuid::Uuid;

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
    /// For cache keys: two readers share an answer only if they see the same rows. Names
    /// are JSON-quoted, so no team or user name can make one label look like another.
    pub fn cache_label(&self) -> String {
        let quoted = |v: serde_json::Result<String>| v.expect("strings serialize");
        match self {
            Visibility::Tenant => "all".into(),
            Visibility::Teams(t) => format!("teams={}", quoted(serde_json::to_string(t))),
            Visibility::Own(u) => format!("user={}", quoted(serde_json::to_string(u))),
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
    /// What proved it, so that a long-lived request (the live feed) can check it again.
    pub credential: Credential,
    /// The user id this person's events carry (`None` for an API key).
    pub person: Option<String>,
    /// The tenant's privacy mode.
    pub privacy: Privacy,
}

/// The credential a [`Reader`] was authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    ApiKey {
        key_id: Uuid,
    },
    AccessToken {
        user_id: Uuid,
        token_version: i32,
        /// Unix seconds.
        expires_at: i64,
    },
}

impl Reader {
    /// `Some(k)` when this reader sees only aggregates of at least `k` people: in privacy
    /// mode, managers, viewers and read keys, and owners and admins unless the tenant lets
    /// them see individuals. Developers see their own data only, in any mode.
    pub fn aggregates_only(&self) -> Option<u32> {
        let restricted = match self.role {
            None | Some(Role::Manager | Role::Viewer) => true,
            Some(Role::Owner | Role::Admin) => !self.privacy.admins_see_individuals,
            Some(Role::Developer) => false,
        };
        (self.privacy.on && restricted).then_some(self.privacy.k)
    }

    /// Whether this reader's reads of other people's individual data are audited: owners
    /// and admins of a tenant in privacy mode that lets them see individuals.
    pub fn audits_individual_reads(&self) -> bool {
        self.privacy.on
            && self.aggregates_only().is_none()
            && matches!(self.role, Some(Role::Owner | Role::Admin))
    }

    /// Refuses (403) an individual view — `what` — to a reader who sees only aggregates.
    pub fn require_individual_view(&self, what: &str) -> Result<(), Problem> {
        match self.aggregates_only() {
            None => Ok(()),
            Some(k) => Err(Problem::new(
                axum::http::StatusCode::FORBIDDEN,
                "privacy-mode",
                "Withheld in privacy mode",
                format!(
                    "this tenant is in privacy mode: {what} shows individuals, and you see \
                     only aggregates of at least {k} people (overview, timeseries by team, \
                     teams)"
                ),
            )),
        }
    }

    /// For cache keys: two readers share an answer only if they see the same rows the same
    /// way (the privacy mode included: turning it on or off changes no watermark).
    pub fn cache_label(&self) -> String {
        let p = &self.privacy;
        let privacy = match self.aggregates_only() {
            Some(k) => format!("k{k}"),
            None if p.on => "individuals".into(),
            None => "open".into(),
        };
        format!("{privacy}/{}", self.visibility.cache_label())
    }

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
    privacy: Privacy,
}

/// Tells who is reading from a request's credential, with the control plane's API keys and
/// users cached for a short while ([`KEY_CACHE_TTL`]).
#[derive(Clone)]
pub struct Authenticator {
    pool: PgPool,
    keys: ApiKeyStore,
    verifier: Verifier,
    users: Arc<Mutex<HashMap<Uuid, (UserRow, Instant)>>>,
}

impl Authenticator {
    /// Reads the control plane through `pool`; access tokens are checked with `verifier`;
    /// `by_address`: each address has its share of the lookups of keys ([`ApiKeyStore::new`]).
    pub fn new(pool: PgPool, verifier: Verifier, by_address: bool) -> Authenticator {
        Authenticator {
            keys: ApiKeyStore::new(pool.clone(), by_address),
            pool,
            verifier,
            users: Arc::default(),
        }
    }

    /// Authenticates the request, sent from `peer`: a JWT in `Authorization: Bearer`, else
    /// an API key.
    pub async fn reader(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Reader, Problem> {
        self.authenticate(headers, false, peer).await
    }

    /// Like [`Authenticator::reader`], but from the control plane as it is now, not from the
    /// short-lived credential caches: for requests that outlive them (the live feed).
    pub async fn reader_uncached(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Reader, Problem> {
        let reader = self.authenticate(headers, true, peer).await?;
        if matches!(reader.credential, Credential::ApiKey { .. }) {
            self.recheck(&reader).await?;
        }
        Ok(reader)
    }

    async fn authenticate(
        &self,
        headers: &HeaderMap,
        fresh: bool,
        peer: Option<IpAddr>,
    ) -> Result<Reader, Problem> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().strip_prefix("Bearer "))
            .map(str::trim);
        match bearer {
            Some(token) if jwt::looks_like_jwt(token) => self.person(token, fresh).await,
            _ => {
                let key = self.keys.authenticate(headers, Scope::Read, peer).await?;
                Ok(Reader {
                    tenant: key.tenant_id,
                    visibility: Visibility::Tenant,
                    role: None,
                    credential: Credential::ApiKey { key_id: key.key_id },
                    person: None,
                    privacy: key.privacy,
                })
            }
        }
    }

    async fn person(&self, token: &str, fresh: bool) -> Result<Reader, Problem> {
        let claims = self.verifier.verify(token).await?;
        let mut user = self.lookup(claims.sub, fresh).await?;
        if !fresh && user.token_version != claims.ver {
            // The cached row may predate a password change that issued this very token.
            user = self.lookup(claims.sub, true).await?;
        }
        let (role, visibility) = standing(&user, claims.tid, claims.ver)?;
        Ok(Reader {
            tenant: claims.tid,
            visibility,
            role: Some(role),
            credential: Credential::AccessToken {
                user_id: claims.sub,
                token_version: claims.ver,
                expires_at: claims.exp,
            },
            person: Some(user.external_id.clone()),
            privacy: user.privacy,
        })
    }

    /// Checks again, from the control plane itself (no cache), that `reader`'s credential
    /// still holds as it did when the request began: the key is not revoked, the user and
    /// tenant are active, the token has not expired or been superseded, and the role and
    /// teams are the same. A 401/403 means it no longer does; a 503, that it cannot be
    /// checked right now.
    pub async fn recheck(&self, reader: &Reader) -> Result<(), Problem> {
        match &reader.credential {
            Credential::ApiKey { key_id } => {
                let valid: Option<(bool, bool, i32, bool)> = sqlx::query_as(
                    "SELECT k.scope = 'read', t.privacy_mode, t.privacy_k,
                            t.privacy_admins_see_individuals
                       FROM control.api_keys k JOIN control.tenants t ON t.id = k.tenant_id
                      WHERE k.id = $1 AND k.tenant_id = $2 AND k.revoked_at IS NULL
                        AND t.status = 'active'",
                )
                .bind(key_id)
                .bind(reader.tenant.0)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "API key re-check failed");
                    Problem::unavailable("credentials cannot be checked right now", 2)
                })?;
                match valid {
                    Some((false, ..)) => Err(Problem::forbidden(
                        "this API key no longer has scope `read`",
                    )),
                    Some((true, on, k, admins))
                        if Privacy::from_columns(on, k, admins) != reader.privacy =>
                    {
                        Err(Problem::forbidden(
                            "the tenant's privacy mode changed; reconnect to read under it",
                        ))
                    }
                    Some(_) => Ok(()),
                    None => Err(Problem::unauthorized("unknown or revoked API key")),
                }
            }
            Credential::AccessToken {
                user_id,
                token_version,
                expires_at,
            } => {
                if chrono::Utc::now().timestamp() >= *expires_at {
                    return Err(Problem::unauthorized("the access token has expired"));
                }
                let user = self.lookup(*user_id, true).await?;
                let (role, visibility) = standing(&user, reader.tenant, *token_version)?;
                if Some(role) != reader.role
                    || visibility != reader.visibility
                    || user.privacy != reader.privacy
                {
                    return Err(Problem::forbidden(
                        "this user's role or teams changed; reconnect to read with the new ones",
                    ));
                }
                Ok(())
            }
        }
    }

    async fn lookup(&self, id: Uuid, fresh: bool) -> Result<UserRow, Problem> {
        if !fresh {
            if let Some((row, at)) = self.users.lock().expect("user cache").get(&id).cloned() {
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
            privacy_mode: bool,
            privacy_k: i32,
            privacy_admins_see_individuals: bool,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT u.tenant_id, u.role, u.external_id, u.teams, u.token_version, u.status,
                    t.status AS tenant_status, t.privacy_mode, t.privacy_k,
                    t.privacy_admins_see_individuals
               FROM control.users u JOIN control.tenants t ON t.id = u.tenant_id
              WHERE u.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
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
            privacy: Privacy::from_columns(
                row.privacy_mode,
                row.privacy_k,
                row.privacy_admins_see_individuals,
            ),
        };
        self.remember(id, user.clone());
        Ok(user)
    }

    fn remember(&self, id: Uuid, user: UserRow) {
        self.users
            .lock()
            .expect("user cache")
            .insert(id, (user, Instant::now()));
    }

    /// Takes `user` as an active member of `tenant` with `role` for the cache's lifetime, as
    /// if the control plane had just said so (for tests that must not need a database).
    #[cfg(test)]
    pub(crate) fn remember_member(&self, user: Uuid, tenant: TenantId, role: Role) {
        let row = UserRow {
            tenant: tenant.0,
            role: role.as_str().into(),
            external_id: format!("user-{user}"),
            teams: vec!["team".into()],
            token_version: 0,
            active: true,
            privacy: Privacy::default(),
        };
        self.remember(user, row);
    }
}

/// The role and visibility of a user whose token names `tenant` and `token_version`, if the
/// token still matches the user as the control plane has them now.
fn standing(
    user: &UserRow,
    tenant: TenantId,
    token_version: i32,
) -> Result<(Role, Visibility), Problem> {
    let gone = || Problem::unauthorized("this access token is no longer valid");
    if !user.active || user.tenant != tenant.0 || user.token_version != token_version {
        return Err(gone());
    }
    let role = Role::parse(&user.role).ok_or_else(gone)?;
    let visibility = match role {
        Role::Owner | Role::Admin => Visibility::Tenant,
        Role::Manager | Role::Viewer => Visibility::Teams(user.teams.clone()),
        Role::Developer => Visibility::Own(user.external_id.clone()),
    };
    Ok((role, visibility))
}
