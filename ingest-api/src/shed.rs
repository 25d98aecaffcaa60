//! Load shedding at the ingest doors.
//!
//! Every request to a door holds, from the moment its key is known until it is answered, one
//! of `max_inflight_requests` slots and its declared length (`Content-Length`, within the
//! body limit) of `max_inflight_bytes` ([`Shed::hold`]). What its body comes to beyond that —
//! read without a declared length, or inflated — is charged as it arrives ([`Charges`]). A
//! request that finds the budget exhausted is answered at once with 503 and `Retry-After`
//! (`UNAVAILABLE` over gRPC), before anything (more) of its body is read: under any offered
//! load the bodies (and the events they become) held in memory stay bounded, and the requests
//! that are taken are served at the speed Kafka allows instead of all of them timing out
//! together.
//!
//! Of that budget, each tenant holds at most its share (`tenant_inflight_requests`,
//! `tenant_inflight_bytes`), counted the same way: past it, only that tenant's requests are
//! shed, so one sender's flood of slow or large bodies leaves the rest of the budget to the
//! others. Webhooks, whose sender is proven only by a signature over the body, have a small
//! budget of their own (`crate::routes::webhooks`), so that nobody without a key can take the
//! doors' budget.

use std::sync::Arc;

use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use shared::per_tenant::{PerTenant, TenantPermit};
use shared::tenant::TenantId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::IngestError;

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
    /// The body limit (the most a declared length is charged for).
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
    /// limit; none when it declares none (its body is charged as it is read).
    pub fn declared(&self, headers: &HeaderMap) -> usize {
        headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0)
            .min(self.max_body)
    }

    /// Bytes of the in-flight budget not held by any request.
    #[cfg(test)]
    pub fn bytes_free(&self) -> usize {
        self.bytes.available_permits()
    }

    /// `tenant`'s request: a slot and `size` bytes, of its share and of the budget in all,
    /// held until dropped; a 503 when either is exhausted.
    pub fn hold(&self, tenant: TenantId, size: usize) -> Result<Held, Busy> {
        let Some(share_slot) = self.tenant_requests.try_acquire(tenant, 1) else {
            return Err(overloaded(TENANT_REQUESTS));
        };
        let bytes = self.charge(tenant, size.max(1))?;
        let Ok(slot) = self.requests.clone().try_acquire_owned() else {
            return Err(overloaded(REQUESTS));
        };
        Ok(Held {
            _slot: slot,
            _share_slot: share_slot,
            _bytes: bytes,
        })
    }

    /// `more` bytes for `tenant`'s request, of its share and of the budget in all; a 503
    /// when either cannot cover them.
    fn charge(&self, tenant: TenantId, more: usize) -> Result<Charge, Busy> {
        let permits = u32::try_from(more).unwrap_or(u32::MAX);
        let Some(share) = self.tenant_bytes.try_acquire(tenant, permits) else {
            return Err(overloaded(TENANT_BYTES));
        };
        let Ok(bytes) = self.bytes.clone().try_acquire_many_owned(permits) else {
            return Err(overloaded(BYTES));
        };
        Ok(Charge { bytes, share })
    }
}

/// A request's slot and bytes ([`Shed::hold`]), given back when dropped.
pub struct Held {
    _slot: OwnedSemaphorePermit,
    _share_slot: TenantPermit,
    _bytes: Charge,
}

/// Bytes held of a tenant's share and of the budget in all.
struct Charge {
    bytes: OwnedSemaphorePermit,
    share: TenantPermit,
}

/// What a request's body holds of the budget beyond what it was charged on arrival ([`Held`]):
/// the bytes it came to as read, then as inflated. Given back when dropped, which a door does
/// once the body is let go of (its arrival's charge is held until it is answered).
pub struct Charges {
    shed: Shed,
    tenant: TenantId,
    /// The bytes charged in all, on arrival and here.
    charged: usize,
    held: Option<Charge>,
}

impl Charges {
    /// For `tenant`'s request that was charged `charged` bytes on arrival.
    pub fn new(shed: &Shed, tenant: TenantId, charged: usize) -> Charges {
        Charges {
            shed: shed.clone(),
            tenant,
            charged,
            held: None,
        }
    }

