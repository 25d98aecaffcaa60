//! Serving an axum router over HTTP/1.1 with a bound on how long a request's head may take
//! to arrive (`axum::serve` runs hyper without a timer, so a client could hold a connection
//! and its buffer forever by never finishing its headers). Each request sees its peer's
//! address as `ConnectInfo<SocketAddr>`. On shutdown the listener stops accepting and the
//! connections finish the requests they are serving.
//!
//! How many connections are open is bounded too (`Connections`): in all, and from each peer,
//! so that one sender opening connections (each a descriptor, a task and its buffers) cannot
//! take the service's descriptors or places from every other sender; and how long a
//! connection may go without the peer reading what it is sent (`Guarded`).
//!
//! A service may also serve its health and metrics on an operations port of their own
//! (`OperationsPort`, with `Serving::OPERATIONS`' few connections): senders holding every place
//! on the public port then never keep a probe or a scraper out.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::per_tenant::{PerTenant, TenantPermit};

/// How a service serves its connections (ingest-api's and query-api's configurations embed
/// it with `#[serde(flatten)]`, so its keys are flat: `TALLY_MAX_CONNECTIONS`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Serving {
    /// How long a request's head (its line and headers, or an HTTP/2 client's preface) may
    /// take to arrive on a connection, and a write may wait on a peer that does not read;
    /// past it the connection is closed.
    pub header_timeout_secs: u64,
    /// Connections open at once, over every public listener (an operations port has its
    /// own, `OPERATIONS`); past it a new one is answered 503
    /// (gRPC: closed) at once. Lowered to what the descriptor limit allows
    /// ([`fit_descriptors`]).
    pub max_connections: usize,
    /// Connections open at once from one address (one /64 for IPv6); past it that address's
    /// next connection is answered 503 (gRPC: closed) at once. 0: only `max_connections`
    /// bounds it (set it so behind a proxy, where every connection comes from the proxy's
    /// address); 0 also turns off each address's share of the key lookups
    /// (`auth::ApiKeyStore`).
    pub max_connections_per_peer: usize,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            header_timeout_secs: 30,
            max_connections: 4096,
            max_connections_per_peer: 256,
        }
    }
}

impl Serving {
    /// How an operations port (health and metrics, for probes and scrapers) serves: a few
    /// connections of its own, their heads in 30 s, none shared by address (a probe and a
    /// scraper may come from one).
    pub const OPERATIONS: Serving = Serving {
        header_timeout_secs: 30,
        max_connections: 64,
        max_connections_per_peer: 0,
    };

    pub fn check(&self) -> Result<(), String> {
        if self.header_timeout_secs == 0 {
            return Err("header_timeout_secs must be positive".into());
        }
        if self.max_connections == 0 {
            return Err("max_connections must be positive".into());
        }
        Ok(())
    }

    /// Whether each address has its share (of the connections, and of the key lookups,
    /// `auth::ApiKeyStore`): not behind a proxy, where every request comes from its address.
    pub fn by_address(&self) -> bool {
        self.max_connections_per_peer > 0
    }

    /// The bounds on this service's connections, under the descriptor limit.
    pub fn connections(&self) -> Connections {
        Connections::new(
            fit_descriptors(self.max_connections),
            self.max_connections_per_peer,
            Duration::from_secs(self.header_timeout_secs),
        )
    }
}

/// The address a request came from, as [`serve`] records it (none for a request that did
/// not come through it, such as a unit test's `oneshot`; query-api's MCP tool calls carry
/// their caller's). An extractor that never refuses.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<IpAddr>);

impl Peer {
    /// The peer recorded in a request's `extensions`.
    pub fn of(extensions: &axum::http::Extensions) -> Option<IpAddr> {
        extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip())
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Peer, Self::Rejection> {
        Ok(Peer(Peer::of(&parts.extensions)))
    }
}

/// A listener bound to `addr`, or none when `addr` is empty (a listener turned off);
/// `setting` names the address's key in the error.
pub async fn bind_if_set(addr: &str, setting: &str) -> anyhow::Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding {addr} ({setting}): {e}"))?;
    Ok(Some(listener))
}

