//! Tenant isolation is enforced by the database: a session entered as tenant A is refused
//! by PostgreSQL when it reaches for tenant B's tables or the control schema, even with
//! hand-written SQL.

use std::time::Duration;

use serde_json::Value;
use shared::tenant_sql;
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_session_cannot_read_another_tenant() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let a = create_tenant(&pool, "iso-a").await;
    let b = create_tenant(&pool, "iso-b").await;
    for t in [&a, &b] {
        let batch = Value::Array((0..5).map(|i| command("u", "c", i, true)).collect());
        post_events_accepted(&client, &ingest.url(), &t.ingest_key, &batch).await;
    }
    wait_projected(&pool, a.id, 5, Duration::from_secs(60)).await;
    wait_projected(&pool, b.id, 5, Duration::from_secs(60)).await;

    let b_schema = b.id.schema(1);
    let attacks = [
        format!("SELECT count(*) FROM {b_schema}.activity_1m"),
        format!("SELECT count(*) FROM {b_schema}.command_executions"),
        format!("SELECT seq FROM {b_schema}.projection_state"),
        "SELECT count(*) FROM control.api_keys".to_string(),
        "SELECT count(*) FROM control.tenants".to_string(),
    ];
    for sql in &attacks {
        let mut tx = pool.begin().await.unwrap();
        tenant_sql::enter_tenant_readonly(&mut tx, a.id, &a.id.schema(1))
            .await
            .unwrap();
        // Tenant A's own data is readable…
        let own: i64 = sqlx::query_scalar("SELECT count(*) FROM command_executions")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(own, 5);
        // …and the other tenant's is refused by PostgreSQL.
        let err = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .fetch_all(&mut *tx)
            .await
            .expect_err(&format!("`{sql}` must be refused"));
        let code = err
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.to_string());
        assert_eq!(code.as_deref(), Some("42501"), "`{sql}`: {err}");
        tx.rollback().await.unwrap();
    }
    stop_all([projector, ingest]).await;
}
