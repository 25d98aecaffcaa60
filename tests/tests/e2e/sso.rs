//! Single sign-on against a real (small) OpenID Connect provider started by the test:
//! provisioning from allowed domains only, identity matching, and a provider or attacker
//! that tampers with state, nonce, audience, signature or the code.

use serde_json::{json, Value};
use shared::jwt::Role;
use tally_tests::oidc::{Faults, TestIdp, CLIENT_ID, CLIENT_SECRET};
use tally_tests::*;

/// `PUT /v1/admin/sso`: a tenant's single sign-on settings, set with `credential`.
async fn put_sso(
    http: &reqwest::Client,
    ingest: &str,
    credential: &str,
    settings: &Value,
) -> reqwest::Response {
    http.put(format!("{ingest}/v1/admin/sso"))
        .bearer_auth(credential)
        .json(settings)
        .send()
        .await
        .unwrap()
}

/// The settings that send people of `domain` to `idp`, with the test client's credentials.
fn oidc_settings(idp: &TestIdp, domain: &str) -> Value {
    json!({"provider": "oidc", "issuer": idp.issuer, "client_id": CLIENT_ID,
           "client_secret": CLIENT_SECRET, "allowed_domains": [domain]})
}

/// A tenant whose owner pointed it at `idp` for the people of `{tag}.example.org`: the
/// tenant, the owner's access token and the domain.
async fn sso_tenant(
    pool: &sqlx::PgPool,
    http: &reqwest::Client,
    ingest: &str,
    idp: &TestIdp,
    name: &str,
) -> (TestTenant, String, String) {
    let t = create_tenant(pool, name).await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let owner = format!("owner-{tag}@example.com");
    create_person(pool, t.id, &owner, "Owner-Pass-123", Role::Owner).await;
    let tokens: Value = login(http, ingest, &owner, "Owner-Pass-123")
        .await
        .json()
        .await
        .unwrap();
    let access = tokens["access_token"].as_str().unwrap().to_string();
    let domain = format!("{tag}.example.org");
    let res = put_sso(http, ingest, &access, &oidc_settings(idp, &domain)).await;
    assert!(res.status().is_success(), "{}", res.status());
    (t, access, domain)
}

