//! Events and timestamps as tests write them, and the stamping ingest-api gives them.

use chrono::{DateTime, Utc};
use ingest_api::ingest::{Ids, IngestContext, TimeBounds};
use serde_json::{json, Value};
use shared::events::{Actor, Source};
use shared::tenant::TenantId;
use uuid::Uuid;

/// `now` minus some seconds, RFC 3339.
pub fn ago(secs: i64) -> String {
    (Utc::now() - chrono::Duration::seconds(secs)).to_rfc3339()
}

/// A timestamp as the API prints it.
pub fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339()
}

/// `n` minimal `command.executed` events `days` days before `now`, a minute apart.
pub fn commands_days_ago(now: DateTime<Utc>, days: i64, n: i64) -> Value {
    Value::Array(
        (0..n)
            .map(|i| {
                json!({"type": "command.executed",
                    "occurred_at": (now - chrono::TimeDelta::days(days) - chrono::TimeDelta::minutes(i)).to_rfc3339(),
                    "data": {"user_id": "u", "command_name": "c", "duration_ms": 1, "status": "success"}})
            })
            .collect(),
    )
}

/// A minimal valid `command.executed` event.
pub fn command(user: &str, name: &str, duration_ms: i64, ok: bool) -> Value {
    json!({
        "id": Uuid::now_v7(),
        "type": "command.executed",
        "occurred_at": ago(60),
        "data": {
            "user_id": user,
            "command_name": name,
            "duration_ms": duration_ms,
            "status": if ok { "success" } else { "error" },
        }
    })
}

/// What ingest-api stamps `tenant`'s events with when they come through the API now, with
/// fresh ids and the default time bounds (for tests that write envelopes into Kafka).
pub fn api_context(tenant: TenantId) -> IngestContext {
    IngestContext {
        tenant_id: tenant,
        actor: Actor::default(),
        source: Source::Api,
        received_at: Utc::now(),
        bounds: TimeBounds::default(),
        ids: Ids::Fresh,
    }
}
