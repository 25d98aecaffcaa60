//! Bad input from the attacker's side: every one a 4xx problem naming the reason and field,
//! never a 5xx, and nothing reaches the log.

use std::io::Write;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tally_tests::*;

async fn problem(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let ct = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = res.json().await.expect("problem body is JSON");
    assert_eq!(
        ct.as_deref(),
        Some("application/problem+json"),
        "{status} {body}"
    );
    assert!(status.is_client_error(), "{status} {body}");
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().unwrap().starts_with("https://"));
    assert!(!body["detail"].as_str().unwrap().is_empty());
    (status, body)
}

fn fields(body: &Value) -> Vec<(Option<i64>, String)> {
    body["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["index"].as_i64(),
                        e["field"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clear_problems() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "attacked").await;
    let url = format!("{}/v1/events", ingest.url());
    let send = |body: Vec<u8>, key: Option<&str>| {
        let mut r = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            r = r.header("x-api-key", k.to_string());
        }
        r.send()
    };
    let k = Some(t.ingest_key.as_str());

    // Malformed JSON.
    let (s, b) = problem(send(b"{\"type\": ".to_vec(), k).await.unwrap()).await;
    assert_eq!(s, 400);
    assert!(b["type"].as_str().unwrap().ends_with("malformed-json"));

    // Nested as deep as serde_json reads (128 levels, the event counted): `data` alone is
    // 127 deep, the event 128. Refused as not JSON, never accepted to fail in the projector.
    let nested = format!("{}1{}", "[".repeat(125), "]".repeat(125));
    let body = format!(
        r#"{{"type": "metric.sample", "occurred_at": "{}", "data": {{"name": "n", "value": 1, "extra": {{"x": {nested}}}}}}}"#,
        ago(1)
    );
    let (s, b) = problem(send(body.into_bytes(), k).await.unwrap()).await;
    assert_eq!(s, 400, "{b}");
    assert!(b["type"].as_str().unwrap().ends_with("malformed-json"));

    // An event, or its `data`, written as an array, which serde_json would read by position.
    let at = ago(1);
    let body = format!(
        r#"[[null, "session.started", "{at}", null, {{"session_id": "s", "user_id": "u"}}]]"#
    );
    let (s, b) = problem(send(body.into_bytes(), k).await.unwrap()).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(fields(&b), vec![(Some(0), String::new())], "{b}");
    let body =
        format!(r#"{{"type": "session.started", "occurred_at": "{at}", "data": ["s", "u"]}}"#);
    let (s, b) = problem(send(body.into_bytes(), k).await.unwrap()).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(fields(&b), vec![(Some(0), "data".to_string())], "{b}");

    // Wrong types, with the field and the index in the batch.
    let body = json!([command("u", "ok", 1, true), {"type": "command.executed", "occurred_at": ago(1), "data": {"user_id": 5, "command_name": "x", "duration_ms": "long", "status": "success"}}]);
    let (s, b) = problem(send(serde_json::to_vec(&body).unwrap(), k).await.unwrap()).await;
    assert_eq!(s, 422);
    assert_eq!(
        fields(&b),
        vec![
            (Some(1), "data.duration_ms".to_string()),
            (Some(1), "data.user_id".to_string())
        ],
        "{b}"
    );

    // What PostgreSQL cannot store: a NUL anywhere in `data`, a rollup key over 600 bytes.
    let body = json!([command("u", "ok", 1, true),
        {"type": "command.executed", "occurred_at": ago(1), "data": {"user_id": "u", "command_name": "a\u{0}b", "duration_ms": 1, "status": "success", "args": {"k": ["x\u{0}"]}}},
        {"type": "command.executed", "occurred_at": ago(1), "data": {"user_id": "\u{4e00}".repeat(250), "command_name": "b", "duration_ms": 1, "status": "success"}}]);
    let (s, b) = problem(send(serde_json::to_vec(&body).unwrap(), k).await.unwrap()).await;
    assert_eq!(s, 422);
    assert_eq!(
        fields(&b),
        vec![
            (Some(1), "data.args.k[0]".to_string()),
            (Some(1), "data.command_name".to_string()),
            (Some(2), "data.user_id".to_string())
        ],
        "{b}"
    );

    // Unknown event type.
    let body = json!({"type": "command.exploded", "occurred_at": ago(1), "data": {}});
    let (s, b) = problem(send(serde_json::to_vec(&body).unwrap(), k).await.unwrap()).await;
    assert_eq!(s, 422);
    assert_eq!(fields(&b), vec![(Some(0), "type".to_string())]);

    // Out-of-range values, several fields at once.
    let body = json!({"type": "agent.interacted", "occurred_at": ago(1), "data": {"user_id": "u", "agent_name": "", "interaction_type": "chat", "input_tokens": -1, "duration_ms": 3_600_001, "status": "success"}});
    let (_, b) = problem(send(serde_json::to_vec(&body).unwrap(), k).await.unwrap()).await;
    let f: Vec<String> = fields(&b).into_iter().map(|(_, f)| f).collect();
    assert_eq!(
        f,
        ["data.agent_name", "data.input_tokens", "data.duration_ms"]
    );

    // A session listing more agents than a session's share (each shown in the sessions table).
    let agents: Vec<String> = (0..=shared::events::MAX_AGENTS_USED)
        .map(|i| format!("a{i}"))
        .collect();
    let body = json!({"type": "session.ended", "occurred_at": ago(1),
        "data": {"user_id": "u", "session_id": "s", "agents_used": agents}});
    let (s, b) = problem(send(serde_json::to_vec(&body).unwrap(), k).await.unwrap()).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(fields(&b), vec![(Some(0), "data.agents_used".to_string())]);

    // 1 001 events.
    let body = Value::Array((0..1001).map(|_| command("u", "c", 1, true)).collect());
    let (s, b) = problem(send(serde_json::to_vec(&body).unwrap(), k).await.unwrap()).await;
    assert_eq!(s, 413);
    assert!(b["detail"].as_str().unwrap().contains("1001"));

    // A body over 10 MB (and a gzip bomb that inflates past it).
    // The door refuses the declared length before reading: the client either reads the 413
    // or, still writing the body, finds the connection closed.
    let big = format!("[{}]", "0,".repeat(5_500_000) + "0");
    match send(big.into_bytes(), k).await {
        Ok(res) => assert_eq!(problem(res).await.0, 413),
        Err(e) => assert!(format!("{e:?}").contains("BodyWrite"), "{e:?}"),
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![b' '; 11 * 1024 * 1024]).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 100_000);
    let res = client
        .post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .header("x-api-key", &t.ingest_key)
        .body(bomb)
        .send()
        .await
        .unwrap();
    let (s, _) = problem(res).await;
    assert_eq!(s, 413);

    // One event larger than the log takes (1 MB): a 413 naming it, before anything is sent.
    let mut huge = command("u", "c", 1, true);
    huge["data"]["context"] = json!({"blob": "x".repeat(1_200_000)});
    let body = Value::Array(vec![command("u", "c", 1, true), huge]);
    let (s, b) = problem(send(serde_json::to_vec(&body).unwrap(), k).await.unwrap()).await;
    assert_eq!(s, 413, "{b}");
    assert!(
        b["type"].as_str().unwrap().ends_with("event-too-large"),
        "{b}"
    );

    // Wrong content type, empty batch, a scalar body.
    let res = client
        .post(&url)
        .header("content-type", "text/plain")
        .header("x-api-key", &t.ingest_key)
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(res).await.0, 415);
    assert_eq!(problem(send(b"[]".to_vec(), k).await.unwrap()).await.0, 422);
    assert_eq!(problem(send(b"42".to_vec(), k).await.unwrap()).await.0, 422);

    // Missing, unknown, malformed and read-only keys.
    let ok = serde_json::to_vec(&command("u", "c", 1, true)).unwrap();
    assert_eq!(problem(send(ok.clone(), None).await.unwrap()).await.0, 401);
    let unknown = ingest_api::secrets::api_key().secret;
    assert_eq!(
        problem(send(ok.clone(), Some(&unknown)).await.unwrap())
            .await
            .0,
        401
    );
    assert_eq!(
        problem(send(ok.clone(), Some("' OR 1=1 --")).await.unwrap())
            .await
            .0,
        401
    );
    assert_eq!(
        problem(send(ok.clone(), Some(&t.read_key)).await.unwrap())
            .await
            .0,
        403
    );
    // The body cannot choose the tenant.
    let mut forged = command("u", "c", 1, true);
    forged["tenant_id"] = json!(uuid::Uuid::new_v4());
    let (s, b) = problem(send(serde_json::to_vec(&forged).unwrap(), k).await.unwrap()).await;
    assert_eq!(s, 422);
    assert_eq!(fields(&b), vec![(Some(0), "tenant_id".to_string())]);

    // The read side: ingest keys cannot read, bad parameters are 400s.
    let q = query.url();
    let res = client
        .get(format!("{q}/v1/dashboard/overview"))
        .bearer_auth(&t.ingest_key)
        .send()
        .await
        .unwrap();
    assert_eq!(problem(res).await.0, 403);
    let res = client
        .get(format!("{q}/v1/dashboard/overview"))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(res).await.0, 401);
    for params in [
        "range=2y",
        "from=yesterday",
        "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        "from=2025-01-01T00:00:00Z&to=2025-12-01T00:00:00Z",
        "range=24h&from=2026-01-01T00:00:00Z",
    ] {
        let res = client
            .get(format!("{q}/v1/dashboard/overview?{params}"))
            .bearer_auth(&t.read_key)
            .send()
            .await
            .unwrap();
        assert_eq!(problem(res).await.0, 400, "{params}");
    }
    for params in [
        "group_by=planet",
        "bucket=7m",
        "bucket=1m&range=90d",
        "type=nope",
        "group_by=tool&type=command.executed",
        "group_by=user'--",
    ] {
        let res = client
            .get(format!("{q}/v1/dashboard/timeseries?{params}"))
            .bearer_auth(&t.read_key)
            .send()
            .await
            .unwrap();
        assert_eq!(problem(res).await.0, 400, "{params}");
    }
    let res = client
        .get(format!("{q}/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(res).await.0, 404);

    // Nothing was accepted: the topic holds no record from these requests.
    let offsets = topic_size(&common).await;
    assert_eq!(offsets, 0, "rejected requests never reach Kafka");

    stop_all([ingest, query]).await;
}

/// Records in the test's metrics topic (sum of high watermarks).
async fn topic_size(common: &shared::config::Common) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = shared::kafka::client_config(common).create().unwrap();
    let topic = common.metrics_topic();
    tokio::task::spawn_blocking(move || {
        (0..4)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, std::time::Duration::from_secs(5))
                    .unwrap()
                    .1
            })
            .sum()
    })
    .await
    .unwrap()
}

