//! With Kafka stopped, POST answers 503 with Retry-After within the configured timeout and
//! never 202; once Kafka is back, POSTs succeed again without restarting ingest-api.
//! Runs against a private broker so the shared one stays up for the other tests.

use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_down_means_503_then_recovery() {
    let TestEnv { pool, mut common } = test_env().await;
    let mut kafka = PrivateKafka::new();
    kafka.start().await;
    common.kafka_brokers = kafka.brokers();
    let timeout_ms = 2000;
    let ingest = start_ingest(&common, |c| c.produce_timeout_ms = timeout_ms).await;
    let client = http();
    let t = create_tenant(&pool, "kafka-down").await;
    let batch = || Value::Array((0..10).map(|i| command("u", "c", i, true)).collect());

    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch()).await;

    kafka.kill();
    for _ in 0..3 {
        let started = Instant::now();
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &batch()).await;
        let elapsed = started.elapsed();
        assert_eq!(res.status(), 503, "never 202 while Kafka is down");
        let retry_after: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        assert!(
            elapsed <= Duration::from_millis(timeout_ms + 1500),
            "answered after {elapsed:?}, configured timeout {timeout_ms} ms"
        );
    }
    let ready = client
        .get(format!("{}/readyz", ingest.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready without Kafka");

    kafka.start().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &batch()).await;
        if res.status() == 202 {
            break;
        }
        assert_eq!(res.status(), 503);
        assert!(
            Instant::now() < deadline,
            "ingest did not recover after Kafka came back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    ingest.stop().await.unwrap();
}
