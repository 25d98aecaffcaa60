//! The environment tests run in: the repository, the shared servers' settings (each test on
//! topics of its own), the test database, logs, and tenants with keys.

use std::path::{Path, PathBuf};

use shared::apikey::Scope;
use shared::config::Common;
use shared::jwt::Role;
use shared::tenant::TenantId;
use sqlx::PgPool;
use uuid::Uuid;

/// Repository root (the tests crate lives one level below it). Taken at run time (cargo
/// sets `CARGO_MANIFEST_DIR` for the tests it runs): the build directory is shared between
/// checkouts, and a library built in another checkout must not send the tests there.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The Python of the OpenTelemetry virtualenv `deploy/local/test-clients.sh` makes (at
/// `TALLY_OTEL_VENV` if set).
pub fn otel_python() -> PathBuf {
    std::env::var_os("TALLY_OTEL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/tally/otel-venv")
        })
        .join("bin/python")
}

/// Runs `tests/clients/claude_code_otel.py` (Claude-Code-shaped telemetry through the Python
/// OTel SDK, HTTP/protobuf) against ingest-api at `ingest` with `key` and `args`; panics unless
/// it succeeds, and returns what it printed (what it sent, as JSON).
pub async fn send_claude_code_telemetry(
    ingest: &str,
    key: &str,
    args: &[&str],
) -> serde_json::Value {
    let endpoint = format!("{ingest}/v1/otlp");
    let mut cmd = std::process::Command::new(otel_python());
    cmd.arg(repo_root().join("tests/clients/claude_code_otel.py"))
        .args([
            "--endpoint",
            &endpoint,
            "--key",
            key,
            "--encoding",
            "protobuf",
        ])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the SDK task")
        .expect("the OTel virtualenv exists (deploy/local/test-clients.sh)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints what it sent")
}

/// Runs the Claude Code hook script (`deploy/claude-code/tally-hook.mjs`) with the real
/// `node` and `envs`, feeding it `input` as Claude Code does; returns (exit ok, stdout, time).
pub fn run_hook(
    envs: &[(&str, &str)],
    input: &serde_json::Value,
) -> (bool, String, std::time::Duration) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let started = std::time::Instant::now();
    let mut child = Command::new("node")
        .arg(repo_root().join("deploy/claude-code/tally-hook.mjs"))
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        started.elapsed(),
    )
}

pub(crate) fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

/// The name of the database the tests use: `TALLY_TEST_DB`, by default `tally_test` (a
/// second checkout testing beside `make test` picks another, since `make test` drops this one).
pub fn test_database_name() -> String {
    let name = env_or("TALLY_TEST_DB", "tally_test");
    assert!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "TALLY_TEST_DB must be a plain identifier"
    );
    name
}

/// The database the tests use: [`test_database_name`] beside the configured one.
pub fn test_database_url() -> String {
    let url = env_or(
        "TALLY_DATABASE_URL",
        "postgres://tally:tally@127.0.0.1:55432/tally",
    );
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{}", test_database_name()),
        None => url,
    }
}

/// Settings for one test: its own topic prefix, the shared servers.
pub fn common_for_test() -> Common {
    let prefix = format!("t{}.", Uuid::new_v4().simple());
    Common {
        database_url: test_database_url(),
        db_max_connections: 8,
        redis_url: env_or("TALLY_REDIS_URL", "redis://127.0.0.1:56379"),
        kafka_brokers: env_or("TALLY_KAFKA_BROKERS", "127.0.0.1:59092"),
        topic_prefix: prefix,
        kafka_partitions: 4,
        kafka_replication_factor: 1,
        log_format: "pretty".into(),
        secret_key: "7e".repeat(32),
        // The tests' webhook receivers listen on 127.0.0.1.
        notify_allow_loopback: true,
        notify_allow_private: false,
    }
}

/// Creates the test database once and applies the migrations.
pub async fn test_pool() -> PgPool {
    let url = test_database_url();
    let admin_url = env_or(
        "TALLY_DATABASE_URL",
        "postgres://tally:tally@127.0.0.1:55432/tally",
    );
    let admin = PgPool::connect(&admin_url)
        .await
        .expect("PostgreSQL is up (run `make up` or deploy/local/up.sh)");
    let name = test_database_name();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .expect("query pg_database");
    if !exists {
        // Parallel tests race here; losing the race is fine.
        let create = format!("CREATE DATABASE {name}");
        let _ = sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&admin)
            .await;
    }
    admin.close().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await
        .expect("connect to the test database");
    projector::migrate(&pool, projector::schema::timescale::Timescale::Auto)
        .await
        .expect("migrations");
    pool
}

