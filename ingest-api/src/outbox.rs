//! The transactional outbox: auth and control events are inserted into `control.outbox` in
//! the same transaction as the change they describe; ingest-api's relay sends them to
//! `tally.auth.v1`. Nothing is lost when Kafka is down at that moment — the row waits.

use sqlx::PgConnection;
use uuid::Uuid;

use shared::people::{Snapshot, TeamSnapshot, UserSnapshot};
use shared::tenant::TenantId;

pub use shared::outbox::{auth_event, record};

/// The user as the control plane has them now, for the `extra.user` of user events (the
/// projector keeps the tenant's `users` read model from it).
pub async fn user_snapshot(
    conn: &mut PgConnection,
    user: Uuid,
) -> sqlx::Result<serde_json::Map<String, serde_json::Value>> {
    let (user_id, email, role, status, external_id, teams) = sqlx::query_as(
        "SELECT id, email, role, status, external_id, teams FROM control.users WHERE id = $1",
    )
    .bind(user)
    .fetch_one(conn)
    .await?;
    Ok(UserSnapshot {
        user_id,
        email,
        role,
        status,
        external_id,
        teams,
    }
    .into_extra())
}

/// The team as the control plane has it now (members by user id), for `team.changed`.
pub async fn team_snapshot(
    conn: &mut PgConnection,
    tenant: TenantId,
    key: &str,
) -> sqlx::Result<serde_json::Map<String, serde_json::Value>> {
    let name: Option<String> =
        sqlx::query_scalar("SELECT name FROM control.teams WHERE tenant_id = $1 AND key = $2")
            .bind(tenant.0)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await?;
    let members: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM control.users WHERE tenant_id = $1 AND $2 = ANY(teams) ORDER BY id",
    )
    .bind(tenant.0)
    .bind(key)
    .fetch_all(&mut *conn)
    .await?;
    Ok(TeamSnapshot {
        key: key.to_string(),
        deleted: name.is_none(),
        name,
        members,
    }
    .into_extra())
}
