//! From a decoded event to the row it becomes: one shape for every raw table.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde_json::Value;
use shared::events::{Envelope, Payload};
use uuid::Uuid;

/// The raw tables of a tenant schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RawTable {
    CommandExecutions,
    AgentInteractions,
    ToolExecutions,
    SessionEvents,
    ProductivityMetrics,
    MetricSamples,
}

impl RawTable {
    pub const ALL: [RawTable; 6] = [
        RawTable::CommandExecutions,
        RawTable::AgentInteractions,
        RawTable::ToolExecutions,
        RawTable::SessionEvents,
        RawTable::ProductivityMetrics,
        RawTable::MetricSamples,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RawTable::CommandExecutions => "command_executions",
            RawTable::AgentInteractions => "agent_interactions",
            RawTable::ToolExecutions => "tool_executions",
            RawTable::SessionEvents => "session_events",
            RawTable::ProductivityMetrics => "productivity_metrics",
            RawTable::MetricSamples => "metric_samples",
        }
    }
}

/// One row of a raw table, borrowing its event's payload.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRow<'a> {
    pub table: RawTable,
    pub event_type: &'static str,
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub user_id: String,
    pub team_id: String,
    pub project_id: String,
    pub session_id: String,
    pub name: String,
    pub status: String,
    pub is_error: bool,
    pub duration_ms: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub value: f64,
    pub data: Cow<'a, Value>,
}

fn s(v: &Option<String>) -> String {
    v.clone().unwrap_or_default()
}

impl<'a> RawRow<'a> {
    /// Maps a metric event and its decoded payload to its row (`None` for auth events, which
    /// go to the audit log instead).
    pub fn from_event(env: &'a Envelope, payload: &Payload) -> Option<RawRow<'a>> {
        let mut row = RawRow {
            table: RawTable::MetricSamples,
            event_type: env.event_type.as_str(),
            event_id: env.id,
            occurred_at: env.occurred_at,
            received_at: env.received_at,
            user_id: String::new(),
            team_id: String::new(),
            project_id: String::new(),
            session_id: String::new(),
            name: String::new(),
            status: String::new(),
            is_error: false,
            duration_ms: 0,
            input_tokens: 0,
            output_tokens: 0,
            value: 0.0,
            // Events of an older schema version are stored as upcast (current form).
            data: if env.schema_version < env.event_type.current_version() {
                Cow::Owned(payload.to_value())
            } else {
                Cow::Borrowed(&env.data)
            },
        };
        match payload {
            Payload::CommandExecuted(p) => {
                row.table = RawTable::CommandExecutions;
                row.user_id = p.user_id.clone();
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = s(&p.session_id);
                row.name = p.command_name.clone();
                row.status = p.status.as_str().into();
                row.is_error = p.status.is_error();
                row.duration_ms = p.duration_ms;
            }
            Payload::AgentInteracted(p) => {
                row.table = RawTable::AgentInteractions;
                row.user_id = p.user_id.clone();
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = s(&p.session_id);
                row.name = p.agent_name.clone();
                row.status = p.status.as_str().into();
                row.is_error = p.status.is_error();
                row.duration_ms = p.duration_ms;
                row.input_tokens = p.input_tokens;
                row.output_tokens = p.output_tokens;
                // Rollups sum `value`: for agent interactions, their cost.
                row.value = p.cost_usd.unwrap_or(0.0);
            }
            Payload::ToolExecuted(p) => {
                row.table = RawTable::ToolExecutions;
                row.user_id = p.user_id.clone();
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = p.session_id.clone();
                row.name = p.tool_name.clone();
                row.status = if p.success { "success" } else { "error" }.into();
                row.is_error = !p.success;
                row.duration_ms = p.duration_ms;
            }
            Payload::SessionStarted(p) => {
                row.table = RawTable::SessionEvents;
                row.user_id = p.user_id.clone();
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = p.session_id.clone();
                row.name = "started".into();
            }
            Payload::SessionEnded(p) => {
                row.table = RawTable::SessionEvents;
                row.user_id = p.user_id.clone();
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.session_id = p.session_id.clone();
                row.name = "ended".into();
                row.value = p.productivity_score.unwrap_or(0.0);
            }
            Payload::ProductivityRecorded(p) => {
                row.table = RawTable::ProductivityMetrics;
                row.user_id = s(&p.user_id);
                row.team_id = s(&p.team_id);
                row.project_id = s(&p.project_id);
                row.name = p.metric_type.as_str().into();
                row.value = p.value;
            }
            Payload::MetricSample(p) => {
                row.table = RawTable::MetricSamples;
                row.name = p.name.clone();
                row.value = p.value;
                // Standard attribute names (OTel, Claude Code) fill the usual dimensions.
                let label = |keys: &[&str]| {
                    keys.iter()
                        .find_map(|k| p.labels.get(*k).cloned())
                        .unwrap_or_default()
                };
                row.user_id = label(&["user_id", "user.id"]);
                row.team_id = label(&["team_id", "team.id"]);
                row.project_id = label(&["project_id", "project.id"]);
                row.session_id = label(&["session_id", "session.id"]);
            }
            Payload::Auth(..) => return None,
        }
        Some(row)
    }
}

/// The session row a batch's session events fold into.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionUpdate {
    pub session_id: String,
    pub user_id: String,
    pub team_id: String,
    pub project_id: String,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub commands_executed: Option<i64>,
    pub productivity_score: Option<f64>,
    pub agents_used: Vec<String>,
}

/// Folds session events (already deduplicated) into one update per session, so that one
/// upsert statement never touches the same row twice.
pub fn fold_sessions<'a>(
    events: impl Iterator<Item = (&'a Envelope, &'a Payload)>,
) -> Vec<SessionUpdate> {
    let mut by_id: std::collections::BTreeMap<String, SessionUpdate> = Default::default();
    for (env, payload) in events {
        match payload {
            Payload::SessionStarted(p) => {
                let u = by_id.entry(p.session_id.clone()).or_default();
                u.session_id = p.session_id.clone();
                u.user_id = p.user_id.clone();
                u.team_id = s(&p.team_id);
                u.project_id = s(&p.project_id);
                u.started_at = Some(
                    u.started_at
                        .map_or(env.occurred_at, |t| t.min(env.occurred_at)),
                );
            }
            Payload::SessionEnded(p) => {
                let u = by_id.entry(p.session_id.clone()).or_default();
                u.session_id = p.session_id.clone();
                u.user_id = p.user_id.clone();
                u.team_id = s(&p.team_id);
                u.project_id = s(&p.project_id);
                u.ended_at = Some(
                    u.ended_at
                        .map_or(env.occurred_at, |t| t.max(env.occurred_at)),
                );
                u.commands_executed = p.commands_executed.or(u.commands_executed);
                u.productivity_score = p.productivity_score.or(u.productivity_score);
                if !p.agents_used.is_empty() {
                    u.agents_used = p.agents_used.clone();
                }
            }
            _ => {}
        }
    }
    by_id.into_values().collect()
}
