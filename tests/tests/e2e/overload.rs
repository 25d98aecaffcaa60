//! Load shedding at the ingest doors: past the requests or body bytes it may hold, ingest-api
//! answers 503 with `Retry-After` at once, before reading anything; the control plane and the
//! requests already taken are not affected.

use std::time::Duration;

use serde_json::json;
use shared::apikey::Scope;
use tally_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let TestEnv { pool, common } = test_env().await;
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
    // Another declaring 1 MiB is answered before it sends any of it.
    let mut over = hold(ingest.addr, "/v1/events", &t.ingest_key, 1 << 20).await;
    let answer = head_of(&mut over).await;
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json"),
        "{answer}"
    );
    // A small one still fits, at once: a 503 here is the shedding under test, not to be
    // sent again as post_events_accepted would.
    let res = post_events(&client, &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202, "a small body beside the held one");

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
    // OTLP/gRPC holds a slot too, before its message is read: `UNAVAILABLE`, which senders
    // retry.
    let grpc = ingest.grpc_addr.expect("gRPC is on").to_string();
    let got = grpc_raw(&grpc, &t.ingest_key, &["--hex", ""]).await;
    assert!(got.starts_with("UNAVAILABLE"), "{got}");
    // Doors only: health and the control plane answer as usual.
    let res = client
        .get(format!("{}/healthz", ingest.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let metrics = scrape_metrics(&client, &ingest.url()).await;
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
    assert_eq!(grpc_raw(&grpc, &t.ingest_key, &["--hex", ""]).await, "OK");
    ingest.stop().await.unwrap();
}

/// One tenant's requests in flight hold at most its share of the budget: past it, its own
/// requests are shed (503 naming its share, `UNAVAILABLE` over gRPC), and another tenant's
/// are taken, even when the first tries to hold the whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenant_in_flight_never_sheds_another() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |c| {
        c.max_body_bytes = 1 << 20;
        c.max_inflight_requests = 8;
        c.max_inflight_bytes = 8 << 20;
        c.tenant_inflight_requests = 3;
        c.tenant_inflight_bytes = 2 << 20;
    })
    .await;
    let greedy = create_tenant(&pool, "greedy").await;
    let other = create_tenant(&pool, "other").await;
    let client = http();
    let events = json!([command("u", "build", 5, true)]);
    let grpc = ingest.grpc_addr.expect("gRPC is on").to_string();
    let url = ingest.url();
    let shed = |key| answer(&client, &url, key, &events);
    let (greedy_key, other_key) = (greedy.ingest_key.as_str(), other.ingest_key.as_str());
    // Its key is known (and cached) before it holds anything.
    assert_eq!(shed(greedy_key).await.0, 202);
    // Its bytes: as many bodies of 1 MiB declared as the whole budget would take; two fit
    // its 2 MiB, the others are refused at once.
    let opened = futures::future::join_all(
        (0..8).map(|_| hold(ingest.addr, "/v1/events", greedy_key, 1 << 20)),
    )
    .await;
    let held = refuse_beyond(opened, 2).await;
    let (status, retry, body) = shed(greedy_key).await;
    assert_eq!(
        (status.as_u16(), retry.as_deref()),
        (503, Some("1")),
        "{body}"
    );
    assert!(body.contains("this tenant holds its whole share"), "{body}");
    assert!(body.contains("(bytes)"), "{body}");
    let got = grpc_raw(&grpc, greedy_key, &["--hex", ""]).await;
    assert!(got.starts_with("UNAVAILABLE"), "{got}");
    // The other tenant is taken, over HTTP and gRPC.
    let (status, _, body) = shed(other_key).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(grpc_raw(&grpc, other_key, &["--hex", ""]).await, "OK");
    drop(held);

    // Its requests: as many small ones as the whole budget's slots; three fit its share
    // (once what the first ones held is given back).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shed(greedy_key).await.0 != 202 {
        assert!(std::time::Instant::now() < deadline, "still shedding");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened =
        futures::future::join_all((0..8).map(|_| hold(ingest.addr, "/v1/events", greedy_key, 10)))
            .await;
    let held = refuse_beyond(opened, 3).await;
    let (status, _, body) = shed(greedy_key).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("(requests)"), "{body}");
    let (status, _, body) = shed(other_key).await;
    assert_eq!(status, 202, "{body}");
    let metrics = scrape_metrics(&client, &ingest.url()).await;
    for limit in ["tenant_bytes", "tenant_requests"] {
        assert!(
            metrics.contains(&format!("ingest_shed_total{{limit=\"{limit}\"}}")),
            "{metrics}"
        );
    }

    // Once its requests go, the tenant is taken again.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shed(greedy_key).await.0 != 202 {
        assert!(std::time::Instant::now() < deadline, "still shedding");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ingest.stop().await.unwrap();
}

