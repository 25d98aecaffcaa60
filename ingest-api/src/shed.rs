//! Load shedding at the ingest doors. Every request to a door holds, until it is answered, one
//! of `max_inflight_requests` slots and as many of `max_inflight_bytes` as its body may take
//! (its `Content-Length`, or the body limit when it sends none). A compressed body is charged
//! again once it is read, for what it inflated to beyond its declared length
//! ([`Shed::charge`]). A request that finds either exhausted is answered at once with 503 and
//! `Retry-After`, before anything (more) is read: under
//! any offered load the bodies (and the events they become) held in memory stay bounded, and
//! the requests that are taken are served at the speed Kafka allows instead of all of them
//! timing out together. OTLP/gRPC holds its slot and bytes ([`Shed::hold`]) once its server
//! has read the message within the body limit, and answers `UNAVAILABLE` instead of 503.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::IngestError;
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

    /// The bytes a request is charged on arrival: its declared length within the body
    /// limit, or the limit when it declares none.
    pub fn declared(&self, headers: &HeaderMap) -> usize {
        headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(self.max_body)
            .clamp(1, self.max_body.max(1))
    }

    /// Bytes of the in-flight budget not held by any request.
    #[cfg(test)]
    pub fn bytes_free(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Charges a request that was charged `declared` bytes on arrival ([`Shed::declared`]),
    /// and whose body came to `size` bytes once read (decompressed), for what its arrival did
    /// not cover; the charge lasts as long as the permit it returns (none when nothing more
    /// is due). A budget that cannot cover it is a 503, as on arrival.
    pub fn charge(
        &self,
        declared: usize,
        size: usize,
    ) -> Result<Option<OwnedSemaphorePermit>, Busy> {
        let more = size.saturating_sub(declared);
        if more == 0 {
            return Ok(None);
        }
        let permits = u32::try_from(more).unwrap_or(u32::MAX);
        match self.bytes.clone().try_acquire_many_owned(permits) {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => Err(overloaded("bytes")),
        }
    }
}

impl Shed {
    /// A request's slot and `size` bytes of the budget, held until dropped; a 503 when either
    /// is exhausted.
    pub fn hold(&self, size: usize) -> Result<Held, Busy> {
        let Ok(slot) = self.requests.clone().try_acquire_owned() else {
            return Err(overloaded("requests"));
        };
        let permits = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        let Ok(bytes) = self.bytes.clone().try_acquire_many_owned(permits) else {
            return Err(overloaded("bytes"));
        };
        Ok(Held {
            _slot: slot,
            _bytes: bytes,
        })
    }
}

/// A request's slot and bytes ([`Shed::hold`]), given back when dropped.
pub struct Held {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// The middleware of the HTTP ingest doors (see the module's doc). OTLP/gRPC holds its slot
/// and bytes itself, once it has read its message (`crate::grpc`).
pub async fn shed(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let declared = s.shed.declared(req.headers());
    match s.shed.hold(declared) {
        Ok(held) => {
            let res = next.run(req).await;
            drop(held);
            res
        }
        Err(busy) => IngestError::from(busy).into_response(),
    }
}

/// A budget that cannot hold a request: which one (`ingest_shed_total`'s `limit`).
#[derive(Debug, PartialEq, Eq)]
pub struct Busy(&'static str);

fn overloaded(what: &'static str) -> Busy {
    metrics::counter!("ingest_shed_total", "limit" => what).increment(1);
    Busy(what)
}

impl From<Busy> for IngestError {
    fn from(Busy(what): Busy) -> IngestError {
        IngestError::Unavailable {
            detail: format!(
                "ingest-api is at its limit of requests in flight ({what}); retry shortly"
            ),
            retry_after: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declaring(length: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, length.into());
        headers
    }

    impl Shed {
        fn charge_for(
            &self,
            headers: &HeaderMap,
            size: usize,
        ) -> Result<Option<OwnedSemaphorePermit>, Busy> {
            self.charge(self.declared(headers), size)
        }
    }

    /// A compressed body is charged for what it inflated to beyond its declared length, as
    /// long as the request holds the charge; a budget that cannot cover it is a 503.
    #[test]
    fn inflated_bodies_are_charged_for_what_they_became() {
        let shed = Shed::new(8, 1000, 600);
        let small = declaring(100);
        assert!(shed.charge_for(&small, 100).unwrap().is_none());
        assert!(shed.charge_for(&small, 40).unwrap().is_none());
        let held = shed.charge_for(&small, 700).unwrap().expect("charged");
        assert_eq!(held.num_permits(), 600);
        assert!(matches!(shed.charge_for(&small, 600), Err(Busy("bytes"))));
        assert_eq!(
            shed.charge_for(&small, 500).unwrap().unwrap().num_permits(),
            400
        );
        drop(held);
        assert!(shed.charge_for(&small, 600).unwrap().is_some());
        // A body without a declared length was charged the body limit on arrival.
        assert!(shed.charge_for(&HeaderMap::new(), 600).unwrap().is_none());
    }
}
