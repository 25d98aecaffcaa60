//! OTLP/gRPC on its own port (`grpc_addr`; 4317 by convention): the `Export` methods of the
//! collector's `MetricsService` and `LogsService`, gzip accepted, the ingest key in the
//! `authorization` metadata (`Bearer <key>`). A request goes the same way as over OTLP/HTTP
//! (`routes::otlp`): same conversion, validation, limits and partial success.
//!
//! Status codes as OTLP senders read them: bad data (undecodable protobuf included; tonic's
//! own codec would call it `INTERNAL`) is `INVALID_ARGUMENT`, a message over `max_body_bytes`
//! before or after gzip `RESOURCE_EXHAUSTED` (neither is retried), a missing or wrong key
//! `UNAUTHENTICATED` / `PERMISSION_DENIED`, and a rate limit or an unavailable Kafka
//! `UNAVAILABLE` (retried; ids derived from content keep resends single).
//!
//! The message is read here, not by tonic: tonic inflates without a bound, so a few kilobytes
//! could otherwise become gigabytes. gzip is undone within the size limit; the message's
//! points, records and attributes are then counted on the wire (`crate::formats::otlp::wire`),
//! as over HTTP, so that prost never decodes more than a request may hold. As over HTTP, a
//! request holds a slot and its bytes of the in-flight budget (`crate::shed`; 503 becomes
//! `UNAVAILABLE`), and a large message is read in the large-body lane (`crate::ingest::lane`).
//! tonic only frames the answer.

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use http_body_util::Full;
use prost::Message as _;
use shared::events::Source;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::Status;

use crate::error::IngestError;
use crate::formats::otlp::{self, Converted, DecodeError, Signal};
use crate::ingest::door::{
    admit, append_counted, keep, key_context, read_limited, ReadBody, Unreadable,
};
use crate::ingest::lane::Lane;
use crate::ingest::sink::Batch;
use crate::ingest::{IngestContext, Keep};
use crate::routes::otlp::stamp;
use crate::shed::Charges;
use crate::state::AppState;

/// The gRPC service of one signal.
pub struct OtlpService<E> {
    state: AppState,
    export: PhantomData<fn() -> E>,
}

impl<E> OtlpService<E> {
    pub fn new(state: AppState) -> Self {
        OtlpService {
            state,
            export: PhantomData,
        }
    }
}

impl<E> Clone for OtlpService<E> {
    fn clone(&self) -> Self {
        OtlpService::new(self.state.clone())
    }
}

impl<E: Signal> NamedService for OtlpService<E> {
    const NAME: &'static str = E::SERVICE;
}

