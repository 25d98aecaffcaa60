//! Brute-force protection for logins, and a bound on the password hashes in flight.
//!
//! Every attempt is counted per account and per client address *before* its password is
//! looked at, with one atomic increment in Redis (shared by every instance; a local count
//! when Redis does not answer): attempts past the limit are refused without a password
//! check, so parallel guesses cannot all pass a check made before any of them is counted.
//! A failure keeps its count and is answered a little later than the one before; past the
//! limit the account (or address) is locked out until the window ends: 429 with
//! `Retry-After`, even for the right password. A success clears the account's count and
//! gives the address its attempt back; an attempt that was never decided (no hash slot, the
//! database unavailable) gives both back. Every instance also keeps its own count, and the
//! higher of the two decides: a Redis answer that is slow or lost never buys an attacker a
//! fresh allowance on that instance.
//!
//! [`HashSlots`] bounds how many argon2id checks (19 MiB each) run at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use redis::aio::ConnectionManager;
use shared::problem::Problem;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

const REDIS_TIMEOUT: Duration = Duration::from_millis(200);

/// Most keys the local count keeps; past it, expired windows are dropped, and if that is not
/// enough the local count starts over (Redis, when it answers, still holds every count).
const LOCAL_MAX_KEYS: usize = 100_000;

/// Decrements each key that still exists (an expired window is not given a negative count).
const RELEASE_LUA: &str = "for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then redis.call('DECR', k) end
end
return 0";

#[derive(Clone)]
pub struct LoginThrottle {
    redis: Option<ConnectionManager>,
    local: Arc<Mutex<HashMap<String, (u32, Instant)>>>,
    namespace: String,
    /// Attempts per account within the window before it is locked (successes give theirs back).
    pub max_per_account: u32,
    /// Attempts per client address within the window before it is locked.
    pub max_per_ip: u32,
    pub window: Duration,
}

/// An attempt that was counted and may check its password.
#[must_use = "an attempt ends as failed, succeeded or released"]
pub struct Attempt {
    account: String,
    ip: String,
    /// The higher of the two counts, this attempt included.
    count: u32,
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

    fn account_key(&self, email: &str) -> String {
        format!("{}tally:lf:acct:{email}", self.namespace)
    }

    fn ip_key(&self, ip: &str) -> String {
        format!("{}tally:lf:ip:{ip}", self.namespace)
    }

