//! The one home of SQL built at run time. Tenant schema names are the only identifiers that
//! are not static; they come from [`TenantId::schema`] (hex digits only) and are spliced
//! here and nowhere else. Everything else is static SQL that runs after
//! [`set_search_path`] has pointed the transaction at the tenant's schema.

use std::collections::HashMap;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use sqlx::{AssertSqlSafe, PgConnection};

use crate::tenant::{SchemaName, TenantId};

/// The tenant-schema template (see `migrations/tenant/`).
pub const TEMPLATE: &str = include_str!("../../migrations/tenant/0001_tenant.sql");

/// Templates applied after the first, in order; `control.tenant_schemas.template_version`
/// records how many of all templates a schema has had.
pub const LATER_TEMPLATES: [&str; 5] = [
    include_str!("../../migrations/tenant/0002_audit.sql"),
    include_str!("../../migrations/tenant/0003_people.sql"),
    include_str!("../../migrations/tenant/0004_activity_events.sql"),
    include_str!("../../migrations/tenant/0005_activity_spans.sql"),
    include_str!("../../migrations/tenant/0006_feed_position.sql"),
];

/// Raw tables of the template: time-partitioned (or hypertables) on `occurred_at`.
pub const RAW_TABLES: [&str; 6] = [
    "command_executions",
    "agent_interactions",
    "tool_executions",
    "session_events",
    "productivity_metrics",
    "metric_samples",
];

