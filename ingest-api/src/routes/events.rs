//! `POST /v1/events`: one event or an array of them, appended to Kafka before the answer.
//!
//! Batches are all-or-nothing: if any event is invalid, none is sent and the problem lists
//! every offending field with the event's index.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;
use shared::auth::KeyPrincipal;
use shared::events::{FieldError, Source};
use shared::serve::Peer;
use uuid::Uuid;

use crate::error::IngestError;
use crate::ingest::door::{append_counted, header_text, ingest_door, keep, key_context, read_body};
use crate::ingest::envelope::event_texts;
use crate::ingest::sink::{Batch, Batching};
use crate::ingest::values;
use crate::ingest::{Ids, IngestContext, Keep};
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
    ingest_door(
        s,
        parts.headers,
        Peer::of(&parts.extensions),
        |principal, headers| async move {
            let accepted = accept(s, principal, &headers, body).await?;
            Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
        },
    )
    .await
}

async fn accept(
    s: &AppState,
    principal: KeyPrincipal,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, IngestError> {
    check_content_type(headers)?;
    let body = read_body(s, principal.tenant_id, body, headers).await?;
    let ctx = context(s, &principal, headers);
    let (keep, max) = (keep(&principal), s.config.max_batch_events);
    // Each event's tree is let go of once it is stamped and serialized, and the body once
    // they all are: only the records are held while they are counted and the log
    // acknowledges them.
    let batch = body
        .work(&s.lane, principal.tenant_id, move |bytes| {
            stamp(bytes, max, ctx, keep)
        })
        .await?;
    let ids: Vec<Uuid> = batch.ids().collect();
    append_counted(s, &principal, batch, "api").await?;
    Ok(Accepted {
        accepted: ids.len(),
        ids,
    })
}

/// Every event of the body stamped into a batch, or every problem with them. `ctx` is how
/// they are stamped (its error is the request's, once the body is known to be a batch).
fn stamp(
    bytes: &[u8],
    max: usize,
    ctx: Result<IngestContext, IngestError>,
    keep: Keep,
) -> Result<Batch, IngestError> {
    values::check(bytes)?;
    // Nearly every request: its events read from their text. Anything that text cannot
    // settle (a body that is not a batch of 1 to `max` objects, a bad header) is read as
    // before, as one tree, so that every refusal is the same.
    let stamped = event_texts(bytes, max).and_then(|texts| {
        let into = Batching::with_capacity(texts.len());
        ctx.as_ref().ok()?.stamp_texts_into(&texts, keep, into)
    });
    let stamped = match stamped {
        Some(stamped) => stamped,
        None => stamp_tree(bytes, max, ctx, keep)?,
    };
    let batching = stamped.map_err(|errors| {
        let n = errors
            .iter()
            .filter_map(|e| e.index)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        IngestError::validation(
            format!("{n} event(s) are invalid; nothing was accepted"),
            errors,
        )
    })?;
    batching.finish()
}

/// Every event stamped from the body's tree.
fn stamp_tree(
    bytes: &[u8],
    max: usize,
    ctx: Result<IngestContext, IngestError>,
    keep: Keep,
) -> Result<Result<Batching, Vec<FieldError>>, IngestError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        IngestError::bad_request("malformed-json", format!("the body is not valid JSON: {e}"))
    })?;
    let raw_events = match value {
        Value::Array(items) => items,
        obj @ Value::Object(_) => vec![obj],
        _ => {
            return Err(IngestError::validation(
                "the body must be an event object or an array of events",
                vec![],
            ))
        }
    };
    if raw_events.is_empty() {
        return Err(IngestError::validation("the batch is empty", vec![]));
    }
    if raw_events.len() > max {
        return Err(IngestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch-too-large",
            "Batch too large",
            format!(
                "{} events in one request; at most {max} are accepted",
                raw_events.len(),
            ),
        ));
    }
    let into = Batching::with_capacity(raw_events.len());
    Ok(ctx?.stamp_trees_into(raw_events, keep, into))
}

/// How the request's events are stamped: the key's, with ids from its `Idempotency-Key`.
fn context(
    s: &AppState,
    principal: &KeyPrincipal,
    headers: &HeaderMap,
) -> Result<IngestContext, IngestError> {
    let ids = match headers.get("idempotency-key") {
        None => Ids::Fresh,
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Ids::Idempotency(k.to_string()),
            _ => {
                return Err(IngestError::bad_request(
                    "idempotency-key",
                    "Idempotency-Key must be 1..=255 visible ASCII characters",
                ))
            }
        },
    };
    Ok(IngestContext {
        ids,
        ..key_context(s, principal, Source::Api)
    })
}

fn check_content_type(headers: &HeaderMap) -> Result<(), IngestError> {
    let ct = header_text(headers, header::CONTENT_TYPE);
    let mime = ct.split(';').next().unwrap_or("").trim();
    if mime.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(IngestError::unsupported_media_type(format!(
            "Content-Type must be application/json, got `{ct}`"
        )))
    }
}
