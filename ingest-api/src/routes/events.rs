//! `POST /v1/events`: one event or an array of them, appended to Kafka before the answer.
//!
//! Batches are all-or-nothing: if any event is invalid, none is sent and the problem lists
//! every offending field with the event's index.

use std::io::Read;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use serde::Serialize;
use serde_json::Value;
use shared::apikey::Scope;
use shared::auth::KeyPrincipal;
use shared::events::{Actor, Envelope, Ids, IngestContext, Source, TimeBounds};
use shared::problem::Problem;
use shared::ratelimit::Decision;
use uuid::Uuid;

use crate::state::AppState;

/// The answer to an accepted request.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub accepted: usize,
    pub ids: Vec<Uuid>,
}

pub async fn post_events(State(s): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let s = &s;
    ingest_door(s, parts.headers, |principal, headers| async move {
        let accepted = accept(s, principal, &headers, body).await?;
        Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
    })
    .await
}

/// What every ingest door does around its own decoding: the key first (scope `ingest`),
/// then the tenant's rate limit, then `handle` (given the headers back); the answer carries
/// the rate-limit headers.
pub(crate) async fn ingest_door<F, Fut>(s: &AppState, headers: HeaderMap, handle: F) -> Response
where
    F: FnOnce(KeyPrincipal, HeaderMap) -> Fut,
    Fut: std::future::Future<Output = Result<Response, Problem>>,
{
    let (admitted, decision) = admit(s, &headers).await;
    let mut res = match admitted {
        Ok(principal) => handle(principal, headers)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Err(problem) => problem.into_response(),
    };
    if let Some(decision) = decision {
        decision.write_headers(res.headers_mut());
    }
    res
}

/// The key check and the tenant's rate limit, with the limiter's decision when it was asked.
pub(crate) async fn admit(
    s: &AppState,
    headers: &HeaderMap,
) -> (Result<KeyPrincipal, Problem>, Option<Decision>) {
    let principal = match s.keys.authenticate(headers, Scope::Ingest).await {
        Ok(p) => p,
        Err(problem) => return (Err(problem), None),
    };
    let decision = s
        .limiter
        .check(principal.tenant_id, principal.rate_limit_per_min)
        .await;
    if decision.allowed {
        (Ok(principal), Some(decision))
    } else {
        (Err(decision.problem()), Some(decision))
    }
}

async fn accept(
    s: &AppState,
    principal: KeyPrincipal,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, Problem> {
    check_content_type(headers)?;
    let bytes = read_body(body, headers, s.config.max_body_bytes).await?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Problem::bad_request("malformed-json", format!("the body is not valid JSON: {e}"))
    })?;
    let raw_events = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        _ => {
            return Err(Problem::validation(
                "the body must be an event object or an array of events",
                vec![],
            ))
        }
    };
    if raw_events.is_empty() {
        return Err(Problem::validation("the batch is empty", vec![]));
    }
    if raw_events.len() > s.config.max_batch_events {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch-too-large",
            "Batch too large",
            format!(
                "{} events in one request; at most {} are accepted",
                raw_events.len(),
                s.config.max_batch_events
            ),
        ));
    }
    let ids = match headers.get("idempotency-key") {
        None => Ids::Fresh,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Ids::Idempotency(k.to_string()),
            _ => {
                return Err(Problem::bad_request(
                    "idempotency-key",
                    "Idempotency-Key must be 1..=255 visible ASCII characters",
                ))
            }
        },
    };
    let ctx = IngestContext {
        ids,
        ..key_context(s, &principal, Source::Api)
    };
    let mut envelopes = Vec::with_capacity(raw_events.len());
    let mut errors = Vec::new();
    for (i, raw) in raw_events.into_iter().enumerate() {
        match ctx.envelope(i, raw) {
            Ok(env) => envelopes.push(env),
            Err(e) => errors.extend(e),
        }
    }
    if !errors.is_empty() {
        let n = errors
            .iter()
            .filter_map(|e| e.index)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        return Err(Problem::validation(
            format!("{n} event(s) are invalid; nothing was accepted"),
            errors,
        ));
    }
    produce_all(s, &envelopes).await?;
    metrics::counter!("ingest_events_total", "source" => "api").increment(envelopes.len() as u64);
    Ok(Accepted {
        accepted: envelopes.len(),
        ids: envelopes.iter().map(|e| e.id).collect(),
    })
}

/// How events sent with an API key are stamped and bounded: the key's tenant and id, now,
/// and the tenant's retention window. Events of the foreign formats, which carry no ids, get
/// ids derived from their content.
pub(crate) fn key_context(s: &AppState, principal: &KeyPrincipal, source: Source) -> IngestContext {
    IngestContext {
        tenant_id: principal.tenant_id,
        actor: Actor {
            user_id: None,
            api_key_id: Some(principal.key_id),
        },
        source,
        received_at: Utc::now(),
        bounds: TimeBounds {
            max_future_skew: chrono::Duration::seconds(s.config.max_future_skew_secs),
            retention: chrono::Duration::days(
                principal.raw_retention_days.min(s.config.retention_days),
            ),
        },
        ids: match source {
            Source::Otlp | Source::PromRw | Source::Influx => Ids::Content,
            _ => Ids::Fresh,
        },
    }
}

