//! Records PostgreSQL refuses for their own sake never stall the projector: they are found,
//! dead-lettered with the reason, and everything else — another tenant's events behind them
//! on the same partition above all — is projected. A batch that keeps failing for any other
//! reason is visible on `/readyz`, `/metrics` and in `projector status`. And positions hold
//! where the log and the stored offsets disagree (item 9 of issue 11).

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use shared::config::Common;
use shared::tenant::TenantId;
use tally_tests::*;
use uuid::Uuid;

/// What every test here starts from: its own topics (made), the database, a producer.
struct Setup {
    pool: sqlx::PgPool,
    common: Common,
    producer: FutureProducer,
    topic: String,
}

async fn setup() -> Setup {
    let TestEnv { pool, common } = test_env().await;
    shared::kafka::ensure_topics(&common, &common.all_topics())
        .await
        .unwrap();
    let producer = shared::kafka::producer(&common, Duration::from_secs(10)).unwrap();
    let topic = common.metrics_topic();
    Setup {
        pool,
        common,
        producer,
        topic,
    }
}

/// A valid envelope of `tenant`, as JSON (poison is made by editing it afterwards).
fn envelope(tenant: TenantId, event: Value) -> Value {
    let ctx = api_context(tenant);
    serde_json::to_value(ctx.envelope(0, event).expect("valid event")).unwrap()
}

/// `n` random CJK characters: 3 bytes each, and nothing for compression to find.
fn wide(n: usize) -> String {
    (0..n)
        .map(|_| {
            let r = u32::from(u16::from_le_bytes(
                Uuid::new_v4().as_bytes()[..2].try_into().unwrap(),
            ));
            char::from_u32(0x4e00 + r % 0x5000).unwrap()
        })
        .collect()
}

/// A sample whose value the doors refuse today (beyond `ingest_api::ingest::storable::MAX_VALUE`),
/// as an older writer put it in the log: made valid, then edited.
fn huge(tenant: TenantId, name: &str, value: f64) -> Value {
    let mut e = envelope(tenant, sample(name, 1.0));
    e["data"]["value"] = json!(value);
    e
}

fn sample(name: &str, value: f64) -> Value {
    json!({"type": "metric.sample", "occurred_at": ago(30),
           "data": {"name": name, "value": value, "labels": {"user.id": "u"}}})
}

async fn produce(producer: &FutureProducer, topic: &str, partition: i32, records: &[Value]) {
    for r in records {
        let bytes = serde_json::to_vec(r).unwrap();
        producer
            .send(
                FutureRecord::<str, [u8]>::to(topic)
                    .partition(partition)
                    .key("k")
                    .payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .expect("produce");
    }
}

/// Every record of a topic as (payload, headers by name), read from the beginning until
/// `n` arrived or 30 s passed.
async fn read_all(common: &Common, topic: String, n: usize) -> Vec<(Value, Vec<(String, String)>)> {
    let consumer: BaseConsumer = shared::kafka::client_config(common)
        .set(
            "group.id",
            format!("{}reader-{}", common.topic_prefix, Uuid::new_v4()),
        )
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.len() < n && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let headers = [
                    "tally-source-partition",
                    "tally-source-offset",
                    "tally-error",
                ]
                .iter()
                .filter_map(|k| {
                    projector::consumer::header(&m, k)
                        .map(|v| (k.to_string(), String::from_utf8_lossy(v).into_owned()))
                })
                .collect();
                out.push((
                    serde_json::from_slice(m.payload().unwrap_or(b"null")).unwrap_or(Value::Null),
                    headers,
                ));
            }
        }
        out
    })
    .await
    .unwrap()
}