/// A service's operations port (`operations_addr`), bound: its health and metrics routes
/// served apart, with [`Serving::OPERATIONS`]' connections.
pub struct OperationsPort {
    listener: Option<TcpListener>,
}

impl OperationsPort {
    /// Binds `addr` (`operations_addr`); empty turns the port off.
    pub async fn bind(addr: &str) -> anyhow::Result<OperationsPort> {
        let listener = bind_if_set(addr, "operations_addr").await?;
        Ok(OperationsPort { listener })
    }

    /// Where it listens, unless it is off.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listener
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener"))
    }

    /// Serves `health` (and nothing else: other paths are 404) in a task of its own, until
    /// [`Operations::stop`], which the service calls last, once its public listeners have
    /// drained and what it held is flushed, so that a probe reads `/readyz`'s 503 meanwhile.
    pub fn spawn<S: Clone + Send + Sync + 'static>(
        self,
        health: Router<S>,
        state: S,
    ) -> Operations {
        let app = health
            .fallback(crate::problem::not_found_fallback)
            .method_not_allowed_fallback(crate::problem::method_not_allowed_fallback)
            .layer(axum::middleware::from_fn(crate::telemetry::track_http))
            .with_state(state);
        let running = self.listener.map(|listener| {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let stopped = async move {
                let _ = stopped.await;
            };
            let connections = Serving::OPERATIONS.connections();
            let task = tokio::spawn(serve_as("operations", listener, app, connections, stopped));
            (stop, task)
        });
        Operations { running }
    }
}

/// An operations port being served ([`OperationsPort::spawn`]).
pub struct Operations {
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
}

impl Operations {
    /// Stops accepting, and waits for the requests being answered.
    pub async fn stop(self) -> anyhow::Result<()> {
        if let Some((stop, task)) = self.running {
            let _ = stop.send(());
            task.await??;
        }
        Ok(())
    }
}

/// How many connections a service keeps open: `max` in all, over its listeners, and
/// `per_peer` from one address (one /64 for IPv6, whose senders hold whole prefixes). A
/// connection past either is answered 503 (HTTP) or closed (gRPC) at once, so the listeners
/// always accept, and a peer past its share is refused while other peers are still taken.
#[derive(Clone)]
pub struct Connections {
    all: Arc<Semaphore>,
    per_peer: PerTenant<IpAddr>,
    /// How long a request's head or a preface may take to arrive, and a write may wait on a
    /// peer that does not read (`Guarded`).
    timeout: Duration,
    /// Refusals still being said: a refused HTTP peer that has already sent its request is
    /// read from for a moment, so that it sees the 503 rather than a reset.
    refusing: Arc<Semaphore>,
}

/// What a refused peer is told.
#[derive(Clone, Copy)]
pub enum Refusal {
    /// An HTTP/1 answer, 503 `too-many-connections`.
    Http,
    /// Nothing (a gRPC client has no answer before its request: it sees `UNAVAILABLE`).
    Close,
}

/// Refusals said at once; past them a refused connection is closed after one try to write.
const REFUSING: usize = 64;
/// How long a refusal waits for its peer to read it, and how much of the peer's request it
/// reads and throws away meanwhile.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// An open connection's places, given back when it is dropped with its connection.
struct Open {
    _all: OwnedSemaphorePermit,
    _peer: TenantPermit<IpAddr>,
    listener: &'static str,
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!("connections_open", "listener" => self.listener).decrement(1.0);
    }
}

impl Connections {
    /// `max` connections in all, `per_peer` from one peer (0: only `max` bounds a peer); a
    /// head, a preface and a write to a peer that does not read each take at most `timeout`.
    pub fn new(max: usize, per_peer: usize, timeout: Duration) -> Connections {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        let per_peer = if per_peer == 0 {
            max
        } else {
            per_peer.min(max)
        };
        Connections {
            all: Arc::new(Semaphore::new(max)),
            per_peer: PerTenant::new(per_peer),
            timeout,
            refusing: Arc::new(Semaphore::new(REFUSING)),
        }
    }

