pub mod auth;
pub mod events;
pub mod health;
pub mod influx;
pub mod otlp;
pub mod promrw;
pub mod sso;
pub mod webhooks;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use shared::problem::Problem;

/// Refuses a JSON body of the control plane and auth routes with NUL in a string or key (422
/// naming it): PostgreSQL cannot store NUL in text, and would fail the write (a 500 for the
/// sender's fault). It runs inside the body limit of the auth and control-plane route groups
/// (the ingest doors check their events themselves). Reads at most `limit` bytes, answering
/// 413 beyond.
pub async fn refuse_nul(request: Request, next: Next, limit: usize) -> Response {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("application/json"));
    if !json {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return Problem::too_large(limit).into_response();
    };
    // NUL can only come escaped: JSON forbids raw control characters in strings.
    if bytes.windows(6).any(|w| w == b"\\u0000") {
        if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
            let errors = crate::ingest::storable::unstorable_paths(&v, "");
            if !errors.is_empty() {
                return Problem::validation("a string of the body holds NUL", errors)
                    .into_response();
            }
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_path_of_a_nul_names_the_field() {
        let fields = |v: Value| -> Vec<String> {
            crate::ingest::storable::unstorable_paths(&v, "")
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        assert_eq!(fields(json!({"name": "a\u{0}b"})), ["name"]);
        assert_eq!(
            fields(json!({"email": "x", "teams": ["ok", "\u{0}"]})),
            ["teams[1]"]
        );
        assert_eq!(fields(json!({"a": [{"b\u{0}": 1}]})), ["a[0].b\\u0000"]);
        assert!(fields(json!({"name": "fine", "n": [1, null]})).is_empty());
    }
}
