//! A batch sent twice (same event ids) is counted once — also with an Idempotency-Key.

use std::time::Duration;

use serde_json::{json, Value};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_batch_twice_counts_once() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "dedup").await;

    let batch: Vec<Value> = (0..300)
        .map(|i| command("u1", "build", i, i % 10 != 0))
        .collect();
    for _ in 0..2 {
        let res = post_events(
            &client,
            &ingest.url(),
            &t.ingest_key,
            &Value::Array(batch.clone()),
        )
        .await;
        assert_eq!(res.status(), 202);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["accepted"], 300);
    }
    // Without ids, an Idempotency-Key makes the retry carry the same derived ids.
    let anonymous: Vec<Value> = (0..50)
        .map(|i| json!({"type": "tool.executed", "occurred_at": ago(30), "data": {"user_id": "u1", "session_id": "s", "tool_name": "Edit", "duration_ms": i, "success": true}}))
        .collect();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let res = client
            .post(format!("{}/v1/events", ingest.url()))
            .bearer_auth(&t.ingest_key)
            .header("Idempotency-Key", "retry-me-42")
            .json(&anonymous)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 202);
        let body: Value = res.json().await.unwrap();
        ids.push(body["ids"].clone());
    }
    assert_eq!(ids[0], ids[1], "the retry got the same ids");
    // A duplicate inside one batch is counted once too.
    let dup = command("u1", "lint", 7, true);
    post_events_accepted(
        &client,
        &ingest.url(),
        &t.ingest_key,
        &Value::Array(vec![dup.clone(), dup]),
    )
    .await;

    // 600 + 100 + 2 records went to Kafka; 351 distinct events.
    wait_projected(&pool, t.id, 351, Duration::from_secs(60)).await;
    // Give any double-count a chance to show before asserting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(projected_events(&pool, t.id).await, Some(351));
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        301
    );
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM tool_executions").await,
        50
    );
    for table in ["activity_1m", "activity_1h", "activity_1d"] {
        let sql =
            format!("SELECT sum(count)::bigint FROM {table} WHERE event_type = 'command.executed'");
        assert_eq!(scalar_in_tenant(&pool, t.id, &sql).await, 301, "{table}");
        let sql = format!("SELECT sum(errors)::bigint FROM {table}");
        assert_eq!(scalar_in_tenant(&pool, t.id, &sql).await, 30, "{table}");
        let sql = format!(
            "SELECT sum(duration_sum)::bigint FROM {table} WHERE event_type = 'command.executed'"
        );
        assert_eq!(
            scalar_in_tenant(&pool, t.id, &sql).await,
            (0..300).sum::<i64>() + 7,
            "{table}"
        );
    }
    stop_all([projector, ingest]).await;
}