    /// The next connection on `listener` that may be open, holding its places until it is
    /// dropped. One whose peer holds its share, or that finds every place taken, is told
    /// `refusal` and closed. Cancel-safe: nothing is held until it returns.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        name: &'static str,
        refusal: Refusal,
    ) -> (Guarded, SocketAddr) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                // A connection that failed before it was accepted (reset, out of
                // descriptors): the listener goes on.
                Err(e) => {
                    tracing::warn!(error = %e, listener = name, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(peer_permit) = self.per_peer.try_acquire(peer_key(peer.ip()), 1) else {
                self.refuse(stream, peer, name, Limit::Peer, refusal);
                continue;
            };
            let Ok(all) = self.all.clone().try_acquire_owned() else {
                self.refuse(stream, peer, name, Limit::All, refusal);
                continue;
            };
            metrics::gauge!("connections_open", "listener" => name).increment(1.0);
            let open = Open {
                _all: all,
                _peer: peer_permit,
                listener: name,
            };
            return (Guarded::new(stream, open, self.timeout), peer);
        }
    }

    fn refuse(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        name: &'static str,
        limit: Limit,
        refusal: Refusal,
    ) {
        metrics::counter!("connections_refused_total", "listener" => name, "limit" => limit.name())
            .increment(1);
        tracing::debug!(%peer, listener = name, limit = limit.name(), "connection refused");
        let Refusal::Http = refusal else { return };
        let answer = http_refusal(limit);
        let Ok(place) = self.refusing.clone().try_acquire_owned() else {
            // A fresh socket's send buffer takes the whole answer; a peer that has already
            // sent its request may see a reset instead.
            let _ = stream.try_write(&answer);
            return;
        };
        tokio::spawn(async move {
            let _place = place;
            let said = async {
                stream.write_all(&answer).await?;
                stream.shutdown().await?;
                // Closing with the peer's request unread would reset the connection before
                // it read the answer: read it (up to a bound) until the peer closes.
                let mut sink = [0u8; 4096];
                let mut drained = 0;
                while drained < REFUSAL_DRAIN_BYTES {
                    match stream.read(&mut sink).await? {
                        0 => break,
                        n => drained += n,
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            let _ = tokio::time::timeout(REFUSAL_LINGER, said).await;
        });
    }
}

/// Which bound refused a connection.
#[derive(Clone, Copy)]
enum Limit {
    Peer,
    All,
}

impl Limit {
    fn name(self) -> &'static str {
        match self {
            Limit::Peer => "peer",
            Limit::All => "all",
        }
    }
}

/// The address a peer's connections are counted under: the address itself for IPv4 (and
/// IPv4 mapped into IPv6, or carried by NAT64's `64:ff9b::/96` or 6to4's `2002::/16`), the
/// /64 prefix for other IPv6.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                let [a, b] = hi.to_be_bytes();
                let [c, d] = lo.to_be_bytes();
                IpAddr::V4(Ipv4Addr::new(a, b, c, d))
            };
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                embedded(s[6], s[7])
            } else if s[0] == 0x2002 {
                embedded(s[1], s[2])
            } else {
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        }
        v4 => v4,
    }
}

/// What a refused HTTP peer is told before its connection closes.
fn http_refusal(limit: Limit) -> Vec<u8> {
    let detail = match limit {
        Limit::Peer => {
            "this address holds all the connections one address may open; reuse one, or close some"
        }
        Limit::All => "this service holds all the connections it may; try again shortly",
    };
    let problem = crate::problem::Problem::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too-many-connections",
        "Too many connections",
        detail,
    )
    .with_retry_after(1);
    let body = serde_json::to_string(&problem).expect("a problem serializes");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An accepted connection, holding its places until it is dropped. A write that waits on a
