//! Realistic event batches with the aggregates a correct pipeline must report for them.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use ingest_api::formats::otlp::pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use uuid::Uuid;

/// What the dashboards must show for the events generated so far.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Expected {
    pub total: i64,
    pub per_type: BTreeMap<String, i64>,
    pub command_errors: i64,
    pub command_duration_sum: i64,
    pub agent_input_tokens: i64,
    pub agent_output_tokens: i64,
    pub tool_errors: i64,
    pub per_user: BTreeMap<String, i64>,
    pub users: std::collections::BTreeSet<String>,
}

impl Expected {
    /// Adds what another generator sent.
    pub fn merge(&mut self, other: &Expected) {
        self.total += other.total;
        for (k, v) in &other.per_type {
            *self.per_type.entry(k.clone()).or_default() += v;
        }
        self.command_errors += other.command_errors;
        self.command_duration_sum += other.command_duration_sum;
        self.agent_input_tokens += other.agent_input_tokens;
        self.agent_output_tokens += other.agent_output_tokens;
        self.tool_errors += other.tool_errors;
        for (k, v) in &other.per_user {
            *self.per_user.entry(k.clone()).or_default() += v;
        }
        self.users.extend(other.users.iter().cloned());
    }
}

/// Generates a mix of every metric event type for a handful of users and sessions.
pub struct Generator {
    rng: StdRng,
    users: Vec<String>,
    /// Events fall in `[now - spread, now - lag]`.
    spread: Duration,
    lag: Duration,
    /// When the generator was made: events happen in the `spread` before it.
    pub now: DateTime<Utc>,
    pub expected: Expected,
}

const COMMANDS: [&str; 6] = ["build", "test", "lint", "deploy", "review", "refactor"];
const AGENTS: [&str; 3] = ["claude", "planner", "reviewer"];
const TOOLS: [&str; 5] = ["Edit", "Bash", "Read", "Write", "Grep"];

impl Generator {
    /// Backfill: events fall in `[now - spread, now - 1 min]`, as when a sender catches up.
    pub fn new(seed: u64, user_prefix: &str, users: usize, spread: Duration) -> Generator {
        Generator {
            rng: StdRng::seed_from_u64(seed),
            users: (0..users)
                .map(|i| format!("{user_prefix}-user-{i}"))
                .collect(),
            spread,
            lag: Duration::minutes(1),
            now: Utc::now(),
            expected: Expected::default(),
        }
    }

    /// Live: events fall in the minute before `now`, as real senders produce them. Move
    /// `now` forward to keep them live over a long run.
    pub fn live(self) -> Generator {
        Generator {
            spread: Duration::minutes(1),
            lag: Duration::zero(),
            ..self
        }
    }

