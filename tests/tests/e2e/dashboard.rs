//! The dashboard page in a real browser: headless Chromium (Debian's package), driven by
//! `tests/browser/dashboard.mjs` (playwright-core), signs in, compares the page's numbers
//! with the API's, sees a new event arrive in the live feed, and saves a screenshot.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use shared::jwt::Role;
use tally_tests::events::Generator;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_page_works_in_headless_chromium() {
    let TestEnv { pool, common } = test_env().await;
    let query_port = free_port();
    let ingest = start_ingest(&common, |c| {
        c.cors_origins = format!("http://127.0.0.1:{query_port}");
    })
    .await;
    let ingest_url = ingest.url();
    let query = start_query(&common, |c| {
        c.http_addr = format!("127.0.0.1:{query_port}");
        c.jwks_url = ingest.jwks_url();
        c.ingest_url = ingest_url.clone();
    })
    .await;
    let projector = start_projector(&common).await;
    let client = http();
    let t = create_tenant(&pool, "browser").await;
    let email = format!("owner-{}@example.com", uuid::Uuid::new_v4().simple());
    create_person(&pool, t.id, &email, "Browser-Pass-1", Role::Owner).await;
    // The same address and password in a second tenant: the page asks which.
    let twin = create_tenant(&pool, "browser-twin").await;
    create_person(&pool, twin.id, &email, "Browser-Pass-1", Role::Viewer).await;
    let mut generator = Generator::new(5, "web", 6, chrono::Duration::hours(3));
    let mut batch = generator.batch(300);
    // Claude Code's counters, as its OpenTelemetry metrics arrive: the Claude Code cards.
    let now = chrono::Utc::now().to_rfc3339();
    for (name, kind, value) in [
        ("claude_code.lines_of_code.count", "added", 120.0),
        ("claude_code.lines_of_code.count", "removed", 30.0),
        ("claude_code.commit.count", "", 2.0),
        ("claude_code.pull_request.count", "", 1.0),
    ] {
        batch.push(
            serde_json::json!({"type": "metric.sample", "occurred_at": now,
            "data": {"name": name, "labels": {"type": kind, "user.id": "u-web"}, "value": value,
                     "kind": "counter"}}),
        );
    }
    // A session in a repository (its context from the hook), with two prompts' requests.
    let at = |secs: i64| (chrono::Utc::now() - chrono::Duration::seconds(secs)).to_rfc3339();
    for e in [
        serde_json::json!({"type": "session.started", "occurred_at": at(120),
            "data": {"session_id": "browser-session", "user_id": "u-web"}}),
        serde_json::json!({"type": "session.context", "occurred_at": at(119),
            "data": {"session_id": "browser-session", "user_id": "u-web",
                     "repository": "https://github.com/acme/web.git", "branch": "feature/ui"}}),
        serde_json::json!({"type": "agent.interacted", "occurred_at": at(90),
            "data": {"session_id": "browser-session", "user_id": "u-web", "agent_name": "claude-code",
                     "interaction_type": "api_request", "input_tokens": 1000, "output_tokens": 100,
                     "model": "claude-sonnet-4-5", "cost_usd": 1.25, "duration_ms": 900,
                     "status": "success", "metadata": {"prompt.id": "p-1"}}}),
        serde_json::json!({"type": "agent.interacted", "occurred_at": at(60),
            "data": {"session_id": "browser-session", "user_id": "u-web", "agent_name": "claude-code",
                     "interaction_type": "api_request", "input_tokens": 500, "output_tokens": 50,
                     "model": "claude-sonnet-4-5", "cost_usd": 0.75, "duration_ms": 700,
                     "status": "success", "metadata": {"prompt.id": "p-2"}}}),
    ] {
        batch.push(e);
    }
    let sent = batch.len() as i64;
    let batch = Value::Array(batch);
    // A budget on the tenant's tokens: the page shows it as a bar with its forecast.
    let (_, admin) = ingest_api::control::store::create_api_key(
        &pool,
        "",
        t.id,
        shared::apikey::Scope::Admin,
        "browser-admin",
    )
    .await
    .unwrap();
    let res = client
        .post(format!("{}/v1/admin/budgets", ingest.url()))
        .bearer_auth(&admin)
        .json(
            &serde_json::json!({"name": "browser tokens", "scope": "tenant",
            "metric": "tokens", "period": "month", "amount": 1e12}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch).await;
    wait_projected(&pool, t.id, sent, Duration::from_secs(60)).await;
    // Its pull request, merged, from GitHub's webhook.
    let secret = "browser-webhook-secret-0123";
    let res = client
        .put(format!("{}/v1/admin/integrations/github", ingest.url()))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"secret": secret}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let merged_at = chrono::Utc::now().to_rfc3339();
    let pr = serde_json::to_vec(&serde_json::json!({
        "action": "closed", "number": 7,
        "pull_request": {"number": 7, "state": "closed", "merged": true, "title": "New UI",
            "html_url": "https://github.com/acme/web/pull/7", "user": {"login": "octocat"},
            "created_at": at(150), "updated_at": merged_at, "merged_at": merged_at, "closed_at": merged_at,
            "head": {"ref": "feature/ui"}, "base": {"ref": "main"}, "additions": 80, "deletions": 3},
        "repository": {"full_name": "acme/web", "html_url": "https://github.com/acme/web"}
    }))
    .unwrap();
    let mut mac =
        <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(secret.as_bytes()).unwrap();
    hmac::Mac::update(&mut mac, &pr);
    let signature = format!(
        "sha256={}",
        hex::encode(hmac::Mac::finalize(mac).into_bytes())
    );
    let res = client
        .post(format!("{}/v1/webhooks/github/{}", ingest.url(), t.id))
        .header("content-type", "application/json")
        .header("x-github-event", "pull_request")
        .header("x-github-delivery", uuid::Uuid::new_v4().to_string())
        .header("x-hub-signature-256", signature)
        .body(pr)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM pull_requests").await < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pull request was not projected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The page itself is served with a restrictive content security policy.
    let res = client
        .get(format!("{}/", query.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    // No inline script may run: the page's script is a file of its own.
    let script_src = csp
        .split(';')
        .map(str::trim)
        .find(|d| d.starts_with("script-src"))
        .unwrap_or_else(|| panic!("no script-src in {csp}"));
    assert_eq!(script_src, "script-src 'self'", "{csp}");
    let html = res.text().await.unwrap();
    assert!(
        !html.contains("<script>") && html.contains("<script src=\"/dashboard.js\">"),
        "the page has inline script"
    );
    let js = client
        .get(format!("{}/dashboard.js", query.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));

    let shot = bin_dir().join("tally-dashboard.png");
    let script = repo_root().join("tests/browser/dashboard.mjs");
    let query_url = query.url();
    let ingest_key = t.ingest_key.clone();
    let tenant_id = t.id.to_string();
    let shot_path = shot.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .current_dir(repo_root().join("tests/browser"))
            .env("QUERY_URL", query_url)
            .env("INGEST_URL", ingest_url)
            .env("EMAIL", email)
            .env("PASSWORD", "Browser-Pass-1")
            .env("INGEST_KEY", ingest_key)
            .env("SCREENSHOT", &shot_path)
            .env("TENANT_ID", tenant_id)
            .output()
            .expect("node runs (make test installs Node.js packages and Chromium)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("ok - the live feed shows it"));
    assert!(
        stdout.contains("ok - the timeline page shows the session's 2 prompts"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok - the budget is shown as a bar"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok - lines card shows 120 / 30"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok - individual views are hidden"),
        "{stdout}"
    );
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false),
        "screenshot saved"
    );

    stop_all([projector, ingest, query]).await;
}
