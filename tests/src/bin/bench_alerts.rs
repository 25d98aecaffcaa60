//! `tally-bench-alerts`: how soon a budget's crossing reaches its webhook, end to end — from
//! the 202 of the event that crossed to the signed notification arriving at a receiver on
//! this host, through ingest-api, Kafka, the projector's batch, the evaluator and the
//! deliverer.
//!
//! Makes a tenant with one webhook channel (a receiver started here; `make up` allows
//! loopback receivers) and `--crossings` budgets of $1 a day on as many users, each with the
//! single threshold 100 %. Then, one user after the other, sends an `agent.interacted` event
//! worth $1 and waits for that user's notification. Meanwhile `--background-rate` events/s
//! go to the load tenant (`TALLY_INGEST_KEY`), so that the projector is busy as it would be.
//! Reports p50, p99 and max, and records them in the bench report
//! ([`tally_tests::report`]).
//!
//! ```text
//! make up && make bench-alerts           # CROSSINGS=100 ALERT_BACKGROUND=1000
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use shared::apikey::Scope;
use tally_tests::events::Generator;
use tally_tests::receiver::Receiver;
use tally_tests::report::{self, Figure};
use uuid::Uuid;

#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    services: tally_tests::ServiceUrls,
    #[arg(long, env = "TALLY_DATABASE_URL")]
    database_url: String,
    /// Budgets crossed, one after the other (each is one sample).
    #[arg(long, default_value_t = 100)]
    crossings: usize,
    /// Events per second sent to the load tenant meanwhile (0: none).
    #[arg(long, default_value_t = 1000)]
    background_rate: u64,
    /// The load tenant's ingest key, for the background events.
    #[arg(long, env = "TALLY_INGEST_KEY")]
    load_key: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.database_url)
        .await?;
    let tenant = ingest_api::control::store::create_tenant(&pool, "", "bench-alerts").await?;
    let store =
        |scope| ingest_api::control::store::create_api_key(&pool, "", tenant, scope, "bench");
    let (_, admin) = store(Scope::Admin).await?;
    let (_, ingest) = store(Scope::Ingest).await?;
    let client = tally_tests::http();
    let receiver = Receiver::start().await;
    let url = |path: &str| format!("{}/v1/admin/{path}", args.services.url);
    let res = client
        .post(url("channels"))
        .bearer_auth(&admin)
        .json(&json!({"name": "bench", "kind": "webhook", "url": receiver.url}))
        .send()
        .await?;
    anyhow::ensure!(
        res.status() == 201,
        "creating the channel: {} {} (the services must allow loopback receivers: \
         TALLY_NOTIFY_ALLOW_LOOPBACK=true, as make up sets)",
        res.status(),
        res.text().await?
    );
    for i in 0..args.crossings {
        let res = client
            .post(url("budgets"))
            .bearer_auth(&admin)
            .json(&json!({"name": format!("bench {i}"), "scope": "user",
                          "scope_id": format!("bench-u{i}"), "metric": "cost_usd",
                          "period": "day", "amount": 1.0, "thresholds": [100]}))
            .send()
            .await?;
        anyhow::ensure!(res.status() == 201, "creating a budget: {}", res.status());
    }
    let spend = |user: String, dollars: f64| {
        json!([{"id": Uuid::new_v4(), "type": "agent.interacted",
                "occurred_at": chrono::Utc::now().to_rfc3339(),
                "data": {"user_id": user, "agent_name": "claude", "interaction_type": "chat",
                         "input_tokens": 10, "output_tokens": 10, "cost_usd": dollars,
                         "duration_ms": 100, "status": "success"}}])
    };
    // The tenant's schema is made by its first event, which is not a sample.
    let post = |body: Value| {
        client
            .post(format!("{}/v1/events", args.services.url))
            .bearer_auth(&ingest)
            .json(&body)
            .send()
    };
    anyhow::ensure!(post(spend("warm-up".into(), 0.0)).await?.status() == 202);
    tokio::time::sleep(Duration::from_secs(3)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let background = match (&args.load_key, args.background_rate) {
        (Some(key), rate) if rate > 0 => Some(tokio::spawn(load(
            client.clone(),
            args.services.url.clone(),
            key.clone(),
            rate,
            stop.clone(),
        ))),
        _ => None,
    };
    println!(
        "tenant {tenant}: {} crossings, {} background events/s",
        args.crossings,
        if background.is_some() {
            args.background_rate
        } else {
            0
        }
    );
    let mut samples = Vec::with_capacity(args.crossings);
    for i in 0..args.crossings {
        let user = format!("bench-u{i}");
        let started = Instant::now();
        let res = post(spend(user.clone(), 1.0)).await?;
        anyhow::ensure!(res.status() == 202, "event refused: {}", res.status());
        let deadline = started + Duration::from_secs(30);
        loop {
            let arrived = receiver
                .accepted()
                .into_iter()
                .find(|r| r.json()["data"]["budget"]["scope_id"].as_str() == Some(user.as_str()));
            if let Some(r) = arrived {
                samples.push(r.at - started);
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{user}'s crossing was not delivered in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(b) = background {
        b.await??;
    }
    anyhow::ensure!(
        receiver.received().len() == args.crossings,
        "{} notifications for {} crossings",
        receiver.received().len(),
        args.crossings
    );
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99, max) = (
        report::percentile(&samples, 0.5),
        report::percentile(&samples, 0.99),
        samples[samples.len() - 1],
    );
    println!(
        "crossing → webhook received: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} samples, each delivered once)",
        ms(p50),
        ms(p99),
        ms(max),
        samples.len()
    );
    let what = format!(
        "alert delivery, event's 202 → signed webhook received, {} background events/s",
        args.background_rate
    );
    report::record(&Figure::new(format!("{what}, p50"), ms(p50), "ms"))?;
    report::record(&Figure::new(format!("{what}, p99"), ms(p99), "ms").goal("≤ 5000 ms"))?;
    Ok(())
}

/// Sends `rate` events a second (live-dated, 500 a request) until `stop`.
async fn load(
    client: reqwest::Client,
    url: String,
    key: String,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut generator = Generator::new(99, "alerts-bg", 20, chrono::Duration::minutes(1)).live();
    let per = 500u64;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(per as f64 / rate as f64));
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        generator.now = chrono::Utc::now();
        let body = Value::Array(generator.batch(per as usize));
        let res = client
            .post(format!("{url}/v1/events"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await?;
        if res.status() != 202 {
            eprintln!("background load: {}", res.status());
        }
    }
    Ok(())
}
