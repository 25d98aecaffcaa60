//! Budgets, notification channels, the tenant's time zone, firings and deliveries over HTTP
//! (`/v1/admin/…`: owners and admins; managers for their own teams' budgets and firings). Every change is audited (`budget.changed`,
//! `channel.changed`) in its own transaction. The projector evaluates the budgets and
//! delivers (`projector::alerts`); query-api shows where each budget stands.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::budgets::{self, Budget, Metric, Period, Scope, DEFAULT_THRESHOLDS};
use shared::events::{AuthEvent, AuthKind};
use shared::problem::Problem;
use shared::secretbox::SecretKey;
use shared::tenant::TenantId;
use shared::webhooks::ChannelSecrets;
use uuid::Uuid;

use super::http::TenantAdmin;
use crate::extract::{Body, Id};
use crate::state::AppState;

/// Most budgets and channels a tenant may have: what one evaluation pass must read.
const MAX_BUDGETS: i64 = 200;
const MAX_CHANNELS: i64 = 50;

pub(crate) fn db(e: sqlx::Error) -> Problem {
    if shared::db::unavailable(&e) {
        tracing::warn!(error = %e, "alerting: the database is unavailable");
        return Problem::unavailable("alerting cannot reach its database now", 2);
    }
    tracing::error!(error = %e, "alerting change failed");
    Problem::internal()
}

fn sealing_key(s: &AppState) -> Result<SecretKey, Problem> {
    SecretKey::from_hex(&s.config.common.secret_key).map_err(|_| {
        Problem::new(
            StatusCode::CONFLICT,
            "not-configured",
            "Not configured",
            "notification channels need the service's secret_key to be configured",
        )
    })
}

/// Audits a change of `kind` to `target` by `caller` in `tx`.
pub(crate) async fn audited(
    s: &AppState,
    tx: &mut sqlx::PgConnection,
    caller: &TenantAdmin,
    kind: AuthKind,
    target: String,
    detail: &str,
) -> Result<(), Problem> {
    let event = AuthEvent {
        target: Some(target),
        detail: Some(detail.to_string()),
        ..Default::default()
    };
    crate::routes::auth::audit_as(s, tx, caller.tenant, kind, caller.actor.clone(), event).await
}

/// A 409 when the tenant has `max` rows of `table` already. Counted in `tx`, the transaction
/// that will insert the next one, under a lock of the tenant's `table` held until it ends:
/// requests racing each other are counted one after another, so none goes past `max`.
pub(crate) async fn over_limit(
    tx: &mut sqlx::PgConnection,
    table: &'static str,
    tenant: TenantId,
    max: i64,
) -> Result<Option<Problem>, Problem> {
    let room = super::store::room_for_one(tx, (table, "true"), tenant, max, table)
        .await
        .map_err(db)?;
    Ok(room.err().map(Problem::from))
}

/// What a change does, for the audit log.
pub(crate) struct Change {
    kind: AuthKind,
    target: String,
    detail: &'static str,
}

impl Change {
    pub(crate) fn new(kind: AuthKind, target: String, detail: &'static str) -> Change {
        Change {
            kind,
            target,
            detail,
        }
    }
}

/// Changes one row of the caller's tenant and audits it, in one transaction: `statements`
/// each take the tenant as `$1` and the row's id as `$2`; the first must touch the row (else
/// 404 `missing`), the rest follow from it.
pub(crate) async fn change_one(
    s: &AppState,
    caller: &TenantAdmin,
    id: Uuid,
    statements: &[&str],
    missing: &str,
    change: Change,
) -> Result<(), Problem> {
    let mut tx = s.pool.begin().await.map_err(db)?;
    for (i, sql) in statements.iter().enumerate() {
        let n = sqlx::query(sqlx::AssertSqlSafe(*sql))
            .bind(caller.tenant.0)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(db)?
            .rows_affected();
        if i == 0 && n == 0 {
            return Err(Problem::not_found(missing));
        }
    }
    audited(
        s,
        &mut tx,
        caller,
        change.kind,
        change.target,
        change.detail,
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(())
}

// ---- settings ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub time_zone: Option<String>,
    /// Whether the text of prompts is stored (off: the doors drop it, its length stays).
    pub store_prompt_text: Option<bool>,
    /// Whether command arguments are stored (off: the doors drop them).
    pub store_command_text: Option<bool>,
    /// Privacy mode (owners only): aggregates of at least `privacy_k` people for managers,
    /// viewers and read keys; individual views for the person themself.
    pub privacy_mode: Option<bool>,
    /// The smallest group an aggregate may cover in privacy mode (2..=1000; owners only).
    pub privacy_k: Option<i32>,
    /// Whether owners and admins see individuals in privacy mode, audited (owners only).
    pub privacy_admins_see_individuals: Option<bool>,
}

