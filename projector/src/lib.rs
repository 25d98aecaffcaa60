//! The projector: consumes the event log exactly once into per-tenant PostgreSQL schemas.
//!
//! - [`consumer`]: the consume loop (decode → batch → write → acknowledge);
//! - [`offsets`]: where each partition stands and resumes, the offsets' compare-and-set, stalls;
//! - [`prepare`]: tenant schemas and partitions made before a batch, version fencing;
//! - [`batch`]: one batch in one transaction, over
//! - [`models`]: the read models, each with its fold and its SQL (raw rows, rollups,
//!   sessions, audit, people, watermark);
//! - [`schema`]: tenant-schema DDL (templates, upgrades, partitions, retention);
//! - [`alerts`]: budgets evaluated after each batch, their notifications delivered;
//! - [`replay`], [`retention`], [`tools`]: `projector replay`, `retention`, `status`, `dlq`.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod batch;
pub mod compactor;
pub mod config;
pub mod consumer;
pub mod housekeeping;
pub mod models;
pub mod offsets;
pub mod prepare;
pub mod replay;
pub mod retention;
pub mod schema;
pub mod tools;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use shared::health::ShutdownFlag;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;

/// Applies the control-schema migrations ([`shared::db::migrate`]), creates the TimescaleDB
/// extension where `timescale` and the server allow it ([`schema::timescale`]), then brings
/// the tenant schemas made by older versions up to date ([`schema::upgrade_all`]). Run where
/// the projector starts and by `projector migrate`.
pub async fn migrate(pool: &PgPool, timescale: schema::timescale::Timescale) -> anyhow::Result<()> {
    shared::db::migrate(pool).await?;
    schema::timescale::ensure_extension(pool, timescale).await?;
    schema::upgrade_all(pool)
        .await
        .context("upgrading tenant schemas")?;
    Ok(())
}

