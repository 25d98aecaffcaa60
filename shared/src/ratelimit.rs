//! Per-tenant request rate limits (ingest-api's for what tenants send, query-api's for
//! what they read): a fixed one-minute window counted in Redis, shared by every instance.
//!
//! A request is counted in this process at once. While the process has read its tenant's
//! count in Redis within the last `FRESH_FOR`, and its own requests since are fewer than a
//! `LOCAL_SHARE`th of what the limit has left, it is decided on what the process knows: that
//! count plus its own requests since. What it counted is added to Redis (and the count read
//! back) by a task of its own a few milliseconds later, so a busy tenant's requests far from
//! its limit do not wait for Redis. Any other request adds itself and reads the count back
//! before it is decided, as every request used to. So instances see each other's requests a
//! little late, and each may let a tenant past what is left by at most a `LOCAL_SHARE`th of
//! it. An add Redis does not answer in time may still have been applied: its requests stay
//! counted here and are never sent again. After such a miss the process decides on its own
//! count for `REDIS_PAUSE` (no request waits for Redis meanwhile), so the service keeps
//! answering and limiting without it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use redis::aio::ConnectionManager;
use tokio::sync::Notify;

use crate::problem::Problem;
use crate::tenant::TenantId;

const WINDOW_SECS: u64 = 60;
const REDIS_TIMEOUT: Duration = Duration::from_millis(50);
/// How long the counts of requests just made wait to be added to Redis together.
const SHARE_EVERY: Duration = Duration::from_millis(20);
/// How long a tenant's count read from Redis is decided on without asking Redis again.
const FRESH_FOR: Duration = Duration::from_millis(100);
/// Of what a tenant's limit has left, the part one process may let through before it asks
/// Redis again: one eighth.
const LOCAL_SHARE: u64 = 8;
/// How long, after Redis missed an answer, requests are decided without waiting for it.
const REDIS_PAUSE: Duration = Duration::from_secs(1);

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
    counts: Arc<Counts>,
    what: &'static str,
}

/// Each tenant's count in the current window, as this process knows it; when the last
/// limiter holding it goes, its sharing task is told to stop.
struct Counts {
    redis: Option<ConnectionManager>,
    prefix: &'static str,
    tenants: Mutex<HashMap<TenantId, Count>>,
    /// Wakes the sharing task: requests were counted, or the limiter is gone.
    counted: Arc<Notify>,
    /// Until when requests are decided without waiting for Redis, which missed an answer.
    paused_until: Mutex<Option<Instant>>,
}

impl Counts {
    /// Whether requests may wait for Redis now.
    fn answering(&self) -> bool {
        locked(&self.paused_until).is_none_or(|until| Instant::now() >= until)
    }

    /// Redis answered (`true`) or missed an answer.
    fn redis_answered(&self, answered: bool) {
        *locked(&self.paused_until) = (!answered).then(|| Instant::now() + REDIS_PAUSE);
        if !answered {
            metrics::counter!("ratelimit_local_fallback_total").increment(1);
        }
    }
}

/// One tenant's requests in a window: the window's count in Redis as last read (and when),
/// this process's requests being added to it now, those whose add Redis did not confirm
/// (it may have applied them: they are never sent again), and its requests since. Counts
/// read back may already hold some of those being added: the sum errs on the side of more.
#[derive(Clone, Copy)]
struct Count {
    window: u64,
    in_redis: u64,
    read_at: Option<Instant>,
    adding: u64,
    unconfirmed: u64,
    unshared: u64,
}

impl Count {
    fn new(window: u64) -> Count {
        Count {
            window,
            in_redis: 0,
            read_at: None,
            adding: 0,
            unconfirmed: 0,
            unshared: 0,
        }
    }

    fn total(&self) -> u64 {
        self.in_redis + self.adding + self.unconfirmed + self.unshared
    }

    /// Whether a request just counted may be decided on what this process knows, against
    /// `limit`, without asking Redis.
    fn decided_here(&self, limit: u32) -> bool {
        let fresh = self.read_at.is_some_and(|at| at.elapsed() < FRESH_FOR);
        let left = u64::from(limit).saturating_sub(self.in_redis);
        fresh && self.adding + self.unshared <= left / LOCAL_SHARE
    }

    /// Takes the requests not yet added, to be added now.
    fn take_unshared(&mut self) -> u64 {
        let n = self.unshared;
        self.adding += n;
        self.unshared = 0;
        n
    }

    /// `n` of the window's requests were added, and Redis then counted `total`, or (`None`)
    /// did not say: they may have been applied, and stay counted here, never sent again.
    fn added(&mut self, window: u64, n: u64, total: Option<u64>) {
        if self.window != window {
            return;
        }
        debug_assert!(n <= self.adding, "more added than were being added");
        self.adding = self.adding.saturating_sub(n);
        match total {
            Some(total) => {
                self.in_redis = self.in_redis.max(total);
                self.read_at = Some(Instant::now());
            }
            None => self.unconfirmed += n,
        }
    }
}

