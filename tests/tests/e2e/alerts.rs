//! Budgets and their notifications: thresholds crossed by real events fire once each,
//! signed as Standard Webhooks describes, within seconds of the event that crossed; the
//! forecast names when the budget runs out; channels cannot point at private addresses; and
//! another tenant sees none of it.

use std::time::{Duration, Instant};

use chrono::{DateTime, Timelike, Utc};
use serde_json::{json, Value};
use shared::apikey::Scope;
use tally_tests::receiver::Receiver;
use tally_tests::*;
use uuid::Uuid;

/// A time zone in which it is now between 02:00 and 03:00, so that a forecast made from
/// the last hour's spend falls on the same local day whatever the hour of the run.
fn early_morning_zone() -> String {
    let mut offset = 2 - Utc::now().hour() as i32;
    if offset < -12 {
        offset += 24;
    }
    if offset > 14 {
        offset -= 24;
    }
    match offset {
        0 => "UTC".into(),
        // POSIX signs: Etc/GMT-5 is five hours ahead of UTC.
        o if o > 0 => format!("Etc/GMT-{o}"),
        o => format!("Etc/GMT+{}", -o),
    }
}

fn spend(dollars: f64) -> Value {
    json!([{
        "id": Uuid::new_v4(), "type": "agent.interacted", "occurred_at": Utc::now().to_rfc3339(),
        "data": {"user_id": "dev-1", "team_id": "team-a", "session_id": "s1", "agent_name": "claude",
                 "interaction_type": "chat", "input_tokens": 1000, "output_tokens": 100,
                 "model": "claude-sonnet", "cost_usd": dollars, "duration_ms": 900,
                 "status": "success"}
    }])
}

async fn admin_key(pool: &sqlx::PgPool, tenant: &TestTenant) -> String {
    ingest_api::control::store::create_api_key(pool, "", tenant.id, Scope::Admin, "alerts")
        .await
        .unwrap()
        .1
}