/// peer that does not read gives up after the service's timeout (otherwise a peer that asks
/// and never reads the answer would hold its connection for good); a connection made to
/// expect a preface (`expect_preface`) gives up if it has not come within it.
pub struct Guarded {
    stream: TcpStream,
    _open: Open,
    timeout: Duration,
    /// The deadline of the write waiting now, if one is.
    write_stall: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    /// Bytes of the preface still to come, and by when; none once it has come.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
}

impl Guarded {
    fn new(stream: TcpStream, open: Open, timeout: Duration) -> Guarded {
        Guarded {
            stream,
            _open: open,
            timeout,
            write_stall: None,
            waiting: false,
            preface: None,
        }
    }

    /// The connection must receive its first `bytes` within the service's timeout from now.
    pub fn expect_preface(mut self, bytes: usize) -> Guarded {
        self.preface = Some((bytes, Box::pin(tokio::time::sleep(self.timeout))));
        self
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// `polled`, a write's outcome, unless it has waited on the peer for the timeout.
    fn unless_stalled<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.waiting = false;
            return polled;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let sleep = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            self.waiting = true;
            sleep.as_mut().reset(deadline);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            self.waiting = false;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer stopped reading",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if let Some((left, deadline)) = &mut this.preface {
            match polled {
                Poll::Ready(Ok(())) => {
                    *left = left.saturating_sub(buf.filled().len() - before);
                    if *left == 0 {
                        this.preface = None;
                    }
                }
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client's preface did not arrive in time",
                    )));
                }
                _ => {}
            }
        }
        polled
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.unless_stalled(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.unless_stalled(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.unless_stalled(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.unless_stalled(cx, polled)
    }
}

/// Raises this process's soft limit on open descriptors to its hard limit (as Go's runtime
/// does; the usual soft limit of 1 024 is below the connections a service keeps), and
/// returns the connections `max` that fit under it with room for the pool's, the broker's
/// and the files' descriptors and an operations port's connections, saying so if that is
/// fewer than `max`.
pub fn fit_descriptors(max: usize) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource};
    /// Descriptors kept for everything but the public listeners' connections.
    const RESERVED: u64 = 512 + Serving::OPERATIONS.max_connections as u64;
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "raising the open-descriptor limit");
            limit = getrlimit(Resource::Nofile);
        }
    }
    let Some(soft) = limit.current else {
        return max;
    };
    let fits = usize::try_from(soft.saturating_sub(RESERVED))
        .unwrap_or(usize::MAX)
        .max(1);
    if fits < max {
        tracing::warn!(
            max_connections = max,
            descriptors = soft,
            connections = fits,
            "the open-descriptor limit allows fewer connections than max_connections"
        );
    }
    fits.min(max)
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the requests in
/// flight. Its connections take their places in `connections`; a request whose head has not
/// all arrived within their timeout after its connection was ready for it is dropped with
/// its connection. Its connections are counted as the `http` listener's.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    connections: Connections,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    serve_as("http", listener, app, connections, shutdown).await
}

