//! The load generator: POSTs batches of realistic events to ingest-api at a given
//! concurrency and reports events/s, request latency p50/p99 and errors, with progress while
//! it runs. With `--baseline` it first measures the raw limit of the same machine — the same
//! envelopes produced straight to Kafka with rdkafka (acks=all, idempotent) — and reports
//! ingest throughput as a ratio of it; with the database too, the projection's raw limit:
//! `COPY` of the same events' raw rows into a scratch tenant's raw tables
//! ([`same_tables_copy_baseline`]). `--format otlp` sends the same number of points as
//! OTLP/HTTP protobuf metrics (Claude Code's token counter) instead of JSON events.
//! `--shape live` dates every event in the minute before the run, as real senders do; the
//! default, `backfill`, spreads them over the two hours before it. The figures go to
//! `TALLY_BENCH_REPORT` too ([`tally_tests::report`]).
//!
//! `--pause-projector PIDFILE` stops the projector (`SIGSTOP`) while the events are sent and
//! lets it go on (`SIGCONT`) once they all are: ingest-api then has the machine as the
//! rdkafka baseline had it, and the projection drains the queued events alone, as the COPY
//! baseline ran alone. Both figures are reported under names of their own.
//!
//! ```text
//! . .tally/demo.env && cargo run --release -p tally-tests --bin tally-load -- --events 200000 --baseline
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Parser;
use hdrhistogram::Histogram;
use ingest_api::formats::otlp::{self, pb};
use ingest_api::ingest::{ClientEvent, Ids, IngestContext, TimeBounds};
use prost::Message;
use serde_json::Value;
use shared::events::{Actor, Source};
use shared::tenant::TenantId;
use tally_tests::events::{token_points, Generator};
use tally_tests::report::{self, Figure};

#[derive(Parser, Debug)]
#[command(about = "Tally load generator")]
struct Args {
    #[command(flatten)]
    services: tally_tests::ServiceUrls,
    /// An API key with the `ingest` scope.
    #[arg(long, env = "TALLY_INGEST_KEY")]
    key: String,
    /// Events to send in all.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Events per request.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Stop after this many seconds even if not all events were sent.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Also measure raw rdkafka produce throughput on this machine for a ratio.
    #[arg(long)]
    baseline: bool,
    /// Kafka brokers for the baseline.
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:59092")]
    brokers: String,
    /// With a read key: wait until the dashboards count every accepted event, and report the
    /// end-to-end rate (HTTP → Kafka → projector → PostgreSQL → query-api).
    #[arg(long, env = "TALLY_READ_KEY")]
    read_key: Option<String>,
    /// PostgreSQL for the raw-COPY baseline (the projector's ceiling), with `--baseline`.
    #[arg(long, env = "TALLY_DATABASE_URL")]
    database_url: Option<String>,
    /// `events` (JSON to /v1/events) or `otlp` (protobuf metrics to /v1/otlp/v1/metrics).
    #[arg(long, value_enum, default_value_t = Format::Events)]
    format: Format,
    /// `backfill` (timestamps over the last two hours) or `live` (the last minute).
    #[arg(long, value_enum, default_value_t = Shape::Backfill)]
    shape: Shape,
    /// The projector's pid file: stop the projector while the events are sent, then time
    /// its drain of them alone (see the module's doc).
    #[arg(long)]
    pause_projector: Option<std::path::PathBuf>,
}

/// A stopped process, sent `SIGCONT` when dropped: whatever ends the run (an error, a
/// panic), the projector is not left stopped.
struct Paused(u32);

