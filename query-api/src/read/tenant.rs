//! The tenant's side of a read: one read-only transaction with `search_path` set to the
//! caller's tenant schema (the tenant comes from the credential, never from the request),
//! under the tenant's reader role. The SQL run in it never names a schema.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::per_tenant::{PerTenant, TenantPermit};
use shared::tenant::TenantId;
use shared::tenant_sql;
use sqlx::{Postgres, Transaction};

use crate::state::AppState;

/// How fresh an answer is.
#[derive(Debug, Clone)]
pub struct Freshness {
    /// Server time of the newest event projected for this tenant (null before the first).
    pub as_of: Option<DateTime<Utc>>,
    /// Sequence of the projection's last transaction for this tenant (cache key).
    pub seq: i64,
    /// The projection version answering (a replay moves it on; part of the cache key).
    pub version: i32,
}

/// Each tenant's share of the database connections: at most `tenant_db_connections` of one
/// tenant's reads hold a connection at once; its next ones wait for one of them (in order),
/// for as long as a read waits for the pool, then answer 503. One tenant's slow or many reads
/// (a lock on its tables, wide explorations, a hundred live feeds) cannot take every
/// connection from the others.
#[derive(Clone)]
pub struct Shares {
    per_tenant: PerTenant,
    wait: Duration,
}

impl Shares {
    pub fn new(connections: usize, wait: Duration) -> Shares {
        Shares {
            per_tenant: PerTenant::new(connections),
            wait,
        }
    }

    /// One of `tenant`'s connections, once one is free; `PoolTimedOut` past the wait.
    pub async fn take(&self, tenant: TenantId) -> sqlx::Result<TenantPermit> {
        let share = tokio::time::timeout(self.wait, self.per_tenant.acquire(tenant, 1)).await;
        share.map_err(|_| {
            metrics::counter!("query_tenant_share_timeouts_total").increment(1);
            sqlx::Error::PoolTimedOut
        })
    }
}

/// A read-only transaction in the tenant's active projection (its version), holding one of
/// the tenant's connections ([`Shares`]) for as long as it lives. Take its fields from a
/// variable, not from a temporary: the share goes with the value.
pub struct TenantTx {
    pub tx: Transaction<'static, Postgres>,
    pub version: i32,
    _share: TenantPermit,
}

/// A read-only transaction in the tenant's active projection, and its watermark as that
/// transaction first saw it; it holds one of the tenant's connections ([`Shares`]) for as
/// long as it lives (take its fields from a variable, not a temporary).
pub struct TenantRead {
    pub tx: Transaction<'static, Postgres>,
    pub fresh: Freshness,
    _share: TenantPermit,
}

/// Opens a read-only transaction in the tenant's active projection, once the tenant has a
/// connection to spare ([`Shares`]). `None` when the tenant has no projection yet (no event
/// was ever projected).
pub async fn enter(s: &AppState, tenant: TenantId) -> sqlx::Result<Option<TenantTx>> {
    let share = s.shares.take(tenant).await?;
    let mut tx = s.pool.begin().await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await?;
    let version = tenant_sql::enter_active_readonly(&mut tx, tenant).await?;
    Ok(version.map(|version| TenantTx {
        tx,
        version,
        _share: share,
    }))
}

/// Like [`enter`], with the watermark read in the same transaction, so that an answer keyed
/// by it is never older than the projection.
pub async fn open(s: &AppState, tenant: TenantId) -> sqlx::Result<Option<TenantRead>> {
    metrics::counter!("query_tenant_reads_total").increment(1);
    let Some(mut entered) = enter(s, tenant).await? else {
        return Ok(None);
    };
    let (seq, as_of): (i64, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT seq, as_of FROM projection_state")
            .fetch_one(&mut *entered.tx)
            .await?;
    Ok(Some(TenantRead {
        tx: entered.tx,
        fresh: Freshness {
            as_of,
            seq,
            version: entered.version,
        },
        _share: entered._share,
    }))
}
