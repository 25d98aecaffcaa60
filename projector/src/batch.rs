//! One batch, one transaction: for each tenant of the batch its watermark lock and raw rows,
//! then for each its other read models in order (audit, people, attribution, the rollups of
//! the rows really inserted, sessions, watermark), then the next Kafka offset of every
//! partition the batch covers, as a compare-and-set. A live batch may write its raw rows
//! while the batch before it finishes ([`Pipeline`]). The models' folds and SQL live in
//! [`crate::models`], the schemas and version checks in [`crate::prepare`], the offsets in
//! [`crate::offsets`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use shared::events::{Envelope, Payload};
use shared::tenant::{SchemaName, TenantId};
use sqlx::{PgConnection, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::models::raw::RawTable;
use crate::models::rollups;
use crate::models::{attribution, audit, people, raw, sessions, watermark};
use crate::offsets::{self, OffsetRange};
use crate::prepare::{target_versions, Target};
use crate::schema;

/// How long a batch waits for Redis to take its watermarks before committing without.
const ANNOUNCE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(200);

/// How long a batch written ahead waits for the batch before it to land, holding the keys of
/// its raw rows, before it rolls back to be written again in turn. A batch takes about a
/// tenth of a second, a few seconds when PostgreSQL is slow; the wait only ends a lock cycle
/// PostgreSQL cannot see because one of its waits is in this process, should one arise.
const AHEAD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A decoded event waiting in a batch.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub env: Envelope,
    pub payload: Payload,
    /// Where the record was read from: (partition, offset). Used to dead-letter it.
    pub origin: (i32, i64),
}

