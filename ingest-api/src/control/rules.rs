//! Alert rules over HTTP (`/v1/admin/rules`: owners and admins; managers for their own
//! teams' rules). The projector evaluates them (`projector::alerts`, `shared::rules`); every
//! change is audited as `rule.changed`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use shared::budgets::Scope;
use shared::events::{AuthKind, EventType};
use shared::problem::Problem;
use shared::rules::{Rule, KINDS, MEASURES};
use shared::tenant::TenantId;
use uuid::Uuid;

use super::alerts::{
    audited, change_one, check_channels, check_scope, db, over_limit, BudgetEditor, Change,
};
use crate::extract::{Body, Id};
use crate::state::AppState;

const MAX_RULES: i64 = 100;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    pub name: String,
    /// `error_rate` (percent), `p95_duration` (ms), `cost` (US dollars), `tokens`, `events`
    /// (each over the window), `silence` (no events in the window after some before it), or
    /// `anomaly` (z-score of `measure` against the same window on each of the 7 days before).
    pub kind: String,
    pub scope: String,
    #[serde(default)]
    pub scope_id: Option<String>,
    /// Only events of this type.
    #[serde(default)]
    pub event_type: Option<String>,
    /// Only this command, agent, tool or metric name.
    #[serde(default)]
    pub name_filter: Option<String>,
    /// What an anomaly watches: `events` (default), `errors`, `cost_usd` or `tokens`.
    #[serde(default)]
    pub measure: Option<String>,
    /// `above` (default) or `below`.
    #[serde(default)]
    pub op: Option<String>,
    /// The line (an anomaly's: its z-score, default 3; a silence has none).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// Default 5 (silence 10, anomaly 60).
    #[serde(default)]
    pub window_minutes: Option<i32>,
    /// No second firing within this many minutes of the last (default 60).
    #[serde(default)]
    pub cooldown_minutes: Option<i32>,
    /// Error rate and p95 judge windows with at least this many events (default 10).
    #[serde(default)]
    pub min_events: Option<i32>,
    #[serde(default)]
    pub channels: Option<Vec<Uuid>>,
}

struct Checked {
    scope: Scope,
    scope_id: String,
    op: &'static str,
    threshold: f64,
    window: i32,
    cooldown: i32,
    min_events: i32,
    measure: Option<String>,
    channels: Vec<Uuid>,
}

async fn check(s: &AppState, tenant: TenantId, b: &RuleBody) -> Result<Checked, Problem> {
    super::http::check_len("name", &b.name, 200)?;
    let kind = b.kind.as_str();
    if !KINDS.contains(&kind) {
        return Err(Problem::invalid_field(
            "kind",
            format!("must be one of {}", KINDS.join(", ")),
        ));
    }
    let (scope, scope_id) = check_scope(&b.scope, b.scope_id.as_deref())?;
    if let Some(t) = &b.event_type {
        if !EventType::ALL.iter().any(|known| known.as_str() == t) {
            return Err(Problem::invalid_field(
                "event_type",
                "not a metric event type",
            ));
        }
    }
    if let Some(n) = &b.name_filter {
        super::http::check_len("name_filter", n, 255)?;
    }
    let measure = match (kind, &b.measure) {
        ("anomaly", None) => Some("events".to_string()),
        ("anomaly", Some(m)) if MEASURES.contains(&m.as_str()) => Some(m.clone()),
        ("anomaly", Some(_)) => {
            return Err(Problem::invalid_field(
                "measure",
                format!("must be one of {}", MEASURES.join(", ")),
            ))
        }
        (_, Some(_)) => {
            return Err(Problem::invalid_field(
                "measure",
                "only anomaly rules have one",
            ))
        }
        (_, None) => None,
    };
    let op = match b.op.as_deref() {
        None | Some("above") => "above",
        Some("below") => "below",
        Some(_) => return Err(Problem::invalid_field("op", "must be above or below")),
    };
    let threshold = match (kind, b.threshold) {
        ("silence", None) => 0.0,
        ("silence", Some(_)) => {
            return Err(Problem::invalid_field("threshold", "a silence has none"))
        }
        ("anomaly", None) => 3.0,
        (_, None) => return Err(Problem::invalid_field("threshold", "is required")),
        (_, Some(t)) => t,
    };
    let range = match kind {
        "error_rate" => 0.0..=100.0,
        "anomaly" => 0.1..=1000.0,
        _ => 0.0..=1e15,
    };
    if !threshold.is_finite() || !range.contains(&threshold) {
        return Err(Problem::invalid_field(
            "threshold",
            format!("must be {} to {}", range.start(), range.end()),
        ));
    }
    let window = b.window_minutes.unwrap_or(match kind {
        "silence" => 10,
        "anomaly" => 60,
        _ => 5,
    });
    if !(1..=1440).contains(&window) {
        return Err(Problem::invalid_field(
            "window_minutes",
            "must be 1 to 1440",
        ));
    }
    let cooldown = b.cooldown_minutes.unwrap_or(60);
    if !(0..=10_080).contains(&cooldown) {
        return Err(Problem::invalid_field(
            "cooldown_minutes",
            "must be 0 to 10080",
        ));
    }
    let min_events = b.min_events.unwrap_or(10);
    if !(0..=1_000_000).contains(&min_events) {
        return Err(Problem::invalid_field("min_events", "must be 0 to 1000000"));
    }
    Ok(Checked {
        scope,
        scope_id,
        op,
        threshold,
        window,
        cooldown,
        min_events,
        measure,
        channels: check_channels(s, tenant, b.channels.as_deref()).await?,
    })
}

