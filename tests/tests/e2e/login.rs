//! People: login, refresh rotation with reuse detection, logout, password change,
//! deactivation, role-scoped dashboards — and forged tokens from the attacker's side.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use shared::jwt::{Claims, Role};
use tally_tests::*;

const PASSWORD: &str = "Sturdy-Pass-42";

struct Stack {
    ingest: Running,
    query: Running,
    client: reqwest::Client,
}

impl Stack {
    async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        login(&self.client, &self.ingest.url(), email, password).await
    }

    async fn tokens(&self, email: &str) -> Value {
        let res = self.login(email, PASSWORD).await;
        assert_eq!(res.status(), 200, "login {email}");
        res.json().await.unwrap()
    }

    async fn refresh(&self, token: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/auth/refresh", self.ingest.url()))
            .json(&json!({"refresh_token": token}))
            .send()
            .await
            .unwrap()
    }

    async fn overview_with(&self, access: &str, extra: &str) -> reqwest::Response {
        self.client
            .get(format!(
                "{}/v1/dashboard/overview?range=24h{extra}",
                self.query.url()
            ))
            .bearer_auth(access)
            .send()
            .await
            .unwrap()
    }

    async fn commands_seen(&self, access: &str) -> i64 {
        let res = self.overview_with(access, "").await;
        assert_eq!(res.status(), 200);
        let body: Value = res.json().await.unwrap();
        body["commands"]["count"].as_i64().unwrap()
    }
}

fn event(user: &str, team: &str) -> Value {
    let mut e = command(user, "build", 10, true);
    e["data"]["team_id"] = json!(team);
    e
}

async fn user(
    pool: &sqlx::PgPool,
    t: &TestTenant,
    email: &str,
    role: Role,
    ext: &str,
    teams: &[&str],
) {
    let teams: Vec<String> = teams.iter().map(|s| s.to_string()).collect();
    ingest_api::control::store::create_user(
        pool,
        "",
        ingest_api::control::store::NewUser {
            tenant: t.id,
            email,
            password: PASSWORD,
            role,
            external_id: Some(ext),
            teams: &teams,
        },
    )
    .await
    .unwrap();
}

