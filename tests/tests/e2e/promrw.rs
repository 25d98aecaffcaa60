//! Prometheus remote write 1.0 from the real thing: Debian's `prometheus` in agent mode
//! scrapes itself and remote-writes to ingest-api; its metrics show up in query-api's series
//! endpoint. Garbage, truncated snappy, a decompression bomb, bad label names and wrong
//! content types get a 4xx, never a 5xx; remote write 2.0 gets 415. Bodies that would expand
//! into gigabytes, as events or as the decoded message, are refused in bounded memory.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ingest_api::formats::promrw::{Label, Sample, TimeSeries, WriteRequest};
use prost::Message;
use tally_tests::*;

fn snappy(req: &WriteRequest) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(&req.encode_to_vec())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_agent_remote_writes_its_own_metrics() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let t = create_tenant(&pool, "prometheus").await;

    let dir = std::env::temp_dir().join(format!("tally-prom-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let config = format!(
        "global:\n  scrape_interval: 1s\n\
         scrape_configs:\n  - job_name: self\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n\
         remote_write:\n  - url: {}/api/v1/write\n    authorization:\n      credentials: {}\n\
         \x20   queue_config:\n      batch_send_deadline: 1s\n",
        ingest.url(),
        t.ingest_key
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let _agent = Proc(
        Command::new("prometheus")
            .arg("--enable-feature=agent")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.agent.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is installed (deploy/local/test-clients.sh)"),
    );

    let client = http();
    let url = format!(
        "{}/v1/dashboard/metrics?range=1h&name=prometheus_build_info&agg=max&group_by=version",
        query.url()
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let m = get_json(&client, &url, &t.read_key).await;
        if series_total(&m) > 0.0 {
            // Its labels came along: grouped by the `version` label, the group is 2.42.0….
            let group = m["series"][0]["group"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            assert!(group.starts_with("2."), "{m}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no prometheus_build_info after 90 s; see {}",
            dir.join("prometheus.log").display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let up = get_json(
        &client,
        &format!(
            "{}/v1/dashboard/metrics?range=1h&name=up&labels=job=self&agg=max",
            query.url()
        ),
        &t.read_key,
    )
    .await;
    assert!(series_total(&up) >= 1.0, "{up}");

    // The sender's side: what a broken or hostile client gets.
    let write = format!("{}/api/v1/write", ingest.url());
    let post = |body: Vec<u8>, ct: &'static str, enc: &'static str| {
        let (client, write, key) = (client.clone(), write.clone(), t.ingest_key.clone());
        async move {
            client
                .post(&write)
                .bearer_auth(&key)
                .header("content-type", ct)
                .header("content-encoding", enc)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let proto = "application/x-protobuf";
    let good = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: vec![Label {
                name: "__name__".into(),
                value: "tally_test_gauge".into(),
            }],
            samples: vec![Sample {
                value: 7.0,
                timestamp: chrono::Utc::now().timestamp_millis(),
            }],
        }],
    };
    assert_eq!(post(snappy(&good), proto, "snappy").await, 204);
    assert_eq!(
        post(b"garbage, not snappy".to_vec(), proto, "snappy").await,
        400
    );
    let body = snappy(&good);
    assert_eq!(
        post(body[..body.len() - 3].to_vec(), proto, "snappy").await,
        400
    );
    // A snappy header claiming 4 GiB: refused before anything is allocated.
    assert_eq!(
        post(vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x00], proto, "snappy").await,
        413
    );
    // Valid snappy around a non-protobuf payload.
    let junk = snap::raw::Encoder::new().compress_vec(&[0xff; 64]).unwrap();
    assert_eq!(post(junk, proto, "snappy").await, 400);
    let mut bad_label = good.clone();
    bad_label.timeseries[0].labels.push(Label {
        name: "bad-name".into(),
        value: "x".into(),
    });
    assert_eq!(post(snappy(&bad_label), proto, "snappy").await, 400);
    assert_eq!(post(snappy(&good), "application/json", "snappy").await, 415);
    assert_eq!(post(good.encode_to_vec(), proto, "identity").await, 415);
    assert_eq!(
        post(
            snappy(&good),
            "application/x-protobuf;proto=io.prometheus.write.v2.Request",
            "snappy"
        )
        .await,
        415
    );
    let gauge = format!(
        "{}/v1/dashboard/metrics?range=1h&name=tally_test_gauge",
        query.url()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = get_json(&client, &gauge, &t.read_key).await;
        if series_total(&g) == 7.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{g}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    stop_all([ingest, projector, query]).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `WriteRequest` of one series of `n` empty labels: 2 bytes each on the wire, 48 decoded.
fn empty_labels(n: usize) -> Vec<u8> {
    let series = [0x0a, 0x00].repeat(n);
    let mut raw = vec![0x0a];
    prost::encode_length_delimiter(series.len(), &mut raw).unwrap();
    raw.extend(series);
    raw
}

/// Remote-write bombs: snappy bodies whose series' labels, repeated in every sample, would
/// make gigabytes of events, or whose decoded message would be 24 times the body. The real
/// ingest-api (its own process, so the figure is its own) refuses each before decoding it,
/// stays under `BOMB_RSS_BOUND_KIB`, and appends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_write_bombs_are_refused_in_bounded_memory() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, started_rss) = spawn_bomb_target(&common, &[]).await;
    let t = create_tenant(&pool, "promrw-bomb").await;
    let client = http();
    let url = format!("{}/api/v1/write", ingest.url);
    let send = |body: Vec<u8>| {
        status_and_json(
            client
                .post(&url)
                .bearer_auth(&t.ingest_key)
                .header("content-type", "application/x-protobuf")
                .header("content-encoding", "snappy")
                .body(body),
        )
    };
    let compress = |raw: &[u8]| snap::raw::Encoder::new().compress_vec(raw).unwrap();

    // One series, 8 labels of 64 KiB, 50 000 samples: 25 GiB of events.
    let mut labels = vec![Label {
        name: "__name__".into(),
        value: "bomb".into(),
    }];
    labels.extend((0..8).map(|i| Label {
        name: format!("l{i}"),
        value: "v".repeat(64 * 1024),
    }));
    let now = chrono::Utc::now().timestamp_millis();
    let large_labels = WriteRequest {
        timeseries: vec![TimeSeries {
            labels,
            samples: vec![
                Sample {
                    value: 1.0,
                    timestamp: now,
                };
                50_000
            ],
        }],
    };
    let body = snappy(&large_labels);
    assert!(body.len() < 128 * 1024, "{} bytes", body.len());
    let too_many_events = |(status, problem): (u16, serde_json::Value)| {
        assert_eq!(status, 413, "{problem}");
        let reason = problem["errors"][0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("MiB of events"), "{problem}");
    };
    too_many_events(send(body).await);

    // One series, 64 labels of one character, 50 000 samples: 3.2 million label entries.
    let mut labels = vec![Label {
        name: "__name__".into(),
        value: "tiny".into(),
    }];
    labels.extend((0..63).map(|i| Label {
        name: format!("l{i}"),
        value: "v".into(),
    }));
    let tiny_labels = WriteRequest {
        timeseries: vec![TimeSeries {
            labels,
            samples: large_labels.timeseries[0].samples.clone(),
        }],
    };
    too_many_events(send(snappy(&tiny_labels)).await);

    // Five million empty series (10 MB decoded as 240 MB): too many series.
    let (status, problem) = send(compress(&[0x0a, 0x00].repeat(5_000_000))).await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "timeseries", "{problem}");

    // One series of five million empty labels: refused by name, before it is decoded.
    let (status, problem) = send(compress(&empty_labels(5_000_000))).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(
        problem["errors"][0]["field"], "timeseries[0].labels",
        "{problem}"
    );

    // Still serving: a good sample is taken, and it is the only record in the log.
    let good = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: vec![Label {
                name: "__name__".into(),
                value: "after".into(),
            }],
            samples: vec![Sample {
                value: 1.0,
                timestamp: now,
            }],
        }],
    };
    let (status, problem) = send(snappy(&good)).await;
    assert_eq!(status, 204, "{problem}");
    assert_eq!(metrics_topic_records(&common).await, 1);
    assert_bomb_memory_bound(&ingest, started_rss);
}
