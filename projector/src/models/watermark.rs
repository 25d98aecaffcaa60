//! The tenant's watermark (`projection_state`): the live feed's sequence, how many events
//! were projected, and the newest one's server time (`as_of`).

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// Locks the tenant's watermark row and returns the sequence this transaction will give it:
/// the live feed position of every row the transaction writes. Taken first, so the tenant's
/// transactions commit in sequence order.
pub async fn lock_next_seq(conn: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT seq + 1 FROM projection_state FOR NO KEY UPDATE")
        .fetch_one(conn)
        .await
}

/// The sequence the tenant's next transaction will give its watermark, as committed now,
/// without the lock: a batch written ahead ([`crate::batch::Pipeline`]) checks it under the
/// lock before it commits.
pub async fn next_seq(conn: &mut PgConnection) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT seq + 1 FROM projection_state")
        .fetch_one(conn)
        .await
}

/// Advances the watermark by one batch of `inserted` events received up to `as_of`; returns
/// the new sequence.
pub async fn advance(
    conn: &mut PgConnection,
    inserted: u64,
    as_of: Option<DateTime<Utc>>,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "UPDATE projection_state
            SET seq = seq + 1, events = events + $1, as_of = greatest(as_of, $2)
          RETURNING seq",
    )
    .bind(inserted as i64)
    .bind(as_of)
    .fetch_one(conn)
    .await
}
