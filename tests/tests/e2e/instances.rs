//! Two projector instances in one consumer group share the partitions and, together,
//! project every event exactly once.

use std::time::Duration;

use chrono::Duration as Span;
use serde_json::Value;
use tally_tests::events::Generator;
use tally_tests::*;

/// `projector_events_total{outcome="inserted"}` of an instance.
async fn inserted(client: &reqwest::Client, port: u16) -> u64 {
    let text = scrape_metrics(client, &format!("http://127.0.0.1:{port}")).await;
    text.lines()
        .find(|l| l.starts_with("projector_events_total{outcome=\"inserted\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_partitions_and_project_exactly_once() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "pair").await;
    let ports = [free_port(), free_port()];
    let _instances: Vec<Proc> = ports
        .iter()
        .map(|port| {
            Proc(
                projector_command(&common, &["run"])
                    .env("TALLY_HTTP_ADDR", format!("127.0.0.1:{port}"))
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("spawn projector"),
            )
        })
        .collect();

    const TOTAL: usize = 30_000;
    let mut generator = Generator::new(21, "pair", 40, Span::hours(3));
    for _ in 0..TOTAL / 500 {
        let res = post_events(
            &client,
            &ingest.url(),
            &t.ingest_key,
            &Value::Array(generator.batch(500)),
        )
        .await;
        assert_eq!(res.status(), 202);
        // Spread over ~12 s, so both instances are in the group while events flow.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_projected(&pool, t.id, TOTAL as i64, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(projected_events(&pool, t.id).await, Some(TOTAL as i64));
    assert_projection_exact(&pool, t.id, &generator.expected).await;
    let (a, b) = (
        inserted(&client, ports[0]).await,
        inserted(&client, ports[1]).await,
    );
    assert!(a > 0 && b > 0, "both instances projected: {a} and {b}");
    assert_eq!(a + b, TOTAL as u64, "together exactly once: {a} + {b}");
    ingest.stop().await.unwrap();
}
