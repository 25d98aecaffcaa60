//! Daily partitions of a tenant schema's raw tables (native partitioning; TimescaleDB makes
//! its chunks by itself), and retention: dropping partitions or chunks and rollup rows older
//! than the tenant's windows, compressing old chunks.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use shared::tenant::SchemaName;
use sqlx::{AssertSqlSafe, PgConnection};

use super::{set_search_path, timescale_schema, uses_timescale, RAW_TABLES};

/// The days whose partitions are kept made: yesterday, today and the next `ahead_days`.
pub fn days_ahead(today: NaiveDate, ahead_days: i64) -> Vec<NaiveDate> {
    (-1..=ahead_days)
        .map(|d| today + Duration::days(d))
        .collect()
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight").and_utc()
}

/// Name of the daily partition of `table` holding `day`.
fn partition_name(table: &str, day: NaiveDate) -> String {
    format!("{table}_p{}", day.format("%Y%m%d"))
}

/// Creates the daily partitions of every raw table for `days` (native partitioning only;
/// TimescaleDB creates its chunks by itself). Idempotent and safe against concurrent callers.
pub async fn ensure_partitions(
    conn: &mut PgConnection,
    schema: &SchemaName,
    days: &[NaiveDate],
) -> sqlx::Result<()> {
    make_partitions(conn, schema, days, true).await
}

