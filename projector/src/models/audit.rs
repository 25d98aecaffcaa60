//! Audit: the tenant's auth events, kept whole in `audit_log`.

use sqlx::PgConnection;

use crate::batch::Decoded;

/// Auth events of the tenant go to its audit log (once per event id). Returns how many were
/// new.
pub async fn insert(conn: &mut PgConnection, events: &[&Decoded]) -> sqlx::Result<u64> {
    let audit: Vec<(&Decoded, &shared::events::AuthEvent)> = events
        .iter()
        .filter_map(|e| match &e.payload {
            shared::events::Payload::Auth(_, a) => Some((*e, a)),
            _ => None,
        })
        .collect();
    if audit.is_empty() {
        return Ok(0);
    }
    let done = sqlx::query(
        "INSERT INTO audit_log (event_id, occurred_at, type, user_id, email, ip, target, detail,
                               actor, data)
         SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::uuid[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::jsonb[])
         ON CONFLICT DO NOTHING",
    )
    .bind(audit.iter().map(|(e, _)| e.env.id).collect::<Vec<_>>())
    .bind(
        audit
            .iter()
            .map(|(e, _)| e.env.occurred_at)
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(e, _)| e.env.event_type.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(audit.iter().map(|(_, a)| a.user_id).collect::<Vec<_>>())
    .bind(
        audit
            .iter()
            .map(|(_, a)| a.email.clone())
            .collect::<Vec<_>>(),
    )
    .bind(audit.iter().map(|(_, a)| a.ip.clone()).collect::<Vec<_>>())
    .bind(
        audit
            .iter()
            .map(|(_, a)| a.target.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(_, a)| a.detail.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(e, _)| serde_json::to_value(&e.env.actor).expect("actors serialize"))
            .collect::<Vec<_>>(),
    )
    .bind(
        audit
            .iter()
            .map(|(e, _)| e.env.data.clone())
            .collect::<Vec<_>>(),
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected())
}