/// What a committed batch did.
#[derive(Debug, Default, Clone)]
pub struct Written {
    pub inserted: u64,
    pub duplicates: u64,
    /// Tenants whose projection advanced, with their new watermark sequence.
    pub tenants: Vec<(TenantId, i64)>,
    /// The schemas written to (where rollup deltas now wait for the compactor).
    pub schemas: Vec<SchemaName>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The stored offsets were not where this batch started: another instance owns (or
    /// advanced) the partition. Nothing was written.
    #[error("offsets of partition {partition} moved under us; batch rolled back")]
    Fenced { partition: i32 },
    /// A replay switched a tenant of the batch to a new projection version after the batch
    /// was prepared. Nothing was written; prepare again with the new versions.
    #[error("a tenant's projection version changed; batch rolled back")]
    VersionMoved,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// A bulk-load batch's first transaction committed, but the raw rows its second
    /// connection copied could not be written again after their commit failed: the rebuild
    /// cannot go on exactly and has to start over.
    #[error("a bulk-load batch was written only in part: {0}")]
    HalfWritten(sqlx::Error),
    /// A batch written ahead of the one before it ([`Pipeline::ahead_of`]) was rolled back:
    /// that batch did not land, or not within [`AHEAD_WAIT`]. Nothing was written; the batch
    /// is written again in turn.
    #[error("a batch written ahead was rolled back; written again in turn")]
    Ahead,
}

/// How a batch is written.
pub enum Mode<'a> {
    /// Live traffic: rollup deltas written in the batch's transaction. With a Redis connection,
    /// the watermark each tenant will have is announced just before the commit
    /// ([`shared::watermark::raise`]), for the cache lookups that open no transaction.
    Live(Option<&'a mut ConnectionManager>, Pipeline),
    /// A rebuild's bulk load into versions nobody reads yet: raw rows on two connections,
    /// about half of them on the second at the same time (committed right after the
    /// first: [`commit_second`]), and no rollups (built from the raw rows once the bulk
    /// load is done: [`rollups::rebuild`]).
    Bulk,
}

/// The live feed position each tenant of a batch gives its rows (its watermark's `seq`).
pub type Seqs = HashMap<TenantId, i64>;

/// How a live batch overlaps the batches beside it (the consume loop's pipeline): a batch's
/// raw rows are written while the batch before it writes its other models and commits.
#[derive(Default)]
pub struct Pipeline {
    /// Told the batch's feed positions once its raw rows are written: the batch after it may
    /// start writing then.
    pub raw_written: Option<oneshot::Sender<Seqs>>,
    /// Set for a batch written ahead of the one before it, which has not landed yet.
    pub ahead_of: Option<AheadOf>,
}

/// What a batch written ahead needs from the batch before it.
pub struct AheadOf {
    /// The feed positions the batch before gives its tenants; this batch's are the next.
    pub before: Seqs,
    /// Whether the batch before landed (committed).
    pub landed: oneshot::Receiver<bool>,
}

/// Writes the batch and advances the offsets, all in one transaction: every tenant's raw
/// rows first, then every tenant's other models (see [`write_models`]).
///
/// A batch written ahead ([`Pipeline::ahead_of`]) writes its raw rows with the feed
/// positions after the batch before's, without the tenants' watermark rows, then waits until
/// that batch has landed: only then does it lock the rows, check that the positions are
/// still the next (else its rows take the next: [`raw::restamp`]), write the rest and
/// commit, so the tenant's transactions still commit in feed order. Its raw rows wait for
/// the batch before only on a key both write (the unique index), and the batch before never
/// waits for it: it writes no raw rows after it signalled [`Pipeline::raw_written`]. A batch
/// that did not land makes the one ahead of it roll back ([`WriteError::Ahead`]).
pub async fn write(
    pool: &PgPool,
    projection: &str,
    topic: &str,
    target: Target<'_>,
    events: &[Decoded],
    offsets: &BTreeMap<i32, OffsetRange>,
    mode: Mode<'_>,
) -> Result<Written, WriteError> {
    let mut tx = pool.begin().await?;
    let mut written = Written::default();
    let versions = target_versions(&mut tx, target).await?;
    let (bulk, redis, pipeline) = match mode {
        Mode::Bulk => (true, None, Pipeline::default()),
        Mode::Live(redis, pipeline) => (false, redis, pipeline),
    };
    let mut second = match bulk {
        true => Some(pool.begin().await?),
        false => None,
    };
    let groups = by_tenant(events);
    let schemas: Vec<SchemaName> = groups
        .keys()
        .map(|t| t.schema(versions.get(t).copied().unwrap_or(1)))
        .collect();
    let rows: Vec<Vec<raw::RawRow>> = groups.values().map(|e| raw_rows(e)).collect();

    // Every tenant's raw rows.
    let mut seqs = Seqs::new();
    let mut inserted = Vec::with_capacity(groups.len());
    let mut copies = 0;
    for (((tenant, events), schema), rows) in groups.iter().zip(&schemas).zip(&rows) {
        schema::set_search_path(&mut tx, schema).await?;
        if let Some(second) = second.as_mut() {
            schema::set_search_path(second, schema).await?;
        }
        let feed_seq = match &pipeline.ahead_of {
            None => watermark::lock_next_seq(&mut tx).await?,
            Some(ahead) => match ahead.before.get(tenant) {
                Some(before) => before + 1,
                None => watermark::next_seq(&mut tx).await?,
            },
        };
        let copy = copies < COPY_MAX_GROUPS && events.len() >= COPY_MIN_EVENTS;
        copies += usize::from(copy);
        inserted
            .push(write_tenant_raw(&mut tx, second.as_deref_mut(), rows, feed_seq, copy).await?);
        seqs.insert(*tenant, feed_seq);
    }
    if let Some(raw_written) = pipeline.raw_written {
        let _ = raw_written.send(seqs.clone());
    }
    let ahead = pipeline.ahead_of.is_some();
    if let Some(AheadOf { landed, .. }) = pipeline.ahead_of {
        if !matches!(tokio::time::timeout(AHEAD_WAIT, landed).await, Ok(Ok(true))) {
            let _ = tx.rollback().await;
            return Err(WriteError::Ahead);
        }
    }

    // Every tenant's other models.
    for (((tenant, events), schema), (rows, inserted)) in
        groups.iter().zip(&schemas).zip(rows.iter().zip(&inserted))
    {
        if groups.len() > 1 {
            schema::set_search_path(&mut tx, schema).await?;
        }
        let mut feed_seq = seqs[tenant];
        if ahead {
            let next = watermark::lock_next_seq(&mut tx).await?;
            if next != feed_seq {
                // Another writer of the tenant (the auth topic's loop, another instance)
                // committed in between: this transaction's rows take the position after it.
                metrics::counter!("projector_ahead_restamped_total").increment(1);
                raw::restamp(&mut tx, inserted, next).await?;
                feed_seq = next;
            }
        }
        let (inserted, duplicates, seq) =
            write_models(&mut tx, events, rows, inserted, feed_seq, bulk).await?;
        written.inserted += inserted;
        written.duplicates += duplicates;
        written.tenants.push((*tenant, seq));
        written.schemas.push(schema.clone());
    }

    for (partition, range) in offsets {
        offsets::advance(&mut tx, projection, topic, *partition, *range).await?;
    }
    if let Some(redis) = redis {
        let announced: Vec<_> = written
            .tenants
            .iter()
            .map(|(tenant, seq)| (*tenant, versions.get(tenant).copied().unwrap_or(1), *seq))
            .collect();
        let raise = shared::watermark::raise(redis, &announced);
        if !matches!(
            tokio::time::timeout(ANNOUNCE_TIMEOUT, raise).await,
            Ok(Ok(()))
        ) {
            tracing::debug!("announcing watermarks failed; reads look them up in PostgreSQL");
        }
    }
    let Some(second) = second else {
        tx.commit().await?;
        return Ok(written);
    };
    commit_second(pool, tx, second, &groups, versions, &written).await?;
    Ok(written)
}

/// Commits a bulk batch's two transactions, the first (everything but the second
/// connection's raw rows) first. Nobody else writes to a rebuild's versions, so whether a
/// failed commit went through is known from the watermark, and neither half is lost or
/// written twice:
/// - the first did not commit: the second is rolled back, the batch fails and is written
///   again whole;
/// - the first did, the second not: the first counted the second's rows (watermark,
///   sessions, usage), so only those raw rows are copied again, until they are in (rows
///   that did get in are skipped by the insert after a unique violation).
async fn commit_second(
    pool: &PgPool,
    first: sqlx::Transaction<'_, sqlx::Postgres>,
    second: sqlx::Transaction<'_, sqlx::Postgres>,
    groups: &BTreeMap<TenantId, Vec<&Decoded>>,
    versions: &crate::prepare::Versions,
    written: &Written,
) -> Result<(), WriteError> {
    let schema = |t: &TenantId| t.schema(versions.get(t).copied().unwrap_or(1));
    if let Err(e) = first.commit().await {
        let Some((tenant, seq)) = written.tenants.first() else {
            return Err(e.into());
        };
        // Locking the row waits for the first transaction if its commit is still under way.
        let sql = format!(
            "SELECT seq FROM {}.projection_state FOR NO KEY UPDATE",
            schema(tenant)
        );
        let now: i64 = until_answered(|| async {
            let mut tx = pool.begin().await?;
            let seq = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone()))
                .fetch_one(&mut *tx)
                .await?;
            tx.rollback().await?;
            Ok(seq)
        })
        .await
        .map_err(WriteError::HalfWritten)?;
        if now < *seq {
            return Err(e.into());
        }
    }
    if second.commit().await.is_ok() {
        return Ok(());
    }
    until_answered(|| async {
        let mut tx = pool.begin().await?;
        for ((tenant, events), (_, seq)) in groups.iter().zip(&written.tenants) {
            schema::set_search_path(&mut tx, &schema(tenant)).await?;
            let rows = raw_rows(events);
            let [_, there] = raw::halves(&rows);
            copy_or_insert(&mut tx, &rows, *seq, &there).await?;
        }
        tx.commit().await
    })
    .await
    .map_err(WriteError::HalfWritten)
}

