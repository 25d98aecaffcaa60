//! Names the projector and query-api agree on for per-tenant notifications in Redis.
//!
//! The watermark itself lives in PostgreSQL (`projection_state` in each tenant schema,
//! written in the same transaction as the rows), so a cache key built from it can never be
//! newer than the data. Redis only carries the notification that it moved.

use crate::tenant::TenantId;

/// What every tenant's [`channel`] starts with.
const PREFIX: &str = "tally:projected:";

/// The pattern of every tenant's [`channel`] (for `PSUBSCRIBE`).
pub const CHANNEL_PATTERN: &str = "tally:projected:*";

/// Pub/sub channel on which the projector announces that a tenant's projection advanced.
pub fn channel(tenant: &TenantId) -> String {
    format!("{PREFIX}{tenant}")
}

/// The tenant a [`channel`] is about; `None` for any other channel.
pub fn tenant_of(channel: &str) -> Option<TenantId> {
    channel.strip_prefix(PREFIX)?.parse().ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_name_their_tenant_and_match_the_pattern() {
        let tenant = TenantId::new();
        let name = channel(&tenant);
        assert_eq!(tenant_of(&name), Some(tenant));
        assert_eq!(CHANNEL_PATTERN.strip_suffix('*'), Some(PREFIX));
        assert!(name.starts_with(PREFIX));
        for other in [
            "tally:projected:",
            "tally:projected:nope",
            "tally:other:x",
            "",
        ] {
            assert_eq!(tenant_of(other), None, "{other}");
        }
    }
}