fn header<'a>(h: &'a [(String, String)], k: &str) -> &'a str {
    h.iter()
        .find(|(name, _)| name == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// The DLQ's first record is `record`, refused by PostgreSQL with SQLSTATE `code`.
async fn assert_the_one_dead_letter(common: &Common, record: &Value, code: &str) {
    let dead = read_all(common, common.metrics_dlq_topic(), 1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0["id"], record["id"]);
    let error = header(&dead[0].1, "tally-error");
    assert!(
        error.contains("refused by PostgreSQL") && error.contains(code),
        "{error}"
    );
}

async fn overview_total(client: &reqwest::Client, query: &str, key: &str) -> f64 {
    let body = get_json(
        client,
        &format!("{query}/v1/dashboard/overview?range=1h"),
        key,
    )
    .await;
    body["events_total"].as_f64().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_postgresql_refuses_are_dead_lettered_and_others_flow() {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let attacker = create_tenant(&pool, "poisoner").await;
    let victim = create_tenant(&pool, "neighbour").await;
    let projector = start_projector(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();

    // A first batch lands: one command and a huge (finite) metric value.
    produce(
        &producer,
        &topic,
        0,
        &[
            envelope(attacker.id, command("u", "build", 5, true)),
            huge(attacker.id, "huge", 1.5e308),
        ],
    )
    .await;
    wait_projected(&pool, attacker.id, 2, Duration::from_secs(60)).await;

    // Three records the door refuses today, written straight to the log (as an older
    // writer or a replayed log could), then the neighbour's event behind them.
    let mut nul = envelope(attacker.id, command("u", "build", 5, true));
    nul["data"]["command_name"] = json!("a\u{0}b");
    let mut nul_json = envelope(attacker.id, command("u", "build", 5, true));
    nul_json["data"]["args"] = json!({"k": "x\u{0}y"});
    let mut long_key = envelope(attacker.id, command("u", "build", 5, true));
    long_key["data"]["user_id"] = json!(wide(255));
    long_key["data"]["team_id"] = json!(wide(255));
    long_key["data"]["project_id"] = json!(wide(255));
    long_key["data"]["command_name"] = json!(wide(255));
    // The sum of two finite values that float8 cannot hold.
    let overflow = huge(attacker.id, "huge", 1.5e308);
    let fine = envelope(attacker.id, command("u", "test", 7, false));
    let poison = [nul, nul_json, long_key, overflow];
    let mut records: Vec<Value> = poison.to_vec();
    records.push(fine);
    produce(&producer, &topic, 0, &records).await;
    let sent = Instant::now();
    produce(
        &producer,
        &topic,
        0,
        &[envelope(victim.id, command("v", "deploy", 9, true))],
    )
    .await;

    // The neighbour's event is on its dashboard within 5 s.
    loop {
        if overview_total(&client, &query.url(), &victim.read_key).await >= 1.0 {
            break;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "the neighbour's event is not on its dashboard 5 s after it was sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "neighbour's event on its dashboard after {:?}",
        sent.elapsed()
    );

    // The poisoner's good events are all there, each once, and nothing of the refused ones.
    wait_projected(&pool, attacker.id, 3, Duration::from_secs(10)).await;
    assert_eq!(
        scalar_in_tenant(
            &pool,
            attacker.id,
            "SELECT count(*) FROM command_executions"
        )
        .await,
        2
    );
    assert_eq!(
        scalar_in_tenant(&pool, attacker.id, "SELECT count(*) FROM metric_samples").await,
        1
    );
    assert_eq!(
        scalar_in_tenant(
            &pool,
            attacker.id,
            "SELECT sum(count)::bigint FROM activity_1d WHERE event_type = 'command.executed'"
        )
        .await,
        2
    );

    // The DLQ holds exactly the four refused records, each with its origin and the reason.
    let mut dead = read_all(&common, common.metrics_dlq_topic(), 5).await;
    // Dead letters keep their record's key, so they spread over the DLQ's partitions.
    dead.sort_by_key(|(_, h)| {
        header(h, "tally-source-offset")
            .parse::<i64>()
            .unwrap_or(-1)
    });
    let errors: Vec<&str> = dead.iter().map(|(_, h)| header(h, "tally-error")).collect();
    assert_eq!(dead.len(), 4, "{errors:#?}");
    let expected_codes = ["22021", "22P05", "54000", "22003"];
    for (i, (payload, h)) in dead.iter().enumerate() {
        assert_eq!(
            payload["id"], poison[i]["id"],
            "dead letter {i}: {errors:#?}"
        );
        assert_eq!(header(h, "tally-source-partition"), "0");
        assert_eq!(header(h, "tally-source-offset"), (i + 2).to_string());
        let error = header(h, "tally-error");
        assert!(
            error.contains("refused by PostgreSQL") && error.contains(expected_codes[i]),
            "dead letter {i}: {error}"
        );
    }

    // Nothing stalled: ready, and no partition marked.
    let ready = client
        .get(format!("{}/readyz", projector.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let stalled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.projector_offsets WHERE topic = $1 AND stalled_since IS NOT NULL",
    )
    .bind(&topic)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stalled, 0);
    stop_all([projector, query]).await;
}

/// A per-key rollup sum out of float8's range is refused with the record that tips it, in
/// its batch, even while the tenant-wide sum stays finite (values of both signs on two
/// keys): the per-key deltas are appended and summed only later, by the compactor, which
/// must never meet a sum it cannot fold (it would stop folding the tenant's rollups).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_per_key_sum_out_of_range_is_refused_while_the_tenants_is_not() {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "signs").await;
    let projector = start_projector(&common).await;
    let again = huge(t.id, "k1", 1.7e308);
    // Each in a batch of its own, the last two together.
    produce(&producer, &topic, 0, &[huge(t.id, "k1", 1.7e308)]).await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    produce(&producer, &topic, 0, &[huge(t.id, "k2", -1.7e308)]).await;
    wait_projected(&pool, t.id, 2, Duration::from_secs(60)).await;
    produce(
        &producer,
        &topic,
        0,
        &[again.clone(), envelope(t.id, sample("k2", 1.0))],
    )
    .await;
    wait_projected(&pool, t.id, 3, Duration::from_secs(60)).await;

    assert_the_one_dead_letter(&common, &again, "22003").await;
    // Everything else is folded, and adds up.
    wait_folded(&pool, t.id, Duration::from_secs(20)).await;
    for table in [
        "activity_1m_folded",
        "activity_1h_folded",
        "activity_1d_folded",
    ] {
        let sql = format!("SELECT sum(count)::bigint FROM {table}");
        assert_eq!(scalar_in_tenant(&pool, t.id, &sql).await, 3, "{table}");
        let sql = format!("SELECT (sum(value_sum) / 1e306)::bigint FROM {table} WHERE name = 'k1'");
        assert_eq!(scalar_in_tenant(&pool, t.id, &sql).await, 170, "{table}");
    }
    stop_all([projector]).await;
}

/// A batch is written ahead while the one before it finishes (`batch::Pipeline`). When the
/// one before fails after its raw rows (here a per-key sum out of range, refused by the
/// rollups), the batch ahead is rolled back before the failing one is written again, and its
/// records are read again: every event is projected once, the refused one dead-lettered.
/// Whether a batch goes ahead of the failing one depends on how the records arrive from
/// Kafka (they must fill the next batch before the failure is known), so the round is played
/// again, on a topic and tenant of its own and with every exact check, until one did: at most
/// five rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_written_ahead_of_one_that_fails_is_rolled_back_and_written_once() {
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let (rolled_back, started) = written_ahead_round().await;
        rounds.push((rolled_back, started));
        if rolled_back >= 1 && started >= 2 {
            return;
        }
    }
    panic!("no batch ahead rolled back in five rounds: (rolled back, started) {rounds:?}");
}

/// One round of the test above: every exact check, and how many batches ahead were rolled
/// back and started.
async fn written_ahead_round() -> (u64, u64) {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "ahead").await;
    let small = |c: &mut projector::Config| c.batch_max_events = 40;
    let projector = start_projector_with(&common, small).await;
    produce(&producer, &topic, 0, &[huge(t.id, "k1", 1.7e308)]).await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    stop_all([projector]).await;

    // Queued while the projector is away: a batch of 40 whose last event overflows its key's
    // sum, then three batches more.
    let again = huge(t.id, "k1", 1.7e308);
    let mut records: Vec<Value> = (0..39)
        .map(|i| envelope(t.id, command("u", "first", i, true)))
        .collect();
    records.push(again.clone());
    records.extend((0..120).map(|i| envelope(t.id, command("u", "after", i, true))));
    produce(&producer, &topic, 0, &records).await;
    let projector = start_projector_with(&common, small).await;
    wait_projected(&pool, t.id, 160, Duration::from_secs(60)).await;

    assert_the_one_dead_letter(&common, &again, "22003").await;
    let metrics = scrape_metrics(&http(), &projector.url()).await;
    let ahead = |outcome: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("projector_ahead_batches_total{"))
            .filter(|l| l.contains(&format!("topic=\"{topic}\"")))
            .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    // Every batch ahead wrote its raw rows before it learnt whether the one before landed
    // (none waited for schemas first), so the one rolled back had written its rows.
    assert_eq!(ahead("not_ready"), 0, "{metrics}");
    let went_ahead = (ahead("rolled_back"), ahead("started"));
    // Give a double count time to show.
    wait_folded(&pool, t.id, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(projected_events(&pool, t.id).await, Some(160));
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move { scalar_in_tenant(&pool, t.id, sql).await }
    };
    assert_eq!(count("SELECT count(*) FROM command_executions").await, 159);
    assert_eq!(
        count("SELECT count(*) FROM command_executions WHERE name = 'after'").await,
        120
    );
    assert_eq!(count("SELECT count(*) FROM metric_samples").await, 1);
    for table in ["activity_1m", "activity_1h", "activity_1d"] {
        let sql = format!("SELECT sum(count)::bigint FROM {table}");
        assert_eq!(scalar_in_tenant(&pool, t.id, &sql).await, 160, "{table}");
    }
    // The live feed's positions: one per batch that landed, none skipped, the last the
    // watermark's (the first batch, position 1, wrote the sample).
    let seqs = "SELECT count(DISTINCT feed_seq) - max(feed_seq) FROM command_executions";
    assert_eq!(count(seqs).await, -1);
    let last = "SELECT max(feed_seq) - (SELECT seq FROM projection_state) FROM command_executions";
    assert_eq!(count(last).await, 0);
    stop_all([projector]).await;
    went_ahead
}

