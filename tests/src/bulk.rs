//! A tenant's projection written in bulk: what projecting a set of events would leave — raw
//! rows and rollups built by the projector's own code (`RawRow::from_event`, `rollups::fold`,
//! `tenant_wide`, `active_users`) — written with COPY instead of batch by batch, so that the
//! read benchmark can hold tens of millions of events without hours of projecting. The e2e
//! test `bulk::loads_what_the_projector_writes` checks it against a projector-built tenant.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use ingest_api::ingest::{IngestContext, TimeBounds};
use projector::models::raw::{self, RawRow, RawTable};
use projector::models::rollups::{self, Copies, Cube, Grain, Key, Measures};
use projector::schema::{self, partitions};
use serde_json::Value;
use shared::events::{Actor, Envelope, Payload, Source};
use shared::tenant::{SchemaName, TenantId};

/// Loads a tenant's schema version 1 in parts. Rollups are folded across parts and held:
/// minute and hour ones until [`BulkLoad::flush`] (so flushed parts must not share a minute or
/// hour bucket), daily ones until [`BulkLoad::finish`].
pub struct BulkLoad {
    schema: SchemaName,
    ctx: IngestContext,
    /// Raw rows and minute rollups are written from here on only (what a raw retention
    /// leaves); `None`: all of them.
    raw_since: Option<DateTime<Utc>>,
    events: i64,
    held: [BTreeMap<Key, Measures>; 3],
}

impl BulkLoad {
    /// Creates the tenant's schema and, with native partitions, the partitions of `days`.
    /// With `raw_since`, raw rows and minute rollups before it are not written, as a raw
    /// retention ending there would have dropped them (hourly and daily rollups are kept).
    pub async fn new(
        conn: &mut sqlx::PgConnection,
        tenant: TenantId,
        days: &[NaiveDate],
        raw_since: Option<DateTime<Utc>>,
    ) -> anyhow::Result<BulkLoad> {
        schema::create_tenant_schema(&mut *conn, tenant, 1).await?;
        let schema = tenant.schema(1);
        partitions::ensure_partitions(&mut *conn, &schema, days).await?;
        Ok(BulkLoad {
            schema,
            ctx: ingest_context(tenant),
            raw_since,
            events: 0,
            held: Default::default(),
        })
    }

    /// Writes one part: `events` in their client form, each moved `shift` earlier. Returns
    /// how many were written (an event that projects to no raw row is skipped, as the
    /// projector skips it).
    pub async fn add(
        &mut self,
        conn: &mut sqlx::PgConnection,
        events: Vec<Value>,
        shift: TimeDelta,
    ) -> anyhow::Result<usize> {
        let decoded = decode(&self.ctx, events)?;
        self.add_decoded(conn, &decoded, shift).await
    }

    /// [`BulkLoad::add`] of events already through [`decode`] (which may run on other
    /// threads).
    pub async fn add_decoded(
        &mut self,
        conn: &mut sqlx::PgConnection,
        decoded: &[(Envelope, Payload)],
        shift: TimeDelta,
    ) -> anyhow::Result<usize> {
        let mut rows: Vec<RawRow> = Vec::with_capacity(decoded.len());
        for (env, payload) in decoded {
            if let Some(mut r) = RawRow::from_event(env, payload) {
                r.occurred_at -= shift;
                rows.push(r);
            }
        }
        // What a raw retention from `raw_since` keeps: the raw rows and minute rollups.
        let since = self.raw_since;
        let (recent, old): (Vec<RawRow>, Vec<RawRow>) = rows
            .into_iter()
            .partition(|r| since.is_none_or(|t| r.occurred_at >= t));
        for chunk in recent.chunks(50_000) {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            schema::set_search_path(&mut tx, &self.schema).await?;
            raw::copy(&mut tx, chunk, 1, &RawTable::ALL).await?;
            tx.commit().await?;
        }
        for (held, grain) in self.held.iter_mut().zip(GRAINS) {
            let folded = match grain {
                Grain::Minute => rollups::fold(recent.iter(), grain),
                _ => rollups::fold(recent.iter().chain(&old), grain),
            };
            for (k, m) in folded {
                held.entry(k).or_default().add(&m);
            }
        }
        let n = recent.len() + old.len();
        self.events += n as i64;
        Ok(n)
    }

    /// Writes the minute and hour rollups held so far.
    pub async fn flush(&mut self, conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        for (held, grain) in self.held.iter_mut().zip(GRAINS).take(2) {
            write_grain(&mut *conn, &self.schema, grain, &std::mem::take(held)).await?;
        }
        Ok(())
    }

    /// Writes every rollup still held, records the events as projected, and vacuums and
    /// analyses the rollups (as autovacuum would have by the time anyone reads them).
    pub async fn finish(mut self, conn: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        self.flush(&mut *conn).await?;
        let schema = &self.schema;
        write_grain(&mut *conn, schema, Grain::Day, &self.held[2]).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {schema}.projection_state SET seq = seq + 1, events = $1, as_of = now()"
        )))
        .bind(self.events)
        .execute(&mut *conn)
        .await?;
        let tables: Vec<String> = rollups::STORES
            .iter()
            .map(|t| format!("{schema}.{t}"))
            .collect();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "VACUUM (ANALYZE) {}",
            tables.join(", ")
        )))
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Events in their client form through ingest-api's validation (as [`ingest_context`]) into
/// what the projector reads: CPU work only, so a loader may run it on several threads.
pub fn decode(ctx: &IngestContext, events: Vec<Value>) -> anyhow::Result<Vec<(Envelope, Payload)>> {
    let mut decoded = Vec::with_capacity(events.len());
    for (i, event) in events.into_iter().enumerate() {
        let env = ctx
            .envelope(i, event)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let payload = env.payload().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        decoded.push((env, payload));
    }
    Ok(decoded)
}

/// How the benchmarks turn generated events into envelopes: ingest-api's own validation,
/// as an API request of `tenant` now, with bounds wide enough for any generated time.
pub fn ingest_context(tenant: TenantId) -> IngestContext {
    IngestContext {
        tenant_id: tenant,
        actor: Actor::default(),
        source: Source::Api,
        received_at: Utc::now(),
        bounds: TimeBounds {
            max_future_skew: TimeDelta::days(1),
            retention: TimeDelta::days(3650),
        },
        ids: ingest_api::ingest::Ids::Fresh,
    }
}

const GRAINS: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

/// Writes one grain's per-key rollups, and the tenant-wide ones and active users derived from
/// them, as the projector's transaction would have left them (with the projector's own
/// `COPY` writer, [`Copies`]).
async fn write_grain(
    conn: &mut sqlx::PgConnection,
    schema: &SchemaName,
    grain: Grain,
    keyed: &BTreeMap<Key, Measures>,
) -> anyhow::Result<()> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    schema::set_search_path(&mut tx, schema).await?;
    let mut out = Copies::default();
    for (k, m) in keyed {
        out.rollup(grain, Cube::Keys, k, m);
        out.send_full(&mut tx).await?;
    }
    for (k, m) in &rollups::tenant_wide(keyed) {
        out.rollup(grain, Cube::Tenant, k, m);
    }
    for (bucket, user) in rollups::active_users(keyed) {
        out.active_user(grain, bucket, user);
    }
    out.finish(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}
