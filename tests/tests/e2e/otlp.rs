//! OTLP from the real thing: the Python OpenTelemetry SDK with its OTLP exporters
//! (`tests/clients/claude_code_otel.py`) sends Claude-Code-shaped metrics and events, as
//! gzipped HTTP/protobuf, as HTTP/JSON and over gRPC, each to its own tenant. All arrive
//! complete: the dashboards show every tool run, API request, token and cent the script sent. Then the
//! sender's side: resends are counted once, refused points come back as `partial_success`,
//! and garbage, bombs and wrong content types get a 4xx, never a 5xx.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use ingest_api::formats::otlp::pb;
use prost::Message;
use serde_json::{json, Value};
use tally_tests::*;

/// Runs the SDK script; its exit status, what it printed, and its log.
async fn run_sdk(endpoint: &str, key: &str, encoding: &str, gzip: bool) -> (bool, String, String) {
    let mut cmd = Command::new(otel_python());
    cmd.arg(repo_root().join("tests/clients/claude_code_otel.py"))
        .args(["--endpoint", endpoint, "--key", key])
        .args(["--encoding", encoding, "--sessions", "3"]);
    if gzip {
        cmd.arg("--gzip");
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("the OTel virtualenv exists (deploy/local/test-clients.sh)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn send_with_sdk(endpoint: &str, key: &str, encoding: &str, gzip: bool) -> Value {
    let (ok, stdout, stderr) = run_sdk(endpoint, key, encoding, gzip).await;
    assert!(ok, "the SDK script failed: {stderr}");
    // The exporters log every failed or partial export; none may happen.
    assert!(
        !stderr.contains("Failed to export") && !stderr.to_lowercase().contains("partial"),
        "{stderr}"
    );
    serde_json::from_str(&stdout).expect("the script prints what it sent")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-6 * b.abs().max(1.0)
}

/// Waits until the tenant's dashboards show everything `sent` says, then checks each figure.
async fn assert_dashboards_show(client: &reqwest::Client, query: &str, key: &str, sent: &Value) {
    let overview_url = format!("{query}/v1/dashboard/overview?range=1h");
    let deadline = Instant::now() + Duration::from_secs(60);
    let o = loop {
        let o = get_json(client, &overview_url, key).await;
        if o["tools"]["count"] == sent["tools"]
            && o["agents"]["count"] == sent["agents"]
            && o["sessions"] == sent["sessions"]
        {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "not all events arrived: {o}\nsent: {sent}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(o["tools"]["errors"], sent["tool_errors"], "{o}");
    assert_eq!(o["agents"]["errors"], sent["agent_errors"], "{o}");
    assert_eq!(o["tokens"]["input"], sent["input_tokens"], "{o}");
    assert_eq!(o["tokens"]["output"], sent["output_tokens"], "{o}");
    assert!(
        close(
            o["cost_usd"].as_f64().unwrap(),
            sent["cost_usd"].as_f64().unwrap()
        ),
        "{o}"
    );
    // Three sessions by two users: the session count started each one.
    assert_eq!(o["active_users"], 2, "{o}");

    let metric = |name: &str, extra: &str| {
        format!("{query}/v1/dashboard/metrics?range=1h&step=1h&agg=sum&name={name}{extra}")
    };
    for (name, total) in sent["metrics"].as_object().unwrap() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let m = get_json(client, &metric(name, ""), key).await;
            let got = series_total(&m);
            if close(got, total.as_f64().unwrap()) {
                break;
            }
            assert!(Instant::now() < deadline, "{name}: {got} of {total}: {m}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // The attributes are labels: tokens by type, as Claude Code's own dashboards split them.
    let by_type = get_json(
        client,
        &metric("claude_code.token.usage", "&group_by=type"),
        key,
    )
    .await;
    for (kind, total) in sent["tokens_by_type"].as_object().unwrap() {
        let series = by_type["series"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["group"] == kind.as_str())
            .unwrap_or_else(|| panic!("no {kind} series: {by_type}"));
        let got: f64 = series["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p[1].as_f64().unwrap())
            .sum();
        assert!(close(got, total.as_f64().unwrap()), "{kind}: {by_type}");
    }
    // Events without a typed counterpart are counted under their own name.
    let prompts = get_json(client, &metric("claude_code.user_prompt", ""), key).await;
    assert!(
        close(series_total(&prompts), sent["prompts"].as_f64().unwrap()),
        "{prompts}"
    );
    // The typed events are on the tools table, by name: every session ran Edit, Bash (which
    // failed) and Read once.
    let top = get_json(
        client,
        &format!("{query}/v1/dashboard/top?range=1h&dimension=tool"),
        key,
    )
    .await;
    let mut tools: Vec<(String, i64, f64)> = top["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let key = i["key"].as_str().unwrap().to_string();
            (
                key,
                i["count"].as_i64().unwrap(),
                i["error_rate"].as_f64().unwrap(),
            )
        })
        .collect();
    tools.sort_by(|a, b| a.0.cmp(&b.0));
    let sessions = sent["sessions"].as_i64().unwrap();
    assert_eq!(
        tools,
        [
            ("Bash".to_string(), sessions, 1.0),
            ("Edit".to_string(), sessions, 0.0),
            ("Read".to_string(), sessions, 0.0)
        ],
        "{top}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_sdk_telemetry_arrives_complete_over_http_protobuf_json_and_grpc() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, _projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();

    let proto = create_tenant(&pool, "otlp-protobuf").await;
    let json_tenant = create_tenant(&pool, "otlp-json").await;
    let grpc_tenant = create_tenant(&pool, "otlp-grpc").await;
    let http_endpoint = format!("{}/v1/otlp", ingest.url());
    let grpc_endpoint = format!("http://{}", ingest.grpc_addr.expect("gRPC is on"));
    let sent_proto = send_with_sdk(&http_endpoint, &proto.ingest_key, "protobuf", true).await;
    let sent_json = send_with_sdk(&http_endpoint, &json_tenant.ingest_key, "json", false).await;
    let sent_grpc = send_with_sdk(&grpc_endpoint, &grpc_tenant.ingest_key, "grpc", true).await;
    assert_eq!(
        sent_proto, sent_json,
        "the script sends the same data every way"
    );
    assert_eq!(
        sent_proto, sent_grpc,
        "the script sends the same data every way"
    );
    assert_dashboards_show(&client, &query.url(), &proto.read_key, &sent_proto).await;
    assert_dashboards_show(&client, &query.url(), &json_tenant.read_key, &sent_json).await;
    assert_dashboards_show(&client, &query.url(), &grpc_tenant.read_key, &sent_grpc).await;

    // Over gRPC, a wrong key is UNAUTHENTICATED, and a read key may not write.
    for (key, code) in [
        (format!("{}x", grpc_tenant.ingest_key), "UNAUTHENTICATED"),
        (grpc_tenant.read_key.clone(), "PERMISSION_DENIED"),
    ] {
        let (_, _, stderr) = run_sdk(&grpc_endpoint, &key, "grpc", false).await;
        assert!(stderr.contains(code), "{code}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_senders_get_the_answers_they_rely_on() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, _projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let t = create_tenant(&pool, "otlp-edges").await;
    let client = http();
    let metrics_url = format!("{}/v1/otlp/v1/metrics", ingest.url());
    let logs_url = format!("{}/v1/otlp/v1/logs", ingest.url());
    let post = |url: &str, body: Vec<u8>, ct: &str, enc: Option<&str>| {
        let mut req = client
            .post(url)
            .bearer_auth(&t.ingest_key)
            .header("content-type", ct)
            .body(body);
        if let Some(enc) = enc {
            req = req.header("content-encoding", enc);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let ct = res
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (status, ct, res.bytes().await.unwrap().to_vec())
        }
    };
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let gauge = |name: &str, value: Value| {
        json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": name,
            "gauge": {"dataPoints": [{"timeUnixNano": now_ns.to_string(), "asDouble": value,
                                      "attributes": [{"key": "k", "value": {"stringValue": "v"}}]}]}}]}]}]})
    };
    let json_ct = "application/json";

    // A resend of the same request (as an exporter does after a 503) is counted once.
    let once = serde_json::to_vec(&gauge("tally.resent", json!(5))).unwrap();
    for _ in 0..3 {
        let (status, ct, body) = post(&metrics_url, once.clone(), json_ct, None).await;
        assert_eq!((status, ct.as_str()), (200, json_ct));
        assert_eq!(body, b"{}");
    }
    // Partial success: one good point, one without a value.
    let mut partial = gauge("tally.partial", json!(2));
    partial["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["gauge"]["dataPoints"]
        .as_array_mut()
        .unwrap()
        .push(json!({"timeUnixNano": now_ns.to_string()}));
    let (status, _, body) = post(
        &metrics_url,
        serde_json::to_vec(&partial).unwrap(),
        json_ct,
        None,
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer["partialSuccess"]["rejectedDataPoints"], "1",
        "{answer}"
    );
    assert!(answer["partialSuccess"]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("dataPoints[1]"));
    // The same in protobuf, gzipped: the answer is a protobuf ExportMetricsServiceResponse.
    let req = ingest_api::formats::otlp::decode::<ingest_api::formats::otlp::Metrics>(
        &serde_json::to_vec(&partial).unwrap(),
        ingest_api::formats::otlp::Encoding::Json,
    )
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&req.encode_to_vec()).unwrap();
    let (status, ct, body) = post(
        &metrics_url,
        gz.finish().unwrap(),
        "application/x-protobuf",
        Some("gzip"),
    )
    .await;
    assert_eq!((status, ct.as_str()), (200, "application/x-protobuf"));
    let answer = pb::ExportMetricsServiceResponse::decode(body.as_slice()).unwrap();
    assert_eq!(answer.partial_success.unwrap().rejected_data_points, 1);

    let m = format!(
        "{}/v1/dashboard/metrics?range=1h&step=1h&agg=count&name=",
        query.url()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let resent =
            series_total(&get_json(&client, &format!("{m}tally.resent"), &t.read_key).await);
        let partial =
            series_total(&get_json(&client, &format!("{m}tally.partial"), &t.read_key).await);
        // tally.partial was sent twice (JSON, then protobuf): the same point, so once.
        if resent >= 1.0 && partial >= 1.0 {
            assert_eq!((resent, partial), (1.0, 1.0), "resends were counted once");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "resent {resent}, partial {partial}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // What a broken or hostile sender gets: a 4xx with a problem, never a 5xx.
    let problem = |status: u16, body: &[u8]| -> Value {
        serde_json::from_slice(body)
            .unwrap_or_else(|_| panic!("{status}: {}", String::from_utf8_lossy(body)))
    };
    // (endpoint, body, content type, content encoding, expected status)
    type Case<'a> = (&'a str, Vec<u8>, &'a str, Option<&'a str>, u16);
    let cases: Vec<Case> = vec![
        (
            &metrics_url,
            b"\xff\xff\xff garbage".to_vec(),
            "application/x-protobuf",
            None,
            400,
        ),
        (
            &logs_url,
            b"\x0a\xff\xff\xff\x0f".to_vec(),
            "application/x-protobuf",
            None,
            400,
        ),
        (
            &metrics_url,
            b"{\"resourceMetrics\": [".to_vec(),
            json_ct,
            None,
            400,
        ),
        (
            &metrics_url,
            br#"{"resourceMetrics": [{"scopeMetrics": {"x": 1}}]}"#.to_vec(),
            json_ct,
            None,
            400,
        ),
        (
            &metrics_url,
            serde_json::to_vec(&gauge("x", json!("lots"))).unwrap(),
            json_ct,
            None,
            400,
        ),
        (&metrics_url, b"x 1".to_vec(), "text/plain", None, 415),
        (&metrics_url, b"{}".to_vec(), json_ct, Some("br"), 415),
        (
            &metrics_url,
            b"not gzip".to_vec(),
            json_ct,
            Some("gzip"),
            400,
        ),
    ];
    for (url, body, ct, enc, want) in cases {
        let (status, ct_back, body) = post(url, body, ct, enc).await;
        assert_eq!(status, want, "{}", String::from_utf8_lossy(&body));
        assert_eq!(ct_back, "application/problem+json");
        let p = problem(status, &body);
        assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()), "{p}");
    }
    // The JSON error names the field.
    let (_, _, body) = post(
        &metrics_url,
        serde_json::to_vec(&gauge("x", json!("lots"))).unwrap(),
        json_ct,
        None,
    )
    .await;
    assert!(
        problem(400, &body)["detail"]
            .as_str()
            .unwrap()
            .contains("dataPoints[0].asDouble"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    // Every point refused: a 400 listing them.
    let (status, _, body) = post(
        &metrics_url,
        br#"{"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "x", "gauge": {"dataPoints": [{"asInt": "1"}]}}]}]}]}"#.to_vec(),
        json_ct,
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        problem(status, &body)["errors"][0]["field"],
        "resourceMetrics[0].scopeMetrics[0].metrics[0].dataPoints[0]"
    );
    // A gzip bomb (64 MiB of zeros in ~64 KiB): refused once the limit is passed.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![0u8; 64 << 20]).unwrap();
    let (status, _, body) = post(
        &metrics_url,
        gz.finish().unwrap(),
        "application/x-protobuf",
        Some("gzip"),
    )
    .await;
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    // No key, a read key, a forged key: refused before anything is read.
    let anonymous = client
        .post(&metrics_url)
        .header("content-type", json_ct)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    for key in [&t.read_key, &format!("{}x", t.ingest_key)] {
        let res = client
            .post(&logs_url)
            .bearer_auth(key)
            .header("content-type", json_ct)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert!(
            matches!(res.status().as_u16(), 401 | 403),
            "{}",
            res.status()
        );
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// As below, with every message read where it is, and with every message read in the
/// large-body lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_grpc_refuses_garbage_and_bombs_with_the_right_codes() {
    let TestEnv { pool, common } = test_env().await;
    for lane_min_bytes in [ingest_api::Config::default().lane_min_bytes, 1] {
        grpc_edges(&pool, &common, lane_min_bytes).await;
    }
}

async fn grpc_edges(pool: &sqlx::PgPool, common: &shared::config::Common, lane_min_bytes: usize) {
    let ingest = start_ingest(common, |c| c.lane_min_bytes = lane_min_bytes).await;
    let t = create_tenant(pool, "otlp-grpc-edges").await;
    let target = ingest.grpc_addr.expect("gRPC is on").to_string();
    let key = &t.ingest_key;

    // An empty request is valid: an empty answer.
    assert_eq!(grpc_raw(&target, key, &["--hex", ""]).await, "OK");
    // One good point and one without a value: partial success, in protobuf.
    let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap() as u64;
    let point = |value| pb::NumberDataPoint {
        time_unix_nano: now_ns,
        value,
        ..Default::default()
    };
    let req = pb::ExportMetricsServiceRequest {
        resource_metrics: vec![pb::ResourceMetrics {
            resource: None,
            scope_metrics: vec![pb::ScopeMetrics {
                scope: None,
                metrics: vec![pb::Metric {
                    name: "tally.grpc".into(),
                    data: Some(pb::metric::Data::Gauge(pb::Gauge {
                        data_points: vec![
                            point(Some(pb::number_data_point::Value::AsInt(3))),
                            point(None),
                        ],
                    })),
                    ..Default::default()
                }],
            }],
        }],
    };
    let answer = grpc_raw(
        &target,
        key,
        &["--hex", &to_hex(&req.encode_to_vec()), "--gzip"],
    )
    .await;
    let hex = answer
        .strip_prefix("OK ")
        .unwrap_or_else(|| panic!("{answer}"));
    let answer = pb::ExportMetricsServiceResponse::decode(from_hex(hex).as_slice()).unwrap();
    let partial = answer.partial_success.expect("a partial success");
    assert_eq!(partial.rejected_data_points, 1);
    assert!(
        partial.error_message.contains("dataPoints[1]"),
        "{partial:?}"
    );

    // Valid protobuf, but its one point has no time: every point refused.
    let mut timeless = req.clone();
    if let Some(pb::metric::Data::Gauge(g)) =
        &mut timeless.resource_metrics[0].scope_metrics[0].metrics[0].data
    {
        g.data_points.truncate(1);
        g.data_points[0].time_unix_nano = 0;
    }
    let timeless = to_hex(&timeless.encode_to_vec());
    let cases: [(&[&str], &str); 6] = [
        // Not protobuf: the sender's fault, not a server error.
        (&["--hex", "ffffffff"], "INVALID_ARGUMENT"),
        (
            &["--signal", "logs", "--hex", "0affffffff0f"],
            "INVALID_ARGUMENT",
        ),
        // 64 MiB of zeros, gzipped to a few dozen KiB: refused once inflated past 10 MiB.
        (&["--zeros", "67108864", "--gzip"], "RESOURCE_EXHAUSTED"),
        // 11 MiB as sent.
        (&["--zeros", "11534336"], "RESOURCE_EXHAUSTED"),
        (&["--hex", &timeless], "INVALID_ARGUMENT"),
        // An empty resource: nothing to take, nothing refused.
        (&["--hex", "0a00", "--signal", "logs"], "OK"),
    ];
    for (args, want) in cases {
        let got = grpc_raw(&target, key, args).await;
        assert!(got.starts_with(want), "{args:?}: {got}");
    }
    assert!(grpc_raw(&target, &t.read_key, &["--hex", ""])
        .await
        .starts_with("PERMISSION_DENIED"));
    // The key is checked before the body is read: a bomb without a valid key is not inflated.
    let got = grpc_raw(&target, "tly_forged", &["--zeros", "67108864", "--gzip"]).await;
    assert!(got.starts_with("UNAUTHENTICATED"), "{got}");
}

/// `inner` as a field of each message around it: their field keys, innermost first.
fn wrap(mut inner: Vec<u8>, keys: &[u8]) -> Vec<u8> {
    for &key in keys {
        let mut outer = vec![key];
        prost::encode_length_delimiter(inner.len(), &mut outer).unwrap();
        outer.extend(&inner);
        inner = outer;
    }
    inner
}

/// The attacker's side of OTLP decoding: gzip bombs of empty attributes (2 bytes each on the
/// wire, about 60 once decoded) and of empty JSON objects, each about 10 KB as sent and just
/// under the 10 MiB body limit once inflated, over HTTP (protobuf, JSON) and gRPC. Each is
/// refused as too many (413; `INVALID_ARGUMENT` over gRPC) while ingest-api's resident memory
/// stays under `BOMB_RSS_BOUND_KIB`, and nothing is appended; and a resource's attributes
/// copied into every log record, weighed by what the copies hold: refused over 7 500 records
/// (before, taken, and ingest-api passed 384 MiB), taken over 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn otlp_attribute_bombs_are_refused_in_bounded_memory() {
    let TestEnv { pool, common } = test_env().await;
    let grpc_addr = format!("127.0.0.1:{}", free_port());
    let (ingest, started_rss) =
        spawn_bomb_target(&common, &[("TALLY_GRPC_ADDR", &grpc_addr)]).await;
    let t = create_tenant(&pool, "otlp-bomb").await;
    let client = http();
    let send = |signal: &str, ct: &str, body: Vec<u8>| {
        status_and_json(
            client
                .post(format!("{}/v1/otlp/v1/{signal}", ingest.url))
                .bearer_auth(&t.ingest_key)
                .header("content-type", ct)
                .header("content-encoding", "gzip")
                .body(body),
        )
    };
    let too_many = |(status, problem): (u16, Value), what: &str| {
        assert_eq!(status, 413, "{what}: {problem}");
        assert_eq!(
            problem["type"], "https://tally.dev/problems/too-many-points",
            "{what}"
        );
        let reason = problem["errors"][0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("at most"), "{what}: {problem}");
    };

    // One gauge point of 5 000 000 empty attributes: 10 MB, about 300 MiB once decoded.
    let mut point = [0x3a, 0x00].repeat(5_000_000);
    point.extend([0x19, 1, 0, 0, 0, 0, 0, 0, 0]);
    let metrics = wrap(point, &[0x0a, 0x2a, 0x12, 0x12, 0x0a]);
    // One log record of as many.
    let logs = wrap([0x32, 0x00].repeat(5_000_000), &[0x12, 0x12, 0x0a]);
    for (signal, raw) in [("metrics", &metrics), ("logs", &logs)] {
        let body = gzip(raw);
        assert!(body.len() < 16 * 1024, "{} bytes", body.len());
        let answer = send(signal, "application/x-protobuf", body).await;
        too_many(answer, signal);
    }
    // The same in OTLP/JSON: 3 400 000 empty attribute objects.
    let json = format!(
        r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{{"name":"bomb","gauge":
        {{"dataPoints":[{{"timeUnixNano":"1","asInt":"1","attributes":[{}{{}}]}}]}}}}]}}]}}]}}"#,
        "{},".repeat(3_399_999)
    );
    assert!(json.len() < 10 << 20);
    let answer = send("metrics", "application/json", gzip(json.as_bytes())).await;
    too_many(answer, "json");
    // A resource of 1 000 distinct empty attributes over 7 500 empty log records: 38 KB of
    // JSON, each record a copy of them (7.5 million attributes, 8 bytes of text each: 58 MiB
    // of text, under the bound when only the text was counted, and about 2 GB once built;
    // ingest-api was killed past 384 MiB).
    let attributes: Vec<String> = (0..1_000).map(|i| format!(r#"{{"key":"a{i}"}}"#)).collect();
    let copies = format!(
        r#"{{"resourceLogs":[{{"resource":{{"attributes":[{}]}},"scopeLogs":[{{"logRecords":[{}{{}}]}}]}}]}}"#,
        attributes.join(","),
        "{},".repeat(7_499)
    );
    let answer = send("logs", "application/json", gzip(copies.as_bytes())).await;
    too_many(answer, "a resource's attributes in every record");
    // The same resource over 200 records is within the bound, and is taken in bounded memory
    // (checked at the end): the bound weighs what the copies hold.
    let at = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let record = format!(r#"{{"timeUnixNano":"{at}","body":{{"stringValue":"x"}}}}"#);
    let within = format!(
        r#"{{"resourceLogs":[{{"resource":{{"attributes":[{}]}},"scopeLogs":[{{"logRecords":[{}]}}]}}]}}"#,
        attributes.join(","),
        vec![record; 200].join(",")
    );
    let (status, answer) = send("logs", "application/json", gzip(within.as_bytes())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(metrics_topic_records(&common).await, 200);

    // Just under the bounds (199 999 attributes; 249 995 JSON values): decoded, then refused
    // for other reasons (an empty key, too many labels on a point), still in bounded memory.
    let mut point = [0x3a, 0x00].repeat(199_999);
    point.extend([0x19, 1, 0, 0, 0, 0, 0, 0, 0]);
    let largest = wrap(point, &[0x0a, 0x2a, 0x12, 0x12, 0x0a]);
    let largest_json = json.replacen(&"{},".repeat(3_399_999), &"{},".repeat(249_980), 1);
    for (ct, body) in [
        ("application/x-protobuf", largest),
        ("application/json", largest_json.into_bytes()),
    ] {
        let (status, problem) = send("metrics", ct, gzip(&body)).await;
        assert_eq!(status, 400, "{ct}: {problem}");
    }
    // And over gRPC, gzipped by grpcio.
    let file = std::env::temp_dir().join(format!("otlp-bomb-{}.pb", std::process::id()));
    std::fs::write(&file, &metrics).unwrap();
    let got = grpc_raw(
        &grpc_addr,
        &t.ingest_key,
        &["--file", file.to_str().unwrap(), "--gzip"],
    )
    .await;
    std::fs::remove_file(&file).unwrap();
    assert!(
        got.starts_with("INVALID_ARGUMENT") && got.contains("at most"),
        "{got}"
    );

    // Still serving: a good point is taken, and it is the only record in the log.
    let good = json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "after",
        "gauge": {"dataPoints": [{"asInt": "1", "attributes": [{"key": "k", "value": {"stringValue": "v"}}],
        "timeUnixNano": chrono::Utc::now().timestamp_nanos_opt().unwrap().to_string()}]}}]}]}]});
    let (status, answer) = send(
        "metrics",
        "application/json",
        gzip(good.to_string().as_bytes()),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(metrics_topic_records(&common).await, 201);
    assert_bomb_memory_bound(&ingest, started_rss);
}
