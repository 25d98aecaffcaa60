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
//! gzip is undone here, within the size limit, before tonic sees the message: tonic inflates
//! without a bound, so a few kilobytes could otherwise become gigabytes. The message's points,
//! records and attributes are then counted on the wire (`crate::formats::otlp::wire`), as over HTTP,
//! so that prost never decodes more than a request may hold.

use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use prost::Message;
use shared::auth::KeyPrincipal;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::server::NamedService;
use tonic::Status;

use crate::error::IngestError;
use crate::formats::otlp::{self, DecodeError, Signal};
use crate::ingest::door::admit;
use crate::routes::otlp::take;
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
            let principal = match admit(&state, &parts.headers).await.0 {
                Ok(principal) => principal,
                Err(error) => return Ok(Status::from(error).into_http()),
            };
            let body = match Limited::new(body, limit + 5).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Ok(too_large(limit).into_http())
                }
                Err(e) => {
                    return Ok(
                        Status::invalid_argument(format!("reading the request: {e}")).into_http(),
                    )
                }
            };
            let encoding = parts
                .headers
                .remove("grpc-encoding")
                .map(|v| v.to_str().unwrap_or("?").to_string());
            let body = match inflate(&body, encoding.as_deref(), limit) {
                Ok(body) => body,
                Err(status) => return Ok(status.into_http()),
            };
            // Counted on the wire before tonic hands it to prost.
            match otlp::check_protobuf::<E>(&body[5..]) {
                Ok(()) => {}
                Err(DecodeError::Malformed(e)) => {
                    return Ok(Status::invalid_argument(e).into_http())
                }
                Err(DecodeError::TooMany(e)) => {
                    return Ok(Status::from(IngestError::too_many(e)).into_http())
                }
            }
            let req = axum::http::Request::from_parts(parts, Full::new(Bytes::from(body)));
            let mut grpc = tonic::server::Grpc::new(OtlpCodec::<E>::new())
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(limit);
            let export = tower::service_fn(move |request: tonic::Request<E::Request>| {
                let (state, principal) = (state.clone(), principal.clone());
                async move { export::<E>(&state, principal, request).await }
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

/// The request's one gRPC message (`Export` is unary) with gzip undone within `limit` bytes,
/// framed again uncompressed.
#[allow(clippy::result_large_err)] // tonic's own error type; once per request
fn inflate(body: &[u8], encoding: Option<&str>, limit: usize) -> Result<Vec<u8>, Status> {
    let (header, after) = body
        .split_at_checked(5)
        .ok_or_else(|| Status::invalid_argument("no request message"))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let (payload, rest) = after
        .split_at_checked(len)
        .ok_or_else(|| Status::invalid_argument("truncated gRPC message"))?;
    if !rest.is_empty() {
        return Err(Status::invalid_argument(
            "Export takes one request message, not several",
        ));
    }
    let inflated;
    let message = match (header[0], encoding) {
        (0, _) => payload,
        (1, Some("gzip")) => {
            let mut buf = Vec::new();
            flate2::read::GzDecoder::new(payload)
                .take(limit as u64 + 1)
                .read_to_end(&mut buf)
                .map_err(|e| Status::invalid_argument(format!("invalid gzip message: {e}")))?;
            inflated = buf;
            &inflated
        }
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
    if message.len() > limit {
        return Err(too_large(limit));
    }
    let mut out = Vec::with_capacity(message.len() + 5);
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Ok(out)
}

/// prost messages, with undecodable input answered `INVALID_ARGUMENT` (the sender's fault,
/// not retried) instead of tonic's `INTERNAL`.
struct OtlpCodec<E>(PhantomData<fn() -> E>);

impl<E> OtlpCodec<E> {
    fn new() -> Self {
        OtlpCodec(PhantomData)
    }
}

impl<E: Signal> Codec for OtlpCodec<E> {
    type Encode = E::Response;
    type Decode = E::Request;
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
    type Item = E::Request;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<E::Request>, Status> {
        E::Request::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("invalid protobuf: {e}")))
    }
}

async fn export<E: Signal>(
    s: &AppState,
    principal: KeyPrincipal,
    request: tonic::Request<E::Request>,
) -> Result<tonic::Response<E::Response>, Status> {
    let request = request.into_inner();
    let converted = E::events(&request, chrono::Utc::now()).map_err(IngestError::too_many)?;
    // Nothing of the message is held while the log acknowledges its points.
    drop(request);
    let out = take::<E>(s, &principal, converted).await?;
    Ok(tonic::Response::new(otlp::response::<E>(&out)))
}
