//! A budget for each tenant: the same number of permits for every tenant, counted apart, so
//! that what one tenant holds never comes out of another's. A tenant's budget exists only
//! while something holds its permits or waits for them; it is forgotten when that comes to
//! none, so the map holds no more tenants than there are requests in flight.
//!
//! ingest-api uses it for each tenant's places in its large-body lane and its share of the
//! in-flight budget; query-api for each tenant's share of the database connections; both
//! (keyed by a peer's address rather than a tenant) for each peer's share of the open
//! connections (`serve`) and of the lookups of keys not in the cache (`auth`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::tenant::TenantId;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `permits` for each tenant (or each key `K`).
pub struct PerTenant<K = TenantId> {
    permits: usize,
    tenants: Tenants<K>,
}

impl<K> Clone for PerTenant<K> {
    fn clone(&self) -> Self {
        PerTenant {
            permits: self.permits,
            tenants: self.tenants.clone(),
        }
    }
}

/// Each tenant's permits, and how many hold or wait for some of them.
type Tenants<K> = Arc<Mutex<HashMap<K, (Arc<Semaphore>, usize)>>>;

impl<K: Copy + Eq + Hash> PerTenant<K> {
    pub fn new(permits: usize) -> PerTenant<K> {
        PerTenant {
            permits: permits.clamp(1, Semaphore::MAX_PERMITS),
            tenants: Arc::default(),
        }
    }

    /// `n` of `tenant`'s permits once they are free (a tenant's permits are taken in order
    /// of asking), given back when dropped; a caller dropped while it waits is no longer
    /// counted. `n` must be at most the budget's permits (more would never come free).
    pub async fn acquire(&self, tenant: K, n: u32) -> TenantPermit<K> {
        assert!(n as usize <= self.permits, "more than a tenant's budget");
        let (mut permit, semaphore) = self.user(tenant);
        permit.permit = Some(
            semaphore
                .acquire_many_owned(n)
                .await
                .expect("a tenant's budget is never closed"),
        );
        permit
    }

    /// `n` of `tenant`'s permits if they are free now.
    pub fn try_acquire(&self, tenant: K, n: u32) -> Option<TenantPermit<K>> {
        let (mut permit, semaphore) = self.user(tenant);
        permit.permit = Some(semaphore.try_acquire_many_owned(n).ok()?);
        Some(permit)
    }

    /// `tenant`'s semaphore, counted as used by the permit returned (which holds none yet).
    fn user(&self, tenant: K) -> (TenantPermit<K>, Arc<Semaphore>) {
        let semaphore = {
            let mut tenants = locked(&self.tenants);
            let (semaphore, users) = tenants
                .entry(tenant)
                .or_insert_with(|| (Arc::new(Semaphore::new(self.permits)), 0));
            *users += 1;
            semaphore.clone()
        };
        let permit = TenantPermit {
            tenants: self.tenants.clone(),
            tenant,
            permit: None,
        };
        (permit, semaphore)
    }

    /// The permits `tenant` holds now.
    pub fn held(&self, tenant: K) -> usize {
        locked(&self.tenants)
            .get(&tenant)
            .map_or(0, |(semaphore, _)| {
                self.permits - semaphore.available_permits()
            })
    }

    /// The permits held, over all tenants.
    pub fn held_in_all(&self) -> usize {
        locked(&self.tenants)
            .values()
            .map(|(semaphore, _)| self.permits - semaphore.available_permits())
            .sum()
    }

    /// How many hold or wait for `tenant`'s permits.
    pub fn users(&self, tenant: K) -> usize {
        locked(&self.tenants)
            .get(&tenant)
            .map_or(0, |(_, users)| *users)
    }

    /// The tenants remembered.
    pub fn tenants(&self) -> usize {
        locked(&self.tenants).len()
    }
}

/// Permits of one tenant's budget (or the wait for them), given back when dropped.
pub struct TenantPermit<K: Copy + Eq + Hash = TenantId> {
    tenants: Tenants<K>,
    tenant: K,
    permit: Option<OwnedSemaphorePermit>,
}

impl<K: Copy + Eq + Hash> TenantPermit<K> {
    /// Holds `other`'s permits as well (both of one tenant's budget), given back with these.
    pub fn merge(&mut self, mut other: TenantPermit<K>) {
        assert!(
            other.tenant == self.tenant && Arc::ptr_eq(&other.tenants, &self.tenants),
            "permits of one tenant's budget"
        );
        match (&mut self.permit, other.permit.take()) {
            (Some(mine), Some(theirs)) => mine.merge(theirs),
            (mine, theirs) => *mine = mine.take().or(theirs),
        }
    }
}

impl<K: Copy + Eq + Hash> Drop for TenantPermit<K> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut tenants = locked(&self.tenants);
        if let Some((_, users)) = tenants.get_mut(&self.tenant) {
            *users -= 1;
            if *users == 0 {
                tenants.remove(&self.tenant);
            }
        }
    }
}

/// A lock whose holder cannot leave it inconsistent (a panic inside is caught apart).
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each tenant has its own permits; a tenant is forgotten once nothing holds or waits
    /// for its permits.
    #[tokio::test]
    async fn tenants_hold_their_own_permits_and_are_forgotten_when_done() {
        let budget = PerTenant::new(10);
        let (a, b) = (TenantId::new(), TenantId::new());
        let a6 = budget.try_acquire(a, 6).expect("free");
        assert!(budget.try_acquire(a, 5).is_none(), "a has 4 left");
        let b10 = budget.try_acquire(b, 10).expect("b's own ten");
        let a4 = budget.try_acquire(a, 4).expect("a's last four");
        assert_eq!((budget.held(a), budget.held(b)), (10, 10));
        drop(b10);
        assert_eq!(budget.tenants(), 1, "b is forgotten");
        drop(a6);
        assert_eq!(budget.held(a), 4);
        drop(a4);
        assert_eq!(budget.tenants(), 0);
    }

    /// A waiter gets its permits once they are given back; one that gives up waiting is no
    /// longer counted.
    #[tokio::test]
    async fn waiters_are_counted_until_they_give_up() {
        let budget = PerTenant::new(1);
        let a = TenantId::new();
        let first = budget.acquire(a, 1).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.acquire(a, 1).await }
        });
        let gave_up = tokio::spawn({
            let budget = budget.clone();
            async move { budget.acquire(a, 1).await }
        });
        while budget.users(a) < 3 {
            tokio::task::yield_now().await;
        }
        gave_up.abort();
        let _ = gave_up.await;
        assert_eq!(budget.users(a), 2);
        drop(first);
        let second = waiting.await.unwrap();
        assert_eq!((budget.held(a), budget.users(a)), (1, 1));
        drop(second);
        assert_eq!(budget.tenants(), 0);
    }

    /// Merged permits are given back together, and the tenant is forgotten after.
    #[tokio::test]
    async fn merged_permits_go_back_together() {
        let budget = PerTenant::new(10);
        let a = TenantId::new();
        let mut held = budget.try_acquire(a, 3).unwrap();
        held.merge(budget.try_acquire(a, 4).unwrap());
        assert_eq!((budget.held(a), budget.users(a)), (7, 1));
        drop(held);
        assert_eq!(budget.tenants(), 0);
    }
}
