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
use shared::auth::KeyPrincipal;
use shared::events::{FieldError, Source};

use crate::error::IngestError;
use crate::ingest::door::{append, header_text, ingest_door, key_context, read_body};
use crate::ingest::ClientEvent;
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
    ingest_door(s, parts.headers, |principal, headers| async move {
        let encoding = encoding(&headers)?;
        let bytes = read_body(body, &headers, s.config.max_body_bytes).await?;
        let req = otlp::decode::<S>(&bytes, encoding).map_err(|e| match e {
            DecodeError::Malformed(e) => IngestError::bad_request("bad-otlp", e),
            DecodeError::TooMany(e) => IngestError::too_many(e),
        })?;
        let converted = S::events(&req, chrono::Utc::now()).map_err(IngestError::too_many)?;
        let converted = take::<S>(s, &principal, converted).await?;
        Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, encoding.content_type())],
            otlp::encode_response::<S>(&converted, encoding),
        )
            .into_response())
    })
    .await
}

/// The sample Claude Code's `user_prompt` log records become.
const USER_PROMPT: &str = "claude_code.user_prompt";

/// [`drop_prompt_text`] of a converter's event.
fn drop_event_prompt(event: &mut ClientEvent) {
    match event {
        ClientEvent::Json(v) => drop_prompt_text(v),
        ClientEvent::Sample(s) if s.sample.name == USER_PROMPT => {
            s.sample.extra.remove("prompt");
            s.sample.labels.remove("prompt");
        }
        ClientEvent::Sample(_) => {}
    }
}

/// Claude Code's `user_prompt` event without the prompt's text (its length stays), for
/// tenants that do not store prompts.
pub(crate) fn drop_prompt_text(event: &mut serde_json::Value) {
    // Looked up by key, not by JSON pointer: this runs on every event of most requests.
    let Some(data) = event
        .get_mut("data")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return;
    };
    if data.get("name").and_then(serde_json::Value::as_str) != Some(USER_PROMPT) {
        return;
    }
    for place in ["extra", "labels"] {
        if let Some(m) = data
            .get_mut(place)
            .and_then(serde_json::Value::as_object_mut)
        {
            m.remove("prompt");
        }
    }
}

/// Whether an attribute or field named `key` holds what a command or tool was run with
/// (Claude Code's `tool_parameters`, the hook's `command`, `args`, `*_input`, …), as opposed to
/// what was run (`command_name`, `tool_name`).
fn is_argument(key: &str) -> bool {
    const NAMES: [&str; 11] = [
        "command",
        "full_command",
        "bash_command",
        "command_line",
        "cmd",
        "tool_parameters",
        "tool_input",
        "parameters",
        "arguments",
        "args",
        "input",
    ];
    const SUFFIXES: [&str; 6] = [
        "_parameters",
        "_arguments",
        "_args",
        "_input",
        ".parameters",
        ".arguments",
    ];
    // Compared without allocating: this runs for every key of every event a tenant sends.
    let ends_with = |suffix: &str| {
        key.len() >= suffix.len()
            && key.as_bytes()[key.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    NAMES.iter().any(|n| key.eq_ignore_ascii_case(n)) || SUFFIXES.iter().any(|s| ends_with(s))
}

/// An event without the arguments of the commands it describes — `command.executed`'s
/// `args`, and any argument-like key (see [`is_argument`]) in a `tool.executed`'s `details`,
/// an event's `extra` or `context`, or a sample's labels — for tenants that do not store
/// them. Done after validation, so validation does not depend on the tenant's choice.
pub(crate) fn drop_command_text(env: &mut shared::events::Envelope) {
    let Some(data) = env.data.as_object_mut() else {
        return;
    };
    data.remove("args");
    for place in ["details", "extra", "context", "labels", "metadata"] {
        if let Some(serde_json::Value::Object(m)) = data.get_mut(place) {
            m.retain(|k, _| !is_argument(k));
        }
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

/// Validates every event like any client's, appends the good ones, and returns what was
/// refused (by conversion or validation). Nothing taken at all is a 400. OTLP/gRPC shares it.
pub(crate) async fn take<S: Signal>(
    s: &AppState,
    principal: &KeyPrincipal,
    mut converted: Converted,
) -> Result<Converted, IngestError> {
    let ctx = key_context(s, principal, Source::Otlp);
    let mut envelopes = Vec::with_capacity(converted.events.len());
    let events = std::mem::take(&mut converted.events);
    let origins = std::mem::take(&mut converted.origins);
    for (i, (mut raw, origin)) in events.into_iter().zip(origins).enumerate() {
        if !principal.store_prompt_text {
            drop_event_prompt(&mut raw);
        }
        match ctx.client_envelope(i, raw) {
            Ok(mut env) => {
                if !principal.store_command_text {
                    drop_command_text(&mut env);
                }
                envelopes.push(env)
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
    if envelopes.is_empty() && !converted.rejected.is_empty() {
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
    append(s, &envelopes, S::SOURCE).await?;
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use shared::events::{Actor, Envelope, EventType, Source};
    use shared::tenant::TenantId;

    use super::*;

    fn envelope(event_type: EventType, data: serde_json::Value) -> Envelope {
        Envelope {
            id: uuid::Uuid::nil(),
            tenant_id: TenantId::new(),
            event_type,
            schema_version: 1,
            occurred_at: chrono::Utc::now(),
            received_at: chrono::Utc::now(),
            actor: Actor::default(),
            source: Source::Api,
            data,
        }
    }

    #[test]
    fn command_arguments_are_dropped_and_what_was_run_is_kept() {
        let mut tool = envelope(
            EventType::ToolExecuted,
            json!({"tool_name": "Bash", "details": {"tool_use_id": "t", "command": "cat ~/.ssh/id_rsa",
                   "tool_parameters": "{\"bash_command\":\"cat\"}", "tool_input": {"x": 1},
                   "decision_type": "accept"},
                   "extra": {"full_command": "rm -rf /", "mcp_input": "secret", "kept": 1}}),
        );
        drop_command_text(&mut tool);
        assert_eq!(
            tool.data,
            json!({"tool_name": "Bash", "details": {"tool_use_id": "t", "decision_type": "accept"},
                   "extra": {"kept": 1}})
        );
        let mut command = envelope(
            EventType::CommandExecuted,
            json!({"command_name": "deploy", "args": {"token": "s3cret"},
                   "context": {"cwd": "/repo", "command_line": "deploy --token s3cret"}}),
        );
        drop_command_text(&mut command);
        assert_eq!(
            command.data,
            json!({"command_name": "deploy", "context": {"cwd": "/repo"}})
        );
        let mut sample = envelope(
            EventType::MetricSample,
            json!({"name": "codex.exec", "labels": {"command": "ls -la", "command_name": "exec"}}),
        );
        drop_command_text(&mut sample);
        assert_eq!(sample.data["labels"], json!({"command_name": "exec"}));
        assert!(
            is_argument("Tool_Parameters") && is_argument("MCP_INPUT") && !is_argument("inputs")
        );
    }
}
