//! PostgreSQL pool setup and the control-schema migrations.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::Common;

/// Opens a pool lazily: the service starts even if PostgreSQL is not up yet, and `/readyz`
/// says so.
pub fn pool(common: &Common, application_name: &str) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = common.database_url.parse()?;
    let opts = opts.application_name(application_name);
    Ok(PgPoolOptions::new()
        .max_connections(common.db_max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// A pool like [`pool`] of at most `max` connections, whose every statement (a wait for a
/// lock included) is cancelled after `statement_timeout`.
pub fn bounded_pool(
    common: &Common,
    application_name: &str,
    max: u32,
    statement_timeout: Duration,
) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = common.database_url.parse()?;
    let opts = opts.application_name(application_name).options([(
        "statement_timeout",
        format!("{}ms", statement_timeout.as_millis()),
    )]);
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(opts))
}

/// The control-schema migrations (`migrations/control`), embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/control");

/// Applies the control-schema migrations (idempotent; concurrent callers are serialized by
/// sqlx's migration lock). Tenant schemas, and the TimescaleDB extension they may use, are the
/// projector's (`projector::migrate`).
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use anyhow::Context;
    MIGRATOR.run(pool).await.context("applying migrations")?;
    Ok(())
}

/// Whether `e` says the database cannot be reached or cannot serve now (no connection came
/// free, the connection broke, the server is shutting down, out of resources): a 503 to
/// retry, not a fault of the request or of ours.
pub fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            // 08: connection exceptions; 53: insufficient resources; 57P0x: shutdown.
            c.starts_with("08") || c.starts_with("53") || c.starts_with("57P0")
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::unavailable;

    #[test]
    fn an_outage_is_told_from_a_fault() {
        assert!(unavailable(&sqlx::Error::PoolTimedOut));
        assert!(unavailable(&sqlx::Error::PoolClosed));
        assert!(unavailable(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))));
        assert!(!unavailable(&sqlx::Error::RowNotFound));
        assert!(!unavailable(&sqlx::Error::ColumnNotFound("x".into())));
    }
}
