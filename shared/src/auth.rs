//! Authentication of machine callers by API key, shared by ingest-api and query-api.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use sqlx::PgPool;
use uuid::Uuid;

use crate::apikey::{self, Scope};
use crate::per_tenant::{PerTenant, TenantPermit};
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

/// Events a tenant may send per request of its limit, a minute: a request may carry up to
/// 1 000 events (50 000 points over OTLP or remote write), and a tenant's events cost the
/// projector every tenant shares. The free plan's 100 requests a minute carry 100 000 events.
pub const EVENTS_PER_REQUEST: u32 = 1000;

/// A tenant's events a minute for a request limit of `requests` a minute.
pub fn events_limit(requests: u32) -> u32 {
    requests.saturating_mul(EVENTS_PER_REQUEST)
}

/// Who is calling, as proven by an API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrincipal {
    pub key_id: Uuid,
    pub tenant_id: TenantId,
    pub scope: Scope,
    /// The tenant's request limit per minute (its plan's, or its own override).
    pub rate_limit_per_min: u32,
    /// The tenant's event limit per minute: [`EVENTS_PER_REQUEST`] times its request limit.
    pub events_per_min: u32,
    /// How old an event of this tenant may be (its raw retention window).
    pub raw_retention_days: i64,
    /// Whether the tenant stores the text of prompts (else the doors drop it).
    pub store_prompt_text: bool,
    /// Whether the tenant stores command arguments (else the doors drop them).
    pub store_command_text: bool,
    /// The tenant's privacy mode (what its readers may see).
    pub privacy: Privacy,
}

/// A tenant's privacy mode: when `on`, managers, viewers and read keys see only aggregates
/// of at least `k` people, and individual views are for the person themself and, when
/// `admins_see_individuals`, for owners and admins (audited).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
pub struct Privacy {
    pub on: bool,
    pub k: u32,
    pub admins_see_individuals: bool,
}

impl Privacy {
    /// From the `control.tenants` columns.
    pub fn from_columns(on: bool, k: i32, admins_see_individuals: bool) -> Privacy {
        Privacy {
            on,
            k: u32::try_from(k).unwrap_or(5).max(2),
            admins_see_individuals,
        }
    }
}

/// With `k`, the teams of `tenant` with at least `k` active members (each person counted
/// once): in privacy mode, the only teams whose budgets, rules and firings a reader of
/// aggregates sees or sets. `None` without `k` (a reader not held to aggregates).
pub async fn large_teams(
    pool: &PgPool,
    tenant: TenantId,
    k: Option<u32>,
) -> sqlx::Result<Option<Vec<String>>> {
    let Some(k) = k else {
        return Ok(None);
    };
    sqlx::query_scalar(
        "SELECT t FROM control.users u, unnest(u.teams) t
          WHERE u.tenant_id = $1 AND u.status = 'active'
          GROUP BY t HAVING count(DISTINCT u.id) >= $2",
    )
    .bind(tenant.0)
    .bind(i64::from(k))
    .fetch_all(pool)
    .await
    .map(Some)
}

/// Why a request's API key was not accepted. Each service turns it into its own answer
/// (`Problem` here, the ingest doors' error and gRPC status there) without guessing the
/// kind back from an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// No usable key: none presented, malformed, unknown, revoked, or its tenant inactive
    /// (401).
    Unauthenticated(&'static str),
    /// A valid key of another scope (403).
    WrongScope { has: Scope, needs: Scope },
    /// Keys cannot be checked right now (503; the lookup failed and was logged).
    Unavailable,
    /// A key row that cannot be read (500; logged).
    Corrupt,
}

/// Seconds a client is asked to wait when keys cannot be checked.
pub const KEY_CHECK_RETRY_SECS: u64 = 2;

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Unauthenticated(why) => f.write_str(why),
            KeyError::WrongScope { has, needs } => write!(
                f,
                "this API key has scope `{}`; this endpoint needs `{}`",
                has.as_str(),
                needs.as_str()
            ),
            KeyError::Unavailable => f.write_str("credentials cannot be checked right now"),
            KeyError::Corrupt => f.write_str("the API key could not be read"),
        }
    }
}

impl From<KeyError> for Problem {
    fn from(e: KeyError) -> Problem {
        match e {
            KeyError::Unauthenticated(_) => Problem::unauthorized(e.to_string()),
            KeyError::WrongScope { .. } => Problem::forbidden(e.to_string()),
            KeyError::Unavailable => Problem::unavailable(e.to_string(), KEY_CHECK_RETRY_SECS),
            KeyError::Corrupt => Problem::internal(),
        }
    }
}

