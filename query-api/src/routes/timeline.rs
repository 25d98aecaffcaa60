//! One session's timeline: its prompts, API requests, tool decisions and runs, context
//! changes, start and end, in time order and grouped by Claude Code's `prompt.id`, with the
//! session's totals and its most expensive prompts. Read from the raw rows of the session
//! (indexed by session), only those the reader may see: a developer their own, a manager
//! their teams'. A session with nothing visible is a 404, as one that does not exist.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::response::Response;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::events::FieldError;
use shared::problem::Problem;
use sqlx::AssertSqlSafe;

use crate::range::TimeRange;
use crate::read::{db_error, invalid, Read, TenantRead};

/// Most rows one timeline reads of each kind (of the fields it shows only, prompts' text cut
/// to [`MAX_TEXT`] characters).
pub const MAX_ITEMS: i64 = 2000;
/// Most characters of a prompt's text shown.
pub const MAX_TEXT: i32 = 4000;

/// Every visible raw row of the session, by kind, oldest first; `$1` the session, `$2` the
/// reader's user (or null), `$3` their teams (or null), `$4` [`MAX_ITEMS`], `$5` [`MAX_TEXT`].
/// Fields from payloads' open maps (`metadata`, `details`, `context`) are shown only as
/// [`bounded`] scalars: an event may hold up to about 990 KB there, and a timeline reads up to
/// [`MAX_ITEMS`] rows of each kind.
static TIMELINE_SQL: LazyLock<String> = LazyLock::new(|| {
    bounded(
        "(SELECT occurred_at, 'agent' AS k, user_id, status, duration_ms, input_tokens,
         output_tokens, value,
         jsonb_build_object(
            'model', SMALL(data->'model'), 'cache_read_tokens', data->'cache_read_tokens',
            'cache_creation_tokens', data->'cache_creation_tokens',
            'error_message', left(data->>'error_message', 500),
            'metadata', jsonb_build_object(
                'prompt.id', SMALL(data->'metadata'->'prompt.id'),
                'attempt', SMALL(data->'metadata'->'attempt'),
                'status_code', SMALL(data->'metadata'->'status_code'),
                'request_id', SMALL(data->'metadata'->'request_id'),
                'query_source', SMALL(data->'metadata'->'query_source')))
    FROM agent_interactions
   WHERE session_id = $1 AND ($2::text IS NULL OR user_id = $2)
     AND ($3::text[] IS NULL OR team_id = ANY($3))
   ORDER BY occurred_at LIMIT $4)
 UNION ALL
 (SELECT occurred_at, 'tool', user_id, status, duration_ms, 0, 0, 0,
         jsonb_build_object(
            'tool_name', SMALL(data->'tool_name'),
            'error_message', left(data->>'error_message', 500),
            'details', jsonb_build_object(
                'prompt.id', SMALL(data->'details'->'prompt.id'),
                'tool_use_id', SMALL(data->'details'->'tool_use_id'),
                'decision_type', SMALL(data->'details'->'decision_type')))
    FROM tool_executions
   WHERE session_id = $1 AND ($2::text IS NULL OR user_id = $2)
     AND ($3::text[] IS NULL OR team_id = ANY($3))
   ORDER BY occurred_at LIMIT $4)
 UNION ALL
 (SELECT occurred_at, 'sample', user_id, name, 0, 0, 0, value,
         jsonb_build_object(
            'labels', (SELECT COALESCE(jsonb_object_agg(k, left(v, 255)), '{}')
                         FROM jsonb_each_text(data->'labels') AS l(k, v)
                        WHERE k IN ('prompt.id', 'prompt_length', 'command_name',
                                    'tool_name', 'decision', 'source',
                                    'tool_use_id')),
            'extra', jsonb_build_object(
                'prompt', left(COALESCE(data->'extra'->>'prompt',
                                        data->'labels'->>'prompt'), $5)))
    FROM metric_samples
   WHERE session_id = $1 AND session_id <> ''
     AND name IN ('claude_code.user_prompt', 'claude_code.tool_decision',
                  'claude_code.api_retries_exhausted')
     AND ($2::text IS NULL OR user_id = $2)
     AND ($3::text[] IS NULL OR team_id = ANY($3))
   ORDER BY occurred_at LIMIT $4)
 UNION ALL
 (SELECT occurred_at, 'session', user_id, name, 0, 0, 0, 0,
         jsonb_build_object('context', jsonb_build_object(
            'source', SMALL(data->'context'->'source'),
            'reason', SMALL(data->'context'->'reason'),
            'model', SMALL(data->'context'->'model')))
    FROM session_events
   WHERE session_id = $1 AND name IN ('started', 'ended')
     AND ($2::text IS NULL OR user_id = $2)
     AND ($3::text[] IS NULL OR team_id = ANY($3))
   ORDER BY occurred_at LIMIT $4)
 UNION ALL
 (SELECT c.at, 'context', c.user_id, '', 0, 0, 0, 0,
         jsonb_build_object('repository', c.repository, 'branch', c.branch,
                            'commit', c.commit_sha, 'directory', c.directory)
    FROM session_contexts c
   WHERE c.session_id = $1 AND ($2::text IS NULL OR c.user_id = $2)
     AND ($3::text[] IS NULL OR EXISTS (
            SELECT 1 FROM session_events e
             WHERE e.session_id = c.session_id AND e.event_id = c.event_id
               AND e.team_id = ANY($3)))
   ORDER BY c.at LIMIT $4)",
    )
});