/// [`serve`], its connections counted as the listener `name`'s (in `connections_open` and
/// `connections_refused_total`).
pub async fn serve_as(
    name: &'static str,
    listener: TcpListener,
    app: Router,
    connections: Connections,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(connections.timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = connections.accept(&listener, name, Refusal::Http) => accepted,
            () = &mut shutdown => break,
        };
        let _ = stream.stream().set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(axum::body::Body::new))
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, %peer, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IPv6 peers are counted by their /64, IPv4 ones (mapped, NAT64 or 6to4 or not) by
    /// their address.
    #[test]
    fn peers_are_counted_by_address_or_prefix() {
        let key = |s: &str| peer_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("64:ff9b::192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2002:c000:0207:1234::1"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    /// A connection from `from` to `addr`.
    async fn connect(from: &str, addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// What `stream` is told before it is closed (within 5 s).
    async fn told(mut stream: TcpStream) -> String {
        let mut answer = String::new();
        let read = stream.read_to_string(&mut answer);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("closed")
            .unwrap();
        answer
    }

    /// A peer past its share is told so and closed while another peer is still accepted; a
    /// closed connection gives its place back.
    #[tokio::test]
    async fn a_peer_past_its_share_is_refused_and_another_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(10, 2, Duration::from_secs(5));
        let mut held = Vec::new();
        for _ in 0..2 {
            let client = connect("127.0.0.1", addr).await;
            let (open, peer) = connections.accept(&listener, "test", Refusal::Http).await;
            assert_eq!(peer.ip().to_string(), "127.0.0.1");
            held.push((client, open));
        }
        let refused = connect("127.0.0.1", addr).await;
        let _other = connect("127.0.0.2", addr).await;
        let (_open, peer) = connections.accept(&listener, "test", Refusal::Http).await;
        assert_eq!(
            peer.ip().to_string(),
            "127.0.0.2",
            "the third from .1 was passed over"
        );
        let answer = told(refused).await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("one address may open"), "{answer}");
        held.pop();
        let _again = connect("127.0.0.1", addr).await;
        let (_open, peer) = connections.accept(&listener, "test", Refusal::Http).await;
        assert_eq!(
            peer.ip().to_string(),
            "127.0.0.1",
            "a closed place is given back"
        );
    }

    /// Past the bound in all, a connection is refused at once, whoever opens it; the
    /// listener keeps accepting, and takes one again once a place is free. A peer that has
    /// sent its request before it is refused still reads the answer.
    #[tokio::test]
    async fn past_the_bound_in_all_connections_are_refused_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(1, 0, Duration::from_secs(5));
        let _first = TcpStream::connect(addr).await.unwrap();
        let (open, _) = connections.accept(&listener, "test", Refusal::Http).await;
        let mut second = connect("127.0.0.2", addr).await;
        second
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let accepting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.accept(&listener, "test", Refusal::Http).await }
        });
        let answer = told(second).await;
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.contains("all the connections it may"), "{answer}");
        drop(open);
        let _third = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), accepting)
            .await
            .expect("accepted once the first closed")
            .unwrap();
    }

    /// A write to a peer that does not read gives up after the stall bound; one the peer
    /// reads goes on however long it takes in all.
    #[tokio::test]
    async fn a_write_the_peer_never_reads_gives_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(4, 0, Duration::from_millis(300));
        let _deaf = TcpStream::connect(addr).await.unwrap();
        let (mut stream, _) = connections.accept(&listener, "test", Refusal::Close).await;
        let chunk = vec![0u8; 1 << 20];
        let started = std::time::Instant::now();
        let written = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                stream.write_all(&chunk).await?;
            }
            #[allow(unreachable_code)]
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("gave up in time");
        let e = written.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(started.elapsed() >= Duration::from_millis(300));

        let mut reader = TcpStream::connect(addr).await.unwrap();
        let (mut stream, _) = connections.accept(&listener, "test", Refusal::Close).await;
        let slow_reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            while total < 8 << 20 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                total += reader.read(&mut buf).await.unwrap();
            }
            total
        });
        for _ in 0..8 {
            stream
                .write_all(&chunk)
                .await
                .expect("read, however slowly");
        }
        assert_eq!(slow_reader.await.unwrap(), 8 << 20);
    }

    /// A connection that expects a preface gives up when it has not come in time, and not
    /// once it has.
    #[tokio::test]
    async fn a_preface_must_come_in_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(4, 0, Duration::from_millis(200));
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = connections.accept(&listener, "test", Refusal::Close).await;
        let mut stream = stream.expect_preface(4);
        let mut buf = [0u8; 8];
        let e = stream.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);

        let mut talking = TcpStream::connect(addr).await.unwrap();
        let (stream, _) = connections.accept(&listener, "test", Refusal::Close).await;
        let mut stream = stream.expect_preface(4);
        talking.write_all(b"PRI ").await.unwrap();
        stream.read_exact(&mut buf[..4]).await.unwrap();
        let late = tokio::time::timeout(Duration::from_millis(600), stream.read(&mut buf)).await;
        assert!(late.is_err(), "no deadline once the preface has come");
    }
}
