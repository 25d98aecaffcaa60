pub mod auth;
pub mod control;
pub mod events;
pub mod health;
pub mod influx;
pub mod invitations;
pub mod otlp;
pub mod promrw;
pub mod sso;

use axum::body::Body;
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use shared::problem::Problem;

/// Refuses a JSON body of the control plane and auth routes with NUL in a string or key (422
/// naming it): PostgreSQL cannot store NUL in text, and would fail the write (a 500 for the
/// sender's fault). The ingest doors check their events themselves. Reads at most `limit`
/// bytes (the route group's body limit), answering 413 beyond.
pub async fn refuse_nul(request: Request, next: Next, limit: usize) -> Response {
    let json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("application/json"));
    let path = request.uri().path();
    let door = ["/v1/events", "/v1/otlp/", "/api/"]
        .iter()
        .any(|p| path.starts_with(p));
    if !json || door {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, limit).await else {
        return Problem::too_large(limit).into_response();
    };
    // NUL can only come escaped: JSON forbids raw control characters in strings.
    if bytes.windows(6).any(|w| w == b"\\u0000") {
        if let Some(field) = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|v| nul_path(&v))
        {
            return Problem::invalid_field(&field, "must not contain NUL").into_response();
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The path of the first string or key holding NUL (`name`, `teams[2]`), if any.
fn nul_path(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if s.contains('\0') => Some(String::new()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v).map(|rest| format!("[{i}]{}", dotted(&rest)))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            if k.contains('\0') {
                Some(k.replace('\0', "\\0"))
            } else {
                nul_path(v).map(|rest| format!("{k}{}", dotted(&rest)))
            }
        }),
        _ => None,
    }
}

fn dotted(rest: &str) -> String {
    if rest.is_empty() || rest.starts_with('[') {
        rest.to_string()
    } else {
        format!(".{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_path_of_a_nul_names_the_field() {
        assert_eq!(
            nul_path(&json!({"name": "a\u{0}b"})).as_deref(),
            Some("name")
        );
        assert_eq!(
            nul_path(&json!({"email": "x", "teams": ["ok", "\u{0}"]})).as_deref(),
            Some("teams[1]")
        );
        assert_eq!(
            nul_path(&json!({"a": [{"b\u{0}": 1}]})).as_deref(),
            Some("a[0].b\\0")
        );
        assert_eq!(nul_path(&json!({"name": "fine", "n": [1, null]})), None);
    }
}