/// Runs `attempt` until PostgreSQL answers it, backing off; an error that is an answer
/// (anything but a lost or unavailable connection, or a conflict or timeout that passes:
/// classes 08, 40, 57, and 55P03) is returned.
async fn until_answered<T, F, Fut>(mut attempt: F) -> sqlx::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<T>>,
{
    let mut backoff = std::time::Duration::from_millis(200);
    loop {
        match attempt().await {
            Err(e @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed)) => {
                tracing::warn!(error = %e, "bulk batch: PostgreSQL is away; asking again");
            }
            Err(sqlx::Error::Database(d))
                if d.code().is_some_and(|c| {
                    ["08", "40", "57"].iter().any(|class| c.starts_with(class)) || c == "55P03"
                }) =>
            {
                tracing::warn!(error = %d, "bulk batch: PostgreSQL is away; asking again");
            }
            done => return done,
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}

/// The raw rows of one tenant's events, in the batch's order.
fn raw_rows<'a>(events: &[&'a Decoded]) -> Vec<raw::RawRow<'a>> {
    events
        .iter()
        .filter_map(|e| raw::RawRow::from_event(&e.env, &e.payload))
        .collect()
}

/// A batch's events grouped by tenant, each group in the batch's order.
fn by_tenant(events: &[Decoded]) -> BTreeMap<TenantId, Vec<&Decoded>> {
    let mut groups: BTreeMap<TenantId, Vec<&Decoded>> = BTreeMap::new();
    for e in events {
        groups.entry(e.env.tenant_id).or_default().push(e);
    }
    groups
}