    /// Charged for `size` bytes in all (nothing more when it has been already); a 503 when
    /// the budget or the tenant's share cannot cover the rest.
    pub fn up_to(&mut self, size: usize) -> Result<(), Busy> {
        let Some(more) = size.checked_sub(self.charged).filter(|&more| more > 0) else {
            return Ok(());
        };
        let charge = self.shed.charge(self.tenant, more)?;
        match &mut self.held {
            Some(held) => {
                held.bytes.merge(charge.bytes);
                held.share.merge(charge.share);
            }
            None => self.held = Some(charge),
        }
        self.charged = size;
        Ok(())
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

    /// A request is charged its declared length within the body limit on arrival (nothing
    /// when it declares none); what its body comes to beyond that is charged as it grows,
    /// for as long as the request holds the charges; a budget that cannot cover it is a 503.
    #[test]
    fn bodies_are_charged_for_what_they_become() {
        let shed = shed(8, 1000);
        let t = TenantId::new();
        assert_eq!(shed.declared(&declaring(100)), 100);
        assert_eq!(shed.declared(&declaring(5000)), 600);
        assert_eq!(shed.declared(&HeaderMap::new()), 0);
        let arrival = shed.hold(t, 100).unwrap();
        let mut charges = Charges::new(&shed, t, 100);
        charges.up_to(40).unwrap();
        charges.up_to(100).unwrap();
        assert_eq!(shed.bytes_free(), 900, "nothing beyond the declared length");
        charges.up_to(700).unwrap();
        charges.up_to(650).unwrap();
        assert_eq!(shed.bytes_free(), 300);
        // Another tenant's share has room, the budget in all has not.
        let mut other = Charges::new(&shed, TenantId::new(), 0);
        assert_eq!(other.up_to(301), Err(Busy(BYTES)));
        other.up_to(300).unwrap();
        assert_eq!(shed.bytes_free(), 0);
        drop((charges, other));
        assert_eq!(shed.bytes_free(), 900);
        drop(arrival);
        assert_eq!(shed.bytes_free(), 1000);
        assert_eq!(
            shed.tenant_bytes.tenants(),
            0,
            "tenants forgotten once done"
        );
    }

    /// A tenant holds at most its share, of requests and of bytes (charged ones included),
    /// and what it holds takes nothing from another tenant's share; the budget in all still
    /// bounds them together.
    #[test]
    fn a_tenant_holds_at_most_its_share() {
        let shed = shed(2, 500);
        let (greedy, other) = (TenantId::new(), TenantId::new());
        let first = shed.hold(greedy, 100).unwrap();
        let second = shed.hold(greedy, 100).unwrap();
        assert_eq!(shed.hold(greedy, 1).err(), Some(Busy(TENANT_REQUESTS)));
        let theirs = shed.hold(other, 500).unwrap();
        drop(second);
        // 100 of its 500 held: 450 more is over its share, 400 fits.
        let mut charges = Charges::new(&shed, greedy, 0);
        assert_eq!(charges.up_to(450), Err(Busy(TENANT_BYTES)));
        charges.up_to(400).unwrap();
        assert_eq!(shed.hold(greedy, 1).err(), Some(Busy(TENANT_BYTES)));
        drop((first, charges));
        // The budget in all (1000 bytes): the other tenant holds 500, this one may not
        // take its whole share once a third holds 100 of the rest.
        let third = shed.hold(TenantId::new(), 100).unwrap();
        assert_eq!(shed.hold(greedy, 500).err(), Some(Busy(BYTES)));
        let _fits = shed.hold(greedy, 400).unwrap();
        drop((theirs, third));
        // Shares larger than the budget in all are the budget in all.
        let shed = Shed::new(Limits {
            requests: 2,
            bytes: 10,
            tenant_requests: 5,
            tenant_bytes: 50,
            max_body: 10,
        });
        let mut charges = Charges::new(&shed, greedy, 0);
        assert_eq!(charges.up_to(11), Err(Busy(TENANT_BYTES)));
        let _one = shed.hold(greedy, 1).unwrap();
        let _two = shed.hold(greedy, 1).unwrap();
        assert_eq!(shed.hold(greedy, 1).err(), Some(Busy(TENANT_REQUESTS)));
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
