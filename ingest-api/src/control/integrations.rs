//! Source-control integrations over HTTP (`/v1/admin/integrations/…`, owners and admins):
//! the secret each provider signs its webhooks with, sealed with the services' secret_key,
//! and optionally the salt that keeps repository and branch names private. Every change is
//! audited (`integration.changed`). The receivers are in [`crate::routes::webhooks`].

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::AuthKind;
use shared::problem::Problem;
use shared::secretbox::SecretKey;
use shared::tenant::TenantId;
use sqlx::PgPool;

use super::alerts::{audited, db};
use super::http::TenantAdmin;
use crate::extract::Body;
use crate::state::AppState;

/// The providers with a receiver.
pub const PROVIDERS: [&str; 2] = ["github", "gitlab"];

/// What is sealed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sealed {
    pub secret: String,
    #[serde(default)]
    pub repository_salt: Option<String>,
}

/// `PUT /v1/admin/integrations/{provider}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutIntegration {
    /// The webhook's secret, as entered at the provider (GitHub: the webhook secret;
    /// GitLab: the secret token).
    pub secret: String,
    /// When set, repositories and branches are stored as `sha256(salt NUL name)`, as the
    /// hooks send them with `TALLY_HOOK_HASH=1` and the same `TALLY_HOOK_SALT`.
    #[serde(default)]
    pub repository_salt: Option<String>,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct IntegrationView {
    pub provider: String,
    pub private_names: bool,
    /// The path to give the provider as the webhook's URL (on ingest-api).
    pub webhook_path: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_delivery_at: Option<DateTime<Utc>>,
    pub deliveries: i64,
}

fn key(s: &AppState) -> Result<SecretKey, Problem> {
    SecretKey::from_hex(&s.config.common.secret_key).map_err(|_| {
        Problem::new(
            StatusCode::CONFLICT,
            "not-configured",
            "Not configured",
            "integrations need the service's secret_key to be configured",
        )
    })
}

fn provider(p: &str) -> Result<&'static str, Problem> {
    PROVIDERS
        .into_iter()
        .find(|k| *k == p)
        .ok_or_else(|| Problem::not_found(format!("no provider `{p}`; known: github, gitlab")))
}

/// The provider a path names (one that is not even text is none: 404, not axum's plain 400).
fn provider_in(p: Result<Path<String>, PathRejection>) -> Result<&'static str, Problem> {
    match p {
        Ok(Path(p)) => provider(&p),
        Err(_) => Err(Problem::not_found(
            "no such provider; known: github, gitlab",
        )),
    }
}

const VIEW: &str = "SELECT provider, private_names,
                           '/v1/webhooks/' || provider || '/' || tenant_id AS webhook_path,
                           created_at, updated_at, last_delivery_at, deliveries
                      FROM control.integrations";

/// `PUT /v1/admin/integrations/{provider}`: sets (or replaces) the secret and salt.
pub async fn put(
    State(s): State<AppState>,
    caller: TenantAdmin,
    p: Result<Path<String>, PathRejection>,
    Body(req): Body<PutIntegration>,
) -> Result<Json<IntegrationView>, Problem> {
    let provider = provider_in(p)?;
    let n = req.secret.chars().count();
    if !(16..=256).contains(&n) {
        return Err(Problem::invalid_field(
            "secret",
            "must have 16 to 256 characters",
        ));
    }
    if let Some(salt) = &req.repository_salt {
        if !(1..=256).contains(&salt.chars().count()) {
            return Err(Problem::invalid_field(
                "repository_salt",
                "must have 1 to 256 characters",
            ));
        }
    }
    let sealed = Sealed {
        secret: req.secret,
        repository_salt: req.repository_salt,
    };
    let bytes = serde_json::to_vec(&sealed).expect("strings serialize");
    let mut tx = s.pool.begin().await.map_err(db)?;
    sqlx::query(
        "INSERT INTO control.integrations (tenant_id, provider, sealed, private_names, created_by)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, provider) DO UPDATE SET
            sealed = EXCLUDED.sealed, private_names = EXCLUDED.private_names, updated_at = now()",
    )
    .bind(caller.tenant.0)
    .bind(provider)
    .bind(key(&s)?.seal(&bytes))
    .bind(sealed.repository_salt.is_some())
    .bind(caller.actor.user_id)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    audited(
        &s,
        &mut tx,
        &caller,
        AuthKind::IntegrationChanged,
        format!("integration:{provider}"),
        "set",
    )
    .await?;
    let view: IntegrationView = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{VIEW} WHERE tenant_id = $1 AND provider = $2"
    )))
    .bind(caller.tenant.0)
    .bind(provider)
    .fetch_one(&mut *tx)
    .await
    .map_err(db)?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(Json(view))
}

/// `GET /v1/admin/integrations`: never the secrets.
pub async fn list(
    State(s): State<AppState>,
    caller: TenantAdmin,
) -> Result<Json<Vec<IntegrationView>>, Problem> {
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "{VIEW} WHERE tenant_id = $1 ORDER BY provider"
    )))
    .bind(caller.tenant.0)
    .fetch_all(&s.pool)
    .await
    .map_err(db)?;
    Ok(Json(rows))
}

/// `DELETE /v1/admin/integrations/{provider}`: its webhooks are refused from now on.
pub async fn delete(
    State(s): State<AppState>,
    caller: TenantAdmin,
    p: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, Problem> {
    let provider = provider_in(p)?;
    let mut tx = s.pool.begin().await.map_err(db)?;
    let n = sqlx::query("DELETE FROM control.integrations WHERE tenant_id = $1 AND provider = $2")
        .bind(caller.tenant.0)
        .bind(provider)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
    if n == 0 {
        return Err(Problem::not_found(format!("no {provider} integration")));
    }
    audited(
        &s,
        &mut tx,
        &caller,
        AuthKind::IntegrationChanged,
        format!("integration:{provider}"),
        "deleted",
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// The sealed settings of an active tenant's integration, if it has one.
pub async fn load(
    pool: &PgPool,
    secret_key: &str,
    tenant: TenantId,
    provider: &str,
) -> sqlx::Result<Option<Sealed>> {
    let sealed: Option<Vec<u8>> = sqlx::query_scalar(
        "SELECT i.sealed FROM control.integrations i
           JOIN control.tenants t ON t.id = i.tenant_id
          WHERE i.tenant_id = $1 AND i.provider = $2 AND t.status = 'active'",
    )
    .bind(tenant.0)
    .bind(provider)
    .fetch_optional(pool)
    .await?;
    let Ok(key) = SecretKey::from_hex(secret_key) else {
        return Ok(None);
    };
    Ok(sealed
        .and_then(|b| key.open(&b))
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

/// Counts a verified delivery on the integration.
pub async fn count(pool: &PgPool, tenant: TenantId, provider: &str) {
    let sql =
        "UPDATE control.integrations SET deliveries = deliveries + 1, last_delivery_at = now()
                WHERE tenant_id = $1 AND provider = $2";
    if let Err(e) = sqlx::query(sql)
        .bind(tenant.0)
        .bind(provider)
        .execute(pool)
        .await
    {
        tracing::warn!(error = %e, "counting a webhook delivery");
    }
}
