//! Configuration: defaults in code → optional TOML file (`TALLY_CONFIG`) → `TALLY_…` env vars.

use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Settings every service shares. Service configs embed it with `#[serde(flatten)]`,
/// so every key is flat: `database_url` in TOML is `TALLY_DATABASE_URL` in the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Common {
    pub database_url: String,
    pub db_max_connections: u32,
    pub redis_url: String,
    pub kafka_brokers: String,
    /// Prepended to every topic name (tests use a unique one per test).
    pub topic_prefix: String,
    /// Partitions of topics created by the services.
    pub kafka_partitions: i32,
    pub kafka_replication_factor: i32,
    /// `pretty` for development, `json` for production.
    pub log_format: String,
    /// 64 hex characters; seals secrets at rest (SSO client secrets, notification channels'
    /// URLs and signing secrets). SSO and channels are off while it is empty.
    pub secret_key: String,
    /// Notification channels may be `http://` URLs to loopback addresses (a receiver on this
    /// host; tests). Off in production.
    pub notify_allow_loopback: bool,
    /// Notification channels may point at private networks (an internal receiver). Link-local
    /// and cloud metadata addresses stay refused.
    pub notify_allow_private: bool,
}

impl Default for Common {
    fn default() -> Self {
        Common {
            database_url: "postgres://tally:tally@127.0.0.1:55432/tally".into(),
            db_max_connections: 16,
            redis_url: "redis://127.0.0.1:56379".into(),
            kafka_brokers: "127.0.0.1:59092".into(),
            topic_prefix: String::new(),
            kafka_partitions: 6,
            kafka_replication_factor: 1,
            log_format: "pretty".into(),
            secret_key: String::new(),
            notify_allow_loopback: false,
            notify_allow_private: false,
        }
    }
}

impl Common {
    /// Where notifications may be sent.
    pub fn notify_policy(&self) -> crate::webhooks::Policy {
        crate::webhooks::Policy {
            allow_loopback: self.notify_allow_loopback,
            allow_private: self.notify_allow_private,
        }
    }

    pub fn metrics_topic(&self) -> String {
        format!("{}{}", self.topic_prefix, crate::events::METRICS_TOPIC)
    }

    /// Every topic the services use (created at start if missing).
    pub fn all_topics(&self) -> Vec<String> {
        vec![
            self.metrics_topic(),
            self.metrics_dlq_topic(),
            self.auth_topic(),
            self.auth_dlq_topic(),
        ]
    }

    pub fn auth_topic(&self) -> String {
        format!("{}{}", self.topic_prefix, crate::events::AUTH_TOPIC)
    }

    pub fn auth_dlq_topic(&self) -> String {
        format!("{}{}", self.auth_topic(), crate::events::DLQ_SUFFIX)
    }

    pub fn metrics_dlq_topic(&self) -> String {
        format!("{}{}", self.metrics_topic(), crate::events::DLQ_SUFFIX)
    }

    /// Checks what the types cannot; called by every service at start.
    pub fn check(&self) -> Result<(), String> {
        if !self.database_url.starts_with("postgres://")
            && !self.database_url.starts_with("postgresql://")
        {
            return Err("database_url must be a postgres:// URL".into());
        }
        if !self.redis_url.starts_with("redis://") {
            return Err("redis_url must be a redis:// URL".into());
        }
        if self.kafka_brokers.trim().is_empty() {
            return Err("kafka_brokers must not be empty".into());
        }
        if self.kafka_partitions < 1 {
            return Err("kafka_partitions must be at least 1".into());
        }
        if !self.secret_key.is_empty() {
            crate::secretbox::SecretKey::from_hex(&self.secret_key)?;
        }
        Ok(())
    }
}

/// Loads a service's configuration: `T::default()`, then the TOML file named by
/// `TALLY_CONFIG` (if set), then `TALLY_*` environment variables.
pub fn load<T: Serialize + DeserializeOwned + Default>() -> Result<T, String> {
    let mut fig = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = std::env::var_os("TALLY_CONFIG") {
        let path = PathBuf::from(path);
        if !path.exists() {
            return Err(format!(
                "TALLY_CONFIG points at {}, which does not exist",
                path.display()
            ));
        }
        fig = fig.merge(Toml::file(path));
    }
    fig.merge(Env::prefixed("TALLY_").ignore(&["config"]))
        .extract()
        .map_err(|e| format!("invalid configuration: {e}"))
}

/// Reads a duration given in milliseconds, for config fields.
pub fn ms(v: u64) -> std::time::Duration {
    std::time::Duration::from_millis(v)
}
