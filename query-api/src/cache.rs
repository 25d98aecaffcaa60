//! Answers cached in Redis under keys that contain the tenant's projection watermark, so a
//! cached answer is exactly as fresh as the projection. Redis down: the cache is bypassed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use shared::tenant::TenantId;
use shared::watermark;

/// How long a cache call may take before it is given up (the answer is computed instead).
const CACHE_TIMEOUT: Duration = Duration::from_millis(200);

/// Stores an answer (`KEYS[1]`) for `ARGV[2]` seconds if the tenant's bytes stored in this
/// window (`KEYS[2]`, which expires with it), its size (`ARGV[3]`) added, stay within
/// `ARGV[4]`, and counts them; 1 when stored (an answer refused is not counted).
const PUT_WITHIN_BUDGET: &str = r"
local size = tonumber(ARGV[3])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used + size > tonumber(ARGV[4]) then return 0 end
if redis.call('INCRBY', KEYS[2], size) == size then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
";

#[derive(Clone)]
pub struct Cache {
    conn: Option<ConnectionManager>,
    ttl_secs: u64,
    /// Bytes one tenant may put per `ttl_secs` (see `Config::cache_tenant_bytes`).
    tenant_bytes: u64,
    /// Each tenant's watermark as this process last read it announced: the next lookup
    /// asks for the answer under it in the same round trip as the watermark itself.
    last_announced: Arc<Mutex<HashMap<TenantId, (i32, i64)>>>,
}

impl Cache {
    pub async fn connect(url: &str, ttl_secs: u64, tenant_bytes: u64) -> Cache {
        let conn = shared::redis_client::connect(url).await;
        Cache {
            conn,
            ttl_secs,
            tenant_bytes,
            last_announced: Arc::default(),
        }
    }

    /// A cache that has no Redis: every answer is computed (for tests without services).
    #[cfg(test)]
    pub(crate) fn none() -> Cache {
        Cache {
            conn: None,
            ttl_secs: 0,
            tenant_bytes: 0,
            last_announced: Arc::default(),
        }
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut conn = self.conn.clone()?;
        let r: Result<redis::RedisResult<Option<Vec<u8>>>, _> =
            tokio::time::timeout(CACHE_TIMEOUT, conn.get(key)).await;
        counted(match r {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(()),
        })
    }

    /// The tenant's announced watermark ([`shared::watermark::announced`]): (version, seq);
    /// and, when it is the one this process read last, what is cached under the key `key_at`
    /// makes of it, read in the same round trip (`Some`: it was looked up there).
    pub async fn announced(
        &self,
        tenant: &TenantId,
        key_at: impl FnOnce((i32, i64)) -> String,
    ) -> (Option<(i32, i64)>, Option<Option<Vec<u8>>>) {
        let Some(mut conn) = self.conn.clone() else {
            return (None, None);
        };
        let last = self.lock().get(tenant).copied();
        let (announced, answer) = match last {
            Some(last) => {
                let key = key_at(last);
                let both = watermark::announced_and_get(&mut conn, tenant, &key);
                match tokio::time::timeout(CACHE_TIMEOUT, both).await {
                    Ok(Ok((announced, answer))) if announced == Some(last) => {
                        (announced, Some(counted(Ok(answer))))
                    }
                    Ok(Ok((announced, _))) => (announced, None),
                    _ => (None, None),
                }
            }
            None => {
                let one = watermark::announced(&mut conn, tenant);
                let announced = tokio::time::timeout(CACHE_TIMEOUT, one).await;
                (announced.ok().and_then(Result::ok).flatten(), None)
            }
        };
        if let Some(at) = announced {
            self.lock().insert(*tenant, at);
        }
        (announced, answer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, (i32, i64)>> {
        self.last_announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the tenant's announced watermark to what a read transaction saw, so that the
    /// next lookups of an idle tenant need no PostgreSQL either. Best effort.
    pub async fn raise(&self, tenant: &TenantId, version: i32, seq: i64) {
        let Some(mut conn) = self.conn.clone() else {
            return;
        };
        let seen = [(*tenant, version, seq)];
        let _ = tokio::time::timeout(CACHE_TIMEOUT, watermark::raise(&mut conn, &seen)).await;
    }

    /// Caches `value` under `key` for `tenant`, within the bytes the tenant may put in this
    /// window (past them, nothing is stored until the next: counted as `over_budget`).
    pub async fn put(&self, tenant: &TenantId, key: &str, value: &[u8]) {
        let Some(mut conn) = self.conn.clone() else {
            return;
        };
        let ttl = self.ttl_secs.max(1);
        let window = chrono::Utc::now().timestamp().max(0) as u64 / ttl;
        let size = key.len() + value.len();
        let mut put = redis::cmd("EVAL");
        put.arg(PUT_WITHIN_BUDGET)
            .arg(2)
            .arg(key)
            .arg(format!("tally:ab:{tenant}:{window}"))
            .arg(value)
            .arg(ttl)
            .arg(size)
            .arg(self.tenant_bytes);
        let stored = tokio::time::timeout(CACHE_TIMEOUT, put.query_async::<i64>(&mut conn)).await;
        if let Ok(Ok(0)) = stored {
            metrics::counter!("query_cache_total", "result" => "over_budget").increment(1);
        }
    }
}

/// A cached answer as Redis gave it (`Err`: Redis did not answer in time), counted.
fn counted(got: Result<Option<Vec<u8>>, ()>) -> Option<Vec<u8>> {
    let result = match &got {
        Ok(Some(_)) => "hit",
        Ok(None) => "miss",
        Err(()) => "error",
    };
    metrics::counter!("query_cache_total", "result" => result).increment(1);
    got.ok().flatten()
}
