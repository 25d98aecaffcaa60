//! Serving an axum router over HTTP/1.1 with a bound on how long a request's head may take
//! to arrive (`axum::serve` runs hyper without a timer, so a client could hold a connection
//! and its buffer forever by never finishing its headers). Each request sees its peer's
//! address as `ConnectInfo<SocketAddr>`. On shutdown the listener stops accepting and the
//! connections finish the requests they are serving.
//!
//! How many connections are open is bounded too (`Connections`): in all, and from each peer,
//! so that one sender opening connections (each a descriptor, a task and its buffers) cannot
//! take the service's descriptors or places from every other sender.

use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use crate::per_tenant::{PerTenant, TenantPermit};

/// How many connections a service keeps open. Past `max` in all, its listeners accept no
/// more until one closes (the rest wait in the kernel's backlog); past `per_peer` from one
/// address (one /64 for IPv6, whose senders hold whole prefixes), a peer's next connection is
/// answered 503 and closed at once while other peers' connections are still accepted.
#[derive(Clone)]
pub struct Connections {
    all: Arc<Semaphore>,
    per_peer: PerTenant<IpAddr>,
}

/// An open connection's places, given back when it is dropped with its connection.
pub struct Open {
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
    /// `max` connections in all, `per_peer` from one peer (0: only `max` bounds a peer).
    pub fn new(max: usize, per_peer: usize) -> Connections {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        let per_peer = if per_peer == 0 {
            max
        } else {
            per_peer.min(max)
        };
        Connections {
            all: Arc::new(Semaphore::new(max)),
            per_peer: PerTenant::new(per_peer),
        }
    }

    /// The next connection on `listener` whose peer may open one, with its places. A peer
    /// past its share is sent `refusal` (what it can take without reading; nothing for
    /// protocols that cannot say it) and closed. Cancel-safe: nothing is held until it
    /// returns.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        name: &'static str,
        refusal: &[u8],
    ) -> (TcpStream, SocketAddr, Open) {
        let mut all = None;
        loop {
            let permit = match all.take() {
                Some(permit) => permit,
                None => {
                    if self.all.available_permits() == 0 {
                        metrics::counter!("connections_full_total", "listener" => name)
                            .increment(1);
                    }
                    self.all
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the connections' budget is never closed")
                }
            };
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                // A connection that failed before it was accepted (reset, out of
                // descriptors): the listener goes on.
                Err(e) => {
                    tracing::warn!(error = %e, listener = name, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    all = Some(permit);
                    continue;
                }
            };
            let Some(peer_permit) = self.per_peer.try_acquire(peer_key(peer.ip()), 1) else {
                metrics::counter!("connections_refused_total", "listener" => name).increment(1);
                tracing::debug!(%peer, listener = name, "a peer's connections are all open");
                // A fresh socket's send buffer takes the whole answer, or it goes unsaid;
                // a peer that has already sent its request may see a reset instead.
                let _ = stream.try_write(refusal);
                all = Some(permit);
                continue;
            };
            metrics::gauge!("connections_open", "listener" => name).increment(1.0);
            let open = Open {
                _all: permit,
                _peer: peer_permit,
                listener: name,
            };
            return (stream, peer, open);
        }
    }
}

/// The address a peer's connections are counted under: the address itself for IPv4 (and
/// IPv4 mapped into IPv6), the /64 prefix for IPv6.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// What an HTTP peer past its share of the connections is told before its connection closes.
fn http_refusal() -> Vec<u8> {
    let problem = crate::problem::Problem::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "too-many-connections",
        "Too many connections",
        "this address holds all the connections one peer may open; reuse one, or close some",
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

/// Serves `app` on `listener` until `shutdown` completes, then waits for the requests in
/// flight; a request whose head has not all arrived `header_timeout` after its connection
/// was ready for it is dropped with its connection. Its connections take their places in
/// `connections`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    connections: Connections,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let refusal = http_refusal();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer, open) = tokio::select! {
            accepted = connections.accept(&listener, "http", &refusal) => accepted,
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
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
            drop(open);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// IPv6 peers are counted by their /64, IPv4 ones (mapped or not) by their address.
    #[test]
    fn peers_are_counted_by_address_or_prefix() {
        let key = |s: &str| peer_key(s.parse().unwrap()).to_string();
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(key("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
    }

    /// A peer past its share is told so and closed while another peer is still accepted; a
    /// closed connection gives its place back.
    #[tokio::test]
    async fn a_peer_past_its_share_is_refused_and_another_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(10, 2);
        let connect = |from: &'static str| async move {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
            socket.connect(addr).await.unwrap()
        };
        let mut held = Vec::new();
        for _ in 0..2 {
            let _client = connect("127.0.0.1").await;
            let (_, peer, open) = connections.accept(&listener, "test", b"no").await;
            assert_eq!(peer.ip().to_string(), "127.0.0.1");
            held.push((_client, open));
        }
        let mut refused = connect("127.0.0.1").await;
        let other = connect("127.0.0.2").await;
        let (_, peer, _open) = connections.accept(&listener, "test", b"no").await;
        assert_eq!(
            peer.ip().to_string(),
            "127.0.0.2",
            "the third from .1 was passed over"
        );
        let mut told = Vec::new();
        refused.read_to_end(&mut told).await.unwrap();
        assert_eq!(told, b"no", "refused with the answer, then closed");
        drop(other);
        held.pop();
        let _again = connect("127.0.0.1").await;
        let (_, peer, _open) = connections.accept(&listener, "test", b"no").await;
        assert_eq!(
            peer.ip().to_string(),
            "127.0.0.1",
            "a closed place is given back"
        );
    }

    /// Past the bound in all, nothing is accepted until a connection closes.
    #[tokio::test]
    async fn past_the_bound_in_all_the_listener_waits() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(1, 0);
        let _first = TcpStream::connect(addr).await.unwrap();
        let (_, _, open) = connections.accept(&listener, "test", b"").await;
        let _second = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::time::timeout(
            Duration::from_millis(200),
            connections.accept(&listener, "test", b""),
        )
        .await;
        assert!(
            waiting.is_err(),
            "a second connection waits while the first is open"
        );
        drop(open);
        tokio::time::timeout(
            Duration::from_secs(5),
            connections.accept(&listener, "test", b""),
        )
        .await
        .expect("accepted once the first closed");
    }
}
