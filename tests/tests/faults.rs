//! The fault matrix, on a stack of its own (private PostgreSQL, Redis and Kafka it may crash):
//! one million events stream in through ingest-api while, each several times, the projector
//! is SIGKILLed, the Kafka broker and PostgreSQL are restarted, a second projector instance
//! joins and leaves, and Redis goes away. Afterwards every tenant's raw rows and rollups
//! equal what a straight computation over the sent events gives. Then the whole log is
//! replayed into new projection versions while a client polls the dashboards: no request
//! fails, no count goes backwards, and the old versions are gone.
//!
//! Its own test binary, so that it runs alone (cargo runs test binaries one after another).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::config::Common;
use sqlx::PgPool;
use tally_tests::events::{Expected, Generator};
use tally_tests::*;

const TOTAL: usize = 1_000_000;
const BATCH: usize = 1_000;
/// Events per second the senders aim at, so that the stream outlasts the fault schedule.
const PACE: f64 = 6_000.0;
const SENDERS: usize = 4;

/// The fault-injection stack: private servers plus the services under test.
struct Stack {
    pg: PrivatePostgres,
    redis: PrivateRedis,
    kafka: PrivateKafka,
    common: Common,
    pool: PgPool,
}

async fn stack() -> Stack {
    let pg = PrivatePostgres::start();
    let redis = PrivateRedis::start();
    let mut kafka = PrivateKafka::new();
    kafka.start().await;
    let common = Common {
        database_url: pg.url(),
        redis_url: redis.url(),
        kafka_brokers: kafka.brokers(),
        ..common_for_test()
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg.url())
        .await
        .expect("private postgres");
    shared::db::migrate(&pool).await.expect("migrations");
    Stack {
        pg,
        redis,
        kafka,
        common,
        pool,
    }
}