/// Polls until `check` holds, for at most the documented credential cache delay.
async fn within_cache_delay<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let since = Instant::now();
    while !check().await {
        assert!(
            since.elapsed() < shared::auth::KEY_CACHE_TTL + Duration::from_secs(2),
            "{what}: not in effect after {:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn people_log_in_and_see_what_their_role_allows() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let projector = start_projector(&common).await;
    let s = Stack {
        ingest,
        query,
        client: http(),
    };

    let a = create_tenant(&pool, "people-a").await;
    let b = create_tenant(&pool, "people-b").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let email = |name: &str| format!("{name}-{tag}@example.com");
    user(&pool, &a, &email("owner"), Role::Owner, "alice", &[]).await;
    user(
        &pool,
        &a,
        &email("dev"),
        Role::Developer,
        "bob",
        &["team-y"],
    )
    .await;
    user(
        &pool,
        &a,
        &email("mgr"),
        Role::Manager,
        "carol",
        &["team-x"],
    )
    .await;
    user(&pool, &b, &email("b-owner"), Role::Owner, "zed", &[]).await;

    let mut events_a: Vec<Value> = Vec::new();
    events_a.extend((0..3).map(|_| event("alice", "team-x")));
    events_a.extend((0..2).map(|_| event("bob", "team-y")));
    events_a.extend((0..4).map(|_| event("dave", "team-x")));
    let res = post_events(
        &s.client,
        &s.ingest.url(),
        &a.ingest_key,
        &Value::Array(events_a),
    )
    .await;
    assert_eq!(res.status(), 202);
    let events_b = Value::Array((0..5).map(|_| event("zed", "team-x")).collect());
    assert_eq!(
        post_events(&s.client, &s.ingest.url(), &b.ingest_key, &events_b)
            .await
            .status(),
        202
    );
    wait_projected(&pool, a.id, 9, Duration::from_secs(60)).await;
    wait_projected(&pool, b.id, 5, Duration::from_secs(60)).await;

    // Each role sees its own slice; nobody sees another tenant, whatever ids they send.
    let owner = s.tokens(&email("owner")).await;
    let owner_access = owner["access_token"].as_str().unwrap().to_string();
    assert_eq!(owner["token_type"], "Bearer");
    assert_eq!(owner["expires_in"], 900);
    assert_eq!(s.commands_seen(&owner_access).await, 9);
    let dev = s.tokens(&email("dev")).await;
    assert_eq!(
        s.commands_seen(dev["access_token"].as_str().unwrap()).await,
        2,
        "own data"
    );
    let mgr = s.tokens(&email("mgr")).await;
    let mgr_access = mgr["access_token"].as_str().unwrap().to_string();
    assert_eq!(s.commands_seen(&mgr_access).await, 7, "team-x data");
    let b_owner = s.tokens(&email("b-owner")).await;
    assert_eq!(
        s.commands_seen(b_owner["access_token"].as_str().unwrap())
            .await,
        5
    );
    let res = s
        .overview_with(&owner_access, &format!("&tenant_id={}", b.id))
        .await;
    let body: Value = res.json().await.unwrap();
    assert_eq!(
        body["tenant_id"],
        a.id.to_string(),
        "B's id in the query changes nothing"
    );
    assert_eq!(body["commands"]["count"], 9);

    // Wrong passwords and unknown people get the same answer.
    assert_eq!(
        s.login(&email("owner"), "Wrong-Pass-42").await.status(),
        401
    );
    assert_eq!(s.login(&email("nobody"), PASSWORD).await.status(), 401);

    // Forged tokens.
    let (kid, private): (String, Vec<u8>) = sqlx::query_as(
        "SELECT kid, private_pkcs8 FROM control.signing_keys WHERE retired_at IS NULL ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let jwks: Value = s
        .client
        .get(s.ingest.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let published = jwks["keys"].as_array().unwrap();
    assert!(published
        .iter()
        .any(|k| k["kid"] == kid.as_str() && k["kty"] == "OKP" && k["crv"] == "Ed25519"));
    assert!(
        published.iter().all(|k| k.get("d").is_none()),
        "no private parts in the JWKS"
    );
    let x = published.iter().find(|k| k["kid"] == kid.as_str()).unwrap()["x"]
        .as_str()
        .unwrap()
        .to_string();
    let owner_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM control.users WHERE email = $1")
        .bind(email("owner"))
        .fetch_one(&pool)
        .await
        .unwrap();
    let good = Claims::new(owner_id, a.id, Role::Owner, 0);
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let mut forged: Vec<(&str, String)> = Vec::new();
    forged.push((
        "alg none",
        format!(
            "{}.{}.",
            enc(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
            enc(&serde_json::to_value(&good).unwrap())
        ),
    ));
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = Some(kid.clone());
    for secret in [x.as_bytes().to_vec(), URL_SAFE_NO_PAD.decode(&x).unwrap()] {
        let t = jsonwebtoken::encode(&hs, &good, &jsonwebtoken::EncodingKey::from_secret(&secret))
            .unwrap();
        forged.push(("HS256 with the public key", t));
    }
    let mut expired = good.clone();
    expired.iat -= 3600;
    expired.exp = chrono::Utc::now().timestamp() - 120;
    forged.push((
        "expired",
        ingest_api::keys::sign(&kid, &private, &expired).unwrap(),
    ));
    let mut aud = good.clone();
    aud.aud = "someone-else".into();
    forged.push((
        "wrong aud",
        ingest_api::keys::sign(&kid, &private, &aud).unwrap(),
    ));
    let mut iss = good.clone();
    iss.iss = "evil".into();
    forged.push((
        "wrong iss",
        ingest_api::keys::sign(&kid, &private, &iss).unwrap(),
    ));
    let stranger = ingest_api::keys::generate_key();
    forged.push((
        "unknown kid",
        ingest_api::keys::sign(&stranger.kid, &stranger.private_pkcs8, &good).unwrap(),
    ));
    forged.push((
        "known kid, other key",
        ingest_api::keys::sign(&kid, &stranger.private_pkcs8, &good).unwrap(),
    ));
    let real = owner_access.clone();
    let parts: Vec<&str> = real.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["tid"] = json!(b.id);
    forged.push((
        "payload swapped to tenant B",
        format!("{}.{}.{}", parts[0], enc(&claims), parts[2]),
    ));
    let mut other_tenant = good.clone();
    other_tenant.tid = b.id;
    forged.push((
        "tenant B claim for A's user",
        ingest_api::keys::sign(&kid, &private, &other_tenant).unwrap(),
    ));
    for (what, token) in forged {
        let res = s.overview_with(&token, "").await;
        assert_eq!(res.status(), 401, "{what}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{what}"
        );
    }

    // Refresh rotates; a reused refresh token revokes the whole family.
    let r1 = owner["refresh_token"].clone();
    let res = s.refresh(&r1).await;
    assert_eq!(res.status(), 200);
    let second: Value = res.json().await.unwrap();
    let r2 = second["refresh_token"].clone();
    assert_ne!(r1, r2);
    assert_eq!(
        s.commands_seen(second["access_token"].as_str().unwrap())
            .await,
        9
    );
    let res = s.refresh(&r1).await;
    assert_eq!(res.status(), 401, "reuse is refused");
    let body: Value = res.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(
        s.refresh(&r2).await.status(),
        401,
        "the family went with it"
    );
    assert_eq!(s.refresh(&json!("tlr_nonsense")).await.status(), 401);

    // Logout ends that login.
    let session = s.tokens(&email("owner")).await;
    let res = s
        .client
        .post(format!("{}/v1/auth/logout", s.ingest.url()))
        .json(&json!({"refresh_token": session["refresh_token"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(s.refresh(&session["refresh_token"]).await.status(), 401);

    // Password change: weak and wrong attempts refused; then old sessions end.
    let dev_access = dev["access_token"].as_str().unwrap().to_string();
    let change = |current: &str, new: &str| {
        s.client
            .post(format!("{}/v1/auth/password", s.ingest.url()))
            .bearer_auth(&dev_access)
            .json(&json!({"current_password": current, "new_password": new}))
            .send()
    };
    assert_eq!(change(PASSWORD, "short").await.unwrap().status(), 422);
    assert_eq!(
        change("Not-The-Pass-1", "Another-Pass-43")
            .await
            .unwrap()
            .status(),
        403
    );
    let res = change(PASSWORD, "Another-Pass-43").await.unwrap();
    assert_eq!(res.status(), 200);
    let fresh: Value = res.json().await.unwrap();
    assert_eq!(
        s.refresh(&dev["refresh_token"]).await.status(),
        401,
        "old refresh tokens end at once"
    );
    within_cache_delay(
        "old access token refused after the password change",
        || async { s.overview_with(&dev_access, "").await.status() == 401 },
    )
    .await;
    assert_eq!(
        s.commands_seen(fresh["access_token"].as_str().unwrap())
            .await,
        2
    );
    assert_eq!(s.login(&email("dev"), PASSWORD).await.status(), 401);
    assert_eq!(
        s.login(&email("dev"), "Another-Pass-43").await.status(),
        200
    );

    // A deactivated user is refused.
    ingest_api::control::store::deactivate_user(&pool, "", &email("mgr"), None)
        .await
        .unwrap();
    assert_ne!(s.login(&email("mgr"), PASSWORD).await.status(), 200);
    assert_eq!(s.refresh(&mgr["refresh_token"]).await.status(), 401);
    within_cache_delay("deactivated user's access token refused", || async {
        s.overview_with(&mgr_access, "").await.status() == 401
    })
    .await;

    projector.stop().await.unwrap();
    s.ingest.stop().await.unwrap();
    s.query.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brute_force_is_locked_out_then_the_lockout_expires() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |c| {
        c.login_max_failures = 3;
        // Long enough that three throttled failures (1.75 s of delay by design, plus three
        // argon2 checks on a starved machine) always land inside one window.
        c.login_window_secs = 15;
    })
    .await;
    let query = start_query(&common, |_| {}).await;
    let s = Stack {
        ingest,
        query,
        client: http(),
    };
    let t = create_tenant(&pool, "brute").await;
    let email = format!("victim-{}@example.com", uuid::Uuid::new_v4().simple());
    user(&pool, &t, &email, Role::Developer, "victim", &[]).await;

    let mut delays = Vec::new();
    for i in 0..3 {
        let started = Instant::now();
        assert_eq!(
            s.login(&email, &format!("Guess-{i}-abc")).await.status(),
            401
        );
        delays.push(started.elapsed());
    }
    assert!(
        delays[2] > delays[0],
        "each failure is answered later: {delays:?}"
    );
    // The 4th attempt is refused before the password is even looked at — the right one too.
    let res = s.login(&email, PASSWORD).await;
    assert_eq!(res.status(), 429);
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=15).contains(&retry), "{retry}");
    // Other accounts are not locked by it.
    let other = format!("bystander-{}@example.com", uuid::Uuid::new_v4().simple());
    user(&pool, &t, &other, Role::Developer, "bystander", &[]).await;
    assert_eq!(s.login(&other, PASSWORD).await.status(), 200);
    // The lockout expires with the window.
    tokio::time::sleep(Duration::from_secs(retry + 1)).await;
    assert_eq!(s.login(&email, PASSWORD).await.status(), 200);
    s.ingest.stop().await.unwrap();
    s.query.stop().await.unwrap();
}

/// Someone holding a stolen access token guesses at the current password through
/// `POST /v1/auth/password`: each guess is counted for the person, so after the login's
/// allowance (on top of the login form's own) the change is refused (429) — the right
/// password too —, and each wrong guess is audited as a failed login. Whoever hammers the
/// address's login form does not keep its signed-in owner from changing the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stolen_access_token_gets_the_logins_allowance_of_password_guesses() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |c| {
        c.login_max_failures = 3;
        c.login_window_secs = 30;
    })
    .await;
    let query = start_query(&common, |_| {}).await;
    let s = Stack {
        ingest,
        query,
        client: http(),
    };
    let t = create_tenant(&pool, "password-guess").await;
    let email = format!("holder-{}@example.com", uuid::Uuid::new_v4().simple());
    user(&pool, &t, &email, Role::Developer, "holder", &[]).await;
    let tokens = s.tokens(&email).await;
    let change = |token: String, current: String, new: &str| {
        let req = s
            .client
            .post(format!("{}/v1/auth/password", s.ingest.url()))
            .bearer_auth(token)
            .json(&json!({"current_password": current, "new_password": new}));
        async move { req.send().await.unwrap() }
    };
    // Someone locks the address's login form; its owner, signed in, still changes the password.
    for i in 0..3 {
        assert_eq!(
            s.login(&email, &format!("Guess-{i}-abc")).await.status(),
            401
        );
    }
    assert_eq!(s.login(&email, PASSWORD).await.status(), 429);
    let own = tokens["access_token"].as_str().unwrap().to_string();
    let res = change(own, PASSWORD.to_string(), "Changed-Pass-4242").await;
    assert_eq!(
        res.status(),
        200,
        "the lockout of the form is not the person's"
    );
    let fresh: Value = res.json().await.unwrap();

    // Their new access token is stolen: three guesses, then even the right password is 429.
    let stolen = fresh["access_token"].as_str().unwrap().to_string();
    for i in 0..3 {
        let res = change(stolen.clone(), format!("Guess-{i}-abc"), "Taken-Over-4242").await;
        assert_eq!(res.status(), 403);
    }
    let res = change(stolen, "Changed-Pass-4242".into(), "Taken-Over-4242").await;
    assert_eq!(res.status(), 429, "the right password after the allowance");
    assert!(res.headers().contains_key("retry-after"));
    let failed = outbox_events(&pool, t.id.0, "auth.login_failed").await;
    let guesses = failed
        .iter()
        .filter(|e| {
            e["data"]["detail"] == "wrong current password at a password change"
                && e["data"]["email"] == email.as_str()
        })
        .count();
    assert_eq!(guesses, 3, "{failed:?}");
    s.ingest.stop().await.unwrap();
    s.query.stop().await.unwrap();
}

/// 200 wrong passwords for one account at once: each attempt is counted before its password
/// is checked, so at most the allowed number of argon2 checks run (counted on `/metrics` of
/// a process of its own), and the rest get 429 — the right password too, afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_get_at_most_the_allowed_password_checks() {
    parallel_guesses(false).await;
}

/// The same with Redis killed after ingest-api connected to it: the instance's own count
/// holds the line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_are_bounded_with_redis_down_too() {
    parallel_guesses(true).await;
}

