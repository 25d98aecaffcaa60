//! What PostgreSQL could not store, refused at the door. The projector relies on the
//! database's own refusal and the DLQ instead, so records already in the log are handled too.

use serde_json::Value;
use shared::events::{FieldError, Payload};

/// Most bytes of a value that becomes part of a rollup key (user, team, project, session,
/// name). Four such values and the event type must fit in one btree index row, which
/// PostgreSQL limits to 2 704 bytes; 255 characters may take up to 1 020 bytes.
pub const MAX_KEY_BYTES: usize = 600;
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

/// Every value of `payload` that becomes part of a rollup key and is longer than
/// [`MAX_KEY_BYTES`].
pub fn check_storable(payload: &Payload, prefix: &str) -> Vec<FieldError> {
    fn ids<'a>(
        keys: &mut Vec<(String, &'a str)>,
        user: Option<&'a str>,
        team: &'a Option<String>,
        project: &'a Option<String>,
    ) {
        for (f, v) in [
            ("user_id", user),
            ("team_id", team.as_deref()),
            ("project_id", project.as_deref()),
        ] {
            if let Some(v) = v {
                keys.push((f.to_string(), v));
            }
        }
    }
    let mut keys: Vec<(String, &str)> = Vec::new();
    match payload {
        Payload::CommandExecuted(p) => {
            ids(&mut keys, Some(&p.user_id), &p.team_id, &p.project_id);
            keys.push(("command_name".into(), &p.command_name));
        }
        Payload::AgentInteracted(p) => {
            ids(&mut keys, Some(&p.user_id), &p.team_id, &p.project_id);
            keys.push(("agent_name".into(), &p.agent_name));
        }
        Payload::ToolExecuted(p) => {
            ids(&mut keys, Some(&p.user_id), &p.team_id, &p.project_id);
            keys.push(("tool_name".into(), &p.tool_name));
            keys.push(("session_id".into(), &p.session_id));
        }
        Payload::SessionStarted(p) => {
            ids(&mut keys, Some(&p.user_id), &p.team_id, &p.project_id);
            keys.push(("session_id".into(), &p.session_id));
        }
        Payload::SessionEnded(p) => {
            ids(&mut keys, Some(&p.user_id), &p.team_id, &p.project_id);
            keys.push(("session_id".into(), &p.session_id));
        }
        Payload::SessionContext(p) => {
            ids(&mut keys, Some(&p.user_id), &p.team_id, &p.project_id);
            keys.push(("session_id".into(), &p.session_id));
            for (f, v) in [("repository", &p.repository), ("branch", &p.branch)] {
                if let Some(v) = v {
                    keys.push((f.into(), v));
                }
            }
        }
        Payload::PullRequestChanged(p) => {
            keys.push(("repository".into(), &p.repository));
            keys.push(("head_branch".into(), &p.head_branch));
        }
        Payload::BranchPushed(p) => {
            keys.push(("repository".into(), &p.repository));
            keys.push(("branch".into(), &p.branch));
        }
        Payload::ProductivityRecorded(p) => {
            ids(&mut keys, p.user_id.as_deref(), &p.team_id, &p.project_id);
        }
        Payload::MetricSample(p) => {
            keys.push(("name".into(), &p.name));
            for l in DIMENSION_LABELS {
                if let Some(v) = p.labels.get(l) {
                    keys.push((format!("labels.{l}"), v));
                }
            }
        }
        Payload::Auth(..) => {}
    }
    keys.into_iter()
        .filter(|(_, v)| v.len() > MAX_KEY_BYTES)
        .map(|(f, v)| {
            FieldError::new(
                format!("{prefix}.{f}"),
                format!(
                    "at most {MAX_KEY_BYTES} bytes of UTF-8 (it is part of a rollup key), got {}",
                    v.len()
                ),
            )
        })
        .collect()
}

/// Every string and object key under `v` holding a NUL character, which PostgreSQL can store
/// neither in text nor in jsonb, named by its path below `path` (`data.args.k`, `teams[1]`).
/// Allocates nothing when there is none, as for nearly every event.
pub fn nul_paths(v: &Value, path: &str) -> Vec<FieldError> {
    fn any(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(any),
            Value::Object(m) => m.iter().any(|(k, v)| k.contains('\0') || any(v)),
            _ => false,
        }
    }
    fn walk(v: &Value, path: &mut String, out: &mut Vec<FieldError>) {
        const REASON: &str = "contains a NUL character (\\u0000), which cannot be stored";
        match v {
            Value::String(s) if s.contains('\0') => out.push(FieldError::new(path.clone(), REASON)),
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
                    if k.contains('\0') {
                        out.push(FieldError::new(path.clone(), REASON));
                    }
                    walk(item, path, out);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    if any(v) {
        walk(v, &mut path.to_string(), &mut out);
    }
    out
}