async fn settings(conn: &mut sqlx::PgConnection, tenant: TenantId) -> Result<Value, Problem> {
    type Row = (String, bool, bool, bool, i32, bool);
    let (tz, prompts, commands, privacy, k, admins): Row = sqlx::query_as(
        "SELECT time_zone, store_prompt_text, store_command_text, privacy_mode, privacy_k,
                privacy_admins_see_individuals
           FROM control.tenants WHERE id = $1",
    )
    .bind(tenant.0)
    .fetch_one(conn)
    .await
    .map_err(db)?;
    Ok(json!({
        "time_zone": tz,
        "store_prompt_text": prompts,
        "store_command_text": commands,
        "privacy_mode": privacy,
        "privacy_k": k,
        "privacy_admins_see_individuals": admins,
    }))
}

/// `GET /v1/admin/settings`: the tenant's time zone (budgets' calendar periods), what it
/// stores of prompts and commands, and its privacy mode.
pub async fn get_settings(
    State(s): State<AppState>,
    caller: TenantAdmin,
) -> Result<Json<Value>, Problem> {
    let mut conn = s.pool.acquire().await.map_err(db)?;
    Ok(Json(settings(&mut conn, caller.tenant).await?))
}

/// Sets one boolean or integer column of the tenant and audits it as `kind`.
async fn set_setting(
    s: &AppState,
    tx: &mut sqlx::PgConnection,
    caller: &TenantAdmin,
    column: &'static str,
    value: Value,
    kind: AuthKind,
) -> Result<(), Problem> {
    // `column` is one of this module's literals, never the request's.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE control.tenants SET {column} = ($2::jsonb #>> '{{}}')::{ty}, updated_at = now()
          WHERE id = $1",
        ty = if value.is_boolean() {
            "boolean"
        } else {
            "integer"
        }
    )))
    .bind(caller.tenant.0)
    .bind(&value)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    let target = format!("setting:{column}");
    audited(s, tx, caller, kind, target, &format!("{column} = {value}")).await
}