/// `sql` with each `SMALL(<jsonb expression>)` written out as that value when it is a short
/// scalar: a string cut to 255 characters, a number of at most 40 characters, a boolean;
/// anything else (an object, an array, a longer number) is null.
fn bounded(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() * 2);
    let mut rest = sql;
    while let Some(at) = rest.find("SMALL(") {
        out.push_str(&rest[..at]);
        let inner = &rest[at + "SMALL(".len()..];
        let mut depth = 1;
        let end = inner
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(i, _)| i)
            .expect("SMALL( is closed");
        let v = &inner[..end];
        out.push_str(&format!(
            "CASE jsonb_typeof({v}) WHEN 'string' THEN to_jsonb(left(({v}) #>> '{{}}', 255)) \
             WHEN 'boolean' THEN {v} \
             WHEN 'number' THEN CASE WHEN length(({v})::text) <= 40 THEN {v} END END"
        ));
        rest = &inner[end + 1..];
    }
    out.push_str(rest);
    out
}

#[derive(Debug, Deserialize)]
pub struct TimelineParams {}

#[derive(Debug, Serialize, Deserialize, Clone)]
pub struct Item {
    pub at: DateTime<Utc>,
    /// `prompt`, `api_request`, `api_error`, `tool_decision`, `tool_result`, `context`,
    /// `session_started`, `session_ended`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_id: Option<String>,
    pub detail: Value,
}

#[derive(Debug, Serialize, Deserialize, Default, Clone, PartialEq)]
pub struct Totals {
    pub requests: i64,
    pub errors: i64,
    pub cost_usd: f64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_creation_tokens: i64,
    pub tool_runs: i64,
    pub tool_failures: i64,
    pub api_duration_ms: i64,
}

