//! Authentication of machine callers by API key, shared by ingest-api and query-api.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use sqlx::PgPool;
use uuid::Uuid;

use crate::apikey::{self, Scope};
use crate::problem::Problem;
use crate::tenant::TenantId;

/// Requests per minute of each plan.
pub fn plan_limit(plan: &str) -> u32 {
    match plan {
        "free" => 100,
        "enterprise" => 5000,
        _ => 1000,
    }
}

/// Who is calling, as proven by an API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrincipal {
    pub key_id: Uuid,
    pub tenant_id: TenantId,
    pub scope: Scope,
    /// The tenant's request limit per minute (its plan's, or its own override).
    pub rate_limit_per_min: u32,
    /// How old an event of this tenant may be (its raw retention window).
    pub raw_retention_days: i64,
}

/// How long a looked-up key is trusted before it is checked again. This bounds how long a
/// revoked key keeps working (documented in the README).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// Looks keys up by their hash in `control.api_keys`, with a short in-process cache.
#[derive(Clone)]
pub struct ApiKeyStore {
    pool: PgPool,
    cache: Arc<Mutex<KeyCache>>,
}

/// Key hash → principal and when it was looked up.
type KeyCache = HashMap<Vec<u8>, (KeyPrincipal, Instant)>;

impl ApiKeyStore {
    pub fn new(pool: PgPool) -> Self {
        ApiKeyStore {
            pool,
            cache: Arc::default(),
        }
    }

    /// Authenticates the request's key and checks that it carries `scope`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        scope: Scope,
    ) -> Result<KeyPrincipal, Problem> {
        let secret = presented_key(headers).ok_or_else(|| {
            Problem::unauthorized(
                "an API key is required: `Authorization: Bearer <key>` or `X-API-Key: <key>`",
            )
        })?;
        if !apikey::looks_like_key(secret) {
            return Err(Problem::unauthorized("unknown or revoked API key"));
        }
        let hash = apikey::hash(secret);
        let principal = match self.cached(&hash) {
            Some(p) => p,
            None => {
                let p = self.lookup(&hash).await?;
                self.cache
                    .lock()
                    .expect("key cache lock")
                    .insert(hash, (p.clone(), Instant::now()));
                p
            }
        };
        if principal.scope != scope {
            return Err(Problem::forbidden(format!(
                "this API key has scope `{}`; this endpoint needs `{}`",
                principal.scope.as_str(),
                scope.as_str()
            )));
        }
        Ok(principal)
    }

    fn cached(&self, hash: &[u8]) -> Option<KeyPrincipal> {
        let mut cache = self.cache.lock().expect("key cache lock");
        match cache.get(hash) {
            Some((p, at)) if at.elapsed() < KEY_CACHE_TTL => Some(p.clone()),
            Some(_) => {
                cache.remove(hash);
                None
            }
            None => None,
        }
    }

    async fn lookup(&self, hash: &[u8]) -> Result<KeyPrincipal, Problem> {
        let row: Option<(Uuid, Uuid, String, String, Option<i32>, i32)> = sqlx::query_as(
            "SELECT k.id, k.tenant_id, k.scope, t.plan, t.rate_limit_per_min, t.raw_retention_days
               FROM control.api_keys k
               JOIN control.tenants t ON t.id = k.tenant_id
              WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND t.status = 'active'",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "API key lookup failed");
            Problem::unavailable("credentials cannot be checked right now", 2)
        })?;
        let (key_id, tenant_id, scope, plan, limit, raw_retention_days) =
            row.ok_or_else(|| Problem::unauthorized("unknown or revoked API key"))?;
        let scope = Scope::parse(&scope).ok_or_else(Problem::internal)?;
        let rate_limit_per_min = limit
            .and_then(|l| u32::try_from(l).ok())
            .unwrap_or_else(|| plan_limit(&plan));
        Ok(KeyPrincipal {
            key_id,
            tenant_id: TenantId(tenant_id),
            scope,
            rate_limit_per_min,
            raw_retention_days: i64::from(raw_retention_days),
        })
    }
}

/// The key from `X-API-Key`, or from `Authorization: Bearer` (or `Token`, as InfluxDB
/// clients send it).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(v.trim());
    }
    let auth = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("token"))
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_have_limits() {
        assert_eq!(plan_limit("free"), 100);
        assert_eq!(plan_limit("professional"), 1000);
        assert_eq!(plan_limit("enterprise"), 5000);
    }

    #[test]
    fn key_is_read_from_either_header() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(presented_key(&h), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "xyz".parse().unwrap());
        assert_eq!(presented_key(&h), Some("xyz"));
    }
}
