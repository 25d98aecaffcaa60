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
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use shared::problem::Problem;

/// Refuses a request of the control plane and auth routes with NUL in its path, its query or
/// a string or key of its JSON body (422 naming where): PostgreSQL cannot store NUL in text,
/// and would fail the statement (a 500 for the sender's fault). Every body is looked at,
/// whatever its declared type: axum's `Json` takes `application/json` and any
/// `application/*+json` too. It runs inside the body limit of the auth and control-plane route
/// groups (the ingest doors check their events themselves). Reads at most `limit` bytes,
/// answering 413 beyond.
pub async fn refuse_nul(request: Request, next: Next, limit: usize) -> Response {
    let uri = request.uri();
    for (field, text) in [("path", Some(uri.path())), ("query", uri.query())] {
        if text.is_some_and(holds_nul) {
            return Problem::invalid_field(field, "must not hold NUL (%00)").into_response();
        }
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

/// Whether a path or query, percent-encoded as sent, decodes to NUL anywhere.
fn holds_nul(encoded: &str) -> bool {
    encoded
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_is_found_in_a_path_or_query_as_sent() {
        assert!(holds_nul("/v1/admin/teams/a%00b"));
        assert!(holds_nul("cursor=%00"));
        assert!(
            !holds_nul("/v1/admin/teams/a%2500b"),
            "an escaped % then 00"
        );
        assert!(!holds_nul("/v1/admin/teams/100%25"));
        assert!(!holds_nul("a=%0A&b=%20"));
    }

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
