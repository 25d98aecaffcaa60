//! The overload benchmark: what ingest-api does when offered more than the machine sustains.
//!
//! 1. Calibration: a closed loop (a fixed number of requests in flight) measures the rate
//!    the machine sustains, in accepted events per second.
//! 2. Overload: an open loop offers `--factor` (2) times that rate for `--seconds`, whatever
//!    the answers. Every refused request (429/503) is retried after its `Retry-After`, with
//!    the same body and so the same event ids, as a well-behaved sender does, until it is
//!    accepted.
//! 3. It samples ingest-api's resident memory all along, then waits until the dashboards
//!    count every accepted event and checks that they count each exactly once.
//!
//! It makes its own tenant (with a rate limit far above the machine's, so that the machine
//! and not the plan is the limit) in the database `make up` runs:
//!
//! ```text
//! make up && make overload
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::Value;
use shared::apikey::Scope;
use tally_tests::events::Generator;

#[derive(Parser, Debug)]
#[command(about = "Tally overload benchmark")]
struct Args {
    #[command(flatten)]
    services: tally_tests::ServiceUrls,
    #[arg(long, env = "TALLY_DATABASE_URL")]
    database_url: String,
    /// ingest-api's pid file (its memory is sampled).
    #[arg(long, default_value = ".tally/run/ingest-api.pid")]
    pid_file: String,
    /// Events per request.
    #[arg(long, default_value_t = 200)]
    batch: usize,
    /// Requests in flight during calibration.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value_t = 15)]
    calibrate_seconds: u64,
    /// How long the overload is offered.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Offered rate as a multiple of the calibrated one.
    #[arg(long, default_value_t = 2.0)]
    factor: f64,
    /// Most requests the benchmark keeps open at once (its own memory).
    #[arg(long, default_value_t = 4096)]
    max_open: usize,
}

/// Counts of what the server answered.
#[derive(Default)]
struct Tally {
    accepted_events: AtomicU64,
    first_accepted: AtomicU64,
    first_refused: AtomicU64,
    attempts: AtomicU64,
    by_status: Mutex<HashMap<u16, u64>>,
    missing_retry_after: AtomicU64,
    /// Requests that got no answer, by kind, with one example each.
    failures: Mutex<HashMap<&'static str, (u64, String)>>,
    latency: Mutex<Option<Histogram<u64>>>,
}

impl Tally {
    fn status(&self, s: u16) {
        *self.by_status.lock().expect("tally").entry(s).or_default() += 1;
    }
}

