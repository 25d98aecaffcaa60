//! Brute-force protection for logins: failed attempts are counted per account and per client
//! address in Redis (shared by every instance; a local count when Redis does not answer).
//! Each failure is answered a little later than the one before, and past the limit the
//! account (or address) is locked out until the window ends: 429 with `Retry-After`, even
//! for the right password.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use shared::problem::Problem;

const REDIS_TIMEOUT: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct LoginThrottle {
    redis: Option<ConnectionManager>,
    local: Arc<Mutex<HashMap<String, (u32, Instant)>>>,
    namespace: String,
    /// Failures per account within the window before it is locked.
    pub max_per_account: u32,
    /// Failures per client address within the window before it is locked.
    pub max_per_ip: u32,
    pub window: Duration,
}

impl LoginThrottle {
    pub fn new(
        redis: Option<ConnectionManager>,
        namespace: &str,
        max_per_account: u32,
        max_per_ip: u32,
        window: Duration,
    ) -> Self {
        LoginThrottle {
            redis,
            local: Arc::default(),
            namespace: namespace.to_string(),
            max_per_account,
            max_per_ip,
            window,
        }
    }

    fn keys(&self, email: &str, ip: &str) -> [(String, u32); 2] {
        [
            (
                format!("{}tally:lf:acct:{email}", self.namespace),
                self.max_per_account,
            ),
            (
                format!("{}tally:lf:ip:{ip}", self.namespace),
                self.max_per_ip,
            ),
        ]
    }

    /// Refuses the attempt (429) while the account or the address is locked out.
    pub async fn check(&self, email: &str, ip: &str) -> Result<(), Problem> {
        for (key, max) in self.keys(email, ip) {
            let (count, ttl) = self.read(&key).await;
            if count >= max {
                metrics::counter!("auth_login_lockouts_total").increment(1);
                let wait = ttl.as_secs().max(1);
                return Err(Problem::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "login-locked",
                    "Too many failed logins",
                    format!("too many failed logins; try again in {wait} s"),
                )
                .with_retry_after(wait));
            }
        }
        Ok(())
    }

    /// Counts a failure and waits a little longer for each one (250 ms doubling, ≤ 4 s).
    pub async fn failed(&self, email: &str, ip: &str) {
        let mut worst = 0;
        for (key, _) in self.keys(email, ip) {
            worst = worst.max(self.incr(&key).await);
        }
        let delay = Duration::from_millis(250u64 << worst.saturating_sub(1).min(4));
        tokio::time::sleep(delay).await;
    }

    /// A successful login clears the account's count (not the address's).
    pub async fn succeeded(&self, email: &str, ip: &str) {
        let [(key, _), _] = self.keys(email, ip);
        self.local.lock().expect("throttle lock").remove(&key);
        if let Some(mut conn) = self.redis.clone() {
            let _ = tokio::time::timeout(
                REDIS_TIMEOUT,
                redis::cmd("DEL").arg(&key).query_async::<()>(&mut conn),
            )
            .await;
        }
    }

    async fn read(&self, key: &str) -> (u32, Duration) {
        if let Some(mut conn) = self.redis.clone() {
            let mut pipe = redis::pipe();
            pipe.get(key).cmd("PTTL").arg(key);
            let r: Result<redis::RedisResult<(Option<u32>, i64)>, _> =
                tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn)).await;
            if let Ok(Ok((count, ttl_ms))) = r {
                return (
                    count.unwrap_or(0),
                    Duration::from_millis(ttl_ms.max(0) as u64),
                );
            }
        }
        let mut local = self.local.lock().expect("throttle lock");
        match local.get(key) {
            Some((n, until)) if *until > Instant::now() => (*n, *until - Instant::now()),
            Some(_) => {
                local.remove(key);
                (0, Duration::ZERO)
            }
            None => (0, Duration::ZERO),
        }
    }

    async fn incr(&self, key: &str) -> u32 {
        if let Some(mut conn) = self.redis.clone() {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .incr(key, 1u32)
                .cmd("EXPIRE")
                .arg(key)
                .arg(self.window.as_secs().max(1))
                .arg("NX")
                .ignore();
            let r: Result<redis::RedisResult<(u32,)>, _> =
                tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn)).await;
            if let Ok(Ok((n,))) = r {
                return n;
            }
        }
        let mut local = self.local.lock().expect("throttle lock");
        let now = Instant::now();
        let entry = local
            .entry(key.to_string())
            .or_insert((0, now + self.window));
        if entry.1 <= now {
            *entry = (0, now + self.window);
        }
        entry.0 += 1;
        entry.0
    }
}
