//! `POST /api/v2/write?precision=ns|us|ms|s`: InfluxDB line protocol, as Telegraf and the
//! Influx clients send it (`Authorization: Token <ingest key>`). Every numeric or boolean
//! field becomes a `metric.sample` (see `crate::formats::lineproto`).
//!
//! Lines are taken one by one, like InfluxDB does: the good ones are appended to Kafka, and
//! if any line was bad the answer is a 400 problem naming each bad line by number (a partial
//! write; clients do not retry a 4xx). All good: 204. A request too large as sent, once
//! decompressed, or for the samples it would make (see `crate::formats::lineproto`) is a 413.

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use shared::auth::KeyPrincipal;
use shared::events::{FieldError, Source};
use shared::serve::Peer;

use crate::error::IngestError;
use crate::formats::lineproto::{self, Precision};
use crate::ingest::door::{append_counted, ingest_door, keep, key_context, read_body};
use crate::ingest::sink::Batching;
use crate::ingest::{IngestContext, Keep};
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct WriteParams {
    pub precision: Option<String>,
    /// InfluxDB's bucket and org are accepted and ignored: the key names the tenant.
    pub bucket: Option<String>,
    pub org: Option<String>,
}

pub async fn write(
    State(s): State<AppState>,
    params: Result<Query<WriteParams>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let s = &s;
    ingest_door(
        s,
        parts.headers,
        Peer::of(&parts.extensions),
        |principal, headers| async move {
            let Query(params) =
                params.map_err(|e| IngestError::bad_request("invalid-parameter", e.body_text()))?;
            accept(s, principal, &headers, &params, body).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        },
    )
    .await
}

async fn accept(
    s: &AppState,
    principal: KeyPrincipal,
    headers: &HeaderMap,
    params: &WriteParams,
    body: axum::body::Body,
) -> Result<(), IngestError> {
    let precision = Precision::parse(params.precision.as_deref()).ok_or_else(|| {
        IngestError::bad_request("invalid-parameter", "precision: must be ns, us, ms or s")
            .with_errors(vec![FieldError::new(
                "precision",
                "must be ns, us, ms or s",
            )])
    })?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("text/plain");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !["text/plain", "application/octet-stream", ""].contains(&mime.as_str()) {
        return Err(IngestError::unsupported_media_type(format!(
            "line protocol is text/plain, got `{ct}`"
        )));
    }
    let body = read_body(s, principal.tenant_id, body, headers).await?;
    let now = Utc::now();
    let ctx = IngestContext {
        received_at: now,
        ..key_context(s, &principal, Source::Influx)
    };
    let keep = keep(&principal);
    // The body is let go of once its lines are stamped: nothing of it is held while the log
    // acknowledges them.
    let (batch, mut bad, accepted) = body
        .work(&s.lane, principal.tenant_id, move |bytes| {
            let (batch, bad, accepted) = stamp(bytes, precision, &ctx, keep)?;
            Ok((batch.finish()?, bad, accepted))
        })
        .await?;
    let samples = batch.len();
    append_counted(s, &principal, batch, "influx").await?;
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort_by_key(|e| e.line);
    Err(IngestError::bad_request(
        "partial-write",
        format!(
            "partial write: {} line(s) refused, {accepted} line(s) accepted ({samples} samples)",
            bad.len(),
        ),
    )
    .with_errors(
        bad.into_iter()
            .map(|e| FieldError::new(format!("line {}", e.line), e.reason))
            .collect(),
    ))
}

/// The body's good lines stamped (each line's samples validated like any event, with the
/// tenant's drops, see `crate::ingest::privacy`; a line is taken whole or not at all), its
/// bad lines, and how many lines were good.
fn stamp(
    bytes: &[u8],
    precision: Precision,
    ctx: &IngestContext,
    keep: Keep,
) -> Result<(Batching, Vec<lineproto::LineError>, usize), IngestError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        IngestError::bad_request("bad-encoding", format!("the body is not UTF-8: {e}"))
    })?;
    if text.lines().count() > lineproto::MAX_LINES {
        return Err(IngestError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-many-lines",
            "Too many lines",
            format!("at most {} lines per request", lineproto::MAX_LINES),
        ));
    }
    let (points, mut bad) = lineproto::parse(text, precision).map_err(IngestError::too_many)?;
    let mut envelopes = Batching::with_capacity(points.len());
    let mut accepted = 0;
    for p in &points {
        let mut line_envelopes = Vec::new();
        let mut reasons = Vec::new();
        for raw in p.to_events(ctx.received_at) {
            match ctx.stamp(envelopes.len() + line_envelopes.len(), raw, keep) {
                Ok(env) => line_envelopes.push(env),
                Err(errors) => reasons.extend(
                    errors
                        .into_iter()
                        .map(|e| format!("{}: {}", e.field, e.reason)),
                ),
            }
        }
        if reasons.is_empty() {
            accepted += 1;
            envelopes.extend(line_envelopes);
        } else {
            bad.push(lineproto::LineError {
                line: p.line,
                reason: reasons.join("; "),
            });
        }
    }
    Ok((envelopes, bad, accepted))
}
