//! Schema-driven attacks: schemathesis reads each service's `/openapi.json`, generates valid
//! and invalid requests for every operation, sends them with real credentials, and checks
//! every answer: no 5xx, and a status, content type, headers and body the spec declares; an
//! operation that answers without its credential fails too. One run per credential, each
//! bounded in examples and in time.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use shared::apikey::Scope;
use tally_tests::*;

/// The virtualenv `deploy/local/fuzz-prereqs.sh` makes (at `TALLY_SCHEMATHESIS_VENV` if set).
fn schemathesis() -> PathBuf {
    std::env::var_os("TALLY_SCHEMATHESIS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME"))
                .join(".cache/tally/schemathesis-venv")
        })
        .join("bin/st")
}

/// What is checked on every answer.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
                      response_headers_conformance,response_schema_conformance,ignored_auth";
/// Examples per operation and phase; the run is repeated by `make test`, not made longer.
const MAX_EXAMPLES: &str = "12";
/// Longest all runs together may take before the test counts as failed: about 75 s on an
/// idle machine, and a Python tool on two cores shared with the rest of the suite can take
/// several times that; the limit only stops a run that hangs.
const RUNS_LIMIT: Duration = Duration::from_secs(420);

/// One schemathesis run: the operations whose path matches `paths`, sent with `key`.
struct Run<'a> {
    name: &'a str,
    base: String,
    key: &'a str,
    paths: &'a str,
}

/// Runs schemathesis; returns whether it passed, and its output.
async fn attack(run: &Run<'_>, deadline: Instant) -> (bool, String) {
    let st = schemathesis();
    assert!(
        st.exists(),
        "{} is missing: run deploy/local/fuzz-prereqs.sh (`make test` does)",
        st.display()
    );
    // Its working folder, where it keeps a cache, outside the checkout.
    let work =
        PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/tally/schemathesis");
    std::fs::create_dir_all(&work).expect("schemathesis folder");
    let mut cmd = tokio::process::Command::new(&st);
    cmd.current_dir(&work);
    cmd.args(["--no-color", "run"])
        .arg(format!("{}/openapi.json", run.base))
        .args(["--url", &run.base])
        .args(["--header", &format!("Authorization: Bearer {}", run.key)])
        .args(["--include-path-regex", run.paths])
        .args(["--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        // One worker: hypothesis describing its strategies from two threads at once fails
        // ("AST constructor recursion depth mismatch").
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--suppress-health-check", "all"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Ok(seed) = std::env::var("TALLY_SCHEMATHESIS_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let started = Instant::now();
    let out = tokio::time::timeout_at(deadline.into(), cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "schemathesis `{}`: the runs took over {RUNS_LIMIT:?} together",
                run.name
            )
        })
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "schemathesis `{}` ({:.0?}, {}):\n{text}",
        run.name,
        started.elapsed(),
        out.status
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_apis_answer_as_their_openapi_says() {
    let TestEnv { pool, common } = test_env().await;
    // With SSO on (a secret key), as a deployment that offers it.
    let ingest = start_ingest(&common, |c| c.common.secret_key = "5a".repeat(32)).await;
    let projector = start_projector(&common).await;
    let query = start_query(&common, |c| c.jwks_url = ingest.jwks_url()).await;
    let t = create_tenant(&pool, "schema").await;
    // Thousands of requests a minute: the rate limit is not what is tested here.
    ingest_api::control::store::set_plan(&pool, t.id, "enterprise", Some(100_000))
        .await
        .expect("plan");
    let (_, admin_key) =
        ingest_api::control::store::create_api_key(&pool, "", t.id, Scope::Admin, "schema-admin")
            .await
            .expect("admin key");
    let operator_key = ingest_api::control::store::create_operator_key(&pool, "schema-operator")
        .await
        .expect("operator key");

    // An owner, for the routes only a person's access token opens.
    let email = format!("owner-{}@schema.example", t.id.0.simple());
    let (email, password) = (email.as_str(), "Owner passphrase 42");
    create_person(&pool, t.id, email, password, shared::jwt::Role::Owner).await;
    let tokens: serde_json::Value = login(&http(), &ingest.url(), email, password)
        .await
        .json()
        .await
        .unwrap();
    let access = tokens["access_token"].as_str().expect("access token");

    let runs = [
        Run {
            name: "ingest doors",
            base: ingest.url(),
            key: &t.ingest_key,
            // Remote write is snappy protobuf only, which schemathesis cannot generate; the
            // `promrw` fuzz target and e2e test cover it.
            paths: "^/(v1/events|api/v2/write|v1/otlp/)",
        },
        Run {
            name: "tenant administration",
            base: ingest.url(),
            key: &admin_key,
            paths: "^/v1/admin/(users|api-keys|teams|invitations|sso|settings|channels|budgets|rules|firings|deliveries)",
        },
        Run {
            name: "operator",
            base: ingest.url(),
            key: &operator_key,
            paths: "^/v1/admin/tenants",
        },
        Run {
            name: "ingest-api, no key needed",
            base: ingest.url(),
            key: &t.read_key,
            paths: "^/(v1/auth/|openapi.json|healthz|readyz|metrics|\\.well-known/)",
        },
        Run {
            name: "query-api's audit log, as its owner",
            base: query.url(),
            key: access,
            paths: "^/v1/audit",
        },
        // Last: a password change or logging out everywhere ends the owner's tokens.
        Run {
            name: "ingest-api, as the tenant's owner",
            base: ingest.url(),
            key: access,
            paths: "^/v1/(admin/(users|teams|invitations|sso)|auth/(logout-all|password))",
        },
        // The live feed never ends an answer; the stream tests cover it.
        Run {
            name: "query-api",
            base: query.url(),
            key: &t.read_key,
            paths: "^/(?!v1/stream)",
        },
    ];
    let mut failed = Vec::new();
    let deadline = Instant::now() + RUNS_LIMIT;
    for run in &runs {
        let (passed, output) = attack(run, deadline).await;
        if !passed {
            failed.push(format!("--- {} ---\n{output}", run.name));
        }
    }
    assert!(
        failed.is_empty(),
        "schemathesis found answers the spec does not allow:\n{}",
        failed.join("\n")
    );
    stop_all([query, projector, ingest]).await;
}

/// Found by schemathesis: a repeated query parameter on the SSO routes was answered by axum's
/// plain-text rejection instead of a problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_sso_query_is_a_problem() {
    init_logs();
    let common = common_for_test();
    let ingest = start_ingest(&common, |_| {}).await;
    for path in ["start", "callback"] {
        let res = http()
            .get(format!(
                "{}/v1/auth/sso/{path}?tenant=a&tenant=b&state=c&state=d",
                ingest.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{path}");
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
        let problem: serde_json::Value = res.json().await.unwrap();
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("duplicate field"),
            "{problem}"
        );
    }
    ingest.stop().await.unwrap();
}

/// Found by schemathesis: NUL in a text filter reached PostgreSQL, which refused the query,
/// and the sender's mistake was answered 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_a_query_parameter_is_a_400_naming_it() {
    let TestEnv { pool, common } = test_env().await;
    let projector = start_projector(&common).await;
    let query = start_query(&common, |_| {}).await;
    let t = create_tenant(&pool, "schema-nul").await;
    for (path, param) in [
        ("/v1/dashboard/activity?status=a%00b", "status"),
        ("/v1/dashboard/activity?user=%00", "user"),
        ("/v1/dashboard/metrics?name=x&match%00=1", "match\\0"),
    ] {
        let res = http()
            .get(format!("{}{path}", query.url()))
            .bearer_auth(&t.read_key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{path}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], param, "{problem}");
    }
    stop_all([query, projector]).await;
}