impl Totals {
    fn add_request(&mut self, d: &Value, failed: bool) {
        let int = |k: &str| d.get(k).and_then(Value::as_i64).unwrap_or(0);
        self.requests += 1;
        self.errors += i64::from(failed);
        self.cost_usd += d.get("cost_usd").and_then(Value::as_f64).unwrap_or(0.0);
        self.input_tokens += int("input_tokens");
        self.output_tokens += int("output_tokens");
        self.cache_read_tokens += int("cache_read_tokens");
        self.cache_creation_tokens += int("cache_creation_tokens");
        self.api_duration_ms += int("duration_ms");
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PromptGroup {
    pub prompt_id: String,
    pub at: DateTime<Utc>,
    /// The prompt's length in characters, when its event came.
    pub length: Option<i64>,
    /// The prompt's text, only where the tenant stores it and the sender sent it.
    pub text: Option<String>,
    pub totals: Totals,
    pub items: Vec<Item>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Timeline {
    pub session_id: String,
    pub user_id: Option<String>,
    /// Every user id the session's rows carry (usually one).
    #[serde(default)]
    pub users: Vec<String>,
    pub as_of: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub totals: Totals,
    /// The prompts, in time order, each with what it caused.
    pub prompts: Vec<PromptGroup>,
    /// What belongs to no prompt (contexts, start, end, events without `prompt.id`).
    pub other: Vec<Item>,
    /// The three most expensive prompts' ids, most expensive first.
    pub top_prompts: Vec<String>,
    /// Some kind had more than [`MAX_ITEMS`] rows; the rest are left out.
    pub truncated: bool,
}

type Row = (
    DateTime<Utc>,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    f64,
    Value,
);

/// `GET /v1/dashboard/sessions/{id}/timeline`.
pub async fn timeline(
    read: Read<TimelineParams>,
    session: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    // Read first: a caller without a credential learns nothing about the id.
    let Path(session) =
        session.map_err(|_| invalid(FieldError::new("id", "must be UTF-8 (percent-encoded)")))?;
    if session.is_empty() || session.chars().count() > 255 {
        return Err(invalid(FieldError::new(
            "id",
            "must have 1 to 255 characters",
        )));
    }
    if session.contains('\0') {
        return Err(invalid(FieldError::new("id", "must not contain NUL")));
    }
    read.reader
        .require_individual_view("a session's timeline")?;
    let visibility = &read.reader.visibility;
    // The answer depends on the session and the watermark only.
    let whole = TimeRange {
        from: DateTime::UNIX_EPOCH,
        to: DateTime::UNIX_EPOCH,
    };
    let key = format!("timeline:{session}");
    let what = format!("timeline of session {session}");
    let res = read
        .answer(&whole, &key, |ctx| async move {
            let Some(TenantRead { mut tx, fresh, .. }) = ctx else {
                return Err(not_found());
            };
            let (user, teams) = visibility.filters();
            // Every visible raw row of the session, by kind, oldest first.
            let rows: Vec<Row> = sqlx::query_as(AssertSqlSafe(TIMELINE_SQL.as_str()))
                .bind(&session)
                .bind(user)
                .bind(teams)
                .bind(MAX_ITEMS)
                .bind(MAX_TEXT)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
            if rows.is_empty() {
                return Err(not_found());
            }
            let mut t = build(&session, rows);
            t.as_of = fresh.as_of;
            Ok(t)
        })
        .await?;
    read.audited(&what, res, |t| crate::read::privacy::strings_at(t, "users"))
        .await
}

fn not_found() -> Problem {
    Problem::not_found("no such session, or none of it is visible to you")
}

/// The timeline of a session's rows (any order).
pub fn build(session: &str, mut rows: Vec<Row>) -> Timeline {
    rows.sort_by_key(|r| r.0);
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for r in &rows {
        *counts
            .entry(if r.1 == "sample" {
                "sample"
            } else {
                r.1.as_str()
            })
            .or_default() += 1;
    }
    let truncated = counts.values().any(|&n| n >= MAX_ITEMS);
    let mut t = Timeline {
        session_id: session.to_string(),
        user_id: rows.first().map(|r| r.2.clone()),
        users: {
            let mut users: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
            users.sort();
            users.dedup();
            users
        },
        as_of: None,
        started_at: None,
        ended_at: None,
        totals: Totals::default(),
        prompts: Vec::new(),
        other: Vec::new(),
        top_prompts: Vec::new(),
        truncated,
    };
    let mut groups: BTreeMap<String, usize> = BTreeMap::new();
    for (at, kind, _user, status, duration_ms, input, output, value, data) in rows {
        let (kind, prompt_id, detail) = match kind.as_str() {
            "agent" => {
                let failed = status != "success";
                let meta = data.get("metadata").cloned().unwrap_or(Value::Null);
                let cache_read = data
                    .get("cache_read_tokens")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                let cache_creation = data
                    .get("cache_creation_tokens")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                let all_input = input + cache_read + cache_creation;
                let detail = json!({
                    "model": data.get("model"),
                    "input_tokens": input,
                    "output_tokens": output,
                    "cache_read_tokens": cache_read,
                    "cache_creation_tokens": cache_creation,
                    "cache_hit_ratio": (all_input > 0).then(|| cache_read as f64 / all_input as f64),
                    "cost_usd": value,
                    "duration_ms": duration_ms,
                    "status": status,
                    "error": data.get("error_message"),
                    "attempt": meta.get("attempt"),
                    "status_code": meta.get("status_code"),
                    "request_id": meta.get("request_id"),
                    "query_source": meta.get("query_source"),
                });
                t.totals.add_request(&detail, failed);
                let kind = if failed { "api_error" } else { "api_request" };
                (kind, prompt_of(&meta), detail)
            }
            "tool" => {
                let details = data.get("details").cloned().unwrap_or(Value::Null);
                let ok = status == "success";
                t.totals.tool_runs += 1;
                t.totals.tool_failures += i64::from(!ok);
                let detail = json!({
                    "tool": data.get("tool_name"),
                    "duration_ms": duration_ms,
                    "success": ok,
                    "error": data.get("error_message"),
                    "tool_use_id": details.get("tool_use_id"),
                    "decision": details.get("decision_type"),
                });
                ("tool_result", prompt_of(&details), detail)
            }
            "sample" => {
                let labels = data.get("labels").cloned().unwrap_or(Value::Null);
                let extra = data.get("extra").cloned().unwrap_or(Value::Null);
                let label = |k: &str| labels.get(k).cloned().unwrap_or(Value::Null);
                match status.as_str() {
                    "claude_code.user_prompt" => {
                        let length = label("prompt_length")
                            .as_str()
                            .and_then(|s| s.parse::<i64>().ok());
                        let text = extra
                            .get("prompt")
                            .and_then(Value::as_str)
                            .filter(|s| *s != "<REDACTED>");
                        (
                            "prompt",
                            prompt_of(&labels),
                            json!({"length": length, "text": text,
                                   "command": label("command_name")}),
                        )
                    }
                    "claude_code.tool_decision" => (
                        "tool_decision",
                        prompt_of(&labels),
                        json!({"tool": label("tool_name"), "decision": label("decision"),
                               "source": label("source"), "tool_use_id": label("tool_use_id")}),
                    ),
                    _ => (
                        "api_retries_exhausted",
                        prompt_of(&labels),
                        json!({"labels": labels}),
                    ),
                }
            }
            "session" => {
                if status == "started" {
                    t.started_at = Some(t.started_at.map_or(at, |s| s.min(at)));
                } else {
                    t.ended_at = Some(t.ended_at.map_or(at, |e| e.max(at)));
                }
                let kind = if status == "started" {
                    "session_started"
                } else {
                    "session_ended"
                };
                (
                    kind,
                    None,
                    data.get("context").cloned().unwrap_or(Value::Null),
                )
            }
            _ => ("context", None, data),
        };
        let item = Item {
            at,
            kind: kind.to_string(),
            prompt_id: prompt_id.clone(),
            detail,
        };
        let Some(pid) = prompt_id else {
            t.other.push(item);
            continue;
        };
        let i = *groups.entry(pid.clone()).or_insert_with(|| {
            t.prompts.push(PromptGroup {
                prompt_id: pid.clone(),
                at,
                length: None,
                text: None,
                totals: Totals::default(),
                items: Vec::new(),
            });
            t.prompts.len() - 1
        });
        let g = &mut t.prompts[i];
        match item.kind.as_str() {
            "prompt" => {
                g.at = g.at.min(at);
                g.length = item.detail.get("length").and_then(Value::as_i64);
                g.text = item
                    .detail
                    .get("text")
                    .and_then(Value::as_str)
                    .map(str::to_string);
            }
            "api_request" | "api_error" => {
                g.totals.add_request(&item.detail, item.kind == "api_error")
            }
            "tool_result" => {
                g.totals.tool_runs += 1;
                g.totals.tool_failures +=
                    i64::from(item.detail.get("success") != Some(&Value::Bool(true)));
            }
            _ => {}
        }
        g.items.push(item);
    }
    t.prompts
        .sort_by(|a, b| a.at.cmp(&b.at).then(a.prompt_id.cmp(&b.prompt_id)));
    let mut by_cost: Vec<&PromptGroup> = t.prompts.iter().collect();
    by_cost.sort_by(|a, b| {
        b.totals
            .cost_usd
            .total_cmp(&a.totals.cost_usd)
            .then(a.prompt_id.cmp(&b.prompt_id))
    });
    t.top_prompts = by_cost
        .iter()
        .take(3)
        .map(|g| g.prompt_id.clone())
        .collect();
    t
}

/// `prompt.id` of an event's attributes.
fn prompt_of(attrs: &Value) -> Option<String> {
    attrs
        .get("prompt.id")
        .or_else(|| attrs.get("prompt_id"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_764_000_000 + s, 0).unwrap()
    }

    #[test]
    fn open_map_fields_are_written_out_as_short_scalars_only() {
        let sql = bounded("SELECT SMALL(data->'m'->'x'), left(y, 3), SMALL(f(a, (b)))");
        assert!(!sql.contains("SMALL("), "{sql}");
        assert!(sql.ends_with(" END END"), "{sql}");
        assert!(sql.contains("left(y, 3)"), "{sql}");
        assert!(
            sql.contains("to_jsonb(left((data->'m'->'x') #>> '{}', 255))"),
            "{sql}"
        );
        assert!(sql.contains("length((f(a, (b)))::text) <= 40"), "{sql}");
        assert!(!TIMELINE_SQL.contains("SMALL("));
    }

    #[test]
    fn rows_group_by_prompt_in_time_order_with_totals() {
        let api = |cost: f64, prompt: &str| json!({"model": "m", "cache_read_tokens": 30, "metadata": {"prompt.id": prompt}, "cost_usd": cost});
        let rows: Vec<Row> = vec![
            (
                at(5),
                "agent".into(),
                "u".into(),
                "success".into(),
                900,
                10,
                20,
                0.5,
                api(0.5, "p1"),
            ),
            (
                at(1),
                "sample".into(),
                "u".into(),
                "claude_code.user_prompt".into(),
                0,
                0,
                0,
                1.0,
                json!({"labels": {"prompt.id": "p1", "prompt_length": "42"}, "extra": {}}),
            ),
            (
                at(9),
                "sample".into(),
                "u".into(),
                "claude_code.user_prompt".into(),
                0,
                0,
                0,
                1.0,
                json!({"labels": {"prompt.id": "p2", "prompt_length": "7"}, "extra": {}}),
            ),
            (
                at(10),
                "agent".into(),
                "u".into(),
                "error".into(),
                100,
                0,
                0,
                0.0,
                api(0.0, "p2"),
            ),
            (
                at(11),
                "agent".into(),
                "u".into(),
                "success".into(),
                100,
                5,
                5,
                2.0,
                api(2.0, "p2"),
            ),
            (
                at(6),
                "tool".into(),
                "u".into(),
                "success".into(),
                40,
                0,
                0,
                0.0,
                json!({"tool_name": "Bash", "details": {"prompt.id": "p1"}}),
            ),
            (
                at(0),
                "context".into(),
                "u".into(),
                String::new(),
                0,
                0,
                0,
                0.0,
                json!({"repository": "github.com/a/b", "branch": "main"}),
            ),
        ];
        let t = build("s", rows);
        assert_eq!(t.prompts.len(), 2);
        assert_eq!(t.prompts[0].prompt_id, "p1");
        assert_eq!(t.prompts[0].length, Some(42));
        assert_eq!(
            t.prompts[0]
                .items
                .iter()
                .map(|i| i.kind.as_str())
                .collect::<Vec<_>>(),
            ["prompt", "api_request", "tool_result"]
        );
        assert_eq!(t.prompts[1].totals.errors, 1);
        assert_eq!(t.totals.requests, 3);
        assert_eq!(t.totals.tool_runs, 1);
        assert!((t.totals.cost_usd - 2.5).abs() < 1e-9);
        assert_eq!(t.top_prompts, ["p2", "p1"]);
        assert_eq!(t.other.len(), 1);
        let first = &t.prompts[0].items[1].detail;
        assert_eq!(first["cache_hit_ratio"], json!(0.75));
    }
}
