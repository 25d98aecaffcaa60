//! OTLP/gRPC on its own port (`grpc_addr`; 4317 by convention): the `Export` methods of the
//! collector's `MetricsService` and `LogsService`, gzip accepted, the ingest key in the
//! `authorization` metadata (`Bearer <key>`). A request goes the same way as over OTLP/HTTP
//! (`routes::otlp`): same conversion, validation, limits and partial success.
//!
//! Status codes as OTLP senders read them: bad data is `INVALID_ARGUMENT` (not retried), a
//! missing or wrong key `UNAUTHENTICATED` / `PERMISSION_DENIED`, and a rate limit or an
//! unavailable Kafka `UNAVAILABLE` (retried; ids derived from content keep resends single).

use std::convert::Infallible;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use shared::events::FieldError;
use shared::otlp::{self, pb, Converted};
use shared::problem::Problem;
use tonic::codec::{CompressionEncoding, ProstCodec};
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::routes::events::admit;
use crate::routes::otlp::{take, Signal};
use crate::state::AppState;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One OTLP collector service.
pub trait Export: Send + Sync + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: prost::Message + Default + Send + 'static;
    /// The fully qualified gRPC service name.
    const SERVICE: &'static str;
    const SIGNAL: Signal;
    fn convert(req: &Self::Request) -> Result<Converted, FieldError>;
    /// The answer when `rejected` points or records were refused.
    fn partial(rejected: i64, error_message: String) -> Self::Response;
}

pub struct Metrics;
pub struct Logs;

impl Export for Metrics {
    type Request = pb::ExportMetricsServiceRequest;
    type Response = pb::ExportMetricsServiceResponse;
    const SERVICE: &'static str = "opentelemetry.proto.collector.metrics.v1.MetricsService";
    const SIGNAL: Signal = Signal::Metrics;
    fn convert(req: &Self::Request) -> Result<Converted, FieldError> {
        otlp::metric_events(req)
    }
    fn partial(rejected: i64, error_message: String) -> Self::Response {
        pb::ExportMetricsServiceResponse {
            partial_success: Some(pb::ExportMetricsPartialSuccess {
                rejected_data_points: rejected,
                error_message,
            }),
        }
    }
}

impl Export for Logs {
    type Request = pb::ExportLogsServiceRequest;
    type Response = pb::ExportLogsServiceResponse;
    const SERVICE: &'static str = "opentelemetry.proto.collector.logs.v1.LogsService";
    const SIGNAL: Signal = Signal::Logs;
    fn convert(req: &Self::Request) -> Result<Converted, FieldError> {
        otlp::log_events(req, chrono::Utc::now())
    }
    fn partial(rejected: i64, error_message: String) -> Self::Response {
        pb::ExportLogsServiceResponse {
            partial_success: Some(pb::ExportLogsPartialSuccess {
                rejected_log_records: rejected,
                error_message,
            }),
        }
    }
}

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

impl<E: Export> NamedService for OtlpService<E> {
    const NAME: &'static str = E::SERVICE;
}

impl<E, B> tower::Service<axum::http::Request<B>> for OtlpService<E>
where
    E: Export,
    B: http_body::Body + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
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
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<E::Response, E::Request>::default())
                    .accept_compressed(CompressionEncoding::Gzip)
                    .send_compressed(CompressionEncoding::Gzip)
                    .max_decoding_message_size(limit);
            let export = tower::service_fn(move |request: tonic::Request<E::Request>| {
                let state = state.clone();
                async move { export::<E>(&state, request).await }
            });
            Ok(grpc.unary(export, req).await)
        })
    }
}

async fn export<E: Export>(
    s: &AppState,
    request: tonic::Request<E::Request>,
) -> Result<tonic::Response<E::Response>, Status> {
    let headers = request.metadata().clone().into_headers();
    let principal = admit(s, &headers).await.0.map_err(status)?;
    let converted =
        E::convert(request.get_ref()).map_err(|e| Status::invalid_argument(e.reason))?;
    let out = take(s, &principal, converted, E::SIGNAL)
        .await
        .map_err(status)?;
    Ok(tonic::Response::new(if out.rejected.is_empty() {
        E::Response::default()
    } else {
        E::partial(out.rejected.len() as i64, out.summary())
    }))
}

/// A problem as the gRPC status an OTLP sender acts on.
fn status(p: Problem) -> Status {
    let code = match p.status {
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        429 | 503 => Code::Unavailable,
        400..=499 => Code::InvalidArgument,
        _ => Code::Internal,
    };
    let mut detail = p.detail;
    for e in p.errors.iter().take(5) {
        detail.push_str(&format!("; {}: {}", e.field, e.reason));
    }
    Status::new(code, detail)
}