/// A batch written ahead gives its rows the feed position after the batch before's. If
/// another writer of the tenant (the auth topic's loop, another instance) committed that
/// position first, the batch's rows take the next one when it locks the watermark: the feed
/// stays in commit order, one position per transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_written_ahead_takes_the_next_feed_position_when_another_writer_took_its_own() {
    use projector::batch::{self, AheadOf, Mode, Pipeline};
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "restamp").await;
    let projector = start_projector(&common).await;
    let first = envelope(t.id, command("u", "first", 1, true));
    produce(&producer, &topic, 0, &[first]).await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    stop_all([projector]).await;

    // Written ahead as if the batch before had given the tenant position 5: it gave 1.
    let events: Vec<batch::Decoded> = (0..70)
        .map(|i| {
            let record = envelope(t.id, command("u", "ahead", i, true));
            let bytes = serde_json::to_vec(&record).unwrap();
            let mut d = projector::consumer::decode(Some(&bytes)).unwrap();
            d.origin = (0, i);
            d
        })
        .collect();
    let versions = std::collections::HashMap::from([(t.id, active_version(&pool, t.id).await)]);
    let (landed, landed_rx) = tokio::sync::oneshot::channel();
    landed.send(true).unwrap();
    let pipeline = Pipeline {
        raw_written: None,
        ahead_of: Some(AheadOf {
            before: std::collections::HashMap::from([(t.id, 5)]),
            landed: landed_rx,
        }),
    };
    let written = batch::write(
        &pool,
        "restamp",
        &topic,
        projector::prepare::Target::Live(&versions),
        &events,
        &std::collections::BTreeMap::new(),
        Mode::Live(None, pipeline),
    )
    .await
    .unwrap();
    assert_eq!(written.tenants, vec![(t.id, 2)]);
    assert_eq!(projected_events(&pool, t.id).await, Some(71));
    let at = |seq: i64| {
        let pool = pool.clone();
        let sql = format!("SELECT count(*) FROM command_executions WHERE feed_seq = {seq}");
        async move { scalar_in_tenant(&pool, t.id, &sql).await }
    };
    assert_eq!(at(1).await, 1);
    assert_eq!(at(2).await, 70);
    assert_eq!(at(6).await, 0);
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT seq FROM projection_state").await,
        2
    );
}

