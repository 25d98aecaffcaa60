//! `/healthz`, `/readyz`, `/metrics`, `/openapi.json`.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

pub async fn healthz() -> &'static str {
    "ok"
}

/// PostgreSQL reachable (Redis is only a cache); 503 once shutdown starts.
pub async fn readyz(State(s): State<AppState>) -> (StatusCode, Json<Value>) {
    if s.shutdown.is_set() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        );
    }
    let pg = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&s.pool),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let status = if pg {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if pg {"ready"} else {"not ready"}, "postgres": pg})),
    )
}

pub async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../../openapi.json"),
    )
}
