//! The projector's home of SQL built at run time: tenant schemas made from the templates and
//! upgraded, their reader roles, the versions they are served from, and (in [`partitions`])
//! their daily partitions, retention and compression. Tenant schema names are the only
//! identifiers that are not static; they come from [`TenantId::schema`] (hex digits only)
//! and are spliced here. Everything else is static SQL that runs after [`set_search_path`]
//! has pointed the transaction at the tenant's schema. (Entering a tenant to read it is
//! shared with query-api: `shared::tenant_sql`.)

pub mod partitions;
pub mod timescale;

use std::collections::HashMap;

use shared::tenant::{SchemaName, TenantId};
use shared::tenant_sql;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

use crate::models::raw::RawTable;

/// The tenant-schema template (see `migrations/tenant/`).
pub const TEMPLATE: &str = include_str!("../../../migrations/tenant/0001_tenant.sql");

/// Templates applied after the first, in order; `control.tenant_schemas.template_version`
/// records how many of all templates a schema has had.
pub const LATER_TEMPLATES: [&str; 17] = [
    include_str!("../../../migrations/tenant/0002_audit.sql"),
    include_str!("../../../migrations/tenant/0003_people.sql"),
    include_str!("../../../migrations/tenant/0004_activity_events.sql"),
    include_str!("../../../migrations/tenant/0005_activity_spans.sql"),
    include_str!("../../../migrations/tenant/0006_feed_position.sql"),
    include_str!("../../../migrations/tenant/0007_tenant_rollups.sql"),
    include_str!("../../../migrations/tenant/0008_attribution.sql"),
    include_str!("../../../migrations/tenant/0009_privacy.sql"),
    include_str!("../../../migrations/tenant/0010_rollup_deltas.sql"),
    include_str!("../../../migrations/tenant/0011_derived_rollups.sql"),
    include_str!("../../../migrations/tenant/0012_sparse_pending_histograms.sql"),
    include_str!("../../../migrations/tenant/0013_placed_usage_index.sql"),
    include_str!("../../../migrations/tenant/0014_pending_minute_ranges.sql"),
    include_str!("../../../migrations/tenant/0015_usage_from_raw_rows.sql"),
    include_str!("../../../migrations/tenant/0016_usage_kind.sql"),
    include_str!("../../../migrations/tenant/0017_sparse_folded_histograms.sql"),
    include_str!("../../../migrations/tenant/0018_whole_raw_indexes.sql"),
];

/// The template version of a schema that has had every template (`template_version`).
pub const TEMPLATE_VERSION: i32 = 1 + LATER_TEMPLATES.len() as i32;

/// Raw tables of the template: time-partitioned (or hypertables) on `occurred_at`.
pub const RAW_TABLES: [&str; RawTable::ALL.len()] = {
    let mut names = [""; RawTable::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = RawTable::ALL[i].name();
        i += 1;
    }
    names
};

/// Takes the schema's transaction-level advisory lock if no other session holds it — the
/// lock its creation, upgrades and partitions take, and retention and the rollup compactor
/// try — and says whether it did.
pub async fn try_lock(conn: &mut PgConnection, schema: &SchemaName) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtext($1))")
        .bind(schema.as_str())
        .fetch_one(conn)
        .await
}

/// Whether `schema` has had every template of this binary ([`TEMPLATE_VERSION`]).
pub async fn has_every_template(
    conn: &mut PgConnection,
    schema: &SchemaName,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM control.tenant_schemas
                         WHERE schema_name = $1 AND template_version = $2)",
    )
    .bind(schema.as_str())
    .bind(TEMPLATE_VERSION)
    .fetch_one(conn)
    .await
}

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
    if !try_lock(&mut tx, &schema).await? {
        // Held while the compactor or retention folds the tenant's rollups, for as long as
        // there is to fold: a schema already at this binary's templates needs nothing done
        // under it, and a live batch (every tenant's events) does not wait for the fold.
        let current: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM control.tenant_schemas
                             WHERE tenant_id = $1 AND version = $2 AND template_version = $3)",
        )
        .bind(tenant.0)
        .bind(version)
        .bind(TEMPLATE_VERSION)
        .fetch_one(&mut *tx)
        .await?;
        let active = active_versions(&mut tx, &[tenant], Lock::None).await?[&tenant];
        if current && version >= active {
            tx.commit().await?;
            return Ok(SchemaState::Existed);
        }
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(schema.as_str())
            .execute(&mut *tx)
            .await?;
    }
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
    .bind(TEMPLATE_VERSION)
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
    .bind(TEMPLATE_VERSION)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Creates the tenant's reader role if needed and lets it read `schema` (also the partitions