/// The session id in `/v1/dashboard/sessions/{id}/timeline` is checked as query parameters
/// are: a NUL is a 400 naming `id` (before: PostgreSQL refused it, a 503), and bytes that are
/// not UTF-8 a problem too (before: axum's plain-text 400, ahead of the credential check).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timelines_session_id_is_checked_as_parameters_are() {
    let TestEnv { pool, common } = test_env().await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "timeline-ids").await;
    let url = |id: &str| format!("{}/v1/dashboard/sessions/{id}/timeline", query.url());
    let res = client.get(url("%FF")).send().await.unwrap();
    let (s, _) = problem(res).await;
    assert_eq!(s, 401, "the credential first");
    for id in ["%00", "a%00b", "%FF"] {
        let res = client
            .get(url(id))
            .header("x-api-key", &t.read_key)
            .send()
            .await
            .unwrap();
        let (s, b) = problem(res).await;
        assert_eq!(s, 400, "{id}: {b}");
        assert_eq!(b["errors"][0]["field"], "id", "{id}: {b}");
    }
    let res = client
        .get(url("no-such-session"))
        .header("x-api-key", &t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    query.stop().await.unwrap();
}

/// A repository name the projector would read differently from the door is refused at the
/// door: `acme/..git.git` was stored as `acme/..git` (202) and read back by the projector
/// as `acme/..`, which it dead-lettered. A name with `.git` twice, in either case, is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repository_name_the_projector_would_read_differently_is_refused() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "repository-names").await;
    let context = |repository: &str| {
        json!({"type": "session.context", "occurred_at": ago(1),
               "data": {"session_id": "s", "user_id": "u", "repository": repository}})
    };
    let send = |event: Value| {
        client
            .post(format!("{}/v1/events", ingest.url()))
            .header("x-api-key", &t.ingest_key)
            .json(&event)
            .send()
    };
    let (s, b) = problem(send(context("github.com/acme/..git.git")).await.unwrap()).await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(fields(&b), vec![(Some(0), "data.repository".into())], "{b}");
    let res = send(context("github.com/acme/b.git.GIT")).await.unwrap();
    assert_eq!(res.status(), 202);
    ingest.stop().await.unwrap();
}

