//! Answers cached in Redis under keys that contain the tenant's projection watermark, so a
//! cached answer is exactly as fresh as the projection. Redis down: the cache is bypassed.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;
use shared::tenant::TenantId;
use shared::watermark;

/// How long a cache call may take before it is given up (the answer is computed instead).
const CACHE_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Clone)]
pub struct Cache {
    conn: Option<ConnectionManager>,
    ttl_secs: u64,
}

impl Cache {
    pub async fn connect(url: &str, ttl_secs: u64) -> Cache {
        let conn = shared::redis_client::connect(url).await;
        Cache { conn, ttl_secs }
    }

    /// A cache that has no Redis: every answer is computed (for tests without services).
    #[cfg(test)]
    pub(crate) fn none() -> Cache {
        Cache {
            conn: None,
            ttl_secs: 0,
        }
    }

    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut conn = self.conn.clone()?;
        let r: Result<redis::RedisResult<Option<Vec<u8>>>, _> =
            tokio::time::timeout(CACHE_TIMEOUT, conn.get(key)).await;
        match r {
            Ok(Ok(Some(v))) => {
                metrics::counter!("query_cache_total", "result" => "hit").increment(1);
                Some(v)
            }
            Ok(Ok(None)) => {
                metrics::counter!("query_cache_total", "result" => "miss").increment(1);
                None
            }
            _ => {
                metrics::counter!("query_cache_total", "result" => "error").increment(1);
                None
            }
        }
    }

    /// The tenant's announced watermark ([`shared::watermark::announced`]): (version, seq).
    pub async fn announced(&self, tenant: &TenantId) -> Option<(i32, i64)> {
        let mut conn = self.conn.clone()?;
        tokio::time::timeout(CACHE_TIMEOUT, watermark::announced(&mut conn, tenant))
            .await
            .ok()?
            .ok()?
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

    pub async fn put(&self, key: &str, value: &[u8]) {
        let Some(mut conn) = self.conn.clone() else {
            return;
        };
        let _ = tokio::time::timeout(
            CACHE_TIMEOUT,
            conn.set_ex::<_, _, ()>(key, value, self.ttl_secs),
        )
        .await;
    }
}
