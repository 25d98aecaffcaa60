//! Retention and partitions ahead: drops each tenant's raw partitions (or chunks) and rollup
//! rows older than its windows, creates the coming days' partitions, and with TimescaleDB
//! compresses the raw chunks older than the tenant's `compress_after_days`; then sweeps the
//! control schema (`housekeeping`). Runs in the projector every `retention_interval_secs` and
//! on demand (`projector retention`).

use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use shared::tenant::TenantId;
use sqlx::PgPool;
use tokio::sync::watch;

use crate::housekeeping;
use crate::schema::partitions;

/// What one pass removed, over every tenant schema.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Pass {
    pub schemas: u64,
    /// Schemas skipped because another instance was pruning them.
    pub busy: u64,
    pub partitions_dropped: u64,
    pub rollup_rows_deleted: u64,
    /// TimescaleDB chunks compressed (none on plain PostgreSQL).
    pub chunks_compressed: u64,
}

/// One pass over every tenant schema, except the versions a replay is still building: it
/// folds their rollups from their raw rows once the load is done (`rollups::rebuild`), so
/// dropping old partitions under it would lose those days' hourly and daily rollups. They
/// are pruned by the first pass after the switch. Schemas not upgraded to this binary's
/// templates yet wait for their upgrade (their pending deltas follow their template).
pub async fn run_once(pool: &PgPool, ahead_days: i64) -> anyhow::Result<Pass> {
    let schemas: Vec<(uuid::Uuid, i32, i32, i32, i32)> = sqlx::query_as(
        "SELECT s.tenant_id, s.version, t.raw_retention_days, t.rollup_retention_days,
                t.compress_after_days
           FROM control.tenant_schemas s JOIN control.tenants t ON t.id = s.tenant_id
           LEFT JOIN control.tenant_versions v ON v.tenant_id = s.tenant_id
          WHERE s.version <= COALESCE(v.active_version, 1) AND s.template_version = $1
          ORDER BY s.tenant_id, s.version",
    )
    .bind(crate::schema::TEMPLATE_VERSION)
    .fetch_all(pool)
    .await?;
    let today = Utc::now().date_naive();
    let mut pass = Pass::default();
    let mut conn = pool.acquire().await?;
    for (tenant, version, raw, rollups, compress) in schemas {
        let schema = TenantId(tenant).schema(version);
        let windows = partitions::Windows {
            raw_days: i64::from(raw),
            rollup_days: i64::from(rollups),
            compress_after_days: i64::from(compress),
            ahead_days,
        };
        let pruned = partitions::apply_retention(&mut conn, &schema, today, windows).await;
        match pruned {
            Ok(Some(p)) => {
                pass.schemas += 1;
                pass.partitions_dropped += p.partitions;
                pass.rollup_rows_deleted += p.rollup_rows;
                pass.chunks_compressed += p.chunks_compressed;
            }
            Ok(None) => pass.busy += 1,
            // A schema dropped by a replay between the listing and now.
            Err(e) => tracing::warn!(%schema, error = %e, "retention skipped a schema"),
        }
    }
    metrics::counter!("projector_retention_partitions_dropped_total")
        .increment(pass.partitions_dropped);
    metrics::counter!("projector_retention_rollup_rows_deleted_total")
        .increment(pass.rollup_rows_deleted);
    metrics::counter!("projector_chunks_compressed_total").increment(pass.chunks_compressed);
    Ok(pass)
}

/// Runs a pass now and then every `every` until `stop` flips. Failures are logged and
/// retried at the next tick: retention is never urgent.
pub async fn run_periodically(
    pool: PgPool,
    every: Duration,
    ahead_days: i64,
    keep: housekeeping::Keep,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match run_once(&pool, ahead_days).await {
            Ok(p)
                if p.partitions_dropped > 0
                    || p.rollup_rows_deleted > 0
                    || p.chunks_compressed > 0 =>
            {
                tracing::info!(?p, "retention pass")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention pass failed"),
        }
        match housekeeping::sweep(&pool, keep).await {
            Ok(s) if s.total() > 0 => tracing::info!(?s, "control schema swept"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "control schema sweep failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
