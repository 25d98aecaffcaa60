//! The TimescaleDB path: raw tables are hypertables with one-day chunks and retention drops
//! chunks. It needs PostgreSQL with the `timescaledb` extension (docker-compose.yml has it);
//! CI's plain PostgreSQL 15 has not, so the test is ignored there and `make test` runs it
//! only where the extension exists (it says which it did). Every other e2e test runs on
//! whichever path the database offers.

use std::time::Duration;

use chrono::Utc;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL with the timescaledb extension; `make test` runs it where it exists"]
async fn raw_tables_are_hypertables_and_retention_drops_chunks() {
    init_logs();
    let pool = test_pool().await;
    let installed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(installed, "this test needs the timescaledb extension");
    let common = common_for_test();
    let ingest = start_ingest(&common, |_| {}).await;
    let projector = start_projector(&common).await;
    let client = http();
    let t = create_tenant(&pool, "timescale").await;

    let now = Utc::now();
    let at = |days: i64, n: i64| commands_days_ago(now, days, n);
    for body in [at(5, 4), at(0, 2)] {
        assert_eq!(
            post_events(&client, &ingest.url(), &t.ingest_key, &body)
                .await
                .status(),
            202
        );
    }
    wait_projected(&pool, t.id, 6, Duration::from_secs(60)).await;
    let schema = t.id.schema(1);
    let hypertables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_schema = $1",
    )
    .bind(schema.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(hypertables, shared::tenant_sql::RAW_TABLES.len() as i64);

    sqlx::query("UPDATE control.tenants SET raw_retention_days = 2 WHERE id = $1")
        .bind(t.id.0)
        .execute(&pool)
        .await
        .unwrap();
    let pass = projector::retention::run_once(&pool, 7).await.unwrap();
    assert!(pass.partitions_dropped >= 1, "{pass:?}");
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        2
    );
    let old_chunks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.chunks
          WHERE hypertable_schema = $1 AND range_end <= now() - interval '3 days'",
    )
    .bind(schema.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(old_chunks, 0);
    ingest.stop().await.unwrap();
    projector.stop().await.unwrap();
}
