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
/// Longest one run may take before it counts as failed.
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// One schemathesis run: the operations whose path matches `paths`, sent with `key`.
struct Run<'a> {
    name: &'a str,
    base: String,
    key: &'a str,
    paths: &'a str,
}

/// Runs schemathesis; returns whether it passed, and its output.
async fn attack(run: &Run<'_>) -> (bool, String) {
    let st = schemathesis();
    assert!(
        st.exists(),
        "{} is missing: run deploy/local/fuzz-prereqs.sh (`make test` does)",
        st.display()
    );
    let mut cmd = tokio::process::Command::new(&st);
    cmd.args(["--no-color", "run"])
        .arg(format!("{}/openapi.json", run.base))
        .args(["--url", &run.base])
        .args(["--header", &format!("Authorization: Bearer {}", run.key)])
        .args(["--include-path-regex", run.paths])
        .args(["--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--workers", "2", "--request-timeout", "10"])
        .args(["--suppress-health-check", "all"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Ok(seed) = std::env::var("TALLY_SCHEMATHESIS_SEED") {
        cmd.args(["--seed", &seed]);
    }
    let started = Instant::now();
    let out = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis `{}` ran over {RUN_LIMIT:?}", run.name))
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
    init_logs();
    let pool = test_pool().await;
    let common = common_for_test();
    let ingest = start_ingest(&common, |_| {}).await;
    let projector = start_projector(&common).await;
    let query = start_query(&common, |_| {}).await;
    let t = create_tenant(&pool, "schema").await;
    let (_, admin_key) =
        ingest_api::admin::create_api_key(&pool, "", t.id, Scope::Admin, "schema-admin")
            .await
            .expect("admin key");
    let operator_key = ingest_api::admin::create_operator_key(&pool, "schema-operator")
        .await
        .expect("operator key");

    let runs = [
        Run {
            name: "ingest doors",
            base: ingest.url(),
            key: &t.ingest_key,
            paths: "^/(v1/events|api/v[12]/write|v1/otlp/)",
        },
        Run {
            name: "tenant administration",
            base: ingest.url(),
            key: &admin_key,
            paths: "^/v1/admin/(users|api-keys|teams|invitations|sso)",
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
        // The live feed never ends an answer; the stream tests cover it.
        Run {
            name: "query-api",
            base: query.url(),
            key: &t.read_key,
            paths: "^/(?!v1/stream)",
        },
    ];
    let mut failed = Vec::new();
    for run in &runs {
        let (passed, output) = attack(run).await;
        if !passed {
            failed.push(format!("--- {} ---\n{output}", run.name));
        }
    }
    assert!(
        failed.is_empty(),
        "schemathesis found answers the spec does not allow:\n{}",
        failed.join("\n")
    );
    query.stop().await.unwrap();
    projector.stop().await.unwrap();
    ingest.stop().await.unwrap();
}