    /// Counts the attempt, then refuses it (429) if the account or the address is over its
    /// limit within the window.
    pub async fn reserve(&self, email: &str, ip: &str) -> Result<Attempt, Problem> {
        let (account, ip) = (self.account_key(email), self.ip_key(ip));
        let [(n_acct, ttl_acct), (n_ip, ttl_ip)] = self.incr(&account, &ip).await;
        let over = [
            (n_acct > self.max_per_account, ttl_acct),
            (n_ip > self.max_per_ip, ttl_ip),
        ];
        if let Some(ttl) = over.iter().filter(|(o, _)| *o).map(|(_, t)| *t).max() {
            metrics::counter!("auth_login_lockouts_total").increment(1);
            let wait = ttl.as_secs().max(1);
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "login-locked",
                "Too many failed logins",
                format!("too many failed logins; try again in {wait} s"),
            )
            .with_retry_after(wait));
        }
        Ok(Attempt {
            account,
            ip,
            count: n_acct.max(n_ip),
        })
    }

    /// The attempt failed: it stays counted, and the answer waits a little longer for each
    /// failure (250 ms doubling, ≤ 4 s).
    pub async fn failed(&self, attempt: Attempt) {
        let delay = Duration::from_millis(250u64 << attempt.count.saturating_sub(1).min(4));
        tokio::time::sleep(delay).await;
    }

    /// The attempt succeeded: the account's count is cleared, the address's attempt given back.
    pub async fn succeeded(&self, attempt: Attempt) {
        self.local
            .lock()
            .expect("throttle lock")
            .remove(&attempt.account);
        if let Some(mut conn) = self.redis.clone() {
            let _ = tokio::time::timeout(
                REDIS_TIMEOUT,
                redis::cmd("DEL")
                    .arg(&attempt.account)
                    .query_async::<()>(&mut conn),
            )
            .await;
        }
        self.give_back(&[&attempt.ip]).await;
    }

    /// The attempt was never decided (no password was checked): both counts are given back.
    pub async fn release(&self, attempt: Attempt) {
        self.give_back(&[&attempt.account, &attempt.ip]).await;
    }

    async fn give_back(&self, keys: &[&str]) {
        {
            let mut local = self.local.lock().expect("throttle lock");
            for k in keys {
                if let Some(entry) = local.get_mut(*k) {
                    entry.0 = entry.0.saturating_sub(1);
                }
            }
        }
        if let Some(mut conn) = self.redis.clone() {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(RELEASE_LUA).arg(keys.len());
            for k in keys {
                cmd.arg(*k);
            }
            let _ = tokio::time::timeout(REDIS_TIMEOUT, cmd.query_async::<()>(&mut conn)).await;
        }
    }

    /// Increments both keys (starting their window if new); their counts and time left, the
    /// higher of Redis's and this instance's own.
    async fn incr(&self, account: &str, ip: &str) -> [(u32, Duration); 2] {
        let local = self.incr_local([account, ip]);
        if let Some(mut conn) = self.redis.clone() {
            let secs = self.window.as_secs().max(1);
            let mut pipe = redis::pipe();
            pipe.atomic();
            for key in [account, ip] {
                pipe.incr(key, 1u32)
                    .cmd("EXPIRE")
                    .arg(key)
                    .arg(secs)
                    .arg("NX")
                    .ignore()
                    .cmd("PTTL")
                    .arg(key);
            }
            let r: Result<redis::RedisResult<(u32, i64, u32, i64)>, _> =
                tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async(&mut conn)).await;
            if let Ok(Ok((a, a_ttl, i, i_ttl))) = r {
                let ms = |t: i64| Duration::from_millis(t.max(0) as u64);
                let [(la, la_ttl), (li, li_ttl)] = local;
                return [
                    (a.max(la), ms(a_ttl).max(la_ttl)),
                    (i.max(li), ms(i_ttl).max(li_ttl)),
                ];
            }
            metrics::counter!("auth_throttle_local_fallback_total").increment(1);
        }
        local
    }

    fn incr_local(&self, keys: [&str; 2]) -> [(u32, Duration); 2] {
        let mut local = self.local.lock().expect("throttle lock");
        let now = Instant::now();
        if local.len() >= LOCAL_MAX_KEYS {
            local.retain(|_, (_, until)| *until > now);
            if local.len() >= LOCAL_MAX_KEYS {
                local.clear();
            }
        }
        keys.map(|key| {
            let entry = local
                .entry(key.to_string())
                .or_insert((0, now + self.window));
            if entry.1 <= now {
                *entry = (0, now + self.window);
            }
            entry.0 += 1;
            (entry.0, entry.1 - now)
        })
    }
}

/// A bound on concurrent password hashes and checks: each holds a permit while argon2id
/// runs on a blocking thread. A request waits at most `wait` for one, then gets 503 with
/// `Retry-After`.
#[derive(Clone)]
pub struct HashSlots {
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl HashSlots {
    pub fn new(slots: usize, wait: Duration) -> Self {
        HashSlots {
            permits: Arc::new(Semaphore::new(slots.max(1))),
            wait,
        }
    }

    /// A permit to run one hash, or 503 when every slot stayed busy for the wait.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, Problem> {
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                metrics::counter!("auth_hash_slots_full_total").increment(1);
                Err(Problem::unavailable(
                    "too many password checks in progress; try again shortly",
                    1,
                ))
            }
        }
    }
}