/// A request header as text (empty when absent or not visible ASCII).
pub(crate) fn header_text(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Problem> {
    let ct = header_text(headers, header::CONTENT_TYPE);
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(Problem::unsupported_media_type(format!(
            "Content-Type must be application/json, got `{ct}`"
        )))
    }
}

/// Reads the body as sent, within `limit` bytes (413 beyond; a broken connection is a 400).
pub(crate) async fn read_limited(body: Body, limit: usize) -> Result<axum::body::Bytes, Problem> {
    // A declared length over the limit is refused before anything is read.
    if http_body::Body::size_hint(&body).lower() > limit as u64 {
        return Err(Problem::too_large(limit));
    }
    to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` fails only for the length limit or a broken connection.
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit")
        {
            Problem::too_large(limit)
        } else {
            Problem::bad_request("body", format!("could not read the body: {e}"))
        }
    })
}

/// Reads the body within `limit` bytes, both as sent and after gzip decompression.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Vec<u8>, Problem> {
    let bytes = read_limited(body, limit).await?;
    let encoding = header_text(headers, header::CONTENT_ENCODING)
        .trim()
        .to_ascii_lowercase();
    match encoding.as_str() {
        "identity" | "" => Ok(bytes.into()),
        "gzip" => {
            let mut out = Vec::new();
            let mut decoder = flate2::read::GzDecoder::new(&bytes[..]).take(limit as u64 + 1);
            decoder.read_to_end(&mut out).map_err(|e| {
                Problem::bad_request("bad-encoding", format!("invalid gzip body: {e}"))
            })?;
            if out.len() > limit {
                return Err(Problem::too_large(limit));
            }
            Ok(out)
        }
        other => Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-encoding",
            "Unsupported content encoding",
            format!("Content-Encoding `{other}` is not supported; use gzip or none"),
        )),
    }
}

/// The largest event the log takes, as stored: Kafka's `message.max.bytes` (1 000 000) less
/// room for the key and headers.
const MAX_STORED_EVENT_BYTES: usize = 990_000;

fn event_too_large(env: &Envelope, size: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "event-too-large",
        "Event too large",
        format!(
            "event {} is {size} bytes as stored; the event log takes at most \
             {MAX_STORED_EVENT_BYTES}",
            env.id
        ),
    )
}

/// Starts every send, then waits for all acknowledgements together. Any failure (queue
/// full, broker unreachable within the timeout) is a 503: the client retries with the same
/// event ids, and the projector counts each id once.
pub(crate) async fn produce_all(s: &AppState, envelopes: &[Envelope]) -> Result<(), Problem> {
    let timeout = Duration::from_millis(s.config.produce_timeout_ms);
    let retry_after = timeout.as_secs().clamp(1, 30);
    let started = Instant::now();
    // Every event is serialized and sized before any is sent: one too large for the log
    // (`message.max.bytes`, 1 MB) refuses the request whole, and resending cannot help.
    let payloads = envelopes
        .iter()
        .map(|env| {
            let payload = serde_json::to_vec(env).map_err(|e| {
                tracing::error!(error = %e, "envelope serialization failed");
                Problem::internal()
            })?;
            if payload.len() > MAX_STORED_EVENT_BYTES {
                return Err(event_too_large(env, payload.len()));
            }
            Ok(payload)
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    let mut deliveries = Vec::with_capacity(envelopes.len());
    for (env, payload) in envelopes.iter().zip(&payloads) {
        let key = env.kafka_key();
        let version = env.schema_version.to_string();
        let headers = OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "type",
                value: Some(env.event_type.as_str()),
            })
            .insert(Header {
                key: "schema_version",
                value: Some(version.as_str()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        let record = FutureRecord::to(&s.topic)
            .key(&key)
            .payload(payload)
            .headers(headers);
        match s.producer.send_result(record) {
            Ok(delivery) => deliveries.push(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                return Err(event_too_large(env, payload.len()));
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                metrics::counter!("ingest_rejected_total", "reason" => "queue_full").increment(1);
                return Err(Problem::unavailable(
                    "the ingest queue is full; retry with the same event ids",
                    retry_after,
                ));
            }
            Err((e, _)) => {
                tracing::error!(error = %e, "kafka produce failed");
                return Err(Problem::unavailable(
                    "events could not be queued",
                    retry_after,
                ));
            }
        }
    }
    // librdkafka gives up on a record after `message.timeout.ms` (= the produce timeout); the
    // outer timeout is only a guard against a lost delivery report.
    let results =
        tokio::time::timeout(timeout + Duration::from_millis(500), join_all(deliveries)).await;
    metrics::histogram!("kafka_produce_seconds").record(started.elapsed().as_secs_f64());
    let failed = match results {
        Err(_) => Some("timed out".to_string()),
        Ok(results) => results.into_iter().find_map(|r| match r {
            Ok(Ok(_)) => None,
            Ok(Err((e, _))) => Some(e.to_string()),
            Err(_) => Some("delivery cancelled".into()),
        }),
    };
    match failed {
        None => Ok(()),
        Some(reason) => {
            tracing::warn!(%reason, events = envelopes.len(), "kafka did not acknowledge the batch");
            metrics::counter!("ingest_rejected_total", "reason" => "kafka_unavailable")
                .increment(1);
            Err(Problem::unavailable(
                "the event log did not acknowledge the events in time; retry with the same event ids",
                retry_after,
            ))
        }
    }
}