impl Drop for Counts {
    fn drop(&mut self) {
        self.counted.notify_one();
    }
}

impl RateLimiter {
    /// The limiter of what tenants send (ingest-api).
    pub fn new(redis: Option<ConnectionManager>) -> Self {
        RateLimiter::counting(redis, "tally:rl", "requests")
    }

    /// The limiter of the events tenants send (ingest-api), counted apart from their requests:
    /// a request may carry thousands.
    pub fn events(redis: Option<ConnectionManager>) -> Self {
        RateLimiter::counting(redis, "tally:rl:events", "events")
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
        let counted = Arc::new(Notify::new());
        // The counts are shared from a task of the runtime this limiter is made in.
        let sharing = redis.filter(|_| tokio::runtime::Handle::try_current().is_ok());
        let counts = Arc::new(Counts {
            redis: sharing.clone(),
            prefix,
            tenants: Mutex::default(),
            counted: counted.clone(),
            paused_until: Mutex::default(),
        });
        if let Some(redis) = sharing {
            tokio::spawn(share(Arc::downgrade(&counts), counted, redis, prefix));
        }
        RateLimiter { counts, what }
    }

    /// Counts one request of `tenant` against `limit` per minute.
    pub async fn check(&self, tenant: TenantId, limit: u32) -> Decision {
        self.check_n(tenant, limit, 1).await
    }

    /// Counts `n` (at least one) of `tenant`'s requests or events against `limit` per
    /// minute: all are allowed or none, and a refused `n` stays counted, as a refused
    /// request does.
    pub async fn check_n(&self, tenant: TenantId, limit: u32, n: u64) -> Decision {
        let n = n.max(1);
        let asks_redis = self.counts.redis.is_some() && self.counts.answering();
        let (count, window, now, stale) = {
            let mut tenants = locked(&self.counts.tenants);
            // Read under the lock, and never back: a window is not begun again by a request
            // that read the clock just before another began the next.
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let count = tenants
                .entry(tenant)
                .or_insert(Count::new(now / WINDOW_SECS));
            if now / WINDOW_SECS > count.window {
                *count = Count::new(now / WINDOW_SECS);
            }
            count.unshared += n;
            let stale = (asks_redis && !count.decided_here(limit)).then(|| count.take_unshared());
            (count.total(), count.window, now, stale)
        };
        let reset_secs = ((window + 1) * WINDOW_SECS).saturating_sub(now).max(1);
        let count = match (stale, &self.counts.redis) {
            // Added, and the count read back, before it is decided.
            (Some(n), Some(redis)) => {
                let adding = Adding {
                    counts: &self.counts,
                    tenant,
                    window,
                    n,
                };
                let total = add(redis.clone(), self.counts.prefix, tenant, window, n).await;
                adding.done(total).unwrap_or(count)
            }
            _ => count,
        };
        if self.counts.redis.is_some() {
            self.counts.counted.notify_one();
        }
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
}

/// Requests being added to Redis by a request that waits for the count: if that request is
/// dropped while it waits, they stay counted here as an add Redis did not confirm.
struct Adding<'a> {
    counts: &'a Counts,
    tenant: TenantId,
    window: u64,
    n: u64,
}

impl Adding<'_> {
    /// The add came back with `total` (or missed it); the tenant's count now.
    fn done(self, total: Option<u64>) -> Option<u64> {
        self.counts.redis_answered(total.is_some());
        let count = self.settle(total);
        std::mem::forget(self);
        count
    }

    fn settle(&self, total: Option<u64>) -> Option<u64> {
        let mut tenants = locked(&self.counts.tenants);
        let c = tenants.get_mut(&self.tenant)?;
        c.added(self.window, self.n, total);
        Some(c.total())
    }
}

impl Drop for Adding<'_> {
    fn drop(&mut self) {
        self.settle(None);
    }
}

