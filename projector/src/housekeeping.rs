//! Housekeeping of the control schema: what grows with use rather than with live objects.
//! Caps bound a tenant's live people, keys, teams and invitations, but every login, refresh
//! and change writes an outbox row, every rotation a refresh token, every firing its
//! deliveries and attempts, and revoked keys and closed invitations stayed for good. Each
//! retention pass deletes, in batches of [`BATCH`] rows (one short statement each):
//!
//! - outbox rows the relay sent (they are in Kafka, which is the record) after
//!   `outbox_keep_days`, and those Kafka refused after `history_keep_days`;
//! - refresh-token families whose every token expired over a day ago (a family with a live
//!   token keeps its used ones, which is how a stolen token presented again is recognised);
//! - single sign-on logins never finished, after their ten minutes;
//! - invitations accepted, revoked or expired, API keys revoked, and deliveries delivered or
//!   failed (with their attempts), after `history_keep_days`; then the firings with no
//!   delivery left, after as long.
//!
//! Nothing a tenant still uses is touched: a budget's firing outlives its period (at most 31
//! days, hence the 35-day floor of `history_keep_days`), pending deliveries stay, and the
//! audit log, projected into each tenant's schema, keeps its own history.

use serde::Serialize;
use sqlx::PgPool;

/// Rows deleted by one statement at most.
pub const BATCH: i64 = 5000;

/// The fewest days `history_keep_days` may be: longer than a budget's longest period, so that
/// a crossing's firing (its `dedup`) outlives the period it belongs to.
pub const MIN_HISTORY_DAYS: i64 = 35;

/// How long what is finished is kept.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    /// Relayed outbox rows.
    pub outbox_days: i64,
    /// Closed invitations, revoked keys, finished deliveries, firings, refused outbox rows.
    pub history_days: i64,
}

/// What one sweep deleted.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Swept {
    pub outbox: u64,
    pub refresh_tokens: u64,
    pub sso_logins: u64,
    pub invitations: u64,
    pub api_keys: u64,
    pub deliveries: u64,
    pub firings: u64,
}

impl Swept {
    pub fn total(&self) -> u64 {
        self.outbox
            + self.refresh_tokens
            + self.sso_logins
            + self.invitations
            + self.api_keys
            + self.deliveries
            + self.firings
    }
}

/// Each sweep: the table, its key, and which rows go (`$1` the outbox days, `$2` the history
/// days). Deliveries go before firings, which they reference.
const SWEEPS: [(&str, &str, &str); 9] = [
    (
        "outbox",
        "seq",
        "sent_at < now() - make_interval(days => $1) AND refused IS NULL",
    ),
    (
        "outbox",
        "seq",
        "sent_at < now() - make_interval(days => $2) AND refused IS NOT NULL",
    ),
    (
        "refresh_tokens",
        "id",
        "expires_at < now() - interval '1 day'
         AND NOT EXISTS (SELECT 1 FROM control.refresh_tokens live
                          WHERE live.family_id = t.family_id
                            AND live.expires_at >= now() - interval '1 day')",
    ),
    (
        // A living family's used tokens expired 30 days ago: presenting one of them is
        // refused as unknown rather than taken for a reuse (those expired since are still
        // recognised, and revoke the family). Without this a family refreshed for months
        // kept every token it ever had.
        "refresh_tokens",
        "id",
        "expires_at < now() - interval '30 days' AND used_at IS NOT NULL",
    ),
    (
        "sso_logins",
        "state",
        "created_at < now() - interval '10 minutes'",
    ),
    (
        "invitations",
        "id",
        // Open ones expire in the future, so only closed ones are this old. No index serves
        // it: a tenant has at most 1 000 open invitations and closed ones go, so the table
        // stays small.
        "COALESCE(accepted_at, revoked_at, expires_at) < now() - make_interval(days => $2)",
    ),
    (
        "api_keys",
        "id",
        "revoked_at < now() - make_interval(days => $2)",
    ),
    // Aged from its last attempt: a delivery sent again lately keeps its history.
    (
        "deliveries",
        "id",
        "status <> 'pending' AND created_at < now() - make_interval(days => $2)
         AND COALESCE(delivered_at, created_at) < now() - make_interval(days => $2)
         AND NOT EXISTS (SELECT 1 FROM control.delivery_attempts a
                          WHERE a.delivery_id = t.id AND a.at >= now() - make_interval(days => $2))",
    ),
    (
        "firings",
        "id",
        "fired_at < now() - make_interval(days => $2)
         AND NOT EXISTS (SELECT 1 FROM control.deliveries d WHERE d.firing_id = t.id)",
    ),
];

/// One sweep over the control schema. A failing statement ends the sweep (the next pass
/// tries again); what was deleted before it stays deleted.
pub async fn sweep(pool: &PgPool, keep: Keep) -> anyhow::Result<Swept> {
    let mut swept = Swept::default();
    for (table, key, which) in SWEEPS {
        // The condition again on the rows deleted: one changed since the batch was chosen (a
        // delivery sent again, a key's family refreshed) is looked at as it is now.
        let sql = format!(
            "DELETE FROM control.{table} t WHERE {key} IN (
                 SELECT {key} FROM control.{table} t WHERE {which} LIMIT $3) AND {which}"
        );
        let mut deleted = 0;
        loop {
            let n = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .bind(keep.outbox_days as i32)
                .bind(keep.history_days as i32)
                .bind(BATCH)
                .execute(pool)
                .await?
                .rows_affected();
            deleted += n;
            if n < BATCH as u64 {
                break;
            }
        }
        let field = match table {
            "outbox" => &mut swept.outbox,
            "refresh_tokens" => &mut swept.refresh_tokens,
            "sso_logins" => &mut swept.sso_logins,
            "invitations" => &mut swept.invitations,
            "api_keys" => &mut swept.api_keys,
            "deliveries" => &mut swept.deliveries,
            _ => &mut swept.firings,
        };
        *field += deleted;
        if deleted > 0 {
            metrics::counter!("control_housekeeping_rows_deleted_total", "table" => table)
                .increment(deleted);
        }
    }
    Ok(swept)
}
