//! What the projector and query-api agree on in Redis about each tenant's watermark.
//!
//! The watermark itself lives in PostgreSQL (`projection_state` in each tenant schema,
//! written in the same transaction as the rows), so a cache key built from it can never be
//! newer than the data. Redis carries the notification that it moved ([`publish`]), and the
//! *announced* watermark ([`raise`]): the projector raises it to the (version, seq) a
//! transaction will commit *before* committing, so it is never behind the committed one, and
//! query-api keys a cache lookup by it without opening a PostgreSQL transaction. An answer is
//! only ever cached under the watermark its transaction read, so a lookup under an announced
//! watermark that has not committed yet finds nothing and falls through to PostgreSQL.

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

/// How long an announced watermark lives unless raised again: how long a projector that
/// cannot reach Redis while query-api can could leave answers served from an older one.
pub const ANNOUNCED_TTL_SECS: u64 = 30;

/// The key of a tenant's announced watermark.
pub fn announced_key(tenant: &TenantId) -> String {
    format!("tally:watermark:{tenant}")
}

/// (version, seq) as one number ordered like the pair (seq below 2^40, version below 2^12,
/// so it stays exact in Redis's Lua numbers).
fn pack(version: i32, seq: i64) -> i64 {
    (i64::from(version) << 40) | (seq & ((1 << 40) - 1))
}

fn unpack(packed: i64) -> (i32, i64) {
    ((packed >> 40) as i32, packed & ((1 << 40) - 1))
}

/// Raises the announced watermark of each (tenant, version, seq) unless it is there or
/// beyond already (it never goes down), and keeps it for [`ANNOUNCED_TTL_SECS`]: one round
/// trip for all of them.
pub async fn raise(
    redis: &mut redis::aio::ConnectionManager,
    announcements: &[(TenantId, i32, i64)],
) -> redis::RedisResult<()> {
    static RAISE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
        redis::Script::new(
            "for i, key in ipairs(KEYS) do \
                 local now = tonumber(redis.call('GET', key) or '-1') \
                 if tonumber(ARGV[i + 1]) >= now then \
                     redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1]) \
                 end \
             end \
             return 0",
        )
    });
    if announcements.is_empty() {
        return Ok(());
    }
    let mut call = RAISE.prepare_invoke();
    call.arg(ANNOUNCED_TTL_SECS);
    for (tenant, version, seq) in announcements {
        call.key(announced_key(tenant)).arg(pack(*version, *seq));
    }
    call.invoke_async(redis).await
}

/// The announced watermark of `tenant`: (version, seq), if one is announced.
pub async fn announced(
    redis: &mut redis::aio::ConnectionManager,
    tenant: &TenantId,
) -> redis::RedisResult<Option<(i32, i64)>> {
    let packed: Option<i64> = redis::cmd("GET")
        .arg(announced_key(tenant))
        .query_async(redis)
        .await?;
    Ok(packed.map(unpack))
}

/// The announced watermark of `tenant`, and in the same round trip the value at `key` (an
/// answer cached under the watermark the caller expects to be announced).
pub async fn announced_and_get(
    redis: &mut redis::aio::ConnectionManager,
    tenant: &TenantId,
    key: &str,
) -> redis::RedisResult<(Option<(i32, i64)>, Option<Vec<u8>>)> {
    let (packed, value): (Option<i64>, Option<Vec<u8>>) = redis::pipe()
        .get(announced_key(tenant))
        .get(key)
        .query_async(redis)
        .await?;
    Ok((packed.map(unpack), value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_watermarks_order_like_version_then_seq() {
        assert_eq!(unpack(pack(3, 41)), (3, 41));
        assert!(pack(2, 0) > pack(1, (1 << 40) - 1));
        assert!(pack(1, 42) > pack(1, 41));
        assert!(((pack(4095, (1 << 40) - 1)) as f64) < 2f64.powi(53));
    }

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
