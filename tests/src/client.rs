//! Talking to the services over HTTP as their clients do, and to Kafka as ingest-api does.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use shared::config::Common;
use shared::events::Envelope;

/// Where the running services listen, as the benchmark tools take it: flags, or the
/// environment that `.tally/demo.env` sets.
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceUrls {
    /// ingest-api base URL.
    #[arg(
        long,
        env = "TALLY_INGEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// query-api base URL.
    #[arg(long, env = "TALLY_QUERY_URL", default_value = "http://127.0.0.1:8081")]
    pub query_url: String,
}

/// An HTTP client for the tests.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// POSTs a JSON body to ingest-api with an API key.
pub async fn post_events(
    client: &reqwest::Client,
    ingest: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{ingest}/v1/events"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("POST /v1/events")
}

/// How many times [`post_events_accepted`] sends a body that was answered 503.
const UNAVAILABLE_SENDS: u32 = 4;

/// POSTs a JSON body to ingest-api with an API key and asserts it was accepted (202).
///
/// A 503 (the event log did not acknowledge in time, as on a starved machine) is sent again
/// after its `Retry-After`, as the API tells clients to: the events carry the same ids, so a
/// resend is counted once, which the callers' exact counts go on to prove. The resend is
/// logged; any other answer, or a fourth 503, fails with the status and the problem's body.
pub async fn post_events_accepted(client: &reqwest::Client, ingest: &str, key: &str, body: &Value) {
    for send in 1..=UNAVAILABLE_SENDS {
        let res = post_events(client, ingest, key, body).await;
        let status = res.status().as_u16();
        if status == 202 {
            return;
        }
        let retry_after = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let text = res.text().await.unwrap_or_default();
        if status == 503 && send < UNAVAILABLE_SENDS {
            eprintln!("POST /v1/events answered 503 ({text}); sending the same events again");
            let wait = retry_after.unwrap_or(1).clamp(1, 5);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        panic!("POST /v1/events answered {status}, not 202: {text}");
    }
}

/// Sends a request and returns its answer, whatever it is: the status and the JSON body
/// (`null` when there is none). Panics only when nothing answers (as when a bomb test's
/// ingest-api was killed for its memory).
pub async fn status_and_json(request: reqwest::RequestBuilder) -> (u16, Value) {
    let res = request
        .send()
        .await
        .expect("ingest-api answers (it was not killed)");
    let status = res.status().as_u16();
    (status, res.json::<Value>().await.unwrap_or_default())
}

/// Logs a person in at ingest-api (`POST /v1/auth/login`); the answer is the caller's to check.
pub async fn login(
    client: &reqwest::Client,
    ingest: &str,
    email: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(format!("{ingest}/v1/auth/login"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .expect("POST /v1/auth/login")
}

/// GETs a dashboard answer with a read key; panics unless it is a 200.
pub async fn get_json(client: &reqwest::Client, url: &str, key: &str) -> Value {
    let res = client.get(url).bearer_auth(key).send().await.expect("GET");
    let status = res.status();
    let body: Value = res.json().await.expect("JSON body");
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// A counter's value on a Prometheus page: the sum of the series starting with `name` (a
/// metric's name, or one series with its labels); 0 when it has not been touched yet.
pub fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The text a service's `/metrics` answers (whatever its status).
pub async fn scrape_metrics(client: &reqwest::Client, base_url: &str) -> String {
    client
        .get(format!("{base_url}/metrics"))
        .send()
        .await
        .expect("scrape /metrics")
        .text()
        .await
        .unwrap()
}

/// Writes an envelope straight into the test's metrics topic, keyed as ingest-api keys it.
pub async fn produce_envelope(common: &Common, env: &Envelope) {
    let producer: FutureProducer =
        shared::kafka::producer(common, Duration::from_secs(10)).unwrap();
    let body = serde_json::to_vec(env).unwrap();
    let key = env.kafka_key();
    producer
        .send(
            FutureRecord::to(&common.metrics_topic())
                .key(&key)
                .payload(&body),
            Duration::from_secs(10),
        )
        .await
        .expect("produce the record");
}

/// Produces (key, payload) records to `topic` as fast as the producer takes them (waiting
/// while its queue is full), then waits for every acknowledgement.
pub async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity(records.len());
    for (key, payload) in records {
        loop {
            match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
                Ok(ack) => {
                    acks.push(ack);
                    break;
                }
                Err(_queue_full) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for ack in acks {
        ack.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Events the dashboards count for the key's tenant over the last 24 h.
pub async fn dashboard_total(
    client: &reqwest::Client,
    url: &str,
    key: &str,
) -> anyhow::Result<i64> {
    let v: Value = client
        .get(format!("{url}/v1/dashboard/overview?range=24h"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    v["events_total"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no events_total in the overview: {v}"))
}

/// Polls a dashboard URL until `stop` is set; counts requests and failures (anything but
/// a 200), and returns every time the total it reads went backwards as (before, after).
/// The total is `events_total` of an overview, or the sum of a time series' counts.
pub fn spawn_poller(
    url: String,
    key: String,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
    polls: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<(String, Vec<(i64, i64)>)> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let client = http();
        let mut last = 0i64;
        let mut backwards = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            polls.fetch_add(1, Ordering::Relaxed);
            match client.get(&url).bearer_auth(&key).send().await {
                Ok(r) if r.status() == 200 => {
                    let o: Value = r.json().await.expect("JSON answer");
                    let n = match o.get("events_total") {
                        Some(n) => n.as_i64().expect("events_total"),
                        None => o["series"]
                            .as_array()
                            .expect("series")
                            .iter()
                            .flat_map(|s| s["points"].as_array().expect("points"))
                            .map(|p| p["count"].as_i64().expect("count"))
                            .sum(),
                    };
                    if n < last {
                        backwards.push((last, n));
                    }
                    last = last.max(n);
                }
                Ok(r) => {
                    eprintln!(
                        "{url}: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("{url}: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(every).await;
        }
        (url, backwards)
    })
}

/// The sum of every point of a `/v1/dashboard/metrics` answer.
pub fn series_total(m: &Value) -> f64 {
    m["series"]
        .as_array()
        .expect("series")
        .iter()
        .flat_map(|s| s["points"].as_array().expect("points").iter())
        .map(|p| p[1].as_f64().expect("value"))
        .sum()
}

/// `body` gzipped, best compression: how the bomb tests make a few KB inflate to megabytes.
pub fn gzip(body: impl AsRef<[u8]>) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(body.as_ref()).expect("gzip into memory");
    enc.finish().expect("gzip into memory")
}

/// Sends an OTLP/gRPC `Export` of raw bytes with grpcio (`tests/clients/otlp_grpc_raw.py`,
/// its `args`) to `target` with `key`; the status name and details it printed.
pub async fn grpc_raw(target: &str, key: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(crate::otel_python());
    cmd.arg(crate::repo_root().join("tests/clients/otlp_grpc_raw.py"))
        .args(["--target", target, "--key", key])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("the OTel virtualenv exists (deploy/local/test-clients.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
