//! Entering a tenant's projection to read it: its reader role and its schema. Tenant schema
//! names are the only identifiers built at run time; they come from [`TenantId::schema`]
//! (hex digits only) and are spliced here on the read side, and in the projector's `schema`
//! module (which makes the schemas) on the write side.

use sqlx::{AssertSqlSafe, PgConnection};

use crate::tenant::{SchemaName, TenantId};

/// Enters the tenant's active projection for reading ([`enter_tenant_readonly`]); returns
/// its version, or `None` when the tenant has no projection yet.
pub async fn enter_active_readonly(
    conn: &mut PgConnection,
    tenant: TenantId,
) -> sqlx::Result<Option<i32>> {
    // The active version (1 without a row), if its schema has been made: one round trip.
    let version: Option<i32> = sqlx::query_scalar(
        "SELECT a.version
           FROM (SELECT COALESCE((SELECT active_version FROM control.tenant_versions
                                   WHERE tenant_id = $1), 1) AS version) a
          WHERE EXISTS (SELECT 1 FROM control.tenant_schemas s
                         WHERE s.tenant_id = $1 AND s.version = a.version)",
    )
    .bind(tenant.0)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(version) = version else {
        return Ok(None);
    };
    enter_tenant_readonly(conn, tenant, &tenant.schema(version)).await?;
    Ok(Some(version))
}

/// The tenant's database role: it may read its own schemas and nothing else. query-api runs
/// every request under it (`SET LOCAL ROLE`), so a query that strays to another tenant's
/// schema is refused by PostgreSQL itself.
pub fn reader_role(tenant: TenantId) -> String {
    format!("tally_t_{}", tenant.0.simple())
}

/// Enters a tenant for reading: `SET LOCAL ROLE` to its reader role and `search_path` to its
/// schema. Only valid inside a transaction; from here on the database refuses anything
/// outside the tenant's schema.
pub async fn enter_tenant_readonly(
    conn: &mut PgConnection,
    tenant: TenantId,
    schema: &SchemaName,
) -> sqlx::Result<()> {
    let sql = format!(
        "SET LOCAL ROLE {role}; SET LOCAL search_path TO {schema}",
        role = reader_role(tenant)
    );
    sqlx::raw_sql(AssertSqlSafe(sql)).execute(conn).await?;
    Ok(())
}