/// ingest-api as single sign-on needs it (a secret key, a public address), with `tweak`, and a
/// client that does not follow redirects (the test follows them by hand).
async fn sso_ingest(
    common: &shared::config::Common,
    tweak: impl FnOnce(&mut ingest_api::Config),
) -> (Running, reqwest::Client) {
    let ingest = start_ingest(common, |c| {
        c.common.secret_key = "ab".repeat(32);
        c.public_url = "http://tally.test".into();
        tweak(c);
    })
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    (ingest, http)
}

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

    /// Goes to the provider at `to_idp` (a link flow's authorization URL) and returns to the
    /// callback.
    async fn via_idp(&self, to_idp: &str) -> reqwest::Response {
        let res = self.http.get(to_idp).send().await.unwrap();
        assert_eq!(res.status(), 302, "the provider logs the person in");
        let back = reqwest::Url::parse(res.headers()["location"].to_str().unwrap()).unwrap();
        let q: std::collections::HashMap<_, _> = back.query_pairs().into_owned().collect();
        self.callback(&q["code"], &q["state"]).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sso_logs_people_in_and_refuses_forgeries() {
    let TestEnv { pool, common } = test_env().await;
    let idp = TestIdp::start().await;
    let ingest = start_ingest(&common, |c| {
        c.common.secret_key = "ab".repeat(32);
        c.public_url = "http://tally.test".into();
    })
    .await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let t = create_tenant(&pool, "sso").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let owner = format!("owner-{tag}@example.com");
    create_person(&pool, t.id, &owner, "Owner-Pass-123", Role::Owner).await;
    let owner_tokens: Value = login(&http, &ingest.url(), &owner, "Owner-Pass-123")
        .await
        .json()
        .await
        .unwrap();
    let owner_access = owner_tokens["access_token"].as_str().unwrap();

    // Settings past their bounds are refused, naming the field.
    let domain = format!("{tag}.example.org");
    let many: Vec<String> = (0..101).map(|i| format!("d{i}.example.org")).collect();
    for (change, field) in [
        (json!({"client_id": "c".repeat(256)}), "client_id"),
        (json!({"client_secret": "s".repeat(1025)}), "client_secret"),
        (json!({"allowed_domains": many}), "allowed_domains"),
        (
            json!({"allowed_domains": [domain, format!("{}.org", "d".repeat(250))]}),
            "allowed_domains[1]",
        ),
    ] {
        let mut settings = oidc_settings(&idp, &domain);
        settings
            .as_object_mut()
            .unwrap()
            .extend(change.as_object().unwrap().clone());
        let res = put_sso(&http, &ingest.url(), owner_access, &settings).await;
        assert_eq!(res.status(), 422, "{field}");
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }

    // The owner points the tenant at the provider; the secret is sealed at rest.
    let res = put_sso(
        &http,
        &ingest.url(),
        owner_access,
        &oidc_settings(&idp, &domain),
    )
    .await;
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
    let unreachable = json!({"provider": "oidc", "issuer": "http://127.0.0.1:9/nothing",
                             "client_id": "x", "client_secret": "y"});
    let res = put_sso(&http, &ingest.url(), owner_access, &unreachable).await;
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
    idp.log_in_as(&format!("alice-{tag}"), &alice, true);
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
    idp.log_in_as(&format!("mallory-{tag}"), "mallory@evil.example", true);
    assert_eq!(browser.login().await.status(), 403);
    idp.log_in_as(&format!("eve-{tag}"), &format!("eve@{domain}"), false);
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
    idp.log_in_as(&format!("alice-{tag}"), &alice, true);
    let (code, state) = browser.authorize().await;
    assert_eq!(browser.callback(&code, "forged-state").await.status(), 422);
    // Not a state Tally issues (schemathesis once sent one with a NUL and got a 503).
    assert_eq!(browser.callback(&code, ":Q\u{0}").await.status(), 422);
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
    // A provider answering more than a provider's answer is: not read past 256 KiB. Discovery
    // is how a start begins (503: the provider is unusable), the token answer how a callback
    // ends (401).
    idp.set_faults(Faults {
        huge_discovery: true,
        ..Default::default()
    });
    let res = browser
        .http
        .get(format!(
            "{}/v1/auth/sso/start?tenant={}",
            browser.ingest, browser.tenant
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    idp.set_faults(Faults {
        huge_token: true,
        ..Default::default()
    });
    assert_eq!(browser.login().await.status(), 401);
    idp.set_faults(Faults::default());
    assert_eq!(browser.login().await.status(), 200);

    stop_all([ingest, query]).await;
}

/// An admin (person or `admin` key) who runs an identity provider tries to become the owner:
/// pointing SSO at their provider is refused, and even a provider that vouches for the owner's
/// address cannot link itself to the owner's account. Only the owner, from a session with
/// their password, links an identity to it. Every refusal and change is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_cannot_take_over_an_owner_through_sso() {
    let TestEnv { pool, common } = test_env().await;
    let evil_idp = TestIdp::start().await;
    let idp = TestIdp::start().await;
    let ingest = start_ingest(&common, |c| {
        c.common.secret_key = "cd".repeat(32);
        c.public_url = "http://tally.test".into();
    })
    .await;
    let url = ingest.url();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let t = create_tenant(&pool, "sso-takeover").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let domain = format!("{tag}.example.org");
    let owner = format!("owner@{domain}");
    let admin = format!("admin@{domain}");
    let mut ids = Vec::new();
    for (email, role) in [(&owner, Role::Owner), (&admin, Role::Admin)] {
        ids.push(create_person(&pool, t.id, email, "Sturdy-Pass-42", role).await);
    }
    let (owner_id, admin_id) = (ids[0], ids[1]);
    let (admin_key_id, admin_key) = ingest_api::control::store::create_api_key(
        &pool,
        "",
        t.id,
        shared::apikey::Scope::Admin,
        "automation",
    )
    .await
    .unwrap();
    let access = |email: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let res = login(&http, &url, &email, "Sturdy-Pass-42").await;
            assert_eq!(res.status(), 200);
            let v: Value = res.json().await.unwrap();
            v["access_token"].as_str().unwrap().to_string()
        }
    };
    let admin_access = access(admin.clone()).await;
    let owner_access = access(owner.clone()).await;

    // The admin (as a person, and through the admin key) points SSO at their own provider,
    // granting `admin` to whoever it vouches for: refused, nothing stored.
    let evil = json!({"provider": "oidc", "issuer": evil_idp.issuer, "client_id": CLIENT_ID,
                      "client_secret": CLIENT_SECRET, "allowed_domains": [domain],
                      "default_role": "admin"});
    for credential in [&admin_access, &admin_key] {
        let res = put_sso(&http, &url, credential, &evil).await;
        assert_eq!(res.status(), 403);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
    }
    let configured: i64 =
        sqlx::query_scalar("SELECT count(*) FROM control.sso_settings WHERE tenant_id = $1")
            .bind(t.id.0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(configured, 0, "the refused settings were not stored");
    let denied = outbox_events(&pool, t.id.0, "auth.access_denied").await;
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0]["actor"]["user_id"], admin_id.to_string());
    assert_eq!(denied[1]["actor"]["api_key_id"], admin_key_id.to_string());
    assert!(denied.iter().all(|e| e["data"]["target"] == "sso"));

    // The owner configures the real provider; the change is audited with who made it.
    let res = put_sso(&http, &url, &owner_access, &oidc_settings(&idp, &domain)).await;
    assert_eq!(res.status(), 204, "{}", res.text().await.unwrap());
    let changed = outbox_events(&pool, t.id.0, "auth.sso_settings_changed").await;
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0]["actor"]["user_id"], owner_id.to_string());
    assert_eq!(changed[0]["data"]["target"], format!("idp:{}", idp.issuer));
    assert!(changed[0]["data"]["detail"]
        .as_str()
        .unwrap()
        .contains("default role developer"));
    // Admins still read the settings.
    let res = http
        .get(format!("{url}/v1/admin/sso"))
        .bearer_auth(&admin_access)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // A provider account that claims the owner's (or the admin's) verified address does not
    // link itself to an account above the provider's default role.
    let browser = Browser {
        http: http.clone(),
        ingest: url.clone(),
        tenant: t.id.to_string(),
    };
    // Subjects unique to this run: the provider's port (its issuer) may be one an earlier
    // run's provider had, and identities stay in the test database.
    let sub = |name: &str| format!("{name}-{tag}");
    for (name, email, id) in [
        ("fake-owner", &owner, owner_id),
        ("fake-admin", &admin, admin_id),
    ] {
        idp.log_in_as(&sub(name), email, true);
        let res = browser.login().await;
        assert_eq!(res.status(), 403);
        let body: Value = res.json().await.unwrap();
        assert!(
            body["type"]
                .as_str()
                .unwrap()
                .ends_with("sso-link-needs-password"),
            "{body}"
        );
        let linked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM control.user_identities WHERE user_id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(linked, 0);
    }
    let denied = outbox_events(&pool, t.id.0, "auth.access_denied").await;
    assert_eq!(denied.len(), 4);
    assert_eq!(denied[2]["data"]["user_id"], owner_id.to_string());
    assert_eq!(
        denied[2]["data"]["target"],
        format!("idp:{}#{}", idp.issuer, sub("fake-owner"))
    );
    assert_eq!(denied[3]["data"]["user_id"], admin_id.to_string());
    // A newcomer from the domain is still provisioned with the default role.
    idp.log_in_as(&sub("newcomer"), &format!("new@{domain}"), true);
    assert_eq!(browser.login().await.status(), 200);

    // The owner links their identity from a session, with their password.
    let link = |password: &str| {
        http.post(format!("{url}/v1/auth/sso/link"))
            .bearer_auth(&owner_access)
            .json(&json!({"password": password}))
            .send()
    };
    assert_eq!(link("Not-The-Pass-1").await.unwrap().status(), 403);
    let res = link("Sturdy-Pass-42").await.unwrap();
    assert_eq!(res.status(), 200);
    let to_idp = res.json::<Value>().await.unwrap()["authorization_url"]
        .as_str()
        .unwrap()
        .to_string();
    idp.log_in_as(&sub("real-owner"), &owner, true);
    let res = browser.via_idp(&to_idp).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    // From now on that identity signs the owner in.
    let res = browser.login().await;
    assert_eq!(res.status(), 200);
    let tokens: Value = res.json().await.unwrap();
    let payload = tokens["access_token"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], owner_id.to_string());
    assert_eq!(claims["role"], "owner");
    // The fake owner identity is still refused.
    idp.log_in_as(&sub("fake-owner"), &owner, true);
    assert_eq!(browser.login().await.status(), 403);

    ingest.stop().await.unwrap();
}

