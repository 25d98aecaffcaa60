//! The Claude Code hook script (`deploy/claude-code/tally-hook.mjs`, run with the real
//! `node`): hook JSON in, events in the dashboards out; paths and commands stay on the
//! machine unless enabled (then hashed if asked); an unreachable Tally costs the agent at
//! most the timeout, and the script prints nothing and exits 0.

use std::time::Duration;

use serde_json::json;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claude_code_hooks_reach_the_dashboards_privately() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let t = create_tenant(&pool, "hooks").await;
    let url = ingest.url();
    let base = [
        ("TALLY_URL", url.as_str()),
        ("TALLY_API_KEY", t.ingest_key.as_str()),
        ("TALLY_USER_ID", "dev-1"),
        // The hook drops what it could not send in time (1 s by default; the timeout is
        // tested below): here every event must arrive, on however slow a machine.
        ("TALLY_HOOK_TIMEOUT_MS", "10000"),
    ];
    let session = "5f1c7a1e-claude-session";
    let hooks = [
        json!({"hook_event_name": "SessionStart", "session_id": session, "cwd": "/home/dev/secret-project",
               "source": "startup", "model": "claude-opus", "transcript_path": "/tmp/t.jsonl"}),
        json!({"hook_event_name": "PostToolUse", "session_id": session, "tool_name": "Edit",
               "tool_use_id": "toolu_1", "duration_ms": 42, "cwd": "/home/dev/secret-project",
               "tool_input": {"file_path": "/home/dev/secret-project/src/keys.rs", "old_string": "a", "new_string": "b"},
               "tool_response": {"ok": true}}),
        json!({"hook_event_name": "PostToolUseFailure", "session_id": session, "tool_name": "Bash",
               "tool_use_id": "toolu_2", "duration_ms": 1500, "tool_input": {"command": "cat ~/.ssh/id_rsa"},
               "error": "permission denied: ~/.ssh/id_rsa", "is_interrupt": false}),
        json!({"hook_event_name": "SessionEnd", "session_id": session, "reason": "logout"}),
    ];
    for h in &hooks {
        let (ok, stdout, _) = run_hook(&base, h);
        assert!(ok && stdout.is_empty(), "exit 0 and silent: {stdout}");
    }
    // Paths enabled, but hashed.
    let mut hashed = base.to_vec();
    hashed.extend([("TALLY_HOOK_SEND_PATHS", "1"), ("TALLY_HOOK_HASH", "1")]);
    let third = json!({"hook_event_name": "PostToolUse", "session_id": session, "tool_name": "Read",
                       "tool_use_id": "toolu_3", "duration_ms": 5,
                       "tool_input": {"file_path": "/home/dev/secret-project/README.md"}});
    run_hook(&hashed, &third);

    wait_projected(&pool, t.id, 5, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(projected_events(&pool, t.id).await, Some(5));
    let tools = scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM tool_executions").await;
    assert_eq!(tools, 3);
    let failed = scalar_in_tenant(&pool, t.id, "SELECT count(*) FROM tool_executions WHERE status = 'error' AND name = 'Bash' AND duration_ms = 1500").await;
    assert_eq!(failed, 1);
    let sessions = scalar_in_tenant(
        &pool,
        t.id,
        "SELECT count(*) FROM sessions WHERE ended_at IS NOT NULL AND user_id = 'dev-1'",
    )
    .await;
    assert_eq!(sessions, 1);
    for secret in ["secret-project", "id_rsa", "keys.rs"] {
        let leaks = scalar_in_tenant(
            &pool,
            t.id,
            &format!("SELECT count(*) FROM (SELECT data FROM tool_executions UNION ALL SELECT data FROM session_events) d WHERE d.data::text LIKE '%{secret}%'"),
        )
        .await;
        assert_eq!(leaks, 0, "`{secret}` left the machine");
    }
    let hashed_rows = scalar_in_tenant(
        &pool,
        t.id,
        "SELECT count(*) FROM tool_executions WHERE data->'details'->>'file_path' LIKE 'sha256:%'",
    )
    .await;
    assert_eq!(hashed_rows, 1);

    // Tally unreachable: the hook gives up after its timeout, silently, with exit 0.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let envs = [
        ("TALLY_URL", closed.as_str()),
        ("TALLY_API_KEY", "tly_x"),
        ("TALLY_HOOK_TIMEOUT_MS", "500"),
    ];
    let (ok, stdout, took) = run_hook(&envs, &hooks[1]);
    assert!(ok && stdout.is_empty());
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // A server that accepts the connection and never answers: cut off by the timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let envs = [
        ("TALLY_URL", silent_url.as_str()),
        ("TALLY_API_KEY", "tly_x"),
        ("TALLY_HOOK_TIMEOUT_MS", "500"),
    ];
    let (ok, stdout, took) = run_hook(&envs, &hooks[1]);
    assert!(ok && stdout.is_empty());
    assert!(
        took >= Duration::from_millis(450),
        "it waited for its timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    drop(silent);

    stop_all([ingest, projector]).await;
}