/// created later). The connecting user becomes a member so it may `SET ROLE` to it.
async fn grant_reader(
    conn: &mut PgConnection,
    tenant: TenantId,
    schema: &SchemaName,
) -> sqlx::Result<()> {
    let role = tenant_sql::reader_role(tenant);
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

/// Drops the secondary (non-unique) indexes of a schema's raw tables and usage rows, adding
/// their definitions to `dropped` (each once) before dropping them, for [`create_indexes`]: a
/// rebuild loads the rows first and builds these once, by sorting, instead of maintaining
/// them row by row. Interrupted, it can run again with the same `dropped`. (Dropping a
/// partitioned table's or a hypertable's index drops its partitions' or chunks' too, and
/// [`create_indexes`] builds them on every partition again.)
pub async fn drop_secondary_indexes(
    conn: &mut PgConnection,
    schema: &SchemaName,
    dropped: &mut Vec<String>,
) -> sqlx::Result<()> {
    let mut tables: Vec<&str> = RawTable::ALL.iter().map(|t| t.name()).collect();
    tables.push("session_usage");
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
           FROM pg_index i
           JOIN pg_class t ON t.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE n.nspname = $1 AND t.relname = ANY($2) AND NOT i.indisunique",
    )
    .bind(schema.as_str())
    .bind(&tables)
    .fetch_all(&mut *conn)
    .await?;
    for (name, definition) in indexes {
        if !dropped.contains(&definition) {
            dropped.push(definition);
        }
        sqlx::query(AssertSqlSafe(format!("DROP INDEX IF EXISTS {name}")))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// Turns autovacuum off (`on` false) or back on for `schema`'s ordinary tables: the
/// native partitions of its raw tables, its rollups, sessions, usage and the rest (not
/// TimescaleDB's hypertables, whose chunks live elsewhere). For a rebuild's bulk load,
/// during which autovacuum would analyse and vacuum the growing tables again and again, on
/// the cores the load needs; the rebuild analyses what it built at the end itself.
pub async fn set_autovacuum(
    conn: &mut PgConnection,
    schema: &SchemaName,
    on: bool,
) -> sqlx::Result<()> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname <> ALL($2)",
    )
    .bind(schema.as_str())
    .bind(&RAW_TABLES[..])
    .fetch_all(&mut *conn)
    .await?;
    let change = if on {
        "RESET (autovacuum_enabled)"
    } else {
        "SET (autovacuum_enabled = false)"
    };
    for table in tables {
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE {schema}.\"{table}\" {change}"
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// An index definition as `pg_get_indexdef` gives it, made to build the index on every
/// partition. For a partitioned table it reads `CREATE INDEX … ON ONLY table …`: run as it
/// is, that makes the parent's index alone, invalid (the planner does not use it), and none
/// on the partitions. Until tenant template 0018 (which completes what it left) a replay built
/// its raw tables' indexes so.
pub fn on_the_whole_table(definition: &str) -> String {
    definition.replacen(" ON ONLY ", " ON ", 1)
}

/// Builds indexes from their definitions ([`drop_secondary_indexes`]; those already there
/// are kept, so an interrupted build can run again), on every partition of a partitioned
/// table ([`on_the_whole_table`]), then refreshes the planner's statistics of the schema's
/// raw tables. On two connections, each taking the next statement when done with its last,
/// so that both cores sort to the end. Once one fails, the other takes no further
/// statement, and both have finished before this returns: a retry never meets a statement
/// of this attempt still running.
pub async fn create_indexes(
    pool: &PgPool,
    schema: &SchemaName,
    definitions: &[String],
) -> sqlx::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut statements: Vec<String> = definitions
        .iter()
        .map(|def| {
            let def = on_the_whole_table(def);
            match def.strip_prefix("CREATE INDEX ") {
                Some(rest) => format!("CREATE INDEX IF NOT EXISTS {rest}"),
                None => def,
            }
        })
        .collect();
    statements.extend(
        RawTable::ALL
            .iter()
            .map(|table| format!("ANALYZE {schema}.{}", table.name())),
    );
    let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
    let work = || async {
        let mut conn = match pool.acquire().await {
            Ok(conn) => conn,
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        while !failed.load(Ordering::Relaxed) {
            let Some(sql) = statements.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            if let Err(e) = sqlx::query(AssertSqlSafe(sql.clone()))
                .execute(&mut *conn)
                .await
            {
                failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        Ok::<_, sqlx::Error>(())
    };
    let (first, second) = tokio::join!(work(), work());
    first.and(second)
}

/// Brings the tenant schemas made by older versions up to date: each gets its reader role
/// if it has none, and the templates it has not had yet. Part of [`crate::migrate`], so an
/// idle tenant's dashboards get them too, not only when the projector next writes to it.
pub async fn upgrade_all(pool: &PgPool) -> sqlx::Result<()> {
    // Schemas made before reader roles existed get theirs (a no-op once every role exists),
    // under a lock so that instances migrating at the same time do not grant concurrently.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.grant_readers'))")
        .execute(&mut *tx)
        .await?;
    let missing: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
        "SELECT tenant_id, version FROM control.tenant_schemas s
          WHERE NOT EXISTS (SELECT 1 FROM pg_roles
                             WHERE rolname = 'tally_t_' || replace(s.tenant_id::text, '-', ''))",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (tenant, version) in missing {
        let tenant = TenantId(tenant);
        grant_reader(&mut tx, tenant, &tenant.schema(version)).await?;
    }
    tx.commit().await?;
    let behind: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
        "SELECT tenant_id, version FROM control.tenant_schemas WHERE template_version < $1",
    )
    .bind(TEMPLATE_VERSION)
    .fetch_all(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    // One schema whose upgrade fails (its error is returned, and `migrate` is tried again)
    // does not hold back the others.
    let mut failed = None;
    for (tenant, version) in behind {
        let tenant = TenantId(tenant);
        if let Err(e) = create_tenant_schema(&mut conn, tenant, version).await {
            tracing::warn!(schema = %tenant.schema(version), error = %e, "upgrading a tenant schema failed");
            failed.get_or_insert(e);
        }
    }
    failed.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_partitioned_tables_index_is_built_on_every_partition() {
        let def = "CREATE INDEX tool_executions_feed_idx ON ONLY tenant_x_v2.tool_executions \
                   USING btree (feed_seq, feed_ord)";
        assert_eq!(
            on_the_whole_table(def),
            "CREATE INDEX tool_executions_feed_idx ON tenant_x_v2.tool_executions \
             USING btree (feed_seq, feed_ord)"
        );
        let plain = "CREATE INDEX s ON tenant_x_v2.session_usage USING btree (repository)";
        assert_eq!(on_the_whole_table(plain), plain);
    }
}