/// Why PostgreSQL refused a statement because of the values it was given, not because it
/// is unavailable or busy: data exceptions (class 22: a NUL byte, a number out of range),
/// program limits (class 54: an index row over the btree limit), not-null and check
/// violations. No retry can change these; everything else (connection loss, serialization
/// failures, shutdown, lock timeouts) may pass on a retry.
pub fn refused_record(e: &sqlx::Error) -> Option<String> {
    let db = e.as_database_error()?;
    let code = db.code()?;
    let the_records_fault =
        code.starts_with("22") || code.starts_with("54") || code == "23502" || code == "23514";
    the_records_fault.then(|| format!("refused by PostgreSQL ({code}): {}", db.message()))
}

/// The events of a batch PostgreSQL refuses for their own sake (see [`refused_record`]), by
/// index into `events`, each with the reason.
///
/// Writes the batch in a transaction that is rolled back at the end, each group of one
/// tenant's events under a savepoint. A group that fails with a record fault is rolled back
/// to its savepoint and halved, until the events that fail on their own are found: k poison
/// events among n cost about k·log₂n statements. Groups that pass stay written, so a value
/// refused only together with others (a sum overflowing) is found too. Any other failure
/// ends the search with that error.
pub async fn find_refused(
    pool: &PgPool,
    target: Target<'_>,
    events: &[Decoded],
) -> Result<Vec<(usize, String)>, WriteError> {
    let mut by_tenant: BTreeMap<TenantId, Vec<usize>> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        by_tenant.entry(e.env.tenant_id).or_default().push(i);
    }
    let mut tx = pool.begin().await?;
    let versions = target_versions(&mut tx, target).await?;
    let mut refused = Vec::new();
    for (tenant, group) in by_tenant {
        let version = versions.get(&tenant).copied().unwrap_or(1);
        schema::set_search_path(&mut tx, &tenant.schema(version)).await?;
        // Groups still to try, the earliest events on top.
        let mut todo: Vec<Vec<usize>> = vec![group];
        while let Some(group) = todo.pop() {
            let refs: Vec<&Decoded> = group.iter().map(|&i| &events[i]).collect();
            sqlx::query("SAVEPOINT probe").execute(&mut *tx).await?;
            match write_tenant(&mut tx, &refs, false).await {
                Ok(_) => {
                    sqlx::query("RELEASE SAVEPOINT probe")
                        .execute(&mut *tx)
                        .await?;
                }
                Err(WriteError::Db(e)) => {
                    let Some(reason) = refused_record(&e) else {
                        return Err(WriteError::Db(e));
                    };
                    sqlx::query("ROLLBACK TO SAVEPOINT probe")
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("RELEASE SAVEPOINT probe")
                        .execute(&mut *tx)
                        .await?;
                    if let [one] = group.as_slice() {
                        refused.push((*one, reason));
                    } else {
                        let (first, rest) = group.split_at(group.len() / 2);
                        todo.push(rest.to_vec());
                        todo.push(first.to_vec());
                    }
                }
                Err(other) => return Err(other),
            }
        }
    }
    tx.rollback().await?;
    refused.sort_by_key(|(i, _)| *i);
    Ok(refused)
}