/// Sends `events` events for `tenant` in batches, at its share of [`PACE`], retrying each
/// batch (same ids) until ingest-api acknowledges it. Returns what was sent.
fn sender(
    ingest: String,
    key: String,
    seed: u64,
    events: usize,
    done: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Expected> {
    tokio::spawn(async move {
        let client = http();
        let mut generator =
            Generator::new(seed, &format!("f{seed}-"), 25, chrono::Duration::hours(20));
        let start = Instant::now();
        let share = PACE / SENDERS as f64;
        let mut sent = 0usize;
        while sent < events {
            let body = serde_json::to_vec(&Value::Array(generator.batch(BATCH))).unwrap();
            loop {
                let res = client
                    .post(format!("{ingest}/v1/events"))
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 202 => break,
                    // 503 while Kafka or PostgreSQL is down: retry the same batch.
                    Ok(r) if r.status().is_server_error() || r.status() == 429 => {}
                    Ok(r) => panic!(
                        "unexpected {}: {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    ),
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            sent += BATCH;
            done.fetch_add(BATCH as u64, Ordering::Relaxed);
            let due = Duration::from_secs_f64(sent as f64 / share);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        generator.expected
    })
}

fn kill(child: &mut Proc) {
    let _ = child.kill();
    let _ = child.wait();
}

fn terminate(child: &mut Proc) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_million_events_through_every_fault_then_a_replay_under_load() {
    init_logs();
    let mut s = stack().await;
    let ingest = start_ingest(&s.common, |_| {}).await;
    let t1 = create_tenant(&s.pool, "faults-1").await;
    let t2 = create_tenant(&s.pool, "faults-2").await;
    for t in [&t1, &t2] {
        ingest_api::control::store::set_plan(&s.pool, t.id, "enterprise", Some(1_000_000))
            .await
            .unwrap();
    }

    // ---- 1. a million events through every fault ----
    let done = Arc::new(AtomicU64::new(0));
    let share = TOTAL / SENDERS;
    let senders: Vec<_> = (0..SENDERS)
        .map(|i| {
            // Senders 0..3 → tenant 1 (750 000), sender 3 → tenant 2 (250 000).
            let key = if i < 3 {
                t1.ingest_key.clone()
            } else {
                t2.ingest_key.clone()
            };
            sender(ingest.url(), key, 100 + i as u64, share, done.clone())
        })
        .collect();

    let mut a = spawn_projector_process(&s.common);
    let mut b: Option<Proc> = None;
    const FAULTS: [&str; 6] = [
        "kill projector",
        "second projector joins",
        "restart kafka",
        "restart postgres",
        "redis down",
        "second projector leaves",
    ];
    // How often each fault began while events were still streaming in.
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..3 {
        for fault in FAULTS {
            tokio::time::sleep(Duration::from_secs(5)).await;
            eprintln!(
                "[{:>5.1}s] {fault} (round {}, {} events acknowledged)",
                started.elapsed().as_secs_f64(),
                round + 1,
                done.load(Ordering::Relaxed)
            );
            if !senders.iter().all(|h| h.is_finished()) {
                *counts.entry(fault).or_default() += 1;
            }
            match fault {
                "kill projector" => {
                    kill(&mut a);
                    a = spawn_projector_process(&s.common);
                }
                "second projector joins" => b = Some(spawn_projector_process(&s.common)),
                "second projector leaves" => {
                    let mut child = b.take().expect("second projector running");
                    // Gracefully, then SIGKILLed mid-batch, then gracefully again.
                    if round % 2 == 0 {
                        terminate(&mut child)
                    } else {
                        kill(&mut child)
                    }
                }
                "restart kafka" => {
                    s.kafka.kill();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    s.kafka.start().await;
                }
                "restart postgres" => {
                    let pg = &s.pg;
                    tokio::task::block_in_place(|| pg.crash_and_restart(Duration::from_secs(3)));
                }
                "redis down" => {
                    s.redis.kill();
                    tokio::time::sleep(Duration::from_secs(4)).await;
                    s.redis.up();
                }
                _ => unreachable!(),
            }
        }
    }
    eprintln!(
        "[{:>5.1}s] fault schedule done; faults begun while events streamed in: {counts:?}",
        started.elapsed().as_secs_f64()
    );
    // Every kind of fault hit the pipeline under load at least twice (the first two rounds
    // take about 100 s of the senders' 167).
    assert!(
        FAULTS
            .iter()
            .all(|f| counts.get(f).is_some_and(|n| *n >= 2)),
        "{counts:?}"
    );
    let mut exp1 = Expected::default();
    let mut exp2 = Expected::default();
    for (i, h) in senders.into_iter().enumerate() {
        let e = h.await.unwrap();
        if i < 3 { &mut exp1 } else { &mut exp2 }.merge(&e);
    }
    eprintln!(
        "[{:>5.1}s] all {TOTAL} events acknowledged",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(exp1.total + exp2.total, TOTAL as i64);

    wait_projected(&s.pool, t1.id, exp1.total, Duration::from_secs(900)).await;
    wait_projected(&s.pool, t2.id, exp2.total, Duration::from_secs(300)).await;
    eprintln!("[{:>5.1}s] all projected", started.elapsed().as_secs_f64());
    // Anything doubled would show up after the lag is gone.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(projected_events(&s.pool, t1.id).await, Some(exp1.total));
    assert_eq!(projected_events(&s.pool, t2.id).await, Some(exp2.total));
    assert_projection_exact(&s.pool, t1.id, &exp1).await;
    assert_projection_exact(&s.pool, t2.id, &exp2).await;

    // ---- 2. replay everything while dashboards are polled and events keep coming ----
    let query = start_query(&s.common, |_| {}).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let polls = Arc::new(AtomicU64::new(0));
    let mut pollers = Vec::new();
    for (t, path) in [
        (&t1, "overview?range=24h"),
        (&t1, "timeseries?range=24h&bucket=1h"),
        (&t2, "overview?range=24h"),
    ] {
        pollers.push(spawn_poller(
            format!("{}/v1/dashboard/{path}", query.url()),
            t.read_key.clone(),
            Duration::from_millis(50),
            stop.clone(),
            failures.clone(),
            polls.clone(),
        ));
    }
    let trickle = {
        let (stop, url, key) = (stop.clone(), ingest.url(), t1.ingest_key.clone());
        tokio::spawn(async move {
            let client = http();
            let mut generator = Generator::new(999, "live-", 5, chrono::Duration::hours(1));
            while !stop.load(Ordering::Relaxed) {
                let res =
                    post_events(&client, &url, &key, &Value::Array(generator.batch(50))).await;
                assert_eq!(res.status(), 202);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            generator.expected
        })
    };
    let replay_started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let common = s.common.clone();
        move || {
            projector_command(&common, &["replay", "--json"])
                .env("TALLY_REPLAY_DROP_GRACE_SECS", "5")
                .stderr(std::process::Stdio::piped())
                .output()
                .expect("run projector replay")
        }
    })
    .await
    .unwrap();
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {progress}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("replay report");
    let last_lines: Vec<&str> = progress.lines().rev().take(3).collect();
    eprintln!("replay progress (last lines): {last_lines:?}");
    eprintln!(
        "FIGURES replay: {} records in {:.1} s = {:.0} records/s; switch held live writes {:.0} ms; wall {:.1} s",
        report["records"], report["seconds"].as_f64().unwrap(), report["records_per_sec"].as_f64().unwrap(),
        report["switch_ms"].as_f64().unwrap(), replay_started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let live = trickle.await.unwrap();
    exp1.merge(&live);
    for p in pollers {
        let (url, backwards) = p.await.unwrap();
        assert!(backwards.is_empty(), "{url} went backwards: {backwards:?}");
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "failed dashboard requests"
    );
    assert!(polls.load(Ordering::Relaxed) > 100);

    wait_projected(&s.pool, t1.id, exp1.total, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (t, exp) in [(&t1, &exp1), (&t2, &exp2)] {
        assert_eq!(active_version(&s.pool, t.id).await, 2);
        let old_left: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                .bind(t.id.schema(1).as_str())
                .fetch_one(&s.pool)
                .await
                .unwrap();
        assert!(!old_left, "version 1 of {} is dropped", t.id);
        assert_eq!(projected_events(&s.pool, t.id).await, Some(exp.total));
        assert_projection_exact(&s.pool, t.id, exp).await;
    }

    kill(&mut a);
    query.stop().await.unwrap();
    ingest.stop().await.unwrap();
}
