//! The ingest doors' one error: each variant knows its HTTP answer (`application/problem+json`)
//! and the gRPC status an OTLP sender acts on, so neither transport guesses one from the other.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use shared::auth::{KeyError, KEY_CHECK_RETRY_SECS};
use shared::events::FieldError;
use shared::problem::Problem;
use tonic::{Code, Status};
use uuid::Uuid;

use shared::ratelimit::Decision;

/// Why an ingest request was not taken.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// No key, or an unknown or revoked one (401).
    #[error("unauthenticated: {}", .0.detail)]
    Unauthenticated(Problem),
    /// A key without the scope the door needs (403).
    #[error("forbidden: {}", .0.detail)]
    Forbidden(Problem),
    /// The tenant's rate limit (429 with `Retry-After`); senders retry.
    #[error("rate limited: {} per minute", .0.limit)]
    RateLimited(Decision),
    /// The request or its data is wrong, and sending it again cannot help (400, 413, 415,
    /// 422; the problem says which and names the fields).
    #[error("rejected: {}", .0.detail)]
    Rejected(Problem),
    /// The event log or the key store cannot take the request now (503 with `Retry-After`);
    /// a resend with the same event ids is counted once.
    #[error("unavailable: {detail}")]
    Unavailable { detail: String, retry_after: u64 },
    /// A fault of ours, logged where it happened; the client learns nothing about it (500).
    #[error("internal error")]
    Internal,
}

impl IngestError {
    /// A refusal with its own type URI (`slug`), title and status.
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        IngestError::Rejected(Problem::new(status, slug, title, detail))
    }

    pub fn bad_request(slug: &str, detail: impl Into<String>) -> Self {
        IngestError::Rejected(Problem::bad_request(slug, detail))
    }

    pub fn validation(detail: impl Into<String>, errors: Vec<FieldError>) -> Self {
        IngestError::Rejected(Problem::validation(detail, errors))
    }

    pub fn unsupported_media_type(detail: impl Into<String>) -> Self {
        IngestError::Rejected(Problem::unsupported_media_type(detail))
    }

    /// The body, as sent or decompressed, is over `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        IngestError::Rejected(Problem::too_large(limit))
    }

    /// A request refused whole for its size (too many items, or too much once expanded).
    pub fn too_many(e: FieldError) -> Self {
        Self::refused_for_size("too-many-points", "Too many points", e)
    }

    /// A JSON body holds more values than a request may make a door build.
    pub fn too_many_values(e: FieldError) -> Self {
        Self::refused_for_size("too-many-values", "Too many JSON values", e)
    }

    fn refused_for_size(slug: &str, title: &str, e: FieldError) -> Self {
        IngestError::Rejected(
            Problem::new(StatusCode::PAYLOAD_TOO_LARGE, slug, title, e.reason.clone())
                .with_errors(vec![e]),
        )
    }

    /// One event is larger than the event log takes.
    pub fn event_too_large(id: Uuid, size: usize) -> Self {
        IngestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event-too-large",
            "Event too large",
            format!(
                "event {id} is {size} bytes as stored; the event log takes at most {}",
                crate::ingest::sink::MAX_STORED_EVENT_BYTES
            ),
        )
    }

    /// Logs `error` with `what` happened and hides it from the client.
    pub fn internal(what: &str, error: impl std::fmt::Display) -> Self {
        tracing::error!(error = %error, "{what}");
        IngestError::Internal
    }

    /// Adds the field errors to a refusal (other variants have none to carry).
    pub fn with_errors(self, errors: Vec<FieldError>) -> Self {
        match self {
            IngestError::Rejected(p) => IngestError::Rejected(p.with_errors(errors)),
            other => other,
        }
    }

    fn problem(&self) -> Problem {
        match self {
            IngestError::Unauthenticated(p)
            | IngestError::Forbidden(p)
            | IngestError::Rejected(p) => p.clone(),
            IngestError::RateLimited(d) => d.problem(),
            IngestError::Unavailable {
                detail,
                retry_after,
            } => Problem::unavailable(detail.clone(), *retry_after),
            IngestError::Internal => Problem::internal(),
        }
    }

    /// The gRPC code: refusals a sender must not retry are `INVALID_ARGUMENT`; the rate limit
    /// and an unavailable log are `UNAVAILABLE`, which OTLP senders retry.
    pub fn code(&self) -> Code {
        match self {
            IngestError::Unauthenticated(_) => Code::Unauthenticated,
            IngestError::Forbidden(_) => Code::PermissionDenied,
            IngestError::RateLimited(_) | IngestError::Unavailable { .. } => Code::Unavailable,
            IngestError::Rejected(_) => Code::InvalidArgument,
            IngestError::Internal => Code::Internal,
        }
    }
}

