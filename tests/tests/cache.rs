//! A cached dashboard answer is found under the watermark the projector announced in Redis:
//! serving it opens no PostgreSQL transaction, and it is never older than the projection.
//!
//! Its own test binary, so that it runs alone: `query_tenant_reads_total` counts the reads of
//! every query-api in the process, and the end-to-end tests run many at once.

use std::time::Duration;

use serde_json::Value;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_hits_open_no_transaction_and_never_serve_older_than_the_projection() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "cache").await;
    let batch = Value::Array((0..5).map(|i| command("u", "build", i, true)).collect());
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch).await;
    wait_projected(&pool, t.id, 5, Duration::from_secs(60)).await;

    let url = format!("{}/v1/dashboard/overview?range=24h", query.url());
    let get = || async {
        client
            .get(&url)
            .bearer_auth(&t.read_key)
            .send()
            .await
            .unwrap()
    };
    let first = get().await;
    let second = get().await;
    assert_eq!(
        second.headers()["x-cache"],
        "hit",
        "first was {:?}",
        first.headers().get("x-cache")
    );
    let tenant_reads = || async {
        let text = scrape_metrics(&client, &query.url()).await;
        text.lines()
            .find(|l| l.starts_with("query_tenant_reads_total"))
            .and_then(|l| l.rsplit(' ').next())
            .expect("query_tenant_reads_total on query-api's /metrics")
            .parse::<f64>()
            .unwrap()
    };
    let before = tenant_reads().await;
    assert!(before >= 1.0, "the miss above read the projection");
    for _ in 0..20 {
        assert_eq!(get().await.headers()["x-cache"], "hit");
    }
    assert_eq!(
        tenant_reads().await,
        before,
        "cache hits opened transactions"
    );

    post_events_accepted(
        &client,
        &ingest.url(),
        &t.ingest_key,
        &Value::Array(vec![command("u", "build", 5, true)]),
    )
    .await;
    wait_projected(&pool, t.id, 6, Duration::from_secs(30)).await;
    let after = get_json(&client, &url, &t.read_key).await;
    assert_eq!(
        after["events_total"], 6,
        "cache never serves older than the projection"
    );
    stop_all([projector, ingest, query]).await;
}
