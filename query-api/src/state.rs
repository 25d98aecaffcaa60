//! The state every handler shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use shared::health::ShutdownFlag;
use sqlx::PgPool;

use crate::auth::Authenticator;
use crate::cache::Cache;
use crate::config::Config;
use crate::hub::Hub;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
    /// Each tenant's share of the pool's connections.
    pub shares: crate::read::tenant::Shares,
    pub auth: Authenticator,
    pub hub: Hub,
    pub cache: Cache,
    /// Read requests per tenant and minute.
    pub limiter: shared::ratelimit::RateLimiter,
    pub shutdown: ShutdownFlag,
    pub metrics: PrometheusHandle,
}

#[cfg(test)]
impl AppState {
    /// A state whose database and Redis are never there: for tests of what a request decides
    /// before it reads anything. Access tokens are checked with `verifier`.
    pub(crate) fn unconnected(verifier: shared::jwt::Verifier) -> AppState {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(100))
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .expect("a valid URL");
        AppState {
            config: Arc::new(Config::default()),
            auth: Authenticator::new(pool.clone(), verifier, true),
            shares: crate::read::tenant::Shares::new(8, std::time::Duration::from_millis(100)),
            pool,
            hub: Hub::default(),
            cache: Cache::none(),
            limiter: shared::ratelimit::RateLimiter::reads(None),
            shutdown: ShutdownFlag::default(),
            metrics: metrics_exporter_prometheus::PrometheusBuilder::new()
                .build_recorder()
                .handle(),
        }
    }
}
