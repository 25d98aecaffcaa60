//! What a tenant keeps private: the text of prompts, which Claude Code sends when
//! `OTEL_LOG_USER_PROMPTS=1`, is dropped at the door (its length kept) unless the tenant
//! stores prompts, an opt-in that is audited; a command's arguments are dropped at every
//! door unless the tenant stores them.

use std::time::{Duration, Instant};

use serde_json::json;
use shared::apikey::Scope;
use tally_tests::*;
use uuid::Uuid;

/// Sends one session with `text` as its prompt through the Python OTel SDK.
async fn send_prompt(ingest: &str, key: &str, text: &str) {
    send_claude_code_telemetry(ingest, key, &["--sessions", "1", "--prompt-text", text]).await;
}

/// Waits until the tenant has `n` prompts projected (its schema first: the projector makes it
/// with the tenant's first batch).
async fn wait_for_prompts(pool: &sqlx::PgPool, tenant: shared::tenant::TenantId, n: i64) {
    wait_projected(pool, tenant, 1, Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while scalar_in_tenant(
        pool,
        tenant,
        "SELECT count(*) FROM metric_samples WHERE name = 'claude_code.user_prompt'",
    )
    .await
        < n
    {
        assert!(Instant::now() < deadline, "the prompt was not projected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompt_text_is_stored_only_where_the_tenant_opted_in() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let secret = format!("my-secret-plan-{}", Uuid::new_v4().simple());
    let contains =
        format!("SELECT count(*) FROM metric_samples WHERE data::text LIKE '%{secret}%'");

    // By default: the length is kept, the text is not.
    let private = create_tenant(&pool, "prompts-private").await;
    send_prompt(&ingest.url(), &private.ingest_key, &secret).await;
    wait_for_prompts(&pool, private.id, 1).await;
    assert_eq!(scalar_in_tenant(&pool, private.id, &contains).await, 0);
    assert_eq!(
        scalar_in_tenant(
            &pool,
            private.id,
            "SELECT count(*) FROM metric_samples WHERE name = 'claude_code.user_prompt' AND data->'labels'->>'prompt_length' = '42'",
        )
        .await,
        1
    );
    // Nor through the events door.
    let sample = json!({"type": "metric.sample", "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {"name": "claude_code.user_prompt", "value": 1.0, "labels": {"session.id": "s"},
                 "extra": {"prompt": secret}}});
    post_events_accepted(&client, &ingest.url(), &private.ingest_key, &sample).await;
    wait_for_prompts(&pool, private.id, 2).await;
    assert_eq!(scalar_in_tenant(&pool, private.id, &contains).await, 0);
    // Nor sent beside the sample's fields, where the decoding keeps unknown fields in `extra`.
    let sample = json!({"type": "metric.sample", "occurred_at": chrono::Utc::now().to_rfc3339(),
        "data": {"name": "claude_code.user_prompt", "value": 1.0, "prompt": secret}});
    post_events_accepted(&client, &ingest.url(), &private.ingest_key, &sample).await;
    wait_for_prompts(&pool, private.id, 3).await;
    assert_eq!(scalar_in_tenant(&pool, private.id, &contains).await, 0);

    // A tenant that opted in stores it, and the opt-in is in its audit log.
    let open = create_tenant(&pool, "prompts-stored").await;
    let (_, admin) =
        ingest_api::control::store::create_api_key(&pool, "", open.id, Scope::Admin, "settings")
            .await
            .unwrap();
    let (st, body) = status_and_json(
        client
            .patch(format!("{}/v1/admin/settings", ingest.url()))
            .bearer_auth(&admin)
            .json(&json!({"store_prompt_text": true})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["store_prompt_text"], true);
    assert_eq!(body["time_zone"], "UTC");
    send_prompt(&ingest.url(), &open.ingest_key, &secret).await;
    wait_for_prompts(&pool, open.id, 1).await;
    assert_eq!(scalar_in_tenant(&pool, open.id, &contains).await, 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while scalar_in_tenant(
        &pool,
        open.id,
        "SELECT count(*) FROM audit_log WHERE type = 'privacy.changed' AND detail = 'store_prompt_text = true'",
    )
    .await
        < 1
    {
        assert!(Instant::now() < deadline, "the opt-in was not audited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    stop_all([ingest, projector]).await;
}

/// Sends one sample carrying `secret` as a command's arguments through each door that takes
/// samples: remote write (a `tool_input` label), line protocol (a `command` tag) and the
/// events door (a `cmd` label).
async fn send_arguments(client: &reqwest::Client, ingest: &str, key: &str, secret: &str) {
    use ingest_api::formats::promrw::{Label, Sample, TimeSeries, WriteRequest};
    use prost::Message;
    let now = chrono::Utc::now();
    let label = |name: &str, value: &str| Label {
        name: name.into(),
        value: value.into(),
    };
    let write = WriteRequest {
        timeseries: vec![TimeSeries {
            labels: vec![
                label("__name__", "by_remote_write"),
                label("tool_input", secret),
            ],
            samples: vec![Sample {
                value: 1.0,
                timestamp: now.timestamp_millis(),
            }],
        }],
    };
    let body = snap::raw::Encoder::new()
        .compress_vec(&write.encode_to_vec())
        .unwrap();
    let res = client
        .post(format!("{ingest}/api/v1/write"))
        .bearer_auth(key)
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "snappy")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let line = format!(
        "by_line_protocol,command={secret} value=1 {}",
        now.timestamp_millis()
    );
    let res = client
        .post(format!("{ingest}/api/v2/write?precision=ms"))
        .header("authorization", format!("Token {key}"))
        .body(line)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let sample = json!({"type": "metric.sample", "occurred_at": now.to_rfc3339(),
        "data": {"name": "by_events", "value": 1.0, "labels": {"cmd": secret}}});
    post_events_accepted(client, ingest, key, &sample).await;
}

/// A command's arguments are dropped at every door that takes samples, not only at the
/// events and OTLP doors, unless the tenant stores them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn command_arguments_are_dropped_at_every_door() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let secret = format!("rm-rf-{}", Uuid::new_v4().simple());
    let contains =
        format!("SELECT count(*) FROM metric_samples WHERE data::text LIKE '%{secret}%'");

    let private = create_tenant(&pool, "arguments-private").await;
    let open = create_tenant(&pool, "arguments-stored").await;
    sqlx::query("UPDATE control.tenants SET store_command_text = true WHERE id = $1")
        .bind(open.id.0)
        .execute(&pool)
        .await
        .unwrap();
    for t in [&private, &open] {
        send_arguments(&client, &ingest.url(), &t.ingest_key, &secret).await;
        wait_projected(&pool, t.id, 3, Duration::from_secs(60)).await;
    }
    assert_eq!(scalar_in_tenant(&pool, private.id, &contains).await, 0);
    assert_eq!(scalar_in_tenant(&pool, open.id, &contains).await, 3);
    // What was run is kept: each sample is there, by its name.
    assert_eq!(
        scalar_in_tenant(
            &pool,
            private.id,
            "SELECT count(DISTINCT name) FROM metric_samples WHERE name LIKE 'by_%'"
        )
        .await,
        3
    );

    stop_all([ingest, projector]).await;
}

/// `GET {query}{path}` with `credential`: the status and the JSON answer.
async fn read(
    client: &reqwest::Client,
    query: &str,
    path: &str,
    credential: &str,
) -> (u16, serde_json::Value) {
    status_and_json(client.get(format!("{query}{path}")).bearer_auth(credential)).await
}

/// Waits until the tenant's audit log has an entry matching `condition`.
async fn wait_audited(pool: &sqlx::PgPool, t: &TestTenant, condition: &str) {
    let sql = format!("SELECT count(*) FROM audit_log WHERE {condition}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while scalar_in_tenant(pool, t.id, &sql).await < 1 {
        assert!(Instant::now() < deadline, "not audited: {condition}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn privacy_mode_shows_managers_only_groups_of_k_and_audits_reads_of_individuals() {
    use shared::jwt::Role;
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let (client, q, i) = (http(), query.url(), ingest.url());
    let t = create_tenant(&pool, "private-teams").await;
    create_member(&pool, &t, "owner", Role::Owner, &[]).await;
    create_member(&pool, &t, "admin", Role::Admin, &[]).await;
    create_member(&pool, &t, "mgr", Role::Manager, &["big", "small", "solo"]).await;
    let big: Vec<String> = (1..=6).map(|n| format!("big{n}")).collect();
    let small: Vec<String> = (1..=4).map(|n| format!("small{n}")).collect();
    for dev in &big {
        create_member(&pool, &t, dev, Role::Developer, &["big"]).await;
    }
    for dev in &small {
        create_member(&pool, &t, dev, Role::Developer, &["small"]).await;
    }
    let owner = member_token(&client, &i, &t, "owner").await;

    // Only owners turn privacy mode on; an admin's attempt is refused and audited.
    let admin = member_token(&client, &i, &t, "admin").await;
    let patch = |who: &str, body: serde_json::Value| {
        client
            .patch(format!("{i}/v1/admin/settings"))
            .bearer_auth(who)
            .json(&body)
    };
    let (st, body) = status_and_json(patch(&admin, json!({"privacy_mode": true}))).await;
    assert_eq!(st, 403, "{body}");
    let (st, body) = status_and_json(patch(&owner, json!({"privacy_k": 1}))).await;
    assert_eq!(st, 422, "{body}");
    assert_eq!(body["errors"][0]["field"], "privacy_k");
    let (st, body) = status_and_json(patch(&owner, json!({"privacy_mode": true}))).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["privacy_mode"], true);
    assert_eq!(body["privacy_k"], 5);

    // Yesterday every developer ran one 10 ms command in a session of their own, and again
    // today (a day not over, so not shown to readers of aggregates); three days ago big1
    // alone ran 7 more (a cell of one person); yesterday big1 alone used an agent ($2.50: a
    // type no one else in the cell sent); and someone with the ingest key made up four
    // people in the small team (ids no member carries) to lift it to k.
    let now = chrono::Utc::now();
    let yesterday = chrono::DateTime::<chrono::Utc>::from_naive_utc_and_offset(
        (now - chrono::TimeDelta::days(1))
            .date_naive()
            .and_hms_opt(12, 0, 0)
            .unwrap(),
        chrono::Utc,
    );
    let mut events = Vec::new();
    for dev in big.iter().chain(&small) {
        let team = if dev.starts_with("big") {
            "big"
        } else {
            "small"
        };
        let session = format!("s-{dev}");
        events.push(
            json!({"type": "session.started", "occurred_at": yesterday.to_rfc3339(),
            "data": {"user_id": dev, "team_id": team, "session_id": session}}),
        );
        for at in [yesterday, now - chrono::TimeDelta::seconds(30)] {
            let mut c = command(dev, "build", 10, true);
            c["id"] = json!(Uuid::now_v7());
            c["occurred_at"] = json!(at.to_rfc3339());
            c["data"]["team_id"] = json!(team);
            c["data"]["session_id"] = json!(session);
            events.push(c);
        }
    }
    for n in 0..7 {
        let mut c = command("big1", "deploy", 1000, true);
        c["occurred_at"] = json!((yesterday - chrono::TimeDelta::days(2)
            + chrono::TimeDelta::minutes(n))
        .to_rfc3339());
        c["data"]["team_id"] = json!("big");
        events.push(c);
    }
    events.push(
        json!({"type": "agent.interacted", "occurred_at": yesterday.to_rfc3339(),
        "data": {"user_id": "big1", "team_id": "big", "session_id": "s-big1",
                 "agent_name": "claude-code", "interaction_type": "api_request",
                 "input_tokens": 10, "output_tokens": 5, "cost_usd": 2.5, "duration_ms": 100,
                 "status": "success"}}),
    );
    for n in 1..=4 {
        let mut c = command(&format!("sybil{n}"), "build", 10, true);
        c["occurred_at"] = json!(yesterday.to_rfc3339());
        c["data"]["team_id"] = json!("small");
        events.push(c);
    }
    post_events_accepted(&client, &i, &t.ingest_key, &json!(events)).await;
    wait_projected(&pool, t.id, events.len() as i64, Duration::from_secs(60)).await;

    // The manager of both teams sees the 6-person team, not the 4-person one, nor the
    // day on which one person worked alone: whatever range, filter or grouping is asked.
    let mgr = member_token(&client, &i, &t, "mgr").await;
    let (st, access) = read(&client, &q, "/v1/dashboard/access", &mgr).await;
    assert_eq!(st, 200, "{access}");
    assert_eq!(access["individual_views"], false);
    assert_eq!(access["min_group"], 5);
    let (st, teams) = read(&client, &q, "/v1/dashboard/teams?range=7d", &mgr).await;
    assert_eq!(st, 200, "{teams}");
    let shown: Vec<(&str, i64)> = teams["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["team_id"].as_str().unwrap(),
                r["active_users"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shown, vec![("big", 6)], "{teams}");
    let mut totals = Vec::new();
    for path in [
        "/v1/dashboard/overview?range=24h",
        "/v1/dashboard/overview?range=7d",
        "/v1/dashboard/overview?range=30d",
    ] {
        let (st, o) = read(&client, &q, path, &mgr).await;
        assert_eq!(st, 200, "{path}: {o}");
        assert_eq!(o["min_group"], 5, "{path}");
        assert!(o["commands"]["duration_max_ms"].is_null(), "{path}: {o}");
        assert!(
            o["as_of"].is_null(),
            "{path}: the newest event's time is withheld"
        );
        assert_eq!(o["active_users"], 6, "{path}: {o}");
        assert_eq!(o["cost_usd"], 0.0, "{path}: big1's agent cost alone: {o}");
        assert!(
            o["to"].as_str().unwrap() <= now.to_rfc3339().as_str(),
            "{path}: {o}"
        );
        totals.push(o["commands"]["count"].as_i64().unwrap());
    }
    // The differencing attack: the 7-day total minus the 24-hour one would be big1's day
    // alone, any total minus the 6-person team's the 4-person team's (made up to 8 ids),
    // and a total read again later today's newest event.
    assert_eq!(totals, vec![6, 6, 6], "a difference isolates someone");
    // Nor does whether an answer was cached say when an event arrived somewhere in the
    // tenant; such a reader gets no validator either, only the answer.
    for _ in 0..2 {
        let res = client
            .get(format!("{q}/v1/dashboard/overview?range=7d"))
            .bearer_auth(&mgr)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        for withheld in ["x-cache", "etag"] {
            assert!(res.headers().get(withheld).is_none(), "{withheld} shown");
        }
    }
    // Within the first hour after midnight (UTC) the last hour reaches into yesterday, a day
    // that is over; otherwise none of it is.
    let (_, hour) = read(&client, &q, "/v1/dashboard/overview?range=1h", &mgr).await;
    let read_at = chrono::Utc::now();
    if (read_at - chrono::TimeDelta::hours(1)).date_naive() == read_at.date_naive() {
        assert_eq!(
            hour["events_total"], 0,
            "no day of the last hour is over: {hour}"
        );
    }
    let (_, agents) = read(
        &client,
        &q,
        "/v1/dashboard/timeseries?range=7d&bucket=1d&group_by=team&type=agent.interacted",
        &mgr,
    )
    .await;
    assert_eq!(
        series_total_count(&agents),
        0,
        "one person's type: {agents}"
    );
    let (st, series) = read(
        &client,
        &q,
        "/v1/dashboard/timeseries?range=7d&bucket=1h&group_by=team&type=command.executed",
        &mgr,
    )
    .await;
    assert_eq!(st, 200, "{series}");
    assert_eq!(series["bucket"], "1d", "privacy mode's series are daily");
    let groups: Vec<&str> = series["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["group"].as_str().unwrap_or("other"))
        .collect();
    assert_eq!(groups, vec!["big"], "{series}");
    assert_eq!(series_total_count(&series), 6);
    let (_, whole) = read(
        &client,
        &q,
        "/v1/dashboard/timeseries?range=7d&type=command.executed",
        &mgr,
    )
    .await;
    assert_eq!(series_total_count(&whole), 6, "{whole}");
    // Every view that would single someone out is refused, CSV included.
    for path in [
        "/v1/dashboard/productivity?range=7d",
        "/v1/dashboard/productivity?range=7d&format=csv",
        "/v1/dashboard/top?dimension=user&range=7d",
        "/v1/dashboard/top?dimension=command&range=7d",
        "/v1/dashboard/timeseries?group_by=user&range=7d",
        "/v1/dashboard/timeseries?group_by=project&range=7d",
        "/v1/dashboard/sessions?range=7d",
        "/v1/dashboard/sessions/s-big1/timeline",
        "/v1/dashboard/activity?user=big1",
        "/v1/dashboard/repositories?range=7d",
        "/v1/dashboard/pull-requests?range=7d",
        "/v1/dashboard/metrics?name=x&range=7d",
        "/v1/stream",
    ] {
        let (st, body) = read(&client, &q, path, &mgr).await;
        assert_eq!(st, 403, "{path}: {body}");
        assert_eq!(
            body["type"], "https://tally.dev/problems/privacy-mode",
            "{path}"
        );
    }
    // Nor can the manager watch a team of fewer than k members (here only themself) through
    // an alert rule's values.
    let rule = |team: &str| {
        json!({"name": format!("{team} silence"), "kind": "silence", "scope": "team",
               "scope_id": team, "window_minutes": 60})
    };
    for (team, status) in [("solo", 403), ("big", 201)] {
        let (st, body) = status_and_json(
            client
                .post(format!("{i}/v1/admin/rules"))
                .bearer_auth(&mgr)
                .json(&rule(team)),
        )
        .await;
        assert_eq!(st, status, "{team}: {body}");
    }
    // A read key is held to the same rule.
    let (_, o) = read(&client, &q, "/v1/dashboard/overview?range=7d", &t.read_key).await;
    assert_eq!(o["commands"]["count"], 6, "{o}");
    let (st, _) = read(&client, &q, "/v1/dashboard/productivity", &t.read_key).await;
    assert_eq!(st, 403);

    // A developer sees their own detail, and only theirs.
    let dev = member_token(&client, &i, &t, "big1").await;
    let (st, mine) = read(&client, &q, "/v1/dashboard/productivity?range=7d", &dev).await;
    assert_eq!(st, 200, "{mine}");
    let users: Vec<&str> = mine["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["big1"]);
    assert_eq!(mine["users"][0]["commands"], 9);
    let (st, own) = read(&client, &q, "/v1/dashboard/sessions/s-big1/timeline", &dev).await;
    assert_eq!(st, 200, "{own}");
    let (st, _) = read(&client, &q, "/v1/dashboard/sessions/s-big2/timeline", &dev).await;
    assert_eq!(st, 404);

    // The owner may see individuals (the default), and each such read is audited: who,
    // whose, what. Their own reads of aggregates are not.
    let (st, everyone) = read(&client, &q, "/v1/dashboard/productivity?range=7d", &owner).await;
    assert_eq!(st, 200, "{everyone}");
    assert_eq!(
        everyone["total"], 14,
        "the ten members and the four made-up ids"
    );
    let (st, timeline) = read(
        &client,
        &q,
        "/v1/dashboard/sessions/s-big2/timeline",
        &owner,
    )
    .await;
    assert_eq!(st, 200, "{timeline}");
    let owner_id: Uuid = sqlx::query_scalar(
        "SELECT id FROM control.users WHERE tenant_id = $1 AND external_id = 'owner'",
    )
    .bind(t.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    wait_audited(
        &pool,
        &t,
        &format!(
            "type = 'privacy.individual_read' AND user_id = '{owner_id}' AND target = 'big2' \
             AND detail = 'timeline of session s-big2'"
        ),
    )
    .await;
    wait_audited(
        &pool,
        &t,
        "type = 'privacy.individual_read' AND detail = 'productivity' AND target LIKE '%small4%'",
    )
    .await;
    let developer_reads = scalar_in_tenant(
        &pool,
        t.id,
        "SELECT count(*) FROM audit_log WHERE type = 'privacy.individual_read' AND target = 'big1'",
    )
    .await;
    assert_eq!(
        developer_reads, 0,
        "a developer's reads of their own data are not audited"
    );

    // When the tenant withdraws that, owners see aggregates only (within the caches' 10 s).
    let (st, _) = status_and_json(patch(
        &owner,
        json!({"privacy_admins_see_individuals": false}),
    ))
    .await;
    assert_eq!(st, 200);
    let since = Instant::now();
    loop {
        let (st, _) = read(&client, &q, "/v1/dashboard/productivity", &owner).await;
        if st == 403 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "owners still see individuals"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_audited(
        &pool,
        &t,
        "type = 'privacy.changed' AND detail = 'privacy_admins_see_individuals = false'",
    )
    .await;
    // Nor can an admin then watch one person through a budget's notifications.
    let (st, body) = status_and_json(
        client
            .post(format!("{i}/v1/admin/budgets"))
            .bearer_auth(&admin)
            .json(&json!({"name": "big1", "scope": "user", "scope_id": "big1",
                          "metric": "cost_usd", "period": "day", "amount": 1.0})),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    // And no one gets an account that sees big1's data as their own.
    let (st, body) = status_and_json(
        client
            .post(format!("{i}/v1/admin/users"))
            .bearer_auth(&owner)
            .json(&json!({"email": format!("stand-in@{}.example.com", t.id),
                          "password": MEMBER_PASSWORD, "role": "developer",
                          "external_id": "big1"})),
    )
    .await;
    assert_eq!(st, 409, "{body}");

    stop_all([query, ingest, projector]).await;
}

/// The sum of `count` over every point of every series of a time series answer.
fn series_total_count(series: &serde_json::Value) -> i64 {
    series["series"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["points"].as_array().into_iter().flatten())
        .map(|p| p["count"].as_i64().unwrap_or(0))
        .sum()
}
