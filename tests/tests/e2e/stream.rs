//! The live feed: Server-Sent Events of new activity, only ever the caller's tenant, with
//! resumption by `Last-Event-ID`.

use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::*;
use tokio::sync::mpsc;

/// The activity events (id, data) and the totals events of one stream.
type Feeds = (
    mpsc::UnboundedReceiver<(String, Value)>,
    mpsc::UnboundedReceiver<Value>,
);

/// Opens `/v1/stream` and forwards each `activity` (id, data) it receives; `totals` events go
/// to the second receiver.
async fn listen(query: &str, key: &str, last_event_id: Option<&str>) -> Feeds {
    let mut req = reqwest::Client::new()
        .get(format!("{query}/v1/stream"))
        .bearer_auth(key);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let mut res = req.send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (tx, rx) = mpsc::unbounded_channel();
    let (totals_tx, totals_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Ok(Some(chunk)) = res.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let mut id = String::new();
                let mut data = String::new();
                let mut kind = String::from("message");
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(&data).unwrap();
                let sent = match kind.as_str() {
                    // Nobody listening for totals is fine.
                    "totals" => {
                        let _ = totals_tx.send(value);
                        true
                    }
                    _ => tx.send((id, value)).is_ok(),
                };
                if !sent {
                    return;
                }
            }
        }
    });
    (rx, totals_rx)
}

async fn take(rx: &mut mpsc::UnboundedReceiver<(String, Value)>, n: usize) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(e)) => out.push(e),
            _ => panic!("{} of {n} live events after 20 s: {out:?}", out.len()),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_feeds_carry_only_their_tenant_and_resume() {
    init_logs();
    let pool = test_pool().await;
    let common = common_for_test();
    let ingest = start_ingest(&common, |_| {}).await;
    let projector = start_projector(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let a = create_tenant(&pool, "live-a").await;
    let b = create_tenant(&pool, "live-b").await;

    let (mut feed_a, mut totals_a) = listen(&query.url(), &a.read_key, None).await;
    let (mut feed_b, _totals_b) = listen(&query.url(), &b.read_key, None).await;
    let sent_at = Instant::now();
    let batch_a = Value::Array(
        (0..3)
            .map(|i| command("a-user", "build", i, true))
            .collect(),
    );
    let batch_b = Value::Array((0..2).map(|i| command("b-user", "test", i, true)).collect());
    assert_eq!(
        post_events(&client, &ingest.url(), &a.ingest_key, &batch_a)
            .await
            .status(),
        202
    );
    assert_eq!(
        post_events(&client, &ingest.url(), &b.ingest_key, &batch_b)
            .await
            .status(),
        202
    );

    let got_a = take(&mut feed_a, 3).await;
    let got_b = take(&mut feed_b, 2).await;
    eprintln!(
        "live feed: 3 events seen {:?} after posting",
        sent_at.elapsed()
    );
    assert!(got_a
        .iter()
        .all(|(_, e)| e["user_id"] == "a-user" && e["type"] == "command.executed"));
    assert!(got_b.iter().all(|(_, e)| e["user_id"] == "b-user"));
    // Nothing more arrives on either (in particular nothing of the other tenant).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(feed_a.try_recv().is_err() && feed_b.try_recv().is_err());
    let ids: Vec<&str> = got_a
        .iter()
        .map(|(_, e)| e["event_id"].as_str().unwrap())
        .collect();
    let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 3, "{ids:?}");

    // After the burst comes the tenant's updated totals (its own events only).
    let totals = tokio::time::timeout(Duration::from_secs(10), totals_a.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            totals["events_24h"].as_i64(),
            totals["commands_24h"].as_i64()
        ),
        (Some(3), Some(3)),
        "{totals}"
    );

    // Reconnecting after the first event resumes with the other two.
    let (mut again, _) = listen(&query.url(), &a.read_key, Some(&got_a[0].0)).await;
    let resumed = take(&mut again, 2).await;
    let resumed_ids: Vec<&str> = resumed
        .iter()
        .map(|(_, e)| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(resumed_ids, ids[1..].to_vec());

    // Unauthenticated or with an ingest key: refused before streaming.
    let res = client
        .get(format!("{}/v1/stream", query.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .get(format!("{}/v1/stream", query.url()))
        .bearer_auth(&a.ingest_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    drop((feed_a, feed_b, again));
    projector.stop().await.unwrap();
    ingest.stop().await.unwrap();
    query.stop().await.unwrap();
}
