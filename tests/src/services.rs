//! Tally's services under test: started in this process (`start_*`, each on port 0 and
//! stopped gracefully), or as the real binaries in child processes that a test may kill,
//! watch the memory of, or run subcommands of.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::config::Common;
use shared::tenant::TenantId;
use tokio::sync::oneshot;

use crate::client::http;
use crate::environment::env_or;
use crate::infrastructure::free_port;

/// A running service started in this process; dropping the handle does not stop it,
/// `stop` does (gracefully).
pub struct Running {
    pub addr: SocketAddr,
    /// ingest-api's OTLP/gRPC listener.
    pub grpc_addr: Option<SocketAddr>,
    /// ingest-api's and query-api's operations port (health and metrics apart).
    pub operations_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where ingest-api publishes the keys its access tokens are signed with (for query-api's
    /// `jwks_url`).
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.url())
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.await?
    }
}

/// Stops services gracefully, one after the other, and panics unless each stopped cleanly.
pub async fn stop_all(services: impl IntoIterator<Item = Running>) {
    for service in services {
        service.stop().await.expect("the service stops cleanly");
    }
}

/// What a service's `run_until` waits for: [`Running::stop`].
type Stop = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Running {
    /// Spawns a built service: `run_until` runs it until [`Running::stop`].
    fn spawn<F>(
        addr: SocketAddr,
        grpc_addr: Option<SocketAddr>,
        run_until: impl FnOnce(Stop) -> F,
    ) -> Running
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let stop: Stop = Box::pin(async move {
            let _ = rx.await;
        });
        Running {
            addr,
            grpc_addr,
            operations_addr: None,
            stop: Some(tx),
            task: tokio::spawn(run_until(stop)),
        }
    }
}

