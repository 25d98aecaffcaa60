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
