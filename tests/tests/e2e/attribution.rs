//! Where the money went: the hook's session contexts attribute Claude Code's cost to the
//! repository and branch it was spent on (also when the cost arrives first), a replay
//! rebuilds the same attribution, GitHub and GitLab webhooks give pull requests their cost
//! and agent share (signatures checked, redeliveries counted once), and a session's timeline
//! lists its prompts in order for whoever may see them.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use shared::apikey::Scope;
use shared::tenant::TenantId;
use tally_tests::*;
use uuid::Uuid;

/// Runs the hook as Claude Code would; it must exit 0 and print nothing.
fn hook(envs: &[(&str, &str)], input: &Value) {
    let (ok, stdout, _) = run_hook(envs, input);
    assert!(ok && stdout.is_empty(), "exit 0 and silent: {stdout}");
}

fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("git is installed");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn nanos(t: DateTime<Utc>) -> String {
    t.timestamp_nanos_opt().unwrap().to_string()
}

fn attr(k: &str, v: Value) -> Value {
    json!({"key": k, "value": v})
}

/// One Claude Code `api_request` event as OTLP/JSON logs.
fn api_request(session: &str, user: &str, at: DateTime<Utc>, cost: f64) -> Value {
    json!({"resourceLogs": [{
        "resource": {"attributes": [attr("service.name", json!({"stringValue": "claude-code"}))]},
        "scopeLogs": [{"scope": {"name": "com.anthropic.claude_code.events"}, "logRecords": [{
            "timeUnixNano": nanos(at),
            "body": {"stringValue": "claude_code.api_request"},
            "attributes": [
                attr("session.id", json!({"stringValue": session})),
                attr("user.id", json!({"stringValue": user})),
                attr("event.name", json!({"stringValue": "api_request"})),
                attr("model", json!({"stringValue": "claude-sonnet-4-5"})),
                attr("cost_usd", json!({"doubleValue": cost})),
                attr("input_tokens", json!({"intValue": "1000"})),
                attr("output_tokens", json!({"intValue": "200"})),
                attr("duration_ms", json!({"intValue": "900"}))
            ]
        }]}]
    }]})
}

/// Claude Code's lines-of-code counter, one delta point, as OTLP/JSON metrics.
fn lines(session: &str, user: &str, at: DateTime<Utc>, kind: &str, n: i64) -> Value {
    json!({"resourceMetrics": [{
        "resource": {"attributes": [attr("service.name", json!({"stringValue": "claude-code"}))]},
        "scopeMetrics": [{"scope": {"name": "com.anthropic.claude_code"}, "metrics": [{
            "name": "claude_code.lines_of_code.count",
            "sum": {"aggregationTemporality": 1, "isMonotonic": true, "dataPoints": [{
                "startTimeUnixNano": nanos(at - TimeDelta::seconds(1)),
                "timeUnixNano": nanos(at),
                "asInt": n.to_string(),
                "attributes": [
                    attr("session.id", json!({"stringValue": session})),
                    attr("user.id", json!({"stringValue": user})),
                    attr("type", json!({"stringValue": kind}))
                ]
            }]}
        }]}]
    }]})
}

