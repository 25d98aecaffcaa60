//! Load shedding at the ingest doors: past the requests or body bytes it may hold, ingest-api
//! answers 503 with `Retry-After` at once, before reading anything; the control plane and the
//! requests already taken are not affected.

use std::time::Duration;

use serde_json::json;
use tally_tests::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Starts a request to `path` that declares `length` bytes of body and sends only a few:
/// it holds its place at the door until the stream is dropped.
async fn hold(addr: std::net::SocketAddr, path: &str, key: &str, length: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {length}\r\n\r\n["
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_doors_shed_load_with_503_and_retry_after() {
    init_logs();
    let pool = test_pool().await;
    let common = common_for_test();
    let ingest = start_ingest(&common, |c| {
        c.max_body_bytes = 1 << 20;
        c.max_inflight_requests = 2;
        c.max_inflight_bytes = 3 << 19;
    })
    .await;
    let t = create_tenant(&pool, "busy").await;
    let client = http();
    let events = json!([command("u", "build", 5, true)]);

    // A body of 1 MiB declared: the bytes budget (1.5 MiB) has half a MiB left.
    let first = hold(ingest.addr, "/v1/events", &t.ingest_key, 1 << 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = client
        .post(format!("{}/v1/events", ingest.url()))
        .bearer_auth(&t.ingest_key)
        .header("content-type", "application/json")
        .body(vec![b' '; 1 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    // A small one still fits.
    let res = post_events(&client, &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202);

    // Two requests in flight: the third is shed, whatever its size and door.
    let second = hold(ingest.addr, "/v1/events", &t.ingest_key, 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = post_events(&client, &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 503);
    let res = client
        .post(format!("{}/v1/otlp/v1/metrics", ingest.url()))
        .bearer_auth(&t.ingest_key)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    // Doors only: health and the control plane answer as usual.
    let res = client
        .get(format!("{}/healthz", ingest.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let metrics = client
        .get(format!("{}/metrics", ingest.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("ingest_shed_total"), "{metrics}");

    // Once the held requests go, the doors take requests again.
    drop(first);
    drop(second);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &events).await;
        if res.status() == 202 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still shedding");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ingest.stop().await.unwrap();
}