impl<E: Signal> tower::Service<axum::http::Request<tonic::body::Body>> for OtlpService<E> {
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<tonic::body::Body>) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let method = req.uri().path().rsplit('/').next().unwrap_or("");
            if method != "Export" {
                return Ok(Status::unimplemented(format!(
                    "{} has only Export, not `{method}`",
                    E::SERVICE
                ))
                .into_http());
            }
            let limit = state.config.max_body_bytes;
            let (mut parts, body) = req.into_parts();
            // The key and the rate limit before the body is read or inflated.
            let peer = parts
                .extensions
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|info| info.remote_addr())
                .map(|addr| addr.ip());
            let principal = match admit(&state, &parts.headers, peer).await.0 {
                Ok(principal) => principal,
                Err(error) => return Ok(Status::from(error).into_http()),
            };
            // Held as over HTTP (`crate::shed`): a slot and the declared length before the
            // message is read, what it comes to as it arrives and what it inflates to, so
            // that messages being read or waiting for the lane are bounded like bodies.
            let (tenant, declared) = (principal.tenant_id, state.shed.declared(&parts.headers));
            let _held = match state.shed.hold(tenant, declared) {
                Ok(held) => held,
                Err(busy) => return Ok(Status::from(IngestError::from(busy)).into_http()),
            };
            let mut charges = Charges::new(&state.shed, tenant, declared);
            let within = state.body_timeout();
            // The limit is the message's, within its 5-byte frame.
            let body = match read_limited(body, limit + 5, &mut charges, within).await {
                Ok(body) => body,
                Err(Unreadable::TooLarge(_)) => return Ok(too_large(limit).into_http()),
                Err(e) => return Ok(unreadable(e).into_http()),
            };
            let encoding = parts
                .headers
                .remove("grpc-encoding")
                .map(|v| v.to_str().unwrap_or("?").to_string());
            let message = match message(body, encoding.as_deref(), limit, &state.lane, charges) {
                Ok(message) => message,
                Err(status) => return Ok(status.into_http()),
            };
            // Inflated, counted on the wire, decoded, converted and stamped where its size says
            // (`crate::ingest::lane`), and let go of before the log acknowledges its points.
            let ctx = key_context(&state, &principal, Source::Otlp);
            let keep = keep(&principal);
            let large = message.is_large(&state.lane);
            #[allow(clippy::result_large_err)] // tonic's own error type; once per request
            let work = move || read::<E>(message, &ctx, keep);
            let read = state.lane.run_if(large, principal.tenant_id, work).await;
            let answer = match read {
                Ok((converted, batch)) => append_counted(&state, &principal, batch, E::SOURCE)
                    .await
                    .map(|()| otlp::response::<E>(&converted))
                    .map_err(Status::from),
                Err(status) => Err(status),
            };
            // tonic frames the answer (gzip when the sender takes it); the message it reads
            // is an empty one, the request's having been read above.
            let req =
                axum::http::Request::from_parts(parts, Full::new(Bytes::from_static(&[0; 5])));
            let mut grpc = tonic::server::Grpc::new(OtlpCodec::<E>::new())
                .send_compressed(CompressionEncoding::Gzip);
            let mut answer = Some(answer);
            #[allow(clippy::result_large_err)] // as above
            let export = tower::service_fn(move |_: tonic::Request<()>| {
                let answer = answer
                    .take()
                    .unwrap_or_else(|| Err(Status::internal("Export answers once")));
                async move { answer.map(tonic::Response::new) }
            });
            Ok(grpc.unary(export, req).await)
        })
    }
}

fn too_large(limit: usize) -> Status {
    Status::resource_exhausted(format!(
        "the message exceeds {limit} bytes, compressed or not"
    ))
}

/// A message that cannot be read, as OTLP senders read it.
fn unreadable(e: Unreadable) -> Status {
    match e {
        Unreadable::TooLarge(limit) => too_large(limit),
        Unreadable::BadGzip(e) => Status::invalid_argument(format!("invalid gzip message: {e}")),
        Unreadable::Busy(busy) => Status::from(IngestError::from(busy)),
        Unreadable::Broken(e) => Status::invalid_argument(format!("reading the request: {e}")),
        Unreadable::Slow(within) => Status::deadline_exceeded(format!(
            "the message had not all arrived after {} s",
            within.as_secs()
        )),
    }
}

/// The request's one message, with gzip undone within `limit` bytes as far as the lane's
/// size (the rest where it is read), holding `charges` (what the request was charged as it
/// was read) and charged there for what it inflated to.
#[allow(clippy::result_large_err)] // tonic's own error type; once per request
fn message(
    body: Bytes,
    encoding: Option<&str>,
    limit: usize,
    lane: &Lane,
    charges: Charges,
) -> Result<ReadBody, Status> {
    let (header, after) = body
        .split_at_checked(5)
        .ok_or_else(|| Status::invalid_argument("no request message"))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let (_, rest) = after
        .split_at_checked(len)
        .ok_or_else(|| Status::invalid_argument("truncated gRPC message"))?;
    if !rest.is_empty() {
        return Err(Status::invalid_argument(
            "Export takes one request message, not several",
        ));
    }
    let payload = body.slice(5..5 + len);
    let gzip = match (header[0], encoding) {
        (0, _) => false,
        (1, Some("gzip")) => true,
        (1, other) => {
            return Err(Status::unimplemented(format!(
                "grpc-encoding {} is not supported; use gzip or none",
                other.unwrap_or("(none)")
            )))
        }
        (flag, _) => {
            return Err(Status::invalid_argument(format!(
                "unknown gRPC message flag {flag}"
            )))
        }
    };
    ReadBody::new(payload, gzip, limit, lane, charges).map_err(unreadable)
}

