//! PostgreSQL pool setup.

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

/// The control-schema migrations (`migrations/control`), embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/control");

/// Applies the control-schema migrations (idempotent; concurrent callers are serialized by
/// sqlx's migration lock). With TimescaleDB available, creates the extension too, so tenant
/// schemas get hypertables.
pub async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    use anyhow::Context;
    let available: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
    )
    .fetch_one(pool)
    .await
    .context("connecting to PostgreSQL")?;
    if available {
        sqlx::query("CREATE EXTENSION IF NOT EXISTS timescaledb")
            .execute(pool)
            .await
            .context("creating the timescaledb extension")?;
    }
    MIGRATOR.run(pool).await.context("applying migrations")?;
    // Schemas made before reader roles existed get theirs (a no-op once every role exists),
    // under a lock so that services migrating at the same time do not grant concurrently.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('tally.grant_readers'))")
        .execute(&mut *tx)
        .await?;
    let missing: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
        "SELECT tenant_id, version FROM control.tenant_schemas s
          WHERE NOT EXISTS (SELECT 1 FROM pg_roles
                             WHERE rolname = 'tally_t_' || replace(s.tenant_id::text, '-', ''))",
    )
    .fetch_all(&mut *tx)
    .await?;
    for (tenant, version) in missing {
        let tenant = crate::tenant::TenantId(tenant);
        crate::tenant_sql::grant_reader(&mut tx, tenant, &tenant.schema(version)).await?;
    }
    tx.commit().await?;
    // Tenant schemas made from older templates get the newer ones now, not only when the
    // projector next writes to that tenant (an idle tenant's dashboards need them too).
    let behind: Vec<(uuid::Uuid, i32)> = sqlx::query_as(
        "SELECT tenant_id, version FROM control.tenant_schemas WHERE template_version < $1",
    )
    .bind(1 + crate::tenant_sql::LATER_TEMPLATES.len() as i32)
    .fetch_all(pool)
    .await?;
    let mut conn = pool.acquire().await?;
    for (tenant, version) in behind {
        crate::tenant_sql::create_tenant_schema(
            &mut conn,
            crate::tenant::TenantId(tenant),
            version,
        )
        .await?;
    }
    Ok(())
}