/// Sends one body until it is accepted (or `give_up` passes); returns whether it was.
async fn send(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: Vec<u8>,
    events: u64,
    tally: &Tally,
    give_up: Instant,
) -> bool {
    let mut first = true;
    loop {
        tally.attempts.fetch_add(1, Ordering::Relaxed);
        let t = Instant::now();
        let res = client
            .post(url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        let wait = match res {
            Ok(r) if r.status().is_success() => {
                tally.status(r.status().as_u16());
                tally.accepted_events.fetch_add(events, Ordering::Relaxed);
                if first {
                    tally.first_accepted.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(h) = tally.latency.lock().expect("latency").as_mut() {
                    let _ = h.record(t.elapsed().as_micros().max(1) as u64);
                }
                return true;
            }
            Ok(r) => {
                tally.status(r.status().as_u16());
                if first {
                    tally.first_refused.fetch_add(1, Ordering::Relaxed);
                }
                let after = r
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if after.is_none() {
                    tally.missing_retry_after.fetch_add(1, Ordering::Relaxed);
                }
                Duration::from_secs(after.unwrap_or(1))
            }
            Err(e) => {
                let kind = if e.is_timeout() {
                    "timeout"
                } else if e.is_connect() {
                    "connect"
                } else {
                    "other"
                };
                let mut failures = tally.failures.lock().expect("failures");
                let entry = failures.entry(kind).or_insert((0, format!("{e:?}")));
                entry.0 += 1;
                Duration::from_secs(1)
            }
        };
        first = false;
        if Instant::now() + wait > give_up {
            return false;
        }
        // Jitter, so the refused do not all come back in the same millisecond.
        let jitter = Duration::from_millis(rand::random::<u64>() % 500);
        tokio::time::sleep(wait + jitter).await;
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    tally_tests::memory_kib(pid).map(|(rss, _)| rss)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pid: u32 = std::fs::read_to_string(&args.pid_file)
        .map_err(|e| anyhow::anyhow!("{}: {e} (run `make up` first)", args.pid_file))?
        .trim()
        .parse()?;
    let pool = sqlx::PgPool::connect(&args.database_url).await?;
    let tenant = ingest_api::control::store::create_tenant(&pool, "", "overload").await?;
    ingest_api::control::store::set_plan(&pool, tenant, "enterprise", Some(i32::MAX)).await?;
    let (_, key) =
        ingest_api::control::store::create_api_key(&pool, "", tenant, Scope::Ingest, "overload")
            .await?;
    let (_, read_key) =
        ingest_api::control::store::create_api_key(&pool, "", tenant, Scope::Read, "overload")
            .await?;
    let url = format!("{}/v1/events", args.services.url);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(args.max_open)
        .build()?;
    let generator = Arc::new(Mutex::new(Generator::new(
        7,
        "overload",
        200,
        chrono::Duration::hours(2),
    )));
    let body = {
        let generator = generator.clone();
        let batch = args.batch;
        move || -> Vec<u8> {
            let events = generator.lock().expect("generator").batch(batch);
            serde_json::to_vec(&Value::Array(events)).expect("JSON")
        }
    };
    let rss_idle = rss_kib(pid).unwrap_or(0);
    println!(
        "tally-overload: tenant {tenant}, ingest-api pid {pid} at {} MiB",
        rss_idle / 1024
    );

    // 1. Calibration.
    let calibration = Arc::new(Tally::default());
    let until = Instant::now() + Duration::from_secs(args.calibrate_seconds);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, url, key, tally, body) = (
            client.clone(),
            url.clone(),
            key.clone(),
            calibration.clone(),
            body.clone(),
        );
        let events = args.batch as u64;
        workers.push(tokio::spawn(async move {
            while Instant::now() < until {
                let b = tokio::task::spawn_blocking(body.clone())
                    .await
                    .expect("body");
                send(
                    &client,
                    &url,
                    &key,
                    b,
                    events,
                    &tally,
                    until + Duration::from_secs(60),
                )
                .await;
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let sustained = calibration.accepted_events.load(Ordering::Relaxed) as f64
        / started.elapsed().as_secs_f64();
    let offered = sustained * args.factor;
    println!(
        "calibration: {sustained:.0} events/s sustained at {} requests in flight",
        args.concurrency
    );

    // 2. Overload: an open loop at `offered` events/s.
    let tally = Arc::new(Tally {
        latency: Mutex::new(Some(Histogram::new(3)?)),
        ..Default::default()
    });
    let rss_max = Arc::new(AtomicU64::new(0));
    let sampling = {
        let rss_max = rss_max.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = rss_kib(pid) {
                    rss_max.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let open = Arc::new(tokio::sync::Semaphore::new(args.max_open));
    let requests_per_sec = offered / args.batch as f64;
    let stop_offering = Instant::now() + Duration::from_secs(args.seconds);
    let give_up = stop_offering + Duration::from_secs(120);
    let started = Instant::now();
    let mut offered_requests = 0u64;
    let mut client_backlogged = 0u64;
    let mut tasks = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while Instant::now() < stop_offering {
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * requests_per_sec) as u64;
        while offered_requests < due {
            offered_requests += 1;
            let permit = match open.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    client_backlogged += 1;
                    open.clone().acquire_owned().await?
                }
            };
            let (client, url, key, tally) =
                (client.clone(), url.clone(), key.clone(), tally.clone());
            let b = body();
            let events = args.batch as u64;
            tasks.push(tokio::spawn(async move {
                let ok = send(&client, &url, &key, b, events, &tally, give_up).await;
                drop(permit);
                ok
            }));
        }
    }
    let offered_for = started.elapsed().as_secs_f64();
    let mut lost_requests = 0;
    for t in tasks {
        if !t.await? {
            lost_requests += 1;
        }
    }
    let drained_after = started.elapsed().as_secs_f64();
    sampling.abort();

    let accepted = calibration.accepted_events.load(Ordering::Relaxed)
        + tally.accepted_events.load(Ordering::Relaxed);
    let statuses = tally.by_status.lock().expect("tally").clone();
    let mut statuses: Vec<(u16, u64)> = statuses.into_iter().collect();
    statuses.sort();
    let h = tally
        .latency
        .lock()
        .expect("latency")
        .clone()
        .expect("histogram");
    println!("---");
    println!(
        "offered {offered:.0} events/s ({:.1} × sustained) for {offered_for:.0} s: {offered_requests} requests of {}",
        args.factor, args.batch
    );
    println!(
        "first attempts: {} accepted, {} refused; {} attempts in all; answers by status {statuses:?}; refusals without Retry-After: {}",
        tally.first_accepted.load(Ordering::Relaxed),
        tally.first_refused.load(Ordering::Relaxed),
        tally.attempts.load(Ordering::Relaxed),
        tally.missing_retry_after.load(Ordering::Relaxed)
    );
    println!(
        "accepted requests' latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; every request accepted after {drained_after:.0} s ({lost_requests} given up, the benchmark waited for a free slot {client_backlogged} times)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
    for (kind, (n, example)) in tally.failures.lock().expect("failures").iter() {
        println!("requests without an answer ({kind}): {n}, e.g. {example}");
    }
    println!(
        "ingest-api resident memory: {} MiB idle, {} MiB at most under overload",
        rss_idle / 1024,
        rss_max.load(Ordering::Relaxed) / 1024
    );

    // 3. Exactly once: the dashboards count every accepted event, once.
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline
        && tally_tests::dashboard_total(&client, &args.services.query_url, &read_key).await?
            < accepted as i64
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let counted =
        tally_tests::dashboard_total(&client, &args.services.query_url, &read_key).await?;
    println!(
        "projected: {counted} events counted for {accepted} accepted — {}",
        if counted == accepted as i64 {
            "each exactly once"
        } else {
            "MISMATCH"
        }
    );
    anyhow::ensure!(
        counted == accepted as i64,
        "projected count differs from accepted"
    );
    Ok(())
}