async fn parallel_guesses(redis_down: bool) {
    let TestEnv { pool, common } = test_env().await;
    const ALLOWED: usize = 5;
    let mut redis = redis_down.then(PrivateRedis::start);
    let redis_url = redis
        .as_ref()
        .map_or(common.redis_url.clone(), PrivateRedis::url);
    // A process of its own, so that its `/metrics` counts only this test's work.
    let ingest = spawn_ingest_process(
        &common,
        &[
            ("TALLY_GRPC_ADDR", ""),
            ("TALLY_LOGIN_MAX_FAILURES", "5"),
            ("TALLY_LOGIN_MAX_FAILURES_PER_IP", "1000"),
            ("TALLY_HASH_WAIT_MS", "30000"),
            ("TALLY_REDIS_URL", &redis_url),
        ],
    )
    .await;
    let url = ingest.url.clone();
    if let Some(r) = redis.as_mut() {
        r.kill();
    }
    let client = http();
    let t = create_tenant(&pool, "guesses").await;
    let email = format!("target-{}@example.com", uuid::Uuid::new_v4().simple());
    user(&pool, &t, &email, Role::Developer, "target", &[]).await;
    let metrics = || scrape_metrics(&client, &url);
    let before = counter(&metrics().await, "auth_password_verifications_total");

    let guesses = (0..200).map(|i| {
        let client = client.clone();
        let url = url.clone();
        let email = email.clone();
        tokio::spawn(async move {
            let res = client
                .post(format!("{url}/v1/auth/login"))
                .json(&json!({"email": email, "password": format!("Guess-{i}-Abc")}))
                .send()
                .await
                .unwrap();
            let retry = res.headers().get("retry-after").is_some();
            (res.status().as_u16(), retry)
        })
    });
    let answers: Vec<(u16, bool)> = futures::future::join_all(guesses)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let checked = counter(&metrics().await, "auth_password_verifications_total") - before;
    let refused = answers.iter().filter(|(s, _)| *s == 429).count();
    let wrong = answers.iter().filter(|(s, _)| *s == 401).count();
    assert_eq!(refused + wrong, 200, "only 401 and 429: {answers:?}");
    assert!(
        wrong <= ALLOWED,
        "{wrong} guesses had their password checked (Redis fallbacks: {})",
        counter(&metrics().await, "auth_throttle_local_fallback_total")
    );
    assert!(refused >= 200 - ALLOWED);
    assert!(answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .all(|(_, retry)| *retry));
    assert!(
        checked as usize <= ALLOWED && checked as usize == wrong,
        "{checked} password checks ran for {wrong} answered guesses"
    );
    // Every checked guess is audited; the locked account refuses even the right password.
    let audited: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.outbox
          WHERE envelope->>'type' = 'auth.login_failed' AND envelope->'data'->>'email' = $1
            AND envelope->'data'->>'detail' = 'wrong password'",
    )
    .bind(&email)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(audited as usize, wrong);
    let res = login(&client, &url, &email, PASSWORD).await;
    assert_eq!(res.status(), 429);
    assert_eq!(
        counter(&metrics().await, "auth_password_verifications_total") - before,
        checked,
        "a locked account's password is not even checked"
    );
    if redis_down {
        assert!(counter(&metrics().await, "auth_throttle_local_fallback_total") > 0.0);
    }
}

