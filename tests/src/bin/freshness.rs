//! `tally-freshness`: how soon an accepted event is counted on the dashboards, and how much
//! memory each service holds, under a sustained load.
//!
//! Offers JSON events to ingest-api at a fixed rate (`--rate` events/s for `--seconds`),
//! live-dated as real senders date them, in batches from several concurrent senders. Meanwhile
//! it sends probes (`--probes-per-second`, one at a time): a small batch whose user id is the
//! probe's own (`probe-<n>-user-0`), and from its 202 polls query-api's overview every
//! `--poll-ms` until the probe is counted; that time is one freshness sample. A probe not
//! counted within `--probe-timeout` seconds is a failure: it counts as that timeout in the
//! percentiles and the run exits with 1 once it has reported.
//!
//! The overview has no user filter, so the probes go to a tenant of their own (created for
//! the run, with an ingest and a read key) whose overview counts nothing but probes. Their
//! Kafka keys spread them over the same partitions as the load, and the projector writes them
//! in the same batches as the load's events: a probe waits behind whatever the load queued.
//! The probes add one request of `--probe-size` events per probe, under 0.1 % of the load.
//!
//! With the load's read key (`TALLY_READ_KEY`) it also reads the load tenant's overview every
//! second: the events accepted but not yet counted are the projector's backlog, which says
//! whether the projector keeps up; after the load it waits until they are all counted.
//!
//! Every 250 ms it samples the resident memory (`VmRSS`) of ingest-api, projector and
//! query-api, whose pids it reads from `--pid-dir` (default `$TALLY_HOME/run`).
//!
//! Reports the rate achieved, freshness p50/p99/max and each service's peak memory, and
//! records freshness p99 and the peaks in the bench report ([`tally_tests::report`]).
//!
//! ```text
//! . deploy/local/env.sh; . .tally/demo.env
//! cargo run --release -p tally-tests --bin tally-freshness -- --rate 10000 --seconds 60
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::Value;
use shared::apikey::Scope;
use tally_tests::events::Generator;
use tally_tests::report::{self, Figure};

#[derive(Parser, Debug)]
#[command(about = "Freshness and memory under a sustained load")]
struct Args {
    #[command(flatten)]
    services: tally_tests::ServiceUrls,
    /// An API key with the `ingest` scope, for the load.
    #[arg(long, env = "TALLY_INGEST_KEY")]
    key: String,
    /// PostgreSQL, to create the probes' tenant and its keys.
    #[arg(long, env = "TALLY_DATABASE_URL")]
    database_url: String,
    /// Events offered per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// How long the load lasts.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Events per request (ingest-api takes at most 1 000). At 10 000 events/s, 1 000 a request
    /// is 600 requests a minute, under the demo tenant's limit (its plan's 1 000 a minute);
    /// 500 a request would pass it.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Requests in flight at most; a sender that finds them all busy falls behind the rate.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Probes started per second (each waits for the one before it).
    #[arg(long, default_value_t = 2.0)]
    probes_per_second: f64,
    /// Events per probe.
    #[arg(long, default_value_t = 5)]
    probe_size: usize,
    /// A probe not counted after this many seconds is a failure.
    #[arg(long, default_value_t = 30)]
    probe_timeout: u64,
    /// How often a probe polls the overview.
    #[arg(long, default_value_t = 10)]
    poll_ms: u64,
    /// With the load's read key: after the load, wait until its events are all counted and
    /// report how far behind the projector was.
    #[arg(long, env = "TALLY_READ_KEY")]
    read_key: Option<String>,
    /// Where `ingest-api.pid`, `projector.pid` and `query-api.pid` are (default:
    /// `$TALLY_HOME/run`, else `.tally/run`).
    #[arg(long)]
    pid_dir: Option<PathBuf>,
}

