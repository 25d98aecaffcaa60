//! ingest-api: the write side. Authenticates, validates and appends events to Kafka, and
//! answers only once Kafka has them.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod error;
pub mod extract;
pub mod formats;
pub mod grpc;
pub mod ingest;
pub mod keys;
pub mod oidc;
pub mod outbox;
pub mod password;
pub mod relay;
pub mod routes;
pub mod secrets;
pub mod shed;
pub mod state;
pub mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, patch, post, put};
use axum::Router;
use rdkafka::producer::Producer;
use shared::auth::ApiKeyStore;
use shared::health::ShutdownFlag;
use tokio::net::TcpListener;

pub use config::Config;
use state::AppState;

/// The dashboard page (served by query-api) signs in here from the browser.
fn cors(origins: &str) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    let origins: Vec<HeaderValue> = origins
        .split(',')
        .filter_map(|o| HeaderValue::from_str(o.trim()).ok())
        .collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
        // A page's next page, and how long a refused sign-in waits, are for the page to read.
        .expose_headers([header::LINK, header::RETRY_AFTER])
}

/// Largest body of the sign-in routes (`/v1/auth/*`): a login, a refresh token, a new
/// password, an accepted invitation. They answer anyone, so they read little.
pub const AUTH_BODY_BYTES: usize = 16 * 1024;
/// Largest body of the control plane (`/v1/admin/*`); a team of a thousand members fits.
pub const ADMIN_BODY_BYTES: usize = 64 * 1024;

/// Gives `routes` a body limit of `limit` bytes: a body that declares a larger length is
/// refused before any of it is read, and one that does not is read no further than the limit
/// (413 too). A JSON body with NUL in a string is refused with 422 ([`routes::refuse_nul`]).
fn body_limit(routes: Router<AppState>, limit: usize) -> Router<AppState> {
    routes
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                use axum::response::IntoResponse;
                use http_body::Body;
                if request.body().size_hint().lower() > limit as u64 {
                    return shared::problem::Problem::too_large(limit).into_response();
                }
                routes::refuse_nul(request, next, limit).await
            },
        ))
}

/// The most OTLP/gRPC streams one connection may have open at once.
const GRPC_STREAMS_PER_CONNECTION: u32 = 64;