pub async fn start_ingest(common: &Common, tweak: impl FnOnce(&mut ingest_api::Config)) -> Running {
    let mut config = ingest_api::Config {
        common: common.clone(),
        http_addr: "127.0.0.1:0".into(),
        grpc_addr: "127.0.0.1:0".into(),
        operations_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    tweak(&mut config);
    let app = ingest_api::App::build(config)
        .await
        .expect("ingest-api builds");
    let operations_addr = app.operations_addr();
    let mut running = Running::spawn(app.local_addr(), app.grpc_addr(), |stop| {
        app.run_until(stop)
    });
    running.operations_addr = operations_addr;
    running
}

pub async fn start_query(common: &Common, tweak: impl FnOnce(&mut query_api::Config)) -> Running {
    let mut config = query_api::Config {
        common: common.clone(),
        http_addr: "127.0.0.1:0".into(),
        operations_addr: "127.0.0.1:0".into(),
        ..Default::default()
    };
    tweak(&mut config);
    let app = query_api::App::build(config)
        .await
        .expect("query-api builds");
    let operations_addr = app.operations_addr();
    let mut running = Running::spawn(app.local_addr(), None, |stop| app.run_until(stop));
    running.operations_addr = operations_addr;
    running
}

pub fn projector_config(common: &Common) -> projector::Config {
    projector::Config {
        common: common.clone(),
        consumer_group: format!("{}projector", common.topic_prefix),
        http_addr: "127.0.0.1:0".into(),
        consumer_session_timeout_ms: 6000,
        // Folding the rollup deltas often, so that every test runs beside the compactor.
        compact_interval_ms: 300,
        ..Default::default()
    }
}

pub async fn start_projector(common: &Common) -> Running {
    start_projector_with(common, |_| {}).await
}

/// The projector with the tests' settings ([`projector_config`]) as `tweak` changes them.
pub async fn start_projector_with(
    common: &Common,
    tweak: impl FnOnce(&mut projector::Config),
) -> Running {
    let mut config = projector_config(common);
    tweak(&mut config);
    let app = projector::App::build(config)
        .await
        .expect("projector builds");
    Running::spawn(app.local_addr(), None, |stop| app.run_until(stop))
}

/// ingest-api and the projector with their default settings, as `(ingest, projector)`: the
/// write path most tests run (a test wanting query-api starts it beside, with its own settings).
pub async fn start_write_path(common: &Common) -> (Running, Running) {
    let ingest = start_ingest(common, |_| {}).await;
    let projector = start_projector(common).await;
    (ingest, projector)
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
        .env("TALLY_SECRET_KEY", &c.common.secret_key)
        .env(
            "TALLY_NOTIFY_ALLOW_LOOPBACK",
            c.common.notify_allow_loopback.to_string(),
        )
        .env(
            "TALLY_DB_MAX_CONNECTIONS",
            c.common.db_max_connections.to_string(),
        )
        .env("RUST_LOG", env_or("RUST_LOG", "warn"))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
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

/// The pid in a service's pid file (`deploy/local/services.sh` writes them), checked to be a
/// running process named `service`: a stale file whose pid now belongs to another process is
/// an error, not a process to measure or signal.
pub fn service_pid(file: &std::path::Path, service: &str) -> anyhow::Result<u32> {
    use anyhow::Context as _;
    let pid: u32 = std::fs::read_to_string(file)
        .with_context(|| format!("reading {}", file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("{} holds no pid", file.display()))?;
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    anyhow::ensure!(
        name.trim_end() == service,
        "{service} (pid {pid} in {}) is not running",
        file.display()
    );
    Ok(pid)
}

/// `VmRSS` and `VmHWM` of a live process, in KiB.
pub fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Most resident memory (KiB) ingest-api may reach while it refuses the memory bombs of
/// `influx.rs` and `promrw.rs`: its own start (about 20 MiB, debug build) plus a 10 MiB body
/// read, decompressed and parsed (measured: 33–45 MiB at the peak).
pub const BOMB_RSS_BOUND_KIB: u64 = 96 * 1024;

/// ingest-api in its own process for a memory-bomb test, and its resident memory (KiB) once
/// started: it is killed above four times [`BOMB_RSS_BOUND_KIB`], so a regression fails the
/// test instead of exhausting the machine; [`crate::assert_bomb_memory_bound`] checks the peak.
pub async fn spawn_bomb_target(common: &Common, env: &[(&str, &str)]) -> (IngestProcess, u64) {
    let ingest = spawn_ingest_process(common, env).await;
    ingest.kill_above(4 * BOMB_RSS_BOUND_KIB);
    let (started_rss, _) = ingest.memory_kib();
    (ingest, started_rss)
}

/// Runs `projector replay --tenant <tenant> --json` (the real binary) with the given grace
/// before the old version is dropped; returns its report and what it printed on stderr
/// (the progress lines). Panics if the replay fails. One replay runs at a time in a database
/// (an advisory lock): while another test's replay runs, this one is started again, for up
/// to five minutes.
pub async fn run_replay(common: &Common, tenant: TenantId, grace_secs: u64) -> (Value, String) {
    let started = Instant::now();
    let (out, stderr) = loop {
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
        if !out.status.success()
            && stderr.contains("another replay is running")
            && started.elapsed() < Duration::from_secs(300)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        break (out, stderr);
    };
    assert!(out.status.success(), "replay failed: {stderr}");
    let report = serde_json::from_slice(&out.stdout).expect("replay report");
    (report, stderr)
}

#[cfg(test)]
mod pid_file_tests {
    use super::service_pid;

    #[test]
    fn a_pid_file_names_a_running_process_of_that_name_or_is_refused() {
        let dir = std::env::temp_dir().join(format!("tally-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("svc.pid");
        let me = std::process::id();
        let my_name = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        std::fs::write(&file, format!("{me}\n")).unwrap();
        assert_eq!(service_pid(&file, my_name.trim_end()).unwrap(), me);
        // The same pid under another service's name: a stale file, not a process to signal.
        let err = service_pid(&file, "projector").unwrap_err().to_string();
        assert!(err.contains("is not running"), "{err}");
        std::fs::write(&file, "not a pid").unwrap();
        assert!(service_pid(&file, "projector").is_err());
        assert!(service_pid(&dir.join("missing.pid"), "projector").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
