//! `/healthz`, `/readyz`, `/metrics`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rdkafka::producer::Producer;
use serde_json::{json, Value};

use crate::state::AppState;

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The process is alive; touches nothing.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Kafka, PostgreSQL and Redis reachable (each with a timeout); 503 once shutdown starts.
pub async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<Value>) {
    if s.shutdown.is_set() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        );
    }
    let pg = tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&s.pool))
        .await
        .is_ok_and(|r| r.is_ok());
    let producer = s.producer.clone();
    let kafka = tokio::task::spawn_blocking(move || {
        producer
            .client()
            .fetch_metadata(None, PROBE_TIMEOUT)
            .is_ok()
    })
    .await
    .unwrap_or(false);
    let redis = match s.redis.clone() {
        Some(mut r) => tokio::time::timeout(
            PROBE_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut r),
        )
        .await
        .is_ok_and(|r| r.is_ok()),
        None => false,
    };
    // Redis only carries rate limits, which fall back to a local limiter: not a readiness gate.
    let ready = pg && kafka;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"status": if ready {"ready"} else {"not ready"}, "postgres": pg, "kafka": kafka, "redis": redis}),
        ),
    )
}

pub async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

pub async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
}
