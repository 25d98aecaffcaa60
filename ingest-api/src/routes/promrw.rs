//! `POST /api/v1/write`: Prometheus remote write 1.0 (snappy-compressed protobuf), as
//! Prometheus, its agent mode and Grafana Agent send it, authenticated with an ingest key as
//! a bearer token. All or nothing: any invalid series refuses the request with a 400 naming
//! it (senders drop a 4xx batch instead of retrying it); 429 and 503 are retried by senders.
//! A body too large, or one whose series, samples or repeated labels would make too much
//! (counted before it is decoded, see `crate::formats::promrw`), is a 413.
//! Remote write 2.0 (`proto=io.prometheus.write.v2.Request`) is refused with 415, so a 2.0
//! sender falls back to 1.0.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use shared::events::{FieldError, Source};
use shared::serve::Peer;

use crate::error::IngestError;
use crate::formats::promrw;
use crate::ingest::door::{
    append_counted, header_text, ingest_door, keep, key_context, read_limited,
};
use crate::ingest::envelope::whole_batch;
use crate::ingest::sink::{Batch, Batching};
use crate::ingest::{IngestContext, Keep};
use crate::shed::Charges;
use crate::state::AppState;

pub async fn write(State(s): State<AppState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let s = &s;
    ingest_door(
        s,
        parts.headers,
        Peer::of(&parts.extensions),
        |principal, headers| async move {
            check_headers(&headers)?;
            let limit = s.config.max_body_bytes;
            let declared = s.shed.declared(&headers);
            let mut charges = Charges::new(&s.shed, principal.tenant_id, declared);
            let within = s.body_timeout();
            let bytes = read_limited(body, limit, &mut charges, within).await?;
            let (ctx, keep) = (key_context(s, &principal, Source::PromRw), keep(&principal));
            // A body is as large as snappy's header says it inflates to (refused at once past the
            // limit, and charged for it). It is let go of once its samples are stamped: nothing of
            // it is held while the log acknowledges them.
            let inflated = snap::raw::decompress_len(&bytes).unwrap_or(0);
            if inflated > limit {
                return Err(IngestError::too_large(limit));
            }
            charges.up_to(inflated)?;
            let size = inflated.max(bytes.len());
            let work = move || {
                let _charges = charges;
                let req = promrw::decode(&bytes, limit).map_err(|e| match e {
                    promrw::DecodeError::TooLarge { .. } => IngestError::too_large(limit),
                    promrw::DecodeError::Exceeds(e) => IngestError::too_many(e),
                    promrw::DecodeError::Invalid(errors) => invalid_series(errors, "request"),
                    other => IngestError::bad_request("bad-remote-write", other.to_string()),
                })?;
                stamp(&ctx, keep, &req)
            };
            let batch = s
                .lane
                .run_if(s.lane.takes(size), principal.tenant_id, work)
                .await?;
            append_counted(s, &principal, batch, "prom_rw").await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

fn check_headers(headers: &HeaderMap) -> Result<(), IngestError> {
    let unsupported = IngestError::unsupported_media_type;
    let get = |h| header_text(headers, h).trim().to_ascii_lowercase();
    let ct = get(header::CONTENT_TYPE);
    let mut parts = ct.split(';').map(str::trim);
    if parts.next() != Some("application/x-protobuf") {
        return Err(unsupported(format!(
            "remote write is application/x-protobuf, got `{ct}`"
        )));
    }
    if let Some(proto) = parts.find_map(|p| p.strip_prefix("proto=")) {
        if proto != "prometheus.writerequest" {
            return Err(unsupported(format!(
                "only remote write 1.0 (prometheus.WriteRequest) is accepted, not `{proto}`"
            )));
        }
    }
    let encoding = get(header::CONTENT_ENCODING);
    if encoding != "snappy" {
        return Err(unsupported(format!(
            "remote write bodies are snappy-compressed (Content-Encoding: snappy), got `{encoding}`"
        )));
    }
    Ok(())
}

/// A 400 listing every problem found in the `part` (request or samples).
fn invalid_series(errors: Vec<FieldError>, part: &str) -> IngestError {
    IngestError::bad_request(
        "invalid-series",
        format!(
            "{} problem(s) in the {part}; nothing was accepted",
            errors.len()
        ),
    )
    .with_errors(errors)
}

/// Every sample of the request stamped, with the tenant's drops (see
/// [`crate::ingest::privacy`]), or every problem with them.
fn stamp(
    ctx: &IngestContext,
    keep: Keep,
    req: &promrw::WriteRequest,
) -> Result<Batch, IngestError> {
    let events = promrw::to_events(req).map_err(|errors| invalid_series(errors, "request"))?;
    let into = Batching::with_capacity(events.len());
    whole_batch(
        events
            .into_iter()
            .enumerate()
            .map(|(i, raw)| ctx.stamp(i, raw, keep)),
        into,
    )
    .map_err(|errors| invalid_series(errors, "samples"))?
    .finish()
}
