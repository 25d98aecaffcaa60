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

/// `GET /`: the dashboard page (dependency-free HTML and JavaScript).
pub async fn dashboard(
    axum::extract::State(s): axum::extract::State<AppState>,
) -> impl IntoResponse {
    let ingest = s
        .config
        .ingest_url
        .trim_end_matches('/')
        .replace(['"', '\\', '<'], "");
    let page = include_str!("../../assets/dashboard.html").replace("__TALLY_INGEST_URL__", &ingest);
    let csp = format!(
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
         connect-src 'self' {ingest}; img-src 'self' data:; frame-ancestors 'none'"
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
            (header::CONTENT_SECURITY_POLICY, csp),
        ],
        page,
    )
}

/// `GET /dashboard.js`: the dashboard page's script (a file of its own: the page's CSP allows
/// no inline script).
pub async fn dashboard_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../assets/dashboard.js"),
    )
}

/// `GET /vendor/uplot.js`: the dashboard's charting library (uPlot, MIT; the version pinned in
/// `assets/package-lock.json`), served from the binary: no other host, no build step.
pub async fn uplot_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../../assets/node_modules/uplot/dist/uPlot.iife.min.js"),
    )
}

/// `GET /vendor/uplot.css`: its style sheet.
pub async fn uplot_css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        include_str!("../../assets/node_modules/uplot/dist/uPlot.min.css"),
    )
}
