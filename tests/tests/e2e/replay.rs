//! Replay of one tenant while its dashboards are polled and events keep arriving; an event
//! written in an older schema version projecting like a new one; retention dropping old
//! partitions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DurationRound, TimeDelta, Utc};
use serde_json::{json, Value};
use shared::events::{Actor, Envelope, EventType, Source};
use tally_tests::events::Generator;
use tally_tests::*;
use uuid::Uuid;

/// Writes an `agent.interacted` in schema version 1 straight into the log, as ingest-api
/// wrote it before version 2: model and cost inside `metadata`.
async fn produce_v1_agent_event(
    common: &shared::config::Common,
    tenant: shared::tenant::TenantId,
) -> Uuid {
    let env = Envelope {
        id: Uuid::now_v7(),
        tenant_id: tenant,
        event_type: EventType::AgentInteracted,
        schema_version: 1,
        occurred_at: Utc::now() - TimeDelta::minutes(5),
        received_at: Utc::now(),
        actor: Actor::default(),
        source: Source::Api,
        data: json!({"user_id": "old-client", "agent_name": "claude", "interaction_type": "chat",
                     "input_tokens": 100, "output_tokens": 40, "duration_ms": 900,
                     "status": "success",
                     "metadata": {"model": "claude-opus", "cost_usd": 0.25, "region": "eu"}}),
    };
    produce_envelope(common, &env).await;
    env.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_switches_versions_under_polling_and_upcasts_old_events() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |_| {}).await;
    let mut live = spawn_projector_process(&common);
    let client = http();
    let a = create_tenant(&pool, "replayed").await;
    let b = create_tenant(&pool, "bystander").await;

    let mut gen_a = Generator::new(11, "ra", 12, chrono::Duration::hours(6));
    for _ in 0..40 {
        let res = post_events(
            &client,
            &ingest.url(),
            &a.ingest_key,
            &Value::Array(gen_a.batch(500)),
        )
        .await;
        assert_eq!(res.status(), 202);
    }
    let mut gen_b = Generator::new(12, "rb", 3, chrono::Duration::hours(6));
    post_events_accepted(
        &client,
        &ingest.url(),
        &b.ingest_key,
        &Value::Array(gen_b.batch(300)),
    )
    .await;
    let old_event = produce_v1_agent_event(&common, a.id).await;
    wait_projected(&pool, a.id, 20_001, Duration::from_secs(120)).await;
    wait_projected(&pool, b.id, 300, Duration::from_secs(60)).await;

    let cost_of_old_event = |pool: sqlx::PgPool| async move {
        let sql = format!(
            "SELECT (value * 100)::bigint FROM agent_interactions WHERE event_id = '{old_event}' AND data->>'model' = 'claude-opus'"
        );
        scalar_in_tenant(&pool, a.id, &sql).await
    };
    assert_eq!(
        cost_of_old_event(pool.clone()).await,
        25,
        "v1 event upcast on projection"
    );

    // A dashboard client polls all along; events keep arriving during the replay.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let polls = Arc::new(AtomicU64::new(0));
    let poller = spawn_poller(
        format!("{}/v1/dashboard/overview?range=24h", query.url()),
        a.read_key.clone(),
        Duration::from_millis(20),
        stop.clone(),
        failures.clone(),
        polls.clone(),
    );
    let trickle = {
        let (stop, client, url, key) = (
            stop.clone(),
            client.clone(),
            ingest.url(),
            a.ingest_key.clone(),
        );
        let mut gen = Generator::new(13, "ra", 12, chrono::Duration::hours(1));
        tokio::spawn(async move {
            let mut sent = 0i64;
            while !stop.load(Ordering::Relaxed) {
                let res = post_events(&client, &url, &key, &Value::Array(gen.batch(20))).await;
                assert_eq!(res.status(), 202);
                sent += 20;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (sent, gen.expected)
        })
    };

    let (report, progress) = run_replay(&common, a.id, 3).await;
    eprintln!("replay report: {report}");
    assert!(
        progress.contains("records/s, lag"),
        "progress is shown: {progress}"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (trickled, trickle_expected) = trickle.await.unwrap();
    let (_, backwards) = poller.await.unwrap();
    let total = 20_001 + trickled;
    wait_projected(&pool, a.id, total, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed dashboard requests"
    );
    assert!(backwards.is_empty(), "counts went backwards: {backwards:?}");
    assert!(
        polls.load(Ordering::Relaxed) > 20,
        "the poller kept polling"
    );
    assert_eq!(active_version(&pool, a.id).await, 2);
    assert_eq!(
        active_version(&pool, b.id).await,
        1,
        "only the replayed tenant moved"
    );
    // The bulk load dropped the raw tables' secondary indexes: they are back, valid, on every
    // partition, as in the bystander's schema, which was never replayed.
    let faults = index_faults(&pool, a.id.schema(2).as_str(), b.id.schema(1).as_str()).await;
    assert!(
        faults.is_empty(),
        "the replayed schema's indexes: {faults:?}"
    );
    let v1_left: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(a.id.schema(1).as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!v1_left, "the old version is dropped");
    // A writer that has not seen the switch cannot bring the old version back: it is told
    // the version is superseded (and re-reads the versions), and nothing is made.
    let mut conn = pool.acquire().await.unwrap();
    assert_eq!(
        projector::schema::create_tenant_schema(&mut conn, a.id, 1)
            .await
            .unwrap(),
        projector::schema::SchemaState::Superseded
    );
    drop(conn);
    let v1_back: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(a.id.schema(1).as_str())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(!v1_back, "the superseded version stays dropped");

    // Exactly once in the new version: raw rows and every rollup.
    assert_eq!(projected_events(&pool, a.id).await, Some(total));
    let mut expected = gen_a.expected.clone();
    expected.merge(&trickle_expected);
    // And the version-1 event written straight into the log.
    expected.total += 1;
    *expected
        .per_type
        .entry("agent.interacted".into())
        .or_default() += 1;
    expected.agent_input_tokens += 100;
    expected.agent_output_tokens += 40;
    assert_eq!(expected.total, total);
    assert_projection_exact(&pool, a.id, &expected).await;
    assert_eq!(
        cost_of_old_event(pool.clone()).await,
        25,
        "v1 event upcast after replay"
    );
    let cost_cents = scalar_in_tenant(
        &pool,
        a.id,
        "SELECT (sum(value_sum) * 100)::bigint FROM activity_1d WHERE user_id = 'old-client'",
    )
    .await;
    assert_eq!(cost_cents, 25, "its cost is in the rollups");
    // The bystander is untouched.
    assert_eq!(projected_events(&pool, b.id).await, Some(300));

    live.kill().unwrap();
    live.wait().unwrap();
    stop_all([ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_drops_old_partitions_and_refuses_old_events() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    // No fold by this projector: the old minute's deltas still wait when retention runs (unless
    // the start-up pass of a neighbouring test's projector folds them first), and are the
    // hour's and the day's too until folded.
    let projector = start_projector_with(&common, |c| c.compact_interval_ms = 3_600_000).await;
    let client = http();
    let t = create_tenant(&pool, "retention").await;

    let now = Utc::now();
    // The old day's seven events a minute apart from its noon, so that they share the day
    // whatever time the test starts (from midnight on, "now minus i minutes" would not).
    // Today's three likewise (from 00:03 at the earliest, a few minutes ahead just after
    // midnight, within the clock skew allowed).
    let today = now.duration_trunc(TimeDelta::days(1)).unwrap();
    let noon = today + TimeDelta::hours(12);
    let old_events = commands_days_ago(noon, 5, 7);
    let new_events = commands_days_ago(now.max(today + TimeDelta::minutes(3)), 0, 3);
    for body in [old_events, new_events] {
        post_events_accepted(&client, &ingest.url(), &t.ingest_key, &body).await;
    }
    wait_projected(&pool, t.id, 10, Duration::from_secs(60)).await;
    ingest.stop().await.unwrap();

    sqlx::query("UPDATE control.tenants SET raw_retention_days = 2, rollup_retention_days = 30 WHERE id = $1")
        .bind(t.id.0)
        .execute(&pool)
        .await
        .unwrap();
    // Sessions are kept as long as rollups: one ended 40 days ago goes, one 5 days ago stays.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.sessions (session_id, user_id, started_at, ended_at) VALUES
           ('ended-long-ago', 'u', now() - interval '41 days', now() - interval '40 days'),
           ('ended-lately', 'u', now() - interval '6 days', now() - interval '5 days')",
        t.id.schema(1)
    )))
    .execute(&pool)
    .await
    .unwrap();
    // A version a replay is still building (made as the replay makes it, holding the same
    // raw rows): retention leaves it alone, since its rollups are folded from those rows at
    // the end of the load.
    let old_day = (now - TimeDelta::days(5))
        .duration_trunc(TimeDelta::days(1))
        .unwrap();
    let building = t.id.schema(2);
    {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query(
            "INSERT INTO control.tenant_versions (tenant_id, active_version) VALUES ($1, 1)
             ON CONFLICT DO NOTHING",
        )
        .bind(t.id.0)
        .execute(&mut *conn)
        .await
        .unwrap();
        projector::schema::create_tenant_schema(&mut conn, t.id, 2)
            .await
            .unwrap();
        let days = [old_day.date_naive(), now.date_naive()];
        projector::schema::partitions::ensure_partitions(&mut conn, &building, &days)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {building}.command_executions SELECT * FROM {}.command_executions",
            t.id.schema(1)
        )))
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    let out = tokio::task::spawn_blocking({
        let common = common.clone();
        move || {
            projector_command(&common, &["retention"])
                .stderr(std::process::Stdio::piped())
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pass: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Six daily partitions on plain PostgreSQL; with TimescaleDB, only the one chunk that
    // held rows.
    assert!(pass["partitions_dropped"].as_u64().unwrap() >= 1, "{pass}");

    let days = raw_storage_days(&pool, t.id, "command_executions").await;
    assert!(
        !days.contains(&old_day.date_naive()),
        "{old_day} is dropped: {days:?}"
    );
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        3
    );
    let kept: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {building}.command_executions"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kept, 10, "the version being built keeps every raw row");
    let old = old_day.to_rfc3339();
    let minute_rows = scalar_in_tenant(
        &pool,
        t.id,
        &format!("SELECT count(*) FROM activity_1m WHERE bucket < '{old}'::timestamptz + interval '1 day'"),
    )
    .await;
    assert_eq!(minute_rows, 0, "minute rollups follow the raw window");
    let daily = scalar_in_tenant(
        &pool,
        t.id,
        &format!("SELECT sum(count)::bigint FROM activity_1d WHERE bucket = '{old}'"),
    )
    .await;
    assert_eq!(daily, 7, "daily rollups outlive the raw rows");
    let hourly = scalar_in_tenant(
        &pool,
        t.id,
        &format!("SELECT sum(count)::bigint FROM activity_1h_folded WHERE bucket < '{old}'::timestamptz + interval '1 day'"),
    )
    .await;
    assert_eq!(
        hourly, 7,
        "retention folded the minute's deltas before deleting them"
    );
    let sessions = scalar_in_tenant(
        &pool,
        t.id,
        "SELECT count(*) FROM sessions WHERE session_id IN ('ended-long-ago', 'ended-lately')",
    )
    .await;
    let lately = scalar_in_tenant(
        &pool,
        t.id,
        "SELECT count(*) FROM sessions WHERE session_id = 'ended-lately'",
    )
    .await;
    assert_eq!(
        (sessions, lately),
        (1, 1),
        "sessions follow the rollup window"
    );
    // Partitions for the coming days exist (TimescaleDB makes its chunks as rows arrive).
    if !tenant_uses_timescale(&pool, t.id).await {
        let ahead = (now + TimeDelta::days(3)).date_naive();
        assert!(days.contains(&ahead), "partitions are made ahead: {days:?}");
    }

    // ingest-api now refuses what is older than the tenant's raw window.
    let ingest = start_ingest(&common, |_| {}).await;
    let res = post_events(
        &client,
        &ingest.url(),
        &t.ingest_key,
        &commands_days_ago(now, 3, 1),
    )
    .await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    assert!(
        body.to_string().contains("retention window of 2 days"),
        "{body}"
    );
    stop_all([ingest, projector]).await;
}

/// Retention never makes a live batch wait. A transaction holds the tenant's raw table as a
/// batch's insert does, so retention has to wait to take its old partition away; meanwhile
/// a new event of the tenant is projected within seconds. Before, the partition was dropped
/// under an exclusive lock, requested behind that transaction, and every batch carrying one of
/// the tenant's events (and every other tenant's in that batch) queued behind the request,
/// which was then held through the deletes of old rollup rows. Now it is detached
/// concurrently, which waits for the transaction while batches go on. Once the transaction
/// ends, the old partition is dropped, and so is one an earlier pass detached and did not
/// drop; the day's rows are gone and the others kept. (Any instance's pass may be the one
/// that does it: every projector of the suite prunes every schema when it starts.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_never_makes_a_live_batch_wait() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let projector = start_projector(&common).await;
    let client = http();
    let t = create_tenant(&pool, "retention-waits").await;
    let now = Utc::now();
    let today = now.duration_trunc(TimeDelta::days(1)).unwrap();
    let old_day = (now - TimeDelta::days(5))
        .duration_trunc(TimeDelta::days(1))
        .unwrap();
    let old_events = commands_days_ago(today + TimeDelta::hours(12), 5, 7);
    let new_events = commands_days_ago(now.max(today + TimeDelta::minutes(3)), 0, 3);
    for body in [old_events, new_events] {
        post_events_accepted(&client, &ingest.url(), &t.ingest_key, &body).await;
    }
    wait_projected(&pool, t.id, 10, Duration::from_secs(60)).await;
    if tenant_uses_timescale(&pool, t.id).await {
        // TimescaleDB drops chunks its own way (`drop_chunks`).
        stop_all([ingest, projector]).await;
        return;
    }
    let schema = t.id.schema(1);
    let old_part = |table: &str| format!("{table}_p{}", old_day.date_naive().format("%Y%m%d"));
    // Another raw table's old partition was detached by a pass that stopped before dropping it.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {schema}.tool_executions DETACH PARTITION {schema}.{}",
        old_part("tool_executions")
    )))
    .execute(&pool)
    .await
    .unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE {schema}.command_executions IN ROW EXCLUSIVE MODE"
    )))
    .execute(&mut *holder)
    .await
    .unwrap();
    // The window shrinks only once the table is held: no pass takes the partition before.
    sqlx::query("UPDATE control.tenants SET raw_retention_days = 2 WHERE id = $1")
        .bind(t.id.0)
        .execute(&pool)
        .await
        .unwrap();
    let retention = tokio::task::spawn_blocking({
        let common = common.clone();
        move || {
            projector_command(&common, &["retention"])
                .stderr(std::process::Stdio::piped())
                .output()
                .unwrap()
        }
    });
    // Until a pass waits for the holder, to take this schema's old partition away.
    let passes = [
        format!("ALTER TABLE {schema}.%DETACH PARTITION%"),
        format!("DROP TABLE {schema}.%"),
    ];
    wait_for_lock_waiter(&pool, &passes, "no retention pass waited for the holder").await;
    let one = commands_days_ago(now.max(today + TimeDelta::minutes(3)), 0, 1);
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &one).await;
    let projected = wait_projected(&pool, t.id, 11, Duration::from_secs(10)).await;
    assert_eq!(projected, 11, "a live batch waited for retention");
    holder.commit().await.unwrap();
    let out = retention.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = ANY($2)",
        )
        .bind(schema.as_str())
        .bind(vec![
            old_part("command_executions"),
            old_part("tool_executions"),
        ])
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let since = std::time::Instant::now();
    while left().await > 0 {
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "the old partitions are still there"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let days = raw_storage_days(&pool, t.id, "command_executions").await;
    assert!(
        !days.contains(&old_day.date_naive()),
        "{old_day} is dropped: {days:?}"
    );
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        4
    );
    stop_all([ingest, projector]).await;
}

