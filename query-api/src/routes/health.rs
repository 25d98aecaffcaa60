//! `/healthz`, `/readyz`, `/metrics`, `/openapi.json`.

use std::sync::OnceLock;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::read::encoding;
use crate::state::AppState;

/// A file served from the binary, packed ([`encoding::pack`]) and tagged once, on first use.
type Asset = OnceLock<(Vec<u8>, HeaderValue)>;

/// `text` as sent: packed, with its `ETag` (a hash of the text), so that a browser that
/// revalidates it gets 304 until the service is upgraded.
fn asset(
    once: &'static Asset,
    text: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
) -> Response {
    let (stored, tag) = once.get_or_init(|| {
        (
            encoding::pack(text.as_bytes().to_vec()),
            encoding::etag(text.as_bytes()),
        )
    });
    let body = Body::from(Bytes::from_static(stored));
    let packed = encoding::is_packed(stored);
    encoding::sent_as_stored(body, packed, content_type, cache_control, Some(tag.clone()))
}

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

pub async fn openapi() -> Response {
    static ONCE: Asset = OnceLock::new();
    let text = include_str!("../../openapi.json");
    asset(&ONCE, text, "application/json", "no-cache")
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
pub async fn dashboard_js() -> Response {
    static ONCE: Asset = OnceLock::new();
    let text = include_str!("../../assets/dashboard.js");
    asset(&ONCE, text, "text/javascript; charset=utf-8", "no-cache")
}

/// `GET /vendor/uplot.js`: the dashboard's charting library (uPlot, MIT; the version pinned in
/// `assets/package-lock.json`), served from the binary: no other host, no build step.
pub async fn uplot_js() -> Response {
    static ONCE: Asset = OnceLock::new();
    let text = include_str!("../../assets/node_modules/uplot/dist/uPlot.iife.min.js");
    let cache = "public, max-age=86400";
    asset(&ONCE, text, "text/javascript; charset=utf-8", cache)
}

/// `GET /vendor/uplot.css`: its style sheet.
pub async fn uplot_css() -> Response {
    static ONCE: Asset = OnceLock::new();
    let text = include_str!("../../assets/node_modules/uplot/dist/uPlot.min.css");
    asset(
        &ONCE,
        text,
        "text/css; charset=utf-8",
        "public, max-age=86400",
    )
}