/// A route asked with a method it does not serve gets a 405 problem with `Allow`, on every
/// listener of both services (before: axum's empty 405), and a path no route serves a 404
/// problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_asked_with_another_method_is_a_problem() {
    let TestEnv { common, .. } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let ops = |s: &Running| format!("http://{}", s.operations_addr.expect("operations port"));
    let cases = [
        (
            reqwest::Method::GET,
            format!("{}/v1/events", ingest.url()),
            "POST",
        ),
        (
            reqwest::Method::PUT,
            format!("{}/v1/auth/login", ingest.url()),
            "POST",
        ),
        (
            reqwest::Method::PATCH,
            format!("{}/v1/admin/tenants", ingest.url()),
            "GET,HEAD,POST",
        ),
        (
            reqwest::Method::POST,
            format!("{}/healthz", ops(&ingest)),
            "GET,HEAD",
        ),
        (
            reqwest::Method::DELETE,
            format!("{}/v1/dashboard/overview", query.url()),
            "GET,HEAD",
        ),
        (
            reqwest::Method::POST,
            format!("{}/metrics", ops(&query)),
            "GET,HEAD",
        ),
    ];
    for (method, url, allow) in cases {
        let res = client.request(method.clone(), &url).send().await.unwrap();
        let allowed = res
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string());
        let (s, b) = problem(res).await;
        assert_eq!(s, 405, "{method} {url}: {b}");
        assert!(
            b["type"].as_str().unwrap().ends_with("method-not-allowed"),
            "{b}"
        );
        assert!(
            b["detail"].as_str().unwrap().contains(method.as_str()),
            "{b}"
        );
        let mut allowed: Vec<&str> = allowed.as_deref().unwrap_or("").split(',').collect();
        allowed.sort();
        assert_eq!(allowed.join(","), allow, "{method} {url}");
    }
    for url in [
        format!("{}/v1/nothing-here", ingest.url()),
        format!("{}/v1/nothing-here", query.url()),
        format!("{}/v1/nothing-here", ops(&query)),
    ] {
        let (s, _) = problem(client.get(&url).send().await.unwrap()).await;
        assert_eq!(s, 404, "{url}");
    }
    stop_all([ingest, query]).await;
}