/// Writes one tenant's events (search_path already points at its schema): (inserted,
/// duplicates, new watermark seq). With `copy`, raw rows go by `COPY` ([`copy_or_insert`]),
/// else by the insert. A batch's tenants go through the same steps ([`write`]), its raw rows
/// first for every tenant.
async fn write_tenant(
    conn: &mut PgConnection,
    events: &[&Decoded],
    copy: bool,
) -> Result<(u64, u64, i64), WriteError> {
    let feed_seq = watermark::lock_next_seq(conn).await?;
    let rows = raw_rows(events);
    let inserted = write_tenant_raw(conn, None, &rows, feed_seq, copy).await?;
    write_models(conn, events, &rows, &inserted, feed_seq, false).await
}

/// One tenant's raw rows (search_path already points at its schema), all with `feed_seq`;
/// the rows really inserted. With `second` (a bulk load), the second of [`raw::halves`]
/// goes there meanwhile.
async fn write_tenant_raw<'r, 'a>(
    conn: &mut PgConnection,
    second: Option<&mut PgConnection>,
    rows: &'r [raw::RawRow<'a>],
    feed_seq: i64,
    copy: bool,
) -> sqlx::Result<Vec<&'r raw::RawRow<'a>>> {
    let phase = Instant::now();
    let inserted = match second {
        Some(second) => {
            let [here, there] = raw::halves(rows);
            let (mut here, there) = tokio::try_join!(
                write_raw(conn, rows, feed_seq, &here, copy),
                write_raw(second, rows, feed_seq, &there, copy)
            )?;
            here.extend(there);
            here
        }
        None => write_raw(conn, rows, feed_seq, &RawTable::ALL, copy).await?,
    };
    record_phase("raw", phase);
    Ok(inserted)
}