/// Each batch appends its per-key deltas to the pending tables; the compactor folds them
/// into one row per key. Counted through what readers read, every event is there once after
/// every batch; once folded, the folded tables alone hold every event once and nothing waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appended_rollup_deltas_are_folded_exactly_once() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "folded").await;

    let views = ["activity_1m", "activity_1h", "activity_1d"];
    // One minute, hour and day for every event: one key per grain.
    let at = (chrono::Utc::now() - chrono::TimeDelta::minutes(2)).to_rfc3339();
    for round in 1..=3 {
        let batch = Value::Array(
            (0..20)
                .map(|i| {
                    let mut e = command("u1", "build", i, i % 5 != 0);
                    e["occurred_at"] = json!(at);
                    e
                })
                .collect(),
        );
        post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch).await;
        wait_projected(&pool, t.id, 20 * round, Duration::from_secs(60)).await;
        for view in views {
            let sql = format!("SELECT sum(count)::bigint FROM {view}");
            assert_eq!(
                scalar_in_tenant(&pool, t.id, &sql).await,
                20 * round,
                "{view}"
            );
        }
    }
    wait_folded(&pool, t.id, Duration::from_secs(20)).await;
    for table in [
        "activity_1m_folded",
        "activity_1h_folded",
        "activity_1d_folded",
    ] {
        let one = |sql: &str| sql.replace("{t}", table);
        let check = [
            ("SELECT sum(count)::bigint FROM {t}", 60),
            ("SELECT sum(errors)::bigint FROM {t}", 12),
            (
                "SELECT sum(duration_sum)::bigint FROM {t}",
                3 * (0..20).sum::<i64>(),
            ),
            (
                "SELECT sum(n)::bigint FROM {t}, unnest(duration_hist) n",
                60,
            ),
            ("SELECT count(*) FROM {t}", 1),
        ];
        for (sql, want) in check {
            assert_eq!(
                scalar_in_tenant(&pool, t.id, &one(sql)).await,
                want,
                "{}",
                one(sql)
            );
        }
    }
    stop_all([projector, ingest]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deltas_waiting_in_a_schema_of_template_0010_count_once_across_the_upgrade() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    // This projector does not fold in the test's time; the downgrade below puts back what
    // a neighbouring test's compactor may have folded.
    let projector = start_projector_with(&common, |c| c.compact_interval_ms = 3_600_000).await;
    let client = http();
    let t = create_tenant(&pool, "upgraded").await;
    let views = ["activity_1m", "activity_1h", "activity_1d"];
    let sums = || async {
        let mut out = Vec::new();
        for view in views {
            let sql = format!("SELECT coalesce(sum(count), 0)::bigint FROM {view}");
            out.push(scalar_in_tenant(&pool, t.id, &sql).await);
        }
        out
    };

    let batch = |n: i64| Value::Array((0..n).map(|i| command("u1", "build", i, false)).collect());
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch(30)).await;
    wait_projected(&pool, t.id, 30, Duration::from_secs(60)).await;
    projector.stop().await.unwrap();

    // Turn the schema back into what template 0010 made, with every delta waiting as a
    // projector of 0010 appended them: once per grain. Under the schema's lock, which every
    // fold takes: whatever a neighbouring test's compactor folded already goes back to
    // pending, and none folds it again before the upgrade (nor after this commits: compactors
    // leave a schema of an older template alone).
    let version = active_version(&pool, t.id).await;
    let schema = t.id.schema(version);
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema.as_str())
        .execute(&mut *tx)
        .await
        .unwrap();
    projector::schema::set_search_path(&mut tx, &schema)
        .await
        .unwrap();
    sqlx::raw_sql(projector::schema::LATER_TEMPLATES[8])
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO activity_1m_pending SELECT * FROM activity_1m_folded;
         TRUNCATE activity_1m_folded, activity_1h_folded, activity_1d_folded;",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    for (grain, width) in [("1h", "1 hour"), ("1d", "1 day")] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "INSERT INTO activity_{grain}_pending
             SELECT date_bin('{width}', bucket, TIMESTAMPTZ 'epoch'), event_type, user_id,
                    team_id, project_id, name, count, errors, duration_sum, duration_max,
                    input_tokens, output_tokens, value_sum, duration_hist
               FROM activity_1m_pending"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    set_template_version(&mut tx, t.id, version, 10).await;
    let waiting: i64 = sqlx::query_scalar("SELECT sum(count)::bigint FROM activity_1h_pending")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(waiting, 30, "every delta waits, for every grain");
    tx.commit().await.unwrap();
    assert_eq!(sums().await, [30, 30, 30], "as template 0010 reads them");
    // A compactor that listed the schema before it went back to 0010 (a neighbouring test's
    // projector, as CI once met at [30, 60, 60] after the upgrade) leaves it to the upgrade.
    // `None` is the schema's lock held by that neighbour at this moment (CI met it once):
    // asked again until this call takes the lock itself.
    let mut folded = None;
    for _ in 0..100 {
        folded = projector::models::rollups::compact(&pool, &schema)
            .await
            .unwrap();
        if folded.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(folded, Some(0), "an older template's deltas are not folded");
    // Nor by a retention pass that listed it before (its fold of old minutes writes what this
    // binary's templates read): with every minute old enough to fold, the schema is skipped.
    let windows = projector::schema::partitions::Windows {
        raw_days: -1,
        rollup_days: 400,
        compress_after_days: 400,
        ahead_days: 1,
    };
    let today = chrono::Utc::now().date_naive();
    let mut conn = pool.acquire().await.unwrap();
    let pruned = projector::schema::partitions::apply_retention(&mut conn, &schema, today, windows)
        .await
        .unwrap();
    assert_eq!(
        pruned, None,
        "an older template's schema is left to its upgrade"
    );
    drop(conn);
    assert_eq!(
        sums().await,
        [30, 30, 30],
        "nothing folded before the upgrade"
    );

    projector::migrate(&pool, projector::schema::timescale::Timescale::Auto)
        .await
        .unwrap();
    assert_eq!(sums().await, [30, 30, 30], "the upgrade counts each once");
    for table in ["activity_1h_pending", "activity_1d_pending"] {
        let gone = format!("SELECT count(*) FROM pg_class WHERE oid = to_regclass('{table}')");
        assert_eq!(scalar_in_tenant(&pool, t.id, &gone).await, 0, "{table}");
    }

    // And the upgraded schema goes on: more deltas, folded into every grain.
    let projector = start_projector(&common).await;
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch(12)).await;
    wait_projected(&pool, t.id, 42, Duration::from_secs(60)).await;
    wait_folded(&pool, t.id, Duration::from_secs(20)).await;
    assert_eq!(sums().await, [42, 42, 42]);
    for table in ["activity_1h_folded", "activity_1d_folded"] {
        let sql = format!("SELECT sum(count)::bigint FROM {table}");
        assert_eq!(scalar_in_tenant(&pool, t.id, &sql).await, 42, "{table}");
    }
    stop_all([projector, ingest]).await;
}