async fn send(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client.request(method, url).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    status_and_json(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_team_budget_fires_each_threshold_once_signed_and_within_seconds() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let tenant = create_tenant(&pool, "alerts").await;
    let admin = admin_key(&pool, &tenant).await;
    let receiver = Receiver::start().await;
    let api = |path: &str| format!("{}/v1/admin/{path}", ingest.url());

    let zone = early_morning_zone();
    let (st, body) = send(
        &client,
        reqwest::Method::PATCH,
        api("settings"),
        &admin,
        Some(json!({"time_zone": zone})),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (st, body) = send(
        &client,
        reqwest::Method::PATCH,
        api("settings"),
        &admin,
        Some(json!({"time_zone": "Mars/Olympus"})),
    )
    .await;
    assert_eq!(
        (st, body["errors"][0]["field"].as_str()),
        (422, Some("time_zone")),
        "{body}"
    );

    // Channels must not point at private, link-local or metadata addresses.
    for bad in [
        "https://10.0.0.7/hook",
        "http://169.254.169.254/latest/meta-data",
        "https://[fd00:ec2::254]/",
    ] {
        let (st, body) = send(
            &client,
            reqwest::Method::POST,
            api("channels"),
            &admin,
            Some(json!({"name": "bad", "kind": "webhook", "url": bad})),
        )
        .await;
        assert_eq!(
            (st, body["errors"][0]["field"].as_str()),
            (422, Some("url")),
            "{bad}: {body}"
        );
    }
    let (st, channel) = send(
        &client,
        reqwest::Method::POST,
        api("channels"),
        &admin,
        Some(json!({"name": "ops", "kind": "webhook", "url": receiver.url})),
    )
    .await;
    assert_eq!(st, 201, "{channel}");
    let secret = channel["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    let slack = Receiver::start().await;
    let (st, body) = send(
        &client,
        reqwest::Method::POST,
        api("channels"),
        &admin,
        Some(json!({"name": "leads", "kind": "slack", "url": slack.url})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    assert!(
        body.get("secret").is_none(),
        "Slack messages are not signed"
    );

    let (st, budget) = send(
        &client,
        reqwest::Method::POST,
        api("budgets"),
        &admin,
        Some(json!({
        "name": "team-a daily", "scope": "team", "scope_id": "team-a", "metric": "cost_usd",
        "period": "day", "amount": 10.0})),
    )
    .await;
    assert_eq!(st, 201, "{budget}");
    assert_eq!(budget["thresholds"], json!([50, 80, 100]));
    let budget_id = budget["id"].as_str().unwrap().to_string();
    let (st, body) = send(
        &client,
        reqwest::Method::POST,
        api("budgets"),
        &admin,
        Some(json!({
        "name": "x", "scope": "team", "metric": "cost_usd", "period": "day", "amount": 10.0})),
    )
    .await;
    assert_eq!(
        (st, body["errors"][0]["field"].as_str()),
        (422, Some("scope_id")),
        "{body}"
    );

    // $4: 40 %, nothing fires; the forecast at the last hour's rate names a time today.
    post_events_accepted(&client, &ingest.url(), &tenant.ingest_key, &spend(4.0)).await;
    wait_projected(&pool, tenant.id, 1, Duration::from_secs(30)).await;
    let status = get_json(
        &client,
        &format!("{}/v1/budgets/{budget_id}", query.url()),
        &tenant.read_key,
    )
    .await;
    let st = &status["status"];
    assert_eq!(st["spent"], 4.0, "{status}");
    assert_eq!(st["forecast"]["outcome"], "will_reach", "{status}");
    let reaches: DateTime<Utc> = st["forecast"]["reaches_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let end: DateTime<Utc> = st["period_end"].as_str().unwrap().parse().unwrap();
    assert!(
        reaches > Utc::now() && reaches < end,
        "the forecast names a time today: {status}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(receiver.received().is_empty(), "nothing crossed yet");

    // The live feed shows what fires.
    let mut feed = client
        .get(format!("{}/v1/stream", query.url()))
        .bearer_auth(&tenant.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(feed.status(), 200);

    // $5 more: 90 %, 50 and 80 cross together; $2 more: 110 %, 100 crosses.
    let sent = Instant::now();
    post_events_accepted(&client, &ingest.url(), &tenant.ingest_key, &spend(5.0)).await;
    let got = receiver.wait_accepted(2, Duration::from_secs(15)).await;
    for r in &got {
        assert!(
            r.at - sent <= Duration::from_secs(5),
            "delivered {:?} after the event",
            r.at - sent
        );
    }
    let sent = Instant::now();
    post_events_accepted(&client, &ingest.url(), &tenant.ingest_key, &spend(2.0)).await;
    let got = receiver.wait_accepted(3, Duration::from_secs(15)).await;
    assert!(
        got[2].at - sent <= Duration::from_secs(5),
        "delivered {:?} after the event",
        got[2].at - sent
    );

    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while text.matches("event: alert").count() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, feed.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("the live feed shows three alerts: {other:?}\n{text}"),
        }
    }
    let alerts: Vec<Value> = text
        .split("\n\n")
        .filter(|f| f.contains("event: alert"))
        .filter_map(|f| f.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut shown: Vec<i64> = alerts
        .iter()
        .map(|a| a["data"]["threshold"].as_i64().unwrap())
        .collect();
    shown.sort_unstable();
    assert_eq!(shown, [50, 80, 100], "{text}");
    drop(feed);

    // Nothing more comes: each crossing fired once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = receiver.received();
    assert_eq!(all.len(), 3, "exactly three deliveries");
    let mut thresholds = Vec::new();
    let mut ids = std::collections::BTreeSet::new();
    for r in &all {
        let ts: i64 = r.header("webhook-timestamp").parse().unwrap();
        assert!(
            shared::webhooks::verify(
                &secret,
                r.header("webhook-signature"),
                r.header("webhook-id"),
                ts,
                &r.body
            ),
            "a valid signature: {:?}",
            r.headers
        );
        ids.insert(r.header("webhook-id").to_string());
        let body = r.json();
        assert_eq!(body["type"], "budget.threshold_crossed");
        assert_eq!(body["data"]["budget"]["id"], budget_id.as_str());
        thresholds.push(body["data"]["threshold"].as_i64().unwrap());
    }
    thresholds.sort_unstable();
    assert_eq!(thresholds, [50, 80, 100]);
    assert_eq!(ids.len(), 3, "one webhook-id per notification");

    // The firings and the delivery log, with each attempt.
    let (_, firings) = send(&client, reqwest::Method::GET, api("firings"), &admin, None).await;
    assert_eq!(firings.as_array().unwrap().len(), 3, "{firings}");
    let (_, deliveries) = send(
        &client,
        reqwest::Method::GET,
        api("deliveries"),
        &admin,
        None,
    )
    .await;
    let deliveries = deliveries.as_array().unwrap();
    assert_eq!(deliveries.len(), 6, "three to each channel");
    for d in deliveries {
        assert_eq!(d["status"], "delivered", "{d}");
        assert_eq!(d["attempt_log"][0]["status_code"], 200, "{d}");
        assert!(
            d["channel_id"] != channel["id"] || ids.contains(d["id"].as_str().unwrap()),
            "the delivery id is the webhook-id"
        );
    }
    let status = get_json(
        &client,
        &format!("{}/v1/budgets", query.url()),
        &tenant.read_key,
    )
    .await;
    assert_eq!(
        status[0]["status"]["forecast"]["outcome"], "reached",
        "{status}"
    );
    assert_eq!(status[0]["status"]["crossed"], json!([50, 80, 100]));

    // Slack got the same three, as Block Kit messages.
    let messages = slack.wait_accepted(3, Duration::from_secs(5)).await;
    assert_eq!(slack.received().len(), 3);
    for m in &messages {
        assert_block_kit(&m.json());
    }
    let first = messages[0].json();
    assert!(
        first["blocks"][0]["text"]["text"]
            .as_str()
            .unwrap()
            .starts_with("Budget team-a daily: "),
        "{first}"
    );

    // A full replay rebuilds the same sums: nothing fires again.
    run_replay(&common, tenant.id, 1).await;
    assert_eq!(
        active_version(&pool, tenant.id).await,
        2,
        "the replay switched"
    );
    post_events_accepted(&client, &ingest.url(), &tenant.ingest_key, &spend(0.0)).await;
    wait_projected(&pool, tenant.id, 4, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.received().len(), 3, "nothing new after the replay");
    assert_eq!(slack.received().len(), 3, "nothing new after the replay");

    // Every change is audited.
    assert!(!outbox_events(&pool, tenant.id.0, "budget.changed")
        .await
        .is_empty());
    assert!(!outbox_events(&pool, tenant.id.0, "channel.changed")
        .await
        .is_empty());

    // A manager manages their own team's budgets only, and no channels.
    let (email, password) = (
        format!("mgr-{}@alerts.example", tenant.id.0.simple()),
        "Manager passphrase 42",
    );
    ingest_api::control::store::create_user(
        &pool,
        "",
        ingest_api::control::store::NewUser {
            tenant: tenant.id,
            email: &email,
            password,
            role: shared::jwt::Role::Manager,
            external_id: None,
            teams: &["team-b".to_string()],
        },
    )
    .await
    .unwrap();
    let tokens: Value = login(&client, &ingest.url(), &email, password)
        .await
        .json()
        .await
        .unwrap();
    let manager = tokens["access_token"].as_str().unwrap();
    let team_budget = |team: &str| {
        json!({"name": "mine", "scope": "team", "scope_id": team,
        "metric": "tokens", "period": "week", "amount": 1e6})
    };
    let (st, _) = send(
        &client,
        reqwest::Method::POST,
        api("budgets"),
        manager,
        Some(team_budget("team-a")),
    )
    .await;
    assert_eq!(st, 403, "another team's budget");
    let (st, own) = send(
        &client,
        reqwest::Method::POST,
        api("budgets"),
        manager,
        Some(team_budget("team-b")),
    )
    .await;
    assert_eq!(st, 201, "{own}");
    let (_, listed) = send(&client, reqwest::Method::GET, api("budgets"), manager, None).await;
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "only their team's: {listed}"
    );
    let (st, _) = send(
        &client,
        reqwest::Method::DELETE,
        api(&format!("budgets/{budget_id}")),
        manager,
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (st, _) = send(
        &client,
        reqwest::Method::GET,
        api("channels"),
        manager,
        None,
    )
    .await;
    assert_eq!(st, 403);
    let (_, firings) = send(&client, reqwest::Method::GET, api("firings"), manager, None).await;
    assert_eq!(firings, json!([]), "team-a's firings are not theirs");

    // Another tenant sees none of it.
    let other = create_tenant(&pool, "alerts-other").await;
    let other_admin = admin_key(&pool, &other).await;
    let (st, _) = send(
        &client,
        reqwest::Method::GET,
        api(&format!("budgets/{budget_id}")),
        &other_admin,
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (_, list) = send(
        &client,
        reqwest::Method::GET,
        api("deliveries"),
        &other_admin,
        None,
    )
    .await;
    assert_eq!(list, json!([]));
    let (st, _) = send(
        &client,
        reqwest::Method::GET,
        format!("{}/v1/budgets/{budget_id}", query.url()),
        &other.read_key,
        None,
    )
    .await;
    assert_eq!(st, 404);

    stop_all([ingest, projector, query]).await;
}

/// Checks a Slack message against Block Kit's documented shape and limits: `text` (the
/// notification fallback) and at most 50 blocks — `header` (plain text ≤ 150 characters),
/// `section` (mrkdwn or plain text ≤ 3000, or ≤ 10 fields ≤ 2000 each), `actions` (≤ 25
/// elements; buttons with plain-text labels ≤ 75 and URLs ≤ 3000).
fn assert_block_kit(m: &Value) {
    let len = |v: &Value| v.as_str().map(|s| s.chars().count()).unwrap_or(usize::MAX);
    let text_object = |t: &Value, max: usize, plain_only: bool| {
        let kind = t["type"].as_str().unwrap_or("");
        assert!(
            kind == "plain_text" || (!plain_only && kind == "mrkdwn"),
            "text type {t}"
        );
        assert!((1..=max).contains(&len(&t["text"])), "text length {t}");
    };
    assert!(m["text"].is_string(), "a fallback text: {m}");
    let blocks = m["blocks"].as_array().expect("blocks");
    assert!(!blocks.is_empty() && blocks.len() <= 50);
    for b in blocks {
        match b["type"].as_str() {
            Some("header") => text_object(&b["text"], 150, true),
            Some("section") => {
                assert!(b["text"].is_object() || b["fields"].is_array(), "{b}");
                if b["text"].is_object() {
                    text_object(&b["text"], 3000, false);
                }
                if let Some(fields) = b["fields"].as_array() {
                    assert!(fields.len() <= 10);
                    fields.iter().for_each(|f| text_object(f, 2000, false));
                }
            }
            Some("actions") => {
                let elements = b["elements"].as_array().expect("elements");
                assert!(!elements.is_empty() && elements.len() <= 25);
                for e in elements {
                    assert_eq!(e["type"], "button", "{e}");
                    text_object(&e["text"], 75, true);
                    assert!((1..=3000).contains(&len(&e["url"])), "{e}");
                }
            }
            other => panic!("unexpected block type {other:?}: {b}"),
        }
    }
}

/// A budget of the whole tenant with thresholds 50 and 100 and one webhook channel; returns
/// (admin key, budget id, channel secret).
async fn tenant_budget(
    pool: &sqlx::PgPool,
    client: &reqwest::Client,
    ingest: &str,
    tenant: &TestTenant,
    url: &str,
) -> (String, String, String) {
    let admin = admin_key(pool, tenant).await;
    let (st, channel) = send(
        client,
        reqwest::Method::POST,
        format!("{ingest}/v1/admin/channels"),
        &admin,
        Some(json!({"name": "ops", "kind": "webhook", "url": url})),
    )
    .await;
    assert_eq!(st, 201, "{channel}");
    let (st, budget) = send(
        client,
        reqwest::Method::POST,
        format!("{ingest}/v1/admin/budgets"),
        &admin,
        Some(
            json!({"name": "all, daily", "scope": "tenant", "metric": "cost_usd", "period": "day",
                    "amount": 1.0, "thresholds": [50, 100]}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{budget}");
    (
        admin,
        budget["id"].as_str().unwrap().into(),
        channel["secret"].as_str().unwrap().into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_outlast_a_failing_receiver_and_a_killed_projector() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let mut projector = spawn_projector_process(&common);
    let client = http();
    let tenant = create_tenant(&pool, "alerts-retry").await;
    let receiver = Receiver::start().await;
    let (admin, _, secret) =
        tenant_budget(&pool, &client, &ingest.url(), &tenant, &receiver.url).await;

    // The receiver answers 503 for a minute, then 200: the notification arrives after
    // recovery, every attempt with the same webhook-id, each attempt in the log.
    receiver.answer(503);
    let failing = Instant::now();
    post_events_accepted(&client, &ingest.url(), &tenant.ingest_key, &spend(0.6)).await;
    receiver.wait_received(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(failing.elapsed())).await;
    receiver.answer(200);
    let got = receiver.wait_accepted(1, Duration::from_secs(90)).await;
    let all = receiver.received();
    assert!(
        all.len() >= 3,
        "retried while the receiver failed: {} requests",
        all.len()
    );
    let id = got[0].header("webhook-id").to_string();
    for r in &all {
        assert_eq!(r.header("webhook-id"), id, "one webhook-id across attempts");
        let ts: i64 = r.header("webhook-timestamp").parse().unwrap();
        assert!(shared::webhooks::verify(
            &secret,
            r.header("webhook-signature"),
            &id,
            ts,
            &r.body
        ));
    }
    assert_eq!(got[0].json()["data"]["threshold"], 50);
    // The receiver has the request before the projector has its answer: the attempt is
    // recorded (and the delivery marked delivered) just after, so the log is read once it is.
    let poll_until = Instant::now() + Duration::from_secs(15);
    let deliveries = loop {
        let (_, deliveries) = send(
            &client,
            reqwest::Method::GET,
            format!("{}/v1/admin/deliveries", ingest.url()),
            &admin,
            None,
        )
        .await;
        if deliveries[0]["status"] == "delivered" || Instant::now() > poll_until {
            break deliveries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = &deliveries[0]["attempt_log"];
    let codes: Vec<i64> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(
        codes.len(),
        all.len(),
        "every attempt is logged: {deliveries}"
    );
    assert!(
        codes[..codes.len() - 1].iter().all(|c| *c == 503) && codes.last() == Some(&200),
        "{codes:?}"
    );
    assert_eq!(deliveries[0]["status"], "delivered");

    // The projector is SIGKILLed while its attempt is in flight (the firing decided and
    // committed, the delivery not recorded): a new one delivers it, with the same id.
    receiver.hold(true);
    post_events_accepted(&client, &ingest.url(), &tenant.ingest_key, &spend(0.6)).await;
    let held = receiver
        .wait_received(all.len() + 1, Duration::from_secs(30))
        .await;
    let held_id = held.last().unwrap().header("webhook-id").to_string();
    assert_ne!(held_id, id);
    projector.0.kill().expect("SIGKILL");
    let _ = projector.0.wait();
    receiver.hold(false);
    projector = spawn_projector_process(&common);
    let got = receiver.wait_accepted(2, Duration::from_secs(90)).await;
    assert_eq!(
        got[1].header("webhook-id"),
        held_id,
        "the same notification, the same id"
    );
    assert_eq!(got[1].json()["data"]["threshold"], 100);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.accepted().len(), 2, "nothing else fired");
    drop(projector);
    ingest.stop().await.unwrap();
}

fn command(team: &str, at: DateTime<Utc>, ok: bool) -> Value {
    json!({
        "id": Uuid::new_v4(), "type": "command.executed", "occurred_at": at.to_rfc3339(),
        "data": {"user_id": format!("{team}-dev"), "team_id": team, "command_name": "build",
                 "duration_ms": 1200, "status": if ok { "success" } else { "error" }}
    })
}

/// Rules fire once on the condition they name, as the projections move: an error rate over
/// its line; a team that sent events every few seconds and then went silent for a whole
/// minute; and an anomaly — a tenfold jump over the same ten minutes of each of the seven
/// days before (≈ 100 events a day, varying 92–110), after an ordinary window (105 events,
/// z ≈ 0.5) fired nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rules_fire_on_error_rates_silence_and_anomalies_but_not_on_noise() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let tenant = create_tenant(&pool, "alerts-rules").await;
    let admin = admin_key(&pool, &tenant).await;
    let receiver = Receiver::start().await;
    let api = |path: &str| format!("{}/v1/admin/{path}", ingest.url());
    let (st, body) = send(
        &client,
        reqwest::Method::POST,
        api("channels"),
        &admin,
        Some(json!({"name": "ops", "kind": "webhook", "url": receiver.url})),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let rule = |body: Value| {
        let (client, url, admin) = (client.clone(), api("rules"), admin.clone());
        async move {
            let (st, r) = send(&client, reqwest::Method::POST, url, &admin, Some(body)).await;
            assert_eq!(st, 201, "{r}");
            r["id"].as_str().unwrap().to_string()
        }
    };
    // Refused: an unknown kind, a threshold a silence does not have, a bad measure.
    for (bad, field) in [
        (
            json!({"name": "x", "kind": "vibes", "scope": "tenant", "threshold": 1}),
            "kind",
        ),
        (
            json!({"name": "x", "kind": "silence", "scope": "tenant", "threshold": 1}),
            "threshold",
        ),
        (
            json!({"name": "x", "kind": "anomaly", "scope": "tenant", "measure": "mood"}),
            "measure",
        ),
        (
            json!({"name": "x", "kind": "events", "scope": "team", "threshold": 1}),
            "scope_id",
        ),
    ] {
        let (st, p) = send(
            &client,
            reqwest::Method::POST,
            api("rules"),
            &admin,
            Some(bad),
        )
        .await;
        assert_eq!(
            (st, p["errors"][0]["field"].as_str()),
            (422, Some(field)),
            "{p}"
        );
    }
    let errors = rule(
        json!({"name": "team-e errors", "kind": "error_rate", "scope": "team",
        "scope_id": "team-e", "event_type": "command.executed", "threshold": 20,
        "window_minutes": 15, "min_events": 10}),
    )
    .await;
    let silence = rule(
        json!({"name": "team-s silent", "kind": "silence", "scope": "team",
        "scope_id": "team-s", "window_minutes": 1, "cooldown_minutes": 0}),
    )
    .await;
    let anomaly = rule(
        json!({"name": "team-x surge", "kind": "anomaly", "scope": "team",
        "scope_id": "team-x", "measure": "events", "threshold": 3, "window_minutes": 10}),
    )
    .await;

    // The anomaly's history: the same ten minutes of each of the seven days before.
    let now = Utc::now();
    let mut history = Vec::new();
    for (day, n) in [
        (1, 98),
        (2, 105),
        (3, 101),
        (4, 95),
        (5, 110),
        (6, 92),
        (7, 100),
    ] {
        for i in 0..n {
            let at = now - chrono::Duration::days(day) - chrono::Duration::seconds(5 + i * 4);
            history.push(command("team-x", at, true));
        }
    }
    for chunk in history.chunks(500) {
        post_events_accepted(
            &client,
            &ingest.url(),
            &tenant.ingest_key,
            &Value::Array(chunk.to_vec()),
        )
        .await;
    }
    wait_projected(
        &pool,
        tenant.id,
        history.len() as i64,
        Duration::from_secs(60),
    )
    .await;
    // Ordinary noise now: 105 in the window.
    let noise: Vec<Value> = (0..105)
        .map(|i| command("team-x", now - chrono::Duration::seconds(i), true))
        .collect();
    post_events_accepted(
        &client,
        &ingest.url(),
        &tenant.ingest_key,
        &Value::Array(noise),
    )
    .await;
    // 10 errors in 20 commands: 50 %, over the 20 % line.
    let mixed: Vec<Value> = (0..20)
        .map(|i| command("team-e", Utc::now(), i % 2 == 0))
        .collect();
    post_events_accepted(
        &client,
        &ingest.url(),
        &tenant.ingest_key,
        &Value::Array(mixed),
    )
    .await;
    let got = receiver.wait_accepted(1, Duration::from_secs(15)).await;
    assert_eq!(
        got[0].json()["data"]["rule"]["id"],
        errors.as_str(),
        "{}",
        got[0].json()
    );
    assert_eq!(got[0].json()["data"]["evaluation"]["value"], 50.0);

    let by_rule = |id: &str| {
        receiver
            .accepted()
            .into_iter()
            .filter(|r| r.json()["data"]["rule"]["id"] == id)
            .count()
    };
    assert_eq!(by_rule(&anomaly), 0, "ordinary noise is no anomaly");

    // A tenfold jump: 900 more in the window.
    let surge: Vec<Value> = (0..900)
        .map(|_| command("team-x", Utc::now(), true))
        .collect();
    post_events_accepted(
        &client,
        &ingest.url(),
        &tenant.ingest_key,
        &Value::Array(surge),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while by_rule(&anomaly) == 0 {
        assert!(Instant::now() < deadline, "the surge was not noticed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fired = receiver
        .accepted()
        .into_iter()
        .find(|r| r.json()["data"]["rule"]["id"] == anomaly.as_str())
        .unwrap()
        .json();
    let e = &fired["data"]["evaluation"];
    assert!(
        e["score"].as_f64().unwrap() > 3.0
            && (e["baseline_mean"].as_f64().unwrap() - 100.14).abs() < 0.01,
        "{e}"
    );

    // Team s sends every 5 seconds for 65 s, then stops: the first whole silent minute fires.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(65) {
        post_events_accepted(
            &client,
            &ingest.url(),
            &tenant.ingest_key,
            &json!([command("team-s", Utc::now(), true)]),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert_eq!(by_rule(&silence), 0, "no silence while the team sends");
    let stopped = Instant::now();
    while by_rule(&silence) == 0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(150),
            "the silence was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "silence noticed {:?} after the last event",
        stopped.elapsed()
    );

    // Each fired once; the rules say where they stand.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        (by_rule(&errors), by_rule(&silence), by_rule(&anomaly)),
        (1, 1, 1)
    );
    let (_, rules) = send(&client, reqwest::Method::GET, api("rules"), &admin, None).await;
    let state = |id: &str| {
        rules
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()["state"]
            .clone()
    };
    // Still firing: the errors stay inside the rule's 15 minutes through the silence's
    // minutes, however slowly that was noticed.
    assert_eq!(state(&errors), "firing");
    assert_eq!(state(&anomaly), "firing");
    assert!(!outbox_events(&pool, tenant.id.0, "rule.changed")
        .await
        .is_empty());
    stop_all([ingest, projector]).await;
}

/// One tenant's hanging receiver and 200 due deliveries (each attempt holds its slot for the
/// 10 s timeout) do not hold back another tenant's notification: a tenant has at most its
/// share of the deliverer's slots. Before, the 32 slots went to the oldest due deliveries,
/// all the first tenant's, and the second waited about a minute for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenants_hanging_receiver_does_not_hold_back_anothers_notifications() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let (hog, other) = (
        create_tenant(&pool, "alerts-hog").await,
        create_tenant(&pool, "alerts-fair").await,
    );
    let (hanging, answering) = (Receiver::start().await, Receiver::start().await);
    hanging.hold(true);
    let channel = |tenant: &TestTenant, url: &str| {
        let (client, base, url) = (client.clone(), ingest.url(), url.to_string());
        let pool = pool.clone();
        let tenant_id = tenant.id;
        async move {
            let key = ingest_api::control::store::create_api_key(
                &pool,
                "",
                tenant_id,
                shared::apikey::Scope::Admin,
                "fair",
            )
            .await
            .unwrap()
            .1;
            let (st, c) = send(
                &client,
                reqwest::Method::POST,
                format!("{base}/v1/admin/channels"),
                &key,
                Some(json!({"name": "ops", "kind": "webhook", "url": url})),
            )
            .await;
            assert_eq!(st, 201, "{c}");
            uuid::Uuid::parse_str(c["id"].as_str().unwrap()).unwrap()
        }
    };
    let hog_channel = channel(&hog, &hanging.url).await;
    let other_channel = channel(&other, &answering.url).await;
    // Firings as the evaluator writes them, the hog's due a minute earlier than the other's.
    let fire = |tenant: uuid::Uuid, channel: uuid::Uuid, n: usize, ago_secs: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "WITH f AS (
                     INSERT INTO control.firings (id, tenant_id, source, source_id, dedup, scope,
                                                  scope_id, payload)
                     SELECT gen_random_uuid(), $1, 'rule', gen_random_uuid(),
                            'fair-' || gen_random_uuid(), '', '',
                            jsonb_build_object('type', 'rule.triggered', 'data', '{}'::jsonb)
                       FROM generate_series(1, $3)
                     RETURNING id)
                 INSERT INTO control.deliveries (id, tenant_id, firing_id, channel_id,
                                                 next_attempt_at)
                 SELECT gen_random_uuid(), $1, f.id, $2, now() - make_interval(secs => $4)
                   FROM f",
            )
            .bind(tenant)
            .bind(channel)
            .bind(n as i32)
            .bind(ago_secs as f64)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    fire(hog.id.0, hog_channel, 200, 60).await;
    // Let the deliverer take up the hog's deliveries first.
    hanging.wait_received(1, Duration::from_secs(10)).await;
    let fired = Instant::now();
    fire(other.id.0, other_channel, 1, 0).await;
    answering.wait_accepted(1, Duration::from_secs(8)).await;
    let waited = fired.elapsed();
    let held = hanging.received().len();
    eprintln!("the other tenant's notification after {waited:?}; the hog's attempts: {held}");
    assert!(held >= 8, "the hog had its share: {held} attempts");
    // Over: the hog's channel paused, so no other test's deliverer keeps trying it.
    sqlx::query("UPDATE control.channels SET paused_at = now() WHERE tenant_id = $1")
        .bind(hog.id.0)
        .execute(&pool)
        .await
        .unwrap();
    stop_all([ingest, projector]).await;
}

/// Makes a webhook channel to `url` and a rule for `tenant`; returns the rule's id.
async fn channel_and_rule(
    client: &reqwest::Client,
    pool: &sqlx::PgPool,
    ingest: &str,
    tenant: &TestTenant,
    url: &str,
    rule: Value,
) -> String {
    let admin = admin_key(pool, tenant).await;
    let api = |path: &str| format!("{ingest}/v1/admin/{path}");
    let channel = json!({"name": "ops", "kind": "webhook", "url": url});
    let (st, body) = send(
        client,
        reqwest::Method::POST,
        api("channels"),
        &admin,
        Some(channel),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let (st, body) = send(
        client,
        reqwest::Method::POST,
        api("rules"),
        &admin,
        Some(rule),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// One tenant whose rules cannot be evaluated does not hold back another tenant's: tenants
/// go through the evaluator in lanes of their own, and each statement of an evaluation
/// (a wait for a lock included) runs at most 2 s. The stand-in for a tenant whose reads are
/// that slow (a window over enormous rollups) is a lock held on its minute rollups. Before,
/// the evaluator took tenants one after another and waited for as long as the lock was held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_tenants_stuck_evaluation_does_not_hold_back_anothers_rules() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let (stuck, free) = (
        create_tenant(&pool, "alerts-stuck").await,
        create_tenant(&pool, "alerts-free").await,
    );
    let receiver = Receiver::start().await;
    let any_event = json!({"name": "anything", "kind": "events", "scope": "tenant",
                           "op": "above", "threshold": 0, "window_minutes": 5});
    channel_and_rule(
        &client,
        &pool,
        &ingest.url(),
        &stuck,
        &receiver.url,
        any_event.clone(),
    )
    .await;
    channel_and_rule(
        &client,
        &pool,
        &ingest.url(),
        &free,
        &receiver.url,
        any_event,
    )
    .await;
    let of = |tenant: &TestTenant| {
        let id = tenant.id.0.to_string();
        receiver
            .accepted()
            .into_iter()
            .filter(|r| r.json()["data"]["tenant_id"] == id.as_str())
            .count()
    };
    // The stuck tenant's projection exists and its rule fired once, as usual.
    post_events_accepted(
        &client,
        &ingest.url(),
        &stuck.ingest_key,
        &json!([command("team-h", Utc::now(), true)]),
    )
    .await;
    wait_projected(&pool, stuck.id, 1, Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while of(&stuck) == 0 {
        assert!(
            Instant::now() < deadline,
            "the stuck tenant's rule never fired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Its minute rollups locked: every read of its rules waits.
    let schema = format!("tenant_{}_v1", stuck.id.0.simple());
    let mut lock = pool.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL lock_timeout = '20s';
         LOCK TABLE {schema}.activity_all_1m, {schema}.activity_1m IN ACCESS EXCLUSIVE MODE"
    )))
    .execute(&mut *lock)
    .await
    .unwrap();
    let locked = Instant::now();
    // Wait for an evaluator to queue behind the lock (a sweep, at most 15 s away).
    let queued = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE NOT l.granted AND n.nspname = $1 AND a.query LIKE '%activity_all_hours%'",
        )
        .bind(&schema)
        .fetch_one(&pool)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            queued.elapsed() < Duration::from_secs(30),
            "no evaluator read the stuck tenant's rule"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "an evaluator waits for the lock after {:?}",
        queued.elapsed()
    );
    // And past this test's projector's own sweep (every 15 s): the evaluator that sees the
    // other tenant's event has met the lock by then.
    let swept = Duration::from_secs(16).saturating_sub(locked.elapsed());
    tokio::time::sleep(swept).await;

    // The other tenant's event fires its rule within seconds.
    let sent = Instant::now();
    post_events_accepted(
        &client,
        &ingest.url(),
        &free.ingest_key,
        &json!([command("team-f", Utc::now(), true)]),
    )
    .await;
    while of(&free) == 0 {
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "the other tenant's rule waited for the stuck tenant's"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let waited = sent.elapsed();
    // This projector's read of the stuck rule is cancelled, and counted, when its sweep
    // reaches the stuck tenant (every tenant with rules in the database is swept, and on
    // a busy database that may take a while).
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let timed_out = counter(
            &scrape_metrics(&client, &projector.url()).await,
            "alert_evaluations_timed_out_total",
        );
        if timed_out >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no evaluation was cancelled");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lock.rollback().await.unwrap();
    eprintln!("the other tenant's rule fired {waited:?} after its event");
    assert_eq!(of(&stuck), 1, "the stuck tenant's rule fired once");
    stop_all([ingest, projector]).await;
}

/// A silence is noticed while another tenant keeps the projector busy: the sweep that
/// notices it comes at a deadline, not after a sleep that every batch started again.
/// Before, a batch every few seconds put the sweep off for as long as the traffic lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silence_is_noticed_while_another_tenant_keeps_the_projector_busy() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let (quiet, busy) = (
        create_tenant(&pool, "alerts-quiet").await,
        create_tenant(&pool, "alerts-busy").await,
    );
    let receiver = Receiver::start().await;
    let silence = json!({"name": "team-q silent", "kind": "silence", "scope": "team",
                         "scope_id": "team-q", "window_minutes": 1, "cooldown_minutes": 0});
    channel_and_rule(
        &client,
        &pool,
        &ingest.url(),
        &quiet,
        &receiver.url,
        silence,
    )
    .await;
    post_events_accepted(
        &client,
        &ingest.url(),
        &quiet.ingest_key,
        &json!([command("team-q", Utc::now(), true)]),
    )
    .await;
    let stopped = Instant::now();
    // The busy tenant sends every 2 s until the silence is noticed (at the latest some 2
    // minutes after the quiet team's last event, plus a sweep).
    let mut sent = 0;
    while receiver.accepted().is_empty() {
        assert!(
            stopped.elapsed() < Duration::from_secs(200),
            "the silence was not noticed while the other tenant sent"
        );
        post_events_accepted(
            &client,
            &ingest.url(),
            &busy.ingest_key,
            &json!([command("team-b", Utc::now(), true)]),
        )
        .await;
        sent += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!(
        "silence noticed {:?} after the last event, {sent} batches of the other tenant meanwhile",
        stopped.elapsed()
    );
    wait_projected(&pool, busy.id, sent, Duration::from_secs(30)).await;
    let got = receiver.accepted();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["data"]["rule"]["name"], "team-q silent");
    stop_all([ingest, projector]).await;
}

/// A redelivery is a new round of attempts: when the receiver still fails, it is tried again
/// on the schedule (5 s first) instead of failing at once and pausing the channel; once the
/// receiver answers, it is delivered, its attempts numbered on from the earlier round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivery_is_a_new_round_of_attempts() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let tenant = create_tenant(&pool, "alerts-redeliver").await;
    let admin = admin_key(&pool, &tenant).await;
    let receiver = Receiver::start().await;
    receiver.answer(500);
    let (st, c) = send(
        &client,
        reqwest::Method::POST,
        format!("{}/v1/admin/channels", ingest.url()),
        &admin,
        Some(json!({"name": "ops", "kind": "webhook", "url": receiver.url})),
    )
    .await;
    assert_eq!(st, 201, "{c}");
    let channel = Uuid::parse_str(c["id"].as_str().unwrap()).unwrap();
    // A delivery that ran out of its twelve attempts yesterday.
    let delivery: Uuid = sqlx::query_scalar(
        "WITH f AS (
             INSERT INTO control.firings (id, tenant_id, source, source_id, dedup, scope, scope_id,
                                          payload)
             VALUES (gen_random_uuid(), $1, 'rule', gen_random_uuid(), 'redeliver-' || $1, '',
                     '', jsonb_build_object('type', 'rule.triggered', 'data', '{}'::jsonb))
             RETURNING id)
         INSERT INTO control.deliveries (id, tenant_id, firing_id, channel_id, status, attempts,
                                         next_attempt_at)
         SELECT gen_random_uuid(), $1, f.id, $2, 'failed', 12, now() - interval '1 day' FROM f
         RETURNING id",
    )
    .bind(tenant.id.0)
    .bind(channel)
    .fetch_one(&pool)
    .await
    .unwrap();
    let (st, p) = send(
        &client,
        reqwest::Method::POST,
        format!("{}/v1/admin/deliveries/{delivery}/redeliver", ingest.url()),
        &admin,
        None,
    )
    .await;
    assert_eq!(st, 202, "{p}");
    receiver.wait_received(1, Duration::from_secs(10)).await;
    // The failed attempt is recorded, and the delivery waits for its next one.
    let row = || {
        let pool = pool.clone();
        async move {
            let row: (String, i32, bool, bool) = sqlx::query_as(
                "SELECT d.status, d.attempts, d.next_attempt_at > now(), c.paused_at IS NULL
                   FROM control.deliveries d JOIN control.channels c ON c.id = d.channel_id
                  WHERE d.id = $1 AND d.leased_until IS NULL",
            )
            .bind(delivery)
            .fetch_optional(&pool)
            .await
            .unwrap()
            .unwrap_or(("leased".into(), 0, false, false));
            row
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now = row().await;
    while now.1 != 13 {
        assert!(
            Instant::now() < deadline,
            "the redelivery was not recorded: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = row().await;
    }
    assert_eq!(
        now,
        ("pending".to_string(), 13, true, true),
        "retried later, the channel not paused"
    );
    // The receiver answers again: the next attempt of the round delivers it.
    receiver.answer(200);
    receiver.wait_accepted(1, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while row().await.0 != "delivered" {
        assert!(
            Instant::now() < deadline,
            "not delivered: {:?}",
            row().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attempts: Vec<i32> = sqlx::query_scalar(
        "SELECT attempt FROM control.delivery_attempts WHERE delivery_id = $1 ORDER BY attempt",
    )
    .bind(delivery)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(attempts, vec![13, 14]);
    stop_all([ingest, projector]).await;
}
