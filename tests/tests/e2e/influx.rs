//! InfluxDB line protocol sent with curl: good lines are accepted one by one, the bad line is
//! reported by number, and the samples are visible through query-api's metric series. Bodies
//! that would expand into too many samples are refused whole, in bounded memory.

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
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let t = create_tenant(&pool, "influx").await;

    let now = Utc::now().timestamp_millis();
    let body = format!(
        "build_time,host=ci-1,repo=tally seconds=12.5,ok=t {a}\n\
         build_time,host=ci-2,repo=tally seconds=7.5 {b}\n\
         build_time,host=ci-3 seconds=oops {b}\n\
         \n\
         queue_depth value=3i {b}\n\
         build_time,$serde_json::private::RawValue=x seconds=1 {b}\n",
        a = now - 60_000,
        b = now - 30_000
    );
    let url = format!("{}/api/v2/write?org=x&bucket=y&precision=ms", ingest.url());
    let (status, answer) = curl(&url, &t.ingest_key, &body, "text/plain; charset=utf-8");
    assert_eq!(status, 400, "{answer}");
    let problem: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "line 3");
    // A tag key the log's reader would take for its own (it would read the value as JSON).
    assert_eq!(problem["errors"][1]["field"], "line 6");
    assert!(
        problem["errors"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("reserves"),
        "{problem}"
    );
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

    stop_all([ingest, projector, query]).await;
}

/// Line-protocol bombs: a few KB of gzip whose lines' tags, repeated in every field's
/// sample, would make gigabytes of events. The real ingest-api (its own process, so the
/// figure is its own) refuses each with a 413 naming the limit, stays under
/// `BOMB_RSS_BOUND_KIB`, and appends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn line_protocol_bombs_are_refused_in_bounded_memory() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, started_rss) = spawn_bomb_target(&common, &[]).await;
    let t = create_tenant(&pool, "influx-bomb").await;
    let client = http();
    let url = format!("{}/api/v2/write?precision=ms", ingest.url);
    let send = |body: Vec<u8>| {
        status_and_json(
            client
                .post(&url)
                .header("authorization", format!("Token {}", t.ingest_key))
                .header("content-type", "text/plain")
                .header("content-encoding", "gzip")
                .body(body),
        )
    };

    // One line: 60 tags of 64 KiB, each repeated by 2 000 fields: 7.5 GiB of samples.
    let tags: String = (0..60)
        .map(|i| format!(",t{i}={}", "v".repeat(64 * 1024)))
        .collect();
    let one_line = format!("bomb{tags} {}", vec!["f=1"; 2_000].join(","));
    // 5 000 lines of 6 tags of 256 bytes and 10 fields each: 88 MiB, every line small.
    let small_tags: String = (0..6)
        .map(|i| format!(",t{i}={}", "v".repeat(256)))
        .collect();
    let many_lines = format!("bomb{small_tags} {}\n", ["f=1"; 10].join(",")).repeat(5_000);
    // A million fields on one line.
    let many_fields = format!("bomb {}", vec!["f=1"; 1_000_000].join(","));
    // 64 tags of one character each, repeated by 50 000 fields: 25 MB of samples' text, but
    // 3.2 million label entries, about 400 MiB while they are built.
    let tiny_tags: String = (0..64).map(|i| format!(",t{i}=v")).collect();
    let tiny = format!("bomb{tiny_tags} {}", vec!["f=1"; 50_000].join(","));
    for (what, text) in [
        ("large tags", one_line),
        ("many lines", many_lines),
        ("many fields", many_fields),
        ("many tiny tags", tiny),
    ] {
        let body = gzip(&text);
        assert!(body.len() < 64 * 1024, "{what}: {} bytes", body.len());
        let (status, problem) = send(body).await;
        assert_eq!(status, 413, "{what}: {problem}");
        assert_eq!(problem["errors"][0]["field"], "body", "{what}: {problem}");
        let reason = problem["errors"][0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("MiB of events") || reason.contains("fields"),
            "{what}: {problem}"
        );
    }

    // Still serving: a good line is taken, and it is the only record in the log.
    let now = Utc::now().timestamp_millis();
    let (status, problem) = send(gzip(format!("after,host=a value=1 {now}"))).await;
    assert_eq!(status, 204, "{problem}");
    assert_eq!(metrics_topic_records(&common).await, 1);
    assert_bomb_memory_bound(&ingest, started_rss);
}
