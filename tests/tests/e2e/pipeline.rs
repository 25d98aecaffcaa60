//! Events of two tenants reach each tenant's dashboards with exact counts and sums, and
//! neither tenant sees the other's data.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Duration as Span;
use serde_json::Value;
use tally_tests::events::Generator;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_tenants_see_exact_and_separate_numbers() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();

    let a = create_tenant(&pool, "tenant-a").await;
    let b = create_tenant(&pool, "tenant-b").await;
    let mut gen_a = Generator::new(1, "a", 7, Span::hours(3));
    let mut gen_b = Generator::new(2, "b", 3, Span::hours(3));
    for _ in 0..5 {
        let res = post_events(
            &client,
            &ingest.url(),
            &a.ingest_key,
            &Value::Array(gen_a.batch(400)),
        )
        .await;
        assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
        let res = post_events(
            &client,
            &ingest.url(),
            &b.ingest_key,
            &Value::Array(gen_b.batch(150)),
        )
        .await;
        assert_eq!(res.status(), 202);
    }
    wait_projected(&pool, a.id, 2000, Duration::from_secs(60)).await;
    wait_projected(&pool, b.id, 750, Duration::from_secs(60)).await;

    for (tenant, gen) in [(&a, &gen_a), (&b, &gen_b)] {
        let exp = &gen.expected;
        let o = get_json(
            &client,
            &format!("{}/v1/dashboard/overview?range=24h", query.url()),
            &tenant.read_key,
        )
        .await;
        assert_eq!(o["tenant_id"], tenant.id.to_string());
        assert_eq!(o["events_total"], exp.total, "{o}");
        let per_type: BTreeMap<String, i64> = serde_json::from_value(o["events"].clone()).unwrap();
        assert_eq!(per_type, exp.per_type);
        assert_eq!(o["commands"]["errors"], exp.command_errors);
        assert_eq!(o["commands"]["duration_sum_ms"], exp.command_duration_sum);
        assert_eq!(o["tokens"]["input"], exp.agent_input_tokens);
        assert_eq!(o["tokens"]["output"], exp.agent_output_tokens);
        assert_eq!(o["tools"]["errors"], exp.tool_errors);
        assert_eq!(o["active_users"], exp.users.len() as i64);
        assert_eq!(
            o["sessions"],
            exp.per_type.get("session.started").copied().unwrap_or(0)
        );
        assert!(o["as_of"].is_string(), "as_of is reported: {o}");
        let p95 = o["commands"]["duration_p95_ms"].as_f64().unwrap();
        assert!(p95 > 0.0 && p95 <= 20_000.0 * 1.125, "{p95}");

        // Time series grouped by user: per-user totals equal what was sent.
        let ts = get_json(
            &client,
            &format!(
                "{}/v1/dashboard/timeseries?range=24h&bucket=15m&group_by=user",
                query.url()
            ),
            &tenant.read_key,
        )
        .await;
        let mut per_user: BTreeMap<String, i64> = BTreeMap::new();
        for s in ts["series"].as_array().unwrap() {
            let total: i64 = s["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["count"].as_i64().unwrap())
                .sum();
            per_user.insert(s["group"].as_str().unwrap().to_string(), total);
        }
        assert_eq!(per_user, exp.per_user, "time series by user");

        // Commands by name, hourly: counts add up to the commands sent.
        let ts = get_json(
            &client,
            &format!(
                "{}/v1/dashboard/timeseries?range=24h&bucket=1h&group_by=command",
                query.url()
            ),
            &tenant.read_key,
        )
        .await;
        assert_eq!(ts["type"], "command.executed");
        let commands: i64 = ts["series"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["points"].as_array().unwrap().iter())
            .map(|p| p["count"].as_i64().unwrap())
            .sum();
        assert_eq!(commands, exp.per_type["command.executed"]);
    }

    // Neither tenant's answers mention the other's users.
    let ts_b = get_json(
        &client,
        &format!(
            "{}/v1/dashboard/timeseries?range=24h&bucket=1h&group_by=user",
            query.url()
        ),
        &b.read_key,
    )
    .await;
    for s in ts_b["series"].as_array().unwrap() {
        assert!(
            s["group"].as_str().unwrap().starts_with("b-user-"),
            "tenant B sees {s}"
        );
    }

    // A cached answer is served again until the projection moves. The window is named, not
    // `range=24h`: that one moves with each minute, and two requests a minute apart are
    // two different questions.
    let now = chrono::Utc::now();
    let hour = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:00:00Z").to_string();
    let url = format!(
        "{}/v1/dashboard/overview?from={}&to={}",
        query.url(),
        hour(now - chrono::TimeDelta::hours(25)),
        hour(now + chrono::TimeDelta::hours(2)),
    );
    let first = client
        .get(&url)
        .bearer_auth(&a.read_key)
        .send()
        .await
        .unwrap();
    let second = client
        .get(&url)
        .bearer_auth(&a.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        second.headers()["x-cache"],
        "hit",
        "first was {:?}",
        first.headers().get("x-cache")
    );
    // That a hit opens no PostgreSQL transaction is measured on a counter of the whole
    // process, so in a test binary of its own: `tests/tests/cache.rs`.
    post_events_accepted(
        &client,
        &ingest.url(),
        &a.ingest_key,
        &Value::Array(vec![command("a-user-0", "build", 5, true)]),
    )
    .await;
    wait_projected(&pool, a.id, 2001, Duration::from_secs(30)).await;
    let after = get_json(&client, &url, &a.read_key).await;
    assert_eq!(
        after["events_total"],
        gen_a.expected.total + 1,
        "cache never serves older than the projection"
    );

    stop_all([projector, ingest, query]).await;
}