/// The raw tables' secondary indexes a rebuild drops come back on every partition
/// (`schema::create_indexes`), and tenant template 0018 completes those an older replay left
/// as a lone, invalid index on each partitioned table (`pg_get_indexdef` run as it reads:
/// `ON ONLY`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_indexes_every_partition_and_0018_repairs_older_rebuilds() {
    let TestEnv { pool, .. } = test_env().await;
    let t = create_tenant(&pool, "whole-indexes").await;
    let reference = create_tenant(&pool, "whole-indexes-reference").await;
    let days: Vec<_> = (-2..=1)
        .map(|d| (Utc::now() + TimeDelta::days(d)).date_naive())
        .collect();
    let mut conn = pool.acquire().await.unwrap();
    for tenant in [t.id, reference.id] {
        projector::schema::create_tenant_schema(&mut conn, tenant, 1)
            .await
            .unwrap();
        projector::schema::partitions::ensure_partitions(&mut conn, &tenant.schema(1), &days)
            .await
            .unwrap();
    }
    let (schema, reference) = (t.id.schema(1), reference.id.schema(1));
    if tenant_uses_timescale(&pool, t.id).await {
        // Hypertables' indexes are ordinary ones: nothing reads `ON ONLY` there.
        assert!(index_faults(&pool, schema.as_str(), reference.as_str())
            .await
            .is_empty());
        return;
    }
    let faults = || index_faults(&pool, schema.as_str(), reference.as_str());
    assert_eq!(
        faults().await,
        Vec::<String>::new(),
        "a new schema is whole"
    );

    // A rebuild's drop and build, as the replay's bulk load does them.
    let mut dropped = Vec::new();
    projector::schema::drop_secondary_indexes(&mut conn, &schema, &mut dropped)
        .await
        .unwrap();
    assert!(dropped.len() >= 12, "{dropped:?}");
    assert!(!faults().await.is_empty(), "dropped, they are missed");
    projector::schema::create_indexes(&pool, &schema, &dropped)
        .await
        .unwrap();
    assert_eq!(faults().await, Vec::<String>::new(), "built again, whole");

    // What a replay before template 0018 left: the definitions run as they read.
    projector::schema::drop_secondary_indexes(&mut conn, &schema, &mut Vec::new())
        .await
        .unwrap();
    for definition in &dropped {
        assert!(definition.contains(" ON ONLY ") || definition.contains("session_usage"));
        sqlx::query(sqlx::AssertSqlSafe(definition.clone()))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
    // A partition made after such a replay gets each index, attached to the invalid parent.
    // A past day: other tests' projectors make the coming days' partitions of every schema
    // (retention), at any moment, perhaps while this one's indexes were dropped.
    let later = (Utc::now() - TimeDelta::days(20)).date_naive();
    projector::schema::partitions::ensure_partitions(&mut conn, &schema, &[later])
        .await
        .unwrap();
    let broken = faults().await;
    assert!(
        broken.iter().any(|f| f.contains("invalid")) && broken.iter().any(|f| f.contains("_p20")),
        "invalid parents, partitions without indexes: {broken:?}"
    );
    let made_later = later.format("_p%Y%m%d").to_string();
    assert!(
        !broken.iter().any(|f| f.contains(&made_later)),
        "the partition made later has every index: {broken:?}"
    );
    set_template_version(&mut conn, t.id, 1, 17).await;
    drop(conn);
    projector::migrate(&pool, projector::schema::timescale::Timescale::Auto)
        .await
        .unwrap();
    assert_eq!(faults().await, Vec::<String>::new(), "0018 completed them");
}
