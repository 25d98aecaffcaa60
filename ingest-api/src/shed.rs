//! Load shedding at the ingest doors. Every request to a door holds, until it is answered, one
//! of `max_inflight_requests` slots and as many of `max_inflight_bytes` as its body may take
//! (its `Content-Length`, or the body limit when it sends none). A request that finds either
//! exhausted is answered at once with 503 and `Retry-After`, before anything is read: under
//! any offered load the bodies (and the events they become) held in memory stay bounded, and
//! the requests that are taken are served at the speed Kafka allows instead of all of them
//! timing out together.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use shared::problem::Problem;
use tokio::sync::Semaphore;

use crate::state::AppState;

/// What the doors may hold at once.
#[derive(Clone)]
pub struct Shed {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_body: usize,
}

impl Shed {
    pub fn new(max_requests: usize, max_bytes: usize, max_body: usize) -> Shed {
        Shed {
            requests: Arc::new(Semaphore::new(max_requests.max(1))),
            bytes: Arc::new(Semaphore::new(max_bytes.clamp(1, Semaphore::MAX_PERMITS))),
            max_body,
        }
    }
}

/// The middleware of the HTTP ingest doors (see the module's doc; OTLP/gRPC is bounded by its
/// own server's message limits).
pub async fn shed(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let shed = &s.shed;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(shed.max_body)
        .clamp(1, shed.max_body.max(1));
    let Ok(slot) = shed.requests.clone().try_acquire_owned() else {
        return overloaded("requests");
    };
    let permits = u32::try_from(declared).unwrap_or(u32::MAX);
    let Ok(bytes) = shed.bytes.clone().try_acquire_many_owned(permits) else {
        return overloaded("bytes");
    };
    let res = next.run(req).await;
    drop((slot, bytes));
    res
}

fn overloaded(what: &'static str) -> Response {
    metrics::counter!("ingest_shed_total", "limit" => what).increment(1);
    Problem::unavailable(
        format!("ingest-api is at its limit of requests in flight ({what}); retry shortly"),
        1,
    )
    .into_response()
}
