//! People: the tenant's `users` and `teams`, kept from the snapshots that the control
//! plane's user and team events carry.

use sqlx::PgConnection;

use crate::batch::Decoded;

/// Keeps the tenant's `users` and `teams` read models from the snapshots that user and team
/// events carry (`extra.user`, `extra.team`). Newer snapshots win, so replays and
/// duplicates change nothing.
pub async fn apply(conn: &mut PgConnection, events: &[&Decoded]) -> sqlx::Result<()> {
    use shared::people::{Snapshot, TeamSnapshot, UserSnapshot};
    for e in events {
        let shared::events::Payload::Auth(_, a) = &e.payload else {
            continue;
        };
        // Decoding refused (dead-lettered) every event whose snapshot does not parse.
        if let Ok(Some(u)) = UserSnapshot::from_extra(&a.extra) {
            sqlx::query(
                "INSERT INTO users AS u (user_id, email, role, status, external_id, teams, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (user_id) DO UPDATE SET email = EXCLUDED.email, role = EXCLUDED.role,
                        status = EXCLUDED.status, external_id = EXCLUDED.external_id,
                        teams = EXCLUDED.teams, updated_at = EXCLUDED.updated_at
                  WHERE u.updated_at <= EXCLUDED.updated_at",
            )
            .bind(u.user_id)
            .bind(u.email)
            .bind(u.role)
            .bind(u.status)
            .bind(u.external_id)
            .bind(u.teams)
            .bind(e.env.occurred_at)
            .execute(&mut *conn)
            .await?;
        }
        if let Ok(Some(t)) = TeamSnapshot::from_extra(&a.extra) {
            sqlx::query(
                "INSERT INTO teams AS t (key, name, members, deleted, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (key) DO UPDATE SET name = EXCLUDED.name, members = EXCLUDED.members,
                        deleted = EXCLUDED.deleted, updated_at = EXCLUDED.updated_at
                  WHERE t.updated_at <= EXCLUDED.updated_at",
            )
            .bind(t.key)
            .bind(t.name.unwrap_or_default())
            .bind(t.members)
            .bind(t.deleted)
            .bind(e.env.occurred_at)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}