/// How often an OTLP/gRPC connection is pinged, and how long its answer may take before the
/// connection is closed as gone.
const GRPC_PING_INTERVAL: Duration = Duration::from_secs(60);
const GRPC_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How old an OTLP/gRPC connection grows before it is asked to close (its streams finish
/// first; clients open another).
const GRPC_CONNECTION_AGE: Duration = Duration::from_secs(600);

/// A built ingest-api, bound to its port.
pub struct App {
    listener: TcpListener,
    grpc_listener: Option<TcpListener>,
    operations: shared::serve::OperationsPort,
    state: AppState,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        config.check().map_err(anyhow::Error::msg)?;
        let common = &config.common;
        let pool = shared::db::pool(common, "tally-ingest-api")?;
        shared::kafka::ensure_topics(common, &common.all_topics())
            .await
            .context("creating topics")?;
        let producer =
            shared::kafka::producer(common, Duration::from_millis(config.produce_timeout_ms))?;
        let redis = shared::redis_client::connect(&common.redis_url).await;
        shared::db::migrate(&pool)
            .await
            .context("applying migrations")?;
        let keyring = keys::KeyRing::load(&pool)
            .await
            .context("loading signing keys")?;
        keyring.reload_periodically(pool.clone());
        let outbox_wake = Arc::new(tokio::sync::Notify::new());
        relay::spawn(
            pool.clone(),
            producer.clone(),
            common.auth_topic(),
            common.topic_prefix.clone(),
            outbox_wake.clone(),
        );
        let listener = TcpListener::bind(&config.http_addr)
            .await
            .with_context(|| format!("binding {}", config.http_addr))?;
        let grpc_listener = shared::serve::bind_if_set(&config.grpc_addr, "grpc_addr").await?;
        let operations = shared::serve::OperationsPort::bind(&config.operations_addr).await?;
        let state = AppState {
            sink: Arc::new(ingest::sink::KafkaSink::new(
                producer.clone(),
                common.metrics_topic(),
                Duration::from_millis(config.produce_timeout_ms),
            )),
            keys: Arc::new(ApiKeyStore::new(pool.clone(), config.serving.by_address())),
            limiter: shared::ratelimit::RateLimiter::new(redis.clone()),
            event_limiter: shared::ratelimit::RateLimiter::events(redis.clone()),
            keyring,
            outbox_wake,
            oidc: oidc::Providers::new(common.notify_policy()),
            throttle: throttle::LoginThrottle::new(
                redis.clone(),
                &common.topic_prefix,
                config.login_max_failures,
                config.login_max_failures_per_ip,
                Duration::from_secs(config.login_window_secs),
            ),
            // Every start counts (none is given back), per address; the "account" is the
            // tenant, never limited here (a tenant's sign-on must not be stopped by others).
            sso_starts: throttle::LoginThrottle::new(
                redis.clone(),
                &format!("{}sso-start:", common.topic_prefix),
                u32::MAX,
                config.sso_starts_per_minute,
                Duration::from_secs(60),
            ),
            shed: shed::Shed::new(shed::Limits {
                requests: config.max_inflight_requests,
                bytes: config.max_inflight_bytes,
                tenant_requests: config.tenant_inflight_requests,
                tenant_bytes: config.tenant_inflight_bytes,
                max_body: config.max_body_bytes,
            }),
            webhooks: routes::webhooks::budget(),
            lane: ingest::lane::Lane::start(
                config.lane_threads,
                config.lane_min_bytes,
                config.lane_tenant_bodies,
            ),
            hashes: throttle::HashSlots::new(
                config.max_concurrent_hashes,
                Duration::from_millis(config.hash_wait_ms),
            ),
            pool,
            producer,
            redis,
            shutdown: ShutdownFlag::default(),
            metrics: shared::telemetry::prometheus(),
            config: Arc::new(config),
        };
        Ok(App {
            listener,
            grpc_listener,
            operations,
            state,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    /// The OTLP/gRPC address, unless it is turned off.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
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
        // The ingest doors read the raw body themselves, within `max_body_bytes` as sent and
        // once decompressed (`ingest::door::read_body`), holding their share of the in-flight
        // budget once their key is known (`shed`).
        let doors = Router::new()
            .route("/v1/events", post(routes::events::post_events))
            .route("/api/v2/write", post(routes::influx::write))
            .route("/api/v1/write", post(routes::promrw::write))
            .route("/v1/otlp/v1/metrics", post(routes::otlp::metrics))
            .route("/v1/otlp/v1/logs", post(routes::otlp::logs))
            .route(
                "/v1/webhooks/github/{tenant}",
                post(routes::webhooks::github),
            )
            .route(
                "/v1/webhooks/gitlab/{tenant}",
                post(routes::webhooks::gitlab),
            );
        let auth = Router::new()
            .route("/v1/auth/login", post(routes::auth::login))
            .route("/v1/auth/refresh", post(routes::auth::refresh))
            .route("/v1/auth/logout", post(routes::auth::logout))
            .route("/v1/auth/logout-all", post(routes::auth::logout_all))
            .route("/v1/auth/password", post(routes::auth::change_password))
            .route("/.well-known/jwks.json", get(routes::auth::jwks))
            .route(
                "/v1/auth/invitations/accept",
                post(control::invitations::accept),
            )
            .route("/v1/auth/sso/start", get(routes::sso::start))
            .route("/v1/auth/sso/callback", get(routes::sso::callback))
            .route("/v1/auth/sso/link", post(routes::sso::link));
        let admin = Router::new()
            .route(
                "/v1/admin/invitations",
                post(control::invitations::invite).get(control::invitations::list),
            )
            .route(
                "/v1/admin/invitations/{id}",
                delete(control::invitations::revoke),
            )
            .route(
                "/v1/admin/sso",
                put(routes::sso::put_settings).get(routes::sso::get_settings),
            )
            .route(
                "/v1/admin/tenants",
                post(control::http::create_tenant).get(control::http::list_tenants),
            )
            .route(
                "/v1/admin/tenants/{id}",
                patch(control::http::update_tenant),
            )
            .route(
                "/v1/admin/users",
                post(control::http::create_user).get(control::http::list_users),
            )
            .route(
                "/v1/admin/users/{id}",
                patch(control::http::update_user).delete(control::http::remove_user),
            )
            .route("/v1/admin/teams", get(control::http::list_teams))
            .route(
                "/v1/admin/teams/{key}",
                put(control::http::put_team).delete(control::http::delete_team),
            )
            .route(
                "/v1/admin/api-keys",
                post(control::http::create_api_key).get(control::http::list_api_keys),
            )
            .route(
                "/v1/admin/api-keys/{id}",
                delete(control::http::revoke_api_key),
            )
            .route(
                "/v1/admin/settings",
                get(control::alerts::get_settings).patch(control::alerts::set_settings),
            )
            .route(
                "/v1/admin/channels",
                post(control::alerts::create_channel).get(control::alerts::list_channels),
            )
            .route(
                "/v1/admin/channels/{id}",
                delete(control::alerts::delete_channel),
            )
            .route(
                "/v1/admin/channels/{id}/rotate-secret",
                post(control::alerts::rotate_secret),
            )
            .route(
                "/v1/admin/channels/{id}/resume",
                post(control::alerts::resume_channel),
            )
            .route(
                "/v1/admin/budgets",
                post(control::alerts::create_budget).get(control::alerts::list_budgets),
            )
            .route(
                "/v1/admin/budgets/{id}",
                get(control::alerts::get_budget)
                    .put(control::alerts::update_budget)
                    .delete(control::alerts::delete_budget),
            )
            .route(
                "/v1/admin/rules",
                post(control::rules::create).get(control::rules::list),
            )
            .route(
                "/v1/admin/rules/{id}",
                get(control::rules::get)
                    .put(control::rules::update)
                    .delete(control::rules::delete),
            )
            .route("/v1/admin/firings", get(control::alerts::list_firings))
            .route("/v1/admin/integrations", get(control::integrations::list))
            .route(
                "/v1/admin/integrations/{provider}",
                put(control::integrations::put).delete(control::integrations::delete),
            )
            .route(
                "/v1/admin/deliveries",
                get(control::alerts::list_deliveries),
            )
            .route(
                "/v1/admin/deliveries/{id}/redeliver",
                post(control::alerts::redeliver),
            );
        let operations = Self::health().route("/openapi.json", get(routes::health::openapi));
        Router::new()
            .merge(doors)
            .merge(body_limit(auth, AUTH_BODY_BYTES))
            .merge(body_limit(admin, ADMIN_BODY_BYTES))
            .merge(body_limit(operations, 0))
            .fallback(shared::problem::not_found_fallback)
            .method_not_allowed_fallback(shared::problem::method_not_allowed_fallback)
            .layer(cors(&state.config.cors_origins))
            .layer(axum::middleware::from_fn(shared::telemetry::track_http))
            .with_state(state)
    }

    /// Serves until `stop` resolves; then turns unready, drains requests and flushes the
    /// producer so nothing acknowledged is left behind.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let shutdown = state.shutdown.clone();
        let (stopped, mut stopping) = tokio::sync::watch::channel(false);
        // Both listeners' connections share one bound, and each peer's share of it.
        let connections = state.config.serving.connections();
        let operations = self.operations.spawn(Self::health(), state.clone());
        let grpc = self.grpc_listener.map(|listener| {
            let mut stopping = stopped.subscribe();
            // A connection's streams at once are bounded (tonic's default is none); each
            // stream holds its tenant's share once its key is known (`grpc`). A peer that
            // went away without closing is found by the pings and its places given back; a
            // connection is asked to close (and its client to open another) once it is old,
            // so that an idle one does not hold its place for good.
            let server = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(GRPC_STREAMS_PER_CONNECTION))
                .http2_keepalive_interval(Some(GRPC_PING_INTERVAL))
                .http2_keepalive_timeout(Some(GRPC_PING_TIMEOUT))
                .max_connection_age(GRPC_CONNECTION_AGE)
                .add_service(grpc::OtlpService::<crate::formats::otlp::Metrics>::new(
                    state.clone(),
                ))
                .add_service(grpc::OtlpService::<crate::formats::otlp::Logs>::new(
                    state.clone(),
                ))
                .serve_with_incoming_shutdown(
                    grpc::incoming(listener, connections.clone()),
                    async move {
                        let _ = stopping.wait_for(|s| *s).await;
                    },
                );
            tokio::spawn(server)
        });
        tokio::spawn(async move {
            stop.await;
            shutdown.trigger();
            let _ = stopped.send(true);
        });
        shared::serve::serve(
            self.listener,
            Self::router(state.clone()),
            connections,
            async move {
                let _ = stopping.wait_for(|s| *s).await;
            },
        )
        .await?;
        if let Some(grpc) = grpc {
            grpc.await?.context("OTLP/gRPC server")?;
        }
        let producer = state.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(10))).await??;
        state.pool.close().await;
        // Probes read `/readyz`'s 503 until the end.
        operations.stop().await.context("operations port")?;
        Ok(())
    }
}
