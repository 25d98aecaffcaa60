//! Body limits from the attacker's side: every JSON route (sign-in and control plane, most
//! of them answering anyone) refuses a body over its limit with a 413 problem, without
//! reading it; the ingest doors refuse one over `max_body_bytes` as soon as they know it.

use std::time::Duration;

use serde_json::{json, Value};
use tally_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `head` (request line and headers, without the blank line) and `body` as they are on
/// a fresh connection, and returns the status and body of the answer; the answer must come
/// within 10 s, whether or not the body sent is as long as the head claims.
async fn raw(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> (u16, Value) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("no answer within 10 s to {head}"))
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let problem = headers
        .to_ascii_lowercase()
        .contains("content-type: application/problem+json");
    assert!(problem || status < 400, "{text}");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The body of a chunked request, `total` bytes of JSON-looking text in 8 KiB chunks.
fn chunked(total: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let text = format!("{{\"email\": \"{}", "a".repeat(total));
    for chunk in text.as_bytes().chunks(8 * 1024) {
        out.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend(chunk);
        out.extend(b"\r\n");
    }
    out.extend(b"0\r\n\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_routes_refuse_oversized_bodies_without_reading_them() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |c| c.max_body_bytes = 1 << 20).await;
    let t = create_tenant(&pool, "limits").await;
    let id = uuid::Uuid::new_v4();
    let routes = [
        ("POST", "/v1/auth/login".to_string()),
        ("POST", "/v1/auth/refresh".into()),
        ("POST", "/v1/auth/logout".into()),
        ("POST", "/v1/auth/password".into()),
        ("POST", "/v1/auth/invitations/accept".into()),
        ("POST", "/v1/admin/invitations".into()),
        ("PUT", "/v1/admin/sso".into()),
        ("POST", "/v1/admin/tenants".into()),
        ("PATCH", format!("/v1/admin/tenants/{id}")),
        ("POST", "/v1/admin/users".into()),
        ("PATCH", format!("/v1/admin/users/{id}")),
        ("PUT", "/v1/admin/teams/platform".into()),
        ("POST", "/v1/admin/api-keys".into()),
    ];
    // 10 MB declared and none of it sent: the answer cannot wait for the body.
    for (method, path) in &routes {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 10000000"
        );
        let (status, problem) = raw(ingest.addr, &head, b"").await;
        assert_eq!(status, 413, "{method} {path}: {problem}");
        assert_eq!(
            problem["type"], "https://tally.dev/problems/body-too-large",
            "{method} {path}"
        );
        assert!(
            problem["detail"].as_str().unwrap().contains("bytes"),
            "{problem}"
        );
    }
    // A body that declares no length is read no further than the limit.
    for (path, sent) in [
        ("/v1/auth/login", 64 * 1024),
        ("/v1/auth/invitations/accept", 256 * 1024),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
        );
        let (status, problem) = raw(ingest.addr, &head, &chunked(sent)).await;
        assert_eq!(status, 413, "{path}: {problem}");
        assert_eq!(problem["type"], "https://tally.dev/problems/body-too-large");
    }
    // As a client library sends it: 10 MB to the login. The server answers before reading
    // the body and closes the connection, so the client either reads the 413 or, still
    // writing, finds the connection closed; never anything else.
    let client = http();
    let res = client
        .post(format!("{}/v1/auth/login", ingest.url()))
        .header("content-type", "application/json")
        .body(vec![b' '; 10_000_000])
        .send()
        .await;
    match res {
        Ok(res) => assert_eq!(res.status(), 413),
        Err(e) => assert!(
            format!("{e:?}").contains("BodyWrite"),
            "neither a 413 nor a closed connection: {e:?}"
        ),
    }

    // Bodies of the usual size still pass the limit and reach the handler.
    let res = client
        .post(format!("{}/v1/auth/login", ingest.url()))
        .json(&json!({"email": "nobody@example.com", "password": "x".repeat(12 * 1024)}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // An ingest door, with a valid key, refuses a declared length over `max_body_bytes` at
    // once; without a key, the key is what it refuses.
    let head = |key: &str| {
        format!(
            "POST /v1/events HTTP/1.1\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {}",
            (1 << 20) + 1
        )
    };
    let (status, problem) = raw(ingest.addr, &head(&t.ingest_key), b"").await;
    assert_eq!(status, 413, "{problem}");
    assert_eq!(problem["type"], "https://tally.dev/problems/body-too-large");
    let (status, _) = raw(ingest.addr, &head("tly_not_a_key"), b"").await;
    assert_eq!(status, 401);
    assert_eq!(metrics_topic_records(&common).await, 0);

    ingest.stop().await.unwrap();
}

/// JSON bombs at the events door: a few KB of gzip that inflate to a 10 MiB body of millions
/// of tiny values or nested objects, which a JSON tree holds at 16 to 140 times their text (a
/// single one made ingest-api's peak 362 MiB before the door estimated the tree), and the key
/// that makes serde_json parse a string as a document. The real ingest-api (its own process,
/// so the figure is its own) refuses each with a 4xx naming the body, takes large batches
/// within the limit, many at once, stays under `BOMB_RSS_BOUND_KIB`, and appends only what
/// it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_bombs_are_refused_in_bounded_memory() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, started_rss) = spawn_bomb_target(&common, &[]).await;
    let t = create_tenant(&pool, "json-bomb").await;
    let client = http();
    let url = format!("{}/v1/events", ingest.url);
    let send = |body: Vec<u8>| {
        status_and_json(
            client
                .post(&url)
                .header("x-api-key", &t.ingest_key)
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(body),
        )
    };
    let at = ago(60);
    let sample = |extra: &str| {
        format!(
            r#"{{"type": "metric.sample", "occurred_at": "{at}", "data": {{"name": "n", "value": 1, "extra": {extra}}}}}"#
        )
    };
    let zeros = |n: usize| format!(r#"{{"x": [{}0]}}"#, "0,".repeat(n - 1));
    let keys = |n: usize| {
        let members: Vec<String> = (0..n).map(|i| format!(r#""{i:x}":0"#)).collect();
        format!("{{{}}}", members.join(","))
    };
    let batch = |n: usize, extra: &str| format!("[{}]", vec![sample(extra); n].join(","));
    // 2 750 chains of 90 single-member objects: 1.2 MB of text, 250 000 values, 170 MB of
    // maps.
    let chains = {
        let chain = format!("{}0{}", r#"{"":"#.repeat(90), "}".repeat(90));
        let members: Vec<String> = (0..2_750).map(|i| format!(r#""{i}":{chain}"#)).collect();
        format!("{{{}}}", members.join(","))
    };

    for (what, body) in [
        (
            "five million events",
            format!("[{}0]", "0,".repeat(4_999_999)),
        ),
        (
            "the same, broken at its end",
            format!("[{}x]", "0,".repeat(4_999_999)),
        ),
        ("one event, many values", sample(&zeros(5_000_000))),
        ("one event, many members", sample(&keys(1_000_000))),
        ("many events, many values", batch(1_000, &zeros(5_000))),
        ("one event, nested objects", sample(&chains)),
        (
            "events nested in an array",
            format!("[{}]", batch(1_000, &zeros(5_000))),
        ),
    ] {
        assert!(
            body.len() <= 10 * 1024 * 1024,
            "{what}: {} bytes",
            body.len()
        );
        let (status, problem) = send(gzip(&body)).await;
        assert_eq!(status, 413, "{what}: {problem}");
        assert!(
            problem["type"]
                .as_str()
                .unwrap_or_default()
                .ends_with("too-many-values"),
            "{what}: {problem}"
        );
        assert_eq!(problem["errors"][0]["field"], "body", "{what}: {problem}");
        eprintln!("{what}: peak {} KiB", ingest.memory_kib().1);
    }

    // A key that makes serde_json read a string as a JSON document of its own: five million
    // zeros in one string, or a text no reader takes back from the log.
    for (what, extra) in [
        (
            "a reserved key",
            r#"{"$serde_json::private::RawValue": "nope"}"#.to_string(),
        ),
        (
            "a reserved key, escaped, over a bomb",
            format!(
                r#"{{"$serde_json::private::RawValu\u0065": "[{}0]"}}"#,
                "0,".repeat(4_999_999)
            ),
        ),
    ] {
        let (status, problem) = send(gzip(sample(&extra))).await;
        assert_eq!(status, 422, "{what}: {problem}");
        assert_eq!(problem["errors"][0]["field"], "body", "{what}: {problem}");
        eprintln!("{what}: peak {} KiB", ingest.memory_kib().1);
    }

    // Just within the limit (1 000 events of 240 values each, about 16 MB of trees), 24 at
    // once: each is taken or shed with a 503, and what is held while they are counted and the
    // log acknowledges them is not their trees (each request held all of its events' trees
    // while the rate limiter answered: a peak of 162 to 192 MiB, where 45 to 55 MiB now).
    let within = gzip(batch(1_000, &zeros(240)));
    let answers = futures::future::join_all((0..24).map(|_| send(within.clone()))).await;
    let taken = answers.iter().filter(|(status, _)| *status == 202).count();
    for (status, problem) in &answers {
        assert!([202, 503].contains(status), "{status} {problem}");
    }
    assert!(taken > 0, "{answers:?}");
    eprintln!(
        "{taken} of 24 batches within the limit taken: peak {} KiB",
        ingest.memory_kib().1
    );

    // Still serving: a good event is taken, and the log holds only what was taken.
    let (status, problem) = send(gzip(sample("{}"))).await;
    assert_eq!(status, 202, "{problem}");
    assert_eq!(
        metrics_topic_records(&common).await,
        taken as i64 * 1_000 + 1
    );
    assert_bomb_memory_bound(&ingest, started_rss);
}
