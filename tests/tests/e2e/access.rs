//! Access limits from the attacker's side: per-tenant rate limits (in Redis, and locally when
//! Redis is unreachable), revoked keys and deactivated tenants.

use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::*;

fn one_event() -> Value {
    Value::Array(vec![command("u", "c", 1, true)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_are_rate_limited_per_plan_with_headers() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let limited = create_tenant(&pool, "limited").await;
    let other = create_tenant(&pool, "other").await;
    ingest_api::control::store::set_plan(&pool, limited.id, "free", Some(5))
        .await
        .unwrap();

    at_window_start().await;
    for i in 0..5 {
        let res = post_events(&client, &ingest.url(), &limited.ingest_key, &one_event()).await;
        assert_eq!(res.status(), 202, "request {i}");
        assert_eq!(res.headers()["x-ratelimit-limit"], "5");
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            (4 - i).to_string().as_str()
        );
        let reset: u64 = res.headers()["x-ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&reset));
    }
    let res = post_events(&client, &ingest.url(), &limited.ingest_key, &one_event()).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    // Another tenant is counted on its own (the professional plan: 1000/min).
    let res = post_events(&client, &ingest.url(), &other.ingest_key, &one_event()).await;
    assert_eq!(res.status(), 202);
    assert_eq!(res.headers()["x-ratelimit-limit"], "1000");
    ingest.stop().await.unwrap();
}

/// Two instances share a tenant's count through Redis: under a limit this small every
/// request adds itself and reads the count back before it is decided, so each instance knows
/// the other's requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_share_the_count_through_redis() {
    let TestEnv { pool, common } = test_env().await;
    let (a, b) = (
        start_ingest(&common, |_| {}).await,
        start_ingest(&common, |_| {}).await,
    );
    let client = http();
    let t = create_tenant(&pool, "two-instances").await;
    ingest_api::control::store::set_plan(&pool, t.id, "free", Some(6))
        .await
        .unwrap();
    at_window_start().await;
    let mut remaining = Vec::new();
    for ingest in [&a, &b] {
        for _ in 0..3 {
            let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
            assert_eq!(res.status(), 202);
            remaining.push(
                res.headers()["x-ratelimit-remaining"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(
        remaining,
        ["5", "4", "3", "2", "1", "0"],
        "b knew a's three"
    );
    for ingest in [&a, &b] {
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
        assert_eq!(res.status(), 429, "the seventh, at either instance");
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_a_local_limiter_takes_over() {
    let TestEnv { pool, mut common } = test_env().await;
    common.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "no-redis").await;
    ingest_api::control::store::set_plan(&pool, t.id, "free", Some(3))
        .await
        .unwrap();
    at_window_start().await;
    for _ in 0..3 {
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
        assert_eq!(res.status(), 202, "still answering without Redis");
    }
    let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
    assert_eq!(res.status(), 429, "still limiting without Redis");
    ingest.stop().await.unwrap();
}

/// What `tenant`'s requests count in Redis on `port`, over every window.
async fn counted_in_redis(port: u16, tenant: shared::tenant::TenantId) -> u64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("tally:rl:{tenant}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut sum = 0;
    for key in keys {
        let n: u64 = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        sum += n;
    }
    sum
}

/// Redis going away after the services started: ingest keeps answering and limiting on its
/// own count (no 5xx, no wait past a Redis timeout), reads are served uncached; once Redis is
/// back the counts reach it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_gone_after_start_and_back() {
    let TestEnv { pool, mut common } = test_env().await;
    let mut redis = PrivateRedis::start();
    common.redis_url = redis.url();
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "redis-gone").await;
    ingest_api::control::store::set_plan(&pool, t.id, "free", Some(6))
        .await
        .unwrap();
    let overview = format!("{}/v1/dashboard/overview", query.url());
    get_json(&client, &overview, &t.read_key).await;
    let remaining = |res: &reqwest::Response| -> u32 {
        let header = &res.headers()["x-ratelimit-remaining"];
        header.to_str().unwrap().parse().unwrap()
    };
    at_window_start().await;
    let mut left = 6;
    for _ in 0..2 {
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
        assert_eq!(res.status(), 202);
        left = remaining(&res);
    }
    // Both reach Redis (an add that came back after the limiter stopped waiting for it
    // counts here as well, so `left` may be one lower than 4).
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted_in_redis(redis.port, t.id).await != 2 {
        assert!(Instant::now() < deadline, "counted in Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tokio::task::block_in_place(|| redis.kill());
    while left > 0 {
        let started = Instant::now();
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
        assert_eq!(res.status(), 202, "answered without Redis");
        assert_eq!(remaining(&res), left - 1);
        assert!(started.elapsed() < Duration::from_secs(2), "no long wait");
        left -= 1;
    }
    let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
    assert_eq!(res.status(), 429, "the limit holds without Redis");
    get_json(&client, &overview, &t.read_key).await;

    tokio::task::block_in_place(|| redis.up());
    let deadline = Instant::now() + Duration::from_secs(20);
    while counted_in_redis(redis.port, t.id).await == 0 {
        assert!(
            Instant::now() < deadline,
            "counts never reached Redis again"
        );
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
        assert!([202, 429].contains(&res.status().as_u16()), "{res:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    get_json(&client, &overview, &t.read_key).await;
    stop_all([ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoked_keys_and_deactivated_tenants_are_refused_within_the_cache_delay() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let revoked = create_tenant(&pool, "revoked-key").await;
    let gone = create_tenant(&pool, "deactivated").await;
    for t in [&revoked, &gone] {
        let res = post_events(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
        assert_eq!(res.status(), 202);
    }
    let key_id: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM control.api_keys WHERE tenant_id = $1 AND scope = 'ingest'",
    )
    .bind(revoked.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    ingest_api::control::store::revoke_api_key(&pool, "", key_id)
        .await
        .unwrap();
    ingest_api::control::store::set_status(&pool, "", gone.id, "deactivated")
        .await
        .unwrap();
    let since = Instant::now();
    let bound = shared::auth::KEY_CACHE_TTL + Duration::from_secs(2);
    let overview = format!("{}/v1/dashboard/overview", query.url());
    loop {
        let a = post_events(&client, &ingest.url(), &revoked.ingest_key, &one_event())
            .await
            .status();
        let b = post_events(&client, &ingest.url(), &gone.ingest_key, &one_event())
            .await
            .status();
        let c = client
            .get(&overview)
            .bearer_auth(&gone.read_key)
            .send()
            .await
            .unwrap()
            .status();
        if a == 401 && b == 401 && c == 401 {
            break;
        }
        for s in [a, b] {
            assert!(s == 202 || s == 401, "{s}");
        }
        assert!(
            since.elapsed() < bound,
            "still accepted after {:?} ({a} {b} {c})",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The revoked tenant's other key still works; a reactivated tenant works again.
    let res = client
        .get(&overview)
        .bearer_auth(&revoked.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    ingest_api::control::store::set_status(&pool, "", gone.id, "active")
        .await
        .unwrap();
    let res = post_events(&client, &ingest.url(), &gone.ingest_key, &one_event()).await;
    assert_eq!(
        res.status(),
        202,
        "unknown keys are not cached, so reactivation is immediate"
    );
    stop_all([ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_redis_dashboards_answer_uncached() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let mut no_redis = common.clone();
    no_redis.redis_url = format!("redis://127.0.0.1:{}", free_port());
    let query = start_query(&no_redis, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "cacheless").await;
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &one_event()).await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    for _ in 0..2 {
        let res = client
            .get(format!("{}/v1/dashboard/overview?range=1h", query.url()))
            .bearer_auth(&t.read_key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["x-cache"], "miss", "no cache without Redis");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["events_total"], 1);
    }
    stop_all([projector, ingest, query]).await;
}

/// A tenant's events are counted as well as its requests: a thousand a minute for each
/// request of its limit. With 3 requests a minute (3 000 events), an OTLP request of 3 500
/// points is a 413 (more than a minute allows) and is not counted, one of 2 500 points is
/// taken, and the next one, its third request, is refused whole (429 naming
/// events, with `Retry-After`), where before it counted as one request like any other (so a
/// free tenant's 100 requests could carry 5 million points a minute). Another tenant is
/// counted on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_events_are_counted_as_well_as_its_requests() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let limited = create_tenant(&pool, "events-limited").await;
    let other = create_tenant(&pool, "events-other").await;
    ingest_api::control::store::set_plan(&pool, limited.id, "free", Some(3))
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let points = |n: i64| {
        let points: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"timeUnixNano": (now - i * 1_000).to_string(), "asDouble": i}))
            .collect();
        serde_json::json!({"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "n",
            "gauge": {"dataPoints": points}}]}]}]})
    };
    let send = |key: String, body: serde_json::Value| {
        let req = client
            .post(format!("{}/v1/otlp/v1/metrics", ingest.url()))
            .bearer_auth(key)
            .json(&body);
        async move { req.send().await.unwrap() }
    };
    at_window_start().await;
    // More than the whole minute allows: a 413, not counted (a retry could never pass).
    let res = send(limited.ingest_key.clone(), points(3_500)).await;
    assert_eq!(res.status(), 413);
    let res = send(limited.ingest_key.clone(), points(2_500)).await;
    assert_eq!(res.status(), 200);
    let res = send(limited.ingest_key.clone(), points(2_500)).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    let problem: serde_json::Value = res.json().await.unwrap();
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("3000 events per minute"), "{problem}");
    let res = send(other.ingest_key.clone(), points(2_500)).await;
    assert_eq!(res.status(), 200, "another tenant is counted on its own");
    assert_eq!(metrics_topic_records(&common).await, 5_000);
    ingest.stop().await.unwrap();
}