/// A batch appends its pending histograms sparse (only the span of their non-empty buckets,
/// tenant template 0012). Readers see them dense through every grain's view, and the fold
/// merges them bucket for bucket (here into a dense row: the `{0}` delta spans bucket 1;
/// `folded_histograms_stay_sparse_and_read_dense` folds sparse ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sparse_pending_histograms_read_and_fold_as_dense() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "sparse").await;
    // The schema exists once an event is projected.
    let one = Value::Array(vec![command("u1", "build", 1, false)]);
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &one).await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    stop_all([projector, ingest]).await;

    // One SQL expression's value, as text.
    let text = |sql: String| {
        let pool = pool.clone();
        async move {
            let got: String = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap();
            got
        }
    };
    // The merge itself, either operand sparse, dense or empty: always dense and 1-based.
    let sums = [
        ("'{1,2}'", "'[3:4]={5,6}'", "{1,2,5,6}"),
        ("'[2:3]={5,6}'", "'{1}'", "{1,5,6}"),
        ("'[2:2]={5}'", "'[4:4]={7}'", "{0,5,0,7}"),
        ("'{1,2,3}'", "'[2:2]={10}'", "{1,12,3}"),
        ("'{}'", "'[3:3]={1}'", "{0,0,1}"),
        ("'{}'", "'{}'", "{}"),
    ];
    for (a, b, want) in sums {
        let sql = format!("SELECT control.hist_add({a}::bigint[], {b}::bigint[])::text");
        assert_eq!(text(sql).await, want, "hist_add({a}, {b})");
    }
    // The fold's sums (control migration 0020) stay sparse: they span from the lower of the
    // first buckets to the higher of the last.
    let sparse_sums = [
        ("'{1,2}'", "'[3:4]={5,6}'", "{1,2,5,6}"),
        ("'[2:3]={5,6}'", "'{1}'", "{1,5,6}"),
        ("'[2:2]={5}'", "'[4:4]={7}'", "[2:4]={5,0,7}"),
        ("'[4:4]={7}'", "'[2:2]={5}'", "[2:4]={5,0,7}"),
        ("'[3:5]={1,2,3}'", "'[4:4]={10}'", "[3:5]={1,12,3}"),
        ("'[4:4]={10}'", "'[3:5]={1,2,3}'", "[3:5]={1,12,3}"),
        ("'{}'", "'[3:3]={1}'", "[3:3]={1}"),
        ("'[3:3]={1}'", "'{}'", "[3:3]={1}"),
    ];
    for (a, b, want) in sparse_sums {
        let sql = format!("SELECT control.hist_merge({a}::bigint[], {b}::bigint[])::text");
        assert_eq!(text(sql).await, want, "hist_merge({a}, {b})");
    }
    // Summed over a set: a lone histogram as it is, several as their sparse sum.
    let over_sets = [
        ("('[25:27]={1,0,2}')", "[25:27]={1,0,2}"),
        ("('[3:4]={1,2}'), ('[6:6]={5}'), ('{0}')", "{0,0,1,2,0,5}"),
        (
            "('[6:6]={5}'), ('[3:4]={1,2}'), ('[4:4]={3}')",
            "[3:6]={1,5,0,5}",
        ),
    ];
    for (rows, want) in over_sets {
        let sql = format!(
            "SELECT control.hist_merge_sum(h::bigint[])::text FROM (VALUES {rows}) AS x(h)"
        );
        assert_eq!(text(sql).await, want, "hist_merge_sum over {rows}");
    }

    // Three sparse deltas of one key-minute, as batches append them: buckets 3, 4 and 40.
    let version = active_version(&pool, t.id).await;
    let schema = t.id.schema(version);
    let mut tx = pool.begin().await.unwrap();
    projector::schema::set_search_path(&mut tx, &schema)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO activity_1m_pending (bucket, event_type, user_id, team_id, project_id,
                name, count, errors, duration_sum, duration_max, input_tokens, output_tokens,
                value_sum, duration_hist)
         SELECT date_trunc('minute', now()) - interval '10 minutes', 'command.executed',
                'sparse-user', '', '', 'build', n, 0, 0, 0, 0, 0, 0, h::bigint[]
           FROM (VALUES (3, '[3:4]={1,2}'), (5, '[40:40]={5}'), (0, '{0}')) AS x(n, h)",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    // Read as the dashboards read them: unnested with their ordinality.
    let buckets = |table: &str| {
        format!(
            "SELECT string_agg(i || ':' || n, ',' ORDER BY i) FROM (
                 SELECT h.i, sum(h.n)::bigint AS n
                   FROM {table} a, unnest(a.duration_hist) WITH ORDINALITY AS h(n, i)
                  WHERE a.user_id = 'sparse-user' AND h.n > 0 GROUP BY h.i) s"
        )
    };
    let read = |sql: String| {
        let pool = pool.clone();
        let schema = schema.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            projector::schema::set_search_path(&mut tx, &schema)
                .await
                .unwrap();
            let got: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            got.unwrap_or_default()
        }
    };
    let want = "3:1,4:2,40:5";
    for view in ["activity_1m", "activity_1h", "activity_1d"] {
        assert_eq!(read(buckets(view)).await, want, "{view}, pending");
        let lower = format!(
            "SELECT string_agg(DISTINCT array_lower(duration_hist, 1)::text, ',') FROM {view}
              WHERE user_id = 'sparse-user'"
        );
        assert_eq!(read(lower).await, "1", "{view} reads dense histograms");
    }

    // Folded (by this call, or by a neighbouring test's compactor first): the same buckets,
    // in one dense row per grain.
    fold_now(&pool, &schema).await;
    wait_folded(&pool, t.id, Duration::from_secs(20)).await;
    for table in [
        "activity_1m_folded",
        "activity_1h_folded",
        "activity_1d_folded",
    ] {
        assert_eq!(read(buckets(table)).await, want, "{table}");
        let row = format!(
            "SELECT count(*)::text || ' ' || min(duration_hist::text) FROM {table}
              WHERE user_id = 'sparse-user'"
        );
        let dense = format!("1 {{{}1,2{}5}}", "0,".repeat(2), ",0".repeat(35) + ",");
        assert_eq!(read(row).await, dense, "{table}");
    }
}