const UNKNOWN_KEY: &str = "unknown or revoked API key";

/// How long a looked-up key is trusted before it is checked again. This bounds how long a
/// revoked key keeps working (documented in the README).
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(10);

/// Looks keys up by their hash in `control.api_keys`, with a short in-process cache.
#[derive(Clone)]
pub struct ApiKeyStore {
    pool: PgPool,
    cache: Arc<Mutex<KeyCache>>,
    lookups: Lookups,
}

/// Key hash → principal and when it was looked up. Unknown keys are not remembered, so that
/// a tenant reactivated is let in at once.
type KeyCache = HashMap<Vec<u8>, (KeyPrincipal, Instant)>;

/// Lookups of uncached keys at once ([`ApiKeyStore`]).
const LOOKUPS_AT_ONCE: usize = 4;

/// Of those, what one address's requests may hold at once.
const LOOKUPS_PER_PEER: usize = 2;

/// The places of lookups of keys not in the cache: a flood of made-up keys, which anyone can
/// send, takes at most `LOOKUPS_AT_ONCE` of the pool's connections; and one address's
/// requests wait for its own share of them first (`LOOKUPS_PER_PEER`, an IPv6 /64 as one
/// address), so that at most that many of its lookups are ever ahead of another address's,
/// however many it sends.
#[derive(Clone)]
struct Lookups {
    all: Arc<tokio::sync::Semaphore>,
    /// None: every request waits in one line (behind a proxy, every request's address is
    /// the proxy's).
    per_peer: Option<PerTenant<IpAddr>>,
}

/// A lookup's place, given back when dropped.
struct LookupPlace {
    _peer: Option<TenantPermit<IpAddr>>,
    _all: tokio::sync::OwnedSemaphorePermit,
}

impl Lookups {
    fn new(all: usize, per_peer: Option<usize>) -> Lookups {
        Lookups {
            all: Arc::new(tokio::sync::Semaphore::new(all)),
            per_peer: per_peer.map(PerTenant::new),
        }
    }

    /// A place for a lookup of `peer`'s (its share first, then one of all), or none within
    /// `wait`. Requests whose address is not known share one share between them.
    async fn enter(&self, peer: Option<IpAddr>, wait: Duration) -> Option<LookupPlace> {
        let enter = async {
            let share = match &self.per_peer {
                Some(shares) => {
                    let key =
                        peer.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), crate::serve::peer_key);
                    Some(shares.acquire(key, 1).await)
                }
                None => None,
            };
            let all = self.all.clone().acquire_owned().await.ok()?;
            Some(LookupPlace {
                _peer: share,
                _all: all,
            })
        };
        tokio::time::timeout(wait, enter).await.ok().flatten()
    }
}

/// How long a request waits for a lookup to be free before it is answered 503.
const LOOKUP_WAIT: Duration = Duration::from_secs(2);

impl ApiKeyStore {
    /// Looks keys up in `pool`; `by_address`: each address has its share of the lookups
    /// of keys not in the cache (not behind a proxy, where every request comes from the
    /// proxy's address: `max_connections_per_peer = 0`).
    pub fn new(pool: PgPool, by_address: bool) -> Self {
        ApiKeyStore {
            pool,
            cache: Arc::default(),
            lookups: Lookups::new(LOOKUPS_AT_ONCE, by_address.then_some(LOOKUPS_PER_PEER)),
        }
    }