/// The tenant chooses its identity provider, and `/v1/auth/sso/start` answers anyone: the
/// service reaches a provider only where a notification may go. An issuer at a private or
/// link-local (cloud metadata) address, or a discovery naming a token endpoint or a JWKS
/// there, is refused (422 naming `issuer` when stored, 503 at the start); with loopback not
/// allowed, a provider on this host is refused too. Before, the service fetched and posted to
/// whatever the settings and the discovery named. And two tenants using the same provider
/// each have the same person as a person of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sso_reaches_providers_only_where_notifications_may_go() {
    let TestEnv { pool, common } = test_env().await;
    let idp = TestIdp::start().await;
    let configure = |c: &mut ingest_api::Config| {
        c.common.secret_key = "ab".repeat(32);
        c.public_url = "http://tally.test".into();
    };
    let ingest = start_ingest(&common, configure).await;
    let strict = start_ingest(&common, |c| {
        configure(c);
        c.common.notify_allow_loopback = false;
    })
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let t = create_tenant(&pool, "sso-ssrf").await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let owner = format!("owner-{tag}@example.com");
    create_person(&pool, t.id, &owner, "Owner-Pass-123", Role::Owner).await;
    let tokens: Value = login(&http, &ingest.url(), &owner, "Owner-Pass-123")
        .await
        .json()
        .await
        .unwrap();
    let access = tokens["access_token"].as_str().unwrap();
    let settings = oidc_settings(&idp, &format!("{tag}.example.org"));
    let refused = |res: reqwest::Response, what: &'static str| async move {
        assert_eq!(res.status(), 422);
        let p: Value = res.json().await.unwrap();
        assert_eq!(p["errors"][0]["field"], "issuer", "{p}");
        let reason = p["errors"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(reason.contains(what), "{what}: {p}");
    };
    let start = |base: String| {
        let (http, tenant) = (http.clone(), t.id);
        async move {
            http.get(format!("{base}/v1/auth/sso/start?tenant={tenant}"))
                .send()
                .await
                .unwrap()
                .status()
        }
    };

    // The provider on this host, where the operator allows loopback: stored, and it starts.
    let res = put_sso(&http, &ingest.url(), access, &settings).await;
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(start(ingest.url()).await, 302);

    // Its discovery turns the token endpoint to the metadata service, or the JWKS to a
    // private address: refused, and a login does not start.
    for (faults, what) in [
        (
            Faults {
                token_endpoint_at: Some("https://169.254.169.254/latest/api/token".into()),
                ..Default::default()
            },
            "token_endpoint",
        ),
        (
            Faults {
                jwks_uri_at: Some("https://10.20.30.40/jwks".into()),
                ..Default::default()
            },
            "jwks_uri",
        ),
    ] {
        idp.set_faults(faults);
        refused(put_sso(&http, &ingest.url(), access, &settings).await, what).await;
        assert_eq!(start(ingest.url()).await, 503);
    }
    idp.set_faults(Faults::default());

    // An issuer at a link-local or private address is never fetched.
    for issuer in ["https://169.254.169.254", "https://10.0.0.8/realms/x"] {
        let mut bad = settings.clone();
        bad["issuer"] = json!(issuer);
        refused(
            put_sso(&http, &ingest.url(), access, &bad).await,
            "private or reserved",
        )
        .await;
    }

    // Where loopback is not allowed, the provider on this host is refused, stored or not.
    refused(
        put_sso(&http, &strict.url(), access, &settings).await,
        "https",
    )
    .await;
    assert_eq!(start(strict.url()).await, 503);
    assert_eq!(start(ingest.url()).await, 302);

    // A second tenant uses the same provider: the same person (one identity, one address)
    // is a person of each, signed in to each (before, the identity belonged to the first
    // tenant whose sign-on they completed, and the second answered 403).
    let t2 = create_tenant(&pool, "sso-ssrf-2").await;
    let owner2 = format!("owner2-{tag}@example.com");
    create_person(&pool, t2.id, &owner2, "Owner-Pass-123", Role::Owner).await;
    let tokens2: Value = login(&http, &ingest.url(), &owner2, "Owner-Pass-123")
        .await
        .json()
        .await
        .unwrap();
    let res = put_sso(
        &http,
        &ingest.url(),
        tokens2["access_token"].as_str().unwrap(),
        &settings,
    )
    .await;
    assert!(res.status().is_success(), "{}", res.status());
    let person = format!("pat@{tag}.example.org");
    idp.log_in_as(&format!("pat-{tag}"), &person, true);
    let mut signed_in = Vec::new();
    for tenant in [t.id, t2.id] {
        let browser = Browser {
            http: http.clone(),
            ingest: ingest.url(),
            tenant: tenant.to_string(),
        };
        let res = browser.login().await;
        assert_eq!(res.status(), 200, "signed in to {tenant}");
        let body: Value = res.json().await.unwrap();
        signed_in.push(body["access_token"].as_str().unwrap().to_string());
    }
    let people: Vec<(uuid::Uuid, uuid::Uuid)> = sqlx::query_as(
        "SELECT u.tenant_id, u.id FROM control.users u
           JOIN control.user_identities i ON i.user_id = u.id AND i.tenant_id = u.tenant_id
          WHERE u.email = $1 ORDER BY u.created_at",
    )
    .bind(&person)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        people.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![t.id.0, t2.id.0],
        "one person in each tenant, each with the identity"
    );
    assert_ne!(people[0].1, people[1].1);
    // Signed in again to the first: the same person as before.
    let again = Browser {
        http: http.clone(),
        ingest: ingest.url(),
        tenant: t.id.to_string(),
    };
    assert_eq!(again.login().await.status(), 200);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM control.users WHERE email = $1")
        .bind(&person)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 2);
    stop_all([ingest, strict]).await;
}

