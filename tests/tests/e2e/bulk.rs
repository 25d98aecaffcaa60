//! The read benchmark's bulk load (`tally_tests::bulk`) leaves what projecting the same events
//! leaves: every rollup table of a bulk-loaded tenant equals, row for row, the one the
//! projector built from the same events sent through ingest-api and Kafka.

use std::time::Duration;

use chrono::{Duration as Span, TimeDelta, Utc};
use serde_json::Value;
use tally_tests::bulk::BulkLoad;
use tally_tests::events::Generator;
use tally_tests::*;

use projector::models::rollups::TABLES;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_load_writes_the_rollups_the_projector_writes() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let projected = create_tenant(&pool, "bulk-projected").await;
    let loaded = create_tenant(&pool, "bulk-loaded").await;

    // Over 30 hours: minute, hour and day buckets each hold several keys and users.
    let events = Generator::new(21, "bulk", 9, Span::hours(30)).batch(3_000);
    for chunk in events.chunks(500) {
        let res = post_events(
            &client,
            &ingest.url(),
            &projected.ingest_key,
            &Value::Array(chunk.to_vec()),
        )
        .await;
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    }
    wait_projected(&pool, projected.id, 3_000, Duration::from_secs(90)).await;

    let mut conn = pool.acquire().await.unwrap();
    let days: Vec<_> = (-2..=1)
        .map(|d| (Utc::now() + TimeDelta::days(d)).date_naive())
        .collect();
    let mut bulk = BulkLoad::new(&mut conn, loaded.id, &days, None)
        .await
        .unwrap();
    // In two parts folded before one flush, as the benchmark loads a day.
    let (first, second) = events.split_at(1_100);
    for part in [first, second] {
        let n = bulk
            .add(&mut conn, part.to_vec(), TimeDelta::zero())
            .await
            .unwrap();
        assert_eq!(n, part.len());
    }
    bulk.finish(&mut conn).await.unwrap();

    let (a, b) = (projected.id.schema(1), loaded.id.schema(1));
    // The per-key rollups may hold a key in several rows (one per batch that appended it,
    // until they are folded): compared per key, summed and merged.
    let contents = |schema: &shared::tenant::SchemaName, table: &str| {
        if table.starts_with("activity_1") {
            format!(
                "SELECT bucket, event_type, user_id, team_id, project_id, name, sum(count),
                        sum(errors), sum(duration_sum), max(duration_max), sum(input_tokens),
                        sum(output_tokens), sum(value_sum), control.hist_sum(duration_hist)
                   FROM {schema}.{table} GROUP BY 1, 2, 3, 4, 5, 6"
            )
        } else {
            format!("TABLE {schema}.{table}")
        }
    };
    for table in TABLES {
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {a}.{table}"
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert!(rows > 0, "{table} is empty");
        let differ: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM ((({x}) EXCEPT ALL ({y})) UNION ALL (({y}) EXCEPT ALL ({x}))) d",
            x = contents(&a, table),
            y = contents(&b, table)
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(differ, 0, "{table}: {rows} rows projected, {differ} differ");
    }
    for table in projector::schema::RAW_TABLES {
        let count = |s: &shared::tenant::SchemaName| format!("SELECT count(*) FROM {s}.{table}");
        let (x, y): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT ({}), ({})",
            count(&a),
            count(&b)
        )))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(x, y, "{table}: raw rows");
    }
    stop_all([ingest, projector]).await;
}
