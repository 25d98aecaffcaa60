//! The live feeds' hub: one Redis subscription to the projector's notifications
//! ([`shared::watermark`]) wakes the open streams of the tenant it names, and the open streams
//! are counted, per tenant and in all, to cap them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use futures::StreamExt;
use shared::problem::Problem;
use shared::tenant::TenantId;
use shared::watermark;
use tokio::sync::broadcast;

/// Per-tenant wake-ups, fed by one Redis subscription, and the count of open streams.
#[derive(Clone, Default)]
pub struct Hub {
    tenants: Arc<Mutex<HashMap<TenantId, broadcast::Sender<()>>>>,
    /// Whether the Redis subscription is up (wake-ups arrive).
    live: Arc<AtomicBool>,
    open: Arc<Mutex<OpenStreams>>,
}

#[derive(Default)]
struct OpenStreams {
    per_tenant: HashMap<TenantId, usize>,
    total: usize,
}

/// One open stream, counted (also in `sse_connections`) for as long as it lives, however it
/// ends.
pub struct Slot {
    open: Arc<Mutex<OpenStreams>>,
    tenant: TenantId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("hub lock");
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_tenant.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_tenant.remove(&self.tenant);
            }
        }
        metrics::gauge!("sse_connections").decrement(1.0);
    }
}

impl Hub {
    /// How long a stream waits for a wake-up before it looks for itself.
    pub fn poll_interval(&self) -> Duration {
        if self.live.load(Ordering::Relaxed) {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(2)
        }
    }

    /// A place for one more stream of `tenant`, or a 429 when the tenant or the process
    /// already has as many open as allowed.
    pub fn admit(
        &self,
        tenant: TenantId,
        per_tenant: usize,
        total: usize,
    ) -> Result<Slot, Problem> {
        let mut open = self.open.lock().expect("hub lock");
        let mine = open.per_tenant.get(&tenant).copied().unwrap_or(0);
        let refuse = |detail: String| {
            metrics::counter!("sse_refused_total").increment(1);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many live feeds",
                detail,
            )
            .with_retry_after(30)
        };
        if mine >= per_tenant {
            return Err(refuse(format!(
                "this tenant already has {mine} live feeds open (at most {per_tenant}); close one"
            )));
        }
        if open.total >= total {
            return Err(refuse(
                "this server has as many live feeds open as it serves; retry later".into(),
            ));
        }
        open.total += 1;
        *open.per_tenant.entry(tenant).or_default() += 1;
        metrics::gauge!("sse_connections").increment(1.0);
        Ok(Slot {
            open: self.open.clone(),
            tenant,
        })
    }

    /// The wake-ups of `tenant`'s streams.
    pub fn subscribe(&self, tenant: TenantId) -> broadcast::Receiver<()> {
        self.tenants
            .lock()
            .expect("hub lock")
            .entry(tenant)
            .or_insert_with(|| broadcast::channel(16).0)
            .subscribe()
    }

    fn wake(&self, tenant: TenantId) {
        if let Some(tx) = self.tenants.lock().expect("hub lock").get(&tenant) {
            let _ = tx.send(());
        }
    }

    /// Listens to the projector's notifications for as long as the process runs
    /// (reconnecting when Redis goes away).
    pub fn listen(&self, redis_url: String) {
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                let result = hub.listen_once(&redis_url).await;
                hub.live.store(false, Ordering::Relaxed);
                if let Err(e) = result {
                    tracing::debug!(error = %e, "live feed subscription lost; retrying");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }

    async fn listen_once(&self, url: &str) -> redis::RedisResult<()> {
        let client = redis::Client::open(url)?;
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.psubscribe(watermark::CHANNEL_PATTERN).await?;
        self.live.store(true, Ordering::Relaxed);
        let mut messages = pubsub.into_on_message();
        while let Some(msg) = messages.next().await {
            if let Some(tenant) = watermark::tenant_of(msg.get_channel_name()) {
                self.wake(tenant);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_capped_per_tenant_and_in_all() {
        let hub = Hub::default();
        let (a, b) = (TenantId::new(), TenantId::new());
        let a1 = hub.admit(a, 2, 3).unwrap();
        let _a2 = hub.admit(a, 2, 3).unwrap();
        assert_eq!(hub.admit(a, 2, 3).err().map(|p| p.status), Some(429));
        let _b1 = hub.admit(b, 2, 3).unwrap();
        assert_eq!(hub.admit(b, 2, 3).err().map(|p| p.status), Some(429));
        drop(a1);
        assert!(hub.admit(b, 2, 3).is_ok());
    }
}
