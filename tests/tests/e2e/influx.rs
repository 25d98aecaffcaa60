//! InfluxDB line protocol sent with curl: good lines are accepted one by one, the bad line is
//! reported by number, and the samples are visible through query-api's metric series.

use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use tally_tests::*;

/// POSTs `body` with curl; returns the status and the body.
fn curl(url: &str, key: &str, body: &str, content_type: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "-X", "POST", url])
        .args(["-H", &format!("Authorization: Token {key}")])
        .args(["-H", &format!("Content-Type: {content_type}")])
        .args(["--data-binary", body])
        .output()
        .expect("run curl");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn line_protocol_is_taken_line_by_line() {
    init_logs();
    let pool = test_pool().await;
    let common = common_for_test();
    let ingest = start_ingest(&common, |_| {}).await;
    let projector = start_projector(&common).await;
    let query = start_query(&common, |_| {}).await;
    let t = create_tenant(&pool, "influx").await;

    let now = Utc::now().timestamp_millis();
    let body = format!(
        "build_time,host=ci-1,repo=tally seconds=12.5,ok=t {a}\n\
         build_time,host=ci-2,repo=tally seconds=7.5 {b}\n\
         build_time,host=ci-3 seconds=oops {b}\n\
         \n\
         queue_depth value=3i {b}\n",
        a = now - 60_000,
        b = now - 30_000
    );
    let url = format!("{}/api/v2/write?org=x&bucket=y&precision=ms", ingest.url());
    let (status, answer) = curl(&url, &t.ingest_key, &body, "text/plain; charset=utf-8");
    assert_eq!(status, 400, "{answer}");
    let problem: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(problem["errors"].as_array().unwrap().len(), 1, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "line 3");
    assert!(
        problem["errors"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("oops"),
        "{problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("3 line(s) accepted"),
        "{problem}"
    );

    // All good: 204. Wrong content type, bad precision, no key: 4xx.
    let (status, _) = curl(
        &url,
        &t.ingest_key,
        &format!("queue_depth value=5i {now}"),
        "text/plain",
    );
    assert_eq!(status, 204);
    let (status, _) = curl(&url, &t.ingest_key, "m v=1", "application/json");
    assert_eq!(status, 415);
    let bad_precision = format!("{}/api/v2/write?precision=h", ingest.url());
    let (status, answer) = curl(&bad_precision, &t.ingest_key, "m v=1", "text/plain");
    assert_eq!(status, 400, "{answer}");
    let (status, _) = curl(&url, "tly_not_a_key", "m v=1", "text/plain");
    assert_eq!(status, 401);

    // 2 + 1 (ok) + 1 + 1 samples.
    wait_projected(&pool, t.id, 5, Duration::from_secs(60)).await;
    let client = http();
    let series = |q: &str| {
        let url = format!("{}/v1/dashboard/metrics?range=1h&{q}", query.url());
        let (client, key) = (client.clone(), t.read_key.clone());
        async move { get_json(&client, &url, &key).await }
    };
    let total = series_total;
    assert_eq!(total(&series("name=build_time_seconds").await), 20.0);
    assert_eq!(
        total(&series("name=build_time_seconds&labels=host=ci-2").await),
        7.5
    );
    assert_eq!(total(&series("name=build_time_ok").await), 1.0);
    assert_eq!(total(&series("name=queue_depth").await), 8.0);

    ingest.stop().await.unwrap();
    projector.stop().await.unwrap();
    query.stop().await.unwrap();
}