/// [`ensure_partitions`]; those it creates without `autovacuum` are left alone by
/// autovacuum (a rebuild's bulk load: see [`super::set_autovacuum`]).
pub async fn make_partitions(
    conn: &mut PgConnection,
    schema: &SchemaName,
    days: &[NaiveDate],
    autovacuum: bool,
) -> sqlx::Result<()> {
    if days.is_empty() || uses_timescale(&mut *conn, schema).await? {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // A lock of the schema's partitions alone: the schema's own lock is held while its
    // rollups are folded (the compactor, retention), which partitions need not wait for.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.partitions'), hashtext($1))")
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
    // A table of a partition's name that is not attached is one retention detached and has
    // not dropped yet (its rows are past the window): left alone.
    let tables = tables(&mut tx, schema).await?;
    for day in days {
        let from = midnight(*day);
        let to = from + Duration::days(1);
        for table in RAW_TABLES {
            let part = partition_name(table, *day);
            match tables.iter().find(|(name, _)| *name == part) {
                Some((_, Some(_))) => continue,
                Some((_, None)) => {
                    tracing::warn!(%schema, partition = %part, "a detached partition is not made again");
                    continue;
                }
                None => {}
            }
            // Made apart, then attached: attaching asks the raw table only for a lock that
            // neither its readers nor its writers wait for, or make wait. `CREATE TABLE …
            // PARTITION OF` asked for an exclusive one, which waited for every read of the
            // tenant's raw table, and every batch waited behind it.
            let create = format!(
                "CREATE TABLE {schema}.{part} (LIKE {schema}.{table} \
                 INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE \
                 INCLUDING COMPRESSION){with}",
                with = if autovacuum {
                    ""
                } else {
                    " WITH (autovacuum_enabled = false)"
                },
            );
            sqlx::query(AssertSqlSafe(create)).execute(&mut *tx).await?;
            let attach = format!(
                "ALTER TABLE {schema}.{table} ATTACH PARTITION {schema}.{part} \
                 FOR VALUES FROM ('{from}') TO ('{to}')",
                from = from.format("%Y-%m-%d %H:%M:%S+00"),
                to = to.format("%Y-%m-%d %H:%M:%S+00"),
            );
            sqlx::query(AssertSqlSafe(attach)).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Folds the pending rollup deltas of minutes before `cutoff` (they are the hour's and the
/// day's too until folded, and the minute's window is about to end), first of all, while the
/// transaction holds no table lock. A fold PostgreSQL refuses (a sum out of range, which the
/// compactor pauses on too) leaves them waiting, and the rest of retention goes on.
async fn fold_old_minutes(
    tx: &mut PgConnection,
    schema: &SchemaName,
    cutoff: DateTime<Utc>,
) -> sqlx::Result<()> {
    set_search_path(&mut *tx, schema).await?;
    sqlx::query("SAVEPOINT fold").execute(&mut *tx).await?;
    match crate::models::rollups::fold_before(&mut *tx, cutoff).await {
        Ok(_) => {}
        Err(e) if crate::batch::refused_record(&e).is_some() => {
            tracing::warn!(%schema, error = %e, "retention: old minute deltas refused; left pending");
            sqlx::query("ROLLBACK TO SAVEPOINT fold")
                .execute(&mut *tx)
                .await?;
        }
        Err(e) => return Err(e),
    }
    sqlx::query("RELEASE SAVEPOINT fold")
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What [`apply_retention`] removed from one schema.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Daily partitions (or TimescaleDB chunks) of raw tables dropped.
    pub partitions: u64,
    /// Rollup rows deleted.
    pub rollup_rows: u64,
    /// TimescaleDB chunks compressed (or recompressed after late events).
    pub chunks_compressed: u64,
}

/// The day a partition made by [`ensure_partitions`] holds, if `name` is one of them.
fn partition_day(name: &str) -> Option<(&'static str, NaiveDate)> {
    let (table, day) = name.rsplit_once("_p")?;
    let table = RAW_TABLES.iter().find(|t| **t == table)?;
    if day.len() != 8 || !day.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((table, NaiveDate::parse_from_str(day, "%Y%m%d").ok()?))
}

/// A tenant's windows, in days, as `control.tenants` keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// Raw rows and minute rollups are kept this long.
    pub raw_days: i64,
    /// Hourly and daily rollups are kept this long.
    pub rollup_days: i64,
    /// Raw chunks older than this are compressed (TimescaleDB only).
    pub compress_after_days: i64,
    /// Native partitions are made this many days ahead.
    pub ahead_days: i64,
}

/// Drops raw data older than the raw window (whole daily partitions, or chunks with
/// TimescaleDB) and rollup rows older than their windows: minute rollups follow the raw
/// window, hourly and daily ones the rollup window. Creates the partitions of the coming days,
/// and with TimescaleDB compresses the raw chunks older than `compress_after_days` (again
/// those a late event has partly decompressed). Skips (returns `None`) when another instance
/// is working on the same schema, or when the schema no longer has every template of this
/// binary (checked under the schema's lock, as the compactor checks it: its listing may be
/// older, and this fold writes the folded rows as the latest template reads them).
///
/// One pass at a time works on a schema, across instances: it holds a session lock of
/// retention's own through the pass (and skips the schema when another pass holds it). Only
/// the fold holds the schema's lock, which the compactor shares. Live batches write every
/// tenant's rows in one transaction, so the raw tables are not locked against them: old
/// partitions are detached concurrently (which waits for the batches, not they for it) and
/// then dropped, and the old rollup rows are deleted afterwards, in a transaction of their
/// own. (Before, the drop's exclusive lock on the tenant's raw tables was held through every
/// delete, and every batch carrying one of its events waited.)
pub async fn apply_retention(
    conn: &mut PgConnection,
    schema: &SchemaName,
    today: NaiveDate,
    windows: Windows,
) -> sqlx::Result<Option<Pruned>> {
    let ours: bool = sqlx::query_scalar(
        "SELECT pg_try_advisory_lock(hashtext('tally.retention'), hashtext($1))",
    )
    .bind(schema.as_str())
    .fetch_one(&mut *conn)
    .await?;
    if !ours {
        return Ok(None);
    }
    let pruned = prune(&mut *conn, schema, today, windows).await;
    // Given back whatever the pass came to (a connection that broke gave it back already).
    let unlocked =
        sqlx::query("SELECT pg_advisory_unlock(hashtext('tally.retention'), hashtext($1))")
            .bind(schema.as_str())
            .execute(&mut *conn)
            .await;
    let pruned = pruned?;
    unlocked?;
    Ok(pruned)
}

/// [`apply_retention`]'s pass, under its lock.
async fn prune(
    conn: &mut PgConnection,
    schema: &SchemaName,
    today: NaiveDate,
    windows: Windows,
) -> sqlx::Result<Option<Pruned>> {
    ensure_partitions(&mut *conn, schema, &days_ahead(today, windows.ahead_days)).await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if !super::try_lock(&mut tx, schema).await?
        || !super::has_every_template(&mut tx, schema).await?
    {
        return Ok(None);
    }
    let raw_cutoff = today - Duration::days(windows.raw_days);
    let rollup_cutoff = today - Duration::days(windows.rollup_days);
    let mut pruned = Pruned::default();
    fold_old_minutes(&mut tx, schema, midnight(raw_cutoff)).await?;
    let timescale = match uses_timescale(&mut tx, schema).await? {
        true => timescale_schema(&mut tx).await?,
        false => None,
    };
    tx.commit().await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if let Some(ts) = &timescale {
        let sql =
            format!("SELECT {ts}.drop_chunks($1::regclass, older_than => $2::timestamptz)::text");
        for table in RAW_TABLES {
            let dropped: Vec<String> = sqlx::query_scalar(AssertSqlSafe(sql.as_str()))
                .bind(format!("{schema}.{table}"))
                .bind(midnight(raw_cutoff))
                .fetch_all(&mut *tx)
                .await?;
            pruned.partitions += dropped.len() as u64;
        }
        tx.commit().await?;
    } else {
        tx.commit().await?;
        pruned.partitions += drop_partitions(&mut *conn, schema, raw_cutoff).await?;
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    set_search_path(&mut tx, schema).await?;
    for (sql, cutoff) in [
        (
            "DELETE FROM activity_1m_folded WHERE bucket < $1",
            raw_cutoff,
        ),
        (
            "DELETE FROM activity_1h_folded WHERE bucket < $1",
            rollup_cutoff,
        ),
        (
            "DELETE FROM activity_1d_folded WHERE bucket < $1",
            rollup_cutoff,
        ),
        ("DELETE FROM activity_all_1m WHERE bucket < $1", raw_cutoff),
        (
            "DELETE FROM activity_all_1h WHERE bucket < $1",
            rollup_cutoff,
        ),
        (
            "DELETE FROM activity_all_1d WHERE bucket < $1",
            rollup_cutoff,
        ),
        ("DELETE FROM active_users_1m WHERE bucket < $1", raw_cutoff),
        (
            "DELETE FROM active_users_1h WHERE bucket < $1",
            rollup_cutoff,
        ),
        (
            "DELETE FROM active_users_1d WHERE bucket < $1",
            rollup_cutoff,
        ),
        // Attribution: its per-event rows live as long as raw rows, its rollups as rollups.
        (
            "DELETE FROM session_usage WHERE occurred_at < $1",
            raw_cutoff,
        ),
        ("DELETE FROM session_contexts WHERE at < $1", raw_cutoff),
        ("DELETE FROM repo_usage_1h WHERE bucket < $1", rollup_cutoff),
        ("DELETE FROM repo_usage_1d WHERE bucket < $1", rollup_cutoff),
        // A session is a rollup of its events: it lives as long as rollups do.
        (
            "DELETE FROM sessions WHERE coalesce(ended_at, started_at) < $1",
            rollup_cutoff,
        ),
        (
            "DELETE FROM repo_sessions WHERE last_at < $1",
            rollup_cutoff,
        ),
        (
            "DELETE FROM repository_events WHERE occurred_at < $1",
            rollup_cutoff,
        ),
    ] {
        pruned.rollup_rows += sqlx::query(sql)
            .bind(midnight(cutoff))
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    tx.commit().await?;
    if let Some(ts) = &timescale {
        let cutoff = today - Duration::days(windows.compress_after_days);
        pruned.chunks_compressed = compress_chunks(&mut *conn, ts, schema, cutoff).await?;
    }
    Ok(Some(pruned))
}

/// The names of every partition in `schema` (native partitioning).
pub async fn partitions(conn: &mut PgConnection, schema: &SchemaName) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT c.relname::text
           FROM pg_inherits i
           JOIN pg_class c ON c.oid = i.inhrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1",
    )
    .bind(schema.as_str())
    .fetch_all(conn)
    .await
}

/// Drops the daily partitions older than `cutoff` (native partitioning), each detached first
/// with `CONCURRENTLY`: that takes no lock a live batch's insert waits for, and waits itself
/// for the transactions using the raw table. A detach left pending (its process stopped
/// midway) is finished first (a raw table may have only one, and it stops the others), and a
/// partition detached but not dropped is dropped. Each statement is a transaction of its own
/// (a concurrent detach may not run in a transaction block); a partition that cannot go now
/// is left for the next pass, and the others go on.
async fn drop_partitions(
    conn: &mut PgConnection,
    schema: &SchemaName,
    cutoff: NaiveDate,
) -> sqlx::Result<u64> {
    let mut dropped = 0;
    for (part, detach_pending) in tables(&mut *conn, schema).await? {
        // Only names this module made (table_pYYYYMMDD) are considered, and those are plain
        // identifiers.
        let Some((table, day)) = partition_day(&part) else {
            continue;
        };
        if day >= cutoff || part != partition_name(table, day) {
            continue;
        }
        let detach = match detach_pending {
            Some(false) => Some("CONCURRENTLY"),
            Some(true) => Some("FINALIZE"),
            None => None,
        };
        match detach_and_drop(&mut *conn, schema, table, &part, detach).await {
            Ok(()) => dropped += 1,
            // The database is gone: so is the rest of this pass.
            Err(e) if shared::db::unavailable(&e) => return Err(e),
            Err(e) => tracing::warn!(
                %schema,
                partition = %part,
                error = %e,
                "retention left a partition for the next pass"
            ),
        }
    }
    Ok(dropped)
}

/// Every table of `schema`, with `Some(detach pending)` when it is a partition, pending
/// detaches first.
async fn tables(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> sqlx::Result<Vec<(String, Option<bool>)>> {
    sqlx::query_as(
        "SELECT c.relname::text, i.inhdetachpending
           FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
          WHERE n.nspname = $1 AND c.relkind = 'r'
          ORDER BY i.inhdetachpending DESC NULLS LAST, c.relname",
    )
    .bind(schema.as_str())
    .fetch_all(conn)
    .await
}

/// Detaches `part` from `table` (`how`: `CONCURRENTLY`, or `FINALIZE` for a pending detach;
/// none when it is detached already), then drops it.
async fn detach_and_drop(
    conn: &mut PgConnection,
    schema: &SchemaName,
    table: &str,
    part: &str,
    how: Option<&str>,
) -> sqlx::Result<()> {
    if let Some(how) = how {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ALTER TABLE {schema}.{table} DETACH PARTITION {schema}.{part} {how}"
        )))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {schema}.{part}"
    )))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Compresses the raw chunks of `schema` that end before `cutoff` and are not compressed, or
/// only partly (a late event decompressed what its duplicate check touched). One chunk per
/// statement, so a chunk is locked only while it is being compressed. Returns how many.
async fn compress_chunks(
    conn: &mut PgConnection,
    ts: &str,
    schema: &SchemaName,
    cutoff: NaiveDate,
) -> sqlx::Result<u64> {
    // Status bit 8: partially compressed (TimescaleDB's chunk status flags).
    let chunks: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', chunk_schema, chunk_name)
           FROM timescaledb_information.chunks
          WHERE hypertable_schema = $1 AND range_end <= $2
            AND (NOT is_compressed
                 OR _timescaledb_functions.chunk_status(
                        format('%I.%I', chunk_schema, chunk_name)::regclass) & 8 <> 0)
          ORDER BY range_start",
    )
    .bind(schema.as_str())
    .bind(midnight(cutoff))
    .fetch_all(&mut *conn)
    .await?;
    let sql = format!("SELECT {ts}.compress_chunk($1::regclass, if_not_compressed => true)");
    for chunk in &chunks {
        sqlx::query(AssertSqlSafe(sql.as_str()))
            .bind(chunk)
            .execute(&mut *conn)
            .await?;
    }
    Ok(chunks.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_are_dated() {
        let d = NaiveDate::from_ymd_opt(2026, 1, 5).unwrap();
        assert_eq!(
            partition_name("metric_samples", d),
            "metric_samples_p20260105"
        );
    }

    #[test]
    fn only_our_partition_names_are_recognised() {
        let d = NaiveDate::from_ymd_opt(2026, 1, 5).unwrap();
        assert_eq!(
            partition_day("tool_executions_p20260105"),
            Some(("tool_executions", d))
        );
        assert_eq!(partition_day("tool_executions_p2026010"), None);
        assert_eq!(partition_day("other_table_p20260105"), None);
        assert_eq!(partition_day("tool_executions_p2026-1-5"), None);
    }
}