/// Adds what this process counted to Redis, and reads back each window's count there, a
/// little after requests are counted, until the limiter is gone. A round Redis does not
/// answer in time leaves its requests counted here, never sent again, and pauses the wait
/// for Redis (`ratelimit_local_fallback_total`).
async fn share(
    counts: Weak<Counts>,
    counted: Arc<Notify>,
    mut redis: ConnectionManager,
    prefix: &'static str,
) {
    loop {
        counted.notified().await;
        tokio::time::sleep(SHARE_EVERY).await;
        let Some(held) = counts.upgrade() else {
            return;
        };
        // (tenant, window, requests) to add.
        let unshared: Vec<(TenantId, u64, u64)> = {
            let mut tenants = locked(&held.tenants);
            let current = now_window();
            // A window over is forgotten, shared or not.
            tenants.retain(|_, c| c.window + 1 >= current);
            tenants
                .iter_mut()
                .filter(|(_, c)| c.unshared > 0)
                .map(|(t, c)| (*t, c.window, c.take_unshared()))
                .collect()
        };
        drop(held);
        if unshared.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for (tenant, window, n) in &unshared {
            let key = format!("{prefix}:{tenant}:{window}");
            pipe.incr(&key, *n)
                .expire(&key, (WINDOW_SECS * 2) as i64)
                .ignore();
        }
        let answered = tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut redis)).await;
        let totals: Option<Vec<u64>> = match answered {
            Ok(Ok(totals)) => Some(totals),
            _ => None,
        };
        let Some(held) = counts.upgrade() else {
            return;
        };
        held.redis_answered(totals.is_some());
        let totals = match totals {
            Some(totals) => totals.into_iter().map(Some).collect(),
            None => vec![None; unshared.len()],
        };
        let mut tenants = locked(&held.tenants);
        for ((tenant, window, n), total) in unshared.iter().zip(totals) {
            if let Some(c) = tenants.get_mut(tenant) {
                c.added(*window, *n, total);
            }
        }
    }
}

/// Adds `n` requests to `tenant`'s count in Redis for `window` and reads it back; `None` when
/// Redis does not answer in time.
async fn add(
    mut redis: ConnectionManager,
    prefix: &str,
    tenant: TenantId,
    window: u64,
    n: u64,
) -> Option<u64> {
    let key = format!("{prefix}:{tenant}:{window}");
    let mut pipe = redis::pipe();
    pipe.atomic()
        .incr(&key, n)
        .expire(&key, (WINDOW_SECS * 2) as i64)
        .ignore();
    let answered = tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut redis)).await;
    match answered {
        Ok(Ok((total,))) => Some(total),
        _ => None,
    }
}

/// The current window's number.
fn now_window() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / WINDOW_SECS
}

/// A lock whose holder cannot leave it inconsistent.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events are counted by the request: all of a request's are taken or none, and a
    /// refused request's stay counted.
    #[tokio::test]
    async fn events_are_counted_by_the_request() {
        let limiter = RateLimiter::events(None);
        let tenant = TenantId::new();
        assert!(limiter.check_n(tenant, 3000, 2500).await.allowed);
        let refused = limiter.check_n(tenant, 3000, 2500).await;
        assert!(!refused.allowed);
        assert_eq!((refused.what, refused.remaining), ("events", 0));
        assert!(!limiter.check_n(tenant, 3000, 1).await.allowed);
        assert!(limiter.check_n(TenantId::new(), 3000, 3000).await.allowed);
    }

    /// What was added is counted once it is read back (the highest count read wins, whatever
    /// order the answers come in); what Redis did not take is added again later.
    #[test]
    fn counts_read_back_err_on_the_side_of_more() {
        let mut c = Count::new(7);
        c.unshared = 3;
        let first = c.take_unshared();
        c.unshared = 2;
        let second = c.take_unshared();
        assert_eq!((first, second, c.total()), (3, 2, 5));
        // Redis took both; the second's answer (10, others' requests included) came first.
        c.added(7, second, Some(10));
        assert_eq!(
            c.total(),
            13,
            "the first's three may be in the 10: counted twice for now"
        );
        c.added(7, first, Some(8));
        assert_eq!(c.total(), 10, "an older count read back does not lower it");
        assert!(c.read_at.is_some());
        // Not confirmed (Redis may have applied it): counted here, never taken again.
        c.unshared = 1;
        let n = c.take_unshared();
        c.added(7, n, None);
        assert_eq!((c.unconfirmed, c.adding, c.total()), (1, 0, 11));
        assert_eq!(c.take_unshared(), 0, "not sent again");
        // An answer about a window gone changes nothing.
        let before = c.total();
        c.added(6, 5, Some(100));
        assert_eq!(c.total(), before);
    }

    /// A request is decided here only on a fresh count, and only while this process's
    /// requests since are within its share of what the limit has left.
    #[test]
    fn a_process_decides_alone_only_within_its_share_of_what_is_left() {
        let mut c = Count::new(7);
        c.unshared = 1;
        assert!(!c.decided_here(1000), "never read from Redis");
        c.in_redis = 200;
        c.read_at = Some(Instant::now());
        assert!(c.decided_here(1000), "1 of the 100 an eighth of 800 allows");
        c.unshared = 100;
        assert!(c.decided_here(1000));
        c.unshared = 101;
        assert!(!c.decided_here(1000), "past its share: Redis is asked");
        c.unshared = 1;
        assert!(!c.decided_here(7), "small limits are always asked");
        c.read_at = Instant::now().checked_sub(FRESH_FOR);
        assert!(!c.decided_here(1000), "a count read too long ago");
    }

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