impl Paused {
    fn stop(pid_file: &std::path::Path) -> anyhow::Result<Paused> {
        let pid = tally_tests::service_pid(pid_file, "projector")?;
        signal("-STOP", pid)?;
        Ok(Paused(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Err(e) = signal("-CONT", self.0) {
            eprintln!("could not let the projector (pid {}) go on: {e:#}", self.0);
        }
    }
}

fn signal(which: &str, pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .context("running kill")?;
    anyhow::ensure!(status.success(), "kill {which} {pid}: {status}");
    Ok(())
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Events,
    Otlp,
}

impl Format {
    /// What is sent, and its rate's unit, for the report.
    fn labels(self) -> (&'static str, &'static str) {
        match self {
            Format::Events => ("JSON events", "events/s"),
            Format::Otlp => ("OTLP points", "points/s"),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Backfill,
    Live,
}

impl Shape {
    /// How far back the events' timestamps reach.
    fn spread(self) -> chrono::Duration {
        match self {
            Shape::Backfill => chrono::Duration::hours(2),
            Shape::Live => chrono::Duration::minutes(1),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.concurrency > 0,
        "batch and concurrency must be positive"
    );
    let requests = args.events.div_ceil(args.batch);
    println!(
        "tally-load: {} events ({:?} shape) in {} requests of {} at concurrency {} → {}",
        args.events, args.shape, requests, args.batch, args.concurrency, args.services.url
    );
    // Bodies are generated up front so the generator does not compete with the sender. For
    // OTLP, the baseline produces the events the same points become.
    let mut generator = Generator::new(42, "load", 200, args.shape.spread());
    if args.shape == Shape::Live {
        generator = generator.live();
    }
    let mut bodies: Vec<Vec<u8>> = Vec::with_capacity(requests);
    let mut event_bodies: Vec<Vec<u8>> = Vec::with_capacity(requests);
    for i in 0..requests {
        let n = args.batch.min(args.events - i * args.batch);
        match args.format {
            Format::Events => {
                bodies.push(serde_json::to_vec(&Value::Array(generator.batch(n)))?);
            }
            Format::Otlp => {
                let now = Utc::now().timestamp_nanos_opt().expect("now fits") as u64;
                let req = token_points(n, i * args.batch, args.shape.spread(), now);
                let events = otlp::metric_events(&req).map_err(|e| anyhow::anyhow!("{e:?}"))?;
                let events = events.events.into_iter().map(ClientEvent::into_json);
                event_bodies.push(serde_json::to_vec(&Value::Array(events.collect()))?);
                bodies.push(req.encode_to_vec());
            }
        }
    }
    let (path, content_type, accepted_status) = match args.format {
        Format::Events => ("/v1/events", "application/json", 202),
        Format::Otlp => ("/v1/otlp/v1/metrics", "application/x-protobuf", 200),
    };

    let baseline = if args.baseline {
        let events = if event_bodies.is_empty() {
            &bodies
        } else {
            &event_bodies
        };
        Some(raw_kafka_baseline(&args, events).await?)
    } else {
        None
    };

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let copy_baseline = match (&args.database_url, args.baseline) {
        (Some(url), true) => {
            let events = if event_bodies.is_empty() {
                &bodies
            } else {
                &event_bodies
            };
            Some(CopyBaseline {
                same_tables: same_tables_copy_baseline(url, events, args.format).await?,
                one_table: one_table_copy_baseline(url, args.events).await?,
            })
        }
        _ => None,
    };
    let counted_before = match &args.read_key {
        Some(key) => {
            Some(tally_tests::dashboard_total(&client, &args.services.query_url, key).await?)
        }
        None => None,
    };
    let queue = Arc::new(Mutex::new(
        bodies.into_iter().enumerate().collect::<Vec<_>>(),
    ));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let paused = args
        .pause_projector
        .as_deref()
        .map(Paused::stop)
        .transpose()?;
    let started = Instant::now();

    let progress = {
        let sent = sent.clone();
        let errors = errors.clone();
        let total = args.events as u64;
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let now = sent.load(Ordering::Relaxed);
                println!(
                    "  {:>6.1}s  {now:>9}/{total} events  {:>9.0} ev/s now  errors {}",
                    started.elapsed().as_secs_f64(),
                    (now - last) as f64 / 2.0,
                    errors.load(Ordering::Relaxed)
                );
                last = now;
                if now >= total {
                    break;
                }
            }
        })
    };

    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, queue, sent, errors, latencies) = (
            client.clone(),
            queue.clone(),
            sent.clone(),
            errors.clone(),
            latencies.clone(),
        );
        let (url, key, batch, events) = (
            format!("{}{path}", args.services.url),
            args.key.clone(),
            args.batch,
            args.events,
        );
        workers.push(tokio::spawn(async move {
            loop {
                if Instant::now() > deadline {
                    break;
                }
                let Some((i, body)) = queue.lock().expect("queue").pop() else {
                    break;
                };
                let n = batch.min(events - i * batch) as u64;
                let t = Instant::now();
                let res = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", content_type)
                    .body(body)
                    .send()
                    .await;
                let micros = t.elapsed().as_micros() as u64;
                latencies
                    .lock()
                    .expect("histogram")
                    .record(micros.max(1))
                    .ok();
                match res {
                    Ok(r) if r.status() == accepted_status => {
                        let bytes = r.bytes().await.unwrap_or_default();
                        let accepted = match path {
                            "/v1/events" => serde_json::from_slice::<Value>(&bytes)
                                .ok()
                                .and_then(|v| v["accepted"].as_u64()),
                            // OTLP: everything but the points a partial success refused.
                            _ => pb::ExportMetricsServiceResponse::decode(&bytes[..])
                                .ok()
                                .map(|r| {
                                    let refused = r
                                        .partial_success
                                        .map_or(0, |p| p.rejected_data_points as u64);
                                    n - refused.min(n)
                                }),
                        };
                        sent.fetch_add(accepted.unwrap_or(n), Ordering::Relaxed);
                    }
                    Ok(r) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "  HTTP {}: {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        );
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("  request failed: {e}");
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let elapsed = started.elapsed();
    progress.abort();
    // The projection's time runs from here when it was paused.
    let alone = paused.is_some();
    drop(paused);
    let projecting_since = if alone { Instant::now() } else { started };
    let sent = sent.load(Ordering::Relaxed);
    let rate = sent as f64 / elapsed.as_secs_f64();
    let h = latencies.lock().expect("histogram").clone();
    println!("---");
    println!(
        "ingest: {sent} events accepted in {:.2}s = {rate:.0} events/s; {} errors",
        elapsed.as_secs_f64(),
        errors.load(Ordering::Relaxed)
    );
    println!(
        "request latency ({} events/request): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.batch,
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
    let (what, unit) = args.format.labels();
    let shape = match args.shape {
        Shape::Backfill => "backfill shape",
        Shape::Live => "live shape",
    };
    let (ingest_name, projection_name) = if alone {
        (
            format!("ingest alone (projector paused), {what}, {shape}"),
            format!("projection of the queued events alone, {what}, {shape}"),
        )
    } else {
        (
            format!("ingest, {what}, {shape}"),
            format!("projection end to end, {what}, {shape}"),
        )
    };
    let mut ingest = Figure::new(ingest_name, rate, unit).goal(match args.format {
        Format::Events => "≥ 0.5 ×",
        Format::Otlp => "≥ 0.35 ×",
    });
    if let Some(raw) = baseline {
        println!(
            "raw rdkafka produce (acks=all, idempotent) on this machine: {raw:.0} events/s; ingest = {:.2} × raw",
            rate / raw
        );
        ingest = ingest.raw("rdkafka producer, same envelopes, acks=all", raw);
    }
    report::record(&ingest)?;
    if let (Some(before), Some(key)) = (counted_before, &args.read_key) {
        let target = before + sent as i64;
        let wait_deadline = Instant::now() + Duration::from_secs(args.max_seconds);
        let mut counted = before;
        while counted < target && Instant::now() < wait_deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            counted = tally_tests::dashboard_total(&client, &args.services.query_url, key).await?;
        }
        let e2e = projecting_since.elapsed().as_secs_f64();
        let projected = (counted - before) as f64 / e2e;
        let since = if alone {
            "the projector went on"
        } else {
            "the first request"
        };
        println!(
            "end to end: {} of {sent} events counted by query-api {e2e:.2}s after {since} = {projected:.0} events/s projected",
            counted - before,
        );
        let mut end_to_end = Figure::new(projection_name, projected, unit).goal("≥ 0.5 ×");
        if let Some(copy) = copy_baseline {
            println!(
                "raw PostgreSQL COPY of the same raw rows into the same tables: {:.0} events/s; projection = {:.2} × raw",
                copy.same_tables,
                projected / copy.same_tables
            );
            println!(
                "(the earlier baseline, as many rows into one table with only a key: {:.0} rows/s; projection = {:.2} × it)",
                copy.one_table,
                projected / copy.one_table
            );
            end_to_end = end_to_end.raw(
                format!(
                    "PostgreSQL COPY of the same raw rows into the same raw tables, indexes kept, \
                     5 000 per transaction (into one table with only a key: {} rows/s)",
                    report::grouped(copy.one_table as u64)
                ),
                copy.same_tables,
            );
        }
        report::record(&end_to_end)?;
    }
    Ok(())
}

/// The projection's two raw limits, each measured alone before the load.
struct CopyBaseline {
    /// [`same_tables_copy_baseline`], events per second: the one the goal's ratio uses.
    same_tables: f64,
    /// [`one_table_copy_baseline`], rows per second: the earlier sessions' baseline, kept
    /// beside it so that their ratios can be compared.
    one_table: f64,
}

/// The projection's raw limit: `COPY` of the raw rows of the very events this run sends (as
/// the projector stores them: `RawRow::from_event`) into a scratch tenant's raw tables — the
/// same partitioned (or hyper-) tables, keys and secondary indexes kept, as a live batch
/// finds them — 5 000 events' rows per transaction on one connection, like a live batch.
/// It leaves out what only a projection does: reading and decoding the log, the rollups,
/// sessions, usage, the watermark and the offsets. Returns the events' rate (an event that
/// makes no raw row costs the baseline nothing, which only raises it). The events' ids are
/// the ones ingest-api gives them: JSON events carry their own, OTLP points get ids derived
/// from their content.
async fn same_tables_copy_baseline(
    url: &str,
    bodies: &[Vec<u8>],
    format: Format,
) -> anyhow::Result<f64> {
    let pool = sqlx::PgPool::connect(url).await?;
    let scratch = ingest_api::control::store::create_tenant(&pool, "", "load-copy").await?;
    let copied = copy_into_scratch(&pool, scratch, bodies, format).await;
    // The scratch tenant goes, whether or not the copy went through.
    let mut conn = pool.acquire().await?;
    projector::schema::drop_tenant_schema(&mut conn, scratch, 1).await?;
    sqlx::query("DELETE FROM control.tenants WHERE id = $1")
        .bind(scratch.0)
        .execute(&mut *conn)
        .await?;
    let (events, copying) = copied?;
    let rate = events as f64 / copying.as_secs_f64();
    println!("baseline: {rate:.0} events/s");
    Ok(rate)
}

/// [`same_tables_copy_baseline`]'s copy into the schema of `scratch`, which it makes: the
/// events copied and the time their copies and commits took.
async fn copy_into_scratch(
    pool: &sqlx::PgPool,
    scratch: TenantId,
    bodies: &[Vec<u8>],
    format: Format,
) -> anyhow::Result<(usize, Duration)> {
    use projector::models::raw::{self, RawRow, RawTable};
    use projector::schema::{self, partitions};
    let schema_name = scratch.schema(1);
    let mut conn = pool.acquire().await?;
    schema::create_tenant_schema(&mut conn, scratch, 1).await?;
    let today = Utc::now().date_naive();
    let days: Vec<_> = (-1..=1)
        .map(|d| today + chrono::Duration::days(d))
        .collect();
    partitions::ensure_partitions(&mut conn, &schema_name, &days).await?;
    let ctx = IngestContext {
        ids: match format {
            Format::Events => Ids::Fresh,
            Format::Otlp => Ids::Content,
        },
        ..tally_tests::bulk::ingest_context(scratch)
    };
    let mut decoded = Vec::new();
    for body in bodies {
        let Value::Array(events) = serde_json::from_slice(body)? else {
            anyhow::bail!("a request body is not an array of events");
        };
        decoded.extend(tally_tests::bulk::decode(&ctx, events)?);
    }
    println!(
        "baseline: COPY of the raw rows of the same {} events into the same raw tables…",
        decoded.len()
    );
    let mut copying = Duration::ZERO;
    for (seq, chunk) in decoded.chunks(5000).enumerate() {
        let rows: Vec<RawRow> = chunk
            .iter()
            .filter_map(|(env, p)| RawRow::from_event(env, p))
            .collect();
        let started = Instant::now();
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        schema::set_search_path(&mut tx, &schema_name).await?;
        raw::copy(&mut tx, &rows, seq as i64 + 1, &RawTable::ALL).await?;
        tx.commit().await?;
        copying += started.elapsed();
    }
    Ok((decoded.len(), copying))
}

/// The earlier sessions' baseline: `n` rows shaped like the projector's raw rows (all alike
/// but for their ids) into one unpartitioned scratch table with only a primary key, 5 000 per
/// transaction.
async fn one_table_copy_baseline(url: &str, n: usize) -> anyhow::Result<f64> {
    use std::fmt::Write as _;
    let pool = sqlx::PgPool::connect(url).await?;
    let mut conn = pool.acquire().await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_copy (event_id uuid, occurred_at timestamptz,
         received_at timestamptz, user_id text, team_id text, project_id text, session_id text,
         name text, status text, duration_ms bigint, input_tokens bigint, output_tokens bigint,
         value double precision, data jsonb, PRIMARY KEY (event_id, occurred_at))",
    )
    .execute(&mut *conn)
    .await?;
    sqlx::query("TRUNCATE bench_copy")
        .execute(&mut *conn)
        .await?;
    println!("baseline: COPY of {n} rows into PostgreSQL…");
    let started = Instant::now();
    let now = Utc::now().to_rfc3339();
    let mut done = 0;
    while done < n {
        let chunk = (n - done).min(5000);
        let mut csv = String::with_capacity(chunk * 200);
        for _ in 0..chunk {
            let _ = writeln!(
                csv,
                "{},{now},{now},load-user-1,team-a,proj-1,s1,build,success,1234,0,0,0,\"{{\"\"user_id\"\": \"\"load-user-1\"\", \"\"command_name\"\": \"\"build\"\"}}\"",
                uuid::Uuid::new_v4()
            );
        }
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut copy = tx
            .copy_in_raw("COPY bench_copy FROM STDIN (FORMAT csv)")
            .await?;
        copy.send(csv.into_bytes()).await?;
        copy.finish().await?;
        tx.commit().await?;
        done += chunk;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_copy")
        .execute(&mut *conn)
        .await?;
    println!("baseline: {rate:.0} rows/s");
    Ok(rate)
}

/// Produces the same events, as envelopes, straight to a scratch topic: the ceiling that
/// ingest-api (auth, validation, HTTP) is measured against.
async fn raw_kafka_baseline(args: &Args, bodies: &[Vec<u8>]) -> anyhow::Result<f64> {
    let common = shared::config::Common {
        kafka_brokers: args.brokers.clone(),
        topic_prefix: format!("bench{}.", uuid::Uuid::new_v4().simple()),
        ..Default::default()
    };
    let topic = common.metrics_topic();
    shared::kafka::ensure_topics(&common, std::slice::from_ref(&topic))
        .await
        .context("creating the baseline topic")?;
    let producer = shared::kafka::producer(&common, Duration::from_secs(30))?;
    let ctx = IngestContext {
        tenant_id: TenantId::new(),
        actor: Actor::default(),
        source: Source::Api,
        received_at: Utc::now(),
        bounds: TimeBounds::default(),
        ids: ingest_api::ingest::Ids::Fresh,
    };
    let mut records: Vec<(String, Vec<u8>)> = Vec::with_capacity(args.events);
    for body in bodies {
        let events: Vec<Value> = serde_json::from_slice(body)?;
        for (i, e) in events.into_iter().enumerate() {
            let env = ctx.envelope(i, e).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            records.push((env.kafka_key(), serde_json::to_vec(&env)?));
        }
    }
    println!(
        "baseline: producing {} envelopes straight to Kafka…",
        records.len()
    );
    let started = Instant::now();
    for chunk in records.chunks(args.batch.max(1) * args.concurrency) {
        tally_tests::produce_all(&producer, &topic, chunk).await?;
    }
    let rate = records.len() as f64 / started.elapsed().as_secs_f64();
    println!("baseline: {rate:.0} events/s");
    Ok(rate)
}