/// A rotation of the newest refresh token raced against a reuse of an older one (what a
/// thief and the victim do): whichever wins, the family ends fully revoked — no successor
/// stays alive in it, and none the rotation handed out works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_racing_a_reuse_never_leaves_a_live_token() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |_| {}).await;
    let s = Stack {
        ingest,
        query,
        client: http(),
    };
    let t = create_tenant(&pool, "refresh-race").await;
    let email = format!("racer-{}@example.com", uuid::Uuid::new_v4().simple());
    user(&pool, &t, &email, Role::Developer, "racer", &[]).await;
    let mut rotations_won = 0;
    for round in 0..25 {
        let first = s.tokens(&email).await;
        let r1 = first["refresh_token"].clone();
        let res = s.refresh(&r1).await;
        assert_eq!(res.status(), 200);
        let r2 = res.json::<Value>().await.unwrap()["refresh_token"].clone();
        let family: uuid::Uuid = sqlx::query_scalar(
            "SELECT family_id FROM control.refresh_tokens WHERE token_hash = $1",
        )
        .bind(shared::apikey::hash(r1.as_str().unwrap()))
        .fetch_one(&pool)
        .await
        .unwrap();
        let (rotated, reused) = tokio::join!(s.refresh(&r2), s.refresh(&r1));
        assert_eq!(reused.status(), 401, "round {round}: reuse is refused");
        let live: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM control.refresh_tokens WHERE family_id = $1 AND revoked_at IS NULL",
        )
        .bind(family)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(live, 0, "round {round}: a live token in a revoked family");
        if rotated.status() == 200 {
            rotations_won += 1;
            let r3 = rotated.json::<Value>().await.unwrap()["refresh_token"].clone();
            assert_eq!(
                s.refresh(&r3).await.status(),
                401,
                "round {round}: the successor handed out is dead"
            );
        } else {
            assert_eq!(rotated.status(), 401, "round {round}");
        }
    }
    eprintln!("refresh race: the rotation answered first in {rotations_won} of 25 rounds");
    s.ingest.stop().await.unwrap();
    s.query.stop().await.unwrap();
}

