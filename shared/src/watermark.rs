//! Names the projector and query-api agree on for per-tenant notifications in Redis.
//!
//! The watermark itself lives in PostgreSQL (`projection_state` in each tenant schema,
//! written in the same transaction as the rows), so a cache key built from it can never be
//! newer than the data. Redis only carries the notification that it moved.

use crate::tenant::TenantId;

/// Pub/sub channel on which the projector announces that a tenant's projection advanced.
pub fn channel(tenant: &TenantId) -> String {
    format!("tally:projected:{tenant}")
}

/// Announces that these tenants' projections moved (each with its new watermark). Best
/// effort: the first failure stops it (query-api then finds out by polling).
pub async fn publish(
    redis: &mut redis::aio::ConnectionManager,
    tenants: impl IntoIterator<Item = (TenantId, i64)>,
) {
    for (t, seq) in tenants {
        let r: redis::RedisResult<()> = redis::cmd("PUBLISH")
            .arg(channel(&t))
            .arg(seq)
            .query_async(redis)
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "redis notify failed");
            break;
        }
    }
}