/// A request head that has not ended within `header_timeout_secs` loses its connection; a body
/// that has not arrived within `body_timeout_secs` is answered 408, and what its
/// request held is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_head_or_body_that_never_arrives_is_cut_off_and_its_place_given_back() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |c| {
        c.max_inflight_requests = 1;
        c.body_timeout_secs = 1;
        c.serving.header_timeout_secs = 1;
    })
    .await;
    let t = create_tenant(&pool, "trickle").await;
    // A head that never ends: the connection is closed once its time is up.
    let mut head = TcpStream::connect(ingest.addr).await.unwrap();
    head.write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    closed_after_a_second(head, "the connection").await;
    // The same for an OTLP/gRPC connection whose client never sends its preface.
    let silent = TcpStream::connect(ingest.grpc_addr.expect("gRPC is on"))
        .await
        .unwrap();
    closed_after_a_second(silent, "the gRPC connection").await;
    // A peer that asks and never reads the answers: the connection is given up once a write
    // has waited a second, not kept until every answer is sent.
    let answer = http()
        .get(format!("{}/openapi.json", ingest.url()))
        .send()
        .await
        .unwrap();
    let whole = 400 * answer.bytes().await.unwrap().len();
    let mut deaf = TcpStream::connect(ingest.addr).await.unwrap();
    let asks = "GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(400);
    deaf.write_all(asks.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), deaf.read(&mut buf)).await;
        match read.expect("neither closed nor sending") {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(
        got < whole / 2,
        "{got} of {whole} bytes came: it was not given up"
    );
    let mut slow = hold(ingest.addr, "/v1/events", &t.ingest_key, 100).await;
    let started = std::time::Instant::now();
    let answer = head_of(&mut slow).await;
    assert!(answer.starts_with("http/1.1 408"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Its one slot is free again.
    let events = json!([command("u", "build", 5, true)]);
    let res = post_events(&http(), &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202);
    // Webhooks hold nothing of the doors' budget, and a delivery for a tenant without that
    // integration is refused before its body is read.
    let hook = format!("/v1/webhooks/github/{}", t.id);
    let mut deliveries = Vec::new();
    for _ in 0..3 {
        let mut delivery = hold(ingest.addr, &hook, "-", 1 << 20).await;
        let answer = head_of(&mut delivery).await;
        assert!(answer.starts_with("http/1.1 401"), "{answer}");
        deliveries.push(delivery);
    }
    let res = post_events(&http(), &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202);

    // With the integration, deliveries hold the webhooks' own budget while their bodies
    // arrive: four for one tenant, the fifth refused; the doors still take events; and a
    // body that does not come is answered 408 after five seconds.
    let (_, admin) =
        ingest_api::control::store::create_api_key(&pool, "", t.id, Scope::Admin, "hooks")
            .await
            .unwrap();
    let res = http()
        .put(format!("{}/v1/admin/integrations/github", ingest.url()))
        .bearer_auth(&admin)
        .json(&json!({"secret": "gh-webhook-secret-0123456789"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let opened =
        futures::future::join_all((0..5).map(|_| hold(ingest.addr, &hook, "-", 100))).await;
    let mut waiting = refuse_beyond(opened, 4).await;
    let res = post_events(&http(), &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202, "webhooks hold none of the doors' budget");
    for delivery in &mut waiting {
        let answer = head_of(delivery).await;
        assert!(answer.starts_with("http/1.1 408"), "{answer}");
    }
    ingest.stop().await.unwrap();
}

/// An OTLP/gRPC message that never all arrives holds its slot until `body_timeout_secs`, then
/// is answered `DEADLINE_EXCEEDED` and gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grpc_message_that_never_arrives_is_cut_off_and_its_place_given_back() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |c| {
        c.max_inflight_requests = 1;
        c.body_timeout_secs = 5;
    })
    .await;
    let t = create_tenant(&pool, "trickle-grpc").await;
    let events = json!([command("u", "build", 5, true)]);
    // Its key known (and cached) before, so that the stream holds its slot at once.
    let res = post_events(&http(), &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202);
    let grpc = ingest.grpc_addr.expect("gRPC is on");
    let (mut client, connection) = h2::client::handshake(TcpStream::connect(grpc).await.unwrap())
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = axum::http::Request::post(format!(
        "http://{grpc}/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {}", t.ingest_key))
    .body(())
    .unwrap();
    let (response, mut message) = client.send_request(request, false).unwrap();
    // A message that declares 100 bytes, of which three come.
    message
        .send_data(
            axum::body::Bytes::from_static(&[0, 0, 0, 0, 100, 1, 2, 3]),
            false,
        )
        .unwrap();
    let started = std::time::Instant::now();
    // It holds the one slot meanwhile. (Asked after a second: a post served while the stream
    // is admitted holds the slot itself, and the stream would be shed; under load it was.)
    tokio::time::sleep(Duration::from_secs(1)).await;
    let deadline = started + Duration::from_secs(4);
    loop {
        let res = post_events(&http(), &ingest.url(), &t.ingest_key, &events).await;
        if res.status() == 503 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was not held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered")
        .unwrap();
    let status = match response.headers().get("grpc-status") {
        Some(status) => status.to_str().unwrap().to_string(),
        None => {
            let mut body = response.into_body();
            while body.data().await.is_some() {}
            let trailers = body.trailers().await.unwrap().expect("trailers");
            trailers["grpc-status"].to_str().unwrap().to_string()
        }
    };
    assert_eq!(status, "4", "DEADLINE_EXCEEDED");
    assert!(started.elapsed() >= Duration::from_millis(4900));
    let res = post_events(&http(), &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202, "its slot is free again");
    drop(message);
    ingest.stop().await.unwrap();
}

/// One address holds at most `max_connections_per_peer` connections over both listeners: its
/// next is answered 503 (HTTP) or closed (gRPC, `UNAVAILABLE`), while another address's
/// requests are taken; a closed connection gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_holding_connections_never_keeps_another_out() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |c| c.serving.max_connections_per_peer = 3).await;
    let t = create_tenant(&pool, "crowded").await;
    let grpc = ingest.grpc_addr.expect("gRPC is on").to_string();
    let events = json!([command("u", "build", 5, true)]);
    let (one, two) = (client_from("127.0.0.1"), client_from("127.0.0.2"));
    // 127.0.0.2 opens its three and sends nothing; its fourth is told why and closed.
    let idle = hold_connections(ingest.addr, "127.0.0.2", 3).await;
    let mut fourth = connect_from("127.0.0.2", ingest.addr).await;
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(10), fourth.read_to_string(&mut answer));
    read.await.expect("closed at once").unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("too-many-connections"), "{answer}");
    // A client that sends its request at once sees the 503 or the connection closed under it.
    let res = two
        .post(format!("{}/v1/events", ingest.url()))
        .bearer_auth(&t.ingest_key)
        .json(&events)
        .send()
        .await;
    assert!(
        res.as_ref().map_or(true, |res| res.status() == 503),
        "{res:?}"
    );
    // 127.0.0.1 is taken, over HTTP and gRPC.
    let res = post_events(&one, &ingest.url(), &t.ingest_key, &events).await;
    assert_eq!(res.status(), 202);
    assert_eq!(grpc_raw(&grpc, &t.ingest_key, &["--hex", ""]).await, "OK");
    // Its places come back as its connections close.
    drop(idle);
    drop(one);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match two
            .post(format!("{}/v1/events", ingest.url()))
            .bearer_auth(&t.ingest_key)
            .json(&events)
            .send()
            .await
        {
            Ok(res) if res.status() == 202 => break,
            _ => assert!(
                std::time::Instant::now() < deadline,
                "127.0.0.2 still refused"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(two);
    // Now 127.0.0.1 holds three: its gRPC connection is closed unanswered, counted apart.
    let idle = hold_connections(ingest.addr, "127.0.0.1", 3).await;
    let got = grpc_raw(&grpc, &t.ingest_key, &["--hex", ""]).await;
    assert!(got.starts_with("UNAVAILABLE"), "{got}");
    let metrics = scrape_metrics(&client_from("127.0.0.2"), &ingest.url()).await;
    for listener in ["http", "grpc"] {
        let line = format!("connections_refused_total{{listener=\"{listener}\",limit=\"peer\"}}");
        assert!(
            metrics.contains(&line),
            "{listener} refusals counted: {metrics}"
        );
    }
    drop(idle);
    ingest.stop().await.unwrap();
}

/// An address flooding made-up keys while the database is slow has at most two key lookups
/// ahead of another address's: the other's first request is answered once the database
/// answers, not refused after waiting 2 s for a place (as it is when every request waits in
/// one line: this test fails with `max_connections_per_peer = 0`, which turns the shares off).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_flooding_made_up_keys_never_keeps_another_waiting() {
    let TestEnv { pool, mut common } = test_env().await;
    // ingest-api reaches the database through a proxy the test can stall.
    let (login, rest) = common.database_url.split_once('@').unwrap();
    let (server, database) = rest.split_once('/').unwrap();
    let proxy = StallingProxy::start(server.parse().unwrap()).await;
    common.database_url = format!("{login}@127.0.0.1:{}/{database}", proxy.port);
    common.db_max_connections = 16;
    let ingest = start_ingest(&common, |_| {}).await;
    let t = create_tenant(&pool, "flooded").await;
    let events = json!([command("u", "build", 5, true)]);
    // The database stops answering ingest-api; 127.0.0.2 sends twelve made-up keys at once.
    proxy.stall(true);
    let flood: Vec<_> = (0..12)
        .map(|i| {
            let (client, url, events) = (client_from("127.0.0.2"), ingest.url(), events.clone());
            let made_up = format!("tly_{:064x}", 0xbad0_0000_u64 + i);
            tokio::spawn(async move {
                let res = post_events(&client, &url, &made_up, &events).await;
                res.status().as_u16()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 127.0.0.1's key, not yet in the cache, waits for the database, not for a place.
    let valid = {
        let (client, url, key, events) = (
            client_from("127.0.0.1"),
            ingest.url(),
            t.ingest_key.clone(),
            events.clone(),
        );
        tokio::spawn(async move { post_events(&client, &url, &key, &events).await.status() })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.stall(false);
    assert_eq!(
        valid.await.unwrap(),
        202,
        "another address's key waited for a place"
    );
    for task in flood {
        let status = task.await.unwrap();
        assert!([401, 503].contains(&status), "a made-up key: {status}");
    }
    ingest.stop().await.unwrap();
}

/// ingest-api and query-api serve health and metrics on an operations port of their own:
/// with every place on the public port held, probes and scrapers are answered there (and
/// nothing else is served there); it closes with the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_are_answered_while_every_public_place_is_held() {
    let TestEnv { common, .. } = test_env().await;
    let three = |s: &mut shared::serve::Serving| {
        s.max_connections = 3;
        s.max_connections_per_peer = 0;
    };
    let ingest = start_ingest(&common, |c| three(&mut c.serving)).await;
    let query = start_query(&common, |c| three(&mut c.serving)).await;
    let client = http();
    for service in [&ingest, &query] {
        let ops = service.operations_addr.expect("the operations port is on");
        let ops = format!("http://{ops}");
        // The recorder is the test process's: this service's refusal is what raises it here.
        let refused = r#"connections_refused_total{listener="http",limit="all"}"#;
        let before = counter(&scrape_metrics(&client, &ops).await, refused);
        let idle = hold_connections(service.addr, "127.0.0.2", 3).await;
        // The public port refuses the probe (503, or closed under a request sent at once).
        let res = client.get(format!("{}/readyz", service.url())).send().await;
        assert!(
            res.as_ref().map_or(true, |res| res.status() == 503),
            "{res:?}"
        );
        for path in ["/healthz", "/readyz"] {
            let res = client.get(format!("{ops}{path}")).send().await.unwrap();
            assert_eq!(res.status(), 200, "{path} on {ops}");
        }
        let after = counter(&scrape_metrics(&client, &ops).await, refused);
        assert!(after > before, "{refused}: {before} then {after}");
        let res = client
            .get(format!("{ops}/openapi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "only health and metrics");
        drop(idle);
    }
    let ops = ingest.operations_addr.unwrap();
    stop_all([ingest, query]).await;
    assert!(
        TcpStream::connect(ops).await.is_err(),
        "the operations port closes with the service"
    );
}

/// An HTTP client whose connections come from `ip`.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Asserts that the server closes `stream` (`what`) within 10 s, and not before a second.
async fn closed_after_a_second(mut stream: TcpStream, what: &str) {
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    })
    .await;
    assert!(closed.is_ok(), "{what} stayed open");
    assert!(started.elapsed() >= Duration::from_millis(900), "{what}");
}

/// A connection to `addr` from `ip`.
async fn connect_from(ip: &str, addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// `n` connections from `ip` that `addr` has kept open (sending nothing): one answered and
/// closed at once is not counted (an earlier connection of `ip`'s may still be closing),
/// and another is tried a little later.
async fn hold_connections(addr: std::net::SocketAddr, ip: &str, n: usize) -> Vec<TcpStream> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut held = Vec::new();
    while held.len() < n {
        assert!(std::time::Instant::now() < deadline, "{ip} kept out");
        let mut stream = connect_from(ip, addr).await;
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await {
            Err(_) => held.push(stream),
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    held
}

/// The status, `Retry-After` and body of the answer to posting `events` with `key`.
async fn answer(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    events: &serde_json::Value,
) -> (reqwest::StatusCode, Option<String>, String) {
    let res = post_events(client, url, key, events).await;
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (res.status(), retry, res.text().await.unwrap())
}

/// The head of the answer on `stream`, lowercased, once it has come (within 10 s).
async fn head_of(stream: &mut TcpStream) -> String {
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(stream)).await;
    head.expect("answered without the body").to_lowercase()
}

/// The head of the answer on `stream`.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed without an answer");
        head.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&head).to_string()
}

/// The requests on `opened` that are held (`held` of them): the others have been answered 503
/// by then, within three seconds.
async fn refuse_beyond(opened: Vec<TcpStream>, held: usize) -> Vec<TcpStream> {
    let answered = futures::future::join_all(opened.into_iter().map(|mut stream| async move {
        let head = tokio::time::timeout(Duration::from_secs(3), read_head(&mut stream)).await;
        (stream, head.ok())
    }))
    .await;
    let mut still = Vec::new();
    for (stream, head) in answered {
        match head {
            Some(head) => assert!(head.starts_with("HTTP/1.1 503"), "{head}"),
            None => still.push(stream),
        }
    }
    assert_eq!(still.len(), held, "requests held");
    still
}
