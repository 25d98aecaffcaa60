//! The tenant's side of a read: one read-only transaction with `search_path` set to the
//! caller's tenant schema (the tenant comes from the credential, never from the request),
//! under the tenant's reader role. The SQL run in it never names a schema.

use chrono::{DateTime, Utc};
use shared::tenant::TenantId;
use shared::tenant_sql;
use sqlx::{PgPool, Postgres, Transaction};

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

/// A read-only transaction in the tenant's active projection, and its watermark as that
/// transaction first saw it.
pub struct TenantRead {
    pub tx: Transaction<'static, Postgres>,
    pub fresh: Freshness,
}

/// Opens a read-only transaction in the tenant's active projection: the transaction and the
/// projection version. `None` when the tenant has no projection yet (no event was ever
/// projected).
pub async fn enter(
    pool: &PgPool,
    tenant: TenantId,
) -> sqlx::Result<Option<(Transaction<'static, Postgres>, i32)>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION READ ONLY")
        .execute(&mut *tx)
        .await?;
    let version = tenant_sql::enter_active_readonly(&mut tx, tenant).await?;
    Ok(version.map(|v| (tx, v)))
}

/// Like [`enter`], with the watermark read in the same transaction, so that an answer keyed
/// by it is never older than the projection.
pub async fn open(pool: &PgPool, tenant: TenantId) -> sqlx::Result<Option<TenantRead>> {
    metrics::counter!("query_tenant_reads_total").increment(1);
    let Some((mut tx, version)) = enter(pool, tenant).await? else {
        return Ok(None);
    };
    let (seq, as_of): (i64, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT seq, as_of FROM projection_state")
            .fetch_one(&mut *tx)
            .await?;
    Ok(Some(TenantRead {
        tx,
        fresh: Freshness {
            as_of,
            seq,
            version,
        },
    }))
}
