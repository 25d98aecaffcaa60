//! The state every handler shares.

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use shared::auth::ApiKeyStore;
use shared::health::ShutdownFlag;
use sqlx::PgPool;

use crate::cache::Cache;
use crate::config::Config;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub keys: ApiKeyStore,
    pub verifier: shared::jwt::Verifier,
    pub users: crate::auth::UserCache,
    pub hub: crate::routes::stream::Hub,
    pub cache: Cache,
    pub shutdown: ShutdownFlag,
    pub metrics: PrometheusHandle,
}