/// The folded per-key rows keep the span of their deltas' buckets (tenant template 0017):
/// the fold stores its sparse sums as they are and merges a later delta into them sparse;
/// every grain's view and the span functions read them dense and 1-based, bucket for bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn folded_histograms_stay_sparse_and_read_dense() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "sparse-folded").await;
    // The schema exists once an event is projected.
    let one = Value::Array(vec![command("u1", "build", 1, false)]);
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &one).await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    stop_all([projector, ingest]).await;

    let schema = t.id.schema(active_version(&pool, t.id).await);
    let in_schema = |sql: String| {
        let (pool, schema) = (pool.clone(), schema.clone());
        async move {
            let mut tx = pool.begin().await.unwrap();
            projector::schema::set_search_path(&mut tx, &schema)
                .await
                .unwrap();
            let got: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            got.unwrap_or_default()
        }
    };
    // Deltas of one key-minute ten minutes ago (the same minute for every call, whatever
    // minute or hour the test reaches), as batches append them, then folded (by this call, or
    // by a neighbouring test's compactor first).
    let minute = chrono::DurationRound::duration_trunc(
        chrono::Utc::now() - chrono::TimeDelta::minutes(10),
        chrono::TimeDelta::minutes(1),
    )
    .unwrap()
    .to_rfc3339();
    let fold = |deltas: &'static str| {
        let minute = minute.clone();
        let (pool, schema) = (pool.clone(), schema.clone());
        async move {
            in_schema(format!(
                "WITH x AS (
                   INSERT INTO activity_1m_pending (bucket, event_type, user_id, team_id,
                          project_id, name, count, errors, duration_sum, duration_max,
                          input_tokens, output_tokens, value_sum, duration_hist)
                   SELECT '{minute}'::timestamptz,
                          'command.executed', 'sparse-folded', '', '', 'build', n, 0, 0, 0, 0,
                          0, 0, h::bigint[]
                     FROM (VALUES {deltas}) AS v(n, h) RETURNING 1)
                 SELECT count(*)::text FROM x"
            ))
            .await;
            fold_now(&pool, &schema).await;
            wait_folded(&pool, t.id, Duration::from_secs(20)).await;
        }
    };
    let stored = |table: &str| {
        format!(
            "SELECT count(*)::text || ' ' || min(duration_hist::text) FROM {table}
              WHERE user_id = 'sparse-folded'"
        )
    };
    // Read as the dashboards read them: unnested with their ordinality, and 1-based.
    let read = |from: &str| {
        format!(
            "SELECT string_agg(i || ':' || n, ',' ORDER BY i) || ' '
                    || string_agg(DISTINCT array_lower(dh, 1)::text, ',') FROM (
                 SELECT h.i, sum(h.n)::bigint AS n, min(a.duration_hist) AS dh
                   FROM {from} a, unnest(a.duration_hist) WITH ORDINALITY AS h(n, i)
                  WHERE a.user_id = 'sparse-folded' AND h.n > 0 GROUP BY h.i) s"
        )
    };
    let readers = [
        "activity_1m",
        "activity_1h",
        "activity_1d",
        "activity_hours(now() - interval '3 days', now())",
        "activity_days(now() - interval '3 days', now())",
        "activity_whole_hours(now() - interval '3 days', now() + interval '1 day')",
        "activity_whole_days(now() - interval '3 days', now() + interval '1 day')",
    ];

    // One row per grain holding `stored`, and every reader seeing `buckets` 1-based.
    let check = |stored_want: String, buckets: &'static str| async move {
        for grain in projector::models::rollups::Grain::ALL {
            let got = in_schema(stored(grain.store())).await;
            assert_eq!(got, stored_want, "{grain:?}");
        }
        for from in readers {
            assert_eq!(in_schema(read(from)).await, buckets, "{from}");
        }
    };

    fold("(3, '[3:4]={1,2}'), (5, '[40:40]={5}')").await;
    let sparse = format!("1 [3:40]={{1,2{}5}}", ",0".repeat(35) + ",");
    check(sparse, "3:1,4:2,40:5 1").await;

    // A later delta merged into the folded row: its span widened, still sparse.
    fold("(7, '[2:2]={7}')").await;
    let merged = format!("1 [2:40]={{7,1,2{}5}}", ",0".repeat(35) + ",");
    check(merged, "2:7,3:1,4:2,40:5 1").await;
}

/// Folds `schema`'s pending rows with the compactor's own call, once no one else holds the
/// schema's lock. It is held only by short transactions (a neighbour's fold, an upgrade): ten
/// seconds of tries is ample, and a lock never released fails the test.
async fn fold_now(pool: &sqlx::PgPool, schema: &shared::tenant::SchemaName) {
    let mut tries = 0;
    while projector::models::rollups::compact(pool, schema)
        .await
        .unwrap()
        .is_none()
    {
        tries += 1;
        assert!(tries < 200, "the schema's lock was held for 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
