//! A webhook receiver for the alerting tests: an HTTP server on 127.0.0.1 that keeps every
//! request (headers, body, when) and answers with the status the test sets.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;

/// One request the receiver got, and the status it answered (0: it was held, never answered).
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
    pub answered: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

#[derive(Clone)]
pub struct Receiver {
    /// Where to send (`http://127.0.0.1:port/hook`).
    pub url: String,
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    hold: Arc<AtomicBool>,
}

impl Receiver {
    /// Starts a receiver answering 200.
    pub async fn start() -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let status = Arc::new(AtomicU16::new(200));
        let hold = Arc::new(AtomicBool::new(false));
        let (g, st, h) = (got.clone(), status.clone(), hold.clone());
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let (g, st, h) = (g.clone(), st.clone(), h.clone());
                async move {
                    if h.load(Ordering::SeqCst) {
                        g.lock().unwrap().push(Received {
                            headers,
                            body: body.to_vec(),
                            at: Instant::now(),
                            answered: 0,
                        });
                        tokio::time::sleep(Duration::from_secs(120)).await;
                        return StatusCode::GATEWAY_TIMEOUT;
                    }
                    let answered = st.load(Ordering::SeqCst);
                    g.lock().unwrap().push(Received {
                        headers,
                        body: body.to_vec(),
                        at: Instant::now(),
                        answered,
                    });
                    StatusCode::from_u16(answered).unwrap_or(StatusCode::OK)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url,
            got,
            status,
            hold,
        }
    }

    /// While `true`, requests are kept and never answered (the sender's attempt hangs).
    pub fn hold(&self, on: bool) {
        self.hold.store(on, Ordering::SeqCst);
    }

    /// Answers `status` from now on.
    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    /// The requests answered with 2xx so far.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .collect()
    }

    /// Waits until `n` requests were answered with 2xx; panics after `timeout`.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait(n, timeout, |r| (200..300).contains(&r.answered))
            .await
    }

    /// Waits until `n` requests came (whatever they were answered); panics after `timeout`.
    pub async fn wait_received(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait(n, timeout, |_| true).await
    }

    async fn wait(
        &self,
        n: usize,
        timeout: Duration,
        keep: impl Fn(&Received) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<Received> = self.received().into_iter().filter(|r| keep(r)).collect();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} notifications after {timeout:?}: {:?}",
                got.len(),
                self.received()
                    .iter()
                    .map(|r| r.answered)
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}