/// `PATCH /v1/admin/settings`: sets the time zone (an IANA name, e.g. `Europe/Paris`), what
/// is stored of prompts and commands, and (owners only) the privacy mode. API keys and
/// query-api learn the change within their caches' 10 s.
pub async fn set_settings(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Body(req): Body<Settings>,
) -> Result<Json<Value>, Problem> {
    let privacy = [
        ("privacy_mode", req.privacy_mode.map(Value::from)),
        ("privacy_k", req.privacy_k.map(Value::from)),
        (
            "privacy_admins_see_individuals",
            req.privacy_admins_see_individuals.map(Value::from),
        ),
    ];
    // What is stored of prompts and commands is the owners' to change too while the tenant
    // is in privacy mode.
    let private = tenant_privacy(&s, caller.tenant).await?.on;
    let stored = [
        ("store_prompt_text", req.store_prompt_text.map(Value::from)),
        (
            "store_command_text",
            req.store_command_text.map(Value::from),
        ),
    ];
    let changed = |fields: &[(&'static str, Option<Value>)]| {
        fields.iter().find(|(_, v)| v.is_some()).map(|(f, _)| *f)
    };
    let owners_only = changed(&privacy).or_else(|| changed(&stored).filter(|_| private));
    if let Some(field) = owners_only {
        if !caller.is_owner {
            let detail = "only the tenant's owners may change its privacy settings";
            return Err(caller.refuse(&s, detail, format!("setting:{field}")).await);
        }
    }
    if req.privacy_k.is_some_and(|k| !(2..=1000).contains(&k)) {
        return Err(Problem::invalid_field("privacy_k", "must be 2..=1000"));
    }
    let mut tx = s.pool.begin().await.map_err(db)?;
    if let Some(tz) = &req.time_zone {
        if tz.len() > 64 || !budgets::valid_time_zone(&mut tx, tz).await.map_err(db)? {
            return Err(Problem::invalid_field(
                "time_zone",
                "must be a time zone name such as Europe/Paris or UTC",
            ));
        }
        sqlx::query("UPDATE control.tenants SET time_zone = $2, updated_at = now() WHERE id = $1")
            .bind(caller.tenant.0)
            .bind(tz)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        let target = format!("time_zone:{tz}");
        audited(
            &s,
            &mut tx,
            &caller,
            AuthKind::BudgetChanged,
            target,
            "time zone set",
        )
        .await?;
    }
    for (column, value) in stored.into_iter().chain(privacy) {
        if let Some(value) = value {
            set_setting(
                &s,
                &mut tx,
                &caller,
                column,
                value,
                AuthKind::PrivacyChanged,
            )
            .await?;
        }
    }
    let now = settings(&mut tx, caller.tenant).await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(Json(now))
}

// ---- channels ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewChannel {
    pub name: String,
    /// `webhook` or `slack`.
    pub kind: String,
    pub url: String,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ChannelView {
    pub id: Uuid,
    pub name: String,
    pub kind: String,
    /// Scheme and host only: the rest may be a credential.
    pub url: String,
    pub consecutive_failures: i32,
    pub paused_at: Option<DateTime<Utc>>,
    pub paused_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Checks a channel URL as the delivery will: the shape, then where the name resolves.
async fn check_url(s: &AppState, raw: &str) -> Result<url::Url, Problem> {
    let policy = s.config.common.notify_policy();
    let url = policy
        .check_url(raw)
        .map_err(|e| Problem::invalid_field("url", e))?;
    if let Some(url::Host::Domain(host)) = url.host() {
        let port = url.port_or_known_default().unwrap_or(443);
        let lookup = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            policy.resolve(host, port),
        )
        .await
        .unwrap_or_else(|_| Err(format!("{host} did not resolve in time")));
        lookup.map_err(|e| Problem::invalid_field("url", e))?;
    }
    Ok(url)
}

/// `POST /v1/admin/channels`: a webhook (its signing secret is in the answer, once) or a
/// Slack incoming webhook.
pub async fn create_channel(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Body(req): Body<NewChannel>,
) -> Result<(StatusCode, Json<Value>), Problem> {
    super::http::check_len("name", &req.name, 200)?;
    if !matches!(req.kind.as_str(), "webhook" | "slack") {
        return Err(Problem::invalid_field("kind", "must be webhook or slack"));
    }
    let key = sealing_key(&s)?;
    let url = check_url(&s, &req.url).await?;
    let mut tx = s.pool.begin().await.map_err(db)?;
    if let Some(p) = over_limit(&mut tx, "channels", caller.tenant, MAX_CHANNELS).await? {
        return Err(p);
    }
    let mut secrets = ChannelSecrets {
        url: url.to_string(),
        secrets: Vec::new(),
    };
    let secret = (req.kind == "webhook").then(|| secrets.rotate(Utc::now(), Utc::now()));
    let id = Uuid::now_v7();
    let display = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    sqlx::query(
        "INSERT INTO control.channels (id, tenant_id, name, kind, sealed, url_display, owner_user_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(caller.tenant.0)
    .bind(&req.name)
    .bind(&req.kind)
    .bind(secrets.seal(&key))
    .bind(&display)
    .bind(caller.actor.user_id)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    audited(
        &s,
        &mut tx,
        &caller,
        AuthKind::ChannelChanged,
        format!("channel:{id}"),
        "created",
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    let mut body = json!({"id": id, "name": req.name, "kind": req.kind, "url": display});
    if let Some(secret) = secret {
        body["secret"] = Value::from(secret);
    }
    Ok((StatusCode::CREATED, Json(body)))
}

/// `GET /v1/admin/channels`: never the URLs' paths or the secrets.
pub async fn list_channels(
    State(s): State<AppState>,
    caller: TenantAdmin,
) -> Result<Json<Vec<ChannelView>>, Problem> {
    let rows = sqlx::query_as(
        "SELECT id, name, kind, url_display AS url, consecutive_failures, paused_at,
                paused_reason, created_at
           FROM control.channels WHERE tenant_id = $1 ORDER BY created_at, id",
    )
    .bind(caller.tenant.0)
    .fetch_all(&s.pool)
    .await
    .map_err(db)?;
    Ok(Json(rows))
}

/// `DELETE /v1/admin/channels/{id}`: the channel and its deliveries go; firings stay. Budgets
/// and rules that named it no longer do (one that named only it notifies every channel, as
/// one that names none).
pub async fn delete_channel(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    let statements = [
        "DELETE FROM control.channels WHERE tenant_id = $1 AND id = $2",
        "UPDATE control.budgets SET channels = array_remove(channels, $2) WHERE tenant_id = $1",
        "UPDATE control.alert_rules SET channels = array_remove(channels, $2)
          WHERE tenant_id = $1",
    ];
    let change = Change::new(AuthKind::ChannelChanged, format!("channel:{id}"), "deleted");
    change_one(
        &s,
        &caller,
        id,
        &statements,
        "no such channel in this tenant",
        change,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// How long the current secret keeps signing beside the new one (default 24, at most
    /// 168).
    pub keep_old_hours: Option<i64>,
}

/// `POST /v1/admin/channels/{id}/rotate-secret?keep_old_hours=24`: a new signing secret (in
/// the answer, once); the current one keeps signing beside it for `keep_old_hours`.
pub async fn rotate_secret(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
    q: Result<Query<Rotate>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request("invalid-query", e.body_text()))?;
    let keep = q.keep_old_hours.unwrap_or(24);
    if !(0..=168).contains(&keep) {
        return Err(Problem::invalid_field("keep_old_hours", "must be 0 to 168"));
    }
    let key = sealing_key(&s)?;
    let mut tx = s.pool.begin().await.map_err(db)?;
    let row: Option<(Vec<u8>, String)> = sqlx::query_as(
        "SELECT sealed, kind FROM control.channels WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
    )
    .bind(caller.tenant.0)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await
    .map_err(db)?;
    let Some((sealed, kind)) = row else {
        return Err(Problem::not_found("no such channel in this tenant"));
    };
    if kind != "webhook" {
        return Err(Problem::invalid_field("kind", "only webhooks are signed"));
    }
    let mut secrets = ChannelSecrets::open(&key, &sealed).ok_or_else(|| {
        tracing::error!(%id, "channel secrets cannot be opened with the current secret_key");
        Problem::internal()
    })?;
    let now = Utc::now();
    let secret = secrets.rotate(now + TimeDelta::hours(keep), now);
    sqlx::query("UPDATE control.channels SET sealed = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(secrets.seal(&key))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    audited(
        &s,
        &mut tx,
        &caller,
        AuthKind::ChannelChanged,
        format!("channel:{id}"),
        "secret rotated",
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    let until = now + TimeDelta::hours(keep);
    Ok(Json(
        json!({"id": id, "secret": secret, "previous_valid_until": until}),
    ))
}

/// `POST /v1/admin/channels/{id}/resume`: a paused channel is sent to again, and what it
/// missed while paused is retried.
pub async fn resume_channel(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    let statements = [
        "UPDATE control.channels SET paused_at = NULL, paused_reason = NULL,
                consecutive_failures = 0, updated_at = now()
          WHERE tenant_id = $1 AND id = $2",
        "UPDATE control.deliveries SET next_attempt_at = now()
          WHERE tenant_id = $1 AND channel_id = $2 AND status = 'pending'",
    ];
    let change = Change::new(AuthKind::ChannelChanged, format!("channel:{id}"), "resumed");
    change_one(
        &s,
        &caller,
        id,
        &statements,
        "no such channel in this tenant",
        change,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- budgets ----

/// The tenant's privacy mode as the control plane has it now.
pub(crate) async fn tenant_privacy(
    s: &AppState,
    tenant: TenantId,
) -> Result<shared::auth::Privacy, Problem> {
    let (on, k, admins): (bool, i32, bool) = sqlx::query_as(
        "SELECT privacy_mode, privacy_k, privacy_admins_see_individuals
           FROM control.tenants WHERE id = $1",
    )
    .bind(tenant.0)
    .fetch_one(&s.pool)
    .await
    .map_err(db)?;
    Ok(shared::auth::Privacy::from_columns(on, k, admins))
}

/// Who may manage budgets and rules: the tenant's owners and admins (and `admin` keys) all of
/// them; a manager those of their own teams (scope `team`), as an extractor.
pub struct BudgetEditor {
    pub admin: TenantAdmin,
    /// `None`: every budget; `Some`: a manager's teams.
    pub teams: Option<Vec<String>>,
    /// `Some` when the tenant is in privacy mode and this editor may not see individuals:
    /// the teams of at least k active members, the only teams whose budgets, rules and
    /// firings such an editor sees or sets. No budget or rule of one person (or of a
    /// project, which is often one person's) is theirs, since its notifications would tell
    /// that person's spending.
    pub large_teams: Option<Vec<String>>,
}

impl BudgetEditor {
    /// Whether this editor is held to aggregates (see `large_teams`).
    fn aggregates_only(&self) -> bool {
        self.large_teams.is_some()
    }

    pub(crate) fn may(&self, scope: Scope, scope_id: &str) -> bool {
        if self.aggregates_only() && matches!(scope, Scope::User | Scope::Project) {
            return false;
        }
        if let (Scope::Team, Some(large)) = (scope, &self.large_teams) {
            if !large.iter().any(|t| t == scope_id) {
                return false;
            }
        }
        match &self.teams {
            None => true,
            Some(teams) => scope == Scope::Team && teams.iter().any(|t| t == scope_id),
        }
    }

    pub(crate) fn refuse(&self) -> Problem {
        if self.aggregates_only() {
            return Problem::forbidden(
                "in privacy mode, budgets and rules of a person or a project are only for \
                 owners and admins who may see individuals; a manager's are their own teams'",
            );
        }
        Problem::forbidden("a manager may manage the budgets and rules of their own teams only")
    }
}

impl axum::extract::FromRequestParts<AppState> for BudgetEditor {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &AppState,
    ) -> Result<Self, Problem> {
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if shared::jwt::looks_like_jwt(bearer) {
            let claims = crate::routes::auth::caller(s, &parts.headers).await?;
            if claims.role == shared::jwt::Role::Manager {
                let teams: Vec<String> = sqlx::query_scalar(
                    "SELECT teams FROM control.users WHERE id = $1 AND tenant_id = $2",
                )
                .bind(claims.sub)
                .bind(claims.tid.0)
                .fetch_optional(&s.pool)
                .await
                .map_err(db)?
                .unwrap_or_default();
                let privacy = tenant_privacy(s, claims.tid).await?;
                let k = privacy.on.then_some(privacy.k);
                let large_teams = shared::auth::large_teams(&s.pool, claims.tid, k)
                    .await
                    .map_err(db)?;
                return Ok(BudgetEditor {
                    admin: TenantAdmin {
                        tenant: claims.tid,
                        is_owner: false,
                        actor: shared::events::Actor {
                            user_id: Some(claims.sub),
                            api_key_id: None,
                        },
                    },
                    teams: Some(teams),
                    large_teams,
                });
            }
        }
        let admin = TenantAdmin::from_request_parts(parts, s).await?;
        let privacy = tenant_privacy(s, admin.tenant).await?;
        let aggregates_only = privacy.on && !privacy.admins_see_individuals;
        let k = aggregates_only.then_some(privacy.k);
        let large_teams = shared::auth::large_teams(&s.pool, admin.tenant, k)
            .await
            .map_err(db)?;
        Ok(BudgetEditor {
            admin,
            teams: None,
            large_teams,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetBody {
    pub name: String,
    /// `tenant`, `team`, `user` or `project`.
    pub scope: String,
    /// The team key, user id or project id (as events carry them); none for `tenant`.
    #[serde(default)]
    pub scope_id: Option<String>,
    /// `cost_usd` or `tokens`.
    pub metric: String,
    /// `day`, `week` or `month`, in the tenant's time zone.
    pub period: String,
    pub amount: f64,
    /// Percentages of `amount` to be told at (default 50, 80, 100).
    #[serde(default)]
    pub thresholds: Option<Vec<i32>>,
    /// Channel ids; none or empty: every channel of the tenant.
    #[serde(default)]
    pub channels: Option<Vec<Uuid>>,
}

struct Checked {
    scope: Scope,
    scope_id: String,
    metric: Metric,
    period: Period,
    thresholds: Vec<i32>,
    channels: Vec<Uuid>,
}

/// A scope and its id as a budget or rule has them: `tenant` without an id, else an id.
pub(crate) fn check_scope(scope: &str, id: Option<&str>) -> Result<(Scope, String), Problem> {
    let scope = Scope::parse(scope)
        .ok_or_else(|| Problem::invalid_field("scope", "must be tenant, team, user or project"))?;
    let id = id.unwrap_or_default().to_string();
    match scope {
        Scope::Tenant if !id.is_empty() => {
            return Err(Problem::invalid_field(
                "scope_id",
                "must be absent for the tenant scope",
            ))
        }
        Scope::Tenant => {}
        _ => super::http::check_len("scope_id", &id, 255)?,
    }
    Ok((scope, id))
}

/// Channel ids of the tenant, sorted and each once; 422 naming `channels` for any other.
pub(crate) async fn check_channels(
    s: &AppState,
    tenant: TenantId,
    channels: Option<&[Uuid]>,
) -> Result<Vec<Uuid>, Problem> {
    let mut channels = channels.unwrap_or_default().to_vec();
    channels.sort_unstable();
    channels.dedup();
    if !channels.is_empty() {
        let known: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM control.channels WHERE tenant_id = $1 AND id = ANY($2)",
        )
        .bind(tenant.0)
        .bind(&channels)
        .fetch_one(&s.pool)
        .await
        .map_err(db)?;
        if known != channels.len() as i64 {
            return Err(Problem::invalid_field(
                "channels",
                "names a channel this tenant does not have",
            ));
        }
    }
    Ok(channels)
}

async fn check_budget(s: &AppState, tenant: TenantId, b: &BudgetBody) -> Result<Checked, Problem> {
    super::http::check_len("name", &b.name, 200)?;
    let (scope, scope_id) = check_scope(&b.scope, b.scope_id.as_deref())?;
    let metric = Metric::parse(&b.metric)
        .ok_or_else(|| Problem::invalid_field("metric", "must be cost_usd or tokens"))?;
    let period = Period::parse(&b.period)
        .ok_or_else(|| Problem::invalid_field("period", "must be day, week or month"))?;
    if !(b.amount.is_finite() && b.amount > 0.0 && b.amount < 1e15) {
        return Err(Problem::invalid_field(
            "amount",
            "must be a positive number below 1e15",
        ));
    }
    let mut thresholds = b.thresholds.clone().unwrap_or(DEFAULT_THRESHOLDS.to_vec());
    thresholds.sort_unstable();
    thresholds.dedup();
    if thresholds.is_empty()
        || thresholds.len() > 10
        || thresholds.iter().any(|t| !(1..=1000).contains(t))
    {
        return Err(Problem::invalid_field(
            "thresholds",
            "must hold 1 to 10 percentages, each 1 to 1000",
        ));
    }
    let channels = check_channels(s, tenant, b.channels.as_deref()).await?;
    Ok(Checked {
        scope,
        scope_id,
        metric,
        period,
        thresholds,
        channels,
    })
}

async fn budget_view(s: &AppState, tenant: TenantId, id: Uuid) -> Result<Json<Budget>, Problem> {
    let mut conn = s.pool.acquire().await.map_err(db)?;
    Budget::get(&mut conn, tenant, id)
        .await
        .map_err(db)?
        .map(Json)
        .ok_or_else(|| Problem::not_found("no such budget in this tenant"))
}

/// `POST /v1/admin/budgets`
pub async fn create_budget(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Body(req): Body<BudgetBody>,
) -> Result<(StatusCode, Json<Budget>), Problem> {
    let caller = &editor.admin;
    let c = check_budget(&s, caller.tenant, &req).await?;
    if !editor.may(c.scope, &c.scope_id) {
        return Err(editor.refuse());
    }
    let mut tx = s.pool.begin().await.map_err(db)?;
    if let Some(p) = over_limit(&mut tx, "budgets", caller.tenant, MAX_BUDGETS).await? {
        return Err(p);
    }
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO control.budgets (id, tenant_id, name, scope, scope_id, metric, period, amount,
                                      thresholds, channels, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(id)
    .bind(caller.tenant.0)
    .bind(&req.name)
    .bind(c.scope.as_str())
    .bind(&c.scope_id)
    .bind(c.metric.as_str())
    .bind(c.period.as_str())
    .bind(req.amount)
    .bind(&c.thresholds)
    .bind(&c.channels)
    .bind(caller.actor.user_id)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    audited(
        &s,
        &mut tx,
        caller,
        AuthKind::BudgetChanged,
        format!("budget:{id}"),
        "created",
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    let Json(b) = budget_view(&s, caller.tenant, id).await?;
    Ok((StatusCode::CREATED, Json(b)))
}

/// `GET /v1/admin/budgets`
pub async fn list_budgets(
    State(s): State<AppState>,
    editor: BudgetEditor,
) -> Result<Json<Vec<Budget>>, Problem> {
    let mut conn = s.pool.acquire().await.map_err(db)?;
    let all = Budget::of_tenant(&mut conn, editor.admin.tenant)
        .await
        .map_err(db)?;
    Ok(Json(
        all.into_iter()
            .filter(|b| editor.may(b.scope, &b.scope_id))
            .collect(),
    ))
}

/// `GET /v1/admin/budgets/{id}`
pub async fn get_budget(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Id(id): Id,
) -> Result<Json<Budget>, Problem> {
    let Json(b) = budget_view(&s, editor.admin.tenant, id).await?;
    match editor.may(b.scope, &b.scope_id) {
        true => Ok(Json(b)),
        false => Err(Problem::not_found("no such budget in this tenant")),
    }
}

/// 404 for a budget of another tenant, 403 for one of a team the manager does not manage.
async fn editable(s: &AppState, editor: &BudgetEditor, id: Uuid) -> Result<(), Problem> {
    let Json(b) = budget_view(s, editor.admin.tenant, id).await?;
    match editor.may(b.scope, &b.scope_id) {
        true => Ok(()),
        false => Err(editor.refuse()),
    }
}

/// `PUT /v1/admin/budgets/{id}`: replaces it. Thresholds already crossed in the current
/// period are not told again.
pub async fn update_budget(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Id(id): Id,
    Body(req): Body<BudgetBody>,
) -> Result<Json<Budget>, Problem> {
    let caller = &editor.admin;
    let c = check_budget(&s, caller.tenant, &req).await?;
    editable(&s, &editor, id).await?;
    if !editor.may(c.scope, &c.scope_id) {
        return Err(editor.refuse());
    }
    let mut tx = s.pool.begin().await.map_err(db)?;
    let n = sqlx::query(
        "UPDATE control.budgets SET name = $3, scope = $4, scope_id = $5, metric = $6, period = $7,
                amount = $8, thresholds = $9, channels = $10, updated_at = now()
          WHERE tenant_id = $1 AND id = $2",
    )
    .bind(caller.tenant.0)
    .bind(id)
    .bind(&req.name)
    .bind(c.scope.as_str())
    .bind(&c.scope_id)
    .bind(c.metric.as_str())
    .bind(c.period.as_str())
    .bind(req.amount)
    .bind(&c.thresholds)
    .bind(&c.channels)
    .execute(&mut *tx)
    .await
    .map_err(db)?
    .rows_affected();
    if n == 0 {
        return Err(Problem::not_found("no such budget in this tenant"));
    }
    audited(
        &s,
        &mut tx,
        caller,
        AuthKind::BudgetChanged,
        format!("budget:{id}"),
        "updated",
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    budget_view(&s, caller.tenant, id).await
}

/// `DELETE /v1/admin/budgets/{id}`: its firings stay in the history.
pub async fn delete_budget(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    editable(&s, &editor, id).await?;
    let statements = ["DELETE FROM control.budgets WHERE tenant_id = $1 AND id = $2"];
    let change = Change::new(AuthKind::BudgetChanged, format!("budget:{id}"), "deleted");
    change_one(
        &s,
        &editor.admin,
        id,
        &statements,
        "no such budget in this tenant",
        change,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- firings and deliveries ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// At most this many, newest first (default 50, at most 500).
    pub limit: Option<i64>,
    /// Deliveries of this firing only.
    pub firing_id: Option<Uuid>,
}

fn list_params(
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<(i64, Option<Uuid>), Problem> {
    let Query(p) = q.map_err(|e| Problem::bad_request("invalid-query", e.body_text()))?;
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Problem::invalid_field("limit", "must be 1 to 500"));
    }
    Ok((limit, p.firing_id))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct FiringRow {
    pub id: Uuid,
    pub source: String,
    pub source_id: Uuid,
    pub scope: String,
    pub scope_id: String,
    pub fired_at: DateTime<Utc>,
    /// The body its webhooks carry.
    pub payload: Value,
}

/// `GET /v1/admin/firings`: what fired, newest first, with the body sent.
pub async fn list_firings(
    State(s): State<AppState>,
    editor: BudgetEditor,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Vec<FiringRow>>, Problem> {
    let (limit, _) = list_params(q)?;
    let rows = sqlx::query_as(
        "SELECT id, source, source_id, scope, scope_id, fired_at, payload FROM control.firings
          WHERE tenant_id = $1
            AND ($3::text[] IS NULL OR (scope = 'team' AND scope_id = ANY($3)))
            AND ($4::text[] IS NULL OR scope = 'tenant' OR (scope = 'team' AND scope_id = ANY($4)))
          ORDER BY fired_at DESC, id DESC LIMIT $2",
    )
    .bind(editor.admin.tenant.0)
    .bind(limit)
    .bind(editor.teams.as_deref())
    .bind(editor.large_teams.as_deref())
    .fetch_all(&s.pool)
    .await
    .map_err(db)?;
    Ok(Json(rows))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct DeliveryRow {
    /// Its `webhook-id`.
    pub id: Uuid,
    pub firing_id: Uuid,
    pub channel_id: Uuid,
    pub status: String,
    pub attempts: i32,
    /// While pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    /// Every attempt: number, time, status code, latency, the answer's first bytes or the
    /// error.
    pub attempt_log: Value,
}

/// `GET /v1/admin/deliveries`: each delivery with every attempt (status, latency, the
/// answer's first bytes or the error).
pub async fn list_deliveries(
    State(s): State<AppState>,
    caller: TenantAdmin,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Vec<DeliveryRow>>, Problem> {
    let (limit, firing) = list_params(q)?;
    let rows = sqlx::query_as(
        "SELECT d.id, d.firing_id, d.channel_id, d.status, d.attempts,
                CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
                d.created_at, d.delivered_at,
                coalesce((SELECT jsonb_agg(jsonb_build_object(
                             'attempt', a.attempt, 'at', a.at, 'status_code', a.status_code,
                             'latency_ms', a.latency_ms, 'error', a.error, 'excerpt', a.excerpt)
                             ORDER BY a.attempt)
                            FROM control.delivery_attempts a WHERE a.delivery_id = d.id),
                         '[]'::jsonb) AS attempt_log
           FROM control.deliveries d
          WHERE d.tenant_id = $1 AND ($3::uuid IS NULL OR d.firing_id = $3)
          ORDER BY d.created_at DESC, d.id DESC LIMIT $2",
    )
    .bind(caller.tenant.0)
    .bind(limit)
    .bind(firing)
    .fetch_all(&s.pool)
    .await
    .map_err(db)?;
    Ok(Json(rows))
}

/// `POST /v1/admin/deliveries/{id}/redeliver`: sent again at once, with the same
/// `webhook-id`.
pub async fn redeliver(
    State(s): State<AppState>,
    caller: TenantAdmin,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    // A new round: the whole schedule again, so that one failed redelivery does not pause
    // the channel at once.
    let statements = ["UPDATE control.deliveries
                          SET status = 'pending', next_attempt_at = now(), leased_until = NULL,
                              round_start = attempts
                        WHERE tenant_id = $1 AND id = $2"];
    let change = Change::new(
        AuthKind::ChannelChanged,
        format!("delivery:{id}"),
        "redelivered",
    );
    change_one(
        &s,
        &caller,
        id,
        &statements,
        "no such delivery in this tenant",
        change,
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}
