//! The control plane over HTTP: an operator creates a tenant with its owner; the owner
//! manages users and keys; nobody reaches another tenant's users or keys, or the operator's
//! endpoints, with their own credentials.

use serde_json::{json, Value};
use tally_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_create_tenants_and_owners_manage_them() {
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let url = ingest.url();
    let operator = ingest_api::control::store::create_operator_key(&pool, "test")
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

    // Operators set a tenant's windows; a value out of range names its field.
    let windows = format!("/v1/admin/tenants/{}", tenants[1]);
    for (body, field) in [
        (json!({"compress_after_days": 0}), "compress_after_days"),
        (
            json!({"raw_retention_days": 400, "rollup_retention_days": 30}),
            "rollup_retention_days",
        ),
    ] {
        let res = call(reqwest::Method::PATCH, &windows, &operator, Some(body))
            .await
            .unwrap();
        assert_eq!(res.status(), 422);
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let res = call(
        reqwest::Method::PATCH,
        &windows,
        &operator,
        Some(json!({"compress_after_days": 3, "raw_retention_days": 30})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204);
    let res = call(reqwest::Method::GET, "/v1/admin/tenants", &operator, None)
        .await
        .unwrap();
    let list: Vec<Value> = res.json().await.unwrap();
    let globex = list
        .iter()
        .find(|r| r["id"] == tenants[1].as_str())
        .unwrap();
    assert_eq!(globex["compress_after_days"], 3, "{globex}");
    assert_eq!(globex["raw_retention_days"], 30, "{globex}");

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
    let res = login(
        &client,
        &url,
        &format!("dev-{tag}@example.com"),
        "Dev-Pass-1234",
    )
    .await;
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
    let res = login(
        &client,
        &url,
        &format!("globex-{tag}@example.com"),
        "Owner-Pass-123",
    )
    .await;
    assert_eq!(res.status(), 403);
    stop_all([projector, ingest]).await;
}

/// A count in the tenant's schema, or `None` while the schema or table does not exist yet.
async fn projected_count(
    pool: &sqlx::PgPool,
    tenant: shared::tenant::TenantId,
    sql: &str,
) -> Option<i64> {
    let mut tx = pool.begin().await.ok()?;
    projector::schema::set_search_path(&mut tx, &tenant.schema(1))
        .await
        .ok()?;
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut *tx)
        .await
        .ok()
}

/// An admin — person or `admin` key — tries to climb above their role: demote, deactivate
/// or create owners. Each try is refused with 403, changes nothing and is audited with who
/// tried. The last owner cannot leave; a deactivated tenant's admins and a revoked operator
/// key lose the control plane at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admins_cannot_touch_owners_and_lose_the_control_plane_at_once() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let url = ingest.url();
    let (operator_id, operator) =
        ingest_api::control::store::create_operator_key_with_id(&pool, "test")
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
    let res = call(reqwest::Method::POST, "/v1/admin/tenants", &operator, Some(json!({
        "name": "climb", "owner": {"email": format!("owner-{tag}@example.com"), "password": "Owner-Pass-123"}
    }))).await.unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let tenant: uuid::Uuid = created["tenant_id"].as_str().unwrap().parse().unwrap();
    let owner_id = created["owner_id"].as_str().unwrap().to_string();
    let login = |email: String, password: &'static str| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let res = client
                .post(format!("{url}/v1/auth/login"))
                .json(&json!({"email": email, "password": password}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            res.json::<Value>().await.unwrap()["access_token"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let owner = login(format!("owner-{tag}@example.com"), "Owner-Pass-123").await;
    let mut people = Vec::new();
    for (name, role) in [("admin", "admin"), ("dev", "developer")] {
        let res = call(reqwest::Method::POST, "/v1/admin/users", &owner, Some(json!({
            "email": format!("{name}-{tag}@example.com"), "password": "Some-Pass-1234", "role": role
        }))).await.unwrap();
        assert_eq!(res.status(), 201);
        people.push(
            res.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (admin_id, dev_id) = (people[0].clone(), people[1].clone());
    let res = call(
        reqwest::Method::POST,
        "/v1/admin/api-keys",
        &owner,
        Some(json!({"name": "automation", "scope": "admin"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let key: Value = res.json().await.unwrap();
    let (admin_key, admin_key_id) = (
        key["key"].as_str().unwrap().to_string(),
        key["id"].as_str().unwrap().to_string(),
    );
    let admin = login(format!("admin-{tag}@example.com"), "Some-Pass-1234").await;

    // Every way up is refused, for the person and for the key.
    let attempts = [
        (
            reqwest::Method::PATCH,
            format!("/v1/admin/users/{owner_id}"),
            json!({"role": "viewer"}),
        ),
        (
            reqwest::Method::PATCH,
            format!("/v1/admin/users/{owner_id}"),
            json!({"status": "deactivated"}),
        ),
        (
            reqwest::Method::PATCH,
            format!("/v1/admin/users/{dev_id}"),
            json!({"role": "owner"}),
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/users".to_string(),
            json!({
            "email": format!("sock-{tag}@example.com"), "password": "Sock-Pass-1234", "role": "owner"}),
        ),
        (
            reqwest::Method::POST,
            "/v1/admin/invitations".to_string(),
            json!({
            "email": format!("inv-{tag}@example.com"), "role": "owner"}),
        ),
    ];
    for credential in [&admin, &admin_key] {
        for (method, path, body) in &attempts {
            let res = call(method.clone(), path, credential, Some(body.clone()))
                .await
                .unwrap();
            assert_eq!(res.status(), 403, "{method} {path} {body}");
            assert_eq!(res.headers()["content-type"], "application/problem+json");
        }
    }
    let roles: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT id::text, role, status FROM control.users WHERE tenant_id = $1 ORDER BY email",
    )
    .bind(tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(roles.len(), 3, "no owner was created: {roles:?}");
    assert!(roles
        .iter()
        .any(|(id, role, status)| *id == owner_id && role == "owner" && status == "active"));
    assert!(roles
        .iter()
        .any(|(id, role, _)| *id == dev_id && role == "developer"));
    let denied = outbox_events(&pool, tenant, "auth.access_denied").await;
    assert_eq!(denied.len(), 2 * attempts.len(), "{denied:#?}");
    let (by_person, by_key) = denied.split_at(attempts.len());
    assert!(by_person
        .iter()
        .all(|e| e["actor"]["user_id"] == admin_id.as_str()));
    assert!(by_key
        .iter()
        .all(|e| e["actor"]["api_key_id"] == admin_key_id.as_str()));
    assert_eq!(by_person[0]["data"]["target"], format!("user:{owner_id}"));
    // What an admin may do still works: a developer's role and teams.
    let res = call(
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{dev_id}"),
        &admin,
        Some(json!({"role": "manager"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204);

    // The only owner cannot leave the tenant ownerless; with a second owner they can.
    let res = call(
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{owner_id}"),
        &owner,
        Some(json!({"role": "admin"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 409);
    let res = call(
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{admin_id}"),
        &owner,
        Some(json!({"role": "owner"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204, "an owner makes an owner");

    // The operator deactivates the tenant: its admin (a fresh token of the new owner, and
    // the key that just worked) is refused at the very next request.
    let second_owner = login(format!("admin-{tag}@example.com"), "Some-Pass-1234").await;
    for credential in [&second_owner, &admin_key] {
        let res = call(reqwest::Method::GET, "/v1/admin/users", credential, None)
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = call(
        reqwest::Method::PATCH,
        &format!("/v1/admin/tenants/{tenant}"),
        &operator,
        Some(json!({"status": "deactivated"})),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 204);
    for credential in [&second_owner, &admin_key] {
        let res = call(reqwest::Method::GET, "/v1/admin/users", credential, None)
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "at once, not after a cache delay");
        let res = call(
            reqwest::Method::POST,
            "/v1/admin/api-keys",
            credential,
            Some(json!({"name": "late", "scope": "ingest"})),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 401);
    }

    // A revoked operator key is refused at its next request.
    let res = call(reqwest::Method::GET, "/v1/admin/tenants", &operator, None)
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    ingest_api::control::store::revoke_operator_key(&pool, operator_id)
        .await
        .unwrap();
    let res = call(reqwest::Method::GET, "/v1/admin/tenants", &operator, None)
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert!(
        ingest_api::control::store::revoke_operator_key(&pool, operator_id)
            .await
            .is_err(),
        "a key is revoked once"
    );
    ingest.stop().await.unwrap();
}

/// From the attacker's side, with a tenant's admin key: what one request may make the control
/// plane store about a person (their id and teams, copied into their tokens, snapshots and
/// every team's member list), and the per-tenant caps of rules, which racing requests cannot
/// pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn people_fields_are_bounded_and_caps_hold_under_racing_requests() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let t = create_tenant(&pool, "control-bounds").await;
    let (_, admin) = ingest_api::control::store::create_api_key(
        &pool,
        "",
        t.id,
        shared::apikey::Scope::Admin,
        "bounds",
    )
    .await
    .unwrap();
    let send = |method: reqwest::Method, path: &str, body: Value| {
        status_and_json(
            client
                .request(method, format!("{}{path}", ingest.url()))
                .bearer_auth(&admin)
                .json(&body),
        )
    };
    let person = |extra: Value| {
        let mut p = json!({
            "email": format!("p-{}@example.com", uuid::Uuid::new_v4().simple()),
            "password": "Person-Pass-123",
        });
        p.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        p
    };
    let many: Vec<String> = (0..101).map(|i| format!("team-{i}")).collect();
    let long = "x".repeat(3000);
    let post = reqwest::Method::POST;
    for (path, body, field) in [
        // Indexed: 3 000 characters overflowed the index row and were a 500.
        (
            "/v1/admin/users",
            person(json!({"external_id": long})),
            "external_id",
        ),
        ("/v1/admin/users", person(json!({"teams": many})), "teams"),
        (
            "/v1/admin/users",
            person(json!({"teams": ["ok", "y".repeat(256)]})),
            "teams[1]",
        ),
        (
            "/v1/admin/invitations",
            json!({"email": "invited@example.com", "teams": many}),
            "teams",
        ),
    ] {
        let (status, problem) = send(post.clone(), path, body).await;
        assert_eq!(status, 422, "{path}: {problem}");
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let (status, created) = send(post.clone(), "/v1/admin/users", person(json!({}))).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, problem) = send(
        reqwest::Method::PATCH,
        &format!("/v1/admin/users/{id}"),
        json!({"teams": many}),
    )
    .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["errors"][0]["field"], "teams");
    let (stored, widest): (i64, i32) = sqlx::query_as(
        "SELECT count(*), coalesce(max(cardinality(teams)), 0)::int
           FROM control.users WHERE tenant_id = $1",
    )
    .bind(t.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((stored, widest), (1, 0), "only the good person was stored");

    // Rules: 100 a tenant. 95 one after another, then 20 at once for the last 5 places.
    let rule = |i: usize| json!({"name": format!("r{i}"), "kind": "events", "scope": "tenant", "threshold": 1});
    for i in 0..95 {
        let (status, body) = send(post.clone(), "/v1/admin/rules", rule(i)).await;
        assert_eq!(status, 201, "{body}");
    }
    let racing = futures::future::join_all(
        (95..115).map(|i| send(post.clone(), "/v1/admin/rules", rule(i))),
    )
    .await;
    let created = racing.iter().filter(|(s, _)| *s == 201).count();
    let refused: Vec<&Value> = racing
        .iter()
        .filter(|(s, _)| *s == 409)
        .map(|(_, p)| p)
        .collect();
    assert_eq!((created, refused.len()), (5, 15), "{racing:?}");
    assert!(refused.iter().all(|p| p["type"]
        .as_str()
        .is_some_and(|t| t.ends_with("limit-reached"))));
    let rules: i64 =
        sqlx::query_scalar("SELECT count(*) FROM control.alert_rules WHERE tenant_id = $1")
            .bind(t.id.0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rules, 100);

    // A deleted channel leaves the rules that named it: one that named only it notifies every
    // channel, as a budget does, rather than no one.
    let (status, channel) = send(
        post.clone(),
        "/v1/admin/channels",
        json!({"name": "ops", "kind": "webhook", "url": "http://127.0.0.1:9/hook"}),
    )
    .await;
    assert_eq!(status, 201, "{channel}");
    let channel = channel["id"].as_str().unwrap();
    let (status, rule) = send(
        reqwest::Method::PUT,
        &format!("/v1/admin/rules/{}", racing.iter().find(|(s, _)| *s == 201).unwrap().1["id"].as_str().unwrap()),
        json!({"name": "paged", "kind": "events", "scope": "tenant", "threshold": 1, "channels": [channel]}),
    )
    .await;
    assert_eq!(status, 200, "{rule}");
    assert_eq!(rule["channels"], json!([channel]));
    let (status, _) = send(
        reqwest::Method::DELETE,
        &format!("/v1/admin/channels/{channel}"),
        json!({}),
    )
    .await;
    assert_eq!(status, 204);
    let (_, rule) = send(
        reqwest::Method::GET,
        &format!("/v1/admin/rules/{}", rule["id"].as_str().unwrap()),
        json!({}),
    )
    .await;
    assert_eq!(rule["channels"], json!([]), "{rule}");

    // A provider's name that is not even text is a problem like any unknown provider's (it was
    // axum's plain-text 400).
    for method in [reqwest::Method::PUT, reqwest::Method::DELETE] {
        let res = client
            .request(
                method.clone(),
                format!("{}/v1/admin/integrations/%FF", ingest.url()),
            )
            .bearer_auth(&admin)
            .json(&json!({"secret": "a-secret-of-twenty-chars"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{method}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    ingest.stop().await.unwrap();
}

/// Everything a tenant's admin can add to the control plane is capped, and every list comes
/// in pages: at most 10 000 people (by creation, invitation or single sign-on), 1 000 API
/// keys not revoked, 1 000 teams and 1 000 open invitations (409 `limit-reached` past them,
/// counted under a per-tenant lock); lists give at most 1 000 rows a page (100 by default)
/// with a `Link` to the next. Before, one admin key could add rows without end, and each list
/// answered all of them at once (a person's teams alone can be 25 KiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenants_people_keys_teams_and_invitations_are_capped_and_listed_in_pages() {
    use ingest_api::control::store::{
        MAX_ACTIVE_API_KEYS, MAX_OPEN_INVITATIONS, MAX_TEAMS, MAX_USERS,
    };
    let TestEnv { pool, common } = test_env().await;
    // One password hash at a time, and little patience for it: a request refused for a full
    // tenant must not wait for (or take) a hash slot.
    let ingest = start_ingest(&common, |c| {
        c.max_concurrent_hashes = 1;
        c.hash_wait_ms = 50;
    })
    .await;
    let client = http();
    let url = ingest.url();
    let tenant = create_tenant(&pool, "caps").await;
    let admin = ingest_api::control::store::create_api_key(
        &pool,
        "",
        tenant.id,
        shared::apikey::Scope::Admin,
        "caps",
    )
    .await
    .unwrap()
    .1;
    let call = |method: reqwest::Method, path: String, body: Option<Value>| {
        let mut r = client
            .request(method, format!("{url}{path}"))
            .bearer_auth(&admin);
        if let Some(b) = body {
            r = r.json(&b);
        }
        status_and_json(r)
    };
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let limit_reached = |(st, p): (u16, Value)| {
        assert_eq!(
            (st, p["type"].as_str()),
            (409, Some("https://tally.dev/problems/limit-reached")),
            "{p}"
        );
    };
    // Each filled to one short of its cap, as a busy tenant would have them (in bulk: one
    // row each through the API would take hours of password hashing).
    let fill = |sql: &'static str, n: i64| {
        let pool = pool.clone();
        let tenant = tenant.id.0;
        let tag = tag.clone();
        async move {
            sqlx::query(sql)
                .bind(tenant)
                .bind(n)
                .bind(tag)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    fill(
        "INSERT INTO control.users (id, tenant_id, email, password_hash, role, external_id, teams)
         SELECT gen_random_uuid(), $1, 'p' || i || '-' || $3 || '@caps.example', 'x', 'viewer',
                'p' || i || '-' || $3, ARRAY['t-a', 't-b']
           FROM generate_series(1, $2) i",
        MAX_USERS - 1,
    )
    .await;
    fill(
        "INSERT INTO control.api_keys (id, tenant_id, name, scope, key_hash)
         SELECT gen_random_uuid(), $1, 'k' || i || $3, 'ingest', sha256(gen_random_uuid()::text::bytea)
           FROM generate_series(1, $2) i",
        // The tenant's ingest and read keys and the admin key made above are three.
        MAX_ACTIVE_API_KEYS - 4,
    )
    .await;
    fill(
        "INSERT INTO control.teams (tenant_id, key, name)
         SELECT $1, 'team-' || lpad(i::text, 4, '0') || $3, 'Team ' || i FROM generate_series(1, $2) i",
        MAX_TEAMS - 1,
    )
    .await;
    fill(
        "INSERT INTO control.invitations (id, tenant_id, email, role, token_hash, expires_at)
         SELECT gen_random_uuid(), $1, 'i' || i || $3 || '@caps.example', 'viewer',
                sha256(gen_random_uuid()::text::bytea), now() + interval '1 day'
           FROM generate_series(1, $2) i",
        MAX_OPEN_INVITATIONS - 1,
    )
    .await;

    // The last place of each is taken; the next is refused.
    let person = |n: &str| {
        json!({"email": format!("{n}-{tag}@caps.example"), "password": "Caps-Pass-4242",
               "role": "viewer"})
    };
    let post = reqwest::Method::POST;
    let (st, p) = call(post.clone(), "/v1/admin/users".into(), Some(person("last"))).await;
    assert_eq!(st, 201, "{p}");
    // Sixteen at once are all refused for the cap, none for want of a hash slot (503).
    let over = (0..16).map(|i| {
        call(
            post.clone(),
            "/v1/admin/users".into(),
            Some(person(&format!("over{i}"))),
        )
    });
    for answer in futures::future::join_all(over).await {
        limit_reached(answer);
    }
    let key = json!({"name": "last", "scope": "ingest"});
    let (st, last_key) = call(post.clone(), "/v1/admin/api-keys".into(), Some(key.clone())).await;
    assert_eq!(st, 201, "{last_key}");
    limit_reached(call(post.clone(), "/v1/admin/api-keys".into(), Some(key.clone())).await);
    // A revoked key leaves its place.
    let (st, _) = call(
        reqwest::Method::DELETE,
        format!("/v1/admin/api-keys/{}", last_key["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(st, 204);
    assert_eq!(
        call(post.clone(), "/v1/admin/api-keys".into(), Some(key))
            .await
            .0,
        201
    );
    let team = json!({"name": "Last"});
    let put = reqwest::Method::PUT;
    let last_team = format!("/v1/admin/teams/zz-last-{tag}");
    assert_eq!(
        call(put.clone(), last_team.clone(), Some(team.clone()))
            .await
            .0,
        204
    );
    limit_reached(
        call(
            put.clone(),
            format!("/v1/admin/teams/zz-over-{tag}"),
            Some(team),
        )
        .await,
    );
    // Renaming one is not adding one.
    let renamed = json!({"name": "Renamed"});
    assert_eq!(call(put.clone(), last_team, Some(renamed)).await.0, 204);
    let invite = |n: &str| json!({"email": format!("{n}-{tag}@caps.example"), "role": "viewer"});
    let (st, inv) = call(
        post.clone(),
        "/v1/admin/invitations".into(),
        Some(invite("last")),
    )
    .await;
    assert_eq!(st, 201, "{inv}");
    limit_reached(
        call(
            post.clone(),
            "/v1/admin/invitations".into(),
            Some(invite("over")),
        )
        .await,
    );
    // The tenant is full of people: an invitation accepted now is refused too, eight times
    // at once, before any password is hashed.
    let accepts = (0..8).map(|_| {
        status_and_json(
            client
                .post(format!("{url}/v1/auth/invitations/accept"))
                .json(&json!({"token": inv["token"], "password": "Caps-Pass-4242"})),
        )
    });
    for answer in futures::future::join_all(accepts).await {
        limit_reached(answer);
    }

    // Lists come in pages: 100 by default, at most 1 000, every row once.
    let (st, p) = call(
        reqwest::Method::GET,
        "/v1/admin/users?limit=1001".into(),
        None,
    )
    .await;
    assert_eq!(
        (st, p["errors"][0]["field"].as_str()),
        (400, Some("limit")),
        "{p}"
    );
    for cursor in ["garbage", "YQBi"] {
        let (st, p) = call(
            reqwest::Method::GET,
            format!("/v1/admin/teams?cursor={cursor}"),
            None,
        )
        .await;
        assert_eq!(
            (st, p["errors"][0]["field"].as_str()),
            (400, Some("cursor")),
            "{p}"
        );
    }
    let pages = |first: String| {
        let (client, url, admin) = (client.clone(), url.clone(), admin.clone());
        async move {
            let (mut rows, mut sizes) = (Vec::new(), Vec::new());
            let mut next = Some(first);
            while let Some(path) = next.take() {
                let res = client
                    .get(format!("{url}{path}"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200, "{path}");
                next = res.headers().get("link").map(|l| {
                    let l = l.to_str().unwrap();
                    assert!(l.ends_with(">; rel=\"next\""), "{l}");
                    l[1..l.find('>').unwrap()].to_string()
                });
                let page: Vec<Value> = res.json().await.unwrap();
                sizes.push(page.len());
                rows.extend(page);
            }
            (rows, sizes)
        }
    };
    let (users, sizes) = pages("/v1/admin/users?limit=1000".into()).await;
    assert_eq!(sizes, vec![1000; 10], "pages of people");
    let ids: std::collections::HashSet<&str> =
        users.iter().map(|u| u["id"].as_str().unwrap()).collect();
    assert_eq!(
        (users.len(), ids.len()),
        (MAX_USERS as usize, MAX_USERS as usize)
    );
    let (_, first) = call(reqwest::Method::GET, "/v1/admin/users".into(), None).await;
    assert_eq!(first.as_array().map(Vec::len), Some(100), "100 by default");
    let (teams, sizes) = pages("/v1/admin/teams?limit=300".into()).await;
    assert_eq!(sizes, vec![300, 300, 300, 100]);
    let keys: Vec<&str> = teams.iter().map(|t| t["key"].as_str().unwrap()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        (keys.len(), sorted.len()),
        (MAX_TEAMS as usize, MAX_TEAMS as usize)
    );
    let (keys, _) = pages("/v1/admin/api-keys?limit=400".into()).await;
    assert_eq!(
        keys.len(),
        MAX_ACTIVE_API_KEYS as usize + 1,
        "with the revoked one"
    );
    stop_all([ingest]).await;
}

/// An `admin` or `read` key lives no longer than the rights it was made with. An admin makes
/// an admin key, a read key and an ingest key, and the admin key makes another admin key;
/// when an owner demotes that admin to developer, both admin keys and the read key are
/// refused within the key cache's delay, and the ingest key (a sender's) still sends. A
/// deactivated admin's key goes the same way. Before, keys outlived their maker's demotion:
/// a demoted admin kept the control plane and every tenant's row through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_made_by_an_admin_go_when_the_admin_is_demoted_or_deactivated() {
    use shared::jwt::Role;
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let client = http();
    let url = ingest.url();
    let t = create_tenant(&pool, "keys-of").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let person = |name: &str, role: Role| {
        let (pool, email) = (pool.clone(), format!("{name}-{tag}@keys.example"));
        async move {
            let id = create_person(&pool, t.id, &email, "Keys-Pass-4242", role).await;
            (id, email)
        }
    };
    let token = |email: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let v: Value = login(&client, &url, &email, "Keys-Pass-4242")
                .await
                .json()
                .await
                .unwrap();
            v["access_token"].as_str().unwrap().to_string()
        }
    };
    let (_, owner) = person("owner", Role::Owner).await;
    let (admin_id, admin) = person("admin", Role::Admin).await;
    let (other_id, other) = person("other", Role::Admin).await;
    let owner = token(owner).await;
    let make_key = |credential: String, scope: &'static str| {
        let req = client
            .post(format!("{url}/v1/admin/api-keys"))
            .bearer_auth(credential)
            .json(&json!({"name": format!("{scope} key"), "scope": scope}));
        async move {
            let (st, k) = status_and_json(req).await;
            assert_eq!(st, 201, "{k}");
            k["key"].as_str().unwrap().to_string()
        }
    };
    let admin_token = token(admin).await;
    let admin_key = make_key(admin_token.clone(), "admin").await;
    let read_key = make_key(admin_token.clone(), "read").await;
    let ingest_key = make_key(admin_token, "ingest").await;
    let chained_key = make_key(admin_key.clone(), "admin").await;
    let other_key = make_key(token(other).await, "admin").await;
    let admin_api = |key: String| {
        let req = client.get(format!("{url}/v1/admin/users")).bearer_auth(key);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let reads = |key: String| {
        let req = client
            .get(format!("{}/v1/dashboard/overview?range=24h", query.url()))
            .bearer_auth(key);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let sends = |key: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            post_events(
                &client,
                &url,
                &key,
                &json!([command("u1", "build", 10, true)]),
            )
            .await
            .status()
            .as_u16()
        }
    };
    for key in [&admin_key, &chained_key, &other_key] {
        assert_eq!(admin_api(key.clone()).await, 200);
    }
    assert_eq!(reads(read_key.clone()).await, 200);
    assert_eq!(sends(ingest_key.clone()).await, 202);

    let change = |id: uuid::Uuid, body: Value| {
        let req = client
            .patch(format!("{url}/v1/admin/users/{id}"))
            .bearer_auth(&owner)
            .json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(change(admin_id, json!({"role": "developer"})).await, 204);
    assert_eq!(
        change(other_id, json!({"status": "deactivated"})).await,
        204
    );
    let since = std::time::Instant::now();
    let limit = shared::auth::KEY_CACHE_TTL + std::time::Duration::from_secs(3);
    loop {
        let refused = [
            admin_api(admin_key.clone()).await,
            admin_api(chained_key.clone()).await,
            admin_api(other_key.clone()).await,
            reads(read_key.clone()).await,
        ];
        if refused == [401; 4] {
            break;
        }
        assert!(since.elapsed() < limit, "still accepted: {refused:?}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    eprintln!(
        "the demoted admin's keys refused after {:?}",
        since.elapsed()
    );
    assert_eq!(sends(ingest_key).await, 202, "a sender's key still sends");
    let revoked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.api_keys
          WHERE tenant_id = $1 AND revoked_at IS NOT NULL AND on_behalf_of IS NOT NULL",
    )
    .bind(t.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(revoked, 4);
    stop_all([ingest, query]).await;
}

/// Owners and admins list their tenant's invitations (never their tokens) and take back open
/// ones: a revoked invitation is 410 to whoever holds its link, frees its place among the
/// open invitations, and is audited with who revoked it. An admin cannot take back an owner's
/// invitation, and nobody reaches another tenant's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invitations_are_listed_and_taken_back() {
    use shared::jwt::Role;
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let url = ingest.url();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (a, b) = (
        create_tenant(&pool, "invites-a").await,
        create_tenant(&pool, "invites-b").await,
    );
    let token = |tenant: shared::tenant::TenantId, name: &'static str, role: Role| {
        let (pool, client, url) = (pool.clone(), client.clone(), url.clone());
        let email = format!("{name}-{tag}@invites.example");
        async move {
            let id = create_person(&pool, tenant, &email, "Invite-Pass-4242", role).await;
            let v: Value = login(&client, &url, &email, "Invite-Pass-4242")
                .await
                .json()
                .await
                .unwrap();
            (id, v["access_token"].as_str().unwrap().to_string())
        }
    };
    let (_, owner) = token(a.id, "owner", Role::Owner).await;
    let (admin_id, admin) = token(a.id, "admin", Role::Admin).await;
    let (_, stranger) = token(b.id, "stranger", Role::Admin).await;
    let invite = |credential: &str, email: &str, role: &str| {
        let req = client
            .post(format!("{url}/v1/admin/invitations"))
            .bearer_auth(credential)
            .json(&json!({"email": email, "role": role}));
        async move {
            let (st, v) = status_and_json(req).await;
            assert_eq!(st, 201, "{v}");
            v
        }
    };
    let revoke = |credential: &str, id: &Value| {
        let req = client
            .delete(format!(
                "{url}/v1/admin/invitations/{}",
                id.as_str().unwrap()
            ))
            .bearer_auth(credential);
        async move { req.send().await.unwrap() }
    };
    let accept = |token: &Value| {
        let req = client
            .post(format!("{url}/v1/auth/invitations/accept"))
            .json(&json!({"token": token, "password": "Joined-Pass-4242"}));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let list = |credential: &str, path: String| {
        // As the dashboard page would ask, from its own origin: the `Link` is readable there.
        let req = client
            .get(format!("{url}{path}"))
            .header("origin", "http://127.0.0.1:8081")
            .bearer_auth(credential);
        async move {
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), 200);
            let exposed = res.headers()["access-control-expose-headers"]
                .to_str()
                .unwrap();
            assert!(exposed.to_lowercase().contains("link"), "{exposed}");
            let next = res
                .headers()
                .get("link")
                .map(|l| l.to_str().unwrap().to_string());
            (res.json::<Vec<Value>>().await.unwrap(), next)
        }
    };
    let dev = invite(&admin, &format!("dev-{tag}@invites.example"), "developer").await;
    let boss = invite(&owner, &format!("boss-{tag}@invites.example"), "owner").await;
    let joiner = invite(&admin, &format!("joiner-{tag}@invites.example"), "viewer").await;
    let late = invite(&admin, &format!("late-{tag}@invites.example"), "viewer").await;
    sqlx::query(
        "UPDATE control.invitations SET expires_at = now() - interval '1 minute' WHERE id = $1",
    )
    .bind(uuid::Uuid::parse_str(late["id"].as_str().unwrap()).unwrap())
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(accept(&joiner["token"]).await, 200);

    // Another tenant's admin neither sees nor reaches them.
    let (theirs, _) = list(&stranger, "/v1/admin/invitations".into()).await;
    assert!(theirs.is_empty(), "{theirs:?}");
    assert_eq!(revoke(&stranger, &dev["id"]).await.status(), 404);
    // An admin cannot take back an owner's invitation; the refusal is audited.
    assert_eq!(revoke(&admin, &boss["id"]).await.status(), 403);
    let res = revoke(&admin, &dev["id"]).await;
    assert_eq!(res.status(), 204);
    assert_eq!(revoke(&admin, &dev["id"]).await.status(), 404, "once");
    assert_eq!(accept(&dev["token"]).await, 410, "a revoked link");
    assert_eq!(revoke(&owner, &boss["id"]).await.status(), 204);
    assert_eq!(revoke(&owner, &late["id"]).await.status(), 404, "expired");
    assert_eq!(
        revoke(&owner, &joiner["id"]).await.status(),
        404,
        "accepted"
    );

    // Listed in pages with each one's state; no token in any of them.
    let (first, next) = list(&admin, "/v1/admin/invitations?limit=3".into()).await;
    let next = next.expect("a second page");
    let path = next
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
        .unwrap()
        .0
        .to_string();
    let (second, last) = list(&admin, path).await;
    assert!(last.is_none());
    let all: Vec<Value> = first.into_iter().chain(second).collect();
    let state = |inv: &Value| {
        let row = all.iter().find(|r| r["id"] == inv["id"]).unwrap();
        assert!(row.get("token").is_none() && !row.to_string().contains("tli_"));
        row["state"].as_str().unwrap().to_string()
    };
    assert_eq!(all.len(), 4);
    assert_eq!(state(&dev), "revoked");
    assert_eq!(state(&boss), "revoked");
    assert_eq!(state(&late), "expired");
    assert_eq!(state(&joiner), "accepted");
    let accepted = all.iter().find(|r| r["id"] == joiner["id"]).unwrap();
    assert!(accepted["user_id"].is_string(), "{accepted}");

    // A revoked invitation no longer holds a place among the open ones.
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.invitations
          WHERE tenant_id = $1 AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now()",
    )
    .bind(a.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(open, 0);

    // Every invitation and revocation is audited, with who acted.
    let events = outbox_events(&pool, a.id.0, "invitation.changed").await;
    let about = |inv: &Value| -> Vec<(String, Value)> {
        let target = format!("invitation:{}", inv["id"].as_str().unwrap());
        events
            .iter()
            .filter(|e| e["data"]["target"] == target.as_str())
            .map(|e| {
                let detail = e["data"]["detail"].as_str().unwrap().to_string();
                (detail, e["actor"]["user_id"].clone())
            })
            .collect()
    };
    let dev_events = about(&dev);
    assert_eq!(dev_events.len(), 2, "{events:?}");
    assert_eq!(dev_events[0].0, "invited as developer, valid 72 hours");
    assert_eq!(dev_events[1].0, "revoked");
    assert_eq!(dev_events[1].1, admin_id.to_string().as_str());
    let denied = outbox_events(&pool, a.id.0, "auth.access_denied").await;
    assert!(
        denied.iter().any(|e| e["data"]["target"]
            == format!("invitation:{}", boss["id"].as_str().unwrap()).as_str()),
        "{denied:?}"
    );
}

/// A deactivated person is removed for good: their row, refresh tokens and sign-on identities
/// go, the invitation they accepted and the ingest key made with their rights forget them
/// (the key still sends), the address can be given again, and the tenant's `users` read
/// model holds a tombstone with no address. An active person, and an owner for an admin, are
/// refused; another tenant's admin does not find them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deactivated_person_is_removed_for_good() {
    use shared::jwt::Role;
    let TestEnv { pool, common } = test_env().await;
    let (ingest, projector) = start_write_path(&common).await;
    let client = http();
    let url = ingest.url();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (a, b) = (
        create_tenant(&pool, "removal-a").await,
        create_tenant(&pool, "removal-b").await,
    );
    let password = "Removal-Pass-4242";
    let token = |email: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let v: Value = login(&client, &url, &email, password)
                .await
                .json()
                .await
                .unwrap();
            v
        }
    };
    let person = |tenant: shared::tenant::TenantId, name: &str, role: Role| {
        let (pool, email) = (pool.clone(), format!("{name}-{tag}@removal.example"));
        async move {
            let id = create_person(&pool, tenant, &email, password, role).await;
            (id, email)
        }
    };
    let (_, owner) = person(a.id, "owner", Role::Owner).await;
    let (_, admin) = person(a.id, "admin", Role::Admin).await;
    let (owner2_id, _) = person(a.id, "owner2", Role::Owner).await;
    let (_, stranger) = person(b.id, "stranger", Role::Admin).await;
    let bearer = |v: &Value| v["access_token"].as_str().unwrap().to_string();
    let owner = bearer(&token(owner).await);
    let admin = bearer(&token(admin).await);
    let stranger = bearer(&token(stranger).await);
    let send = |method: reqwest::Method, path: String, credential: &str, body: Option<Value>| {
        let mut req = client
            .request(method, format!("{url}{path}"))
            .bearer_auth(credential);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };

    // Dana joins by invitation as an admin, signs in by SSO once, and makes two keys.
    let dana = format!("dana-{tag}@removal.example");
    let (st, inv) = status_and_json(
        client
            .post(format!("{url}/v1/admin/invitations"))
            .bearer_auth(&admin)
            .json(&json!({"email": dana, "role": "admin"})),
    )
    .await;
    assert_eq!(st, 201, "{inv}");
    let (st, joined) = status_and_json(
        client
            .post(format!("{url}/v1/auth/invitations/accept"))
            .json(&json!({"token": inv["token"], "password": password})),
    )
    .await;
    assert_eq!(st, 200, "{joined}");
    let dana_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM control.users WHERE tenant_id = $1 AND email = $2")
            .bind(a.id.0)
            .bind(&dana)
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query(
        "INSERT INTO control.user_identities (issuer, subject, user_id, tenant_id)
         VALUES ('https://idp.removal.example', $1, $2, $3)",
    )
    .bind(&tag)
    .bind(dana_id)
    .bind(a.id.0)
    .execute(&pool)
    .await
    .unwrap();
    let make_key = |scope: &str| {
        let req = client
            .post(format!("{url}/v1/admin/api-keys"))
            .bearer_auth(bearer(&joined))
            .json(&json!({"name": "dana's", "scope": scope}));
        async move {
            let (st, k) = status_and_json(req).await;
            assert_eq!(st, 201, "{k}");
            k["key"].as_str().unwrap().to_string()
        }
    };
    let ingest_key = make_key("ingest").await;
    make_key("admin").await;
    let user_path = |id: uuid::Uuid| format!("/v1/admin/users/{id}");
    use reqwest::Method;

    // Only a deactivated person is removed.
    assert_eq!(
        send(Method::DELETE, user_path(dana_id), &admin, None).await,
        409
    );
    let deactivate = Some(json!({"status": "deactivated"}));
    assert_eq!(
        send(
            Method::PATCH,
            user_path(dana_id),
            &admin,
            deactivate.clone()
        )
        .await,
        204
    );
    // Invited again while deactivated: the invitation goes with her.
    let (st, reinvited) = status_and_json(
        client
            .post(format!("{url}/v1/admin/invitations"))
            .bearer_auth(&admin)
            .json(&json!({"email": dana, "role": "viewer"})),
    )
    .await;
    assert_eq!(st, 201, "{reinvited}");
    assert_eq!(
        send(Method::DELETE, user_path(dana_id), &stranger, None).await,
        404
    );
    assert_eq!(
        send(Method::DELETE, user_path(dana_id), &admin, None).await,
        204
    );
    assert_eq!(
        send(Method::DELETE, user_path(dana_id), &admin, None).await,
        404,
        "once"
    );

    // Nothing of hers is left in the control schema but the keys' and invitation's rows.
    let left: (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM control.users WHERE id = $1),
                (SELECT count(*) FROM control.refresh_tokens WHERE user_id = $1),
                (SELECT count(*) FROM control.user_identities WHERE user_id = $1),
                (SELECT count(*) FROM control.invitations WHERE user_id = $1),
                (SELECT count(*) FROM control.api_keys WHERE on_behalf_of = $1)",
    )
    .bind(dana_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(left, (0, 0, 0, 0, 0));
    assert_eq!(login(&client, &url, &dana, password).await.status(), 401);
    let (st, _) = status_and_json(
        client
            .post(format!("{url}/v1/auth/refresh"))
            .json(&json!({"refresh_token": joined["refresh_token"]})),
    )
    .await;
    assert_eq!(st, 401);
    let sent = post_events(
        &client,
        &url,
        &ingest_key,
        &json!([command("dana", "build", 10, true)]),
    )
    .await;
    assert_eq!(sent.status(), 202, "her ingest key still sends");
    let (st, _) = status_and_json(
        client
            .post(format!("{url}/v1/auth/invitations/accept"))
            .json(&json!({"token": reinvited["token"], "password": password})),
    )
    .await;
    assert_eq!(
        st, 410,
        "the invitation made while she was deactivated was revoked"
    );
    // The address can be given again.
    let again = json!({"email": dana, "password": password, "role": "viewer"});
    assert_eq!(
        send(Method::POST, "/v1/admin/users".into(), &admin, Some(again)).await,
        201
    );

    // The read model keeps a tombstone with no address.
    let sql = format!(
        "SELECT count(*) FROM users WHERE user_id = '{dana_id}' AND status = 'removed'
            AND email = '' AND external_id = ''"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while projected_count(&pool, a.id, &sql).await != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "no tombstone in the read model"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let removed = outbox_events(&pool, a.id.0, "user.removed").await;
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(!removed[0].to_string().contains(&dana), "{}", removed[0]);

    // An owner is removed by an owner only.
    assert_eq!(
        send(Method::PATCH, user_path(owner2_id), &owner, deactivate).await,
        204
    );
    assert_eq!(
        send(Method::DELETE, user_path(owner2_id), &admin, None).await,
        403
    );
    assert_eq!(
        send(Method::DELETE, user_path(owner2_id), &owner, None).await,
        204
    );
    stop_all([projector, ingest]).await;
}

/// Team changes racing each other and changes of their members (the same people in several
/// teams, roles changed meanwhile) all land: none is answered with a deadlock's 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_team_and_people_changes_all_land() {
    use shared::jwt::Role;
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let url = ingest.url();
    let t = create_tenant(&pool, "team-races").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let owner = format!("owner-{tag}@races.example");
    create_person(&pool, t.id, &owner, "Races-Pass-4242", Role::Owner).await;
    let token: Value = login(&client, &url, &owner, "Races-Pass-4242")
        .await
        .json()
        .await
        .unwrap();
    let token = token["access_token"].as_str().unwrap().to_string();
    let mut people = Vec::new();
    for i in 0..6 {
        let email = format!("p{i}-{tag}@races.example");
        people.push(create_person(&pool, t.id, &email, "Races-Pass-4242", Role::Developer).await);
    }
    for round in 0..3 {
        let mut changes = Vec::new();
        for i in 0..12 {
            // Each team takes most of the people, in another order each time.
            let mut members = people.clone();
            members.rotate_left(i % people.len());
            members.truncate(4 + i % 3);
            let req = client
                .put(format!("{url}/v1/admin/teams/race-{}", i % 4))
                .bearer_auth(&token)
                .json(&json!({"name": format!("Race {round}"), "members": members}));
            changes.push(req);
        }
        for (i, person) in people.iter().enumerate() {
            let role = if (i + round) % 2 == 0 {
                "manager"
            } else {
                "developer"
            };
            let req = client
                .patch(format!("{url}/v1/admin/users/{person}"))
                .bearer_auth(&token)
                .json(&json!({"role": role}));
            changes.push(req);
        }
        let answers = futures::future::join_all(changes.into_iter().map(|r| async move {
            let res = r.send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }))
        .await;
        for (status, body) in answers {
            assert_eq!(status, 204, "round {round}: {body}");
        }
    }
    ingest.stop().await.unwrap();
}

/// An open invitation lives no longer than the rights it was made with, as a key does. An
/// admin invites with their token and with their admin key, another admin invites, and an
/// owner invites an owner and a developer; then the first admin is made developer, the second
/// deactivated and the owner made admin. Each invitation made with a right now gone is
/// refused at its link (410), while the former owner's developer and the remaining owner's
/// invitations are accepted; the developer's invitation is refused (403). Before, a demoted
/// admin kept a link that made them a fresh admin account.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invitations_go_with_the_rights_they_were_made_with() {
    use shared::jwt::Role;
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let client = http();
    let url = ingest.url();
    let t = create_tenant(&pool, "invites-of").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let person = |name: &'static str, role: Role| {
        let (pool, client, url) = (pool.clone(), client.clone(), url.clone());
        let email = format!("{name}-{tag}@rights.example");
        async move {
            let id = create_person(&pool, t.id, &email, "Rights-Pass-4242", role).await;
            let v: Value = login(&client, &url, &email, "Rights-Pass-4242")
                .await
                .json()
                .await
                .unwrap();
            (id, v["access_token"].as_str().unwrap().to_string())
        }
    };
    let (_, owner) = person("owner", Role::Owner).await;
    let (demoted_id, demoted) = person("demoted", Role::Admin).await;
    let (gone_id, gone) = person("gone", Role::Admin).await;
    let (former_id, former) = person("former", Role::Owner).await;
    let invite = |credential: &str, name: &str, role: &str| {
        let req = client
            .post(format!("{url}/v1/admin/invitations"))
            .bearer_auth(credential)
            .json(&json!({"email": format!("{name}-{tag}@rights.example"), "role": role}));
        async move { status_and_json(req).await }
    };
    let made = |(st, v): (u16, Value)| {
        assert_eq!(st, 201, "{v}");
        v["token"].clone()
    };
    let (st, key) = status_and_json(
        client
            .post(format!("{url}/v1/admin/api-keys"))
            .bearer_auth(&demoted)
            .json(&json!({"name": "admin key", "scope": "admin"})),
    )
    .await;
    assert_eq!(st, 201, "{key}");
    let key = key["key"].as_str().unwrap().to_string();
    let by_demoted = made(invite(&demoted, "by-demoted", "admin").await);
    let by_key = made(invite(&key, "by-key", "developer").await);
    let by_gone = made(invite(&gone, "by-gone", "viewer").await);
    let owner_by_former = made(invite(&former, "owner-by-former", "owner").await);
    let dev_by_former = made(invite(&former, "dev-by-former", "developer").await);
    let by_owner = made(invite(&owner, "by-owner", "admin").await);
    let change = |id: uuid::Uuid, body: Value| {
        let req = client
            .patch(format!("{url}/v1/admin/users/{id}"))
            .bearer_auth(&owner)
            .json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(change(demoted_id, json!({"role": "developer"})).await, 204);
    assert_eq!(change(gone_id, json!({"status": "deactivated"})).await, 204);
    assert_eq!(change(former_id, json!({"role": "admin"})).await, 204);
    let accept = |token: &Value| {
        let req = client
            .post(format!("{url}/v1/auth/invitations/accept"))
            .json(&json!({"token": token, "password": "Joined-Pass-4242"}));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for (what, token) in [
        ("the demoted admin's", &by_demoted),
        ("the demoted admin's key's", &by_key),
        ("the deactivated admin's", &by_gone),
        ("the former owner's owner", &owner_by_former),
    ] {
        assert_eq!(accept(token).await, 410, "{what} invitation");
    }
    assert_eq!(accept(&dev_by_former).await, 200);
    assert_eq!(accept(&by_owner).await, 200);
    let revoked = outbox_events(&pool, t.id.0, "invitation.changed")
        .await
        .into_iter()
        .filter(|e| {
            e["data"]["detail"] == "made by a person who no longer has the right to make it"
        })
        .count();
    assert_eq!(revoked, 4);
    // The demoted person, signed in again, invites no one.
    let v: Value = login(
        &client,
        &url,
        &format!("demoted-{tag}@rights.example"),
        "Rights-Pass-4242",
    )
    .await
    .json()
    .await
    .unwrap();
    let (st, _) = invite(v["access_token"].as_str().unwrap(), "again", "viewer").await;
    assert_eq!(st, 403);
    ingest.stop().await.unwrap();
}
