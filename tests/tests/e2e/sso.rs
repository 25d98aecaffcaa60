//! Single sign-on against a real (small) OpenID Connect provider started by the test:
//! provisioning from allowed domains only, identity matching, and a provider or attacker
//! that tampers with state, nonce, audience, signature or the code.

use serde_json::{json, Value};
use shared::jwt::Role;
use tally_tests::oidc::{Faults, TestIdp, CLIENT_ID, CLIENT_SECRET};
use tally_tests::*;

struct Browser {
    http: reqwest::Client,
    ingest: String,
    tenant: String,
}

impl Browser {
    /// Follows start → provider → callback by hand; returns the callback's (code, state).
    async fn authorize(&self) -> (String, String) {
        let res = self
            .http
            .get(format!(
                "{}/v1/auth/sso/start?tenant={}",
                self.ingest, self.tenant
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 302);
        let to_idp = res.headers()["location"].to_str().unwrap().to_string();
        let url = reqwest::Url::parse(&to_idp).unwrap();
        let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
        assert_eq!(q["code_challenge_method"], "S256");
        assert!(
            q.contains_key("nonce") && q.contains_key("state") && q.contains_key("code_challenge")
        );
        let res = self.http.get(&to_idp).send().await.unwrap();
        assert_eq!(res.status(), 302, "the provider logs the person in");
        let back = reqwest::Url::parse(res.headers()["location"].to_str().unwrap()).unwrap();
        assert_eq!(back.path(), "/v1/auth/sso/callback");
        let q: std::collections::HashMap<_, _> = back.query_pairs().into_owned().collect();
        (q["code"].clone(), q["state"].clone())
    }

    async fn callback(&self, code: &str, state: &str) -> reqwest::Response {
        self.http
            .get(format!("{}/v1/auth/sso/callback", self.ingest))
            .query(&[("code", code), ("state", state)])
            .send()
            .await
            .unwrap()
    }

    async fn login(&self) -> reqwest::Response {
        let (code, state) = self.authorize().await;
        self.callback(&code, &state).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sso_logs_people_in_and_refuses_forgeries() {
    init_logs();
    let pool = test_pool().await;
    let idp = TestIdp::start().await;
    let common = common_for_test();
    let ingest = start_ingest(&common, |c| {
        c.secret_key = "ab".repeat(32);
        c.public_url = "http://tally.test".into();
    })
    .await;
    let jwks = format!("{}/.well-known/jwks.json", ingest.url());
    let query = start_query(&common, |c| c.jwks_url = jwks).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let t = create_tenant(&pool, "sso").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let owner = format!("owner-{tag}@example.com");
    ingest_api::admin::create_user(
        &pool,
        "",
        ingest_api::admin::NewUser {
            tenant: t.id,
            email: &owner,
            password: "Owner-Pass-123",
            role: Role::Owner,
            external_id: None,
            teams: &[],
        },
    )
    .await
    .unwrap();
    let owner_tokens: Value = http
        .post(format!("{}/v1/auth/login", ingest.url()))
        .json(&json!({"email": owner, "password": "Owner-Pass-123"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let owner_access = owner_tokens["access_token"].as_str().unwrap();

    // The owner points the tenant at the provider; the secret is sealed at rest.
    let domain = format!("{tag}.example.org");
    let res = http
        .put(format!("{}/v1/admin/sso", ingest.url()))
        .bearer_auth(owner_access)
        .json(
            &json!({"provider": "oidc", "issuer": idp.issuer, "client_id": CLIENT_ID,
                      "client_secret": CLIENT_SECRET, "allowed_domains": [domain]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204, "{}", res.text().await.unwrap());
    let sealed: Vec<u8> = sqlx::query_scalar(
        "SELECT client_secret_enc FROM control.sso_settings WHERE tenant_id = $1",
    )
    .bind(t.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(!sealed
        .windows(CLIENT_SECRET.len())
        .any(|w| w == CLIENT_SECRET.as_bytes()));
    let view: Value = http
        .get(format!("{}/v1/admin/sso", ingest.url()))
        .bearer_auth(owner_access)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["client_id"], CLIENT_ID);
    assert!(view.get("client_secret").is_none() && view.get("client_secret_enc").is_none());
    let res = http.put(format!("{}/v1/admin/sso", ingest.url())).bearer_auth(owner_access)
        .json(&json!({"provider": "oidc", "issuer": "http://127.0.0.1:9/nothing", "client_id": "x", "client_secret": "y"}))
        .send().await.unwrap();
    assert_eq!(
        res.status(),
        422,
        "an unreachable issuer is refused up front"
    );

    let browser = Browser {
        http: http.clone(),
        ingest: ingest.url(),
        tenant: t.id.to_string(),
    };

    // A new person from an allowed domain is provisioned, and recognised next time.
    let alice = format!("alice@{domain}");
    idp.log_in_as("idp-sub-alice", &alice, true);
    let res = browser.login().await;
    assert_eq!(res.status(), 200);
    let tokens: Value = res.json().await.unwrap();
    let res = http
        .get(format!("{}/v1/dashboard/overview", query.url()))
        .bearer_auth(tokens["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the SSO user reads the dashboards");
    assert_eq!(browser.login().await.status(), 200);
    let (n, role): (i64, String) =
        sqlx::query_as("SELECT count(*), min(role) FROM control.users WHERE email = $1")
            .bind(&alice)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((n, role.as_str()), (1, "developer"));

    // Not provisioned: a foreign domain, or an unverified address.
    idp.log_in_as("idp-sub-mallory", "mallory@evil.example", true);
    assert_eq!(browser.login().await.status(), 403);
    idp.log_in_as("idp-sub-eve", &format!("eve@{domain}"), false);
    assert_eq!(browser.login().await.status(), 403);
    let strangers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.users WHERE email IN ('mallory@evil.example', $1)",
    )
    .bind(format!("eve@{domain}"))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(strangers, 0);

    // State: unknown, and used twice.
    idp.log_in_as("idp-sub-alice", &alice, true);
    let (code, state) = browser.authorize().await;
    assert_eq!(browser.callback(&code, "forged-state").await.status(), 422);
    assert_eq!(browser.callback(&code, &state).await.status(), 200);
    assert_eq!(
        browser.callback(&code, &state).await.status(),
        422,
        "a state works once"
    );

    // Code injection: a code from one login with another login's state fails PKCE.
    let (code_a, _state_a) = browser.authorize().await;
    let (_code_b, state_b) = browser.authorize().await;
    assert_eq!(browser.callback(&code_a, &state_b).await.status(), 401);

    // A provider (or someone in the middle) sending bad ID tokens.
    for faults in [
        Faults {
            wrong_nonce: true,
            ..Default::default()
        },
        Faults {
            wrong_audience: true,
            ..Default::default()
        },
        Faults {
            foreign_key: true,
            ..Default::default()
        },
    ] {
        idp.set_faults(faults.clone());
        assert_eq!(browser.login().await.status(), 401, "{faults:?}");
    }
    idp.set_faults(Faults::default());
    assert_eq!(browser.login().await.status(), 200);

    ingest.stop().await.unwrap();
    query.stop().await.unwrap();
}
