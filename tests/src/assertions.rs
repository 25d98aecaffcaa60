//! What the stack holds, read from where it keeps it: the tenant's projection in PostgreSQL
//! (counts, rollups, storage units), the control plane's outbox, and the records in Kafka.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use shared::config::Common;
use shared::tenant::TenantId;
use sqlx::PgPool;

use crate::events;
use crate::services::{IngestProcess, BOMB_RSS_BOUND_KIB};

/// Waits until the projector's compactor has folded every per-key rollup delta of the
/// tenant (nothing left in the pending tables), or panics after `timeout`.
pub async fn wait_folded(pool: &PgPool, tenant: TenantId, timeout: Duration) {
    let waiting = format!(
        "SELECT count(*) FROM {}",
        projector::models::rollups::PENDING
    );
    let since = Instant::now();
    while scalar_in_tenant(pool, tenant, &waiting).await > 0 {
        assert!(
            since.elapsed() < timeout,
            "rollup deltas still pending after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the tenant's projection holds `expected` events (or panics after `timeout`).
pub async fn wait_projected(
    pool: &PgPool,
    tenant: TenantId,
    expected: i64,
    timeout: Duration,
) -> i64 {
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let n: Option<i64> = projected_events(pool, tenant).await;
        if let Some(n) = n {
            seen = n;
            if n >= expected {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "tenant {tenant}: {seen} of {expected} events projected after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The projection version the read side serves for a tenant.
pub async fn active_version(pool: &PgPool, tenant: TenantId) -> i32 {
    let mut conn = pool.acquire().await.expect("connection");
    projector::schema::active_versions(&mut conn, &[tenant], projector::schema::Lock::None)
        .await
        .expect("tenant_versions")[&tenant]
}

/// A transaction whose `search_path` is the tenant's active schema, to read its projection.
pub async fn tenant_tx(
    pool: &PgPool,
    tenant: TenantId,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let version = active_version(pool, tenant).await;
    let mut tx = pool.begin().await.expect("tx");
    projector::schema::set_search_path(&mut tx, &tenant.schema(version))
        .await
        .expect("search_path");
    tx
}

/// A transaction holding the tenant's `projection_state` (of its active projection) in
/// `ACCESS EXCLUSIVE` mode, as a long migration would: every read of the tenant waits on it
/// until it ends.
pub async fn lock_projection(
    pool: &PgPool,
    tenant: TenantId,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let schema = tenant.schema(active_version(pool, tenant).await);
    let mut blocker = pool.begin().await.expect("tx");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {schema}.projection_state IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut *blocker)
    .await
    .expect("the lock");
    blocker
}

/// Records that the tenant's schema of `version` has had the templates up to `template`
/// only (a test that turned it back into what an older projector made), in `tx`.
pub async fn set_template_version(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    version: i32,
    template: i32,
) {
    sqlx::query(
        "UPDATE control.tenant_schemas SET template_version = $3 WHERE tenant_id = $1 AND version = $2",
    )
    .bind(tenant.0)
    .bind(version)
    .bind(template)
    .execute(tx)
    .await
    .expect("template version");
}

/// Events the tenant's active projection counts, or `None` before its schema exists.
pub async fn projected_events(pool: &PgPool, tenant: TenantId) -> Option<i64> {
    let schema = tenant.schema(active_version(pool, tenant).await);
    let sql = format!("SELECT events FROM {schema}.projection_state");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .ok()
}

/// Runs a read-only SQL statement in the tenant's active schema and returns a single i64.
pub async fn scalar_in_tenant(pool: &PgPool, tenant: TenantId, sql: &str) -> i64 {
    let mut tx = tenant_tx(pool, tenant).await;
    let v: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    v.unwrap_or(0)
}

/// Whether the tenant's active schema keeps its raw tables in TimescaleDB hypertables
/// (rather than native daily partitions).
pub async fn tenant_uses_timescale(pool: &PgPool, tenant: TenantId) -> bool {
    let version = active_version(pool, tenant).await;
    let mut conn = pool.acquire().await.expect("conn");
    projector::schema::uses_timescale(&mut conn, &tenant.schema(version))
        .await
        .expect("tenant_schemas")
}

/// What is amiss with `schema`'s indexes, measured against `reference` (a schema of the same
/// templates): an invalid index, a partition with fewer or more indexes than its table, or
/// a table with another number of indexes than the reference's. Empty when nothing is.
pub async fn index_faults(pool: &PgPool, schema: &str, reference: &str) -> Vec<String> {
    // (table, its partitioned parent if a partition, indexes, invalid ones)
    let tables = |s: &str| {
        sqlx::query_as::<_, (String, Option<String>, i64, i64)>(
            "SELECT t.relname::text,
                    (SELECT p.relname::text FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhparent
                      WHERE h.inhrelid = t.oid),
                    count(i.indexrelid), count(*) FILTER (WHERE NOT i.indisvalid)
               FROM pg_class t
               JOIN pg_namespace n ON n.oid = t.relnamespace
               LEFT JOIN pg_index i ON i.indrelid = t.oid
              WHERE n.nspname = $1 AND t.relkind IN ('r', 'p')
              GROUP BY t.oid, t.relname
              ORDER BY 1",
        )
        .bind(s.to_string())
        .fetch_all(pool)
    };
    let (ours, theirs) = (
        tables(schema).await.expect("indexes"),
        tables(reference).await.expect("indexes"),
    );
    assert!(
        !ours.is_empty() && !theirs.is_empty(),
        "no tables to compare"
    );
    let count_of = |rows: &[(String, Option<String>, i64, i64)], table: &str| {
        rows.iter()
            .find(|(name, ..)| name == table)
            .map(|(_, _, n, _)| *n)
    };
    let mut faults = Vec::new();
    for (table, parent, indexes, invalid) in &ours {
        if *invalid > 0 {
            faults.push(format!("{table}: {invalid} invalid indexes"));
        }
        let expected = match parent {
            Some(parent) => count_of(&ours, parent),
            None => count_of(&theirs, table),
        };
        if expected != Some(*indexes) {
            faults.push(format!("{table}: {indexes} indexes, {expected:?} expected"));
        }
    }
    faults
}

/// The days (UTC) for which `table` of the tenant's active schema has raw storage: its daily
/// partitions on plain PostgreSQL, its one-day chunks with TimescaleDB. The one place tests
/// look at storage units, so they hold on both paths.
pub async fn raw_storage_days(
    pool: &PgPool,
    tenant: TenantId,
    table: &str,
) -> std::collections::BTreeSet<chrono::NaiveDate> {
    let schema = tenant.schema(active_version(pool, tenant).await);
    let starts: Vec<DateTime<Utc>> = if tenant_uses_timescale(pool, tenant).await {
        sqlx::query_scalar(
            "SELECT range_start FROM timescaledb_information.chunks
              WHERE hypertable_schema = $1 AND hypertable_name = $2",
        )
        .bind(schema.as_str())
        .bind(table)
        .fetch_all(pool)
        .await
        .expect("chunks")
    } else {
        // The lower bound of each partition: `FOR VALUES FROM ('…') TO ('…')`.
        let bounds: Vec<String> = sqlx::query_scalar(
            "SELECT pg_get_expr(c.relpartbound, c.oid)
               FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE n.nspname = $1 AND p.relname = $2",
        )
        .bind(schema.as_str())
        .bind(table)
        .fetch_all(pool)
        .await
        .expect("partitions");
        bounds
            .iter()
            .map(|b| {
                let from = b.split('\'').nth(1).unwrap_or_else(|| panic!("bound {b}"));
                DateTime::parse_from_str(from, "%Y-%m-%d %H:%M:%S%#z")
                    .unwrap_or_else(|e| panic!("bound {b}: {e}"))
                    .with_timezone(&Utc)
            })
            .collect()
    };
    starts.into_iter().map(|t| t.date_naive()).collect()
}

/// The rollup tables of activity: per key and tenant-wide, each at minute, hour and day (the
/// active users follow them in the projector's list).
fn rollups() -> &'static [&'static str] {
    &projector::models::rollups::TABLES[..6]
}

/// Asserts that a tenant's projection holds exactly what was sent: as many raw rows, and in
/// every rollup (minute, hour, day; per key and tenant-wide) the counts per event type,
/// command errors and durations, agent tokens, tool errors, and a duration histogram count
/// per event; and at every grain, the same active users recorded as the per-key rollups hold.
pub async fn assert_projection_exact(pool: &PgPool, tenant: TenantId, exp: &events::Expected) {
    let mut raw = 0;
    for table in projector::schema::RAW_TABLES {
        raw += scalar_in_tenant(pool, tenant, &format!("SELECT count(*) FROM {table}")).await;
    }
    assert_eq!(raw, exp.total, "{tenant}: raw rows");
    for (event_type, n) in &exp.per_type {
        for rollup in rollups() {
            let sql = format!(
                "SELECT sum(count)::bigint FROM {rollup} WHERE event_type = '{event_type}'"
            );
            assert_eq!(
                scalar_in_tenant(pool, tenant, &sql).await,
                *n,
                "{tenant}: {rollup} {event_type}"
            );
        }
    }
    for rollup in rollups() {
        let sum = |what: &str, t: &str| {
            format!(
                "SELECT coalesce(sum({what}), 0)::bigint FROM {rollup} WHERE event_type = '{t}'"
            )
        };
        let checks = [
            (sum("errors", "command.executed"), exp.command_errors),
            (
                sum("duration_sum", "command.executed"),
                exp.command_duration_sum,
            ),
            (
                sum("input_tokens", "agent.interacted"),
                exp.agent_input_tokens,
            ),
            (
                sum("output_tokens", "agent.interacted"),
                exp.agent_output_tokens,
            ),
            (sum("errors", "tool.executed"), exp.tool_errors),
        ];
        let histograms =
            format!("SELECT coalesce(sum(h), 0)::bigint FROM {rollup}, unnest(duration_hist) h");
        for (sql, want) in checks.into_iter().chain([(histograms, exp.total)]) {
            assert_eq!(
                scalar_in_tenant(pool, tenant, &sql).await,
                want,
                "{tenant}: {sql}"
            );
        }
    }
    for grain in ["1m", "1h", "1d"] {
        let keyed =
            format!("SELECT DISTINCT bucket, user_id FROM activity_{grain} WHERE user_id <> ''");
        let recorded = format!("SELECT bucket, user_id FROM active_users_{grain}");
        let differ = format!(
            "SELECT count(*) FROM (({keyed} EXCEPT ALL {recorded})
                                   UNION ALL ({recorded} EXCEPT ALL {keyed})) d"
        );
        assert_eq!(
            scalar_in_tenant(pool, tenant, &differ).await,
            0,
            "{tenant}: active_users_{grain} differs from the users of activity_{grain}"
        );
    }
}

/// Asserts that a bomb test's ingest-api (started with [`crate::spawn_bomb_target`]) kept its
/// resident memory under [`BOMB_RSS_BOUND_KIB`] at its peak, and prints both figures.
pub fn assert_bomb_memory_bound(ingest: &IngestProcess, started_rss: u64) {
    let (_, peak) = ingest.memory_kib();
    eprintln!("ingest-api resident memory: {started_rss} KiB at start, {peak} KiB at its peak");
    assert!(
        peak < BOMB_RSS_BOUND_KIB,
        "ingest-api peaked at {peak} KiB (started at {started_rss} KiB)"
    );
}

/// The outbox events of `tenant` of type `kind`, oldest first.
pub async fn outbox_events(
    pool: &PgPool,
    tenant: uuid::Uuid,
    kind: &str,
) -> Vec<serde_json::Value> {
    sqlx::query_scalar(
        "SELECT envelope FROM control.outbox
          WHERE envelope->>'tenant_id' = $1 AND envelope->>'type' = $2 ORDER BY seq",
    )
    .bind(tenant.to_string())
    .bind(kind)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Records in the test's metrics topic (the sum of its partitions' high watermarks).
pub async fn metrics_topic_records(common: &Common) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = shared::kafka::client_config(common).create().unwrap();
    let (topic, partitions) = (common.metrics_topic(), common.kafka_partitions);
    tokio::task::spawn_blocking(move || {
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .unwrap()
                    .1
            })
            .sum()
    })
    .await
    .unwrap()
}

/// Waits (at most 60 s) until a backend waits for a lock while running a statement matching
/// one of `patterns` (SQL `LIKE`); panics with `what` otherwise.
pub async fn wait_for_lock_waiter(pool: &PgPool, patterns: &[String], what: &str) {
    let since = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND query LIKE ANY($1)",
        )
        .bind(patterns)
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(since.elapsed() < Duration::from_secs(60), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