#[derive(Clone)]
struct HttpState {
    pool: PgPool,
    stalls: offsets::Stalls,
    stall_unready: Duration,
    shutdown: ShutdownFlag,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// A built projector, ready to run.
pub struct App {
    listener: TcpListener,
    /// One consume loop for the metric events, one for the auth events.
    projectors: Vec<consumer::Projector>,
    state: HttpState,
    retention_every: Duration,
    ahead_days: i64,
    keep: housekeeping::Keep,
    /// The schemas the metrics loop wrote rollup deltas to, for the compactor.
    dirty: compactor::Dirty,
    compact_every: Duration,
    alerts: Option<alerts::Alerts>,
}

impl App {
    /// Connects, makes sure the topics exist, migrates (tenant schemas too; in the background
    /// until PostgreSQL answers), and binds the HTTP listener.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        config.check().map_err(anyhow::Error::msg)?;
        let metrics = shared::telemetry::prometheus();
        let pool = shared::db::pool(&config.common, "tally-projector")?;
        let common = &config.common;
        shared::kafka::ensure_topics(common, &common.all_topics())
            .await
            .context("creating topics")?;
        // The projector starts while PostgreSQL is down (its batches retry until it answers),
        // so a migration that cannot run now is retried in the background.
        if let Err(e) = migrate(&pool, config.timescale).await {
            tracing::warn!(error = %format!("{e:#}"), "migrations failed; retrying every 5 s");
            let (pool, timescale) = (pool.clone(), config.timescale);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    match migrate(&pool, timescale).await {
                        Ok(()) => return tracing::info!("migrations applied"),
                        Err(e) => {
                            tracing::debug!(error = %format!("{e:#}"), "migrations still failing")
                        }
                    }
                }
            });
        }
        let redis = shared::redis_client::connect(&common.redis_url).await;
        let listener = TcpListener::bind(&config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        let stalls = offsets::Stalls::default();
        let state = HttpState {
            pool: pool.clone(),
            stalls: stalls.clone(),
            stall_unready: Duration::from_secs(config.stall_unready_secs),
            shutdown: ShutdownFlag::default(),
            metrics,
        };
        let mut metrics_loop = consumer::Projector::new(
            config.clone(),
            pool.clone(),
            redis.clone(),
            config.common.metrics_topic(),
            config.common.metrics_dlq_topic(),
            config.consumer_group.clone(),
            stalls.clone(),
        )?;
        let evaluation = alerts::evaluation_pool(&config.common)?;
        let alerts = config.alerts.then(|| alerts::Alerts {
            pool: pool.clone(),
            evaluation,
            touched: alerts::Touched::default(),
            fired: Default::default(),
            dashboard_url: config.dashboard_url.clone(),
            policy: config.common.notify_policy(),
            key: shared::secretbox::SecretKey::from_hex(&config.common.secret_key).ok(),
            redis: redis.clone(),
            seen: Default::default(),
        });
        metrics_loop.alerts = alerts.as_ref().map(|a| a.touched.clone());
        let dirty = compactor::Dirty::default();
        metrics_loop.dirty = Some(dirty.clone());
        let auth_loop = consumer::Projector::new(
            config.clone(),
            pool,
            redis,
            config.common.auth_topic(),
            config.common.auth_dlq_topic(),
            format!("{}-auth", config.consumer_group),
            stalls,
        )?;
        Ok(App {
            listener,
            projectors: vec![metrics_loop, auth_loop],
            state,
            retention_every: Duration::from_secs(config.retention_interval_secs.max(1)),
            ahead_days: config.partitions_ahead_days,
            keep: config.keep(),
            dirty,
            compact_every: Duration::from_millis(config.compact_interval_ms.max(1)),
            alerts,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// Runs until `stop` fires (SIGTERM in `main`): then stops consuming, commits the batch
    /// in hand and returns.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            stop.await;
            let _ = tx.send(true);
        });
        let router = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route(
                "/metrics",
                get(|State(s): State<HttpState>| async move { s.metrics.render() }),
            )
            .with_state(self.state.clone());
        let mut http_stop = rx.clone();
        // The projector's port is its operations port.
        let connections = shared::serve::Serving::OPERATIONS.connections();
        let server = shared::serve::serve_as(
            "operations",
            self.listener,
            router,
            connections,
            async move {
                let _ = http_stop.changed().await;
            },
        );
        let http = tokio::spawn(server);
        let retention = tokio::spawn(retention::run_periodically(
            self.state.pool.clone(),
            self.retention_every,
            self.ahead_days,
            self.keep,
            rx.clone(),
        ));
        let compacting = tokio::spawn(compactor::run(
            self.state.pool.clone(),
            self.dirty,
            self.compact_every,
            rx.clone(),
        ));
        let alerting = self.alerts.map(|a| alerts::spawn(a, rx.clone()));
        let loops = self
            .projectors
            .into_iter()
            .map(|p| p.run(rx.clone(), self.state.shutdown.clone()));
        let result = futures::future::try_join_all(loops).await.map(|_| ());
        let _ = http.await;
        let _ = retention.await;
        let _ = compacting.await;
        for task in alerting.into_iter().flatten() {
            let _ = task.await;
        }
        self.state.pool.close().await;
        result
    }
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, String) {
    if s.shutdown.is_set() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down".into());
    }
    let stalled = s.stalls.longer_than(s.stall_unready);
    if !stalled.is_empty() {
        let parts: Vec<String> = stalled
            .iter()
            .map(|(topic, st)| {
                format!(
                    "{topic} partitions {:?} stalled for {} s: {}",
                    st.partitions,
                    st.since.elapsed().as_secs(),
                    st.error
                )
            })
            .collect();
        return (StatusCode::SERVICE_UNAVAILABLE, parts.join("\n"));
    }
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&s.pool),
    )
    .await;
    match db {
        Ok(Ok(_)) => (StatusCode::OK, "ready".into()),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "postgres unreachable".into(),
        ),
    }
}
