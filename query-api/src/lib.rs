//! query-api: the read side. Serves dashboards from the projections only.
#![forbid(unsafe_code)]

/// Static SQL per rollup grain of a rollup family — `activity` (per key, the default),
/// `activity_all` (the whole tenant), `active_users` — (the table is picked from a closed
/// set, never formatted). Every such query has the range's bounds as `$1` and `$2`.
///
/// The per-key family reads whole hours and days through `activity_whole_hours` and
/// `activity_whole_days` (tenant template 0014), which find their pending minute rows by the
/// minute's bucket.
macro_rules! by_grain {
    ($grain:expr, $before:literal, $after:literal) => {
        match $grain {
            crate::range::Grain::Hour => concat!($before, "activity_whole_hours($1, $2)", $after),
            crate::range::Grain::Day => concat!($before, "activity_whole_days($1, $2)", $after),
            grain => by_grain!(grain, "activity", $before, $after),
        }
    };
    ($grain:expr, $family:literal, $before:literal, $after:literal) => {
        match $grain {
            crate::range::Grain::Minute => concat!($before, $family, "_1m", $after),
            crate::range::Grain::Hour => concat!($before, $family, "_1h", $after),
            crate::range::Grain::Day => concat!($before, $family, "_1d", $after),
            crate::range::Grain::HourSpans => concat!($before, $family, "_hours($1, $2)", $after),
            crate::range::Grain::DaySpans => concat!($before, $family, "_days($1, $2)", $after),
        }
    };
}

pub mod auth;
pub mod cache;
pub mod config;
pub use shared::cursor;
pub mod hub;
pub mod range;
pub mod read;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::{get, post};
use axum::Router;
use shared::health::ShutdownFlag;
use shared::jwt::{KeySource, Verifier};
use tokio::net::TcpListener;

use auth::Authenticator;
pub use config::Config;
use state::AppState;

/// The read pool: like every service's, plus a `statement_timeout` on each connection, so
/// that no statement of any request (nor a wait for a lock) runs longer than configured.
fn pool(config: &Config) -> Result<sqlx::PgPool, sqlx::Error> {
    shared::db::bounded_pool(
        &config.common,
        "tally-query-api",
        config.common.db_max_connections,
        std::time::Duration::from_millis(config.statement_timeout_ms),
    )
}

/// How long a read waits for a database connection (the pool's, or its tenant's share).
const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A built query-api, bound to its port.
pub struct App {
    listener: TcpListener,
    operations: shared::serve::OperationsPort,
    state: AppState,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        config.check().map_err(anyhow::Error::msg)?;
        let pool = pool(&config)?;
        let cache = cache::Cache::connect(
            &config.common.redis_url,
            config.cache_ttl_secs,
            config.cache_tenant_bytes,
        )
        .await;
        let limiter = shared::ratelimit::RateLimiter::reads(
            shared::redis_client::connect(&config.common.redis_url).await,
        );
        let listener = TcpListener::bind(&config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        let operations = shared::serve::OperationsPort::bind(&config.operations_addr).await?;
        let hub = hub::Hub::default();
        hub.listen(config.common.redis_url.clone());
        let verifier = Verifier::new(KeySource::Url(config.jwks_url.clone()));
        let connections = config
            .tenant_db_connections
            .min(config.common.db_max_connections);
        let state = AppState {
            shares: read::tenant::Shares::new(connections as usize, ACQUIRE_TIMEOUT),
            auth: Authenticator::new(pool.clone(), verifier, config.serving.by_address()),
            hub,
            pool,
            cache,
            limiter,
            shutdown: ShutdownFlag::default(),
            metrics: shared::telemetry::prometheus(),
            config: Arc::new(config),
        };
        Ok(App {
            listener,
            operations,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// The operations port's address, unless it is turned off.
    pub fn operations_addr(&self) -> Option<SocketAddr> {
        self.operations.addr()
    }

    /// Health and metrics: on the public port, and on the operations port alone.
    fn health() -> Router<AppState> {
        Router::new()
            .route("/healthz", get(routes::health::healthz))
            .route("/readyz", get(routes::health::readyz))
            .route("/metrics", get(routes::health::metrics))
    }

    pub fn router(state: AppState) -> Router {
        Router::new()
            .route("/v1/dashboard/access", get(routes::access::access))
            .route("/v1/dashboard/overview", get(routes::dashboard::overview))
            .route(
                "/v1/dashboard/timeseries",
                get(routes::dashboard::timeseries),
            )
            .route("/v1/dashboard/top", get(routes::explore::top))
            .route("/v1/dashboard/sessions", get(routes::tables::sessions))
            .route(
                "/v1/dashboard/sessions/{id}/timeline",
                get(routes::timeline::timeline),
            )
            .route("/v1/dashboard/metrics", get(routes::tables::metrics))
            .route(
                "/v1/dashboard/productivity",
                get(routes::people::productivity),
            )
            .route("/v1/dashboard/teams", get(routes::people::teams))
            .route("/v1/dashboard/activity", get(routes::explore::activity))
            .route(
                "/v1/dashboard/repositories",
                get(routes::repos::repositories),
            )
            .route(
                "/v1/dashboard/repositories/series",
                get(routes::repos::repository_series),
            )
            .route(
                "/v1/dashboard/pull-requests",
                get(routes::repos::pull_requests),
            )
            .route(
                "/v1/dashboard/pull-requests/weekly",
                get(routes::repos::weekly),
            )
            .route("/v1/audit", get(routes::audit::audit))
            .route("/v1/budgets", get(routes::budgets::list))
            .route("/v1/budgets/{id}", get(routes::budgets::get))
            .route("/v1/firings", get(routes::budgets::firings))
            .route("/v1/stream", get(routes::stream::stream))
            .route(
                "/mcp",
                post(routes::mcp::post)
                    .get(routes::mcp::not_allowed)
                    .delete(routes::mcp::not_allowed),
            )
            .route("/", get(routes::health::dashboard))
            .route("/dashboard", get(routes::health::dashboard))
            .route("/dashboard.js", get(routes::health::dashboard_js))
            .route("/vendor/uplot.js", get(routes::health::uplot_js))
            .route("/vendor/uplot.css", get(routes::health::uplot_css))
            .route("/openapi.json", get(routes::health::openapi))
            .merge(Self::health())
            .fallback(shared::problem::not_found_fallback)
            .method_not_allowed_fallback(shared::problem::method_not_allowed_fallback)
            .layer(axum::middleware::from_fn(routes::refuse_nul))
            .layer(axum::middleware::from_fn(read::encoding::negotiate))
            .layer(axum::middleware::from_fn(shared::telemetry::track_http))
            .with_state(state)
    }

    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
        let stopping = async move {
            stop.await;
            shutdown.trigger();
        };
        let operations = self.operations.spawn(Self::health(), state.clone());
        shared::serve::serve(
            self.listener,
            Self::router(state.clone()),
            state.config.serving.connections(),
            stopping,
        )
        .await?;
        state.pool.close().await;
        // Probes read `/readyz`'s 503 until the end.
        operations.stop().await.context("operations port")?;
        Ok(())
    }
}
