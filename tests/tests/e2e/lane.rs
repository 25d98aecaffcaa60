//! The large-body lane (`ingest_api::ingest::lane`) from the outside: a real ingest-api that
//! sends every body to the lane (`lane_min_bytes` = 1) answers at each door as it does on the
//! runtime's threads, appends exactly what it took, and runs the lane below the runtime's
//! priority.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use serde_json::{json, Value};
use tally_tests::events::token_points;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_door_answers_the_same_from_the_large_body_lane() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = spawn_ingest_process(&common, &[("TALLY_LANE_MIN_BYTES", "1")]).await;
    let t = create_tenant(&pool, "lane").await;
    let client = http();
    let key = t.ingest_key.as_str();
    let url = |path: &str| format!("{}{path}", ingest.url);
    let events = |body: Vec<u8>, gzipped: bool| {
        let req = client
            .post(url("/v1/events"))
            .header("x-api-key", key)
            .header("content-type", "application/json");
        let req = if gzipped {
            req.header("content-encoding", "gzip")
        } else {
            req
        };
        status_and_json(req.body(body))
    };
    let at = ago(60);
    let sample = |name: &str| json!({"type": "metric.sample", "occurred_at": at, "data": {"name": name, "value": 1}});
    let json = |v: Value| serde_json::to_vec(&v).unwrap();
    // What each answer must be, and how many events each appends.
    let (mut bodies, mut appended) = (0, 0);

    // Events, plain and gzip, are taken whole.
    let (status, answer) = events(json(json!([sample("a"), sample("b")])), false).await;
    assert_eq!(
        (status, answer["accepted"].as_i64()),
        (202, Some(2)),
        "{answer}"
    );
    let (status, answer) = events(
        gzip(json(json!([sample("c"), sample("d"), sample("e")]))),
        true,
    )
    .await;
    assert_eq!(
        (status, answer["accepted"].as_i64()),
        (202, Some(3)),
        "{answer}"
    );
    (bodies, appended) = (bodies + 2, appended + 5);

    // Refused from the lane as from anywhere: an invalid event named by its index, a body that
    // is not JSON, a gzip body broken after its start, one that inflates past the limit.
    let (status, problem) =
        events(json(json!([sample("f"), {"type": "metric.sample"}])), false).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["index"], 1, "{problem}");
    let (status, problem) = events(b"[{\"type\": ".to_vec(), false).await;
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("malformed-json"),
        "{problem}"
    );
    let many: Vec<Value> = (0..2_000).map(|i| sample(&format!("m{i}"))).collect();
    let mut broken = gzip(json(Value::Array(many)));
    broken.truncate(broken.len() / 2);
    let (status, problem) = events(broken, true).await;
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem["type"].as_str().unwrap().ends_with("bad-encoding"),
        "{problem}"
    );
    let (status, problem) = events(gzip(vec![b' '; 11 << 20]), true).await;
    assert_eq!(status, 413, "{problem}");
    bodies += 4;

    // OTLP, remote write and line protocol.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let points = token_points(4, 0, chrono::Duration::minutes(1), now);
    let res = client
        .post(url("/v1/otlp/v1/metrics"))
        .bearer_auth(key)
        .header("content-type", "application/x-protobuf")
        .body(points.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    (bodies, appended) = (bodies + 1, appended + 4);

    use ingest_api::formats::promrw::{Label, Sample, TimeSeries, WriteRequest};
    let ms = (now / 1_000_000) as i64;
    let write = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: vec![Label {
                name: "__name__".into(),
                value: "lane_remote_write".into(),
            }],
            samples: vec![
                Sample {
                    value: 1.0,
                    timestamp: ms - 1_000,
                },
                Sample {
                    value: 2.0,
                    timestamp: ms,
                },
            ],
        }],
    };
    let res = client
        .post(url("/api/v1/write"))
        .bearer_auth(key)
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "snappy")
        .body(
            snap::raw::Encoder::new()
                .compress_vec(&write.encode_to_vec())
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    (bodies, appended) = (bodies + 1, appended + 2);

    let lines = format!("lane_lines value=1 {ms}\nlane_lines value= {ms}\n");
    let (status, problem) = status_and_json(
        client
            .post(url("/api/v2/write?precision=ms"))
            .header("authorization", format!("Token {key}"))
            .body(lines),
    )
    .await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "line 2", "{problem}");
    (bodies, appended) = (bodies + 1, appended + 1);

    // Exactly what was taken is in the log, and every body went through the lane.
    assert_eq!(metrics_topic_records(&common).await, appended);
    let scraped = scrape_metrics(&client, &ingest.url).await;
    let counted = scraped
        .lines()
        .find_map(|l| l.strip_prefix("ingest_lane_bodies_total "))
        .unwrap_or_else(|| panic!("no ingest_lane_bodies_total in {scraped}"));
    assert_eq!(counted.trim(), bodies.to_string());

    // The lane's thread runs ten nice levels below the process's main thread.
    let pid = ingest.proc.id();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let nice = |stat: &str| -> i64 {
        // Field 19 of stat; the fields after the name (in parentheses) start at field 3.
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        after_name
            .split_whitespace()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap()
    };
    let main = nice(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap());
    let lane: Vec<i64> = tasks
        .filter_map(|task| {
            let dir = task.unwrap().path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            (name.trim() == "large-body-0")
                .then(|| nice(&std::fs::read_to_string(dir.join("stat")).unwrap()))
        })
        .collect();
    assert_eq!(lane, [(main + 10).min(19)]);
}
