//! The state every handler shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::producer::FutureProducer;
use shared::health::ShutdownFlag;
use sqlx::PgPool;

use crate::config::Config;
use crate::ingest::door::Keys;
use crate::ingest::sink::EventSink;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
    /// The shared producer (the readiness probe and the flush on shutdown use it).
    pub producer: FutureProducer,
    /// Where the ingest doors append accepted events.
    pub sink: Arc<dyn EventSink>,
    pub redis: Option<redis::aio::ConnectionManager>,
    pub keys: Arc<dyn Keys>,
    pub limiter: shared::ratelimit::RateLimiter,
    /// Counts each tenant's events against its events a minute (`KeyPrincipal::events_per_min`).
    pub event_limiter: shared::ratelimit::RateLimiter,
    pub keyring: crate::keys::KeyRing,
    pub throttle: crate::throttle::LoginThrottle,
    /// Counts single sign-on starts per client address (`sso_starts_per_minute`).
    pub sso_starts: crate::throttle::LoginThrottle,
    /// What the ingest doors may hold at once (load shedding).
    pub shed: crate::shed::Shed,
    /// What webhook deliveries may hold at once (a budget apart from the doors').
    pub webhooks: crate::shed::Shed,
    /// Where large bodies are worked on.
    pub lane: crate::ingest::lane::Lane,
    /// Bounds the password hashes running at once.
    pub hashes: crate::throttle::HashSlots,
    /// Wakes the outbox relay after a handler wrote an auth event.
    pub outbox_wake: Arc<tokio::sync::Notify>,
    /// How identity providers are reached (the notification address policy, no redirects).
    pub oidc: crate::oidc::Providers,
    pub shutdown: ShutdownFlag,
    pub metrics: PrometheusHandle,
}

impl AppState {
    /// How long a request's body may take to arrive.
    pub fn body_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.config.body_timeout_secs)
    }
}
