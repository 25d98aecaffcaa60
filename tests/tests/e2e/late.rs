//! Late and out-of-order events land in the buckets of when they happened (partitions are
//! created for old days on demand), and events older than the retention window are refused
//! at ingest with a clear error.

use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};
use serde_json::Value;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn late_events_land_in_their_own_day() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "late").await;

    let now = Utc::now();
    // Newest first, then the oldest, then the middle: out of order on purpose.
    for (days, n) in [(0, 2), (40, 3), (10, 4)] {
        assert_eq!(
            post_events(
                &client,
                &ingest.url(),
                &t.ingest_key,
                &commands_days_ago(now, days, n)
            )
            .await
            .status(),
            202
        );
    }
    wait_projected(&pool, t.id, 9, Duration::from_secs(60)).await;

    let day = |d: i64| {
        (now - TimeDelta::days(d))
            .duration_trunc(TimeDelta::days(1))
            .unwrap()
    };
    let from = day(41).to_rfc3339();
    let to = (day(0) + TimeDelta::days(1)).to_rfc3339();
    let res = client
        .get(format!("{}/v1/dashboard/timeseries", query.url()))
        .query(&[
            ("from", from.as_str()),
            ("to", to.as_str()),
            ("bucket", "1d"),
        ])
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let ts: Value = res.json().await.unwrap();
    let points: Vec<(String, i64)> = ts["series"][0]["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["t"].as_str().unwrap().to_string(),
                p["count"].as_i64().unwrap(),
            )
        })
        .collect();
    let key = |d: i64| day(d).format("%Y-%m-%dT%H:%M:%SZ").to_string();
    // Minutes back from `now` may cross midnight; count per day of the events themselves.
    let mut expected: std::collections::BTreeMap<String, i64> = Default::default();
    for (d, n) in [(0, 2), (40, 3), (10, 4)] {
        for i in 0..n {
            let when = (now - TimeDelta::days(d) - TimeDelta::minutes(i))
                .duration_trunc(TimeDelta::days(1))
                .unwrap();
            *expected
                .entry(when.format("%Y-%m-%dT%H:%M:%SZ").to_string())
                .or_default() += 1;
        }
    }
    let got: std::collections::BTreeMap<String, i64> = points.into_iter().collect();
    assert_eq!(
        got,
        expected,
        "per-day counts (days {}, {}, {})",
        key(40),
        key(10),
        key(0)
    );

    // Each late event's day has its own partition (or chunk), created on demand (partitions
    // are made ahead of time only from yesterday on).
    let days = raw_storage_days(&pool, t.id, "command_executions").await;
    for (d, n) in [(40, 3), (10, 4)] {
        for i in 0..n {
            let when = (now - TimeDelta::days(d) - TimeDelta::minutes(i)).date_naive();
            assert!(days.contains(&when), "{when} has storage: {days:?}");
        }
    }

    // Older than the retention window: refused, with the field and the reason.
    let res = post_events(
        &client,
        &ingest.url(),
        &t.ingest_key,
        &commands_days_ago(now, 91, 1),
    )
    .await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["errors"][0]["field"], "occurred_at");
    assert!(body["errors"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("retention"));

    stop_all([projector, ingest, query]).await;
}

/// A leap second (`23:59:60.5`, which the doors take) is the instant PostgreSQL stores for
/// it, the next day's `00:00:00.5`, everywhere in the projector. Sent with an event of the
/// next day's first minute: before, the leap second's day had the partition (and the next
/// day none yet, so the row was refused and dead-lettered), and then its minute bucket
/// `23:59:60` and the other's `00:00` were two keys in the batch and one in the database —
/// the batch's upsert met the same row twice, and the partition stopped for every tenant on
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leap_second_is_projected_as_postgresql_stores_it() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "leap").await;
    let day = (Utc::now() - TimeDelta::days(6)).date_naive();
    let next = day.succ_opt().unwrap();
    let mut leap = tally_tests::command("u", "leap", 5, true);
    leap["occurred_at"] = format!("{day}T23:59:60.5Z").into();
    let mut after = tally_tests::command("u", "after", 5, true);
    after["occurred_at"] = format!("{next}T00:00:30Z").into();
    let body = Value::from(vec![leap, after]);
    let res = post_events(&client, &ingest.url(), &t.ingest_key, &body).await;
    assert_eq!(res.status(), 202);
    wait_projected(&pool, t.id, 2, Duration::from_secs(60)).await;
    let days = raw_storage_days(&pool, t.id, "command_executions").await;
    assert!(days.contains(&next), "{next} has storage: {days:?}");
    let sql = format!(
        "SELECT count(*) FROM command_executions
          WHERE occurred_at >= '{next}T00:00:00Z' AND occurred_at < '{next}T00:01:00Z'"
    );
    assert_eq!(scalar_in_tenant(&pool, t.id, &sql).await, 2);
    stop_all([projector, ingest]).await;
}

/// A late event is projected while its tenant's rollups are being folded and its raw table is
/// being read. The compactor and retention hold the tenant schema's lock while they fold, for
/// as long as there is to fold (here another instance's, held by the test); a projector that
/// had not prepared the tenant yet (it has just started, or its batch before failed) waited
/// for that lock to check the schema and to make the late day's partition, and every
/// tenant's events in its batch waited with it. Making the partition then asked for an
/// exclusive lock on the raw table, which waited for every read of it (here a transaction
/// that read it and stays open, as a slow dashboard read does). The schema is current,
/// partitions have a lock of their own, and a partition is made apart and then attached:
/// the event is projected at once, while both are still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_event_is_projected_while_its_tenants_rollups_are_folded_and_read() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "folding").await;
    let now = Utc::now();
    let projector = start_projector(&common).await;
    post_events_accepted(
        &client,
        &ingest.url(),
        &t.ingest_key,
        &commands_days_ago(now, 0, 1),
    )
    .await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    projector.stop().await.unwrap();
    let mut folding = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(t.id.schema(1).as_str())
        .execute(&mut *folding)
        .await
        .unwrap();
    let mut reading = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.command_executions",
        t.id.schema(1)
    )))
    .execute(&mut *reading)
    .await
    .unwrap();
    let projector = start_projector(&common).await;
    post_events_accepted(
        &client,
        &ingest.url(),
        &t.ingest_key,
        &commands_days_ago(now, 10, 1),
    )
    .await;
    let projected = wait_projected(&pool, t.id, 2, Duration::from_secs(20)).await;
    assert_eq!(projected, 2);
    let days = raw_storage_days(&pool, t.id, "command_executions").await;
    let late = (now - TimeDelta::days(10)).date_naive();
    assert!(days.contains(&late), "{late} has its partition: {days:?}");
    reading.commit().await.unwrap();
    folding.commit().await.unwrap();
    stop_all([ingest, projector]).await;
}