const SERVICES: [&str; 3] = ["ingest-api", "projector", "query-api"];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0 && args.batch > 0 && args.concurrency > 0 && args.probes_per_second > 0.0,
        "rate, batch, concurrency and probes per second must be positive"
    );
    let pids = read_pids(&args)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut probes = Probes::create(&args, client.clone()).await?;
    // The first probe makes the new tenant's schema; it is not a sample.
    println!("tenant {} for the probes; a first probe…", probes.tenant);
    let first = probes.probe().await?;
    anyhow::ensure!(first.is_some(), "the first probe was never counted");

    println!(
        "offering {} events/s for {} s ({} per request, at most {} in flight), {} probes/s of {} events",
        args.rate,
        args.seconds,
        args.batch,
        args.concurrency,
        args.probes_per_second,
        args.probe_size
    );
    let counted_before = match &args.read_key {
        Some(key) => {
            Some(tally_tests::dashboard_total(&client, &args.services.query_url, key).await?)
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let memory = sample_memory(pids, stop.clone());
    let started = Instant::now();
    let load = args.load();
    let (accepted, errors) = (load.accepted.clone(), load.errors.clone());
    let load = tokio::spawn(offer(load, client.clone(), stop.clone()));
    let probing = {
        let stop = stop.clone();
        let every = Duration::from_secs_f64(1.0 / args.probes_per_second);
        tokio::spawn(async move {
            let mut samples: Vec<Option<Duration>> = Vec::new();
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                samples.push(probes.probe().await?);
            }
            anyhow::Ok(samples)
        })
    };
    // Progress, and the projector's backlog: events accepted but not yet counted.
    let mut max_backlog = 0;
    for second in 1..=args.seconds {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        let accepted = accepted.load(Ordering::Relaxed) as i64;
        let backlog = match (counted_before, &args.read_key) {
            (Some(before), Some(key)) => {
                let counted =
                    tally_tests::dashboard_total(&client, &args.services.query_url, key).await?;
                Some((accepted - (counted - before)).max(0))
            }
            _ => None,
        };
        max_backlog = max_backlog.max(backlog.unwrap_or(0));
        if second % 5 == 0 {
            println!(
                "  {second:>3} s  {accepted:>9} events accepted  {:>6.0} events/s so far  errors {}{}",
                accepted as f64 / started.elapsed().as_secs_f64(),
                errors.load(Ordering::Relaxed),
                backlog.map_or(String::new(), |b| format!("  not yet counted {b}"))
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let stopped = Instant::now();
    let sent = load.await??;
    let elapsed = started.elapsed();
    // The projector's backlog when the load stopped: how long it takes to count the rest,
    // watched while the last probe finishes.
    let drained = match (counted_before, args.read_key.clone()) {
        (Some(before), Some(key)) => {
            let target = before + sent.accepted as i64;
            let (client, url) = (client.clone(), args.services.query_url.clone());
            let deadline = stopped + Duration::from_secs(args.seconds.max(args.probe_timeout) * 5);
            Some(tokio::spawn(async move {
                let mut counted = before;
                while counted < target && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    counted = tally_tests::dashboard_total(&client, &url, &key).await?;
                }
                anyhow::Ok((counted - before, stopped.elapsed()))
            }))
        }
        _ => None,
    };
    let samples = probing.await??;
    let peaks = memory.await?;

    let rate = sent.accepted as f64 / sent.elapsed.as_secs_f64();
    println!("---");
    println!(
        "load: {} events accepted in {:.1} s = {rate:.0} events/s (offered {}); {} requests failed",
        sent.accepted,
        sent.elapsed.as_secs_f64(),
        args.rate,
        sent.errors
    );
    if let Some(drained) = drained {
        let (counted, after) = drained.await??;
        println!(
            "projector: at most {max_backlog} events accepted but not yet counted during the load; {counted} of {} counted {:.1} s after it stopped",
            sent.accepted,
            after.as_secs_f64()
        );
    }
    let timeout = Duration::from_secs(args.probe_timeout);
    let failed = samples.iter().filter(|s| s.is_none()).count();
    let mut times: Vec<Duration> = samples.iter().map(|s| s.unwrap_or(timeout)).collect();
    anyhow::ensure!(!times.is_empty(), "no probe finished in {elapsed:?}");
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p99 = ms(report::percentile(&times, 0.99));
    println!(
        "freshness (202 → counted in the overview), {} probes: p50 {:.0} ms, p99 {p99:.0} ms, max {:.0} ms; {failed} not counted within {} s",
        times.len(),
        ms(report::percentile(&times, 0.5)),
        ms(times[times.len() - 1]),
        args.probe_timeout
    );
    let under = format!(
        "at {} events/s for {} s",
        report::grouped(rate.round() as u64),
        args.seconds
    );
    let failures = match failed {
        0 => String::new(),
        _ => format!(
            " ({failed} of {} probes not counted within {} s, counted as that)",
            times.len(),
            args.probe_timeout
        ),
    };
    report::record(
        &Figure::new(
            format!("freshness p99, 202 → counted in the overview, {under}{failures}"),
            p99,
            "ms",
        )
        .goal("≤ 500 ms"),
    )?;
    for (service, peak) in &peaks {
        let mb = (peak.max_kib * 1024) as f64 / 1e6;
        println!(
            "{service}: resident memory {:.1} MB before, {mb:.1} MB at the peak",
            (peak.before_kib * 1024) as f64 / 1e6
        );
        report::record(
            &Figure::new(format!("peak RSS of {service}, {under}"), mb, "MB").goal("≤ 64 MB"),
        )?;
    }
    if failed > 0 {
        eprintln!(
            "FAILED: {failed} of {} probes were not counted within {} s",
            times.len(),
            args.probe_timeout
        );
        std::process::exit(1);
    }
    Ok(())
}

impl Args {
    /// What the senders need.
    fn load(&self) -> Load {
        Load {
            url: format!("{}/v1/events", self.services.url),
            key: self.key.clone(),
            rate: self.rate,
            batch: self.batch,
            concurrency: self.concurrency,
            accepted: Arc::default(),
            errors: Arc::default(),
        }
    }
}

struct Load {
    url: String,
    key: String,
    rate: u64,
    batch: usize,
    concurrency: usize,
    /// Events accepted so far.
    accepted: Arc<AtomicU64>,
    /// Requests that failed so far.
    errors: Arc<AtomicU64>,
}

struct Sent {
    accepted: u64,
    errors: u64,
    elapsed: Duration,
}

/// Starts a request of `batch` live events every `batch / rate` seconds until `stop`, with at
/// most `concurrency` in flight; returns what was accepted once the last one answered.
async fn offer(load: Load, client: reqwest::Client, stop: Arc<AtomicBool>) -> anyhow::Result<Sent> {
    let mut generator = Generator::new(42, "load", 200, chrono::Duration::minutes(1)).live();
    let slots = Arc::new(tokio::sync::Semaphore::new(load.concurrency));
    let (accepted, errors) = (load.accepted.clone(), load.errors.clone());
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(
        load.batch as f64 / load.rate as f64,
    ));
    // A sender that falls behind does not catch up in a burst: the rate achieved says so.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut requests = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        generator.now = chrono::Utc::now();
        let body = serde_json::to_vec(&Value::Array(generator.batch(load.batch)))?;
        let slot = slots.clone().acquire_owned().await?;
        let (client, url, key) = (client.clone(), load.url.clone(), load.key.clone());
        let (accepted_by, errors_of) = (accepted.clone(), errors.clone());
        requests.push(tokio::spawn(async move {
            let _slot = slot;
            match post(&client, &url, &key, body).await {
                Ok(n) => accepted_by.fetch_add(n, Ordering::Relaxed),
                Err(e) => {
                    eprintln!("  {e:#}");
                    errors_of.fetch_add(1, Ordering::Relaxed)
                }
            };
        }));
    }
    for r in requests {
        r.await?;
    }
    Ok(Sent {
        accepted: accepted.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
    })
}