/// The message's points stamped, with what was refused: inflated to its end, counted on the
/// wire (so that prost never decodes more than a request may hold), decoded and converted.
#[allow(clippy::result_large_err)] // tonic's own error type; once per request
fn read<E: Signal>(
    message: ReadBody,
    ctx: &IngestContext,
    keep: Keep,
) -> Result<(Converted, Batch), Status> {
    // What the message holds of the in-flight budget is held until it is stamped.
    let message = message.finish().map_err(unreadable)?;
    otlp::check_protobuf::<E>(message.bytes()).map_err(|e| match e {
        DecodeError::Malformed(e) => Status::invalid_argument(e),
        DecodeError::TooMany(e) => Status::from(IngestError::too_many(e)),
    })?;
    let req = E::Request::decode(message.bytes())
        .map_err(|e| Status::invalid_argument(format!("invalid protobuf: {e}")))?;
    // The bytes are let go of; what they were charged is held until the points are stamped
    // and serialized.
    let _charges = message.into_charges();
    let converted = E::events(&req, ctx.received_at).map_err(IngestError::too_many)?;
    drop(req);
    Ok(stamp::<E>(ctx, keep, converted)?)
}

/// Encodes the answer; the request's message, already read, is not decoded again.
struct OtlpCodec<E>(PhantomData<fn() -> E>);

impl<E> OtlpCodec<E> {
    fn new() -> Self {
        OtlpCodec(PhantomData)
    }
}

impl<E: Signal> Codec for OtlpCodec<E> {
    type Encode = E::Response;
    type Decode = ();
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self {
        OtlpCodec::new()
    }

    fn decoder(&mut self) -> Self {
        OtlpCodec::new()
    }
}

impl<E: Signal> Encoder for OtlpCodec<E> {
    type Item = E::Response;
    type Error = Status;

    fn encode(&mut self, item: E::Response, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the response: {e}")))
    }
}

impl<E: Signal> Decoder for OtlpCodec<E> {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, _: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        Ok(Some(()))
    }
}

/// An accepted OTLP/gRPC connection (`shared::serve::Guarded`, holding its places among the
/// service's connections until it closes). Its client's preface must arrive within the
/// service's `header_timeout_secs`, as an HTTP/1 request's head must: a connection that sends
/// nothing would otherwise hold its place for good.
pub struct GrpcConnection {
    stream: shared::serve::Guarded,
    /// The address it was accepted from (the socket may no longer say, once reset).
    peer: std::net::SocketAddr,
}

/// The bytes an HTTP/2 client sends first (`PRI * HTTP/2.0…`).
const PREFACE_BYTES: usize = 24;

/// The connections `listener` accepts, each once it may be open; one refused is closed
/// without a word (gRPC has no answer before a request; its client sees `UNAVAILABLE` and
/// retries).
pub fn incoming(
    listener: tokio::net::TcpListener,
    connections: shared::serve::Connections,
) -> impl futures::Stream<Item = Result<GrpcConnection, std::io::Error>> {
    futures::stream::unfold(
        (listener, connections),
        |(listener, connections)| async move {
            let refusal = shared::serve::Refusal::Close;
            let (stream, peer) = connections.accept(&listener, "grpc", refusal).await;
            let connection = GrpcConnection {
                stream: stream.expect_preface(PREFACE_BYTES),
                peer,
            };
            Some((Ok(connection), (listener, connections)))
        },
    )
}

impl tonic::transport::server::Connected for GrpcConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.stream.stream().local_addr().ok(),
            remote_addr: Some(self.peer),
        }
    }
}

impl tokio::io::AsyncRead for GrpcConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for GrpcConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
