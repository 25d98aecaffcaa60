//! query-api's configuration (see `shared::config` for how it is loaded).

use serde::{Deserialize, Serialize};
use shared::config::Common;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub common: Common,
    pub http_addr: String,
    /// Longest time range one request may ask for, in days.
    pub max_range_days: i64,
    /// Most buckets one time series may have.
    pub max_points: i64,
    /// How long a cached answer is kept (it is keyed by the watermark, so it is never stale).
    pub cache_ttl_secs: u64,
    /// Where ingest-api publishes the keys that sign access tokens.
    pub jwks_url: String,
    /// ingest-api's address as browsers reach it (the dashboard page signs in there).
    pub ingest_url: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: Common::default(),
            http_addr: "127.0.0.1:8081".into(),
            max_range_days: 90,
            max_points: 5000,
            cache_ttl_secs: 600,
            jwks_url: "http://127.0.0.1:8080/.well-known/jwks.json".into(),
            ingest_url: "http://127.0.0.1:8080".into(),
        }
    }
}

impl Config {
    pub fn check(&self) -> Result<(), String> {
        self.common.check()?;
        if self.max_range_days < 1 || self.max_points < 1 {
            return Err("max_range_days and max_points must be positive".into());
        }
        Ok(())
    }
}