/// A tenant with many events in a batch has its raw rows written by `COPY`; an event stored
/// before makes that `COPY` fail and the insert write them instead. Neither may count a row
/// twice or lose one: an id sent again at another time is a new row (the key is the id and
/// the time) and is what the rollups count, not the row stored before; a value PostgreSQL
/// refuses is dead-lettered; the neighbour in the same batch, whose `COPY` succeeds, stores
/// text of COPY's own separators and escapes as sent and is projected exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copied_batches_count_every_key_once_and_refuse_what_postgresql_cannot_store() {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let a = create_tenant(&pool, "copier").await;
    let b = create_tenant(&pool, "copier-neighbour").await;
    let minute = chrono::TimeDelta::minutes(1);
    let t1 = chrono::DurationRound::duration_trunc(
        chrono::Utc::now() - chrono::TimeDelta::minutes(30),
        minute,
    )
    .unwrap()
        + chrono::TimeDelta::seconds(10);
    let t2 = t1 + minute * 2;
    let x = Uuid::now_v7();
    // A command with the id and time given (a sender may choose its ids).
    let twin = |at, ms| {
        let mut c = command("u", "twin", ms, true);
        c["id"] = json!(x);
        c["occurred_at"] = json!(ts(at));
        envelope(a.id, c)
    };
    let first = twin(t1, 5);

    let projector = start_projector(&common).await;
    produce(&producer, &topic, 0, std::slice::from_ref(&first)).await;
    wait_projected(&pool, a.id, 1, Duration::from_secs(60)).await;
    stop_all([projector]).await;

    // Queued while the projector is away, so that it reads them into one batch: for each
    // tenant more than the 64 events from which a live batch copies.
    let special = "a\tb\nc\\d\re\\.\\N";
    let mut nul = envelope(a.id, command("u", "build", 5, true));
    nul["data"]["command_name"] = json!("a\u{0}b");
    let mut records = vec![first, twin(t2, 1000), nul.clone()];
    records.extend((0..80).map(|i| envelope(a.id, command("u", "fill", i, true))));
    records.push(envelope(b.id, command(special, special, 1, true)));
    records.extend((0..70).map(|i| envelope(b.id, command("v", "fill", i, true))));
    produce(&producer, &topic, 0, &records).await;
    let projector = start_projector(&common).await;
    wait_projected(&pool, a.id, 82, Duration::from_secs(60)).await;
    wait_projected(&pool, b.id, 71, Duration::from_secs(60)).await;

    assert_the_one_dead_letter(&common, &nul, "22021").await;
    // Give a double count time to show.
    wait_folded(&pool, a.id, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(projected_events(&pool, a.id).await, Some(82));
    assert_eq!(projected_events(&pool, b.id).await, Some(71));
    let count = |tenant, sql: &'static str| {
        let pool = pool.clone();
        async move { scalar_in_tenant(&pool, tenant, sql).await }
    };
    assert_eq!(
        count(a.id, "SELECT count(*) FROM command_executions").await,
        82
    );
    assert_eq!(
        count(b.id, "SELECT count(*) FROM command_executions").await,
        71
    );
    // Each tenant's queued events were written in one transaction (one feed position), so
    // with 64 or more of them, by `COPY`: the first tenant's refused and inserted instead.
    let batches = "SELECT count(DISTINCT feed_seq) FROM command_executions";
    assert_eq!(
        count(a.id, batches).await,
        2,
        "the first event, then the queue"
    );
    assert_eq!(count(b.id, batches).await, 1);
    // The id at two times: two rows, each counted once, in its own minute.
    assert_eq!(
        count(
            a.id,
            "SELECT count(*) FROM command_executions WHERE name = 'twin'"
        )
        .await,
        2
    );
    let in_minute = |at: chrono::DateTime<chrono::Utc>, what: &str| {
        format!(
            "SELECT sum({what})::bigint FROM activity_1m WHERE name = 'twin' AND bucket = '{}'",
            ts(chrono::DurationRound::duration_trunc(at, minute).unwrap())
        )
    };
    assert_eq!(
        scalar_in_tenant(&pool, a.id, &in_minute(t1, "count")).await,
        1
    );
    assert_eq!(
        scalar_in_tenant(&pool, a.id, &in_minute(t2, "count")).await,
        1
    );
    assert_eq!(
        scalar_in_tenant(&pool, a.id, &in_minute(t2, "duration_sum")).await,
        1000
    );
    for table in ["activity_1m", "activity_1h", "activity_1d"] {
        let sql = format!("SELECT sum(count)::bigint FROM {table}");
        assert_eq!(scalar_in_tenant(&pool, a.id, &sql).await, 82, "{table}");
        assert_eq!(scalar_in_tenant(&pool, b.id, &sql).await, 71, "{table}");
    }
    // Tab, newline, backslashes, carriage return, `\.` and `\N`, stored as sent.
    let sql = "SELECT count(*) FROM command_executions
                WHERE name = 'a' || chr(9) || 'b' || chr(10) || 'c\\d' || chr(13) || 'e\\.\\N'
                  AND user_id = name";
    assert_eq!(count(b.id, sql).await, 1);
    stop_all([projector]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_keeps_failing_is_visible_until_it_lands() {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "stalled").await;
    let mut config = projector_config(&common);
    config.stall_unready_secs = 2;
    let app = projector::App::build(config).await.unwrap();
    let addr = app.local_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = stop_rx.await;
    }));
    let client = http();

    produce(
        &producer,
        &topic,
        2,
        &[envelope(t.id, command("u", "a", 1, true))],
    )
    .await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;

    // From now on this test's offsets may not move past 1: every batch fails on the
    // compare-and-set, which is not any record's fault.
    let constraint = format!("stall_{}", Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE control.projector_offsets ADD CONSTRAINT {constraint}
             CHECK (topic <> '{topic}' OR next_offset <= 1) NOT VALID"
    )))
    .execute(&pool)
    .await
    .unwrap();
    produce(
        &producer,
        &topic,
        2,
        &[envelope(t.id, command("u", "b", 1, true))],
    )
    .await;

    // /readyz turns 503 and names the partition and the error.
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let res = client
            .get(format!("http://{addr}/readyz"))
            .send()
            .await
            .unwrap();
        if res.status() == 503 {
            break res.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never reported the stall"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        body.contains("partitions [2]") && body.contains(&constraint),
        "{body}"
    );
    let metrics = scrape_metrics(&client, &format!("http://{addr}")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("projector_stalled_partitions") && l.ends_with(" 1")),
        "{metrics}"
    );
    // `projector status` (the operator's command) shows it too.
    let out = projector_command(&common, &["status"]).output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!("STALLED {topic} partition 2")),
        "{status}"
    );
    // No record was blamed: nothing in the DLQ, nothing lost.
    assert_eq!(projected_events(&pool, t.id).await, Some(1));

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE control.projector_offsets DROP CONSTRAINT {constraint}"
    )))
    .execute(&pool)
    .await
    .unwrap();
    wait_projected(&pool, t.id, 2, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "/readyz stayed 503 after the batch landed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = projector_command(&common, &["status"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("STALLED"));
    assert!(read_all(&common, common.metrics_dlq_topic(), 1)
        .await
        .is_empty());
    let _ = stop_tx.send(());
    task.await.unwrap().unwrap();
}

