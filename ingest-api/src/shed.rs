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
//!
//! Of that budget, each tenant holds at most its share (`tenant_inflight_requests`,
//! `tenant_inflight_bytes`; [`Shed::hold_share`]), taken once its key is known and charged
//! for inflated bytes like the budget in all: past it, only that tenant's requests are shed,
//! so one sender's flood of slow or large bodies leaves the rest of the budget to the others.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::IngestError;
use crate::per_tenant::{PerTenant, TenantPermit};
use crate::state::AppState;
use shared::tenant::TenantId;

/// What the doors may hold at once, in all and for each tenant.
#[derive(Clone)]
pub struct Shed {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_body: usize,
    tenant_requests: PerTenant,
    tenant_bytes: PerTenant,
}

/// How much the doors may hold at once: in all, and of that for one tenant.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub requests: usize,
    pub bytes: usize,
    pub tenant_requests: usize,
    pub tenant_bytes: usize,
    /// The body limit (what a body of unknown length is charged on arrival).
    pub max_body: usize,
}

impl Shed {
    pub fn new(limits: Limits) -> Shed {
        Shed {
            requests: Arc::new(Semaphore::new(limits.requests.max(1))),
            bytes: Arc::new(Semaphore::new(
                limits.bytes.clamp(1, Semaphore::MAX_PERMITS),
            )),
            max_body: limits.max_body,
            tenant_requests: PerTenant::new(limits.tenant_requests.min(limits.requests)),
            tenant_bytes: PerTenant::new(limits.tenant_bytes.min(limits.bytes)),
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

    /// Charges `tenant`'s request that was charged `declared` bytes on arrival
    /// ([`Shed::declared`]), and whose body came to `size` bytes once read (decompressed), for
    /// what its arrival did not cover, in all and to the tenant's share; the charge lasts as
    /// long as what it returns (nothing when nothing more is due). A budget that cannot cover
    /// it is a 503, as on arrival.
    pub fn charge(
        &self,
        tenant: TenantId,
        declared: usize,
        size: usize,
    ) -> Result<Option<Charge>, Busy> {
        let more = size.saturating_sub(declared);
        if more == 0 {
            return Ok(None);
        }
        let permits = u32::try_from(more).unwrap_or(u32::MAX);
        let Some(share) = self.tenant_bytes.try_acquire(tenant, permits) else {
            return Err(overloaded(TENANT_BYTES));
        };
        let Ok(bytes) = self.bytes.clone().try_acquire_many_owned(permits) else {
            return Err(overloaded(BYTES));
        };
        Ok(Some(Charge {
            _bytes: bytes,
            _share: share,
        }))
    }

    /// A request's slot and `size` bytes of the budget, held until dropped; a 503 when either
    /// is exhausted.
    pub fn hold(&self, size: usize) -> Result<Held, Busy> {
        let Ok(slot) = self.requests.clone().try_acquire_owned() else {
            return Err(overloaded(REQUESTS));
        };
        let permits = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        let Ok(bytes) = self.bytes.clone().try_acquire_many_owned(permits) else {
            return Err(overloaded(BYTES));
        };
        Ok(Held {
            _slot: slot,
            _bytes: bytes,
        })
    }

    /// `tenant`'s share for a request it sends ([`Shed::hold`]'s slot and `size` bytes,
    /// counted again against the tenant's own limits), held until dropped; a 503 when the
    /// tenant already holds its share.
    pub fn hold_share(&self, tenant: TenantId, size: usize) -> Result<Share, Busy> {
        let Some(slot) = self.tenant_requests.try_acquire(tenant, 1) else {
            return Err(overloaded(TENANT_REQUESTS));
        };
        let permits = u32::try_from(size.max(1)).unwrap_or(u32::MAX);
        let Some(bytes) = self.tenant_bytes.try_acquire(tenant, permits) else {
            return Err(overloaded(TENANT_BYTES));
        };
        Ok(Share {
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

/// A tenant's slot and bytes ([`Shed::hold_share`]), given back when dropped.
pub struct Share {
    _slot: TenantPermit,
    _bytes: TenantPermit,
}

/// What a body inflated to beyond its arrival's charge ([`Shed::charge`]), given back when
/// dropped.
pub struct Charge {
    _bytes: OwnedSemaphorePermit,
    _share: TenantPermit,
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

const REQUESTS: &str = "requests";
const BYTES: &str = "bytes";
const TENANT_REQUESTS: &str = "tenant_requests";
const TENANT_BYTES: &str = "tenant_bytes";

fn overloaded(what: &'static str) -> Busy {
    metrics::counter!("ingest_shed_total", "limit" => what).increment(1);
    Busy(what)
}

impl From<Busy> for IngestError {
    fn from(Busy(limit): Busy) -> IngestError {
        let detail = match limit.strip_prefix("tenant_") {
            Some(what) => format!(
                "this tenant holds its whole share of ingest-api's requests in flight ({what}); \
                 retry shortly"
            ),
            None => {
                format!("ingest-api is at its limit of requests in flight ({limit}); retry shortly")
            }
        };
        IngestError::Unavailable {
            detail,
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

    fn shed(tenant_requests: usize, tenant_bytes: usize) -> Shed {
        Shed::new(Limits {
            requests: 8,
            bytes: 1000,
            tenant_requests,
            tenant_bytes,
            max_body: 600,
        })
    }

    impl Shed {
        fn charge_for(
            &self,
            tenant: TenantId,
            headers: &HeaderMap,
            size: usize,
        ) -> Result<Option<Charge>, Busy> {
            self.charge(tenant, self.declared(headers), size)
        }
    }

    /// A compressed body is charged for what it inflated to beyond its declared length, as
    /// long as the request holds the charge; a budget that cannot cover it is a 503.
    #[test]
    fn inflated_bodies_are_charged_for_what_they_became() {
        let shed = shed(8, 1000);
        let t = TenantId::new();
        let small = declaring(100);
        assert!(shed.charge_for(t, &small, 100).unwrap().is_none());
        assert!(shed.charge_for(t, &small, 40).unwrap().is_none());
        let held = shed.charge_for(t, &small, 700).unwrap().expect("charged");
        assert_eq!(shed.bytes_free(), 400);
        // Another tenant's share has room, the budget in all has not.
        let other = TenantId::new();
        assert_eq!(shed.charge_for(other, &small, 600).err(), Some(Busy(BYTES)));
        let four = shed.charge_for(t, &small, 500).unwrap().expect("charged");
        assert_eq!(shed.bytes_free(), 0);
        drop((held, four));
        assert_eq!(shed.bytes_free(), 1000);
        assert!(shed.charge_for(t, &small, 600).unwrap().is_some());
        // A body without a declared length was charged the body limit on arrival.
        assert!(shed
            .charge_for(t, &HeaderMap::new(), 600)
            .unwrap()
            .is_none());
    }

    /// A tenant holds at most its share, of requests and of bytes (inflated ones included),
    /// and what it holds takes nothing from another tenant's share; the budget in all still
    /// bounds them together.
    #[test]
    fn a_tenant_holds_at_most_its_share() {
        let shed = shed(2, 500);
        let (greedy, other) = (TenantId::new(), TenantId::new());
        let first = shed.hold_share(greedy, 100).unwrap();
        let second = shed.hold_share(greedy, 100).unwrap();
        assert_eq!(
            shed.hold_share(greedy, 1).err(),
            Some(Busy(TENANT_REQUESTS))
        );
        assert!(
            shed.hold_share(other, 500).is_ok(),
            "other's share is whole"
        );
        drop(second);
        // 100 of 500 held: a body inflating by 450 more is over the share, one of 400 fits.
        assert_eq!(
            shed.charge_for(greedy, &declaring(50), 500).err(),
            Some(Busy(TENANT_BYTES))
        );
        let inflated = shed.charge_for(greedy, &declaring(50), 450).unwrap();
        assert_eq!(shed.hold_share(greedy, 1).err(), Some(Busy(TENANT_BYTES)));
        let theirs = shed.hold_share(other, 500).unwrap();
        drop((first, inflated));
        assert!(shed.hold_share(greedy, 500).is_ok());
        drop(theirs);
        assert_eq!(
            shed.tenant_bytes.tenants(),
            0,
            "tenants forgotten once done"
        );
        // Shares larger than the budget in all are the budget in all.
        let shed = Shed::new(Limits {
            requests: 1,
            bytes: 10,
            tenant_requests: 5,
            tenant_bytes: 50,
            max_body: 10,
        });
        let _all = shed.hold_share(greedy, 10).unwrap();
        assert_eq!(
            shed.hold_share(greedy, 1).err(),
            Some(Busy(TENANT_REQUESTS))
        );
    }

    /// A tenant's refusal says it is the tenant's share that is full, not ingest-api.
    #[test]
    fn a_full_share_says_so() {
        let IngestError::Unavailable {
            detail,
            retry_after,
        } = IngestError::from(Busy(TENANT_BYTES))
        else {
            panic!("a 503");
        };
        assert!(
            detail.contains("this tenant holds its whole share"),
            "{detail}"
        );
        assert!(detail.contains("(bytes)"), "{detail}");
        assert_eq!(retry_after, 1);
    }
}
