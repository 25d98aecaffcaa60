//! Redis connection setup. Redis only carries caches, limits and notifications, so a service
//! starts without it and says so.

use std::time::Duration;

use redis::aio::ConnectionManager;

/// Connects within 2 s, or returns `None` (logged) so the caller runs without Redis.
pub async fn connect(url: &str) -> Option<ConnectionManager> {
    let conn = match redis::Client::open(url) {
        Ok(c) => tokio::time::timeout(Duration::from_secs(2), ConnectionManager::new(c))
            .await
            .ok()
            .and_then(Result::ok),
        Err(e) => {
            tracing::warn!(error = %e, "invalid redis_url");
            None
        }
    };
    if conn.is_none() {
        tracing::warn!("redis unreachable at start: running without it");
    }
    conn
}
