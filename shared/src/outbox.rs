//! The transactional outbox's rows (`control.outbox`): ingest-api records its auth and
//! control events there in the transaction of the change they describe, query-api its
//! audited reads; ingest-api's relay sends them all to `tally.auth.v1`.

use chrono::Utc;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::events::{Actor, AuthEvent, AuthKind, Envelope, EventType, Source};
use crate::tenant::TenantId;

/// An auth event of `tenant`, ready for the outbox.
pub fn auth_event(tenant: TenantId, kind: AuthKind, actor: Actor, event: AuthEvent) -> Envelope {
    let now = Utc::now();
    Envelope {
        id: Uuid::now_v7(),
        tenant_id: tenant,
        event_type: EventType::Auth(kind),
        schema_version: 1,
        occurred_at: now,
        received_at: now,
        actor,
        source: Source::Control,
        data: serde_json::to_value(event).expect("auth events serialize"),
    }
}

/// Records `env` for the relay of deployment `namespace` (the topic prefix).
pub async fn record(conn: &mut PgConnection, namespace: &str, env: &Envelope) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO control.outbox (event_id, record_key, envelope, namespace)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(env.id)
    .bind(env.kafka_key())
    .bind(serde_json::to_value(env).expect("envelopes serialize"))
    .bind(namespace)
    .execute(conn)
    .await?;
    Ok(())
}