/// A partition never projected, whose consumer group already committed an offset in Kafka
/// (a reset projection, a restored database): the records before that offset are
/// projected too. (Before, the first record read was taken as the start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_partition_starts_at_its_beginning_whatever_kafka_committed() {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "fresh").await;
    let records: Vec<Value> = (0..10)
        .map(|i| envelope(t.id, command("u", "c", i, true)))
        .collect();
    produce(&producer, &topic, 3, &records).await;

    // The projector's group has committed offset 6 in Kafka, and the database knows nothing.
    let group: BaseConsumer = shared::kafka::client_config(&common)
        .set("group.id", projector_config(&common).consumer_group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 3, Offset::Offset(6))
        .unwrap();
    group.commit(&tpl, CommitMode::Sync).unwrap();
    drop(group);

    let projector = start_projector(&common).await;
    wait_projected(&pool, t.id, 10, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        10
    );
    projector.stop().await.unwrap();
}

/// Retention deleted records the projection had not reached: the projector goes on from
/// the log's first record (and counts what was lost) instead of seeking back forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_expired_before_projection_do_not_stop_the_partition() {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "expired").await;
    let batch = |n: i64| -> Vec<Value> {
        (0..n)
            .map(|i| envelope(t.id, command("u", "c", i, true)))
            .collect()
    };
    produce(&producer, &topic, 1, &batch(4)).await;
    let projector = start_projector(&common).await;
    wait_projected(&pool, t.id, 4, Duration::from_secs(60)).await;
    projector.stop().await.unwrap();

    // Six more while the projector is away; retention then deletes offsets 4..=7.
    produce(&producer, &topic, 1, &batch(6)).await;
    let admin: AdminClient<DefaultClientContext> =
        shared::kafka::client_config(&common).create().unwrap();
    let mut before = TopicPartitionList::new();
    before
        .add_partition_offset(&topic, 1, Offset::Offset(8))
        .unwrap();
    admin
        .delete_records(&before, &AdminOptions::new())
        .await
        .expect("delete records");

    let projector = start_projector(&common).await;
    wait_projected(&pool, t.id, 6, Duration::from_secs(30)).await;
    let stored: i64 = sqlx::query_scalar(
        "SELECT next_offset FROM control.projector_offsets WHERE topic = $1 AND partition = 1",
    )
    .bind(&topic)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stored, 10);
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM command_executions").await,
        6
    );
    // The four records lost are counted.
    let metrics = scrape_metrics(&http(), &projector.url()).await;
    let line = format!("projector_records_expired_total{{topic=\"{topic}\"}} 4");
    assert!(
        metrics.lines().any(|l| l == line),
        "{line} not in {metrics}"
    );
    projector.stop().await.unwrap();
}