/// POSTs a JSON array of events; the number accepted, or why not.
async fn post(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: Vec<u8>,
) -> anyhow::Result<u64> {
    let res = client
        .post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    anyhow::ensure!(status == 202, "HTTP {status}: {text}");
    serde_json::from_str::<Value>(&text)?["accepted"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no `accepted` in {text}"))
}

/// The probes' tenant, and how many probe events its overview must count.
struct Probes {
    tenant: shared::tenant::TenantId,
    ingest_url: String,
    ingest_key: String,
    query_url: String,
    read_key: String,
    client: reqwest::Client,
    size: usize,
    timeout: Duration,
    poll: Duration,
    sent: usize,
    /// Events counted before the first probe.
    counted_before: i64,
}

impl Probes {
    async fn create(args: &Args, client: reqwest::Client) -> anyhow::Result<Probes> {
        let pool = sqlx::PgPool::connect(&args.database_url).await?;
        use ingest_api::control::store;
        let tenant = store::create_tenant(&pool, "", "freshness-probes").await?;
        let (_, ingest_key) =
            store::create_api_key(&pool, "", tenant, Scope::Ingest, "freshness").await?;
        let (_, read_key) =
            store::create_api_key(&pool, "", tenant, Scope::Read, "freshness").await?;
        let mut probes = Probes {
            tenant,
            ingest_url: format!("{}/v1/events", args.services.url),
            ingest_key,
            query_url: args.services.query_url.clone(),
            read_key,
            client,
            size: args.probe_size,
            timeout: Duration::from_secs(args.probe_timeout),
            poll: Duration::from_millis(args.poll_ms),
            sent: 0,
            counted_before: 0,
        };
        probes.counted_before = probes.counted().await?;
        Ok(probes)
    }

    async fn counted(&self) -> anyhow::Result<i64> {
        tally_tests::dashboard_total(&self.client, &self.query_url, &self.read_key).await
    }

    /// Sends the next probe and waits until the overview counts it (and every probe before
    /// it): the time from its 202, or `None` after the timeout.
    async fn probe(&mut self) -> anyhow::Result<Option<Duration>> {
        let n = self.sent / self.size;
        let mut generator = Generator::new(
            n as u64,
            &format!("probe-{n}"),
            1,
            chrono::Duration::minutes(1),
        )
        .live();
        let body = serde_json::to_vec(&Value::Array(generator.batch(self.size)))?;
        let deadline = Instant::now() + self.timeout;
        // A probe the load made ingest-api refuse (503 under back-pressure) is sent again:
        // freshness starts at the 202.
        loop {
            match post(
                &self.client,
                &self.ingest_url,
                &self.ingest_key,
                body.clone(),
            )
            .await
            {
                Ok(accepted) if accepted == self.size as u64 => break,
                Ok(accepted) => {
                    anyhow::bail!("probe {n}: {accepted} of {} events accepted", self.size)
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("  probe {n} refused, sent again: {e:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context(format!("probe {n} was never accepted")),
            }
        }
        let accepted = Instant::now();
        self.sent += self.size;
        let target = self.counted_before + self.sent as i64;
        let deadline = accepted + self.timeout;
        loop {
            if self.counted().await? >= target {
                return Ok(Some(accepted.elapsed()));
            }
            if Instant::now() >= deadline {
                eprintln!("  probe {n} not counted within {:?}", self.timeout);
                return Ok(None);
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// Where a service's resident memory started and peaked.
struct Peak {
    before_kib: u64,
    max_kib: u64,
}

/// Samples each service's `VmRSS` every 250 ms until `stop`; returns the peaks.
fn sample_memory(
    pids: Vec<(&'static str, u32)>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(&'static str, Peak)>> {
    let rss = |pid| tally_tests::memory_kib(pid).map_or(0, |(rss, _)| rss);
    let mut peaks: Vec<(&'static str, u32, Peak)> = pids
        .into_iter()
        .map(|(service, pid)| {
            let now = rss(pid);
            (
                service,
                pid,
                Peak {
                    before_kib: now,
                    max_kib: now,
                },
            )
        })
        .collect();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            for (_, pid, peak) in &mut peaks {
                peak.max_kib = peak.max_kib.max(rss(*pid));
            }
        }
        peaks.into_iter().map(|(s, _, p)| (s, p)).collect()
    })
}

/// The services' pids, from their pid files; each must be running.
fn read_pids(args: &Args) -> anyhow::Result<Vec<(&'static str, u32)>> {
    let dir = args.pid_dir.clone().unwrap_or_else(|| {
        std::env::var_os("TALLY_HOME")
            .map_or_else(|| PathBuf::from(".tally"), PathBuf::from)
            .join("run")
    });
    SERVICES
        .iter()
        .map(|service| {
            let file = dir.join(format!("{service}.pid"));
            let pid = tally_tests::service_pid(&file, service).context("pass --pid-dir")?;
            Ok((*service, pid))
        })
        .collect()
}
