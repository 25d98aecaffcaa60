//! Per-tenant request rate limits (ingest-api's for what tenants send, query-api's for
//! what they read): a fixed one-minute window counted in Redis, shared by every instance. When Redis does not answer within a few milliseconds a local window in
//! this process takes over, so the service keeps answering (and keeps limiting) without it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use redis::aio::ConnectionManager;

use crate::problem::Problem;
use crate::tenant::TenantId;

const WINDOW_SECS: u64 = 60;
const REDIS_TIMEOUT: Duration = Duration::from_millis(50);

/// The outcome of one check, with what the `X-RateLimit-*` headers say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the window resets.
    pub reset_secs: u64,
    /// What is counted ("requests", "read requests").
    pub what: &'static str,
}

impl Decision {
    /// Writes `X-RateLimit-Limit/Remaining/Reset` (and `Retry-After` when refused).
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(self.reset_secs));
        if !self.allowed {
            headers.insert("retry-after", HeaderValue::from(self.reset_secs.max(1)));
        }
    }

    /// The 429 answer for a refused request.
    pub fn problem(&self) -> Problem {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!(
                "this tenant may make {} {} per minute; retry in {} s",
                self.limit, self.what, self.reset_secs
            ),
        )
        .with_retry_after(self.reset_secs.max(1))
    }
}

#[derive(Clone)]
pub struct RateLimiter {
    redis: Option<ConnectionManager>,
    local: Arc<Mutex<HashMap<(TenantId, u64), u32>>>,
    /// Redis key prefix of the counters.
    prefix: &'static str,
    what: &'static str,
}

impl RateLimiter {
    /// The limiter of what tenants send (ingest-api).
    pub fn new(redis: Option<ConnectionManager>) -> Self {
        RateLimiter::counting(redis, "tally:rl", "requests")
    }

    /// The limiter of what tenants read (query-api), counted apart from what they send.
    pub fn reads(redis: Option<ConnectionManager>) -> Self {
        RateLimiter::counting(redis, "tally:rl:read", "read requests")
    }

    fn counting(
        redis: Option<ConnectionManager>,
        prefix: &'static str,
        what: &'static str,
    ) -> Self {
        RateLimiter {
            redis,
            local: Arc::default(),
            prefix,
            what,
        }
    }

    /// Counts one request of `tenant` against `limit` per minute.
    pub async fn check(&self, tenant: TenantId, limit: u32) -> Decision {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let window = now / WINDOW_SECS;
        let reset_secs = (window + 1) * WINDOW_SECS - now;
        let count = match self.count_in_redis(tenant, window).await {
            Some(n) => n,
            None => {
                metrics::counter!("ratelimit_local_fallback_total").increment(1);
                self.count_locally(tenant, window)
            }
        };
        let allowed = count <= u64::from(limit);
        if !allowed {
            metrics::counter!("ratelimit_refused_total").increment(1);
        }
        Decision {
            allowed,
            limit,
            remaining: u64::from(limit).saturating_sub(count) as u32,
            reset_secs,
            what: self.what,
        }
    }

    async fn count_in_redis(&self, tenant: TenantId, window: u64) -> Option<u64> {
        let mut conn = self.redis.clone()?;
        let key = format!("{}:{tenant}:{window}", self.prefix);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .incr(&key, 1u64)
            .expire(&key, (WINDOW_SECS * 2) as i64)
            .ignore();
        let r: Result<redis::RedisResult<(u64,)>, _> =
            tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn)).await;
        match r {
            Ok(Ok((n,))) => Some(n),
            _ => None,
        }
    }

    fn count_locally(&self, tenant: TenantId, window: u64) -> u64 {
        let mut local = self.local.lock().expect("rate limit lock");
        local.retain(|(_, w), _| *w + 1 >= window);
        let n = local.entry((tenant, window)).or_insert(0);
        *n += 1;
        u64::from(*n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_local_window_limits_without_redis() {
        let rl = RateLimiter::new(None);
        let (a, b) = (TenantId::new(), TenantId::new());
        for i in 1..=3 {
            let d = rl.check(a, 3).await;
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 3 - i);
        }
        let refused = rl.check(a, 3).await;
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert!(refused.reset_secs >= 1 && refused.reset_secs <= 60);
        assert!(rl.check(b, 3).await.allowed, "tenants are counted apart");
        let mut h = HeaderMap::new();
        refused.write_headers(&mut h);
        assert_eq!(h["x-ratelimit-limit"], "3");
        assert!(h.contains_key("retry-after"));
    }
}