/// `/v1/auth/sso/start` answers anyone, and each start fetches the provider's discovery and
/// writes a pending login: a client address has `sso_starts_per_minute` of them, then 429
/// with `Retry-After`, whichever tenant it names. Before, one address could make the
/// service call a tenant's provider and write logins as fast as it could ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sso_starts_are_limited_per_client_address() {
    let TestEnv { pool, common } = test_env().await;
    let idp = TestIdp::start().await;
    let (ingest, http) = sso_ingest(&common, |c| c.sso_starts_per_minute = 5).await;
    let (t, _, _) = sso_tenant(&pool, &http, &ingest.url(), &idp, "sso-starts").await;
    let start = |tenant: String| {
        let req = http.get(format!(
            "{}/v1/auth/sso/start?tenant={tenant}",
            ingest.url()
        ));
        async move { req.send().await.unwrap() }
    };
    let logins = || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM control.sso_logins WHERE tenant_id = $1",
            )
            .bind(t.id.0)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for n in 0..5 {
        assert_eq!(start(t.id.to_string()).await.status(), 302, "start {n}");
    }
    let res = start(t.id.to_string()).await;
    assert_eq!(res.status(), 429);
    assert!(res.headers().contains_key("retry-after"));
    let p: Value = res.json().await.unwrap();
    assert_eq!(
        p["type"], "https://tally.dev/problems/sso-start-limited",
        "{p}"
    );
    // Another tenant's id from the same address: the same count.
    let other = create_tenant(&pool, "sso-starts-other").await;
    assert_eq!(start(other.id.to_string()).await.status(), 429);
    assert_eq!(logins().await, 5, "a refused start wrote nothing");
    stop_all([ingest]).await;
}

