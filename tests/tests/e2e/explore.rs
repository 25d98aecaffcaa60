//! Top-N lists and the activity feed, with exact contents, cursor pagination and filters.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_lists_and_the_activity_feed() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "explore").await;

    let mut events: Vec<Value> = Vec::new();
    for i in 0..5 {
        events.push(command("u1", "build", 100 + i, i != 0));
    }
    for _ in 0..3 {
        events.push(command("u2", "test", 50, true));
    }
    events.push(command("u2", "lint", 9000, true));
    for _ in 0..2 {
        events.push(
            json!({"type": "agent.interacted", "occurred_at": ago(30), "data": {
            "user_id": "u1", "agent_name": "claude", "interaction_type": "chat",
            "input_tokens": 10, "output_tokens": 5, "duration_ms": 700, "status": "success"}}),
        );
    }
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(events)).await;
    wait_projected(&pool, t.id, 11, Duration::from_secs(60)).await;

    let get = |path: String| {
        let client = client.clone();
        let key = t.read_key.clone();
        let url = format!("{}{path}", query.url());
        async move {
            let res = client.get(&url).bearer_auth(&key).send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let keys = |v: &Value| -> Vec<(String, i64)> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["key"].as_str().unwrap().to_string(),
                    i["count"].as_i64().unwrap(),
                )
            })
            .collect()
    };

    let (s, top) = get("/v1/dashboard/top?range=1h&dimension=command".into()).await;
    assert_eq!(s, 200, "{top}");
    assert_eq!(
        keys(&top),
        vec![("build".into(), 5), ("test".into(), 3), ("lint".into(), 1)]
    );
    assert_eq!(top["items"][0]["errors"], 1);
    let (_, by_duration) =
        get("/v1/dashboard/top?range=1h&dimension=command&by=duration&limit=1".into()).await;
    assert_eq!(keys(&by_duration), vec![("lint".into(), 1)]);
    assert_eq!(by_duration["items"][0]["duration_max_ms"], 9000);
    let (_, by_errors) =
        get("/v1/dashboard/top?range=1h&dimension=command&by=errors&limit=1".into()).await;
    assert_eq!(keys(&by_errors), vec![("build".into(), 5)]);
    let (_, users) = get("/v1/dashboard/top?range=1h&dimension=user".into()).await;
    assert_eq!(keys(&users), vec![("u1".into(), 7), ("u2".into(), 4)]);
    let (_, agents) = get("/v1/dashboard/top?range=1h&dimension=agent".into()).await;
    assert_eq!(keys(&agents), vec![("claude".into(), 2)]);

    // The feed, 4 at a time: every event exactly once, newest first.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/dashboard/activity?range=1h&limit=4&cursor={c}"),
            None => "/v1/dashboard/activity?range=1h&limit=4".into(),
        };
        let (s, page) = get(path).await;
        assert_eq!(s, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        seen.extend(items.iter().map(|i| {
            // Parsed, not compared as text: a time's fraction is printed with 0, 3, 6 or 9
            // digits, and ".123Z" sorts after ".123456Z" as text.
            (
                i["occurred_at"]
                    .as_str()
                    .unwrap()
                    .parse::<DateTime<Utc>>()
                    .unwrap(),
                i["event_id"]
                    .as_str()
                    .unwrap()
                    .parse::<uuid::Uuid>()
                    .unwrap(),
            )
        }));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 11);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        11,
        "no event twice"
    );
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    for (filter, n) in [
        ("type=agent.interacted", 2),
        ("user=u2", 4),
        ("status=error", 1),
        ("name=lint", 1),
        ("user=%27%20OR%201%3D1%20--", 0),
    ] {
        let (s, page) = get(format!("/v1/dashboard/activity?range=1h&{filter}")).await;
        assert_eq!(s, 200);
        assert_eq!(page["items"].as_array().unwrap().len(), n, "{filter}");
    }

    for bad in [
        "/v1/dashboard/top?dimension=planet",
        "/v1/dashboard/top?by=loudness",
        "/v1/dashboard/top?limit=0",
        "/v1/dashboard/top?dimension=tool&type=command.executed",
        "/v1/dashboard/activity?cursor=garbage",
        "/v1/dashboard/activity?limit=5000",
        "/v1/dashboard/activity?type=auth.login_succeeded",
    ] {
        let (s, _) = get(bad.into()).await;
        assert_eq!(s, 400, "{bad}");
    }
    stop_all([projector, ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn productivity_scores_and_team_ranks_follow_the_formula() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "scores").await;
    let mut events: Vec<Value> = Vec::new();
    for _ in 0..10 {
        let mut e = command("u1", "build", 1000, true);
        e["data"]["team_id"] = json!("team-a");
        events.push(e);
    }
    for i in 0..10 {
        let mut e = command("u2", "build", 10_000, i % 2 == 0);
        e["data"]["team_id"] = json!("team-b");
        events.push(e);
    }
    for agent in ["claude", "reviewer"] {
        events.push(
            json!({"type": "agent.interacted", "occurred_at": ago(30), "data": {
            "user_id": "u1", "team_id": "team-a", "agent_name": agent, "interaction_type": "chat",
            "duration_ms": 10, "status": "success"}}),
        );
    }
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(events)).await;
    wait_projected(&pool, t.id, 22, Duration::from_secs(60)).await;

    let res = client
        .get(format!(
            "{}/v1/dashboard/productivity?range=1h",
            query.url()
        ))
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let p: Value = res.json().await.unwrap();
    let users = p["users"].as_array().unwrap();
    // u1: 40·1 + 30·min(1, 5000/1000) + 20·(2/10) + 10·(10/50) = 76
    // u2: 40·0.5 + 30·(5000/10000) + 0 + 10·(10/50) = 37
    assert_eq!(
        (users[0]["user_id"].as_str(), users[0]["score"].as_f64()),
        (Some("u1"), Some(76.0))
    );
    assert_eq!(
        (users[1]["user_id"].as_str(), users[1]["score"].as_f64()),
        (Some("u2"), Some(37.0))
    );
    assert_eq!(users[1]["success_rate"], 0.5);
    assert_eq!(users[0]["distinct_agents"], 2);
    assert!(p["formula"].as_str().unwrap().contains("5000 ms"));

    let res = client
        .get(format!("{}/v1/dashboard/teams?range=1h", query.url()))
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    let teams: Value = res.json().await.unwrap();
    let teams = teams["teams"].as_array().unwrap();
    assert_eq!(teams.len(), 2);
    assert_eq!(
        (
            teams[0]["team_id"].as_str(),
            teams[0]["rank"].as_i64(),
            teams[0]["percentile"].as_f64()
        ),
        (Some("team-a"), Some(1), Some(100.0))
    );
    assert_eq!(
        (
            teams[1]["team_id"].as_str(),
            teams[1]["rank"].as_i64(),
            teams[1]["percentile"].as_f64()
        ),
        (Some("team-b"), Some(2), Some(0.0))
    );
    assert_eq!(teams[0]["score"], 76.0);
    let res = client
        .get(format!("{}/v1/dashboard/teams?range=forever", query.url()))
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    stop_all([projector, ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_metric_series_and_csv_export() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "tables").await;
    let mut events = vec![
        json!({"type": "session.started", "occurred_at": ago(600), "data": {"session_id": "s1", "user_id": "u1"}}),
        json!({"type": "session.ended", "occurred_at": ago(300), "data": {"session_id": "s1", "user_id": "u1", "commands_executed": 7, "productivity_score": 81}}),
        json!({"type": "session.started", "occurred_at": ago(200), "data": {"session_id": "s2", "user_id": "u2"}}),
        command("u1", "build, \"quoted\"", 5, true),
    ];
    for _ in 0..3 {
        events.push(json!({"type": "metric.sample", "occurred_at": ago(120), "data": {"name": "claude_code.token.usage", "labels": {"type": "input", "user.id": "u1"}, "value": 100, "kind": "counter"}}));
    }
    for _ in 0..2 {
        events.push(json!({"type": "metric.sample", "occurred_at": ago(90), "data": {"name": "claude_code.token.usage", "labels": {"type": "output", "user.id": "u1"}, "value": 50, "kind": "counter"}}));
    }
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(events)).await;
    wait_projected(&pool, t.id, 9, Duration::from_secs(60)).await;
    let get = |path: &str| {
        client
            .get(format!("{}{path}", query.url()))
            .bearer_auth(&t.read_key)
            .send()
    };

    // Sessions, newest first, paged.
    let page: Value = get("/v1/dashboard/sessions?range=1h&limit=1")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["sessions"][0]["session_id"], "s2");
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let page: Value = get(&format!(
        "/v1/dashboard/sessions?range=1h&limit=1&cursor={cursor}"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let s1 = &page["sessions"][0];
    assert_eq!(
        (
            s1["session_id"].as_str(),
            s1["commands_executed"].as_i64(),
            s1["productivity_score"].as_f64()
        ),
        (Some("s1"), Some(7), Some(81.0))
    );
    assert!((s1["duration_s"].as_f64().unwrap() - 300.0).abs() < 1.0);
    let page: Value = get("/v1/dashboard/sessions?range=1h&user=u2")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["sessions"].as_array().unwrap().len(), 1);

    // metric.sample series: aggregation, label matchers, grouping by a label.
    let total = series_total;
    let m: Value = get("/v1/dashboard/metrics?range=1h&name=claude_code.token.usage&step=5m")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(total(&m), 400.0);
    let m: Value =
        get("/v1/dashboard/metrics?range=1h&name=claude_code.token.usage&labels=type=input")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert_eq!(total(&m), 300.0);
    let m: Value = get("/v1/dashboard/metrics?range=1h&name=claude_code.token.usage&agg=count")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(total(&m), 5.0);
    let m: Value = get("/v1/dashboard/metrics?range=1h&name=claude_code.token.usage&group_by=type")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let groups: Vec<(String, f64)> = m["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["group"].as_str().unwrap().to_string(),
                s["points"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p[1].as_f64().unwrap())
                    .sum(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![("input".into(), 300.0), ("output".into(), 100.0)]
    );
    for bad in [
        "/v1/dashboard/metrics?range=1h",
        "/v1/dashboard/metrics?name=x&agg=median",
        "/v1/dashboard/metrics?name=x&labels=novalue",
        "/v1/dashboard/metrics?name=x&step=1m&range=90d",
    ] {
        assert_eq!(get(bad).await.unwrap().status(), 400, "{bad}");
    }

    // CSV export of table answers, with quoting.
    let res = get("/v1/dashboard/top?range=1h&dimension=command&format=csv")
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/csv; charset=utf-8");
    let text = res.text().await.unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert!(
        header.contains(&"key") && header.contains(&"count") && header.contains(&"errors"),
        "{text}"
    );
    let row = lines.next().unwrap();
    assert!(
        row.contains("\"build, \"\"quoted\"\"\""),
        "quoted per RFC 4180: {row}"
    );
    assert_eq!(lines.next(), None);
    let text = get("/v1/dashboard/sessions?range=1h&format=csv")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert_eq!(
        get("/v1/dashboard/activity?format=xml")
            .await
            .unwrap()
            .status(),
        400
    );
    stop_all([projector, ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn times_outside_the_calendar_are_refused_and_csv_formulas_neutralised() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "hostile-cells").await;
    let formula = "=HYPERLINK(\"http://evil.example\",\"open\")";
    let events = vec![
        command("@evil", formula, 5, true),
        command("u1", "+cmd|' /C calc'!A0", 5, false),
        command("u1", "-2+3", 5, true),
    ];
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(events)).await;
    wait_projected(&pool, t.id, 3, Duration::from_secs(60)).await;
    let get = |path: &str| {
        client
            .get(format!("{}{path}", query.url()))
            .bearer_auth(&t.read_key)
            .send()
    };

    // Out of chrono's range (and of anything stored): a 400 naming the field, not a panic.
    for (path, field) in [
        ("/v1/dashboard/overview?from=0001-01-01T00:00:00Z", "from"),
        (
            "/v1/dashboard/timeseries?from=2026-01-01T00:00:00Z&to=9999-12-31T23:59:59Z",
            "to",
        ),
        (
            "/v1/dashboard/top?from=1600-01-01T00:00:30Z&to=1600-01-02T00:00:00Z",
            "from",
        ),
        (
            "/v1/dashboard/activity?from=1000-01-01T00:00:00Z&to=1000-01-01T01:00:00Z",
            "from",
        ),
        ("/v1/dashboard/teams?from=9000-01-01T00:00:00Z", "from"),
    ] {
        let res = get(path).await.unwrap();
        assert_eq!(res.status(), 400, "{path}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{path}: {problem}");
    }
    // The service is still up.
    assert_eq!(
        get("/v1/dashboard/overview?range=1h")
            .await
            .unwrap()
            .status(),
        200
    );

    // No CSV cell starts with a character a spreadsheet would run as a formula.
    for path in [
        "/v1/dashboard/top?range=1h&dimension=command&format=csv",
        "/v1/dashboard/top?range=1h&dimension=user&format=csv",
        "/v1/dashboard/activity?range=1h&format=csv",
        "/v1/dashboard/productivity?range=1h&format=csv",
    ] {
        let res = get(path).await.unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let text = res.text().await.unwrap();
        for line in text.lines() {
            for cell in csv_cells(line) {
                assert!(
                    !cell.starts_with(['=', '+', '-', '@', '\t', '\r'])
                        || cell.parse::<f64>().is_ok(),
                    "{path}: cell {cell:?} in {text}"
                );
            }
        }
        if path.contains("dimension=command") || path.contains("activity") {
            assert!(
                text.contains("'=HYPERLINK(") && text.contains("'+cmd|"),
                "{text}"
            );
            assert!(text.contains("'-2+3"), "{text}");
        }
        if path.contains("dimension=user") || path.contains("activity") {
            assert!(text.contains("'@evil"), "{text}");
        }
    }
    stop_all([projector, ingest, query]).await;
}

/// The cells of one CSV line (RFC 4180 quoting undone).
fn csv_cells(line: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let (mut quoted, mut chars) = (false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                cells.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => cells.push(String::new()),
            (c, _) => cells.last_mut().unwrap().push(c),
        }
    }
    cells
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_series_are_capped_and_rankings_paginated() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |c| c.max_series = 2).await;
    let client = http();
    let t = create_tenant(&pool, "many-groups").await;
    let mut events = Vec::new();
    for (user, n) in [("u-a", 5), ("u-b", 4), ("u-c", 3), ("u-d", 1)] {
        for i in 0..n {
            let mut e = command(user, "build", 1000 * (i + 1), i % 2 == 0);
            e["data"]["team_id"] = json!(format!("team-{user}"));
            events.push(e);
        }
    }
    // Samples of one metric: label `k` a ×3, b ×2, c ×1, and one without the label.
    for (k, value) in [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 10),
        ("b", 20),
        ("c", 7),
        ("", 4),
    ] {
        let labels = if k.is_empty() {
            json!({})
        } else {
            json!({"k": k})
        };
        events.push(
            json!({"type": "metric.sample", "occurred_at": ago(60), "data": {
            "name": "many.labels", "labels": labels, "value": value, "kind": "gauge"}}),
        );
    }
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(events)).await;
    wait_projected(&pool, t.id, 20, Duration::from_secs(60)).await;
    let get = |path: String| {
        let client = client.clone();
        let url = format!("{}{path}", query.url());
        let key = t.read_key.clone();
        async move { client.get(url).bearer_auth(key).send().await.unwrap() }
    };
    let counts = |ts: &Value| -> Vec<(Value, bool, i64)> {
        ts["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let total = s["points"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["count"].as_i64().unwrap())
                    .sum();
                (s["group"].clone(), s["other"] == true, total)
            })
            .collect()
    };

    let ts: Value = get(
        "/v1/dashboard/timeseries?range=1h&bucket=1h&group_by=user&type=command.executed".into(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(ts["groups"], 4, "{ts}");
    assert_eq!(
        counts(&ts),
        vec![
            (json!("u-a"), false, 5),
            (json!("u-b"), false, 4),
            (Value::Null, true, 4)
        ],
        "{ts}"
    );
    let ts: Value = get(
        "/v1/dashboard/timeseries?range=1h&bucket=1h&group_by=user&limit=1&type=command.executed"
            .into(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        counts(&ts),
        vec![(json!("u-a"), false, 5), (Value::Null, true, 8)],
        "{ts}"
    );
    let res = get("/v1/dashboard/timeseries?range=1h&group_by=user&limit=3".into()).await;
    assert_eq!(res.status(), 400);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["errors"][0]["field"], "limit");
    // Without group_by: one series, never an `other`.
    let ts: Value = get("/v1/dashboard/timeseries?range=1h&bucket=1h&type=command.executed".into())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(counts(&ts), vec![(Value::Null, false, 13)], "{ts}");

    // metric.sample series by a label: the two most sampled values, then the rest together
    // (c and the samples without the label), aggregated over their samples.
    let lines = |m: &Value| -> Vec<(Value, bool, f64)> {
        m["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let points = s["points"].as_array().unwrap();
                let v = match m["agg"].as_str() {
                    Some("max") => points
                        .iter()
                        .map(|p| p[1].as_f64().unwrap())
                        .fold(f64::MIN, f64::max),
                    _ => points.iter().map(|p| p[1].as_f64().unwrap()).sum(),
                };
                (s["group"].clone(), s["other"] == true, v)
            })
            .collect()
    };
    let m: Value = get("/v1/dashboard/metrics?range=1h&step=1h&name=many.labels&group_by=k".into())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(m["groups"], 4, "{m}");
    assert_eq!(
        lines(&m),
        vec![
            (json!("a"), false, 6.0),
            (json!("b"), false, 30.0),
            (Value::Null, true, 11.0)
        ],
        "{m}"
    );
    let m: Value = get(
        "/v1/dashboard/metrics?range=1h&step=1h&name=many.labels&group_by=k&agg=max&limit=1".into(),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(
        lines(&m),
        vec![(json!("a"), false, 3.0), (Value::Null, true, 20.0)],
        "{m}"
    );
    let res =
        get("/v1/dashboard/metrics?range=1h&name=many.labels&group_by=k&limit=3".into()).await;
    assert_eq!(res.status(), 400);

    // Productivity and teams, page by page, give the one-page list in the same order.
    for (endpoint, field, key) in [
        ("productivity", "users", "user_id"),
        ("teams", "teams", "team_id"),
    ] {
        let whole: Value = get(format!("/v1/dashboard/{endpoint}?range=1h"))
            .await
            .json()
            .await
            .unwrap();
        let all: Vec<Value> = whole[field].as_array().unwrap().clone();
        assert_eq!(
            (all.len(), whole["total"].as_i64()),
            (4, Some(4)),
            "{whole}"
        );
        assert!(whole["next_cursor"].is_null());
        let mut paged: Vec<Value> = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/dashboard/{endpoint}?range=1h&limit=3&cursor={c}"),
                None => format!("/v1/dashboard/{endpoint}?range=1h&limit=3"),
            };
            let page: Value = get(path).await.json().await.unwrap();
            let rows = page[field].as_array().unwrap();
            assert!(rows.len() <= 3, "{page}");
            paged.extend(rows.iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
            assert!(paged.len() < 10, "pagination does not end");
        }
        let keys = |rows: &[Value]| rows.iter().map(|r| r[key].clone()).collect::<Vec<_>>();
        assert_eq!(keys(&paged), keys(&all), "{endpoint}");
        assert_eq!(paged, all, "{endpoint}");
        for bad in ["limit=0", "limit=1001", "cursor=nonsense"] {
            let res = get(format!("/v1/dashboard/{endpoint}?range=1h&{bad}")).await;
            assert_eq!(res.status(), 400, "{endpoint} {bad}");
        }
    }
    stop_all([projector, ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_past_the_statement_timeout_answers_503() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    // A second: the reads that must succeed (a cold first one among them) stay well inside it on
    // a starved machine, and a read under the lock still answers within seconds.
    let query = start_query(&common, |c| c.statement_timeout_ms = 1000).await;
    let client = http();
    let t = create_tenant(&pool, "slow-reads").await;
    post_events_accepted(
        &client,
        &ingest.url(),
        &t.ingest_key,
        &command("u1", "build", 5, true),
    )
    .await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    let overview = format!("{}/v1/dashboard/overview?range=1h", query.url());
    // Reads work (over another range than the one read under the lock below: a cached
    // answer is served without touching the tables).
    let res = client
        .get(format!("{}/v1/dashboard/overview?range=24h", query.url()))
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Something holds the projection's tables (a long migration, a lock): every read waits.
    let blocker = lock_projection(&pool, t.id).await;
    let started = std::time::Instant::now();
    let res = client
        .get(&overview)
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: Value = res.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("longer"),
        "{problem}"
    );
    assert!(waited < Duration::from_secs(4), "answered after {waited:?}");
    blocker.rollback().await.unwrap();
    let res = client
        .get(&overview)
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    stop_all([projector, ingest, query]).await;
}
