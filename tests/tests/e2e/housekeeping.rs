//! The control schema's housekeeping (the projector's retention pass): what only grew with use
//! — relayed outbox rows, expired refresh-token families, abandoned sign-on logins, closed
//! invitations, revoked keys, finished deliveries and their firings — goes after its time, and
//! nothing still in use goes with it.

use serde_json::{json, Value};
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tally_tests::*;
use uuid::Uuid;

/// Whether the row of `table` keyed `key = id` is still there.
async fn present(pool: &PgPool, table: &str, key: &str, id: Uuid) -> bool {
    let sql = format!("SELECT EXISTS (SELECT 1 FROM control.{table} WHERE {key} = $1)");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Attempt `n` of `delivery`, made `days` ago.
async fn attempt(pool: &PgPool, delivery: Uuid, n: i32, days: i32) {
    sqlx::query(
        "INSERT INTO control.delivery_attempts (delivery_id, attempt, at, status_code, latency_ms)
         VALUES ($1, $2, now() - make_interval(days => $3), 500, 12)",
    )
    .bind(delivery)
    .bind(n)
    .bind(days)
    .execute(pool)
    .await
    .unwrap();
}

/// Rows as the services write them, aged by hand: each is `(table, key, id, goes)`.
struct Aged {
    rows: Vec<(&'static str, &'static str, Uuid, bool)>,
}

impl Aged {
    async fn insert(&mut self, pool: &PgPool, table: &'static str, goes: bool, sql: &str) -> Uuid {
        let id = Uuid::now_v7();
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let key = if table == "outbox" { "event_id" } else { "id" };
        self.rows.push((table, key, id, goes));
        id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_control_schema_keeps_only_what_is_still_in_use() {
    use shared::jwt::Role;
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let url = ingest.url();
    let t = create_tenant(&pool, "housekeeping").await;
    let tenant = t.id.0;
    let tag = Uuid::new_v4().simple().to_string();
    let email = format!("keeper-{tag}@housekeeping.example");
    let person = create_person(&pool, t.id, &email, "Keeper-Pass-4242", Role::Admin).await;

    // A login rotated once: its first token is used, and then expired three days ago while
    // the family's newest token lives. The used token must stay, so that presenting it again
    // is recognised as reuse and revokes the family.
    let tokens: Value = login(&client, &url, &email, "Keeper-Pass-4242")
        .await
        .json()
        .await
        .unwrap();
    let first = tokens["refresh_token"].as_str().unwrap().to_string();
    let refresh = |token: String| {
        let req = client
            .post(format!("{url}/v1/auth/refresh"))
            .json(&json!({"refresh_token": token}));
        async move { status_and_json(req).await }
    };
    let (st, rotated) = refresh(first.clone()).await;
    assert_eq!(st, 200, "{rotated}");
    let newest = rotated["refresh_token"].as_str().unwrap().to_string();
    sqlx::query(
        "UPDATE control.refresh_tokens SET expires_at = now() - interval '3 days'
          WHERE token_hash = $1",
    )
    .bind(shared::apikey::hash(&first))
    .execute(&pool)
    .await
    .unwrap();

    let mut aged = Aged { rows: Vec::new() };
    let ns = format!("housekeeping-{tag}");
    // Outbox rows of a namespace no relay serves: relayed 8 and 6 days ago, refused by Kafka
    // 8 days ago, and one never sent.
    for (goes, sent, refused) in [
        (true, Some(8), None),
        (false, Some(6), None),
        (false, Some(8), Some("over the record size")),
        (false, None, None),
    ] {
        let sent = sent.map_or("NULL".into(), |d| format!("now() - interval '{d} days'"));
        let refused = refused.map_or("NULL".into(), |r| format!("'{r}'"));
        let sql = format!(
            "INSERT INTO control.outbox (event_id, record_key, envelope, namespace, created_at,
                                         sent_at, refused)
             VALUES ($1, '{tenant}', '{{}}', '{ns}', now() - interval '30 days', {sent}, {refused})"
        );
        aged.insert(&pool, "outbox", goes, &sql).await;
    }
    // A family wholly expired two days ago goes; one expired an hour ago stays.
    let family =
        |goes: bool, expired: &str| {
            format!(
            "INSERT INTO control.refresh_tokens (id, family_id, user_id, token_hash, expires_at,
                                                 used_at)
             VALUES ($1, '{}', '{person}', sha256($1::text::bytea), now() - interval '{expired}',
                     {})",
            Uuid::now_v7(),
            if goes { "now() - interval '9 days'" } else { "NULL" }
        )
        };
    aged.insert(&pool, "refresh_tokens", true, &family(true, "2 days"))
        .await;
    aged.insert(&pool, "refresh_tokens", false, &family(false, "1 hour"))
        .await;
    // In the login above, which lives on, a used token expired 40 days ago goes (the first
    // token, used and expired three days ago, stays).
    let living: Uuid =
        sqlx::query_scalar("SELECT family_id FROM control.refresh_tokens WHERE token_hash = $1")
            .bind(shared::apikey::hash(&newest))
            .fetch_one(&pool)
            .await
            .unwrap();
    let long_used = format!(
        "INSERT INTO control.refresh_tokens (id, family_id, user_id, token_hash, expires_at,
                                             used_at)
         VALUES ($1, '{living}', '{person}', sha256($1::text::bytea),
                 now() - interval '40 days', now() - interval '45 days')"
    );
    aged.insert(&pool, "refresh_tokens", true, &long_used).await;
    // Invitations: closed 100 days ago go (accepted, revoked, expired); one expired 10 days
    // ago and one open stay.
    for (goes, closed) in [
        (true, "accepted_at = now() - interval '100 days'"),
        (true, "revoked_at = now() - interval '100 days'"),
        (true, "expires_at = now() - interval '100 days'"),
        (false, "expires_at = now() - interval '10 days'"),
        (false, "expires_at = now() + interval '1 day'"),
    ] {
        let id = aged
            .insert(
                &pool,
                "invitations",
                goes,
                &format!(
                    "INSERT INTO control.invitations (id, tenant_id, email, role, token_hash,
                                                      created_at, expires_at)
                     VALUES ($1, '{tenant}', $1::text || '@housekeeping.example', 'viewer',
                             sha256($1::text::bytea), now() - interval '101 days',
                             now() + interval '1 day')"
                ),
            )
            .await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE control.invitations SET {closed} WHERE id = $1"
        )))
        .bind(id)
        .execute(&pool)
        .await
        .unwrap();
    }
    // Keys: revoked 100 days ago goes; revoked 10 days ago, and live for 200 days, stay.
    for (goes, revoked) in [
        (true, "now() - interval '100 days'"),
        (false, "now() - interval '10 days'"),
        (false, "NULL"),
    ] {
        let sql = format!(
            "INSERT INTO control.api_keys (id, tenant_id, name, scope, key_hash, created_at,
                                           revoked_at)
             VALUES ($1, '{tenant}', 'old', 'ingest', sha256($1::text::bytea),
                     now() - interval '200 days', {revoked})"
        );
        aged.insert(&pool, "api_keys", goes, &sql).await;
    }
    // Firings and deliveries, on a channel nobody can deliver to (its sealed URL is not one).
    let channel = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO control.channels (id, tenant_id, name, kind, sealed, url_display)
         VALUES ($1, $2, 'old', 'webhook', '\\x00', 'https://receiver.invalid')",
    )
    .bind(channel)
    .bind(tenant)
    .execute(&pool)
    .await
    .unwrap();
    let firing = |days: i64| {
        format!(
            "INSERT INTO control.firings (id, tenant_id, source, source_id, dedup, scope,
                                          scope_id, payload, fired_at)
             VALUES ($1, '{tenant}', 'rule', gen_random_uuid(), 'old-' || $1, '', '', '{{}}',
                     now() - interval '{days} days')"
        )
    };
    let delivery = |firing: Uuid, status: &str, days: i64| {
        // A pending one is due in a year, so that no deliverer takes it up meanwhile.
        format!(
            "INSERT INTO control.deliveries (id, tenant_id, firing_id, channel_id, status,
                                             created_at, next_attempt_at)
             VALUES ($1, '{tenant}', '{firing}', '{channel}', '{status}',
                     now() - interval '{days} days', now() + interval '1 year')"
        )
    };
    // Delivered 100 days ago, with its attempt: the delivery and the firing go.
    let old = aged.insert(&pool, "firings", true, &firing(100)).await;
    let done = aged
        .insert(&pool, "deliveries", true, &delivery(old, "delivered", 100))
        .await;
    attempt(&pool, done, 1, 100).await;
    // Still pending after 100 days: both stay.
    let waiting = aged.insert(&pool, "firings", false, &firing(100)).await;
    aged.insert(
        &pool,
        "deliveries",
        false,
        &delivery(waiting, "pending", 100),
    )
    .await;
    // Failed 10 days ago: both stay.
    let recent = aged.insert(&pool, "firings", false, &firing(10)).await;
    aged.insert(&pool, "deliveries", false, &delivery(recent, "failed", 10))
        .await;
    // Made 100 days ago and sent again yesterday, failing: both stay, with its attempt.
    let again = aged.insert(&pool, "firings", false, &firing(100)).await;
    let resent = aged
        .insert(&pool, "deliveries", false, &delivery(again, "failed", 100))
        .await;
    attempt(&pool, resent, 13, 1).await;
    // Fired 100 days ago with no channel to deliver to: goes.
    aged.insert(&pool, "firings", true, &firing(100)).await;
    // A sign-on login abandoned 11 minutes ago goes; one started now stays.
    let abandoned = format!("housekeeping-old-{tag}");
    let started = format!("housekeeping-new-{tag}");
    for (state, age) in [(&abandoned, "11 minutes"), (&started, "0 minutes")] {
        sqlx::query(
            "INSERT INTO control.sso_logins (state, tenant_id, nonce, code_verifier, created_at)
             VALUES ($1, $2, 'n', 'v', now() - $3::interval)",
        )
        .bind(state)
        .bind(tenant)
        .bind(age)
        .execute(&pool)
        .await
        .unwrap();
    }
    let login_left = |state: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM control.sso_logins WHERE state = $1)",
            )
            .bind(state)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // A projector's retention pass (the first one runs as it starts) sweeps them.
    let projector = start_projector_with(&common, |c| c.retention_interval_secs = 1).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for (table, key, id, goes) in &aged.rows {
            if *goes && present(&pool, table, key, *id).await {
                left.push(format!("{table} {id}"));
            }
        }
        if login_left(abandoned.clone()).await {
            left.push("sso_logins".into());
        }
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "not swept in 60 s: {left:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Another pass, and what is still in use is all there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (table, key, id, goes) in &aged.rows {
        if !goes {
            assert!(present(&pool, table, key, *id).await, "{table} {id} went");
        }
    }
    assert!(login_left(started).await);
    let attempts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM control.delivery_attempts WHERE delivery_id = $1")
            .bind(done)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0, "the attempts go with their delivery");
    let metrics = scrape_metrics(&client, &projector.url()).await;
    assert!(
        metrics.contains("control_housekeeping_rows_deleted_total{table=\"invitations\"}"),
        "the pass is counted"
    );

    // `projector retention` reports the sweep beside the tenants' pass, and refuses a history
    // shorter than a budget's longest period.
    let retention = |history_days: &str| {
        let mut cmd = projector_command(&common, &["retention"]);
        cmd.env("TALLY_HISTORY_KEEP_DAYS", history_days)
            .stderr(std::process::Stdio::piped());
        async move {
            tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap()
        }
    };
    let out = retention("90").await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["control"]["outbox"].is_u64(), "{report}");
    assert!(report["partitions_dropped"].is_u64(), "{report}");
    let out = retention("10").await;
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("history_keep_days"), "{said}");

    // The used token of the living family was kept: presented again, it is reuse.
    let (st, p) = refresh(first).await;
    assert_eq!(st, 401, "{p}");
    assert!(
        p["detail"].as_str().unwrap().contains("already used"),
        "{p}"
    );
    let (st, p) = refresh(newest).await;
    assert_eq!(st, 401, "the family was revoked: {p}");
}
