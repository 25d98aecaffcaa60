//! The compactor: folds the per-minute per-key rollup deltas that batches append
//! (`activity_1m_pending`, tenant templates 0010 to 0012) into the minute's, the hour's and
//! the day's folded tables every `compact_interval_ms`, for the schemas the metrics loop wrote since
//! ([`Dirty`]); at start, for every schema, so that deltas left by a stop are folded too.
//! It runs on a connection of its own, beside the consume loop: a batch appends and goes on,
//! and the merging happens once per key and interval instead of once per key and batch.
//! Readers see every event once throughout (see [`rollups::compact`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shared::tenant::{SchemaName, TenantId};
use sqlx::PgPool;
use tokio::sync::watch;

use crate::batch::refused_record;
use crate::models::rollups;

/// How long a schema whose deltas PostgreSQL refuses to fold (a sum out of range) is left
/// alone before it is tried again. Its readers still see every delta, through the view.
const REFUSED_PAUSE: Duration = Duration::from_secs(600);

/// Schemas with deltas to fold, marked by the consume loop after each committed batch.
#[derive(Clone, Default)]
pub struct Dirty(Arc<Mutex<HashSet<SchemaName>>>);

impl Dirty {
    pub fn mark(&self, schemas: impl IntoIterator<Item = SchemaName>) {
        self.0.lock().expect("dirty set").extend(schemas);
    }

    fn take(&self) -> HashSet<SchemaName> {
        std::mem::take(&mut *self.0.lock().expect("dirty set"))
    }
}

/// Every tenant schema that is served or was (deltas may wait in any of them after a stop),
/// not the versions a replay is still building: their keys are dropped until the rebuild
/// ends, and the replay folds their deltas itself after the switch. Nor the schemas not
/// upgraded to this binary's templates yet (`migrate` failed for them): their deltas are
/// folded as their template says, by the upgrade (tenant template 0011).
async fn every_schema(pool: &PgPool) -> sqlx::Result<Vec<SchemaName>> {
    let rows: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
        "SELECT s.tenant_id, s.version
           FROM control.tenant_schemas s
           LEFT JOIN control.tenant_versions v ON v.tenant_id = s.tenant_id
          WHERE s.version <= COALESCE(v.active_version, 1) AND s.template_version = $1",
    )
    .bind(crate::schema::TEMPLATE_VERSION)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(tenant, version)| TenantId(tenant).schema(version))
        .collect())
}

/// Folds the deltas of the marked schemas every `every`, until `stop` fires.
pub async fn run(pool: PgPool, dirty: Dirty, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut paused: HashMap<SchemaName, Instant> = HashMap::new();
    let mut all_once = true;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        let mut schemas = dirty.take();
        if all_once {
            match every_schema(&pool).await {
                Ok(all) => {
                    schemas.extend(all);
                    all_once = false;
                }
                Err(e) => tracing::debug!(error = %e, "compactor: listing schemas failed"),
            }
        }
        paused.retain(|_, until| *until > Instant::now());
        for schema in schemas {
            if paused.contains_key(&schema) {
                dirty.mark([schema]);
                continue;
            }
            let started = Instant::now();
            match rollups::compact(&pool, &schema).await {
                Ok(Some(rows)) => {
                    metrics::counter!("projector_compacted_rows_total").increment(rows);
                    metrics::histogram!("projector_compaction_seconds")
                        .record(started.elapsed().as_secs_f64());
                }
                // Busy (another instance folding it, retention): next time.
                Ok(None) => dirty.mark([schema]),
                // A schema dropped since (a replay's old version): nothing left to fold.
                Err(e) if matches!(db_code(&e).as_deref(), Some("3F000" | "42P01")) => {}
                Err(e) => {
                    if let Some(reason) = refused_record(&e) {
                        tracing::error!(%schema, %reason, "compactor: deltas refused; pausing this schema");
                        metrics::counter!("projector_compactions_refused_total").increment(1);
                        paused.insert(schema.clone(), Instant::now() + REFUSED_PAUSE);
                    } else {
                        tracing::warn!(%schema, error = %e, "compactor: folding failed; trying again");
                    }
                    dirty.mark([schema]);
                }
            }
        }
    }
}

fn db_code(e: &sqlx::Error) -> Option<String> {
    e.as_database_error()?.code().map(|c| c.into_owned())
}
