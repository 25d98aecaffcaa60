//! What a tenant keeps private: the text of prompts, which Claude Code sends when
//! `OTEL_LOG_USER_PROMPTS=1`, is dropped at the door (its length kept) unless the tenant
//! stores prompts, an opt-in that is audited.

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
