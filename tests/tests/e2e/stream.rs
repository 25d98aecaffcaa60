//! The live feed: Server-Sent Events of new activity, only ever the caller's tenant, with
//! resumption by `Last-Event-ID`.

use std::time::{Duration, Instant};

use serde_json::Value;
use tally_tests::*;
use tokio::sync::mpsc;

/// One frame of a stream: (event kind, id, data).
type Frame = (String, String, Value);

/// Sends `GET /v1/stream` with `credential` (and `Last-Event-ID` when it resumes).
async fn request_stream(
    query: &str,
    credential: &str,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .get(format!("{query}/v1/stream"))
        .bearer_auth(credential);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    req.send().await.unwrap()
}

/// The frames of an open stream as they come, until it ends (the receiver then yields
/// `None`); dropping the receiver closes the connection.
fn frames(mut res: reqwest::Response) -> mpsc::UnboundedReceiver<Frame> {
    let (tx, rx) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(async move {
        let mut buf = String::new();
        loop {
            let chunk = tokio::select! {
                c = res.chunk() => c,
                () = tx.closed() => return,
            };
            let Ok(Some(chunk)) = chunk else { return };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let (mut kind, mut id, mut data) =
                    ("message".to_string(), String::new(), String::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(&data).unwrap();
                if tx.send((kind, id, value)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Opens `/v1/stream` with `credential`: its frames until the stream ends (the receiver then
/// yields `None`), or the refusal.
async fn open(
    query: &str,
    credential: &str,
    last_event_id: Option<&str>,
) -> Result<mpsc::UnboundedReceiver<Frame>, reqwest::Response> {
    let res = request_stream(query, credential, last_event_id).await;
    if res.status() != 200 {
        return Err(res);
    }
    Ok(frames(res))
}

/// The activity events (id, data) and the totals events of one stream.
type Feeds = (
    mpsc::UnboundedReceiver<(String, Value)>,
    mpsc::UnboundedReceiver<Value>,
);

/// Opens `/v1/stream` and forwards each `activity` (id, data) it receives; `totals` events go
/// to the second receiver.
async fn listen(query: &str, key: &str, last_event_id: Option<&str>) -> Feeds {
    let res = request_stream(query, key, last_event_id).await;
    assert_eq!(res.status(), 200);
    assert!(res.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut frames = frames(res);
    let (tx, rx) = mpsc::unbounded_channel();
    let (totals_tx, totals_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((kind, id, value)) = frames.recv().await {
            let sent = match kind.as_str() {
                // Nobody listening for totals is fine.
                "totals" => {
                    let _ = totals_tx.send(value);
                    true
                }
                _ => tx.send((id, value)).is_ok(),
            };
            if !sent {
                return;
            }
        }
    });
    (rx, totals_rx)
}

async fn take(rx: &mut mpsc::UnboundedReceiver<(String, Value)>, n: usize) -> Vec<(String, Value)> {
    // As long as the other tests wait for a first projection: a projector just started may
    // still be joining its consumer group.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(e)) => out.push(e),
            _ => panic!("{} of {n} live events after 60 s: {out:?}", out.len()),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_feeds_carry_only_their_tenant_and_resume() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let a = create_tenant(&pool, "live-a").await;
    let b = create_tenant(&pool, "live-b").await;

    let (mut feed_a, mut totals_a) = listen(&query.url(), &a.read_key, None).await;
    let (mut feed_b, _totals_b) = listen(&query.url(), &b.read_key, None).await;
    let sent_at = Instant::now();
    let batch_a = Value::Array(
        (0..3)
            .map(|i| command("a-user", "build", i, true))
            .collect(),
    );
    let batch_b = Value::Array((0..2).map(|i| command("b-user", "test", i, true)).collect());
    post_events_accepted(&client, &ingest.url(), &a.ingest_key, &batch_a).await;
    post_events_accepted(&client, &ingest.url(), &b.ingest_key, &batch_b).await;

    let got_a = take(&mut feed_a, 3).await;
    let got_b = take(&mut feed_b, 2).await;
    eprintln!(
        "live feed: 3 events seen {:?} after posting",
        sent_at.elapsed()
    );
    assert!(got_a
        .iter()
        .all(|(_, e)| e["user_id"] == "a-user" && e["type"] == "command.executed"));
    assert!(got_b.iter().all(|(_, e)| e["user_id"] == "b-user"));
    // Nothing more arrives on either (in particular nothing of the other tenant).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(feed_a.try_recv().is_err() && feed_b.try_recv().is_err());
    let ids: Vec<&str> = got_a
        .iter()
        .map(|(_, e)| e["event_id"].as_str().unwrap())
        .collect();
    let unique: std::collections::HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), 3, "{ids:?}");

    // After the burst comes the tenant's updated totals (its own events only).
    let totals = tokio::time::timeout(Duration::from_secs(10), totals_a.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            totals["events_24h"].as_i64(),
            totals["commands_24h"].as_i64()
        ),
        (Some(3), Some(3)),
        "{totals}"
    );

    // Reconnecting after the first event resumes with the other two.
    let (mut again, _) = listen(&query.url(), &a.read_key, Some(&got_a[0].0)).await;
    let resumed = take(&mut again, 2).await;
    let resumed_ids: Vec<&str> = resumed
        .iter()
        .map(|(_, e)| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(resumed_ids, ids[1..].to_vec());

    // Unauthenticated or with an ingest key: refused before streaming.
    let res = client
        .get(format!("{}/v1/stream", query.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .get(format!("{}/v1/stream", query.url()))
        .bearer_auth(&a.ingest_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    drop((feed_a, feed_b, again));
    stop_all([projector, ingest, query]).await;
}

/// Waits (at most `within`) for the stream to send its `closed` event and end; returns the
/// event's data.
async fn closes(rx: &mut mpsc::UnboundedReceiver<Frame>, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    let mut closed = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((kind, _, data))) if kind == "closed" => closed = Some(data),
            Ok(Some(_)) => {}
            Ok(None) => return closed.expect("a `closed` event before the end"),
            Err(_) => panic!("the stream is still open after {within:?}"),
        }
    }
}

/// The next `n` `activity` events (id, data) of a stream, waiting at most 20 s.
async fn activities(rx: &mut mpsc::UnboundedReceiver<Frame>, n: usize) -> Vec<(String, Value)> {
    let mut got: Vec<(String, Value)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((kind, id, data))) if kind == "activity" => got.push((id, data)),
            Ok(Some(_)) => {}
            _ => panic!("{} of {n} live events: {got:?}", got.len()),
        }
    }
    got
}

/// Sends the tenant one successful `command.executed` of `user`, and checks it was accepted.
async fn send_command(
    client: &reqwest::Client,
    ingest: &Running,
    t: &TestTenant,
    user: &str,
    name: &str,
) {
    let event = command(user, name, 1, true);
    post_events_accepted(client, &ingest.url(), &t.ingest_key, &event).await;
}

/// query-api trusting ingest-api's access tokens and checking open streams' credentials
/// every second.
async fn start_rechecking_query(common: &shared::config::Common, ingest: &Running) -> Running {
    start_query(common, |c| {
        c.stream_recheck_secs = 1;
        c.jwks_url = ingest.jwks_url();
    })
    .await
}

async fn access_token(client: &reqwest::Client, ingest: &str, email: &str) -> String {
    let res = login(client, ingest, email, "Stream-Pass-1").await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_close_when_their_credential_stops_holding() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_rechecking_query(&common, &ingest).await;
    let client = http();
    let t = create_tenant(&pool, "recheck").await;
    let (doomed_id, doomed_key) = ingest_api::control::store::create_api_key(
        &pool,
        "",
        t.id,
        shared::apikey::Scope::Read,
        "doomed",
    )
    .await
    .unwrap();
    let mut people = Vec::new();
    for (who, role) in [
        ("leaver", shared::jwt::Role::Owner),
        ("demoted", shared::jwt::Role::Admin),
        ("moved", shared::jwt::Role::Manager),
    ] {
        let email = format!("{who}-{}@example.com", uuid::Uuid::new_v4().simple());
        let id = ingest_api::control::store::create_user(
            &pool,
            "",
            ingest_api::control::store::NewUser {
                tenant: t.id,
                email: &email,
                password: "Stream-Pass-1",
                role,
                external_id: None,
                teams: &["team-1".to_string()],
            },
        )
        .await
        .unwrap();
        let token = access_token(&client, &ingest.url(), &email).await;
        people.push((email, id, token));
    }

    let mut by_key = open(&query.url(), &doomed_key, None).await.unwrap();
    let mut kept = open(&query.url(), &t.read_key, None).await.unwrap();
    let mut leaver = open(&query.url(), &people[0].2, None).await.unwrap();
    let mut demoted = open(&query.url(), &people[1].2, None).await.unwrap();
    let mut moved = open(&query.url(), &people[2].2, None).await.unwrap();
    let closing = create_tenant(&pool, "recheck-closing").await;
    let mut of_closed_tenant = open(&query.url(), &closing.read_key, None).await.unwrap();
    // Several re-checks pass while nothing changes.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for rx in [
        &mut by_key,
        &mut kept,
        &mut leaver,
        &mut demoted,
        &mut moved,
        &mut of_closed_tenant,
    ] {
        assert!(matches!(
            rx.try_recv(),
            Err(mpsc::error::TryRecvError::Empty)
        ));
    }

    ingest_api::control::store::revoke_api_key(&pool, "", doomed_id)
        .await
        .unwrap();
    ingest_api::control::store::deactivate_user(&pool, "", &people[0].0, None)
        .await
        .unwrap();
    let change = |id, role, teams| ingest_api::control::store::UserChange {
        tenant: t.id,
        id,
        role,
        teams,
        active: None,
        by_owner: true,
        actor: shared::events::Actor::default(),
    };
    ingest_api::control::store::update_user(
        &pool,
        "",
        change(people[1].1, Some(shared::jwt::Role::Viewer), None),
    )
    .await
    .unwrap();
    // Another team: the token stays valid (same version) but no longer says what it may see.
    let team_2 = ["team-2".to_string()];
    ingest_api::control::store::update_user(&pool, "", change(people[2].1, None, Some(&team_2)))
        .await
        .unwrap();
    ingest_api::control::store::set_status(&pool, "", closing.id, "deactivated")
        .await
        .unwrap();
    let changed = Instant::now();
    let within = Duration::from_secs(4);
    let revoked = closes(&mut by_key, within).await;
    assert_eq!(revoked["status"], 401, "{revoked}");
    let gone = closes(&mut leaver, within).await;
    assert_eq!(gone["status"], 401, "{gone}");
    let other_role = closes(&mut demoted, within).await;
    assert!(
        other_role["status"] == 401 || other_role["status"] == 403,
        "{other_role}"
    );
    let tenant_gone = closes(&mut of_closed_tenant, within).await;
    assert_eq!(tenant_gone["status"], 401, "{tenant_gone}");
    let other_teams = closes(&mut moved, within).await;
    assert_eq!(other_teams["status"], 403, "{other_teams}");
    eprintln!("streams closed {:?} after the change", changed.elapsed());
    // With its new teams the manager may stream again.
    let again = open(&query.url(), &people[2].2, None).await.unwrap();
    drop(again);
    // The tenant's other key still streams; the revoked key cannot reconnect.
    assert!(matches!(
        kept.try_recv(),
        Err(mpsc::error::TryRecvError::Empty)
    ));
    let refused = open(&query.url(), &doomed_key, None).await.unwrap_err();
    assert_eq!(refused.status(), 401);
    drop(kept);
    stop_all([ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_streams_are_capped_per_tenant_and_in_all() {
    let TestEnv { pool, common } = test_env().await;
    let query = start_query(&common, |c| {
        c.stream_max_per_tenant = 3;
        c.stream_max_total = 4;
    })
    .await;
    let a = create_tenant(&pool, "capped-a").await;
    let b = create_tenant(&pool, "capped-b").await;
    let mut streams_a = Vec::new();
    for _ in 0..3 {
        streams_a.push(open(&query.url(), &a.read_key, None).await.unwrap());
    }
    let refused = open(&query.url(), &a.read_key, None).await.unwrap_err();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("at most 3"),
        "{problem}"
    );
    // Another tenant still gets a stream, up to the process-wide cap.
    let stream_b = open(&query.url(), &b.read_key, None).await.unwrap();
    let refused = open(&query.url(), &b.read_key, None).await.unwrap_err();
    assert_eq!(refused.status(), 429);
    // A closed stream frees its place.
    streams_a.pop();
    let since = Instant::now();
    let reopened = loop {
        match open(&query.url(), &a.read_key, None).await {
            Ok(rx) => break rx,
            Err(res) => {
                assert_eq!(res.status(), 429);
                assert!(
                    since.elapsed() < Duration::from_secs(30),
                    "the closed stream's place is still taken"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!(
        "a closed stream's place was free again after {:?}",
        since.elapsed()
    );
    drop((streams_a, stream_b, reopened));
    query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_projected_late_is_delivered_once_whatever_its_times() {
    use shared::events::{Actor, Envelope, EventType, Source};

    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "late-feed").await;
    // The tenant's projection exists before the stream starts (positions are then "now").
    send_command(&client, &ingest, &t, "before", "setup").await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(30)).await;
    let mut feed = open(&query.url(), &t.read_key, None).await.unwrap();
    send_command(&client, &ingest, &t, "newer", "first").await;
    let first = activities(&mut feed, 1).await;
    assert_eq!(first[0].1["user_id"], "newer");

    // Received an hour ago (say, held up in a partition that was stuck), projected now: after
    // the newer one. A cursor on `received_at` would never deliver it.
    let late = Envelope {
        id: uuid::Uuid::now_v7(),
        tenant_id: t.id,
        event_type: EventType::CommandExecuted,
        schema_version: 1,
        occurred_at: chrono::Utc::now() - chrono::TimeDelta::minutes(61),
        received_at: chrono::Utc::now() - chrono::TimeDelta::minutes(60),
        actor: Actor::default(),
        source: Source::Api,
        data: serde_json::json!({"user_id": "older", "command_name": "late",
                                 "duration_ms": 5, "status": "success"}),
    };
    produce_envelope(&common, &late).await;
    let second = activities(&mut feed, 1).await;
    assert_eq!(second[0].1["user_id"], "older", "{second:?}");
    assert_eq!(second[0].1["event_id"], late.id.to_string());

    send_command(&client, &ingest, &t, "newest", "third").await;
    let third = activities(&mut feed, 1).await;
    assert_eq!(third[0].1["user_id"], "newest");
    // Exactly once: nothing else arrives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok((kind, _, data)) = feed.try_recv() {
        assert_ne!(kind, "activity", "delivered again: {data}");
    }
    // Resuming after the first gives the late one and the third, in projection order.
    let mut resumed = open(&query.url(), &t.read_key, Some(&first[0].0))
        .await
        .unwrap();
    let users: Vec<Value> = activities(&mut resumed, 2)
        .await
        .into_iter()
        .map(|(_, e)| e["user_id"].clone())
        .collect();
    assert_eq!(users, ["older", "newest"]);
    stop_all([projector, ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn schemas_made_before_feed_positions_get_them_on_migrate() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "old-schema").await;
    send_command(&client, &ingest, &t, "u1", "a").await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(30)).await;
    projector.stop().await.unwrap();

    // Turn the schema back into what the templates before 0006 made.
    let version = active_version(&pool, t.id).await;
    let schema = t.id.schema(version);
    let mut tx = pool.begin().await.unwrap();
    projector::schema::set_search_path(&mut tx, &schema)
        .await
        .unwrap();
    sqlx::raw_sql("DROP VIEW activity_events")
        .execute(&mut *tx)
        .await
        .unwrap();
    for table in projector::schema::RAW_TABLES {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {table} DROP COLUMN feed_seq, DROP COLUMN feed_ord"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    sqlx::raw_sql(projector::schema::LATER_TEMPLATES[2])
        .execute(&mut *tx)
        .await
        .unwrap();
    set_template_version(&mut tx, t.id, version, 5).await;
    tx.commit().await.unwrap();
    let columns = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM information_schema.columns
              WHERE table_schema = $1 AND table_name = ANY($2)
                AND column_name IN ('feed_seq', 'feed_ord')",
        )
        .bind(schema.as_str())
        .bind(
            projector::schema::RAW_TABLES
                .iter()
                .chain(&["activity_events"])
                .copied()
                .collect::<Vec<&str>>(),
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(columns().await, 0);

    // What the projector runs at start (and `projector migrate`).
    projector::migrate(&pool, projector::schema::timescale::Timescale::Auto)
        .await
        .unwrap();
    // Six tables and the view, two columns each.
    assert_eq!(columns().await, 14);
    let applied: i32 = sqlx::query_scalar(
        "SELECT template_version FROM control.tenant_schemas WHERE tenant_id = $1 AND version = $2",
    )
    .bind(t.id.0)
    .bind(version)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        applied as usize,
        1 + projector::schema::LATER_TEMPLATES.len()
    );

    // And its live feed works.
    let projector = start_projector(&common).await;
    let query = start_query(&common, |_| {}).await;
    let mut feed = open(&query.url(), &t.read_key, None).await.unwrap();
    send_command(&client, &ingest, &t, "u2", "b").await;
    let got = activities(&mut feed, 1).await;
    assert_eq!(got[0].1["user_id"], "u2");
    stop_all([projector, ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_ends_when_its_access_token_expires() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_rechecking_query(&common, &ingest).await;
    let t = create_tenant(&pool, "expiring").await;
    let email = format!("short-{}@example.com", uuid::Uuid::new_v4().simple());
    let user = create_person(
        &pool,
        t.id,
        &email,
        "Stream-Pass-1",
        shared::jwt::Role::Owner,
    )
    .await;
    let version: i32 = sqlx::query_scalar("SELECT token_version FROM control.users WHERE id = $1")
        .bind(user)
        .fetch_one(&pool)
        .await
        .unwrap();
    // A token as ingest-api signs them, but good for 3 seconds only.
    let mut claims = shared::jwt::Claims::new(user, t.id, shared::jwt::Role::Owner, version);
    claims.exp = chrono::Utc::now().timestamp() + 3;
    let token = ingest_api::keys::KeyRing::load(&pool)
        .await
        .unwrap()
        .sign(&claims)
        .unwrap();
    let opened = Instant::now();
    let mut feed = open(&query.url(), &token, None).await.unwrap();
    let closed = closes(&mut feed, Duration::from_secs(8)).await;
    assert_eq!(closed["status"], 401, "{closed}");
    assert!(
        closed["detail"].as_str().unwrap().contains("expired"),
        "{closed}"
    );
    let lived = opened.elapsed();
    assert!(lived >= Duration::from_secs(2), "closed after {lived:?}");
    stop_all([ingest, query]).await;
}