/// Logs for tests: warnings and errors only, unless `RUST_LOG` says otherwise.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_none() {
        // Before any service starts: the default (info) drowns test output.
        std::env::set_var("RUST_LOG", "warn");
    }
    shared::telemetry::init_tracing("pretty");
}

/// What nearly every test starts from: logs set up, the test database, topics of its own.
pub struct TestEnv {
    pub pool: PgPool,
    pub common: Common,
}

/// Sets up logs, the test database and this test's settings ([`common_for_test`]).
pub async fn test_env() -> TestEnv {
    init_logs();
    TestEnv {
        pool: test_pool().await,
        common: common_for_test(),
    }
}

/// A tenant with an ingest and a read key.
#[derive(Debug, Clone)]
pub struct TestTenant {
    pub id: TenantId,
    pub ingest_key: String,
    pub read_key: String,
}

/// Creates a person of `tenant` who logs in with `email` and `password`, with no identity
/// provider's link and no team; returns their user id.
pub async fn create_person(
    pool: &PgPool,
    tenant: TenantId,
    email: &str,
    password: &str,
    role: Role,
) -> Uuid {
    ingest_api::control::store::create_user(
        pool,
        "",
        ingest_api::control::store::NewUser {
            tenant,
            email,
            password,
            role,
            external_id: None,
            teams: &[],
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create {email}: {e:#}"))
}

/// The password of every person [`create_member`] makes.
pub const MEMBER_PASSWORD: &str = "Sturdy-Pass-42";

/// The e-mail address of `t`'s member `ext` (addresses are unique across tenants).
pub fn member_email(t: &TestTenant, ext: &str) -> String {
    format!("{ext}@{}.example.com", t.id)
}

/// Creates a person of `t` whose events carry the user id `ext`, with `role` and `teams`,
/// who signs in with [`member_email`] and [`MEMBER_PASSWORD`]; returns their user id.
pub async fn create_member(
    pool: &PgPool,
    t: &TestTenant,
    ext: &str,
    role: Role,
    teams: &[&str],
) -> Uuid {
    let teams: Vec<String> = teams.iter().map(|s| s.to_string()).collect();
    let email = member_email(t, ext);
    ingest_api::control::store::create_user(
        pool,
        "",
        ingest_api::control::store::NewUser {
            tenant: t.id,
            email: &email,
            password: MEMBER_PASSWORD,
            role,
            external_id: Some(ext),
            teams: &teams,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("create {email}: {e:#}"))
}

/// Signs `t`'s member `ext` in at `ingest`; their access token.
pub async fn member_token(
    client: &reqwest::Client,
    ingest: &str,
    t: &TestTenant,
    ext: &str,
) -> String {
    let res = crate::login(client, ingest, &member_email(t, ext), MEMBER_PASSWORD).await;
    assert_eq!(res.status(), 200, "{ext} signs in");
    let body: serde_json::Value = res.json().await.expect("a JSON answer");
    body["access_token"]
        .as_str()
        .expect("an access token")
        .to_string()
}

/// Creates a tenant with keys of both scopes.
pub async fn create_tenant(pool: &PgPool, name: &str) -> TestTenant {
    let id = ingest_api::control::store::create_tenant(pool, "", name)
        .await
        .expect("tenant");
    let (_, ingest_key) =
        ingest_api::control::store::create_api_key(pool, "", id, Scope::Ingest, "test-ingest")
            .await
            .expect("ingest key");
    let (_, read_key) =
        ingest_api::control::store::create_api_key(pool, "", id, Scope::Read, "test-read")
            .await
            .expect("read key");
    TestTenant {
        id,
        ingest_key,
        read_key,
    }
}

/// Rate limits count in fixed one-minute windows: this starts a burst early in a window, so
/// that it does not straddle two (past the 45th second it waits for the next minute).
pub async fn at_window_start() {
    let secs = chrono::Utc::now().timestamp().rem_euclid(60);
    if secs > 45 {
        tokio::time::sleep(std::time::Duration::from_secs((61 - secs) as u64)).await;
    }
}