/// A person single sign-on provisioned, then deactivated and removed by an admin, is not
/// provisioned again at their next sign-on (as their deactivated account kept them out), until
/// an admin gives the address a place again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_person_is_not_provisioned_again_by_sso() {
    let TestEnv { pool, common } = test_env().await;
    let idp = TestIdp::start().await;
    let (ingest, http) = sso_ingest(&common, |_| {}).await;
    let url = ingest.url();
    let (t, owner, domain) = sso_tenant(&pool, &http, &url, &idp, "sso-removal").await;
    let browser = Browser {
        http: http.clone(),
        ingest: url.clone(),
        tenant: t.id.to_string(),
    };
    let bob = format!("bob@{domain}");
    idp.log_in_as(&format!("bob-{domain}"), &bob, true);
    assert_eq!(browser.login().await.status(), 200, "provisioned");
    let bob_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM control.users WHERE tenant_id = $1 AND email = $2")
            .bind(t.id.0)
            .bind(&bob)
            .fetch_one(&pool)
            .await
            .unwrap();
    let admin = |method: reqwest::Method, path: String, body: Value| {
        let req = http
            .request(method, format!("{url}{path}"))
            .bearer_auth(&owner)
            .json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let path = format!("/v1/admin/users/{bob_id}");
    let deactivate = json!({"status": "deactivated"});
    assert_eq!(
        admin(reqwest::Method::PATCH, path.clone(), deactivate).await,
        204
    );
    assert_eq!(browser.login().await.status(), 403, "deactivated");
    assert_eq!(admin(reqwest::Method::DELETE, path, json!({})).await, 204);

    // Removed: still kept out, and no account is made for them.
    let res = browser.login().await;
    assert_eq!(res.status(), 403);
    let p: Value = res.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("removed"), "{p}");
    let accounts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.users WHERE tenant_id = $1 AND email = $2",
    )
    .bind(t.id.0)
    .bind(&bob)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(accounts, 0);

    // An admin gives the address a place again: the next sign-on reaches it.
    let person = json!({"email": bob, "password": "Back-Again-4242", "role": "developer"});
    assert_eq!(
        admin(reqwest::Method::POST, "/v1/admin/users".into(), person).await,
        201
    );
    assert_eq!(browser.login().await.status(), 200, "back");
}