/// `SET LOCAL search_path` to a tenant schema (plus `control` for shared functions).
/// Only valid inside a transaction, and only lasts until its end.
pub async fn set_search_path(conn: &mut PgConnection, schema: &SchemaName) -> sqlx::Result<()> {
    let sql = format!("SET LOCAL search_path TO {schema}, control");
    sqlx::query(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

/// How [`active_versions`] reads the version rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    None,
    /// `FOR SHARE`, as live batches read them: a replay's switch (which updates them) then
    /// waits for this transaction, and this one for the switch.
    Share,
    /// `FOR UPDATE`, as a replay's switch reads them: live batches of those tenants wait.
    Update,
}

/// The projection version each of `tenants` is served from (`control.tenant_versions`;
/// version 1 without a row).
pub async fn active_versions(
    conn: &mut PgConnection,
    tenants: &[TenantId],
    lock: Lock,
) -> sqlx::Result<HashMap<TenantId, i32>> {
    let ids: Vec<uuid::Uuid> = tenants.iter().map(|t| t.0).collect();
    let sql = match lock {
        Lock::None => {
            "SELECT tenant_id, active_version FROM control.tenant_versions WHERE tenant_id = ANY($1)"
        }
        Lock::Share => {
            "SELECT tenant_id, active_version FROM control.tenant_versions
              WHERE tenant_id = ANY($1) ORDER BY tenant_id FOR SHARE"
        }
        Lock::Update => {
            "SELECT tenant_id, active_version FROM control.tenant_versions
              WHERE tenant_id = ANY($1) ORDER BY tenant_id FOR UPDATE"
        }
    };
    let rows: Vec<(uuid::Uuid, i32)> = sqlx::query_as(sql).bind(ids).fetch_all(conn).await?;
    let mut versions: HashMap<TenantId, i32> = tenants.iter().map(|t| (*t, 1)).collect();
    for (t, v) in rows {
        versions.insert(TenantId(t), v);
    }
    Ok(versions)
}

/// Enters the tenant's active projection for reading ([`enter_tenant_readonly`]); returns
/// its version, or `None` when the tenant has no projection yet.
pub async fn enter_active_readonly(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> sqlx::Result<Option<i32>> {
    // The active version (1 without a row), if its schema has been made: one round trip.
    let version: Option<i32> = sqlx::query_scalar(
        "SELECT a.version
           FROM (SELECT COALESCE((SELECT active_version FROM control.tenant_versions
                                   WHERE tenant_id = $1), 1) AS version) a
          WHERE EXISTS (SELECT 1 FROM control.tenant_schemas s
                         WHERE s.tenant_id = $1 AND s.version = a.version)",
    )
    .bind(tenant.0)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(version) = version else {
        return Ok(None);
    };
    enter_tenant_readonly(conn, tenant, &tenant.schema(version)).await?;
    Ok(Some(version))
}

/// The schema of the TimescaleDB extension, quoted for splicing into SQL, if this database
/// has the extension. Its functions are called qualified: `search_path` is a tenant's schema.
pub async fn timescale_schema(conn: &mut PgConnection) -> sqlx::Result<Option<String>> {
    let schema: Option<String> = sqlx::query_scalar(
        "SELECT quote_ident(n.nspname)
           FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
          WHERE e.extname = 'timescaledb'",
    )
    .fetch_optional(conn)
    .await?;
    Ok(schema)
}

/// Whether `schema`'s raw tables are TimescaleDB hypertables (decided when it was made, and
/// recorded in `control.tenant_schemas`), rather than natively partitioned tables.
pub async fn uses_timescale(conn: &mut PgConnection, schema: &SchemaName) -> sqlx::Result<bool> {
    let timescale: Option<bool> =
        sqlx::query_scalar("SELECT timescale FROM control.tenant_schemas WHERE schema_name = $1")
            .bind(schema.as_str())
            .fetch_optional(conn)
            .await?;
    Ok(timescale.unwrap_or(false))
}

/// What [`create_tenant_schema`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaState {
    Created,
    /// It existed (and now has every template).
    Existed,
    /// The version is older than the tenant's active one: a replay has switched past it, so
    /// it is neither made nor upgraded. A writer that meets this re-reads the versions.
    Superseded,
}

/// Creates a tenant's schema for a projection version from the template, idempotently and
/// safely against concurrent projector instances.
pub async fn create_tenant_schema(
    conn: &mut PgConnection,
    tenant: TenantId,
    version: i32,
) -> sqlx::Result<SchemaState> {
    let schema = tenant.schema(version);
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.tenant_schemas WHERE tenant_id = $1 AND version = $2)",
    )
    .bind(tenant.0)
    .bind(version)
    .fetch_one(&mut *tx)
    .await?;
    let active = active_versions(&mut tx, &[tenant], Lock::None).await?[&tenant];
    if version < active {
        // A writer that has not seen a replay's switch yet must not resurrect the old
        // version's schema.
        return Ok(SchemaState::Superseded);
    }
    if exists {
        upgrade(&mut tx, tenant, version, &schema).await?;
        // Schemas made before reader roles existed get theirs here (idempotent).
        grant_reader(&mut tx, tenant, &schema).await?;
        tx.commit().await?;
        return Ok(SchemaState::Existed);
    }
    let timescale = timescale_schema(&mut tx).await?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut *tx)
    .await?;
    set_search_path(&mut tx, &schema).await?;
    let partitioning = if timescale.is_some() {
        ""
    } else {
        "PARTITION BY RANGE (occurred_at)"
    };
    sqlx::raw_sql(AssertSqlSafe(
        TEMPLATE.replace("/*PARTITIONING*/", partitioning),
    ))
    .execute(&mut *tx)
    .await?;
    if let Some(ts) = &timescale {
        for table in RAW_TABLES {
            // Daily chunks, as the native path's partitions; compressed (columnstore) by
            // retention once older than the tenant's `compress_after_days`. Ordered by time
            // and not segmented, so a late event's duplicate check decompresses only the
            // batches whose time range holds it (the key's other column, event_id, is ordered
            // on too, as TimescaleDB asks of the columns of a unique key).
            let sql = format!(
                "SELECT {ts}.create_hypertable($1::regclass, 'occurred_at', \
                 chunk_time_interval => INTERVAL '1 day', if_not_exists => true)"
            );
            sqlx::query(AssertSqlSafe(sql))
                .bind(format!("{schema}.{table}"))
                .execute(&mut *tx)
                .await?;
            sqlx::query(AssertSqlSafe(format!(
                "ALTER TABLE {schema}.{table} SET (timescaledb.compress, \
                 timescaledb.compress_orderby = 'occurred_at DESC, event_id', \
                 timescaledb.compress_segmentby = '')"
            )))
            .execute(&mut *tx)
            .await?;
        }
    }
    for later in LATER_TEMPLATES {
        sqlx::raw_sql(AssertSqlSafe(later))
            .execute(&mut *tx)
            .await?;
    }
    grant_reader(&mut tx, tenant, &schema).await?;
    sqlx::query(
        "INSERT INTO control.tenant_schemas
                (tenant_id, version, schema_name, timescale, template_version)
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(tenant.0)
    .bind(version)
    .bind(schema.as_str())
    .bind(timescale.is_some())
    .bind(1 + LATER_TEMPLATES.len() as i32)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SchemaState::Created)
}

