//! What PostgreSQL could not store, or the log's readers read back, refused at the door. The projector relies on the
//! database's own refusal and the DLQ instead, so records already in the log are handled too.

use serde_json::Value;
use shared::events::{FieldError, Payload};

use super::values::RESERVED_PREFIX;

/// Most bytes of a value that becomes part of a rollup key (user, team, project, session,
/// name). Four such values and the event type must fit in one btree index row, which
/// PostgreSQL limits to 2 704 bytes; 255 characters may take up to 1 020 bytes.
pub const MAX_KEY_BYTES: usize = 600;
/// Largest magnitude of a sample's or productivity figure's `value`: dashboards sum values
/// over any range (a week's buckets, a metric's raw rows), and two values near float8's limit
/// overflow such a sum, which PostgreSQL refuses, failing every read of that range. Below this
/// bound, no number of events reaches the limit; no real measurement comes near it.
pub const MAX_VALUE: f64 = 1e200;

/// The label names whose values fill a `metric.sample`'s user, team, project and session.
pub const DIMENSION_LABELS: [&str; 8] = [
    "user_id",
    "user.id",
    "team_id",
    "team.id",
    "project_id",
    "project.id",
    "session_id",
    "session.id",
];

/// The fields of a `metric.sample` named by [`DIMENSION_LABELS`], in their order.
const DIMENSION_FIELDS: [&str; 8] = [
    "labels.user_id",
    "labels.user.id",
    "labels.team_id",
    "labels.team.id",
    "labels.project_id",
    "labels.project.id",
    "labels.session_id",
    "labels.session.id",
];

/// Every value of `payload` that becomes part of a rollup key and is longer than
/// [`MAX_KEY_BYTES`]. Allocates nothing for a payload within the bound, as nearly every one
/// is: this runs on every event.
pub fn check_storable(payload: &Payload, prefix: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut key = |field: &str, v: Option<&str>| {
        if let Some(v) = v.filter(|v| v.len() > MAX_KEY_BYTES) {
            errors.push(FieldError::new(
                format!("{prefix}.{field}"),
                format!(
                    "at most {MAX_KEY_BYTES} bytes of UTF-8 (it is part of a rollup key), got {}",
                    v.len()
                ),
            ));
        }
    };
    let mut ids = |user: Option<&str>, team: &Option<String>, project: &Option<String>| {
        key("user_id", user);
        key("team_id", team.as_deref());
        key("project_id", project.as_deref());
    };
    match payload {
        Payload::CommandExecuted(p) => {
            ids(Some(&p.user_id), &p.team_id, &p.project_id);
            key("command_name", Some(&p.command_name));
        }
        Payload::AgentInteracted(p) => {
            ids(Some(&p.user_id), &p.team_id, &p.project_id);
            key("agent_name", Some(&p.agent_name));
        }
        Payload::ToolExecuted(p) => {
            ids(Some(&p.user_id), &p.team_id, &p.project_id);
            key("tool_name", Some(&p.tool_name));
            key("session_id", Some(&p.session_id));
        }
        Payload::SessionStarted(p) => {
            ids(Some(&p.user_id), &p.team_id, &p.project_id);
            key("session_id", Some(&p.session_id));
        }
        Payload::SessionEnded(p) => {
            ids(Some(&p.user_id), &p.team_id, &p.project_id);
            key("session_id", Some(&p.session_id));
        }
        Payload::SessionContext(p) => {
            ids(Some(&p.user_id), &p.team_id, &p.project_id);
            key("session_id", Some(&p.session_id));
            key("repository", p.repository.as_deref());
            key("branch", p.branch.as_deref());
        }
        Payload::PullRequestChanged(p) => {
            key("repository", Some(&p.repository));
            key("head_branch", Some(&p.head_branch));
        }
        Payload::BranchPushed(p) => {
            key("repository", Some(&p.repository));
            key("branch", Some(&p.branch));
        }
        Payload::ProductivityRecorded(p) => {
            ids(p.user_id.as_deref(), &p.team_id, &p.project_id);
        }
        Payload::MetricSample(p) => {
            key("name", Some(&p.name));
            for (label, field) in DIMENSION_LABELS.iter().zip(DIMENSION_FIELDS) {
                key(field, p.labels.get(*label).map(String::as_str));
            }
        }
        Payload::Auth(..) => {}
    }
    let value = match payload {
        Payload::MetricSample(p) => Some(p.value),
        Payload::ProductivityRecorded(p) => Some(p.value),
        _ => None,
    };
    if let Some(v) = value.filter(|v| v.abs() > MAX_VALUE) {
        errors.push(FieldError::new(
            format!("{prefix}.value"),
            format!(
                "must be within ±{MAX_VALUE:e} (sums over a range must stay finite), got {v:e}"
            ),
        ));
    }
    errors
}

/// Why PostgreSQL or the log's readers could not take a key back: a NUL character, which
/// PostgreSQL stores neither in text nor in jsonb, or serde_json's reserved prefix (see
/// [`RESERVED_PREFIX`]), which makes its reader parse the key's value as a document.
pub fn key_fault(k: &str) -> Option<&'static str> {
    if k.contains('\0') {
        Some(NUL)
    } else if k.starts_with(RESERVED_PREFIX) {
        Some("starts with `$serde_json::private::`, which the JSON reader reserves")
    } else {
        None
    }
}

const NUL: &str = "contains a NUL character (\\u0000), which cannot be stored";

/// Whether a string or object key under `v` is one that could not be stored or read back
/// ([`key_fault`]; a string, for its NUL).
pub fn has_unstorable(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_unstorable),
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| key_fault(k).is_some() || has_unstorable(v)),
        _ => false,
    }
}

/// Every string and object key under `v` that could not be stored or read back (see
/// [`has_unstorable`]), named by its path below `path` (`data.args.k`, `teams[1]`).
/// Allocates nothing when there is none, as for nearly every event.
pub fn unstorable_paths(v: &Value, path: &str) -> Vec<FieldError> {
    fn walk(v: &Value, path: &mut String, out: &mut Vec<FieldError>) {
        match v {
            Value::String(s) if s.contains('\0') => out.push(FieldError::new(path.clone(), NUL)),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(item, path, out);
                    path.truncate(len);
                }
            }
            Value::Object(m) => {
                for (k, item) in m {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(&k.replace('\0', "\\u0000"));
                    if let Some(reason) = key_fault(k) {
                        out.push(FieldError::new(path.clone(), reason));
                    }
                    walk(item, path, out);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if has_unstorable(v) {
        walk(v, &mut path.to_string(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimension_fields_name_the_dimension_labels() {
        for (label, field) in DIMENSION_LABELS.iter().zip(DIMENSION_FIELDS) {
            assert_eq!(field, format!("labels.{label}"));
        }
    }
}