/// A replay does not drop what it cannot project: a record of the replayed tenant that
/// today's rules refuse goes to the DLQ and is counted in the replay's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_dead_letters_and_counts_what_it_cannot_project() {
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "replayed").await;
    let mut unknown_version = envelope(t.id, command("u", "c", 1, true));
    unknown_version["schema_version"] = json!(99);
    let mut records: Vec<Value> = (0..5)
        .map(|i| envelope(t.id, command("u", "c", i, true)))
        .collect();
    records.insert(2, unknown_version.clone());
    produce(&producer, &topic, 0, &records).await;
    let projector = start_projector(&common).await;
    wait_projected(&pool, t.id, 5, Duration::from_secs(60)).await;
    assert_eq!(
        read_all(&common, common.metrics_dlq_topic(), 1).await.len(),
        1
    );

    let (report, _) = run_replay(&common, t.id, 0).await;
    assert_eq!(report["dead_lettered"], 1, "{report}");
    assert_eq!(report["projected"], 5, "{report}");
    let dead = read_all(&common, common.metrics_dlq_topic(), 3).await;
    assert_eq!(dead.len(), 2, "the live projector's and the replay's");
    for (payload, h) in &dead {
        assert_eq!(payload["id"], unknown_version["id"]);
        assert!(header(h, "tally-error").contains("schema_version"), "{h:?}");
    }
    projector.stop().await.unwrap();
}

