//! OTLP/HTTP: `POST /v1/otlp/v1/metrics` and `POST /v1/otlp/v1/logs`, protobuf
//! (`application/x-protobuf`) or JSON (`application/json`), gzip or not, authenticated with an
//! ingest key (`Authorization: Bearer <key>`). Point an exporter's
//! `OTEL_EXPORTER_OTLP_ENDPOINT` at `<ingest-api>/v1/otlp`. See `crate::formats::otlp` for what
//! becomes of each point and record.
//!
//! Answers, as OTLP senders expect them:
//! - 200 with an empty `Export…ServiceResponse` when everything was taken, or with
//!   `partial_success` (how many were refused and why) when some points were refused; the
//!   answer is in the request's encoding.
//! - 400 (`application/problem+json`) when the body cannot be read or every point was
//!   refused; 413 when it is too large or holds too many points, records or attributes
//!   (counted before it is decoded, see `crate::formats::otlp::wire`); 415 for another content type
//!   or encoding. Senders do not retry these.
//! - 429 and 503 (with `Retry-After`): retried by senders. Each point's event id is derived
//!   from its content, so a resent request is projected once (records that carry no time at
//!   all take the time they arrive, so a resend of those cannot be recognised).

use crate::formats::otlp::{self, Converted, DecodeError, Encoding, Logs, Metrics, Signal};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::events::{FieldError, Source};
use shared::serve::Peer;

use crate::error::IngestError;
use crate::ingest::door::{append_counted, header_text, ingest_door, keep, key_context, read_body};
use crate::ingest::privacy::{drop_prompt_text, drop_sample_prompt, drop_stamped_command_text};
use crate::ingest::sink::{Batch, Batching};
use crate::ingest::{ClientEvent, IngestContext, Keep};
use crate::state::AppState;

pub async fn metrics(State(s): State<AppState>, request: Request) -> Response {
    export::<Metrics>(s, request).await
}

pub async fn logs(State(s): State<AppState>, request: Request) -> Response {
    export::<Logs>(s, request).await
}

async fn export<S: Signal>(s: AppState, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let s = &s;
    ingest_door(
        s,
        parts.headers,
        Peer::of(&parts.extensions),
        |principal, headers| async move {
            let encoding = encoding(&headers)?;
            let body = read_body(s, principal.tenant_id, body, &headers).await?;
            let (ctx, keep) = (key_context(s, &principal, Source::Otlp), keep(&principal));
            // The body and its points' trees are let go of once they are stamped and
            // serialized: only the records are held while the log acknowledges them.
            let (converted, batch) = body
                .work(&s.lane, principal.tenant_id, move |bytes| {
                    let req = otlp::decode::<S>(bytes, encoding).map_err(|e| match e {
                        DecodeError::Malformed(e) => IngestError::bad_request("bad-otlp", e),
                        DecodeError::TooMany(e) => IngestError::too_many(e),
                    })?;
                    let converted =
                        S::events(&req, ctx.received_at).map_err(IngestError::too_many)?;
                    drop(req);
                    stamp::<S>(&ctx, keep, converted)
                })
                .await?;
            append_counted(s, &principal, batch, S::SOURCE).await?;
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, encoding.content_type())],
                otlp::encode_response::<S>(&converted, encoding),
            )
                .into_response())
        },
    )
    .await
}

/// [`drop_prompt_text`] of a converter's event.
fn drop_event_prompt(event: &mut ClientEvent) {
    match event {
        ClientEvent::Json(v) => drop_prompt_text(v),
        ClientEvent::Sample(s) => drop_sample_prompt(&mut s.sample),
    }
}

fn encoding(headers: &HeaderMap) -> Result<Encoding, IngestError> {
    let ct = header_text(headers, header::CONTENT_TYPE);
    Encoding::from_content_type(ct).ok_or_else(|| {
        IngestError::unsupported_media_type(format!(
            "OTLP/HTTP is application/x-protobuf or application/json, got `{ct}`"
        ))
    })
}

/// Every converted event validated like any client's, with the tenant's drops: the good
/// ones stamped, and what was refused (by conversion or validation) added to `converted`.
/// Nothing good at all is a 400. OTLP/gRPC uses it.
pub(crate) fn stamp<S: Signal>(
    ctx: &IngestContext,
    keep: Keep,
    mut converted: Converted,
) -> Result<(Converted, Batch), IngestError> {
    let mut batch = Batching::with_capacity(converted.events.len());
    let events = std::mem::take(&mut converted.events);
    let origins = std::mem::take(&mut converted.origins);
    for (i, (mut raw, origin)) in events.into_iter().zip(origins).enumerate() {
        if !keep.prompts {
            drop_event_prompt(&mut raw);
        }
        match ctx.client_envelope(i, raw) {
            Ok(mut env) => {
                if !keep.commands {
                    drop_stamped_command_text(&mut env);
                }
                batch.push(env)
            }
            // One refusal per point, named by its OTLP path, with every reason.
            Err(errors) => converted.rejected.push(FieldError::new(
                origin.to_string(),
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.reason))
                    .collect::<Vec<_>>()
                    .join("; "),
            )),
        }
    }
    // An event too large for the log refuses the request (413), whatever else was refused.
    let batch = batch.finish()?;
    if batch.is_empty() && !converted.rejected.is_empty() {
        return Err(IngestError::bad_request(
            "invalid-points",
            format!(
                "all {} were refused ({})",
                S::ITEMS,
                converted.rejected.len()
            ),
        )
        .with_errors(std::mem::take(&mut converted.rejected)));
    }
    Ok((converted, batch))
}
