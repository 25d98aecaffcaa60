//! The TimescaleDB path: raw tables are hypertables with one-day chunks, retention compresses
//! chunks older than the tenant's `compress_after_days` (late events still land in them, once)
//! and drops chunks older than the raw window. It needs PostgreSQL with `timescaledb`
//! preloaded (`make up` does so where it is installed; docker-compose.yml's image has it);
//! CI's plain PostgreSQL 15 has not, so the test is ignored there and `make test` runs it
//! only where the extension can be used (it says which it did). Every other e2e test runs on
//! whichever path the database offers.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use reqwest::header::HeaderValue;
use serde_json::Value;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL with timescaledb preloaded; `make test` runs it where it is"]
async fn hypertables_compress_take_late_events_once_and_drop_chunks() {
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

    // A client's batch five days back, sent with an idempotency key (so a retry carries the
    // same event ids), and two events of today. The batch has more than the 64 events from
    // which a tenant's raw rows go by `COPY`: its retry into the compressed chunk is copied,
    // refused for the keys stored there, and inserted instead.
    const OLD: i64 = 70;
    let now = Utc::now();
    let old = commands_days_ago(now, 5, OLD);
    let send = |body: &Value, key: Option<&'static str>| {
        let mut req = client
            .post(format!("{}/v1/events", ingest.url()))
            .bearer_auth(&t.ingest_key)
            .json(body);
        if let Some(key) = key {
            req = req.header("idempotency-key", HeaderValue::from_static(key));
        }
        req.send()
    };
    assert_eq!(send(&old, Some("old-batch")).await.unwrap().status(), 202);
    assert_eq!(
        send(&commands_days_ago(now, 0, 2), None)
            .await
            .unwrap()
            .status(),
        202
    );
    wait_projected(&pool, t.id, OLD + 2, Duration::from_secs(60)).await;
    assert!(tenant_uses_timescale(&pool, t.id).await);
    let schema = t.id.schema(1);
    let hypertables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM timescaledb_information.hypertables WHERE hypertable_schema = $1",
    )
    .bind(schema.as_str())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(hypertables, projector::schema::RAW_TABLES.len() as i64);
    let old_day = (now - TimeDelta::days(5)).date_naive();
    let days = raw_storage_days(&pool, t.id, "command_executions").await;
    assert!(days.contains(&old_day), "{days:?}");

    // Compression: chunks that ended more than two days ago are compressed, today's is not.
    sqlx::query("UPDATE control.tenants SET compress_after_days = 2 WHERE id = $1")
        .bind(t.id.0)
        .execute(&pool)
        .await
        .unwrap();
    let pass = projector::retention::run_once(&pool, 7).await.unwrap();
    assert!(pass.chunks_compressed >= 1, "{pass:?}");
    let compressed = |day: chrono::NaiveDate| {
        let pool = pool.clone();
        let schema = schema.clone();
        async move {
            let v: Vec<bool> = sqlx::query_scalar(
                "SELECT is_compressed FROM timescaledb_information.chunks
                  WHERE hypertable_schema = $1 AND hypertable_name = 'command_executions'
                    AND range_start::date = $2",
            )
            .bind(schema.as_str())
            .bind(day)
            .fetch_all(&pool)
            .await
            .unwrap();
            v
        }
    };
    assert_eq!(compressed(old_day).await, vec![true]);
    assert_eq!(compressed(now.date_naive()).await, vec![false]);
    let again = projector::retention::run_once(&pool, 7).await.unwrap();
    assert_eq!(again.chunks_compressed, 0, "nothing left to compress");

    // A retry of the old batch (same ids) into the compressed chunk, then one new late event:
    // the retry is deduplicated, the new event counted once, rollups agree.
    assert_eq!(send(&old, Some("old-batch")).await.unwrap().status(), 202);
    assert_eq!(
        send(&commands_days_ago(now, 5, 1), None)
            .await
            .unwrap()
            .status(),
        202
    );
    wait_projected(&pool, t.id, OLD + 3, Duration::from_secs(60)).await;
    let per_day = |sql: &'static str| scalar_in_tenant(&pool, t.id, sql);
    let old_rows = "SELECT count(*) FROM command_executions
                     WHERE occurred_at >= date_trunc('day', now() - interval '5 days')
                       AND occurred_at < date_trunc('day', now() - interval '4 days')";
    let old_daily = "SELECT sum(count)::bigint FROM activity_1d
                      WHERE bucket = date_trunc('day', now() - interval '5 days')";
    // Minutes back from `now` may cross midnight: count the events of that day as sent.
    let sent_that_day = (0..OLD)
        .filter(|i| (now - TimeDelta::days(5) - TimeDelta::minutes(*i)).date_naive() == old_day)
        .count() as i64
        + 1;
    assert_eq!(per_day(old_rows).await, sent_that_day);
    assert_eq!(per_day(old_daily).await, sent_that_day);
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        OLD + 3
    );
    assert_eq!(
        projected_events(&pool, t.id).await,
        Some(OLD + 3),
        "the retry counts nothing"
    );
    // The chunk the late event reopened is compressed again by the next pass.
    let pass = projector::retention::run_once(&pool, 7).await.unwrap();
    assert!(pass.chunks_compressed >= 1, "{pass:?}");
    assert_eq!(compressed(old_day).await, vec![true]);
    assert_eq!(per_day(old_rows).await, sent_that_day);

    // Retention drops whole chunks older than the raw window.
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
    let days = raw_storage_days(&pool, t.id, "command_executions").await;
    assert!(
        days.iter()
            .all(|d| *d >= (now - TimeDelta::days(3)).date_naive()),
        "{days:?}"
    );
    stop_all([ingest, projector]).await;
}