/// What an access token says (its signature unchecked).
fn claims_of(tokens: &Value) -> Claims {
    let token = tokens["access_token"].as_str().unwrap();
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// The tenant an access token is for.
fn tenant_of(tokens: &Value) -> uuid::Uuid {
    claims_of(tokens).tid.0
}

/// A password change checks the token at its start, then spends two password hashes before it
/// writes. An admin demoted in that window got a fresh token that still said admin (the old
/// token's role with the new `token_version`), good for admin's powers for its lifetime. The
/// change now re-reads role and version under the row lock: a token the demotion ended gets
/// 401 and changes nothing, and a new token carries the role the database holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_password_change_racing_a_demotion_keeps_no_old_role() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let query = start_query(&common, |_| {}).await;
    let s = Stack {
        ingest,
        query,
        client: http(),
    };
    let t = create_tenant(&pool, "demoted-mid-change").await;
    let email = format!("demoted-{}@example.com", uuid::Uuid::new_v4().simple());
    user(&pool, &t, &email, Role::Admin, "demoted", &[]).await;
    let tokens = s.tokens(&email).await;
    assert_eq!(claims_of(&tokens).role, Role::Admin);
    let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM control.users WHERE email = $1")
        .bind(&email)
        .fetch_one(&pool)
        .await
        .unwrap();
    let change = |token: &Value, new: &str| {
        let req = s
            .client
            .post(format!("{}/v1/auth/password", s.ingest.url()))
            .bearer_auth(token["access_token"].as_str().unwrap())
            .json(&json!({"current_password": PASSWORD, "new_password": new}));
        async move { req.send().await.unwrap() }
    };
    // The owner's demotion holds the row while the change hashes; it commits once the change
    // waits for the row, that is once the change has checked its token and hashed.
    let mut owner = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM control.users WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *owner)
        .await
        .unwrap();
    let changing = tokio::spawn(change(&tokens, "Changed-Pass-4242"));
    let row = "%FROM control.users WHERE id = $1 FOR NO KEY UPDATE".to_string();
    wait_for_lock_waiter(&pool, &[row], "the change never reached the row").await;
    // What the control plane's role change writes (`store::update_user`): the role, and a new
    // token version, which ends every session.
    sqlx::query(
        "UPDATE control.users SET role = 'developer', token_version = token_version + 1
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *owner)
    .await
    .unwrap();
    owner.commit().await.unwrap();
    let res = changing.await.unwrap();
    let status = res.status();
    let body: Value = res.json().await.unwrap();
    assert_eq!(status, 401, "a token the demotion ended: {body}");
    assert_eq!(s.login(&email, "Changed-Pass-4242").await.status(), 401);
    // Signed in again, the person is a developer, and so is a password change's new token.
    let tokens = s.tokens(&email).await;
    assert_eq!(claims_of(&tokens).role, Role::Developer);
    let res = change(&tokens, "Changed-Pass-4242").await;
    assert_eq!(res.status(), 200);
    let fresh: Value = res.json().await.unwrap();
    assert_eq!(claims_of(&fresh).role, Role::Developer);
    s.ingest.stop().await.unwrap();
    s.query.stop().await.unwrap();
}

