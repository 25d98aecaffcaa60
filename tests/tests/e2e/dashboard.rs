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
        stdout.contains("ok - the budget is shown as a bar"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok - lines card shows 120 / 30"),
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
