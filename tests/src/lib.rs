//! The end-to-end harness: starts Tally's services against the real Kafka, PostgreSQL and
//! Redis that `deploy/local/up.sh` runs, each test on its own topics and tenants so tests
//! run in parallel without stepping on each other.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use shared::apikey::Scope;
use shared::config::Common;
use shared::tenant::TenantId;
use sqlx::PgPool;
use tokio::sync::oneshot;
use uuid::Uuid;

pub mod events;
pub mod oidc;

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

fn env_or(key: &str, default: &str) -> String {
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
        timescale: shared::config::Timescale::Auto,
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
    shared::db::migrate(&pool, shared::config::Timescale::Auto)
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

/// A tenant with an ingest and a read key.
#[derive(Debug, Clone)]
pub struct TestTenant {
    pub id: TenantId,
    pub ingest_key: String,
    pub read_key: String,
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

/// A running service started in this process; dropping the handle does not stop it,
/// `stop` does (gracefully).
pub struct Running {
    pub addr: SocketAddr,
    /// ingest-api's OTLP/gRPC listener.
    pub grpc_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await?
    }
}

fn stopper() -> (
    oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

pub async fn start_ingest(common: &Common, tweak: impl FnOnce(&mut ingest_api::Config)) -> Running {
    let mut config = ingest_api::Config {
        common: common.clone(),
        http_addr: "127.0.0.1:0".into(),
        grpc_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    tweak(&mut config);
    let app = ingest_api::App::build(config)
        .await
        .expect("ingest-api builds");
    let addr = app.local_addr();
    let grpc_addr = app.grpc_addr();
    let (tx, stop) = stopper();
    let task = tokio::spawn(app.run_until(stop));
    Running {
        addr,
        grpc_addr,
        stop: Some(tx),
        task,
    }
}

pub async fn start_query(common: &Common, tweak: impl FnOnce(&mut query_api::Config)) -> Running {
    let mut config = query_api::Config {
        common: common.clone(),
        http_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    tweak(&mut config);
    let app = query_api::App::build(config)
        .await
        .expect("query-api builds");
    let addr = app.local_addr();
    let (tx, stop) = stopper();
    let task = tokio::spawn(app.run_until(stop));
    Running {
        addr,
        grpc_addr: None,
        stop: Some(tx),
        task,
    }
}

pub fn projector_config(common: &Common) -> projector::Config {
    projector::Config {
        common: common.clone(),
        consumer_group: format!("{}projector", common.topic_prefix),
        http_addr: "127.0.0.1:0".into(),
        consumer_session_timeout_ms: 6000,
        ..Default::default()
    }
}

pub async fn start_projector(common: &Common) -> Running {
    let app = projector::App::build(projector_config(common))
        .await
        .expect("projector builds");
    let addr = app.local_addr();
    let (tx, stop) = stopper();
    let task = tokio::spawn(app.run_until(stop));
    Running {
        addr,
        grpc_addr: None,
        stop: Some(tx),
        task,
    }
}

/// The directory holding the workspace's binaries (beside this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A child process that is SIGKILLed when dropped, so a failing test leaves none behind.
pub struct Proc(pub Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns the real `projector` binary as a child process (so it can be SIGKILLed).
pub fn spawn_projector_process(common: &Common) -> Proc {
    Proc(
        projector_command(common, &["run"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn projector"),
    )
}

/// The real `projector` binary with `args`, configured for `common` (stdin closed, stderr
/// inherited).
pub fn projector_command(common: &Common, args: &[&str]) -> Command {
    let bin = bin_dir().join("projector");
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `make test` does)",
        bin.display()
    );
    let c = projector_config(common);
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("TALLY_DATABASE_URL", &c.common.database_url)
        .env("TALLY_REDIS_URL", &c.common.redis_url)
        .env("TALLY_KAFKA_BROKERS", &c.common.kafka_brokers)
        .env("TALLY_TOPIC_PREFIX", &c.common.topic_prefix)
        .env(
            "TALLY_KAFKA_PARTITIONS",
            c.common.kafka_partitions.to_string(),
        )
        .env("TALLY_CONSUMER_GROUP", &c.consumer_group)
        .env(
            "TALLY_CONSUMER_SESSION_TIMEOUT_MS",
            c.consumer_session_timeout_ms.to_string(),
        )
        .env("TALLY_HTTP_ADDR", "127.0.0.1:0")
        .env(
            "TALLY_DB_MAX_CONNECTIONS",
            c.common.db_max_connections.to_string(),
        )
        .env("RUST_LOG", env_or("RUST_LOG", "warn"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// An HTTP client for the tests.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// POSTs a JSON body to ingest-api with an API key.
pub async fn post_events(
    client: &reqwest::Client,
    ingest: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    client
        .post(format!("{ingest}/v1/events"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("POST /v1/events")
}

/// GETs a dashboard answer with a read key; panics unless it is a 200.
pub async fn get_json(client: &reqwest::Client, url: &str, key: &str) -> Value {
    let res = client.get(url).bearer_auth(key).send().await.expect("GET");
    let status = res.status();
    let body: Value = res.json().await.expect("JSON body");
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// Waits until the tenant's projection holds `expected` events (or panics after `timeout`).
pub async fn wait_projected(
    pool: &PgPool,
    tenant: TenantId,
    expected: i64,
    timeout: Duration,
) -> i64 {
    let deadline = Instant::now() + timeout;
    let mut seen = 0;
    loop {
        let n: Option<i64> = projected_events(pool, tenant).await;
        if let Some(n) = n {
            seen = n;
            if n >= expected {
                return n;
            }
        }
        assert!(
            Instant::now() < deadline,
            "tenant {tenant}: {seen} of {expected} events projected after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The projection version the read side serves for a tenant.
pub async fn active_version(pool: &PgPool, tenant: TenantId) -> i32 {
    let mut conn = pool.acquire().await.expect("connection");
    shared::tenant_sql::active_versions(&mut conn, &[tenant], shared::tenant_sql::Lock::None)
        .await
        .expect("tenant_versions")[&tenant]
}

/// Events the tenant's active projection counts, or `None` before its schema exists.
pub async fn projected_events(pool: &PgPool, tenant: TenantId) -> Option<i64> {
    let schema = tenant.schema(active_version(pool, tenant).await);
    let sql = format!("SELECT events FROM {schema}.projection_state");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .ok()
}

/// Runs a read-only SQL statement in the tenant's active schema and returns a single i64.
pub async fn scalar_in_tenant(pool: &PgPool, tenant: TenantId, sql: &str) -> i64 {
    let version = active_version(pool, tenant).await;
    let mut tx = pool.begin().await.expect("tx");
    shared::tenant_sql::set_search_path(&mut tx, &tenant.schema(version))
        .await
        .expect("search_path");
    let v: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    v.unwrap_or(0)
}

/// Whether the tenant's active schema keeps its raw tables in TimescaleDB hypertables
/// (rather than native daily partitions).
pub async fn tenant_uses_timescale(pool: &PgPool, tenant: TenantId) -> bool {
    let version = active_version(pool, tenant).await;
    let mut conn = pool.acquire().await.expect("conn");
    shared::tenant_sql::uses_timescale(&mut conn, &tenant.schema(version))
        .await
        .expect("tenant_schemas")
}

/// The days (UTC) for which `table` of the tenant's active schema has raw storage: its daily
/// partitions on plain PostgreSQL, its one-day chunks with TimescaleDB. The one place tests
/// look at storage units, so they hold on both paths.
pub async fn raw_storage_days(
    pool: &PgPool,
    tenant: TenantId,
    table: &str,
) -> std::collections::BTreeSet<chrono::NaiveDate> {
    let schema = tenant.schema(active_version(pool, tenant).await);
    let starts: Vec<DateTime<Utc>> = if tenant_uses_timescale(pool, tenant).await {
        sqlx::query_scalar(
            "SELECT range_start FROM timescaledb_information.chunks
              WHERE hypertable_schema = $1 AND hypertable_name = $2",
        )
        .bind(schema.as_str())
        .bind(table)
        .fetch_all(pool)
        .await
        .expect("chunks")
    } else {
        // The lower bound of each partition: `FOR VALUES FROM ('…') TO ('…')`.
        let bounds: Vec<String> = sqlx::query_scalar(
            "SELECT pg_get_expr(c.relpartbound, c.oid)
               FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid
               JOIN pg_class p ON p.oid = i.inhparent
               JOIN pg_namespace n ON n.oid = p.relnamespace
              WHERE n.nspname = $1 AND p.relname = $2",
        )
        .bind(schema.as_str())
        .bind(table)
        .fetch_all(pool)
        .await
        .expect("partitions");
        bounds
            .iter()
            .map(|b| {
                let from = b.split('\'').nth(1).unwrap_or_else(|| panic!("bound {b}"));
                DateTime::parse_from_str(from, "%Y-%m-%d %H:%M:%S%#z")
                    .unwrap_or_else(|e| panic!("bound {b}: {e}"))
                    .with_timezone(&Utc)
            })
            .collect()
    };
    starts.into_iter().map(|t| t.date_naive()).collect()
}

/// A free loopback port (for a private Kafka broker).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A private single-node Kafka broker (`deploy/local/kafka-node.sh`) that a test may kill
/// and restart on the same data directory.
pub struct PrivateKafka {
    pub dir: PathBuf,
    pub port: u16,
    pub controller_port: u16,
    child: Option<Child>,
}

impl PrivateKafka {
    pub fn new() -> PrivateKafka {
        let dir = std::env::temp_dir().join(format!("tally-kafka-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("kafka dir");
        PrivateKafka {
            dir,
            port: free_port(),
            controller_port: free_port(),
            child: None,
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the broker and waits until it accepts connections.
    pub async fn start(&mut self) {
        let script = repo_root().join("deploy/local/kafka-node.sh");
        let log = std::fs::File::create(self.dir.join("stdout.log")).expect("log file");
        let child = Command::new("bash")
            .arg(script)
            .arg(&self.dir)
            .arg(self.port.to_string())
            .arg(self.controller_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn kafka-node.sh");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                break;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "private kafka exited with {status}; see {}",
                    self.dir.display()
                );
            }
            assert!(
                Instant::now() < deadline,
                "private kafka did not start; see {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILLs the broker.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Default for PrivateKafka {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway PostgreSQL server (`deploy/local/pg-node.sh`) a test may crash and restart.
pub struct PrivatePostgres {
    pub dir: PathBuf,
    pub port: u16,
}

impl PrivatePostgres {
    /// Creates and starts it.
    pub fn start() -> PrivatePostgres {
        let dir = std::env::temp_dir().join(format!("tally-pg-{}", Uuid::new_v4().simple()));
        let pg = PrivatePostgres {
            dir,
            port: free_port(),
        };
        pg.run("start");
        pg
    }

    fn run(&self, cmd: &str) {
        let port = self.port.to_string();
        let mut args = vec![cmd, self.dir.to_str().expect("utf-8 path")];
        if cmd == "start" {
            args.push(&port);
        }
        let status = Command::new("bash")
            .arg(repo_root().join("deploy/local/pg-node.sh"))
            .args(&args)
            .stdin(Stdio::null())
            .status()
            .expect("run pg-node.sh");
        assert!(status.success(), "pg-node.sh {cmd} failed");
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it without a checkpoint (like a crash) and starts it again (recovery).
    pub fn crash_and_restart(&self, down_for: Duration) {
        self.run("crash");
        std::thread::sleep(down_for);
        self.run("start");
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.run("stop");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private Redis server a test may kill and start again on the same port.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        let mut r = PrivateRedis {
            port: free_port(),
            child: None,
        };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) and waits until it accepts connections.
    pub fn up(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `now` minus some seconds, RFC 3339.
pub fn ago(secs: i64) -> String {
    (Utc::now() - chrono::Duration::seconds(secs)).to_rfc3339()
}

/// Asserts that a tenant's projection holds exactly what was sent: as many raw rows, and in
/// every rollup (minute, hour, day) the counts per event type, command errors and
/// durations, agent tokens, tool errors, and a duration histogram count per event.
pub async fn assert_projection_exact(pool: &PgPool, tenant: TenantId, exp: &events::Expected) {
    let mut raw = 0;
    for table in shared::tenant_sql::RAW_TABLES {
        raw += scalar_in_tenant(pool, tenant, &format!("SELECT count(*) FROM {table}")).await;
    }
    assert_eq!(raw, exp.total, "{tenant}: raw rows");
    for (event_type, n) in &exp.per_type {
        for rollup in ["activity_1m", "activity_1h", "activity_1d"] {
            let sql = format!(
                "SELECT sum(count)::bigint FROM {rollup} WHERE event_type = '{event_type}'"
            );
            assert_eq!(
                scalar_in_tenant(pool, tenant, &sql).await,
                *n,
                "{tenant}: {rollup} {event_type}"
            );
        }
    }
    for rollup in ["activity_1m", "activity_1h", "activity_1d"] {
        let sum = |what: &str, t: &str| {
            format!(
                "SELECT coalesce(sum({what}), 0)::bigint FROM {rollup} WHERE event_type = '{t}'"
            )
        };
        let checks = [
            (sum("errors", "command.executed"), exp.command_errors),
            (
                sum("duration_sum", "command.executed"),
                exp.command_duration_sum,
            ),
            (
                sum("input_tokens", "agent.interacted"),
                exp.agent_input_tokens,
            ),
            (
                sum("output_tokens", "agent.interacted"),
                exp.agent_output_tokens,
            ),
            (sum("errors", "tool.executed"), exp.tool_errors),
        ];
        let histograms =
            format!("SELECT coalesce(sum(h), 0)::bigint FROM {rollup}, unnest(duration_hist) h");
        for (sql, want) in checks.into_iter().chain([(histograms, exp.total)]) {
            assert_eq!(
                scalar_in_tenant(pool, tenant, &sql).await,
                want,
                "{tenant}: {sql}"
            );
        }
    }
}

/// A timestamp as the API prints it.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339()
}

/// `n` minimal `command.executed` events `days` days before `now`, a minute apart.
pub fn commands_days_ago(now: DateTime<Utc>, days: i64, n: i64) -> Value {
    Value::Array(
        (0..n)
            .map(|i| {
                json!({"type": "command.executed",
                    "occurred_at": (now - chrono::TimeDelta::days(days) - chrono::TimeDelta::minutes(i)).to_rfc3339(),
                    "data": {"user_id": "u", "command_name": "c", "duration_ms": 1, "status": "success"}})
            })
            .collect(),
    )
}

/// Polls a dashboard URL until `stop` is set; counts requests and failures (anything but
/// a 200), and returns every time the total it reads went backwards as (before, after).
/// The total is `events_total` of an overview, or the sum of a time series' counts.
pub fn spawn_poller(
    url: String,
    key: String,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
    polls: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> tokio::task::JoinHandle<(String, Vec<(i64, i64)>)> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let client = http();
        let mut last = 0i64;
        let mut backwards = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            polls.fetch_add(1, Ordering::Relaxed);
            match client.get(&url).bearer_auth(&key).send().await {
                Ok(r) if r.status() == 200 => {
                    let o: Value = r.json().await.expect("JSON answer");
                    let n = match o.get("events_total") {
                        Some(n) => n.as_i64().expect("events_total"),
                        None => o["series"]
                            .as_array()
                            .expect("series")
                            .iter()
                            .flat_map(|s| s["points"].as_array().expect("points"))
                            .map(|p| p["count"].as_i64().expect("count"))
                            .sum(),
                    };
                    if n < last {
                        backwards.push((last, n));
                    }
                    last = last.max(n);
                }
                Ok(r) => {
                    eprintln!(
                        "{url}: {} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    );
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    eprintln!("{url}: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(every).await;
        }
        (url, backwards)
    })
}

/// The sum of every point of a `/v1/dashboard/metrics` answer.
pub fn series_total(m: &Value) -> f64 {
    m["series"]
        .as_array()
        .expect("series")
        .iter()
        .flat_map(|s| s["points"].as_array().expect("points").iter())
        .map(|p| p[1].as_f64().expect("value"))
        .sum()
}

/// A minimal valid `command.executed` event.
pub fn command(user: &str, name: &str, duration_ms: i64, ok: bool) -> Value {
    json!({
        "id": Uuid::now_v7(),
        "type": "command.executed",
        "occurred_at": ago(60),
        "data": {
            "user_id": user,
            "command_name": name,
            "duration_ms": duration_ms,
            "status": if ok { "success" } else { "error" },
        }
    })
}

/// Events the dashboards count for the key's tenant over the last 24 h.
pub async fn dashboard_total(
    client: &reqwest::Client,
    url: &str,
    key: &str,
) -> anyhow::Result<i64> {
    let v: Value = client
        .get(format!("{url}/v1/dashboard/overview?range=24h"))
        .bearer_auth(key)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    v["events_total"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no events_total in the overview: {v}"))
}
/// The real `ingest-api` binary serving one test's settings on a free port, SIGKILLed when
/// dropped: for figures that must be the service's own (its memory), not the test process's.
pub struct IngestProcess {
    pub proc: Proc,
    pub url: String,
    pub addr: SocketAddr,
}

/// Spawns `ingest-api serve` for `common` (with `env` added, e.g. `TALLY_MAX_BODY_BYTES`)
/// and waits until it answers `/healthz`.
pub async fn spawn_ingest_process(common: &Common, env: &[(&str, &str)]) -> IngestProcess {
    let bin = bin_dir().join("ingest-api");
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `make test` does)",
        bin.display()
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .env("TALLY_DATABASE_URL", &common.database_url)
        .env("TALLY_REDIS_URL", &common.redis_url)
        .env("TALLY_KAFKA_BROKERS", &common.kafka_brokers)
        .env("TALLY_TOPIC_PREFIX", &common.topic_prefix)
        .env(
            "TALLY_KAFKA_PARTITIONS",
            common.kafka_partitions.to_string(),
        )
        .env(
            "TALLY_DB_MAX_CONNECTIONS",
            common.db_max_connections.to_string(),
        )
        .env("TALLY_HTTP_ADDR", addr.to_string())
        .env("TALLY_GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", env_or("RUST_LOG", "warn"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut proc = Proc(cmd.spawn().expect("spawn ingest-api"));
    let url = format!("http://{addr}");
    let client = http();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(res) = client.get(format!("{url}/healthz")).send().await {
            if res.status().is_success() {
                break;
            }
        }
        if let Some(status) = proc.try_wait().expect("ingest-api status") {
            panic!("ingest-api exited before serving: {status}");
        }
        assert!(Instant::now() < deadline, "ingest-api did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    IngestProcess { proc, url, addr }
}

impl IngestProcess {
    /// Its resident memory now and at its peak since it started (`VmRSS`, `VmHWM`), in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        memory_kib(self.proc.id()).expect("ingest-api is running")
    }

    /// Kills it as soon as its resident memory passes `kib`, so that a regression fails the
    /// test (its requests break) instead of exhausting the machine.
    pub fn kill_above(&self, kib: u64) {
        let pid = self.proc.id();
        std::thread::spawn(move || {
            while let Some((rss, _)) = memory_kib(pid) {
                if rss > kib {
                    eprintln!("ingest-api passed {kib} KiB of resident memory: killed");
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
    }
}

/// `VmRSS` and `VmHWM` of a live process, in KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Records in the test's metrics topic (the sum of its partitions' high watermarks).
pub async fn metrics_topic_records(common: &Common) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = shared::kafka::client_config(common).create().unwrap();
    let (topic, partitions) = (common.metrics_topic(), common.kafka_partitions);
    tokio::task::spawn_blocking(move || {
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .unwrap()
                    .1
            })
            .sum()
    })
    .await
    .unwrap()
}

/// Most resident memory (KiB) ingest-api may reach while it refuses the memory bombs of
/// `influx.rs` and `promrw.rs`: its own start (about 20 MiB, debug build) plus a 10 MiB body
/// read, decompressed and parsed (measured: 33–45 MiB at the peak).
pub const BOMB_RSS_BOUND_KIB: u64 = 96 * 1024;

/// Runs `projector replay --tenant <tenant> --json` (the real binary) with the given grace
/// before the old version is dropped; returns its report and what it printed on stderr
/// (the progress lines). Panics if the replay fails.
pub async fn run_replay(common: &Common, tenant: TenantId, grace_secs: u64) -> (Value, String) {
    let out = tokio::task::spawn_blocking({
        let common = common.clone();
        let tenant = tenant.to_string();
        move || {
            projector_command(&common, &["replay", "--tenant", &tenant, "--json"])
                .env("TALLY_REPLAY_DROP_GRACE_SECS", grace_secs.to_string())
                .stderr(Stdio::piped())
                .output()
                .expect("run projector replay")
        }
    })
    .await
    .expect("replay task");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay failed: {stderr}");
    let report = serde_json::from_slice(&out.stdout).expect("replay report");
    (report, stderr)
}