/// An e-mail address is a different person in each tenant. One tenant's admin can neither
/// take another tenant's people's addresses first nor learn which it has: creating, inviting
/// or provisioning an address another tenant holds works as for a new one. A login takes the
/// account whose password matches, and asks which tenant when several do. Before, the address
/// was unique across tenants: the second tenant got 409 (and the first a yes/no answer to
/// "does any tenant have this person?").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_address_is_a_different_person_in_each_tenant() {
    let TestEnv { pool, common } = test_env().await;
    // Every attempt here comes from one address: its own limit (20) is not what is tested.
    let ingest = start_ingest(&common, |c| c.login_max_failures_per_ip = 1000).await;
    let client = http();
    let url = ingest.url();
    let (a, b) = (
        create_tenant(&pool, "address-a").await,
        create_tenant(&pool, "address-b").await,
    );
    let key = |t: &TestTenant| {
        let (pool, id) = (pool.clone(), t.id);
        async move {
            ingest_api::control::store::create_api_key(
                &pool,
                "",
                id,
                shared::apikey::Scope::Admin,
                "people",
            )
            .await
            .unwrap()
            .1
        }
    };
    let (key_a, key_b) = (key(&a).await, key(&b).await);
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let ceo = format!("ceo-{tag}@b.example");
    let create = |key: &str, email: &str, password: &str| {
        let req = client
            .post(format!("{url}/v1/admin/users"))
            .bearer_auth(key)
            .json(&json!({"email": email, "password": password, "role": "viewer"}));
        async move { status_and_json(req).await }
    };
    // B's person; A takes the same address, then B's person is still B's.
    assert_eq!(create(&key_b, &ceo, "Bee-Pass-4242").await.0, 201);
    let (st, body) = create(&key_a, &ceo.to_uppercase(), "Aye-Pass-4242").await;
    assert_eq!(st, 201, "another tenant's address is free here: {body}");
    let (st, body) = create(&key_a, &ceo, "Aye-Pass-4243").await;
    assert_eq!(st, 409, "twice in one tenant: {body}");
    assert_eq!(body["type"], "https://tally.dev/problems/conflict");

    // Each password signs in to its own tenant; a wrong one to none.
    let login_as = |email: &str, password: &str, tenant: Option<uuid::Uuid>| {
        let mut body = json!({"email": email, "password": password});
        if let Some(t) = tenant {
            body["tenant"] = json!(t);
        }
        let req = client.post(format!("{url}/v1/auth/login")).json(&body);
        async move { status_and_json(req).await }
    };
    let (st, tokens) = login_as(&ceo, "Bee-Pass-4242", None).await;
    assert_eq!((st, tenant_of(&tokens)), (200, b.id.0));
    let (st, tokens) = login_as(&ceo, "Aye-Pass-4242", None).await;
    assert_eq!((st, tenant_of(&tokens)), (200, a.id.0));
    assert_eq!(login_as(&ceo, "Not-The-Pass-1", None).await.0, 401);
    // Naming a tenant checks only that tenant's account.
    assert_eq!(login_as(&ceo, "Bee-Pass-4242", Some(a.id.0)).await.0, 401);

    // One password for both accounts: the login asks which, and only then signs in.
    let both = format!("both-{tag}@b.example");
    assert_eq!(create(&key_a, &both, "Same-Pass-4242").await.0, 201);
    assert_eq!(create(&key_b, &both, "Same-Pass-4242").await.0, 201);
    let (st, p) = login_as(&both, "Same-Pass-4242", None).await;
    assert_eq!(st, 409, "{p}");
    assert_eq!(p["type"], "https://tally.dev/problems/choose-tenant");
    let mut offered: Vec<String> = p["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    offered.sort();
    let mut expected = vec![a.id.0.to_string(), b.id.0.to_string()];
    expected.sort();
    assert_eq!(offered, expected, "{p}");
    assert!(p["tenants"][0]["name"]
        .as_str()
        .unwrap()
        .starts_with("address-"));
    let (st, tokens) = login_as(&both, "Same-Pass-4242", Some(b.id.0)).await;
    assert_eq!((st, tenant_of(&tokens)), (200, b.id.0));
    let (st, p) = login_as(&both, "Same-Pass-4242", Some(uuid::Uuid::nil())).await;
    assert_eq!(st, 401, "{p}");
    // A wrong password is told nothing about tenants.
    let (st, p) = login_as(&both, "Not-The-Pass-1", None).await;
    assert_eq!(st, 401);
    assert!(p.get("tenants").is_none(), "{p}");

    // A's admin holds an account of B's person's address, with a password of their own: its
    // good logins do not clear the failures counted against the address. Four guesses at B's
    // account, a good login to A's, one more guess: the address is locked, B's right
    // password included (before, A's success cleared the count, and the guessing went on).
    let target = format!("target-{tag}@b.example");
    assert_eq!(create(&key_b, &target, "Bee-Pass-4242").await.0, 201);
    assert_eq!(create(&key_a, &target, "Aye-Pass-4242").await.0, 201);
    for guess in 0..4 {
        let pass = format!("Guess-Pass-{guess}");
        assert_eq!(login_as(&target, &pass, Some(b.id.0)).await.0, 401);
    }
    assert_eq!(
        login_as(&target, "Aye-Pass-4242", Some(a.id.0)).await.0,
        200
    );
    assert_eq!(login_as(&target, "Guess-Pass-9", Some(b.id.0)).await.0, 401);
    let (st, p) = login_as(&target, "Bee-Pass-4242", Some(b.id.0)).await;
    assert_eq!(st, 429, "the address is locked: {p}");
    // Nor does linking single sign-on with the A account's password clear it.
    let linked = format!("linked-{tag}@b.example");
    assert_eq!(create(&key_b, &linked, "Bee-Pass-4242").await.0, 201);
    assert_eq!(create(&key_a, &linked, "Aye-Pass-4242").await.0, 201);
    let (st, a_tokens) = login_as(&linked, "Aye-Pass-4242", None).await;
    assert_eq!(st, 200);
    for guess in 0..3 {
        let pass = format!("Guess-Pass-{guess}");
        assert_eq!(login_as(&linked, &pass, Some(b.id.0)).await.0, 401);
    }
    let res = client
        .post(format!("{url}/v1/auth/sso/link"))
        .bearer_auth(a_tokens["access_token"].as_str().unwrap())
        .json(&json!({"password": "Aye-Pass-4242"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        404,
        "no single sign-on in A; the password was right"
    );
    assert_eq!(login_as(&linked, "Guess-Pass-8", Some(b.id.0)).await.0, 401);
    let (st, p) = login_as(&linked, "Bee-Pass-4242", Some(b.id.0)).await;
    assert_eq!(st, 429, "the address is locked: {p}");
    // A login naming no tenant that checks several accounts says whether the password opens
    // more than one (whoever holds one account sets its password at will): it stays counted
    // whatever it answers, so the sixth in the window is refused.
    let probed = format!("probed-{tag}@b.example");
    assert_eq!(create(&key_b, &probed, "Bee-Pass-4242").await.0, 201);
    assert_eq!(create(&key_a, &probed, "Aye-Pass-4242").await.0, 201);
    for round in 0..5 {
        let (st, _) = login_as(&probed, "Aye-Pass-4242", None).await;
        assert_eq!(st, 200, "round {round}");
    }
    assert_eq!(login_as(&probed, "Aye-Pass-4242", None).await.0, 429);

    // An invitation to an address another tenant holds is accepted as any.
    let guest = format!("guest-{tag}@b.example");
    assert_eq!(create(&key_b, &guest, "Bee-Pass-4242").await.0, 201);
    let (st, inv) = status_and_json(
        client
            .post(format!("{url}/v1/admin/invitations"))
            .bearer_auth(&key_a)
            .json(&json!({"email": guest, "role": "viewer"})),
    )
    .await;
    assert_eq!(st, 201, "{inv}");
    let (st, tokens) = status_and_json(
        client
            .post(format!("{url}/v1/auth/invitations/accept"))
            .json(&json!({"token": inv["token"], "password": "Aye-Pass-4242"})),
    )
    .await;
    assert_eq!((st, tenant_of(&tokens)), (200, a.id.0), "{tokens}");

    // Deactivating by address alone needs the tenant when there are two.
    let err = ingest_api::control::store::deactivate_user(&pool, "", &ceo, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("--tenant"), "{err}");
    ingest_api::control::store::deactivate_user(&pool, "", &ceo, Some(a.id))
        .await
        .unwrap();
    assert_eq!(login_as(&ceo, "Aye-Pass-4242", Some(a.id.0)).await.0, 403);
    assert_eq!(login_as(&ceo, "Bee-Pass-4242", Some(b.id.0)).await.0, 200);
    stop_all([ingest]).await;
}
