//! The control plane over HTTP: an operator creates a tenant with its owner; the owner
//! manages users and keys; nobody reaches another tenant's users or keys, or the operator's
//! endpoints, with their own credentials.

use serde_json::{json, Value};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_create_tenants_and_owners_manage_them() {
    init_logs();
    let pool = test_pool().await;
    let common = common_for_test();
    let ingest = start_ingest(&common, |_| {}).await;
    let projector = start_projector(&common).await;
    let client = http();
    let url = ingest.url();
    let operator = ingest_api::admin::create_operator_key(&pool, "test")
        .await
        .unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let call = |method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
        let mut r = client
            .request(method, format!("{url}{path}"))
            .bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
    };

    // Operators create tenants, each with a first owner.
    let mut owners = Vec::new();
    let mut tenants = Vec::new();
    for name in ["acme", "globex"] {
        let res = call(reqwest::Method::POST, "/v1/admin/tenants", &operator, Some(json!({
            "name": name, "plan": "free",
            "owner": {"email": format!("{name}-{tag}@example.com"), "password": "Owner-Pass-123"}
        }))).await.unwrap();
        assert_eq!(res.status(), 201);
        let created: Value = res.json().await.unwrap();
        tenants.push(created["tenant_id"].as_str().unwrap().to_string());
        let res = client.post(format!("{url}/v1/auth/login"))
            .json(&json!({"email": format!("{name}-{tag}@example.com"), "password": "Owner-Pass-123"}))
            .send().await.unwrap();
        assert_eq!(res.status(), 200);
        let tokens: Value = res.json().await.unwrap();
        owners.push(tokens["access_token"].as_str().unwrap().to_string());
    }
    let res = call(reqwest::Method::GET, "/v1/admin/tenants", &operator, None)
        .await
        .unwrap();
    let list: Vec<Value> = res.json().await.unwrap();
    assert!(tenants.iter().all(|t| list
        .iter()
        .any(|r| r["id"] == t.as_str() && r["plan"] == "free")));

    // The owner of acme manages its people and keys.
    let acme = &owners[0];
    let res = call(reqwest::Method::POST, "/v1/admin/users", acme, Some(json!({
        "email": format!("dev-{tag}@example.com"), "password": "Dev-Pass-1234", "role": "developer", "external_id": "dev-1"
    }))).await.unwrap();
    assert_eq!(res.status(), 201);
    let dev_id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let res = call(
        reqwest::Method::POST,
        "/v1/admin/users",
        acme,
        Some(json!({
            "email": format!("dev-{tag}@example.com"), "password": "Dev-Pass-1234"
        })),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 409, "e-mail addresses are unique");
    let res = call(
        reqwest::Method::POST,
        "/v1/admin/users",
        acme,
        Some(json!({
            "email": "weak@example.com", "password": "weak"
        })),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 422);
    let res = call(
        reqwest::Method::POST,
        "/v1/admin/api-keys",
        acme,
        Some(json!({"name": "ci", "scope": "ingest"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let key: Value = res.json().await.unwrap();
    let key_id = key["id"].as_str().unwrap().to_string();
    let ingest_key = key["key"].as_str().unwrap().to_string();
    let events = Value::Array(vec![command("dev-1", "build", 5, true)]);
    assert_eq!(
        post_events(&client, &url, &ingest_key, &events)
            .await
            .status(),
        202
    );
    let res = call(reqwest::Method::GET, "/v1/admin/api-keys", acme, None)
        .await
        .unwrap();
    let keys: Vec<Value> = res.json().await.unwrap();
    assert!(
        keys.iter()
            .all(|k| k.get("key").is_none() && k.get("key_hash").is_none()),
        "no secrets listed"
    );

    // Globex's owner cannot touch acme's user or key, even by id; acme's user list is acme's.
    let globex = &owners[1];
    let res = call(
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{dev_id}"),
        globex,
        Some(json!({"status": "deactivated"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 404);
    let res = call(
        reqwest::Method::DELETE,
        &format!("/v1/admin/api-keys/{key_id}"),
        globex,
        None,
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 404);
    let res = call(reqwest::Method::GET, "/v1/admin/users", globex, None)
        .await
        .unwrap();
    let users: Vec<Value> = res.json().await.unwrap();
    assert!(users.iter().all(|u| u["id"] != dev_id.as_str()));
    assert_eq!(
        post_events(&client, &url, &ingest_key, &events)
            .await
            .status(),
        202,
        "acme's key still works"
    );

    // A developer is no admin, and nobody but an operator manages tenants.
    let res = client
        .post(format!("{url}/v1/auth/login"))
        .json(&json!({"email": format!("dev-{tag}@example.com"), "password": "Dev-Pass-1234"}))
        .send()
        .await
        .unwrap();
    let dev: Value = res.json().await.unwrap();
    let dev_access = dev["access_token"].as_str().unwrap();
    let res = call(reqwest::Method::GET, "/v1/admin/users", dev_access, None)
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    for token in [acme.as_str(), ingest_key.as_str(), "tlo_forged", dev_access] {
        let res = call(reqwest::Method::GET, "/v1/admin/tenants", token, None)
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{token}");
    }
    let res = call(
        reqwest::Method::PATCH,
        "/v1/admin/users/not-a-uuid",
        acme,
        Some(json!({})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["content-type"], "application/problem+json");

    // Invitations: valid once, for a bounded time, created by admins only.
    let invite = |email: String, hours: i64| {
        call(
            reqwest::Method::POST,
            "/v1/admin/invitations",
            acme,
            Some(json!({
                "email": email, "role": "viewer", "teams": ["team-x"], "valid_hours": hours
            })),
        )
    };
    assert_eq!(
        invite(format!("x-{tag}@example.com"), 200)
            .await
            .unwrap()
            .status(),
        422
    );
    let res = invite(format!("carol-{tag}@example.com"), 24)
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let inv: Value = res.json().await.unwrap();
    let accept = |token: Value, password: &str| {
        client
            .post(format!("{url}/v1/auth/invitations/accept"))
            .json(&json!({"token": token, "password": password}))
            .send()
    };
    assert_eq!(
        accept(inv["token"].clone(), "weak").await.unwrap().status(),
        422
    );
    let res = accept(inv["token"].clone(), "Carol-Pass-123")
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let carol: Value = res.json().await.unwrap();
    assert!(carol["access_token"].is_string());
    assert_eq!(
        accept(inv["token"].clone(), "Carol-Pass-123")
            .await
            .unwrap()
            .status(),
        410,
        "once"
    );
    let res = invite(format!("late-{tag}@example.com"), 1).await.unwrap();
    let late: Value = res.json().await.unwrap();
    sqlx::query(
        "UPDATE control.invitations SET expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(uuid::Uuid::parse_str(late["id"].as_str().unwrap()).unwrap())
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        accept(late["token"].clone(), "Late-Pass-1234")
            .await
            .unwrap()
            .status(),
        410,
        "expired"
    );
    assert_eq!(
        accept(json!("tli_forged"), "Late-Pass-1234")
            .await
            .unwrap()
            .status(),
        410
    );
    let res = call(
        reqwest::Method::POST,
        "/v1/admin/invitations",
        carol["access_token"].as_str().unwrap(),
        Some(json!({"email": "z@example.com"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 403, "a viewer cannot invite");

    // Teams: members must be the tenant's own people.
    let res = call(
        reqwest::Method::PUT,
        "/v1/admin/teams/team-x",
        acme,
        Some(json!({"name": "Team X", "members": [dev_id]})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204);
    let globex_owner: String =
        sqlx::query_scalar("SELECT id::text FROM control.users WHERE email = $1")
            .bind(format!("globex-{tag}@example.com"))
            .fetch_one(&pool)
            .await
            .unwrap();
    let res = call(
        reqwest::Method::PUT,
        "/v1/admin/teams/team-y",
        acme,
        Some(json!({"name": "Y", "members": [globex_owner]})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 422, "another tenant's user cannot join");
    let teams: Vec<Value> = call(reqwest::Method::GET, "/v1/admin/teams", acme, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0]["members"], json!([dev_id]));
    let globex_teams: Vec<Value> = call(reqwest::Method::GET, "/v1/admin/teams", globex, None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(globex_teams.is_empty());

    // The projector keeps the tenant's users and teams read models from the auth events.
    let acme_id: shared::tenant::TenantId = tenants[0].parse().unwrap();
    let since = std::time::Instant::now();
    loop {
        let users = projected_count(&pool, acme_id, "SELECT count(*) FROM users").await;
        let team = projected_count(
            &pool,
            acme_id,
            "SELECT count(*) FROM teams WHERE key = 'team-x' AND cardinality(members) = 1",
        )
        .await;
        if users == Some(3) && team == Some(1) {
            break;
        }
        assert!(
            since.elapsed() < std::time::Duration::from_secs(30),
            "read models: users {users:?}, team {team:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // The owner revokes the key and deactivates the developer.
    let res = call(
        reqwest::Method::DELETE,
        &format!("/v1/admin/api-keys/{key_id}"),
        acme,
        None,
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204);
    let res = call(
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{dev_id}"),
        acme,
        Some(json!({"status": "deactivated"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204);
    let res = client
        .post(format!("{url}/v1/auth/refresh"))
        .json(&json!({"refresh_token": dev["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "a deactivated user's sessions end");

    // The operator deactivates globex: its owner can no longer log in.
    let res = call(
        reqwest::Method::PATCH,
        &format!("/v1/admin/tenants/{}", tenants[1]),
        &operator,
        Some(json!({"status": "deactivated"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204);
    let res = client
        .post(format!("{url}/v1/auth/login"))
        .json(&json!({"email": format!("globex-{tag}@example.com"), "password": "Owner-Pass-123"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    projector.stop().await.unwrap();
    ingest.stop().await.unwrap();
}

/// A count in the tenant's schema, or `None` while the schema or table does not exist yet.
async fn projected_count(
    pool: &sqlx::PgPool,
    tenant: shared::tenant::TenantId,
    sql: &str,
) -> Option<i64> {
    let mut tx = pool.begin().await.ok()?;
    shared::tenant_sql::set_search_path(&mut tx, &tenant.schema(1))
        .await
        .ok()?;
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut *tx)
        .await
        .ok()
}