/// Everything of one tenant's events but the raw rows (search_path at its schema, the
/// tenant's watermark row locked by this transaction, `inserted` the raw rows of `rows`
/// really inserted): audit, people, attribution, rollups (not in `bulk`), sessions and the
/// watermark. Returns (inserted, duplicates, new watermark seq).
async fn write_models(
    conn: &mut PgConnection,
    events: &[&Decoded],
    rows: &[raw::RawRow<'_>],
    inserted_rows: &[&raw::RawRow<'_>],
    feed_seq: i64,
    bulk: bool,
) -> Result<(u64, u64, i64), WriteError> {
    let audited = audit::insert(conn, events).await?;
    people::apply(conn, events).await?;
    let inserted = inserted_rows.len() as u64;

    // The events whose raw rows were really inserted: what the later models fold.
    let inserted_ids: HashSet<Uuid> = inserted_rows.iter().map(|r| r.event_id).collect();
    let phase = Instant::now();
    let attributed = attribution::fold(events, &inserted_ids, inserted_rows);
    let repository_events = attribution::write(conn, &attributed, events, bulk).await?;
    record_phase("attribution", phase);
    // Events that are neither raw rows nor audited nor source-control events new here were
    // seen before.
    let duplicates = (events.len() - rows.len()) as u64 - audited - repository_events
        + rows.len() as u64
        - inserted;

    if !bulk {
        rollups::refuse_overflows(conn, inserted_rows).await?;
        rollups::write(conn, inserted_rows).await?;
    }
    let phase = Instant::now();
    let updates = sessions::fold(
        events
            .iter()
            .filter(|e| inserted_ids.contains(&e.env.id))
            .map(|e| (&e.env, &e.payload)),
    );
    sessions::upsert(conn, &updates).await?;
    record_phase("sessions", phase);

    let as_of: Option<DateTime<Utc>> = events.iter().map(|e| e.env.received_at).max();
    let seq = watermark::advance(conn, inserted, as_of).await?;
    debug_assert_eq!(
        seq, feed_seq,
        "projection_state is locked by this transaction"
    );
    Ok((inserted + audited + repository_events, duplicates, seq))
}

/// A batch writes a tenant's raw rows by `COPY` ([`copy_or_insert`]) if the tenant has at
/// least this many events in it; fewer are inserted, one round trip per table, no savepoint.
const COPY_MIN_EVENTS: usize = 64;

/// ... and for at most this many tenants per transaction. Each savepoint that writes is a
/// subtransaction with an id of its own; past 64 of them in one transaction, every other
/// session's snapshots must look them up in `pg_subtrans`, which slows the whole database.
const COPY_MAX_GROUPS: usize = 16;

/// A batch's raw rows of `tables`, by `COPY` or by the insert.
async fn write_raw<'r, 'a>(
    conn: &mut PgConnection,
    rows: &'r [raw::RawRow<'a>],
    feed_seq: i64,
    tables: &[RawTable],
    copy: bool,
) -> sqlx::Result<Vec<&'r raw::RawRow<'a>>> {
    if !rows.iter().any(|r| tables.contains(&r.table)) {
        Ok(Vec::new())
    } else if copy {
        copy_or_insert(conn, rows, feed_seq, tables).await
    } else {
        raw::insert_tables(conn, rows, feed_seq, tables).await
    }
}

/// A batch's raw rows of `tables`: `COPY` under a savepoint; if a key (event id and time) was
/// stored already or comes twice (a unique violation), rolled back to the savepoint and
/// inserted instead ([`raw::insert_tables`]), which keeps the first. Returns the rows really
/// inserted.
///
/// Live batches take this path too, for tenants with enough events in the batch: most hold
/// no key stored before, and `COPY` measured 13 % more live events projected per second than
/// the insert (33 % for OTLP points; tests/PERFORMANCE.md, sixteenth session). A tenant whose
/// events include one stored before pays for both statements; other tenants' statements do
/// not change, though they wait for them in the same transaction.
async fn copy_or_insert<'r, 'a>(
    conn: &mut PgConnection,
    rows: &'r [raw::RawRow<'a>],
    feed_seq: i64,
    tables: &[RawTable],
) -> sqlx::Result<Vec<&'r raw::RawRow<'a>>> {
    sqlx::query("SAVEPOINT bulk").execute(&mut *conn).await?;
    match raw::copy(conn, rows, feed_seq, tables).await {
        Ok(all) => Ok(all),
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") => {
            sqlx::query("ROLLBACK TO SAVEPOINT bulk")
                .execute(&mut *conn)
                .await?;
            raw::insert_tables(conn, rows, feed_seq, tables).await
        }
        Err(e) => Err(e),
    }
}

/// Time spent per write phase, to see where a batch's time goes.
pub(crate) fn record_phase(phase: &'static str, since: Instant) {
    metrics::histogram!("projector_phase_seconds", "phase" => phase)
        .record(since.elapsed().as_secs_f64());
}