/// Applies the templates a schema made by an older version has not had yet.
async fn upgrade(
    conn: &mut PgConnection,
    tenant: TenantId,
    version: i32,
    schema: &SchemaName,
) -> sqlx::Result<()> {
    let applied: i32 = sqlx::query_scalar(
        "SELECT template_version FROM control.tenant_schemas WHERE tenant_id = $1 AND version = $2",
    )
    .bind(tenant.0)
    .bind(version)
    .fetch_one(&mut *conn)
    .await?;
    let pending: Vec<&str> = LATER_TEMPLATES
        .iter()
        .skip(usize::try_from(applied - 1).unwrap_or(0))
        .copied()
        .collect();
    if pending.is_empty() {
        return Ok(());
    }
    set_search_path(&mut *conn, schema).await?;
    for sql in pending {
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query(
        "UPDATE control.tenant_schemas SET template_version = $3 WHERE tenant_id = $1 AND version = $2",
    )
    .bind(tenant.0)
    .bind(version)
    .bind(1 + LATER_TEMPLATES.len() as i32)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The tenant's database role: it may read its own schemas and nothing else. query-api runs
/// every request under it (`SET LOCAL ROLE`), so a query that strays to another tenant's
/// schema is refused by PostgreSQL itself.
pub fn reader_role(tenant: TenantId) -> String {
    format!("tally_t_{}", tenant.0.simple())
}

/// Creates the tenant's reader role if needed and lets it read `schema` (also the partitions
/// created later). The connecting user becomes a member so it may `SET ROLE` to it.
pub async fn grant_reader(
    conn: &mut PgConnection,
    tenant: TenantId,
    schema: &SchemaName,
) -> sqlx::Result<()> {
    let role = reader_role(tenant);
    let create = format!(
        "DO $$ BEGIN CREATE ROLE {role} NOLOGIN NOINHERIT; \
         EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    );
    sqlx::query(AssertSqlSafe(create))
        .execute(&mut *conn)
        .await?;
    for sql in [
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}"),
        format!("ALTER DEFAULT PRIVILEGES IN SCHEMA {schema} GRANT SELECT ON TABLES TO {role}"),
        format!("GRANT {role} TO CURRENT_USER"),
    ] {
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Enters a tenant for reading: `SET LOCAL ROLE` to its reader role and `search_path` to its
/// schema. Only valid inside a transaction; from here on the database refuses anything
/// outside the tenant's schema.
pub async fn enter_tenant_readonly(
    conn: &mut PgConnection,
    tenant: TenantId,
    schema: &SchemaName,
) -> sqlx::Result<()> {
    let sql = format!(
        "SET LOCAL ROLE {role}; SET LOCAL search_path TO {schema}",
        role = reader_role(tenant)
    );
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}

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
    if days.is_empty() || uses_timescale(&mut *conn, schema).await? {
        return Ok(());
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await?;
    for day in days {
        let from = midnight(*day);
        let to = from + Duration::days(1);
        for table in RAW_TABLES {
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {schema}.{part} PARTITION OF {schema}.{table} \
                 FOR VALUES FROM ('{from}') TO ('{to}')",
                part = partition_name(table, *day),
                from = from.format("%Y-%m-%d %H:%M:%S+00"),
                to = to.format("%Y-%m-%d %H:%M:%S+00"),
            );
            sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
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
/// is working on the same schema.
pub async fn apply_retention(
    conn: &mut PgConnection,
    schema: &SchemaName,
    today: NaiveDate,
    windows: Windows,
) -> sqlx::Result<Option<Pruned>> {
    ensure_partitions(&mut *conn, schema, &days_ahead(today, windows.ahead_days)).await?;
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
        .bind(schema.as_str())
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        return Ok(None);
    }
    let raw_cutoff = today - Duration::days(windows.raw_days);
    let rollup_cutoff = today - Duration::days(windows.rollup_days);
    let mut pruned = Pruned::default();
    let timescale = match uses_timescale(&mut tx, schema).await? {
        true => timescale_schema(&mut tx).await?,
        false => None,
    };
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
    } else {
        pruned.partitions += drop_partitions(&mut tx, schema, raw_cutoff).await?;
    }
    set_search_path(&mut tx, schema).await?;
    for (sql, cutoff) in [
        ("DELETE FROM activity_1m WHERE bucket < $1", raw_cutoff),
        ("DELETE FROM activity_1h WHERE bucket < $1", rollup_cutoff),
        ("DELETE FROM activity_1d WHERE bucket < $1", rollup_cutoff),
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

/// Drops the daily partitions older than `cutoff` (native partitioning).
async fn drop_partitions(
    conn: &mut PgConnection,
    schema: &SchemaName,
    cutoff: NaiveDate,
) -> sqlx::Result<u64> {
    let mut dropped = 0;
    for part in partitions(&mut *conn, schema).await? {
        // Only names this module made (table_pYYYYMMDD) are considered, and those are plain
        // identifiers.
        match partition_day(&part) {
            Some((table, day)) if day < cutoff && part == partition_name(table, day) => {
                sqlx::query(AssertSqlSafe(format!("DROP TABLE {schema}.{part}")))
                    .execute(&mut *conn)
                    .await?;
                dropped += 1;
            }
            _ => {}
        }
    }
    Ok(dropped)
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

/// Drops the tenant schema of a projection version (replay's clean-up, tests).
pub async fn drop_tenant_schema(
    conn: &mut PgConnection,
    tenant: TenantId,
    version: i32,
) -> sqlx::Result<()> {
    let schema = tenant.schema(version);
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM control.tenant_schemas WHERE tenant_id = $1 AND version = $2")
        .bind(tenant.0)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    Ok(())
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

    #[test]
    fn template_marks_every_raw_table_for_partitioning() {
        for t in RAW_TABLES {
            assert!(TEMPLATE.contains(&format!("CREATE TABLE {t} ")), "{t}");
        }
        assert_eq!(
            TEMPLATE.matches("/*PARTITIONING*/").count(),
            RAW_TABLES.len()
        );
    }
}