/// A value near float8's limit is refused at the doors (`data.value` beyond ±1e200, named in a
/// 422, or a rejected OTLP point), since dashboards sum values over any range: two such values
/// on two days of a week made every read of that week fail. Such values still in the log from
/// before are projected (no one day's sum overflows), and a read whose sum over them
/// overflows is a 422 `out-of-range` naming `range`, not a 503 (before: 503, "the projection
/// database is unavailable", logged as an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_no_sum_can_hold_are_refused_and_old_ones_fail_no_read_with_5xx() {
    use chrono::{Datelike, Duration as Days, Utc};
    let Setup {
        pool,
        common,
        producer,
        topic,
    } = setup().await;
    let t = create_tenant(&pool, "sums").await;
    create_member(&pool, &t, "u", shared::jwt::Role::Developer, &[]).await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let developer = member_token(&client, &ingest.url(), &t, "u").await;
    let projector = start_projector(&common).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;

    // The doors: JSON events, then an OTLP point.
    let events = json!([
        {"type": "metric.sample", "occurred_at": ago(60), "data": {"name": "n", "value": 1e300}},
        {"type": "productivity.recorded", "occurred_at": ago(60), "data": {"metric_type": "error_rate", "value": -1e201}},
        {"type": "metric.sample", "occurred_at": ago(60), "data": {"name": "n", "value": -1e200}}
    ]);
    let post = |path: &str, body: &Value| {
        let req = client
            .post(format!("{}{path}", ingest.url()))
            .header("x-api-key", &t.ingest_key)
            .json(body);
        async move { req.send().await.unwrap() }
    };
    let res = post("/v1/events", &events).await;
    assert_eq!(res.status(), 422);
    let problem: Value = res.json().await.unwrap();
    let named: Vec<(i64, &str)> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].as_i64().unwrap(), e["field"].as_str().unwrap()))
        .collect();
    assert_eq!(named, [(0, "data.value"), (1, "data.value")], "{problem}");
    let at = Utc::now().timestamp_nanos_opt().unwrap().to_string();
    let otlp = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "n",
        "gauge": {"dataPoints": [{"timeUnixNano": at, "asDouble": 1e300}]}}]}]}]});
    let res = post("/v1/otlp/v1/metrics", &otlp).await;
    assert_eq!(res.status(), 400);
    let problem = res.text().await.unwrap();
    assert!(problem.contains("data.value"), "{problem}");

    // From the log: 1.7e308 on the Monday and the Tuesday of a week 8 to 14 days ago.
    let past = Utc::now() - Days::days(8);
    let monday = (past - Days::days(i64::from(past.weekday().num_days_from_monday())))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let old = |hours: i64| {
        let mut e = huge(t.id, "huge", 1.7e308);
        e["occurred_at"] = json!((monday + Days::hours(hours)).to_rfc3339());
        e
    };
    produce(&producer, &topic, 0, &[old(12), old(36)]).await;
    wait_projected(&pool, t.id, 2, Duration::from_secs(60)).await;

    let (from, to) = (monday.to_rfc3339(), (monday + Days::days(7)).to_rfc3339());
    let range = format!("from={from}&to={to}").replace('+', "%2B");
    for (path, credential) in [
        (
            format!("/v1/dashboard/metrics?name=huge&step=1w&{range}"),
            t.read_key.as_str(),
        ),
        (
            format!("/v1/dashboard/overview?{range}"),
            developer.as_str(),
        ),
    ] {
        let mut req = client.get(format!("{}{path}", query.url()));
        req = if credential.starts_with("ey") {
            req.bearer_auth(credential)
        } else {
            req.header("x-api-key", credential)
        };
        let res = req.send().await.unwrap();
        let status = res.status();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 422, "{path}: {body}");
        assert!(
            body["type"].as_str().unwrap().ends_with("out-of-range"),
            "{body}"
        );
        assert_eq!(body["errors"][0]["field"], "range", "{body}");
    }
    // A day alone still reads.
    let day = format!(
        "from={}&to={}",
        monday.to_rfc3339(),
        (monday + Days::days(1)).to_rfc3339()
    )
    .replace('+', "%2B");
    let url = format!(
        "{}/v1/dashboard/metrics?name=huge&step=1d&{day}",
        query.url()
    );
    let one = get_json(&client, &url, &t.read_key).await;
    assert_eq!(
        one["series"][0]["points"].as_array().unwrap().len(),
        1,
        "{one}"
    );
    stop_all([ingest, projector, query]).await;
}
