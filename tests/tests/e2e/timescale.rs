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
use serde_json::{json, Value};
use tally_tests::*;
use uuid::Uuid;

/// The write path and a new tenant, on a database that must have the timescaledb extension.
async fn timescale_stack(
    tenant: &str,
) -> (sqlx::PgPool, Running, Running, reqwest::Client, TestTenant) {
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
    let t = create_tenant(&pool, tenant).await;
    (pool, ingest, projector, http(), t)
}

/// Whether the chunks of the tenant's `table` for `day` are compressed, one per chunk.
async fn chunks_compressed(
    pool: &sqlx::PgPool,
    schema: &shared::tenant::SchemaName,
    table: &str,
    day: chrono::NaiveDate,
) -> Vec<bool> {
    sqlx::query_scalar(
        "SELECT is_compressed FROM timescaledb_information.chunks
          WHERE hypertable_schema = $1 AND hypertable_name = $2 AND range_start::date = $3",
    )
    .bind(schema.as_str())
    .bind(table)
    .bind(day)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL with timescaledb preloaded; `make test` runs it where it is"]
async fn hypertables_compress_take_late_events_once_and_drop_chunks() {
    let (pool, ingest, projector, client, t) = timescale_stack("timescale").await;

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
    let compressed =
        |day: chrono::NaiveDate| chunks_compressed(&pool, &schema, "command_executions", day);
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

/// A long-lived session's usage from days ago, in a compressed chunk, and a context for it
/// now: the context places the new usage; the session's `repo_sessions` rows, rebuilt from
/// the raw rows (`usage_rows`) since its first usage, read the compressed chunk and keep the
/// old usage where it was (unplaced), each amount counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL with timescaledb preloaded; `make test` runs it where it is"]
async fn a_context_rebuilds_a_sessions_usage_from_compressed_chunks() {
    let (pool, ingest, projector, client, t) = timescale_stack("timescale-usage").await;
    let url = ingest.url();
    let s = format!("sess-old-{}", Uuid::new_v4());
    let now = Utc::now();
    let agent = |secs: i64, cost: f64| {
        json!({"type": "agent.interacted",
               "occurred_at": (now - TimeDelta::seconds(secs)).to_rfc3339(),
               "data": {"session_id": s, "user_id": "dev-5", "agent_name": "claude-code",
                        "interaction_type": "api_request", "input_tokens": 10,
                        "output_tokens": 1, "cost_usd": cost, "duration_ms": 5,
                        "status": "success"}})
    };
    // Three interactions five days back, no context then: unplaced.
    let days = 5 * 86_400;
    post_events_accepted(
        &client,
        &url,
        &t.ingest_key,
        &json!([
            agent(days, 0.25),
            agent(days - 60, 0.25),
            agent(days - 120, 0.25)
        ]),
    )
    .await;
    wait_projected(&pool, t.id, 3, Duration::from_secs(60)).await;
    assert!(tenant_uses_timescale(&pool, t.id).await);

    sqlx::query("UPDATE control.tenants SET compress_after_days = 2 WHERE id = $1")
        .bind(t.id.0)
        .execute(&pool)
        .await
        .unwrap();
    projector::retention::run_once(&pool, 7).await.unwrap();
    let schema = t.id.schema(active_version(&pool, t.id).await);
    let old_day = (now - TimeDelta::seconds(days - 60)).date_naive();
    assert_eq!(
        chunks_compressed(&pool, &schema, "agent_interactions", old_day).await,
        vec![true]
    );

    // The session goes on today, in a repository.
    let context = json!({"type": "session.context",
        "occurred_at": (now - TimeDelta::seconds(120)).to_rfc3339(),
        "data": {"session_id": s, "user_id": "dev-5",
                 "repository": "git@github.com:Acme/Old.git", "branch": "main"}});
    post_events_accepted(
        &client,
        &url,
        &t.ingest_key,
        &json!([context, agent(90, 0.5), agent(60, 0.5)]),
    )
    .await;
    wait_projected(&pool, t.id, 6, Duration::from_secs(60)).await;

    let mut tx = tenant_tx(&pool, t.id).await;
    let (sessions, by_repo, stored): (Option<String>, Option<String>, i64) = sqlx::query_as(
        "SELECT (SELECT string_agg(format('%s|%s|%s|%s', repository, branch, requests,
                                          round(cost_usd::numeric, 6)), ';'
                                   ORDER BY repository)
                   FROM repo_sessions WHERE session_id = $1),
                (SELECT string_agg(format('%s|%s|%s', repository, r, c), ';' ORDER BY repository)
                   FROM (SELECT repository, sum(requests) AS r,
                                round(sum(cost_usd)::numeric, 6) AS c
                           FROM repo_usage_1h GROUP BY 1) x WHERE r <> 0),
                (SELECT count(*) FROM session_usage)",
    )
    .bind(&s)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        sessions.as_deref(),
        Some("||3|0.750000;github.com/acme/old|main|2|1.000000"),
        "the session's rows rebuilt over the compressed chunk"
    );
    assert_eq!(
        by_repo.as_deref(),
        Some("|3|0.750000;github.com/acme/old|2|1.000000")
    );
    assert_eq!(stored, 2, "the placed usage only");
    assert_eq!(
        chunks_compressed(&pool, &schema, "agent_interactions", old_day).await,
        vec![true],
        "read where it lies, not decompressed"
    );
    stop_all([ingest, projector]).await;
}
