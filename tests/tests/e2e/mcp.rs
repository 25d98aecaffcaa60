//! query-api's MCP server, driven by the official MCP Python SDK over Streamable HTTP: each
//! tool answers what the REST API answers the same caller, a developer gets only their own
//! data through every tool, another tenant's credential gets nothing of this tenant, and bad
//! arguments get a tool error.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use shared::jwt::Role;
use tally_tests::*;

/// Runs the SDK client (in its default mode) against `mcp` with `authorization` and
/// `calls`; its JSON report.
async fn mcp_client(mcp: &str, authorization: &str, calls: &Value) -> Value {
    mcp_client_in(Mode::Auto, mcp, authorization, calls).await
}

/// How the SDK client connects: `Auto` (its default) uses the 2026-07-28 revision where the
/// server speaks it; `Legacy` the initialize handshake of 2025-11-25.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Auto,
    Legacy,
}

async fn mcp_client_in(mode: Mode, mcp: &str, authorization: &str, calls: &Value) -> Value {
    let (mcp, authorization, calls) = (
        mcp.to_string(),
        authorization.to_string(),
        calls.to_string(),
    );
    let mode = match mode {
        Mode::Auto => "auto",
        Mode::Legacy => "legacy",
    };
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(otel_python())
            .arg(repo_root().join("tests/clients/mcp_client.py"))
            .arg(&mcp)
            .env("TALLY_MCP_AUTH", &authorization)
            .env("TALLY_MCP_MODE", mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the MCP client starts (deploy/local/test-clients.sh installs it)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(calls.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "the MCP client's report ({e}): {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    })
    .await
    .unwrap()
}

/// Two agent requests of `user` in session `session`, $`cost` each.
fn requests(user: &str, session: &str, cost: f64) -> Vec<Value> {
    let at = (chrono::Utc::now() - chrono::TimeDelta::seconds(90)).to_rfc3339();
    let mut out = vec![json!({"type": "session.started", "occurred_at": at,
        "data": {"user_id": user, "team_id": "core", "session_id": session}})];
    for _ in 0..2 {
        out.push(json!({"type": "agent.interacted", "occurred_at": at,
            "data": {"user_id": user, "team_id": "core", "session_id": session,
                     "agent_name": "claude-code", "interaction_type": "api_request",
                     "model": "claude-sonnet-4-5", "input_tokens": 100, "output_tokens": 20,
                     "cost_usd": cost, "duration_ms": 900, "status": "success"}}));
    }
    out
}

/// The calls of every tool, as the test makes them, and the REST path each one is.
fn every_tool(own_session: &str) -> (Value, Vec<&'static str>) {
    let calls = json!([
        {"tool": "usage_summary", "arguments": {"range": "24h"}},
        {"tool": "top", "arguments": {"dimension": "user", "range": "24h", "limit": 5}},
        {"tool": "sessions", "arguments": {"range": "24h"}},
        {"tool": "session_timeline", "arguments": {"session_id": own_session}},
        {"tool": "budget_status", "arguments": {}},
        {"tool": "cost_by_repository", "arguments": {"range": "24h", "by": "branch"}},
    ]);
    let rest = vec![
        "/v1/dashboard/overview?range=24h",
        "/v1/dashboard/top?range=24h&dimension=user&limit=5",
        "/v1/dashboard/sessions?range=24h&limit=20",
        "TIMELINE",
        "/v1/budgets",
        "/v1/dashboard/repositories?range=24h&by=branch",
    ];
    (calls, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_mcp_server_answers_each_caller_what_the_rest_api_does() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let (client, q, i) = (http(), query.url(), ingest.url());
    let mcp = format!("{q}/mcp");
    let t = create_tenant(&pool, "mcp").await;
    let other = create_tenant(&pool, "mcp-other").await;
    create_member(&pool, &t, "owner", Role::Owner, &[]).await;
    create_member(&pool, &t, "dev1", Role::Developer, &["core"]).await;
    create_member(&pool, &t, "dev2", Role::Developer, &["core"]).await;
    let mut events = requests("dev1", "sess-dev1", 0.25);
    events.extend(requests("dev2", "sess-dev2", 1.5));
    post_events_accepted(&client, &i, &t.ingest_key, &json!(events)).await;
    wait_projected(&pool, t.id, events.len() as i64, Duration::from_secs(60)).await;
    let owner = format!("Bearer {}", member_token(&client, &i, &t, "owner").await);
    for (scope, scope_id, amount) in [("tenant", "", 10.0), ("user", "dev1", 2.0)] {
        let (st, body) = status_and_json(
            client
                .post(format!("{i}/v1/admin/budgets"))
                .header("authorization", &owner)
                .json(&json!({"name": format!("{scope} daily"), "scope": scope,
                              "scope_id": scope_id, "metric": "cost_usd", "period": "day",
                              "amount": amount, "thresholds": [80]})),
        )
        .await;
        assert_eq!(st, 201, "{body}");
    }

    // A developer: every tool answers, equal to the REST API, with their data only.
    let dev1 = format!("Bearer {}", member_token(&client, &i, &t, "dev1").await);
    let (calls, rest) = every_tool("sess-dev1");
    // In both revisions: the current one (the SDK's default) and the initialize handshake.
    for (mode, version) in [(Mode::Auto, "2026-07-28"), (Mode::Legacy, "2025-11-25")] {
        let report = mcp_client_in(mode, &mcp, &dev1, &calls).await;
        assert!(report.get("connect_error").is_none(), "{report}");
        assert_eq!(
            report["server"]["protocolVersion"], version,
            "{mode:?}: {report}"
        );
        assert_eq!(report["server"]["name"], "tally", "{report}");
        let tools: Vec<&str> = report["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            tools,
            [
                "usage_summary",
                "top",
                "sessions",
                "session_timeline",
                "budget_status",
                "cost_by_repository"
            ]
        );
        for (n, path) in rest.iter().enumerate() {
            let call = &report["calls"][n];
            assert_eq!(call["isError"], false, "{path}: {call}");
            let path = if *path == "TIMELINE" {
                "/v1/dashboard/sessions/sess-dev1/timeline"
            } else {
                path
            };
            let res = client
                .get(format!("{q}{path}"))
                .header("authorization", &dev1)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "{path}");
            let want: Value = res.json().await.unwrap();
            if let Some(budgets) = want.as_array() {
                // A budget's forecast moves with the clock; what it says of the money does not.
                let money = |b: &Value| {
                    json!([
                        b["budget"],
                        b["status"]["spent"],
                        b["status"]["remaining"],
                        b["status"]["period_start"],
                        b["status"]["forecast"]["outcome"]
                    ])
                };
                let got: Vec<Value> = call["structured"]["budgets"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(money)
                    .collect();
                assert_eq!(got, budgets.iter().map(money).collect::<Vec<_>>(), "{path}");
            } else {
                assert_eq!(same_window(&call["structured"], &want), want, "{path}");
            }
            assert!(!call["text"].as_str().unwrap().is_empty(), "{path}");
        }
        let usage = &report["calls"][0];
        assert_eq!(
            usage["structured"]["cost_usd"], 0.5,
            "dev1's own cost: {usage}"
        );
        assert!(
            usage["text"].as_str().unwrap().contains("cost $0.50"),
            "{usage}"
        );
        let top_users: Vec<&str> = report["calls"][1]["structured"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap())
            .collect();
        assert_eq!(top_users, ["dev1"]);
        let sessions = report["calls"][2]["structured"]["sessions"]
            .as_array()
            .unwrap();
        assert!(
            sessions.iter().all(|s| s["user_id"] == "dev1"),
            "{sessions:?}"
        );
        assert_eq!(report["calls"][3]["structured"]["totals"]["cost_usd"], 0.5);
        let budgets = report["calls"][4]["structured"]["budgets"]
            .as_array()
            .unwrap();
        assert_eq!(budgets.len(), 1, "only dev1's own budget: {budgets:?}");
        assert_eq!(budgets[0]["budget"]["scope_id"], "dev1");
    }

    // Another developer's session, bad arguments and an unknown tool: errors, no crash.
    let bad = json!([
        {"tool": "session_timeline", "arguments": {"session_id": "sess-dev2"}},
        {"tool": "top", "arguments": {"limit": 0}},
        {"tool": "top", "arguments": {"salary": true}},
        {"tool": "usage_summary", "arguments": {"range": "2y"}},
        {"tool": "usage_summary", "arguments": {"from": "yesterday"}},
        {"tool": "session_timeline", "arguments": {}},
        {"tool": "drop_tables", "arguments": {}},
        {"tool": "usage_summary", "arguments": {"range": "24h"}},
    ]);
    let report = mcp_client(&mcp, &dev1, &bad).await;
    for n in 0..6 {
        let call = &report["calls"][n];
        assert_eq!(call["isError"], true, "{n}: {call}");
        assert!(call["structured"].is_null(), "{n}: {call}");
    }
    assert!(report["calls"][0]["text"].as_str().unwrap().contains("404"));
    assert!(report["calls"][1]["text"]
        .as_str()
        .unwrap()
        .contains("`limit` must be 1..=100"));
    assert!(report["calls"][4]["text"]
        .as_str()
        .unwrap()
        .contains("from"));
    assert!(
        report["calls"][6]["error"]
            .as_str()
            .unwrap()
            .contains("unknown tool"),
        "{report}"
    );
    assert_eq!(
        report["calls"][7]["isError"], false,
        "the server still answers"
    );

    // The owner sees the whole tenant; another tenant's key sees none of it.
    let report = mcp_client(
        &mcp,
        &owner,
        &json!([{"tool": "usage_summary", "arguments": {"range": "24h"}}]),
    )
    .await;
    assert_eq!(
        report["calls"][0]["structured"]["cost_usd"], 3.5,
        "{report}"
    );
    let theirs = format!("Bearer {}", other.read_key);
    let (calls, _) = every_tool("sess-dev1");
    let report = mcp_client(&mcp, &theirs, &calls).await;
    assert_eq!(
        report["calls"][0]["structured"]["events_total"], 0,
        "{report}"
    );
    assert_eq!(report["calls"][1]["structured"]["items"], json!([]));
    assert_eq!(report["calls"][2]["structured"]["sessions"], json!([]));
    assert_eq!(
        report["calls"][3]["isError"], true,
        "another tenant's session"
    );
    assert_eq!(report["calls"][4]["structured"]["budgets"], json!([]));
    assert_eq!(report["calls"][5]["structured"]["rows"], json!([]));

    // No credential, or a forged one: nothing but a 401.
    for credential in [
        "",
        "Bearer tally_read_forged",
        "Bearer eyJhbGciOiJub25lIn0.e30.",
    ] {
        let report = mcp_client(&mcp, credential, &json!([])).await;
        let err = report["connect_error"].as_str().unwrap_or_default();
        assert!(err.contains("401"), "{credential}: {report}");
    }
    // The transport's other doors.
    let res = client
        .get(&mcp)
        .header("authorization", &dev1)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    let res = client
        .post(&mcp)
        .header("authorization", &dev1)
        .header("origin", "https://evil.example")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "a page of another origin");
    let res = client
        .post(&mcp)
        .header("authorization", &dev1)
        .body(vec![b'['; 70_000])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);

    stop_all([query, ingest, projector]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mcp_calls_count_against_the_tenants_read_limit() {
    let TestEnv { pool, common } = test_env().await;
    let query = start_query(&common, |c| c.read_rate_limit_per_min = 6).await;
    let t = create_tenant(&pool, "mcp-limited").await;
    let other = create_tenant(&pool, "mcp-unlimited").await;
    let key = format!("Bearer {}", t.read_key);
    let calls = json!([
        {"tool": "budget_status", "arguments": {}},
        {"tool": "budget_status", "arguments": {}},
        {"tool": "budget_status", "arguments": {}},
        {"tool": "budget_status", "arguments": {}},
    ]);
    at_window_start().await;
    let report = mcp_client(&format!("{}/mcp", query.url()), &key, &calls).await;
    // Each message counts, and each tool call's read again: the limit stops them, with
    // a 429 the client sees, never a wrong answer.
    let refused = report.to_string();
    assert!(
        refused.contains("429")
            || refused.contains("too many")
            || refused.contains("6 read requests"),
        "{report}"
    );
    let fine = mcp_client(
        &format!("{}/mcp", query.url()),
        &format!("Bearer {}", other.read_key),
        &json!([{"tool": "budget_status", "arguments": {}}]),
    )
    .await;
    assert_eq!(
        fine["calls"][0]["isError"], false,
        "another tenant is not limited: {fine}"
    );
    stop_all([query]).await;
}

/// Runs `deploy/claude-code/tally-mcp-headers.mjs` with `args` and `env`: whether it succeeded,
/// and its stdout, or its stderr (why) when it did not.
async fn headers_helper(args: &[&str], env: Vec<(&'static str, String)>) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("node")
            .arg(repo_root().join("deploy/claude-code/tally-mcp-headers.mjs"))
            .args(&args)
            .envs(env)
            .stdin(Stdio::null())
            .output()
            .expect("node runs");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        eprintln!("{stderr}");
        match out.status.success() {
            true => (true, String::from_utf8_lossy(&out.stdout).to_string()),
            false => (false, stderr),
        }
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_headers_helper_keeps_a_developer_signed_in_as_themself() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let client = http();
    let t = create_tenant(&pool, "mcp-helper").await;
    create_member(&pool, &t, "dev1", Role::Developer, &["core"]).await;
    let dir = std::env::temp_dir().join(format!("tally-mcp-{}", t.id));
    let file = dir.join("credentials.json");
    let env = || {
        vec![
            ("TALLY_URL", ingest.url()),
            ("TALLY_CREDENTIALS", file.to_string_lossy().to_string()),
            ("TALLY_EMAIL", member_email(&t, "dev1")),
            ("TALLY_PASSWORD", MEMBER_PASSWORD.to_string()),
        ]
    };
    // The same address and password in a second tenant: the helper must be told which.
    let twin = create_tenant(&pool, "mcp-helper-twin").await;
    create_person(
        &pool,
        twin.id,
        &member_email(&t, "dev1"),
        MEMBER_PASSWORD,
        Role::Viewer,
    )
    .await;
    let (ok, why) = headers_helper(&["--login"], env()).await;
    assert!(!ok, "two tenants open: the helper does not choose");
    assert!(
        why.contains("TALLY_TENANT")
            && why.contains(&t.id.to_string())
            && why.contains(&twin.id.to_string()),
        "the helper lists the tenants to choose from: {why}"
    );
    let env = || {
        let mut env = env();
        env.push(("TALLY_TENANT", t.id.to_string()));
        env
    };
    let (ok, _) = headers_helper(&["--login"], env()).await;
    assert!(ok, "signs in");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credentials are the person's alone");
    let who = |headers: String| {
        let client = client.clone();
        let q = query.url();
        async move {
            let h: Value = serde_json::from_str(&headers).expect("the helper prints JSON headers");
            let res = client
                .get(format!("{q}/v1/dashboard/access"))
                .header("authorization", h["Authorization"].as_str().unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()["user_id"].clone()
        }
    };
    let (ok, out) = headers_helper(&[], env()).await;
    assert!(ok);
    assert_eq!(who(out).await, "dev1");
    // The access token runs out: helpers started together refresh it once, and the sign-in
    // survives (a refresh token used twice would end it).
    for round in 0..2 {
        let mut kept: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let before = kept["refresh_token"].clone();
        kept["expires_at"] = json!(0);
        std::fs::write(&file, kept.to_string()).unwrap();
        let (a, b, c) = tokio::join!(
            headers_helper(&[], env()),
            headers_helper(&[], env()),
            headers_helper(&[], env())
        );
        for (ok, out) in [a, b, c] {
            assert!(ok, "round {round}");
            assert_eq!(who(out).await, "dev1", "round {round}");
        }
        let after: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_ne!(after["refresh_token"], before, "round {round}: refreshed");
    }
    std::fs::remove_dir_all(&dir).ok();
    stop_all([query, ingest]).await;
}

/// `got` (the MCP tool's answer) with the window `want` (the REST answer, requested after it)
/// reports, when the clock passed a minute between the two: a window ends at the minute after
/// its request, so it moves with the clock. Only when both windows are as long, and `want`'s
/// is the later; everything else is compared as it came.
fn same_window(got: &Value, want: &Value) -> Value {
    let at = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    };
    let mut got = got.clone();
    if let (Some(gf), Some(gt), Some(wf), Some(wt)) = (
        at(&got, "from"),
        at(&got, "to"),
        at(want, "from"),
        at(want, "to"),
    ) {
        if gt - gf == wt - wf && wt > gt && wt - gt <= chrono::Duration::minutes(2) {
            got["from"] = want["from"].clone();
            got["to"] = want["to"].clone();
        }
    }
    got
}
