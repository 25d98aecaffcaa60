//! query-api's configuration (see `shared::config` for how it is loaded).

use serde::{Deserialize, Serialize};
use shared::config::Common;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub common: Common,
    pub http_addr: String,
    /// Operations port: `/healthz`, `/readyz` and `/metrics` served apart (64 connections of
    /// its own), for probes and scrapers, so that senders holding every place on the public
    /// port never keep them out; empty turns it off (they are on the public port too).
    pub operations_addr: String,
    /// Longest time range one request may ask for, in days.
    pub max_range_days: i64,
    /// Most buckets one time series may have.
    pub max_points: i64,
    /// How long a cached answer is kept (it is keyed by the watermark, so it is never stale).
    pub cache_ttl_secs: u64,
    /// Bytes of answers one tenant may store in the cache per window of `cache_ttl_secs`
    /// (over every instance; keys and values): past it, its answers are computed and not
    /// cached until the window ends, so that no tenant fills the cache every tenant shares. An
    /// answer lives into the next window: a tenant holds at most twice this at once.
    pub cache_tenant_bytes: u64,
    /// Where ingest-api publishes the keys that sign access tokens.
    pub jwks_url: String,
    /// ingest-api's address as browsers reach it (the dashboard page signs in there).
    pub ingest_url: String,
    /// Longest time one SQL statement of a request may run (`statement_timeout`, also lock
    /// waits); past it the request answers 503 with `Retry-After`.
    pub statement_timeout_ms: u64,
    /// How often an open live feed checks that its credential still holds (revoked key,
    /// deactivated user or tenant, expired token, changed role); it closes when not.
    pub stream_recheck_secs: u64,
    /// Most live feeds open at once for one tenant; more answer 429.
    pub stream_max_per_tenant: usize,
    /// Most live feeds open at once in this process; more answer 429.
    pub stream_max_total: usize,
    /// Most series a grouped time series returns (the largest groups by count); the rest are
    /// summed into one `other` series.
    pub max_series: usize,
    /// Read requests one tenant may make per minute, over every instance (MCP tool calls
    /// included); more answer 429 with `Retry-After`.
    pub read_rate_limit_per_min: u32,
    /// Of the pool's `db_max_connections`, how many one tenant's reads may hold at once; its
    /// next reads wait for one of them (then 503), so that one tenant's slow reads cannot
    /// take every connection.
    pub tenant_db_connections: u32,
    /// Its connections' bounds: heads' and writes' timeout, connections in all and per
    /// address (flat keys: `header_timeout_secs`, `max_connections`, …).
    #[serde(flatten)]
    pub serving: shared::serve::Serving,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: Common::default(),
            http_addr: "127.0.0.1:8081".into(),
            operations_addr: String::new(),
            max_range_days: 90,
            max_points: 5000,
            cache_ttl_secs: 600,
            cache_tenant_bytes: 128 * 1024 * 1024,
            jwks_url: "http://127.0.0.1:8080/.well-known/jwks.json".into(),
            ingest_url: "http://127.0.0.1:8080".into(),
            statement_timeout_ms: 5000,
            stream_recheck_secs: 60,
            stream_max_per_tenant: 100,
            stream_max_total: 1000,
            max_series: 20,
            read_rate_limit_per_min: 30_000,
            tenant_db_connections: 8,
            serving: shared::serve::Serving::default(),
        }
    }
}

impl Config {
    pub fn check(&self) -> Result<(), String> {
        self.common.check()?;
        if self.cache_ttl_secs == 0 || self.cache_tenant_bytes == 0 {
            return Err("cache_ttl_secs and cache_tenant_bytes must be positive".into());
        }
        if self.max_range_days < 1 || self.max_points < 1 {
            return Err("max_range_days and max_points must be positive".into());
        }
        if self.statement_timeout_ms == 0 {
            return Err("statement_timeout_ms must be positive (0 would disable it)".into());
        }
        if !(1..=60).contains(&self.stream_recheck_secs) {
            return Err("stream_recheck_secs must be 1..=60".into());
        }
        if self.stream_max_per_tenant == 0 || self.stream_max_total == 0 {
            return Err("stream_max_per_tenant and stream_max_total must be positive".into());
        }
        self.serving.check()?;
        if self.tenant_db_connections == 0 {
            return Err("tenant_db_connections must be positive".into());
        }
        if self.read_rate_limit_per_min == 0 {
            return Err("read_rate_limit_per_min must be positive".into());
        }
        if !(1..=1000).contains(&self.max_series) {
            return Err("max_series must be 1..=1000".into());
        }
        Ok(())
    }
}