/// `POST /v1/auth/sso/link` asks for the person's password again, and its guesses are counted
/// as the password change's, per person and with its allowance shared: whoever hammers the
/// address's login form does not keep its signed-in owner from linking (before, the link
/// counted under the address, and answered 429), and a stolen access token gets no more
/// guesses by alternating the two routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sso_link_counts_guesses_as_the_password_change_does() {
    let TestEnv { pool, common } = test_env().await;
    let idp = TestIdp::start().await;
    let (ingest, http) = sso_ingest(&common, |c| {
        c.login_max_failures = 3;
        c.login_window_secs = 30;
    })
    .await;
    let url = ingest.url();
    let (t, access, _) = sso_tenant(&pool, &http, &url, &idp, "sso-link-guesses").await;
    let owner: String = sqlx::query_scalar("SELECT email FROM control.users WHERE tenant_id = $1")
        .bind(t.id.0)
        .fetch_one(&pool)
        .await
        .unwrap();
    let post = |path: &str, body: Value| {
        let req = http
            .post(format!("{url}{path}"))
            .bearer_auth(&access)
            .json(&body);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    let link = |password: &str| post("/v1/auth/sso/link", json!({ "password": password }));
    // Someone locks the address's login form; its owner, signed in, still starts a link.
    for i in 0..3 {
        let guess = login(&http, &url, &owner, &format!("Guess-{i}-abc")).await;
        assert_eq!(guess.status(), 401);
    }
    assert_eq!(
        login(&http, &url, &owner, "Owner-Pass-123").await.status(),
        429
    );
    assert_eq!(
        link("Owner-Pass-123").await,
        200,
        "the form's lockout is not the person's"
    );

    // A stolen token's guesses, alternating the link and the password change, share one
    // allowance: after three, the right password is refused on both.
    assert_eq!(link("Guess-a-abc").await, 403);
    let change = |current: &str| {
        post(
            "/v1/auth/password",
            json!({"current_password": current, "new_password": "Taken-Over-4242"}),
        )
    };
    assert_eq!(change("Guess-b-abc").await, 403);
    assert_eq!(link("Guess-c-abc").await, 403);
    assert_eq!(link("Owner-Pass-123").await, 429);
    assert_eq!(change("Owner-Pass-123").await, 429);
    ingest.stop().await.unwrap();
}

/// What the identity provider vouches for is checked against what the control schema stores
/// before it is stored: a subject over 255 bytes is a 401 and an address over 254
/// characters a 403 (no usable address), each a problem and no account made. Before, both
/// failed the insert: 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_the_control_schema_cannot_hold_is_refused_not_failed() {
    let TestEnv { pool, common } = test_env().await;
    let idp = TestIdp::start().await;
    let (ingest, http) = sso_ingest(&common, |_| {}).await;
    let url = ingest.url();
    let (t, _, domain) = sso_tenant(&pool, &http, &url, &idp, "sso-bounds").await;
    let browser = Browser {
        http: http.clone(),
        ingest: url.clone(),
        tenant: t.id.to_string(),
    };
    // Text that does not compress, as PostgreSQL would a repeated character to fit its index.
    let long_subject: String = (0..94)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let long_address = format!("{}@{domain}", "a".repeat(260));
    for (subject, email, status) in [
        (long_subject.as_str(), format!("long-sub@{domain}"), 401),
        ("long-address", long_address.clone(), 403),
    ] {
        idp.log_in_as(subject, &email, true);
        let res = browser.login().await;
        assert_eq!(res.status(), status, "{email}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{email}"
        );
    }
    let accounts: i64 =
        sqlx::query_scalar("SELECT count(*) FROM control.users WHERE tenant_id = $1")
            .bind(t.id.0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(accounts, 1, "the owner alone");
    // Within the bounds, the same provider's person is provisioned.
    idp.log_in_as("s".repeat(255).as_str(), &format!("fine@{domain}"), true);
    assert_eq!(browser.login().await.status(), 200);
    ingest.stop().await.unwrap();
}