    /// Authenticates the request's key, sent from `peer`, and checks that it carries
    /// `scope`.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        scope: Scope,
        peer: Option<IpAddr>,
    ) -> Result<KeyPrincipal, KeyError> {
        let secret = presented_key(headers).ok_or(KeyError::Unauthenticated(
            "an API key is required: `Authorization: Bearer <key>` or `X-API-Key: <key>`",
        ))?;
        if !apikey::looks_like_key(secret) {
            return Err(KeyError::Unauthenticated(UNKNOWN_KEY));
        }
        let hash = apikey::hash(secret);
        let principal = match self.cached(&hash) {
            Some(p) => p,
            None => {
                let Some(_lookup) = self.lookups.enter(peer, LOOKUP_WAIT).await else {
                    metrics::counter!("auth_key_lookups_shed_total").increment(1);
                    return Err(KeyError::Unavailable);
                };
                // Another request may have looked it up meanwhile (a key's requests that
                // came while it was out of the cache wait in line behind the first).
                match self.cached(&hash) {
                    Some(p) => p,
                    None => {
                        let p = self.lookup(&hash).await?;
                        self.cache
                            .lock()
                            .expect("key cache lock")
                            .insert(hash, (p.clone(), Instant::now()));
                        p
                    }
                }
            }
        };
        if principal.scope != scope {
            return Err(KeyError::WrongScope {
                has: principal.scope,
                needs: scope,
            });
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

    async fn lookup(&self, hash: &[u8]) -> Result<KeyPrincipal, KeyError> {
        #[derive(sqlx::FromRow)]
        struct KeyRow {
            id: Uuid,
            tenant_id: Uuid,
            scope: String,
            plan: String,
            rate_limit_per_min: Option<i32>,
            raw_retention_days: i32,
            store_prompt_text: bool,
            store_command_text: bool,
            privacy_mode: bool,
            privacy_k: i32,
            privacy_admins_see_individuals: bool,
        }
        let row: Option<KeyRow> = sqlx::query_as(
            "SELECT k.id, k.tenant_id, k.scope, t.plan, t.rate_limit_per_min, t.raw_retention_days,
                    t.store_prompt_text, t.store_command_text, t.privacy_mode, t.privacy_k,
                    t.privacy_admins_see_individuals
               FROM control.api_keys k
               JOIN control.tenants t ON t.id = k.tenant_id
              WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND t.status = 'active'",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "API key lookup failed");
            KeyError::Unavailable
        })?;
        let row = row.ok_or(KeyError::Unauthenticated(UNKNOWN_KEY))?;
        let key_id = row.id;
        let scope = Scope::parse(&row.scope).ok_or_else(|| {
            tracing::error!(%key_id, scope = row.scope, "API key with an unknown scope");
            KeyError::Corrupt
        })?;
        let rate_limit_per_min = row
            .rate_limit_per_min
            .and_then(|l| u32::try_from(l).ok())
            .unwrap_or_else(|| plan_limit(&row.plan));
        Ok(KeyPrincipal {
            key_id,
            tenant_id: TenantId(row.tenant_id),
            scope,
            rate_limit_per_min,
            events_per_min: events_limit(rate_limit_per_min),
            raw_retention_days: i64::from(row.raw_retention_days),
            store_prompt_text: row.store_prompt_text,
            store_command_text: row.store_command_text,
            privacy: Privacy::from_columns(
                row.privacy_mode,
                row.privacy_k,
                row.privacy_admins_see_individuals,
            ),
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

    /// One address sending twelve lookups at once (each holding its place for good): another
    /// address waits behind all of them in one line, and is let in at once when each address
    /// has its share.
    #[tokio::test]
    async fn one_address_flooding_lookups_never_keeps_another_waiting() {
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for (per_peer, b_let_in) in [(None, false), (Some(2), true)] {
            let lookups = Lookups::new(4, per_peer);
            let flood: Vec<_> = (0..12)
                .map(|_| {
                    let lookups = lookups.clone();
                    tokio::spawn(async move {
                        let place = lookups.enter(Some(a), Duration::from_secs(30)).await;
                        tokio::time::sleep(Duration::from_secs(30)).await;
                        drop(place);
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let entered = lookups.enter(Some(b), Duration::from_millis(200)).await;
            assert_eq!(entered.is_some(), b_let_in, "per peer {per_peer:?}");
            if per_peer.is_some() {
                // b's second takes the last place (a holds its two); a third waits.
                let second = lookups.enter(Some(b), Duration::from_millis(200)).await;
                assert!(second.is_some());
                let third = lookups.enter(Some(b), Duration::from_millis(200)).await;
                assert!(third.is_none(), "every place held");
                drop((entered, second));
            }
            flood.iter().for_each(|task| task.abort());
        }
        // An IPv6 address counts as its /64: its third waits although two places are free.
        let lookups = Lookups::new(4, Some(2));
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let wait = Duration::from_millis(200);
        let one = lookups.enter(v6("2001:db8::1"), wait).await;
        let two = lookups.enter(v6("2001:db8::2"), wait).await;
        let three = lookups.enter(v6("2001:db8::3"), wait).await;
        assert!(one.is_some() && two.is_some() && three.is_none());
        assert!(
            lookups.enter(Some(b), wait).await.is_some(),
            "places were free"
        );
    }

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
