//! The projector SIGKILLed several times while 50 000 events stream in: afterwards the raw
//! tables hold exactly 50 000 rows and every rollup adds up exactly.

use std::time::Duration;

use chrono::Duration as Span;
use serde_json::Value;
use tally_tests::events::Generator;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projector_killed_repeatedly_loses_and_doubles_nothing() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "crashy").await;

    const TOTAL: usize = 50_000;
    const BATCH: usize = 500;
    let mut generator = Generator::new(7, "c", 20, Span::hours(6));
    let batches: Vec<Value> = (0..TOTAL / BATCH)
        .map(|_| Value::Array(generator.batch(BATCH)))
        .collect();
    let expected = generator.expected.clone();

    let sender = {
        let client = client.clone();
        let url = ingest.url();
        let key = t.ingest_key.clone();
        tokio::spawn(async move {
            for b in batches {
                // Retries of a batch carry the same ids: at-least-once into Kafka is fine.
                loop {
                    let res = post_events(&client, &url, &key, &b).await;
                    if res.status() == 202 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let mut kills = 0;
    let mut child = spawn_projector_process(&common);
    while !sender.is_finished() || kills < 4 {
        // Let it run long enough to get partitions and write a few batches, then SIGKILL.
        tokio::time::sleep(Duration::from_millis(2500 + 700 * (kills % 3))).await;
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        kills += 1;
        child = spawn_projector_process(&common);
    }
    sender.await.unwrap();
    let projected = wait_projected(&pool, t.id, TOTAL as i64, Duration::from_secs(180)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(projected, TOTAL as i64);
    assert_eq!(projected_events(&pool, t.id).await, Some(TOTAL as i64));

    assert_projection_exact(&pool, t.id, &expected).await;
    eprintln!("crash test: {kills} SIGKILLs, raw rows and rollups exact");
    ingest.stop().await.unwrap();
}