/// The shared API-key check's refusals, each to the variant that answers it.
impl From<KeyError> for IngestError {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Unauthenticated(_) => IngestError::Unauthenticated(e.into()),
            KeyError::WrongScope { .. } => IngestError::Forbidden(e.into()),
            KeyError::Unavailable => IngestError::Unavailable {
                detail: e.to_string(),
                retry_after: KEY_CHECK_RETRY_SECS,
            },
            KeyError::Corrupt => IngestError::Internal,
        }
    }
}

impl From<IngestError> for Problem {
    fn from(e: IngestError) -> Problem {
        match e {
            IngestError::Unauthenticated(p)
            | IngestError::Forbidden(p)
            | IngestError::Rejected(p) => p,
            other => other.problem(),
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        Problem::from(self).into_response()
    }
}

impl From<IngestError> for Status {
    /// The problem's detail, with the first five offending fields, as the status message.
    fn from(e: IngestError) -> Status {
        let code = e.code();
        let p = Problem::from(e);
        let mut detail = p.detail;
        for e in p.errors.iter().take(5) {
            detail.push_str(&format!("; {}: {}", e.field, e.reason));
        }
        Status::new(code, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision() -> Decision {
        Decision {
            allowed: false,
            limit: 100,
            remaining: 0,
            reset_secs: 7,
            what: "requests",
        }
    }

    /// Every variant with the HTTP status, problem type, `Retry-After` and gRPC code it must
    /// answer with.
    #[test]
    fn each_error_maps_to_its_http_problem_and_grpc_code() {
        let cases: Vec<(IngestError, u16, &str, Option<u64>, Code)> = vec![
            (
                IngestError::Unauthenticated(Problem::unauthorized("no key")),
                401,
                "unauthorized",
                None,
                Code::Unauthenticated,
            ),
            (
                IngestError::Forbidden(Problem::forbidden("read key")),
                403,
                "forbidden",
                None,
                Code::PermissionDenied,
            ),
            (
                IngestError::RateLimited(decision()),
                429,
                "rate-limited",
                Some(7),
                Code::Unavailable,
            ),
            (
                IngestError::bad_request("bad-otlp", "nope"),
                400,
                "bad-otlp",
                None,
                Code::InvalidArgument,
            ),
            (
                IngestError::validation("bad event", vec![]),
                422,
                "validation",
                None,
                Code::InvalidArgument,
            ),
            (
                IngestError::too_large(10),
                413,
                "body-too-large",
                None,
                Code::InvalidArgument,
            ),
            (
                IngestError::too_many(FieldError::new("points", "too many")),
                413,
                "too-many-points",
                None,
                Code::InvalidArgument,
            ),
            (
                IngestError::unsupported_media_type("text/html"),
                415,
                "unsupported-media-type",
                None,
                Code::InvalidArgument,
            ),
            (
                IngestError::Unavailable {
                    detail: "log down".into(),
                    retry_after: 5,
                },
                503,
                "unavailable",
                Some(5),
                Code::Unavailable,
            ),
            (IngestError::Internal, 500, "internal", None, Code::Internal),
        ];
        for (error, status, slug, retry, code) in cases {
            let name = error.to_string();
            assert_eq!(error.code(), code, "{name}");
            let res = error.into_response();
            assert_eq!(res.status().as_u16(), status, "{name}");
            assert_eq!(
                res.headers()["content-type"],
                "application/problem+json",
                "{name}"
            );
            assert_eq!(
                res.headers().get("retry-after").map(|v| v
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()),
                retry,
                "{name}"
            );
            let body = futures::executor::block_on(axum::body::to_bytes(res.into_body(), 1 << 16))
                .unwrap();
            let p: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(p["type"], format!("https://tally.dev/problems/{slug}"));
            assert_eq!(p["status"], status);
        }
    }

    #[test]
    fn the_grpc_status_carries_the_detail_and_the_first_fields() {
        let errors = (0..7)
            .map(|i| FieldError::new(format!("f{i}"), "bad"))
            .collect();
        let status = Status::from(
            IngestError::bad_request("invalid-points", "all refused").with_errors(errors),
        );
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "all refused; f0: bad; f1: bad; f2: bad; f3: bad; f4: bad"
        );
    }

    #[test]
    fn the_key_check_maps_to_one_variant_and_the_same_problem() {
        use shared::apikey::Scope;
        let cases = [
            (KeyError::Unauthenticated("x"), Code::Unauthenticated),
            (
                KeyError::WrongScope {
                    has: Scope::Read,
                    needs: Scope::Ingest,
                },
                Code::PermissionDenied,
            ),
            (KeyError::Unavailable, Code::Unavailable),
            (KeyError::Corrupt, Code::Internal),
        ];
        for (k, code) in cases {
            let e = IngestError::from(k.clone());
            assert_eq!(e.code(), code, "{k}");
            // The doors answer exactly what query-api and the control plane answer.
            let (ours, shared) = (Problem::from(e), Problem::from(k.clone()));
            assert_eq!(
                (ours.status, ours.kind, ours.detail, ours.retry_after),
                (
                    shared.status,
                    shared.kind,
                    shared.detail,
                    shared.retry_after
                ),
                "{k}"
            );
        }
    }
}