    /// One event (client form, with a fresh id).
    pub fn event(&mut self) -> Value {
        let user = self.users[self.rng.random_range(0..self.users.len())].clone();
        let span = (self.spread - self.lag).num_milliseconds().max(1);
        let at = self.now - self.lag - Duration::milliseconds(self.rng.random_range(0..span));
        let session = format!("{user}-s{}", self.rng.random_range(0..5));
        let kind = self.rng.random_range(0..100);
        let (event_type, data) = if kind < 40 {
            let ok = self.rng.random_bool(0.9);
            let d = self.rng.random_range(1..20_000);
            self.expected.command_duration_sum += d;
            self.expected.command_errors += i64::from(!ok);
            (
                "command.executed",
                json!({
                    "user_id": user, "team_id": "team-a", "project_id": "proj-1", "session_id": session,
                    "command_name": COMMANDS[self.rng.random_range(0..COMMANDS.len())],
                    "duration_ms": d, "status": if ok { "success" } else { "error" },
                    "args": {"verbose": true}
                }),
            )
        } else if kind < 60 {
            let tin = self.rng.random_range(0..5000);
            let tout = self.rng.random_range(0..2000);
            self.expected.agent_input_tokens += tin;
            self.expected.agent_output_tokens += tout;
            (
                "agent.interacted",
                json!({
                    "user_id": user, "session_id": session,
                    "agent_name": AGENTS[self.rng.random_range(0..AGENTS.len())],
                    "interaction_type": "chat", "input_tokens": tin, "output_tokens": tout,
                    "duration_ms": self.rng.random_range(100..60_000), "status": "success"
                }),
            )
        } else if kind < 85 {
            let ok = self.rng.random_bool(0.95);
            self.expected.tool_errors += i64::from(!ok);
            (
                "tool.executed",
                json!({
                    "user_id": user, "session_id": session,
                    "tool_name": TOOLS[self.rng.random_range(0..TOOLS.len())],
                    "duration_ms": self.rng.random_range(1..5000), "success": ok
                }),
            )
        } else if kind < 90 {
            (
                "session.started",
                json!({"user_id": user, "session_id": session}),
            )
        } else if kind < 93 {
            (
                "session.ended",
                json!({"user_id": user, "session_id": session, "commands_executed": 4, "productivity_score": 80}),
            )
        } else if kind < 96 {
            (
                "productivity.recorded",
                json!({"user_id": user, "metric_type": "commands_per_hour", "value": 12, "unit": "per_hour"}),
            )
        } else {
            (
                "metric.sample",
                json!({"name": "claude_code.token.usage", "labels": {"user.id": user, "type": "input"}, "value": 100, "kind": "counter"}),
            )
        };
        self.expected.total += 1;
        *self
            .expected
            .per_type
            .entry(event_type.to_string())
            .or_default() += 1;
        *self.expected.per_user.entry(user.clone()).or_default() += 1;
        self.expected.users.insert(user);
        json!({"id": Uuid::new_v4(), "type": event_type, "occurred_at": at.to_rfc3339(), "data": data})
    }

    pub fn batch(&mut self, n: usize) -> Vec<Value> {
        (0..n).map(|_| self.event()).collect()
    }
}

/// One OTLP request of `n` delta points of Claude Code's token counter, spread over users,
/// sessions, token types and the `spread` before now (each point distinct, so none is a
/// resend), the latest at `now` (nanoseconds since the epoch).
pub fn token_points(
    n: usize,
    offset: usize,
    spread: Duration,
    now: u64,
) -> pb::ExportMetricsServiceRequest {
    let spread_ms = spread.num_milliseconds().max(1) as u64;
    let attr = |k: &str, v: String| pb::KeyValue {
        key: k.into(),
        value: Some(pb::AnyValue {
            value: Some(pb::any_value::Value::StringValue(v)),
        }),
    };
    let data_points = (offset..offset + n)
        .map(|i| pb::NumberDataPoint {
            attributes: vec![
                attr("user.id", format!("load-user-{}", i % 200)),
                attr("session.id", format!("load-session-{}", i % 2000)),
                attr(
                    "type",
                    ["input", "output", "cacheRead", "cacheCreation"][i % 4].into(),
                ),
                attr("model", "claude-sonnet-4-5".into()),
            ],
            start_time_unix_nano: 0,
            time_unix_nano: now - (i as u64 % spread_ms) * 1_000_000,
            value: Some(pb::number_data_point::Value::AsInt((i % 5000) as i64 + 1)),
            flags: 0,
        })
        .collect();
    pb::ExportMetricsServiceRequest {
        resource_metrics: vec![pb::ResourceMetrics {
            resource: Some(pb::Resource {
                attributes: vec![attr("service.name", "claude-code".into())],
            }),
            scope_metrics: vec![pb::ScopeMetrics {
                scope: None,
                metrics: vec![pb::Metric {
                    name: "claude_code.token.usage".into(),
                    unit: "tokens".into(),
                    data: Some(pb::metric::Data::Sum(pb::Sum {
                        data_points,
                        aggregation_temporality: pb::TEMPORALITY_DELTA,
                        is_monotonic: true,
                    })),
                    ..Default::default()
                }],
            }],
        }],
    }
}
