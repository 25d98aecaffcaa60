//! Private infrastructure a test may break: its own Kafka broker, PostgreSQL server or Redis,
//! each on a free port, killed and removed when dropped.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::environment::repo_root;

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

/// A TCP proxy to `target` on a free loopback port that can stop passing bytes, both ways,
/// while it is stalled: a database that stops answering one service (whose connections go
/// through it) while the others go on. Its connections end with the test.
pub struct StallingProxy {
    pub port: u16,
    stalled: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    pub async fn start(target: std::net::SocketAddr) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stalled, watch) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pass(client_read, server_write, watch.clone()));
                tokio::spawn(pass(server_read, client_write, watch.clone()));
            }
        });
        StallingProxy {
            port,
            stalled,
            task,
        }
    }

    /// Holds every byte from now (`true`) or passes them again (`false`).
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, holding what it read while `stalled` says so.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut stalled: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
