//! ingest-api's configuration (see `shared::config` for how it is loaded).

use serde::{Deserialize, Serialize};
use shared::config::Common;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    #[serde(flatten)]
    pub common: Common,
    pub http_addr: String,
    /// OTLP/gRPC listener (4317 by convention); empty turns it off.
    pub grpc_addr: String,
    /// Operations port: `/healthz`, `/readyz` and `/metrics` served apart (64 connections of
    /// its own), for probes and scrapers, so that senders holding every place on the public
    /// port never keep them out; empty turns it off (they are on the public port too).
    pub operations_addr: String,
    /// Most events in one request.
    pub max_batch_events: usize,
    /// Largest request body, before and after decompression.
    pub max_body_bytes: usize,
    /// Requests the ingest doors serve at once; beyond it they answer 503 at once.
    pub max_inflight_requests: usize,
    /// Body bytes the ingest doors hold at once (by `Content-Length`, or `max_body_bytes`
    /// for a body of unknown length); beyond it they answer 503 at once.
    pub max_inflight_bytes: usize,
    /// Of `max_inflight_requests`, what one tenant's requests may hold at once; beyond it its
    /// requests (only) are answered 503. Larger than `max_inflight_requests` means all of it.
    pub tenant_inflight_requests: usize,
    /// Of `max_inflight_bytes`, what one tenant's requests may hold at once (their bodies as
    /// declared, and what they inflate to); at least `max_body_bytes`.
    pub tenant_inflight_bytes: usize,
    /// How long a request's body may take to arrive, at any door; past it, 408 (gRPC:
    /// `DEADLINE_EXCEEDED`), and what it held is given back.
    pub body_timeout_secs: u64,
    /// Its connections' bounds: heads' and writes' timeout, connections in all and per
    /// address (flat keys: `header_timeout_secs`, `max_connections`, …).
    #[serde(flatten)]
    pub serving: shared::serve::Serving,
    /// Threads of the large-body lane (`crate::ingest::lane`), at a lower priority than the
    /// runtime's.
    pub lane_threads: usize,
    /// The least size of a body (as sent, or once inflated) that is worked on in the lane
    /// instead of on the runtime's threads.
    pub lane_min_bytes: usize,
    /// Most bodies of one tenant in the lane at once (waiting there or being worked on); the
    /// tenant's next large bodies wait outside the lane, behind other tenants' bodies.
    pub lane_tenant_bodies: usize,
    /// How long a request waits for Kafka to acknowledge its events before answering 503.
    pub produce_timeout_ms: u64,
    /// How far in the future `occurred_at` may be (client clock skew).
    pub max_future_skew_secs: i64,
    /// Upper bound on how old `occurred_at` may be; each tenant's own raw retention
    /// (`control.tenants.raw_retention_days`) applies within it.
    pub retention_days: i64,
    /// Failed logins per account within `login_window_secs` before it is locked out.
    pub login_max_failures: u32,
    /// Failed logins per client address within the window before it is locked out.
    pub login_max_failures_per_ip: u32,
    /// Window (and lockout) length for failed logins.
    pub login_window_secs: u64,
    /// Single sign-on starts (`/v1/auth/sso/start`, which anyone may call: each fetches the
    /// provider's discovery and writes a pending login) per client address per minute.
    pub sso_starts_per_minute: u32,
    /// Password hashes (argon2id, 19 MiB each) that may run at once.
    pub max_concurrent_hashes: usize,
    /// How long a login waits for a free hash slot before it gets 503 with `Retry-After`.
    pub hash_wait_ms: u64,
    /// This service's address as browsers and identity providers reach it (SSO redirects).
    pub public_url: String,
    /// Browser origins allowed to call this API (the dashboard page), comma-separated.
    pub cors_origins: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            common: Common::default(),
            http_addr: "127.0.0.1:8080".into(),
            grpc_addr: "127.0.0.1:4317".into(),
            operations_addr: String::new(),
            max_batch_events: 1000,
            max_body_bytes: 10 * 1024 * 1024,
            max_inflight_requests: 64,
            max_inflight_bytes: 64 * 1024 * 1024,
            tenant_inflight_requests: 32,
            tenant_inflight_bytes: 32 * 1024 * 1024,
            body_timeout_secs: 30,
            serving: shared::serve::Serving::default(),
            lane_threads: 1,
            lane_min_bytes: 1024 * 1024,
            lane_tenant_bodies: 2,
            produce_timeout_ms: 5000,
            max_future_skew_secs: 300,
            retention_days: 90,
            login_max_failures: 5,
            login_max_failures_per_ip: 20,
            login_window_secs: 900,
            sso_starts_per_minute: 60,
            max_concurrent_hashes: 4,
            hash_wait_ms: 2000,
            public_url: "http://127.0.0.1:8080".into(),
            cors_origins: "http://127.0.0.1:8081,http://localhost:8081".into(),
        }
    }
}

impl Config {
    pub fn check(&self) -> Result<(), String> {
        self.common.check()?;
        if self.sso_starts_per_minute == 0 {
            return Err("sso_starts_per_minute must be positive".into());
        }
        if self.max_batch_events == 0 || self.max_body_bytes == 0 {
            return Err("max_batch_events and max_body_bytes must be positive".into());
        }
        if self.max_inflight_requests == 0 || self.max_inflight_bytes < self.max_body_bytes {
            return Err(
                "max_inflight_requests must be positive and max_inflight_bytes at least max_body_bytes"
                    .into(),
            );
        }
        if self.tenant_inflight_requests == 0 || self.tenant_inflight_bytes < self.max_body_bytes {
            return Err(
                "tenant_inflight_requests must be positive and tenant_inflight_bytes at least max_body_bytes"
                    .into(),
            );
        }
        self.serving.check()?;
        if self.body_timeout_secs == 0 {
            return Err("body_timeout_secs must be positive".into());
        }
        if self.lane_threads == 0 || self.lane_min_bytes == 0 || self.lane_tenant_bodies == 0 {
            return Err(
                "lane_threads, lane_min_bytes and lane_tenant_bodies must be positive".into(),
            );
        }
        if self.max_concurrent_hashes == 0 {
            return Err("max_concurrent_hashes must be positive".into());
        }
        if self.produce_timeout_ms < 100 {
            return Err("produce_timeout_ms must be at least 100".into());
        }
        if self.retention_days < 1 || self.max_future_skew_secs < 0 {
            return Err("retention_days must be ≥ 1 and max_future_skew_secs ≥ 0".into());
        }
        Ok(())
    }
}
