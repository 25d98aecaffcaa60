//! Auth events reach the tenant's audit log through the transactional outbox: every login
//! attempt within 2 s, reuse detection, and a password change made while Kafka is down
//! arrives exactly once when Kafka is back.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shared::jwt::Role;
use tally_tests::*;

const PASSWORD: &str = "Sturdy-Pass-42";

async fn make_user(pool: &sqlx::PgPool, ns: &str, t: &TestTenant, role: Role) -> String {
    let email = format!(
        "{}-{}@example.com",
        role.as_str(),
        uuid::Uuid::new_v4().simple()
    );
    ingest_api::control::store::create_user(
        pool,
        ns,
        ingest_api::control::store::NewUser {
            tenant: t.id,
            email: &email,
            password: PASSWORD,
            role,
            external_id: None,
            teams: &[],
        },
    )
    .await
    .unwrap();
    email
}

async fn entries(client: &reqwest::Client, query: &str, token: &str, kind: &str) -> Vec<Value> {
    let res = client
        .get(format!("{query}/v1/audit?range=1h&type={kind}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let page: Value = res.json().await.unwrap();
    page["entries"].as_array().unwrap().clone()
}

/// Waits until the audit log holds `n` entries of `kind`; returns how long it took.
async fn wait_entries(
    client: &reqwest::Client,
    query: &str,
    token: &str,
    kind: &str,
    n: usize,
    timeout: Duration,
) -> Duration {
    let since = Instant::now();
    loop {
        let got = entries(client, query, token, kind).await.len();
        if got >= n {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < timeout,
            "{kind}: {got} of {n} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_attempts_reach_the_audit_log_within_two_seconds() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let projector = start_projector(&common).await;
    let client = http();
    let t = create_tenant(&pool, "audited").await;
    let owner = make_user(&pool, &common.topic_prefix, &t, Role::Owner).await;
    let dev = make_user(&pool, &common.topic_prefix, &t, Role::Developer).await;

    let res = login(&client, &ingest.url(), &owner, PASSWORD).await;
    let tokens: Value = res.json().await.unwrap();
    let access = tokens["access_token"].as_str().unwrap().to_string();
    // Warm-up, untimed: on a fresh broker the projector's auth consumer joins its group first.
    wait_entries(
        &client,
        &query.url(),
        &access,
        "auth.login_succeeded",
        1,
        Duration::from_secs(30),
    )
    .await;

    // From here on the pipeline is running: each attempt must show within 2 s.
    assert_eq!(
        login(&client, &ingest.url(), &owner, PASSWORD)
            .await
            .status(),
        200
    );
    let took = wait_entries(
        &client,
        &query.url(),
        &access,
        "auth.login_succeeded",
        2,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        took < Duration::from_secs(2),
        "login success visible after {took:?}"
    );

    assert_eq!(
        login(&client, &ingest.url(), &owner, "Wrong-Pass-1")
            .await
            .status(),
        401
    );
    let took = wait_entries(
        &client,
        &query.url(),
        &access,
        "auth.login_failed",
        1,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        took < Duration::from_secs(2),
        "failed login visible after {took:?}"
    );
    let failed = &entries(&client, &query.url(), &access, "auth.login_failed").await[0];
    assert_eq!(failed["email"], owner.as_str());
    assert_eq!(failed["ip"], "127.0.0.1");

    // Reusing a refresh token is recorded.
    let r = tokens["refresh_token"].clone();
    let refresh = |r: Value| {
        client
            .post(format!("{}/v1/auth/refresh", ingest.url()))
            .json(&json!({"refresh_token": r}))
            .send()
    };
    assert_eq!(refresh(r.clone()).await.unwrap().status(), 200);
    assert_eq!(refresh(r).await.unwrap().status(), 401);
    wait_entries(
        &client,
        &query.url(),
        &access,
        "auth.refresh_reuse_detected",
        1,
        Duration::from_secs(10),
    )
    .await;
    wait_entries(
        &client,
        &query.url(),
        &access,
        "auth.token_refreshed",
        1,
        Duration::from_secs(10),
    )
    .await;

    // Control-plane changes are there too (the users were created through the outbox).
    let created = wait_entries(
        &client,
        &query.url(),
        &access,
        "user.created",
        2,
        Duration::from_secs(10),
    )
    .await;
    assert!(created < Duration::from_secs(10));

    // Only owners and admins read it.
    let dev_tokens: Value = login(&client, &ingest.url(), &dev, PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let res = client
        .get(format!("{}/v1/audit", query.url()))
        .bearer_auth(dev_tokens["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = client
        .get(format!("{}/v1/audit", query.url()))
        .bearer_auth(&t.read_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let res = client
        .get(format!("{}/v1/audit?cursor=garbage", query.url()))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);

    stop_all([projector, ingest, query]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_change_while_kafka_is_down_is_audited_exactly_once_later() {
    let TestEnv { pool, mut common } = test_env().await;
    let mut kafka = PrivateKafka::new();
    kafka.start().await;
    common.kafka_brokers = kafka.brokers();
    let ingest = start_ingest(&common, |c| c.produce_timeout_ms = 2000).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let projector = start_projector(&common).await;
    let client = http();
    let t = create_tenant(&pool, "kafka-less").await;
    let owner = make_user(&pool, &common.topic_prefix, &t, Role::Owner).await;
    let tokens: Value = login(&client, &ingest.url(), &owner, PASSWORD)
        .await
        .json()
        .await
        .unwrap();
    let access = tokens["access_token"].as_str().unwrap().to_string();
    wait_entries(
        &client,
        &query.url(),
        &access,
        "auth.login_succeeded",
        1,
        Duration::from_secs(30),
    )
    .await;

    kafka.kill();
    let res = client
        .post(format!("{}/v1/auth/password", ingest.url()))
        .bearer_auth(&access)
        .json(&json!({"current_password": PASSWORD, "new_password": "Brand-New-Pass-7"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the change does not need Kafka");
    let fresh: Value = res.json().await.unwrap();
    let access = fresh["access_token"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        entries(&client, &query.url(), &access, "auth.password_changed")
            .await
            .is_empty()
    );
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.outbox WHERE namespace = $1 AND sent_at IS NULL",
    )
    .bind(&common.topic_prefix)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(queued, 1, "the event waits in the outbox");

    kafka.start().await;
    wait_entries(
        &client,
        &query.url(),
        &access,
        "auth.password_changed",
        1,
        Duration::from_secs(90),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        entries(&client, &query.url(), &access, "auth.password_changed")
            .await
            .len(),
        1,
        "exactly once"
    );

    stop_all([projector, ingest, query]).await;
}

/// A row of the outbox the log can never take — here a `team.changed` of a team of 30 000
/// people, whose member list is over Kafka's 1 MB — is set aside with its reason. Before, it
/// failed every batch it was in, for ever, and no tenant's auth or control events reached the
/// log again; now the rows after it, of its tenant and of another, are sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_row_too_large_for_the_log_holds_back_no_one() {
    use shared::people::{Snapshot, TeamSnapshot};
    let TestEnv { pool, common } = test_env().await;
    let ns = &common.topic_prefix;
    let (a, b) = (
        create_tenant(&pool, "outbox-large-a").await,
        create_tenant(&pool, "outbox-large-b").await,
    );
    // Written as the control plane writes a team's change (with the relay not yet running,
    // so that it comes first): the members are made up, the size is the point.
    let team = TeamSnapshot {
        key: "everyone".into(),
        name: Some("Everyone".into()),
        members: (0..30_000).map(|_| uuid::Uuid::now_v7()).collect(),
        deleted: false,
    };
    let large = shared::outbox::auth_event(
        a.id,
        shared::events::AuthKind::TeamChanged,
        shared::events::Actor::default(),
        shared::events::AuthEvent {
            target: Some("team:everyone".into()),
            extra: team.into_extra(),
            ..Default::default()
        },
    );
    let mut conn = pool.acquire().await.unwrap();
    shared::outbox::record(&mut conn, ns, &large).await.unwrap();
    drop(conn);
    let after_a = make_user(&pool, ns, &a, Role::Developer).await;
    let after_b = make_user(&pool, ns, &b, Role::Developer).await;

    let ingest = start_ingest(&common, |_| {}).await;
    let sent = |email: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT sent_at IS NOT NULL FROM control.outbox
                  WHERE envelope->'data'->>'email' = $1",
            )
            .bind(email)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(sent(after_a.clone()).await && sent(after_b.clone()).await) {
        assert!(
            Instant::now() < deadline,
            "the rows after the large one were not sent"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (sent_at, refused): (bool, Option<String>) = sqlx::query_as(
        "SELECT sent_at IS NOT NULL, refused FROM control.outbox WHERE event_id = $1",
    )
    .bind(large.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(sent_at, "set aside, not tried again");
    let refused = refused.expect("the reason is kept");
    assert!(refused.contains("the log takes at most"), "{refused}");
    let metrics = scrape_metrics(&http(), &ingest.url()).await;
    assert!(
        counter(&metrics, "outbox_refused_total") >= 1.0,
        "{metrics}"
    );
    ingest.stop().await.unwrap();
}