async fn post_otlp(client: &reqwest::Client, ingest: &str, key: &str, signal: &str, body: &Value) {
    let res = client
        .post(format!("{ingest}/v1/otlp/v1/{signal}"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("rejected"), "nothing refused: {text}");
}

fn cents(v: &Value) -> i64 {
    (v.as_f64().unwrap_or(f64::NAN) * 100.0).round() as i64
}

/// The attribution read models of the tenant's active schema, as text, to compare.
async fn attribution_snapshot(pool: &sqlx::PgPool, tenant: TenantId) -> String {
    let mut tx = tenant_tx(pool, tenant).await;
    let mut out = String::new();
    for sql in [
        "SELECT string_agg(format('%s|%s|%s|%s', session_id, repository, branch, round(cost_usd::numeric, 6)), ';' ORDER BY session_id, occurred_at, event_id) FROM session_usage",
        "SELECT string_agg(format('%s|%s|%s|%s|%s', bucket, repository, branch, requests, round(cost_usd::numeric, 6)), ';' ORDER BY bucket, repository, branch, user_id) FROM repo_usage_1h WHERE requests <> 0",
        "SELECT string_agg(format('%s|%s|%s|%s|%s', repository, branch, session_id, requests, round(cost_usd::numeric, 6)), ';' ORDER BY repository, branch, session_id) FROM repo_sessions",
        "SELECT string_agg(format('%s|%s|%s|%s|%s', bucket, repository, branch, requests, round(cost_usd::numeric, 6)), ';' ORDER BY bucket, repository, branch, user_id) FROM repo_usage_1d WHERE requests <> 0",
        "SELECT string_agg(format('%s|%s|%s', session_id, repository, branch), ';' ORDER BY session_id, at) FROM session_contexts",
    ] {
        let s: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        out.push_str(&s.unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Usage by hour as the raw rows give it (`usage_rows`, read by the moves and a rebuild)
/// and as the hourly rollup holds it (added up from the projector's own reading of each
/// event), for the two to be compared; and how many stored usage rows no context placed.
async fn usage_two_ways(pool: &sqlx::PgPool, tenant: TenantId) -> (String, String, i64) {
    let mut tx = tenant_tx(pool, tenant).await;
    let by_hour = |from: &str, at: &str| {
        format!(
            "SELECT string_agg(format('%s|%s|%s|%s|%s|%s|%s|%s|%s', b, r, t, c, i, o, cr, la, lr),
                               ';' ORDER BY b)
               FROM (SELECT date_bin('1 hour', {at}, TIMESTAMPTZ '2000-01-03 00:00:00+00') AS b,
                            sum(requests) AS r, sum(tool_runs) AS t,
                            round(sum(cost_usd)::numeric, 9) AS c, sum(input_tokens) AS i,
                            sum(output_tokens) AS o,
                            sum(cache_read_tokens) + sum(cache_creation_tokens) AS cr,
                            sum(lines_added) AS la, sum(lines_removed) AS lr
                       FROM {from} GROUP BY 1) x"
        )
    };
    let mut out = Vec::new();
    for sql in [
        by_hour("usage_rows", "occurred_at"),
        by_hour("repo_usage_1h", "bucket"),
    ] {
        let s: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.as_str()))
            .fetch_one(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        out.push(s.unwrap_or_default());
    }
    let unplaced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM session_usage WHERE (repository, branch) = ('', '')",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    (out.remove(0), out.remove(0), unplaced)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hook_attributes_cost_to_repository_and_branch_to_the_cent() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "attribution").await;
    let url = ingest.url();

    // A real repository with a remote (never fetched), on main.
    let work = std::env::temp_dir().join(format!("tally-attr-{}", Uuid::new_v4()));
    let repo = work.join("widgets");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(
        &repo,
        &[
            "-c",
            "user.email=dev@example.com",
            "-c",
            "user.name=dev",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "start",
        ],
    );
    git(
        &repo,
        &[
            "remote",
            "add",
            "origin",
            "https://github.com/Acme/Widgets.git",
        ],
    );
    let state = work.join("hook-state");
    let state_dir = state.to_str().unwrap();
    let cwd = repo.join("src");
    let cwd = cwd.to_str().unwrap();
    let envs = [
        ("TALLY_URL", url.as_str()),
        ("TALLY_API_KEY", t.ingest_key.as_str()),
        ("TALLY_USER_ID", "dev-1"),
        ("TALLY_HOOK_STATE_DIR", state_dir),
        // Every hook's event must arrive, however slow the machine (the default gives up
        // after 1 s and drops it).
        ("TALLY_HOOK_TIMEOUT_MS", "10000"),
    ];
    let start = |s: &str| json!({"hook_event_name": "SessionStart", "session_id": s, "cwd": cwd, "source": "startup"});
    let tool = |s: &str| {
        json!({"hook_event_name": "PostToolUse", "session_id": s, "cwd": cwd,
                                "tool_name": "Bash", "tool_use_id": "toolu_1", "duration_ms": 30,
                                "tool_input": {"command": "git switch -c feature/x"}})
    };
    let pause = || tokio::time::sleep(Duration::from_millis(60));

    // Session A: its cost arrives after its contexts.
    let a = format!("sess-a-{}", Uuid::new_v4());
    hook(&envs, &start(&a));
    pause().await;
    for cost in [0.11, 0.22] {
        let body = api_request(&a, "dev-1", Utc::now(), cost);
        post_otlp(&client, &url, &t.ingest_key, "logs", &body).await;
        pause().await;
    }
    git(&repo, &["switch", "-q", "-c", "feature/x"]);
    hook(&envs, &tool(&a));
    pause().await;
    for cost in [0.33, 0.44] {
        let body = api_request(&a, "dev-1", Utc::now(), cost);
        post_otlp(&client, &url, &t.ingest_key, "logs", &body).await;
        pause().await;
    }

    // Session B: its cost arrives before the contexts that explain it.
    git(&repo, &["switch", "-q", "main"]);
    let b = format!("sess-b-{}", Uuid::new_v4());
    let t0 = Utc::now();
    // Seconds apart, so that the start and the switch land between them on a slow machine.
    for (offset, cost) in [(-2, 0.05), (10, 1.01), (30, 2.02)] {
        let body = api_request(&b, "dev-1", t0 + TimeDelta::seconds(offset), cost);
        post_otlp(&client, &url, &t.ingest_key, "logs", &body).await;
    }
    hook(&envs, &start(&b));
    assert!(
        Utc::now() < t0 + TimeDelta::seconds(10),
        "the start came in time"
    );
    let switch_at = t0 + TimeDelta::seconds(20);
    tokio::time::sleep((switch_at - Utc::now()).to_std().unwrap_or_default()).await;
    git(&repo, &["switch", "-q", "feature/x"]);
    hook(&envs, &tool(&b));
    assert!(
        Utc::now() < t0 + TimeDelta::seconds(30),
        "the switch came in time"
    );

    // Session C has no hook: unattributed.
    let c = format!("sess-c-{}", Uuid::new_v4());
    let body = api_request(&c, "dev-2", Utc::now(), 0.5);
    post_otlp(&client, &url, &t.ingest_key, "logs", &body).await;

    // A: 2 contexts, a start, a tool run, 4 requests; B: 2, 1, 1, 3; C: 1.
    wait_projected(&pool, t.id, 16, Duration::from_secs(60)).await;
    let wait = (t0 + TimeDelta::seconds(32) - Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait).await;

    let q = query.url();
    let by_branch = get_json(
        &client,
        &format!("{q}/v1/dashboard/repositories?range=1h&by=branch"),
        &t.read_key,
    )
    .await;
    let rows = by_branch["rows"].as_array().unwrap();
    let find = |repo: &str, branch: &str| {
        rows.iter()
            .find(|r| r["repository"] == repo && r["branch"] == branch)
            .unwrap_or_else(|| panic!("no row for {repo} {branch}: {by_branch}"))
            .clone()
    };
    let main = find("github.com/acme/widgets", "main");
    let feature = find("github.com/acme/widgets", "feature/x");
    let unattributed = find("", "");
    assert_eq!(cents(&main["cost_usd"]), 11 + 22 + 101, "{by_branch}");
    assert_eq!(cents(&feature["cost_usd"]), 33 + 44 + 202, "{by_branch}");
    assert_eq!(cents(&unattributed["cost_usd"]), 5 + 50, "{by_branch}");
    assert_eq!(unattributed["unattributed"], true);
    assert_eq!(main["requests"], 3);
    assert_eq!(main["sessions"], 2);
    assert_eq!(feature["sessions"], 2);
    // Both hooks' tool runs came after their switch.
    assert_eq!(feature["tool_runs"], 2);

    let by_repo = get_json(
        &client,
        &format!("{q}/v1/dashboard/repositories?range=1h"),
        &t.read_key,
    )
    .await;
    assert_eq!(by_repo["rows"][0]["repository"], "github.com/acme/widgets");
    assert_eq!(cents(&by_repo["rows"][0]["cost_usd"]), 413);
    assert!(by_repo["rows"][0]["branch"].is_null());
    // Sessions A and B each worked on both branches: counted once each for the repository.
    assert_eq!(by_repo["rows"][0]["sessions"], 2, "{by_repo}");
    let series = get_json(
        &client,
        &format!("{q}/v1/dashboard/repositories/series?range=24h&step=1h&by=branch"),
        &t.read_key,
    )
    .await;
    let total: f64 = series["series"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["points"].as_array().unwrap().clone())
        .map(|p| p[1].as_f64().unwrap())
        .sum();
    assert_eq!((total * 100.0).round() as i64, 413 + 55, "{series}");

    // The raw rows give the usage the rollups added up, and only placed usage is stored.
    let (raw, rolled, unplaced) = usage_two_ways(&pool, t.id).await;
    let requests: i64 = raw
        .split(';')
        .map(|h| h.split('|').nth(1).unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(requests, 8, "A's 4, B's 3 and C's 1: {raw}");
    assert_eq!(raw, rolled);
    assert_eq!(unplaced, 0);

    // A replay rebuilds exactly the same attribution.
    let before = attribution_snapshot(&pool, t.id).await;
    assert!(before.contains("feature/x"), "{before}");
    stop_all([projector]).await;
    run_replay(&common, t.id, 0).await;
    let after = attribution_snapshot(&pool, t.id).await;
    assert_eq!(before, after);

    let _ = std::fs::remove_dir_all(&work);
    stop_all([ingest, query]).await;
}

fn github_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A `pull_request` delivery as GitHub documents it (the fields Tally reads, and others).
fn pull_request_payload(
    action: &str,
    opened: DateTime<Utc>,
    merged: Option<DateTime<Utc>>,
) -> Value {
    let updated = merged.unwrap_or(opened);
    json!({
        "action": action,
        "number": 42,
        "pull_request": {
            "url": "https://api.github.com/repos/Acme/Gadgets/pulls/42",
            "id": 1_000_042, "node_id": "PR_kwDOA", "number": 42,
            "html_url": "https://github.com/Acme/Gadgets/pull/42",
            "state": if merged.is_some() { "closed" } else { "open" },
            "locked": false, "title": "Gadgets, now with fewer bugs",
            "user": {"login": "octocat", "id": 1, "type": "User"},
            "body": "Written with Claude Code.",
            "created_at": opened, "updated_at": updated,
            "closed_at": merged, "merged_at": merged,
            "merge_commit_sha": merged.map(|_| "e5bd3914e2e596debea16f433f57875b5b90bcd6"),
            "draft": false,
            "head": {"label": "acme:feature/y", "ref": "feature/y", "sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e",
                     "repo": {"full_name": "Acme/Gadgets", "html_url": "https://github.com/Acme/Gadgets"}},
            "base": {"label": "acme:main", "ref": "main", "sha": "9049f1265b7d61be4a8904a9a27120d2064dab3b",
                     "repo": {"full_name": "Acme/Gadgets", "html_url": "https://github.com/Acme/Gadgets"}},
            "merged": merged.is_some(), "mergeable": null, "comments": 0, "commits": 3,
            "additions": 120, "deletions": 10, "changed_files": 4
        },
        "repository": {"id": 1296269, "name": "Gadgets", "full_name": "Acme/Gadgets",
                       "private": false, "html_url": "https://github.com/Acme/Gadgets",
                       "clone_url": "https://github.com/Acme/Gadgets.git", "default_branch": "main"},
        "sender": {"login": "octocat", "id": 1, "type": "User"}
    })
}

/// Sets `tenant`'s GitHub integration with `secret`, through an admin key made for it: the
/// key and the webhook's URL.
async fn github_integration(
    pool: &sqlx::PgPool,
    client: &reqwest::Client,
    url: &str,
    tenant: TenantId,
    secret: &str,
) -> (String, String) {
    let (_, admin) =
        ingest_api::control::store::create_api_key(pool, "", tenant, Scope::Admin, "integrations")
            .await
            .unwrap();
    let (st, view) = status_and_json(
        client
            .put(format!("{url}/v1/admin/integrations/github"))
            .bearer_auth(&admin)
            .json(&json!({"secret": secret})),
    )
    .await;
    assert_eq!(st, 200, "{view}");
    let hook_url = format!("{url}{}", view["webhook_path"].as_str().unwrap());
    (admin, hook_url)
}

async fn deliver(
    client: &reqwest::Client,
    url: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> (u16, Value) {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    status_and_json(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_requests_get_their_cost_and_agent_share_once() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let client = http();
    let t = create_tenant(&pool, "pull-requests").await;
    let other = create_tenant(&pool, "pull-requests-other").await;
    let url = ingest.url();
    let secret = "gh-webhook-secret-0123456789";
    let (admin, hook_url) = github_integration(&pool, &client, &url, t.id, secret).await;
    assert_eq!(hook_url, format!("{url}/v1/webhooks/github/{}", t.id));
    let (st, _) = status_and_json(
        client
            .put(format!("{url}/v1/admin/integrations/github"))
            .bearer_auth(&admin)
            .json(&json!({"secret": "short"})),
    )
    .await;
    assert_eq!(st, 422);

    // Session P works on feature/y, session Q on main; P's cost and lines are the PR's.
    let now = Utc::now();
    let (p, q) = (
        format!("sess-p-{}", Uuid::new_v4()),
        format!("sess-q-{}", Uuid::new_v4()),
    );
    let context = |s: &str, branch: &str| {
        json!({"type": "session.context", "occurred_at": (now - TimeDelta::seconds(60)).to_rfc3339(),
               "data": {"session_id": s, "user_id": "dev-2", "repository": "git@github.com:Acme/Gadgets.git",
                        "branch": branch}})
    };
    post_events_accepted(
        &client,
        &url,
        &t.ingest_key,
        &json!([context(&p, "feature/y"), context(&q, "main")]),
    )
    .await;
    for (s, secs, cost) in [(&p, 30, 0.40), (&p, 20, 0.35), (&q, 25, 1.00)] {
        let body = api_request(s, "dev-2", now - TimeDelta::seconds(secs), cost);
        post_otlp(&client, &url, &t.ingest_key, "logs", &body).await;
    }
    for (kind, n) in [("added", 30), ("removed", 5)] {
        let body = lines(&p, "dev-2", now - TimeDelta::seconds(25), kind, n);
        post_otlp(&client, &url, &t.ingest_key, "metrics", &body).await;
    }
    wait_projected(&pool, t.id, 7, Duration::from_secs(60)).await;
    let (raw, rolled, _) = usage_two_ways(&pool, t.id).await;
    assert!(
        raw.split(';').any(|h| h.ends_with("|30|5")),
        "the lines, from the raw rows: {raw}"
    );
    assert_eq!(raw, rolled);

    // Opened, then merged: each delivery signed with the tenant's secret.
    let opened = pull_request_payload("opened", now - TimeDelta::seconds(50), None);
    let merged = pull_request_payload("closed", now - TimeDelta::seconds(50), Some(now));
    let send = |body: &Value, delivery: &str, key: &str| {
        let bytes = serde_json::to_vec(body).unwrap();
        let headers = vec![
            ("x-github-event", "pull_request".to_string()),
            ("x-github-delivery", delivery.to_string()),
            ("x-hub-signature-256", github_signature(key, &bytes)),
        ];
        (bytes, headers)
    };
    let (bytes, headers) = send(&opened, "delivery-1", secret);
    let (st, body) = deliver(&client, &hook_url, &headers, &bytes).await;
    assert_eq!(st, 202, "{body}");
    let (merged_bytes, merged_headers) = send(&merged, "delivery-2", secret);
    let (st, body) = deliver(&client, &hook_url, &merged_headers, &merged_bytes).await;
    assert_eq!(st, 202, "{body}");

    // Forged: wrong secret, no signature, a body changed after signing, another tenant's
    // URL, a tenant that is not a UUID. All 401, none recorded.
    let mut forged = merged.clone();
    forged["pull_request"]["additions"] = json!(1);
    let (forged_bytes, forged_headers) = send(&forged, "delivery-3", "not-the-secret-at-all");
    let (st, _) = deliver(&client, &hook_url, &forged_headers, &forged_bytes).await;
    assert_eq!(st, 401);
    let unsigned: Vec<_> = merged_headers[..2].to_vec();
    assert_eq!(
        deliver(&client, &hook_url, &unsigned, &forged_bytes)
            .await
            .0,
        401
    );
    assert_eq!(
        deliver(&client, &hook_url, &merged_headers, &forged_bytes)
            .await
            .0,
        401
    );
    let elsewhere = format!("{url}/v1/webhooks/github/{}", other.id);
    assert_eq!(
        deliver(&client, &elsewhere, &merged_headers, &merged_bytes)
            .await
            .0,
        401
    );
    let garbage = format!("{url}/v1/webhooks/github/not-a-tenant");
    assert_eq!(
        deliver(&client, &garbage, &merged_headers, &merged_bytes)
            .await
            .0,
        401
    );
    // Signed but not JSON: a 400, not a 5xx.
    let (junk, junk_headers) = (b"{not json".to_vec(), {
        let mut h = merged_headers.clone();
        h[2].1 = github_signature(secret, b"{not json");
        h
    });
    assert_eq!(
        deliver(&client, &hook_url, &junk_headers, &junk).await.0,
        400
    );
    // A redelivery of the merge: accepted, and it changes nothing.
    let (st, _) = deliver(&client, &hook_url, &merged_headers, &merged_bytes).await;
    assert_eq!(st, 202);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while scalar_in_tenant(
        &pool,
        t.id,
        "SELECT count(*) FROM pull_requests WHERE state = 'merged'",
    )
    .await
        < 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the merge was not projected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM repository_events").await,
        2,
        "two deliveries, one redelivered, three forged: two events"
    );

    let qurl = query.url();
    let detail = get_json(
        &client,
        &format!("{qurl}/v1/dashboard/pull-requests?range=24h&repository=github.com/acme/gadgets&number=42"),
        &t.read_key,
    )
    .await;
    let pr = &detail["pull_requests"][0];
    assert_eq!(pr["state"], "merged", "{detail}");
    assert_eq!(pr["head_branch"], "feature/y");
    assert_eq!(pr["additions"], 120, "the forged additions were not taken");
    assert_eq!(cents(&pr["cost_usd"]), 75, "{detail}");
    assert_eq!(pr["agent_lines_added"], 30);
    assert!(
        (pr["agent_share"].as_f64().unwrap() - 0.25).abs() < 1e-9,
        "{detail}"
    );
    assert_eq!(pr["sessions"], 1);
    let sessions = detail["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["session_id"], p.as_str());

    let weekly = get_json(
        &client,
        &format!("{qurl}/v1/dashboard/pull-requests/weekly?range=30d"),
        &t.read_key,
    )
    .await;
    let weeks = weekly["weeks"].as_array().unwrap();
    assert_eq!(weeks.len(), 1, "{weekly}");
    assert_eq!(weeks[0]["merged"], 1);
    assert_eq!(cents(&weeks[0]["median_cost_usd"]), 75);
    let csv = client
        .get(format!(
            "{qurl}/v1/dashboard/pull-requests?range=24h&format=csv"
        ))
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        csv.contains("github.com/acme/gadgets") && csv.contains("agent_share"),
        "{csv}"
    );
    // Another tenant sees none of it.
    let theirs = get_json(
        &client,
        &format!("{qurl}/v1/dashboard/pull-requests?range=24h"),
        &other.read_key,
    )
    .await;
    assert_eq!(theirs["pull_requests"], json!([]));
    // A developer sees the pull requests they worked on, and one who did not work on any
    // sees none, nor any week (before, every pull request of the tenant with its author).
    for (who, seen) in [("dev-2", 1), ("dev-9", 0)] {
        create_member(&pool, &t, who, shared::jwt::Role::Developer, &[]).await;
        let token = member_token(&client, &url, &t, who).await;
        let list = get_json(
            &client,
            &format!("{qurl}/v1/dashboard/pull-requests?range=24h"),
            &token,
        )
        .await;
        let got = list["pull_requests"].as_array().unwrap();
        assert_eq!(got.len(), seen, "{who}: {list}");
        let weekly = get_json(
            &client,
            &format!("{qurl}/v1/dashboard/pull-requests/weekly?range=30d"),
            &token,
        )
        .await;
        assert_eq!(
            weekly["weeks"].as_array().unwrap().len(),
            seen,
            "{who}: {weekly}"
        );
    }

    // GitLab: the secret token is compared; a merged merge request is recorded.
    let (st, _) = status_and_json(
        client
            .put(format!("{url}/v1/admin/integrations/gitlab"))
            .bearer_auth(&admin)
            .json(&json!({"secret": "gl-token-0123456789abcdef"})),
    )
    .await;
    assert_eq!(st, 200);
    // GitLab's own time format, a week ago (a delivery's time is within the doors' bounds).
    let gitlab_time = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M:%S UTC").to_string();
    let (created, updated) = (
        gitlab_time(now - TimeDelta::days(7)),
        gitlab_time(now - TimeDelta::days(6)),
    );
    let mr = serde_json::to_vec(&json!({
        "object_kind": "merge_request", "event_type": "merge_request",
        "user": {"username": "dev"},
        "project": {"web_url": "https://gitlab.example.com/group/app", "path_with_namespace": "group/app"},
        "object_attributes": {"iid": 3, "state": "merged", "action": "merge", "source_branch": "fix",
                              "target_branch": "main", "title": "Fix", "created_at": created,
                              "updated_at": updated}
    }))
    .unwrap();
    let gl = format!("{url}/v1/webhooks/gitlab/{}", t.id);
    let token = |v: &str| {
        vec![
            ("x-gitlab-token", v.to_string()),
            ("x-gitlab-event", "Merge Request Hook".to_string()),
        ]
    };
    assert_eq!(
        deliver(&client, &gl, &token("wrong-token-0123456789"), &mr)
            .await
            .0,
        401
    );
    assert_eq!(
        deliver(&client, &gl, &token("gl-token-0123456789abcdef"), &mr)
            .await
            .0,
        202
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM pull_requests WHERE repository = 'gitlab.example.com/group/app' AND number = 3 AND state = 'merged'").await < 1 {
        assert!(std::time::Instant::now() < deadline, "the merge request was not projected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Deleting the integration refuses its deliveries from then on.
    let st = client
        .delete(format!("{url}/v1/admin/integrations/github"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 204);
    assert_eq!(deliver(&client, &hook_url, &headers, &bytes).await.0, 401);

    stop_all([ingest, projector, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sessions_timeline_lists_its_prompts_in_order_for_those_who_may_see_it() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let client = http();
    let t = create_tenant(&pool, "timeline").await;
    let sent = send_claude_code_telemetry(
        &ingest.url(),
        &t.ingest_key,
        &["--sessions", "2", "--prompts", "3", "--detail"],
    )
    .await;
    let sessions = sent["by_session"].as_object().unwrap();
    let (own, theirs) = {
        let mut ids: Vec<_> = sessions.iter().collect();
        ids.sort_by_key(|(_, d)| d["user"].as_str().unwrap().to_string());
        (ids[0].0.clone(), ids[1].0.clone())
    };
    let expected = &sessions[&own];
    assert_eq!(expected["user"], "user-0");

    let qurl = query.url();
    let timeline_url = |s: &str| format!("{qurl}/v1/dashboard/sessions/{s}/timeline");
    // Wait until every request of the session is projected.
    let want_requests: i64 = expected["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_i64().unwrap())
        .sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let timeline = loop {
        let res = client
            .get(timeline_url(&own))
            .bearer_auth(&t.read_key)
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            let v: Value = res.json().await.unwrap();
            if v["totals"]["requests"] == want_requests
                && v["totals"]["tool_runs"] == 9
                && v["prompts"]
                    .as_array()
                    .is_some_and(|p| p.len() == 3 && p.iter().all(|g| !g["length"].is_null()))
            {
                break v;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session was not projected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let prompts = timeline["prompts"].as_array().unwrap();
    let want = expected["prompts"].as_array().unwrap();
    let mut cost = 0.0;
    for (got, want) in prompts.iter().zip(want) {
        assert_eq!(got["prompt_id"], want["id"], "in time order");
        assert_eq!(got["length"], want["length"]);
        assert!(got["text"].is_null(), "no prompt text is stored: {got}");
        let kinds: Vec<&str> = got["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["kind"].as_str().unwrap())
            .collect();
        let want_kinds: Vec<&str> = want["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(kinds, want_kinds, "{got}");
        assert_eq!(got["totals"]["requests"], want["requests"]);
        assert_eq!(got["totals"]["errors"], want["errors"]);
        assert_eq!(cents(&got["totals"]["cost_usd"]), cents(&want["cost_usd"]));
        cost += want["cost_usd"].as_f64().unwrap();
        let request = got["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["kind"] == "api_request")
            .unwrap();
        // 2 500 read from the cache of 1 000 + 2 500 + 50 input tokens.
        let ratio = request["detail"]["cache_hit_ratio"].as_f64().unwrap();
        assert!((ratio - 2500.0 / 3550.0).abs() < 1e-9, "{request}");
    }
    assert_eq!(
        cents(&timeline["totals"]["cost_usd"]),
        (cost * 100.0).round() as i64
    );
    // Later prompts cost more: the most expensive first.
    let ids: Vec<&Value> = want.iter().map(|p| &p["id"]).rev().collect();
    assert_eq!(
        timeline["top_prompts"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        ids
    );

    // A developer sees their own session, and not another user's (404, as if it did not
    // exist); nor does anyone see an unknown one.
    let email = format!("user0-{}@example.com", Uuid::new_v4().simple());
    ingest_api::control::store::create_user(
        &pool,
        "",
        ingest_api::control::store::NewUser {
            tenant: t.id,
            email: &email,
            password: "Sturdy-Pass-42",
            role: shared::jwt::Role::Developer,
            external_id: Some("user-0"),
            teams: &[],
        },
    )
    .await
    .unwrap();
    let tokens: Value = login(&client, &ingest.url(), &email, "Sturdy-Pass-42")
        .await
        .json()
        .await
        .unwrap();
    let dev = tokens["access_token"].as_str().unwrap();
    let mine = client
        .get(timeline_url(&own))
        .bearer_auth(dev)
        .send()
        .await
        .unwrap();
    assert_eq!(mine.status(), 200);
    let not_mine = client
        .get(timeline_url(&theirs))
        .bearer_auth(dev)
        .send()
        .await
        .unwrap();
    assert_eq!(not_mine.status(), 404);
    let unknown = client
        .get(timeline_url("no-such-session"))
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let other = create_tenant(&pool, "timeline-other").await;
    let foreign = client
        .get(timeline_url(&own))
        .bearer_auth(&other.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 404);

    stop_all([ingest, projector, query]).await;
}

/// A repository without a remote: the hook sends its branch alone. Usage placed on such a
/// branch is placed (stored, and moved by a later context) like any other, counted once
/// whether its context comes in the same batch or later, and a replay gives the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_on_a_branch_without_a_repository_is_counted_once() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "branch-only").await;
    let url = ingest.url();
    let (s, other) = (
        format!("sess-b1-{}", Uuid::new_v4()),
        format!("sess-b2-{}", Uuid::new_v4()),
    );
    let at = |secs: i64| (Utc::now() - TimeDelta::seconds(secs)).to_rfc3339();
    let context = |secs: i64, branch: &str| {
        json!({"type": "session.context", "occurred_at": at(secs),
               "data": {"session_id": s, "user_id": "dev-3", "branch": branch}})
    };
    let agent = |session: &str, secs: i64, cost: f64| {
        json!({"type": "agent.interacted", "occurred_at": at(secs),
               "data": {"session_id": session, "user_id": "dev-3", "agent_name": "claude-code",
                        "interaction_type": "api_request", "input_tokens": 10,
                        "output_tokens": 1, "cost_usd": cost, "duration_ms": 5,
                        "status": "success"}})
    };
    // The context and the usage it places in one request; another session's, unplaced.
    post_events_accepted(
        &client,
        &url,
        &t.ingest_key,
        &json!([
            context(120, "main"),
            agent(&s, 90, 1.25),
            agent(&other, 90, 0.5)
        ]),
    )
    .await;
    wait_projected(&pool, t.id, 3, Duration::from_secs(60)).await;
    post_events_accepted(&client, &url, &t.ingest_key, &json!([agent(&s, 60, 0.75)])).await;
    wait_projected(&pool, t.id, 4, Duration::from_secs(60)).await;
    // A later context moves the last usage to another branch.
    post_events_accepted(&client, &url, &t.ingest_key, &json!([context(75, "fix")])).await;
    wait_projected(&pool, t.id, 5, Duration::from_secs(60)).await;

    let mut tx = tenant_tx(&pool, t.id).await;
    let (by_branch, stored): (Option<String>, i64) = sqlx::query_as(
        "SELECT (SELECT string_agg(format('%s|%s|%s|%s', repository, branch, r, c), ';'
                                   ORDER BY branch)
                   FROM (SELECT repository, branch, sum(requests) AS r,
                                round(sum(cost_usd)::numeric, 6) AS c
                           FROM repo_usage_1h GROUP BY 1, 2) x WHERE r <> 0),
                (SELECT count(*) FROM session_usage)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        by_branch.as_deref(),
        Some("||1|0.500000;|fix|1|0.750000;|main|1|1.250000")
    );
    assert_eq!(stored, 2, "the two placed usage rows");
    let (raw, rolled, unplaced) = usage_two_ways(&pool, t.id).await;
    assert_eq!(raw, rolled);
    assert_eq!(unplaced, 0);

    let before = attribution_snapshot(&pool, t.id).await;
    stop_all([projector]).await;
    run_replay(&common, t.id, 0).await;
    assert_eq!(before, attribution_snapshot(&pool, t.id).await);
    stop_all([ingest]).await;
}

/// A sender reusing one event id for an agent interaction and a tool run (at the same time,
/// in the same session) has two usage rows: both are counted, stored once placed, and moved
/// together by a context arriving after them, the same in a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_rows_sharing_an_event_id_are_each_placed_once() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "reused-ids").await;
    let url = ingest.url();
    let s = format!("sess-r-{}", Uuid::new_v4());
    let (id, at) = (
        Uuid::new_v4(),
        (Utc::now() - TimeDelta::seconds(90)).to_rfc3339(),
    );
    post_events_accepted(
        &client,
        &url,
        &t.ingest_key,
        &json!([
            {"id": id, "type": "agent.interacted", "occurred_at": at,
             "data": {"session_id": s, "user_id": "dev-4", "agent_name": "claude-code",
                      "interaction_type": "api_request", "input_tokens": 10, "output_tokens": 1,
                      "cost_usd": 0.5, "duration_ms": 5, "status": "success"}},
            {"id": id, "type": "tool.executed", "occurred_at": at,
             "data": {"session_id": s, "user_id": "dev-4", "tool_name": "Edit",
                      "duration_ms": 5, "success": true}}
        ]),
    )
    .await;
    wait_projected(&pool, t.id, 2, Duration::from_secs(60)).await;
    let context = json!([{"type": "session.context",
        "occurred_at": (Utc::now() - TimeDelta::seconds(120)).to_rfc3339(),
        "data": {"session_id": s, "user_id": "dev-4",
                 "repository": "git@github.com:Acme/Reuse.git", "branch": "main"}}]);
    post_events_accepted(&client, &url, &t.ingest_key, &context).await;
    wait_projected(&pool, t.id, 3, Duration::from_secs(60)).await;

    let mut tx = tenant_tx(&pool, t.id).await;
    let (by_repo, stored): (Option<String>, i64) = sqlx::query_as(
        "SELECT (SELECT string_agg(format('%s|%s|%s|%s', repository, r, tr, c), ';'
                                   ORDER BY repository)
                   FROM (SELECT repository, sum(requests) AS r, sum(tool_runs) AS tr,
                                round(sum(cost_usd)::numeric, 6) AS c
                           FROM repo_usage_1h GROUP BY 1) x WHERE r <> 0 OR tr <> 0),
                (SELECT count(*) FROM session_usage)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        by_repo.as_deref(),
        Some("github.com/acme/reuse|1|1|0.500000"),
        "both moved, nothing left unplaced"
    );
    assert_eq!(stored, 2, "the interaction and the tool run");
    let (raw, rolled, _) = usage_two_ways(&pool, t.id).await;
    assert_eq!(raw, rolled);

    let before = attribution_snapshot(&pool, t.id).await;
    stop_all([projector]).await;
    run_replay(&common, t.id, 0).await;
    assert_eq!(before, attribution_snapshot(&pool, t.id).await);
    stop_all([ingest]).await;
}

/// A timeline shows the fields of payloads' open maps (`metadata`, `details`, `context`) only
/// as short scalars: an ingest key can fill them with up to about 990 KB an event, and a
/// timeline reads up to 2 000 rows of each kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_timeline_shows_padded_open_maps_only_as_short_scalars() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "timeline-padded").await;
    let big = "r".repeat(300_000);
    let mut events: Vec<Value> = (0..3)
        .map(|i| {
            json!({"type": "agent.interacted", "occurred_at": ago(60 - i),
                   "data": {"user_id": "u", "session_id": "padded", "agent_name": "claude",
                            "interaction_type": "api_request", "duration_ms": 5,
                            "status": "success",
                            "metadata": {"prompt.id": big, "request_id": big,
                                         "attempt": {"deep": [big]}, "status_code": 200,
                                         "query_source": true}}})
        })
        .collect();
    events.push(json!({"type": "tool.executed", "occurred_at": ago(50),
        "data": {"user_id": "u", "session_id": "padded", "tool_name": "Bash", "duration_ms": 1,
                 "success": true, "details": {"prompt.id": "p", "tool_use_id": big,
                                              "decision_type": [big, big]}}}));
    events.push(json!({"type": "session.started", "occurred_at": ago(70),
        "data": {"user_id": "u", "session_id": "padded",
                 "context": {"source": big, "reason": 1e300, "model": "m"}}}));
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &Value::Array(events)).await;
    wait_projected(&pool, t.id, 5, Duration::from_secs(60)).await;

    let url = format!("{}/v1/dashboard/sessions/padded/timeline", query.url());
    let res = client
        .get(&url)
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.bytes().await.unwrap();
    assert!(
        body.len() < 16 * 1024,
        "the timeline is {} bytes",
        body.len()
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    let prompts = v["prompts"].as_array().unwrap();
    let cut = "r".repeat(255);
    let padded = prompts
        .iter()
        .find(|p| p["prompt_id"] == cut.as_str())
        .unwrap_or_else(|| panic!("no prompt with the cut id: {v}"));
    let requests: Vec<&Value> = padded["items"].as_array().unwrap().iter().collect();
    assert_eq!(requests.len(), 3, "{padded}");
    for r in requests {
        let d = &r["detail"];
        assert_eq!(d["request_id"], cut.as_str());
        assert!(d["attempt"].is_null(), "an object is not shown: {d}");
        assert_eq!(d["status_code"], 200);
        assert_eq!(d["query_source"], true);
    }
    let text = String::from_utf8_lossy(&body);
    assert!(
        !text.contains(&"r".repeat(256)),
        "nothing longer than 255 characters"
    );
    assert_eq!(v["totals"]["tool_runs"], 1);
    stop_all([projector, ingest, query]).await;
}

/// A delivery's time stays within the doors' bounds. A push whose head commit is dated 2099
/// or 1970 (its author's date, which anyone pushing may set) is taken when GitHub took it
/// (`repository.pushed_at`) or when it is received: before, it was stored under 2099, gave
/// that day a partition of its own, and stood above every later push of its branch. A pull
/// request whose own time is out of bounds is refused (422 naming `occurred_at`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn webhook_times_stay_within_the_doors_bounds() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let t = create_tenant(&pool, "webhook-times").await;
    let url = ingest.url();
    let secret = "gh-webhook-secret-0123456789";
    let (_, hook_url) = github_integration(&pool, &client, &url, t.id, secret).await;
    let send = |event: &'static str, body: Value| {
        let bytes = serde_json::to_vec(&body).unwrap();
        let headers = vec![
            ("x-github-event", event.to_string()),
            ("x-github-delivery", Uuid::new_v4().to_string()),
            ("x-hub-signature-256", github_signature(secret, &bytes)),
        ];
        let (client, hook_url) = (client.clone(), hook_url.clone());
        async move { deliver(&client, &hook_url, &headers, &bytes).await }
    };
    let push = |branch: &str, dated: &str, pushed_at: Option<i64>| {
        let mut repository = json!({"html_url": "https://github.com/Acme/Gadgets"});
        if let Some(at) = pushed_at {
            repository["pushed_at"] = json!(at);
        }
        json!({"ref": format!("refs/heads/{branch}"), "after": format!("{branch}-sha"),
               "deleted": false, "forced": false, "commits": [{}],
               "head_commit": {"timestamp": dated}, "repository": repository})
    };
    // The tenant's projection exists before the pushes are looked for.
    let first = json!([command("u", "first", 5, true)]);
    post_events_accepted(&client, &url, &t.ingest_key, &first).await;
    wait_projected(&pool, t.id, 1, Duration::from_secs(60)).await;
    let before = Utc::now() - TimeDelta::seconds(1);
    for (branch, dated) in [
        ("future", "2099-01-01T00:00:00Z"),
        ("past", "1970-01-02T00:00:00Z"),
    ] {
        let (st, body) = send("push", push(branch, dated, None)).await;
        assert_eq!(st, 202, "{body}");
    }
    let taken = before - TimeDelta::minutes(10);
    let (st, body) = send(
        "push",
        push("taken", "2099-01-01T00:00:00Z", Some(taken.timestamp())),
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let after = Utc::now() + TimeDelta::seconds(1);
    for (what, at) in [
        ("in the future", Utc::now() + TimeDelta::days(365)),
        (
            "older than the retention",
            Utc::now() - TimeDelta::days(200),
        ),
    ] {
        let (st, body) = send("pull_request", pull_request_payload("opened", at, None)).await;
        assert_eq!(st, 422, "{what}: {body}");
        assert_eq!(body["errors"][0]["field"], "occurred_at", "{what}: {body}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let sql = "SELECT count(*) FROM branch_pushes";
    while scalar_in_tenant(&pool, t.id, sql).await < 3 {
        assert!(std::time::Instant::now() < deadline, "pushes not projected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut tx = tenant_tx(&pool, t.id).await;
    let pushed: Vec<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT branch, pushed_at FROM branch_pushes ORDER BY branch")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
    drop(tx);
    assert_eq!(pushed.len(), 3, "{pushed:?}");
    for (branch, at) in &pushed {
        match branch.as_str() {
            "taken" => assert_eq!(at.timestamp(), taken.timestamp()),
            _ => assert!(before <= *at && *at <= after, "{branch}: {at}"),
        }
    }
    stop_all([ingest, projector]).await;
}