async fn view(s: &AppState, tenant: TenantId, id: Uuid) -> Result<Rule, Problem> {
    let mut conn = s.pool.acquire().await.map_err(db)?;
    Rule::get(&mut conn, tenant, id)
        .await
        .map_err(db)?
        .ok_or_else(|| Problem::not_found("no such rule in this tenant"))
}

fn may(editor: &BudgetEditor, r: &Rule) -> bool {
    editor.may(Scope::parse(&r.scope).unwrap_or(Scope::Tenant), &r.scope_id)
}

/// `POST /v1/admin/rules`
pub async fn create(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Body(req): Body<RuleBody>,
) -> Result<(StatusCode, Json<Rule>), Problem> {
    let tenant = editor.admin.tenant;
    let c = check(&s, tenant, &req).await?;
    if !editor.may(c.scope, &c.scope_id) {
        return Err(editor.refuse());
    }
    let mut tx = s.pool.begin().await.map_err(db)?;
    if let Some(p) = over_limit(&mut tx, "alert_rules", tenant, MAX_RULES).await? {
        return Err(p);
    }
    let id = Uuid::now_v7();
    write(
        &mut tx,
        tenant,
        id,
        &req,
        &c,
        true,
        editor.admin.actor.user_id,
    )
    .await?;
    let target = format!("rule:{id}");
    audited(
        &s,
        &mut tx,
        &editor.admin,
        AuthKind::RuleChanged,
        target,
        "created",
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok((StatusCode::CREATED, Json(view(&s, tenant, id).await?)))
}

/// Inserts or replaces a rule (a replaced rule starts again from `ok`).
async fn write(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    id: Uuid,
    b: &RuleBody,
    c: &Checked,
    new: bool,
    by: Option<Uuid>,
) -> Result<(), Problem> {
    let sql = match new {
        true => {
            "INSERT INTO control.alert_rules (id, tenant_id, name, kind, scope, scope_id,
                    event_type, name_filter, measure, op, threshold, window_minutes,
                    cooldown_minutes, min_events, channels, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        }
        false => {
            "UPDATE control.alert_rules SET name = $3, kind = $4, scope = $5, scope_id = $6,
                    event_type = $7, name_filter = $8, measure = $9, op = $10, threshold = $11,
                    window_minutes = $12, cooldown_minutes = $13, min_events = $14,
                    channels = $15, state = 'ok', created_by = coalesce(created_by, $16),
                    updated_at = now()
              WHERE id = $1 AND tenant_id = $2"
        }
    };
    sqlx::query(sql)
        .bind(id)
        .bind(tenant.0)
        .bind(&b.name)
        .bind(&b.kind)
        .bind(c.scope.as_str())
        .bind(&c.scope_id)
        .bind(b.event_type.as_deref())
        .bind(b.name_filter.as_deref())
        .bind(c.measure.as_deref())
        .bind(c.op)
        .bind(c.threshold)
        .bind(c.window)
        .bind(c.cooldown)
        .bind(c.min_events)
        .bind(&c.channels)
        .bind(by)
        .execute(tx)
        .await
        .map_err(db)?;
    Ok(())
}

/// `GET /v1/admin/rules`: with each rule's state, last value and last evaluation.
pub async fn list(
    State(s): State<AppState>,
    editor: BudgetEditor,
) -> Result<Json<Vec<Rule>>, Problem> {
    let mut conn = s.pool.acquire().await.map_err(db)?;
    let all = Rule::of_tenant(&mut conn, editor.admin.tenant)
        .await
        .map_err(db)?;
    Ok(Json(all.into_iter().filter(|r| may(&editor, r)).collect()))
}

/// `GET /v1/admin/rules/{id}`
pub async fn get(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Id(id): Id,
) -> Result<Json<Rule>, Problem> {
    let r = view(&s, editor.admin.tenant, id).await?;
    match may(&editor, &r) {
        true => Ok(Json(r)),
        false => Err(Problem::not_found("no such rule in this tenant")),
    }
}

/// `PUT /v1/admin/rules/{id}`: replaces it; it starts again from `ok`.
pub async fn update(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Id(id): Id,
    Body(req): Body<RuleBody>,
) -> Result<Json<Rule>, Problem> {
    let tenant = editor.admin.tenant;
    let c = check(&s, tenant, &req).await?;
    if !may(&editor, &view(&s, tenant, id).await?) || !editor.may(c.scope, &c.scope_id) {
        return Err(editor.refuse());
    }
    let mut tx = s.pool.begin().await.map_err(db)?;
    write(&mut tx, tenant, id, &req, &c, false, None).await?;
    let target = format!("rule:{id}");
    audited(
        &s,
        &mut tx,
        &editor.admin,
        AuthKind::RuleChanged,
        target,
        "updated",
    )
    .await?;
    tx.commit().await.map_err(db)?;
    s.outbox_wake.notify_one();
    Ok(Json(view(&s, tenant, id).await?))
}

/// `DELETE /v1/admin/rules/{id}`: its firings stay in the history.
pub async fn delete(
    State(s): State<AppState>,
    editor: BudgetEditor,
    Id(id): Id,
) -> Result<StatusCode, Problem> {
    if !may(&editor, &view(&s, editor.admin.tenant, id).await?) {
        return Err(editor.refuse());
    }
    let statements = ["DELETE FROM control.alert_rules WHERE tenant_id = $1 AND id = $2"];
    let change = Change::new(AuthKind::RuleChanged, format!("rule:{id}"), "deleted");
    change_one(
        &s,
        &editor.admin,
        id,
        &statements,
        "no such rule in this tenant",
        change,
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}