/// Found by schemathesis: NUL in a control-plane body reached PostgreSQL, which refused the
/// write, and the sender's mistake was answered 500. Found by reading since: a body declared
/// `application/*+json` (which axum's `Json` takes too) passed the check, and NUL in a path or
/// query reached PostgreSQL as well (500; 503 on the unauthenticated login).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_in_a_control_plane_body_is_a_422_naming_it() {
    let TestEnv { pool, common } = test_env().await;
    let ingest = start_ingest(&common, |_| {}).await;
    let t = create_tenant(&pool, "schema-nul-body").await;
    let (_, admin_key) = ingest_api::control::store::create_api_key(
        &pool,
        "",
        t.id,
        Scope::Admin,
        "schema-nul-admin",
    )
    .await
    .expect("admin key");
    for (method, path, body, field) in [
        (
            "POST",
            "/v1/admin/api-keys",
            r#"{"scope": "read", "name": "a\u0000b"}"#,
            "name",
        ),
        (
            "PUT",
            "/v1/admin/teams/platform",
            r#"{"name": "Platform", "members": ["\u0000"]}"#,
            "members[0]",
        ),
        (
            "POST",
            "/v1/auth/login",
            r#"{"email": "\u0000@example.com", "password": "x"}"#,
            "email",
        ),
    ] {
        for content_type in [
            "application/json",
            "application/x+json",
            "Application/Vnd.Example+JSON; charset=utf-8",
        ] {
            let res = http()
                .request(method.parse().unwrap(), format!("{}{path}", ingest.url()))
                .bearer_auth(&admin_key)
                .header("content-type", content_type)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 422, "{path} as {content_type}");
            let problem: serde_json::Value = res.json().await.unwrap();
            assert_eq!(problem["errors"][0]["field"], field, "{problem}");
        }
    }
    // NUL in a path or a query: refused before any handler reads it.
    for (method, path, field) in [
        ("PUT", "/v1/admin/teams/a%00b", "path"),
        ("DELETE", "/v1/admin/teams/a%00b", "path"),
        ("GET", "/v1/admin/users?cursor=%00", "query"),
        ("GET", "/v1/auth/sso/start?tenant=%00", "query"),
    ] {
        let res = http()
            .request(method.parse().unwrap(), format!("{}{path}", ingest.url()))
            .bearer_auth(&admin_key)
            .json(&serde_json::json!({"name": "Platform", "members": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 422, "{method} {path}");
        let problem: serde_json::Value = res.json().await.unwrap();
        assert_eq!(problem["errors"][0]["field"], field, "{problem}");
    }
    let keys: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM control.api_keys WHERE tenant_id = $1 AND name LIKE 'a%b'",
    )
    .bind(t.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(keys, 0, "nothing was written");
    ingest.stop().await.unwrap();
}
