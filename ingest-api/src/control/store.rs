//! The control plane's writes that the HTTP routes, the operator CLI and the tests share:
//! tenants, users, API keys and operator keys, each change with its event in the outbox.

use crate::outbox;
use shared::apikey::Scope;
use shared::events::{Actor, AuthEvent, AuthKind};
use shared::tenant::TenantId;
use sqlx::PgPool;
use uuid::Uuid;

/// Records a control-plane event in the outbox within `tx` (relayed by the ingest-api of
/// deployment `ns`, the topic prefix).
async fn record(
    tx: &mut sqlx::PgConnection,
    ns: &str,
    tenant: TenantId,
    kind: AuthKind,
    event: AuthEvent,
) -> anyhow::Result<()> {
    let env = outbox::auth_event(tenant, kind, Actor::default(), event);
    outbox::record(tx, ns, &env).await?;
    Ok(())
}

/// Creates a tenant and returns its id.
pub async fn create_tenant(pool: &PgPool, ns: &str, name: &str) -> anyhow::Result<TenantId> {
    create_tenant_with_privacy(pool, ns, name, false, None).await
}

/// Creates a tenant, in privacy mode from its first moment when `privacy_mode` (with group
/// size `privacy_k`, default 5), and returns its id.
pub async fn create_tenant_with_privacy(
    pool: &PgPool,
    ns: &str,
    name: &str,
    privacy_mode: bool,
    privacy_k: Option<i32>,
) -> anyhow::Result<TenantId> {
    anyhow::ensure!(
        (1..=200).contains(&name.chars().count()),
        "a tenant name has 1..=200 characters"
    );
    anyhow::ensure!(
        privacy_k.is_none_or(|k| (2..=1000).contains(&k)),
        "privacy_k is 2..=1000"
    );
    let mut tx = pool.begin().await?;
    let id = TenantId::new();
    sqlx::query(
        "INSERT INTO control.tenants (id, name, privacy_mode, privacy_k)
         VALUES ($1, $2, $3, coalesce($4, 5))",
    )
    .bind(id.0)
    .bind(name)
    .bind(privacy_mode)
    .bind(privacy_k)
    .execute(&mut *tx)
    .await?;
    let event = AuthEvent {
        detail: Some(name.to_string()),
        ..Default::default()
    };
    record(&mut tx, ns, id, AuthKind::TenantCreated, event).await?;
    tx.commit().await?;
    Ok(id)
}

/// Sets a tenant's plan and optional own rate limit (requests per minute).
pub async fn set_plan(
    pool: &PgPool,
    tenant: TenantId,
    plan: &str,
    rate_limit: Option<i32>,
) -> anyhow::Result<()> {
    let n = sqlx::query(
        "UPDATE control.tenants SET plan = $2, rate_limit_per_min = $3, updated_at = now()
          WHERE id = $1",
    )
    .bind(tenant.0)
    .bind(plan)
    .bind(rate_limit)
    .execute(pool)
    .await?
    .rows_affected();
    anyhow::ensure!(n == 1, "no tenant {tenant}");
    Ok(())
}

/// Activates or deactivates a tenant.
pub async fn set_status(
    pool: &PgPool,
    ns: &str,
    tenant: TenantId,
    status: &str,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query("UPDATE control.tenants SET status = $2, updated_at = now() WHERE id = $1")
        .bind(tenant.0)
        .bind(status)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    anyhow::ensure!(n == 1, "no tenant {tenant}");
    if status == "deactivated" {
        record(
            &mut tx,
            ns,
            tenant,
            AuthKind::TenantDeactivated,
            AuthEvent::default(),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Most people a tenant may have (deactivated ones included).
pub const MAX_USERS: i64 = 10_000;
/// Most API keys a tenant may have that are not revoked.
pub const MAX_ACTIVE_API_KEYS: i64 = 1_000;
/// Most teams a tenant may have.
pub const MAX_TEAMS: i64 = 1_000;
/// Most invitations a tenant may have open (neither accepted nor expired).
pub const MAX_OPEN_INVITATIONS: i64 = 1_000;

/// The person whose rights a key would be made with is no longer an active owner or admin
/// (answered 403).
#[derive(Debug)]
pub struct RightsGone;

impl std::fmt::Display for RightsGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the person this key's rights come from is no longer an owner or admin")
    }
}

impl std::error::Error for RightsGone {}

/// A tenant already has as many of something as it may (answered 409 `limit-reached`).
#[derive(Debug, Clone, Copy)]
pub struct LimitReached {
    pub what: &'static str,
    pub max: i64,
}

impl std::fmt::Display for LimitReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a tenant may have at most {} {}", self.max, self.what)
    }
}

impl std::error::Error for LimitReached {}

impl From<LimitReached> for shared::problem::Problem {
    fn from(l: LimitReached) -> Self {
        shared::problem::Problem::new(
            axum::http::StatusCode::CONFLICT,
            "limit-reached",
            "Limit reached",
            l.to_string(),
        )
    }
}

/// The tenant's rows of `table` matching `filter`, counted under an advisory lock (per
/// tenant and table) held until `tx` ends: two transactions each adding one cannot both see
/// room for one.
pub(crate) async fn count_locked(
    tx: &mut sqlx::PgConnection,
    table: &'static str,
    filter: &'static str,
    tenant: TenantId,
) -> sqlx::Result<i64> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('control.' || $1), hashtext($2))")
        .bind(table)
        .bind(tenant.0.to_string())
        .execute(&mut *tx)
        .await?;
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM control.{table} WHERE tenant_id = $1 AND ({filter})"
    )))
    .bind(tenant.0)
    .fetch_one(&mut *tx)
    .await
}

/// `Err(LimitReached)` when the tenant has `max` of `what` already ([`count_locked`]); the
/// outer error is the database's.
pub(crate) async fn room_for_one(
    tx: &mut sqlx::PgConnection,
    (table, filter): (&'static str, &'static str),
    tenant: TenantId,
    max: i64,
    what: &'static str,
) -> sqlx::Result<Result<(), LimitReached>> {
    let n = count_locked(tx, table, filter, tenant).await?;
    Ok(match n >= max {
        true => Err(LimitReached { what, max }),
        false => Ok(()),
    })
}

/// Room for one more person in the tenant ([`room_for_one`]).
pub(crate) async fn room_for_a_person(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
) -> sqlx::Result<Result<(), LimitReached>> {
    room_for_one(tx, ("users", "true"), tenant, MAX_USERS, "people").await
}

/// An admin gives a removed person's address a place again (creating it, or an invitation to it
/// accepted): single sign-on may provision it from now on.
pub(crate) async fn lift_removal(
    tx: &mut sqlx::PgConnection,
    tenant: TenantId,
    email: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "DELETE FROM control.removed_people
          WHERE tenant_id = $1 AND email_hash = sha256(convert_to($2, 'UTF8'))",
    )
    .bind(tenant.0)
    .bind(email)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The same answer as [`room_for_a_person`] without the lock, read before a password is
/// hashed: a full tenant is refused without costing a hash slot (19 MiB and the time of a
/// login). The locked count in the transaction that inserts the person still decides.
pub(crate) async fn room_for_a_person_now(
    pool: &PgPool,
    tenant: TenantId,
) -> sqlx::Result<Result<(), LimitReached>> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM control.users WHERE tenant_id = $1")
        .bind(tenant.0)
        .fetch_one(pool)
        .await?;
    Ok(match n >= MAX_USERS {
        true => Err(LimitReached {
            what: "people",
            max: MAX_USERS,
        }),
        false => Ok(()),
    })
}

/// A new person who logs in.
pub struct NewUser<'a> {
    pub tenant: TenantId,
    pub email: &'a str,
    pub password: &'a str,
    pub role: shared::jwt::Role,
    pub external_id: Option<&'a str>,
    pub teams: &'a [String],
}

/// Creates a user (the password must meet the policy); returns the user id.
pub async fn create_user(pool: &PgPool, ns: &str, u: NewUser<'_>) -> anyhow::Result<Uuid> {
    let email = u.email.trim().to_lowercase();
    anyhow::ensure!(
        email.contains('@') && (3..=254).contains(&email.len()),
        "`{email}` is not an e-mail address"
    );
    crate::password::check_policy("password", u.password)
        .map_err(|e| anyhow::anyhow!("password {}", e.reason))?;
    let password = u.password.to_string();
    let hash = tokio::task::spawn_blocking(move || crate::password::hash(&password)).await?;
    create_user_hashed(pool, ns, u, hash).await
}

/// [`create_user`] with the password's `hash` made by the caller (a request makes it within
/// the service's hash slots, `routes::auth::hash_password`, after checking the policy).
pub async fn create_user_hashed(
    pool: &PgPool,
    ns: &str,
    u: NewUser<'_>,
    hash: String,
) -> anyhow::Result<Uuid> {
    let email = u.email.trim().to_lowercase();
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    room_for_a_person(&mut tx, u.tenant).await??;
    lift_removal(&mut tx, u.tenant, &email).await?;
    sqlx::query(
        "INSERT INTO control.users (id, tenant_id, email, password_hash, role, external_id, teams)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(u.tenant.0)
    .bind(&email)
    .bind(hash)
    .bind(u.role.as_str())
    .bind(u.external_id.unwrap_or(&email))
    .bind(u.teams)
    .execute(&mut *tx)
    .await?;
    let event = AuthEvent {
        user_id: Some(id),
        email: Some(email.clone()),
        detail: Some(format!("role {}", u.role.as_str())),
        extra: outbox::user_snapshot(&mut tx, id).await?,
        ..Default::default()
    };
    record(&mut tx, ns, u.tenant, AuthKind::UserCreated, event).await?;
    tx.commit().await?;
    Ok(id)
}

/// Deactivates a user and ends their sessions: the account of `email` in `tenant`, or its only
/// account (an address with accounts in several tenants needs `tenant`).
pub async fn deactivate_user(
    pool: &PgPool,
    ns: &str,
    email: &str,
    tenant: Option<TenantId>,
) -> anyhow::Result<()> {
    let (id, TenantId(tenant)) = account_of(pool, email, tenant).await?;
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE control.users SET status = 'deactivated', token_version = token_version + 1,
                updated_at = now()
          WHERE id = $1",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    // Removed since it was looked up.
    anyhow::ensure!(n == 1, "no user {email}");
    sqlx::query(
        "UPDATE control.refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    revoke_keys_of(&mut tx, ns, TenantId(tenant), id).await?;
    let event = AuthEvent {
        user_id: Some(id),
        email: Some(email.trim().to_lowercase()),
        ..Default::default()
    };
    record(
        &mut tx,
        ns,
        TenantId(tenant),
        AuthKind::UserDeactivated,
        event,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// What [`remove_user`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserRemoval {
    Removed,
    /// No such user in the tenant.
    NotFound,
    /// The person is an owner and the caller is not one; nothing changed.
    OwnerOnly,
    /// The person is still active: they are deactivated first (which ends their sessions
    /// and revokes the keys made with their rights); nothing changed.
    StillActive,
}

/// Removes a deactivated person for good: their row, refresh tokens, single sign-on
/// identities and the invitation they accepted go, the keys made with their rights forget
/// them, and their place among the tenant's people is free again; invitations still open to
/// their address are revoked. Single sign-on does not provision the address again until an
/// admin creates it or it accepts a new invitation. The `user.removed` event
/// carries a tombstone snapshot (status `removed`, no address), which the tenant's `users`
/// read model keeps in place of theirs. What they sent stays under their external id.
pub async fn remove_user(
    pool: &PgPool,
    ns: &str,
    tenant: TenantId,
    id: Uuid,
    (by_owner, actor): (bool, Actor),
) -> anyhow::Result<UserRemoval> {
    use shared::people::{Snapshot, UserSnapshot};
    let mut tx = pool.begin().await?;
    let current: Option<(String, String)> = sqlx::query_as(
        "SELECT role, status FROM control.users WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
    )
    .bind(id)
    .bind(tenant.0)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((role, status)) = current else {
        return Ok(UserRemoval::NotFound);
    };
    if role == shared::jwt::Role::Owner.as_str() && !by_owner {
        return Ok(UserRemoval::OwnerOnly);
    }
    if status == "active" {
        return Ok(UserRemoval::StillActive);
    }
    // Single sign-on must not provision them again (see `control.removed_people`).
    sqlx::query(
        "INSERT INTO control.removed_people (tenant_id, email_hash)
         SELECT tenant_id, sha256(convert_to(email, 'UTF8')) FROM control.users WHERE id = $1
         ON CONFLICT (tenant_id, email_hash) DO UPDATE SET removed_at = now()",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    // Invitations still open to the address (made while they were deactivated) go with them.
    let revoked: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE control.invitations i SET revoked_at = now()
           FROM control.users u
          WHERE u.id = $1 AND i.tenant_id = u.tenant_id AND i.email = u.email
            AND i.accepted_at IS NULL AND i.revoked_at IS NULL AND i.expires_at > now()
         RETURNING i.id",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    for invitation in revoked {
        let event = AuthEvent {
            target: Some(format!("invitation:{invitation}")),
            detail: Some("revoked with the removal of the person it invited".into()),
            ..Default::default()
        };
        let env = outbox::auth_event(tenant, AuthKind::InvitationChanged, actor.clone(), event);
        outbox::record(&mut tx, ns, &env).await?;
    }
    let erase = [
        "DELETE FROM control.refresh_tokens WHERE user_id = $1",
        "DELETE FROM control.user_identities WHERE user_id = $1",
        "DELETE FROM control.invitations WHERE user_id = $1",
        "UPDATE control.api_keys SET on_behalf_of = NULL WHERE on_behalf_of = $1",
        "DELETE FROM control.users WHERE id = $1",
    ];
    for sql in erase {
        sqlx::query(sql).bind(id).execute(&mut *tx).await?;
    }
    let tombstone = UserSnapshot {
        user_id: id,
        email: String::new(),
        role,
        status: "removed".into(),
        external_id: String::new(),
        teams: Vec::new(),
    };
    let event = AuthEvent {
        user_id: Some(id),
        target: Some(format!("user:{id}")),
        detail: Some("removed; their control-plane records are erased".into()),
        extra: tombstone.into_extra(),
        ..Default::default()
    };
    let env = outbox::auth_event(tenant, AuthKind::UserRemoved, actor, event);
    outbox::record(&mut tx, ns, &env).await?;
    tx.commit().await?;
    Ok(UserRemoval::Removed)
}

/// The one account of `email` (in `tenant`, when the address has several).
pub async fn account_of(
    pool: &PgPool,
    email: &str,
    tenant: Option<TenantId>,
) -> anyhow::Result<(Uuid, TenantId)> {
    let accounts: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT id, tenant_id FROM control.users
          WHERE email = $1 AND ($2::uuid IS NULL OR tenant_id = $2)",
    )
    .bind(email.trim().to_lowercase())
    .bind(tenant.map(|t| t.0))
    .fetch_all(pool)
    .await?;
    match accounts.as_slice() {
        [] => anyhow::bail!("no user {email}"),
        [(id, tenant)] => Ok((*id, TenantId(*tenant))),
        more => anyhow::bail!(
            "{email} has accounts in {} tenants; name one with --tenant",
            more.len()
        ),
    }
}

/// Creates a platform-operator key; returns the secret (stored only as a hash).
pub async fn create_operator_key(pool: &PgPool, name: &str) -> anyhow::Result<String> {
    Ok(create_operator_key_with_id(pool, name).await?.1)
}

/// Creates a platform-operator key; returns its id and the secret (stored only as a hash).
pub async fn create_operator_key_with_id(
    pool: &PgPool,
    name: &str,
) -> anyhow::Result<(Uuid, String)> {
    let key = crate::secrets::operator_key();
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO control.operator_keys (id, name, key_hash) VALUES ($1, $2, $3)")
        .bind(id)
        .bind(name)
        .bind(&key.hash)
        .execute(pool)
        .await?;
    Ok((id, key.secret))
}

/// Revokes an operator key; every instance refuses it from its next request (operator keys
/// are not cached).
pub async fn revoke_operator_key(pool: &PgPool, id: Uuid) -> anyhow::Result<()> {
    let n = sqlx::query(
        "UPDATE control.operator_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(pool)
    .await?
    .rows_affected();
    anyhow::ensure!(n == 1, "no active operator key {id}");
    Ok(())
}

/// A change to a tenant's user.
pub struct UserChange<'a> {
    pub tenant: TenantId,
    pub id: Uuid,
    pub role: Option<shared::jwt::Role>,
    pub teams: Option<&'a [String]>,
    pub active: Option<bool>,
    /// Whether an owner asks: only owners may make, demote, deactivate or reactivate owners.
    pub by_owner: bool,
    /// Who asks, for the audit log.
    pub actor: Actor,
}

/// What [`update_user`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserUpdate {
    Updated,
    /// No such user in the tenant.
    NotFound,
    /// The change concerns an owner and the caller is not one; nothing changed.
    OwnerOnly,
    /// The change would leave the tenant without an active owner; nothing changed.
    LastOwner,
}

/// Changes a user's role, teams or status (deactivation ends their sessions). The user's row
/// is locked while the rights are checked, so the role checked is the role changed.
pub async fn update_user(pool: &PgPool, ns: &str, c: UserChange<'_>) -> anyhow::Result<UserUpdate> {
    use shared::jwt::Role;
    let mut tx = pool.begin().await?;
    // Owners first, in id order, then the user: two owners demoting each other wait in line.
    let owners: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM control.users WHERE tenant_id = $1 AND role = 'owner' AND status = 'active'
          ORDER BY id FOR NO KEY UPDATE",
    )
    .bind(c.tenant.0)
    .fetch_all(&mut *tx)
    .await?;
    let current: Option<String> = sqlx::query_scalar(
        "SELECT role FROM control.users WHERE id = $1 AND tenant_id = $2 FOR NO KEY UPDATE",
    )
    .bind(c.id)
    .bind(c.tenant.0)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(current) = current else {
        return Ok(UserUpdate::NotFound);
    };
    let is_owner = current == Role::Owner.as_str();
    let leaves_owner =
        is_owner && (c.role.is_some_and(|r| r != Role::Owner) || c.active == Some(false));
    let touches_owner = (is_owner && (leaves_owner || c.active.is_some()))
        || (c.role == Some(Role::Owner) && !is_owner);
    if touches_owner && !c.by_owner {
        return Ok(UserUpdate::OwnerOnly);
    }
    if leaves_owner && owners.iter().all(|o| *o == c.id) {
        return Ok(UserUpdate::LastOwner);
    }
    let (id, tenant, role, active) = (c.id, c.tenant, c.role, c.active);
    let email: String = sqlx::query_scalar(
        "UPDATE control.users SET
                role = coalesce($3, role),
                teams = coalesce($4, teams),
                status = coalesce($5, status),
                token_version = token_version + CASE WHEN $5 = 'deactivated' OR $3 IS NOT NULL
                                                     THEN 1 ELSE 0 END,
                updated_at = now()
          WHERE id = $1 AND tenant_id = $2
          RETURNING email",
    )
    .bind(id)
    .bind(tenant.0)
    .bind(role.map(|r| r.as_str()))
    .bind(c.teams)
    .bind(active.map(|a| if a { "active" } else { "deactivated" }))
    .fetch_one(&mut *tx)
    .await?;
    if active == Some(false) {
        sqlx::query(
            "UPDATE control.refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    let demoted = role.is_some_and(|r| !matches!(r, Role::Owner | Role::Admin));
    if demoted || active == Some(false) {
        revoke_keys_of(&mut tx, ns, tenant, id).await?;
    } else if leaves_owner {
        // An owner made admin: the owners they invited were invited with a right now gone.
        revoke_invitations_of(&mut tx, ns, tenant, id, Some(Role::Owner)).await?;
    }
    let kind = if active == Some(false) {
        AuthKind::UserDeactivated
    } else {
        AuthKind::UserUpdated
    };
    let event = AuthEvent {
        user_id: Some(id),
        email: Some(email),
        detail: role.map(|r| format!("role {}", r.as_str())),
        extra: outbox::user_snapshot(&mut tx, id).await?,
        ..Default::default()
    };
    let env = outbox::auth_event(tenant, kind, c.actor, event);
    outbox::record(&mut tx, ns, &env).await?;
    tx.commit().await?;
    Ok(UserUpdate::Updated)
}

/// Revokes the open invitations made with `user`'s rights (those of `role` only, when given),
/// in `tx`: they have lost the right to make them. Returns how many.
async fn revoke_invitations_of(
    tx: &mut sqlx::PgConnection,
    ns: &str,
    tenant: TenantId,
    user: Uuid,
    role: Option<shared::jwt::Role>,
) -> anyhow::Result<usize> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE control.invitations SET revoked_at = now()
          WHERE tenant_id = $1 AND invited_by = $2 AND ($3::text IS NULL OR role = $3)
            AND accepted_at IS NULL AND revoked_at IS NULL AND expires_at > now()
          RETURNING id",
    )
    .bind(tenant.0)
    .bind(user)
    .bind(role.map(|r| r.as_str()))
    .fetch_all(&mut *tx)
    .await?;
    for id in &ids {
        let event = AuthEvent {
            user_id: Some(user),
            target: Some(format!("invitation:{id}")),
            detail: Some("made by a person who no longer has the right to make it".into()),
            ..Default::default()
        };
        record(&mut *tx, ns, tenant, AuthKind::InvitationChanged, event).await?;
    }
    Ok(ids.len())
}

/// Revokes the `admin` and `read` keys, and the open invitations, made with `user`'s rights,
/// in `tx` (they are no longer an owner or admin); returns how many keys.
pub(crate) async fn revoke_keys_of(
    tx: &mut sqlx::PgConnection,
    ns: &str,
    tenant: TenantId,
    user: Uuid,
) -> anyhow::Result<usize> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE control.api_keys SET revoked_at = now()
          WHERE tenant_id = $1 AND on_behalf_of = $2 AND scope IN ('admin', 'read')
            AND revoked_at IS NULL
          RETURNING id",
    )
    .bind(tenant.0)
    .bind(user)
    .fetch_all(&mut *tx)
    .await?;
    for id in &ids {
        let event = AuthEvent {
            user_id: Some(user),
            target: Some(format!("api_key:{id}")),
            detail: Some("made by a person who is no longer an owner or admin".into()),
            ..Default::default()
        };
        record(&mut *tx, ns, tenant, AuthKind::ApiKeyRevoked, event).await?;
    }
    revoke_invitations_of(&mut *tx, ns, tenant, user, None).await?;
    Ok(ids.len())
}

/// Revokes an API key.
pub async fn revoke_api_key(pool: &PgPool, ns: &str, id: Uuid) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let tenant: Option<Uuid> = sqlx::query_scalar(
        "UPDATE control.api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
         RETURNING tenant_id",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let tenant = tenant.ok_or_else(|| anyhow::anyhow!("no active key {id}"))?;
    let event = AuthEvent {
        target: Some(format!("api_key:{id}")),
        ..Default::default()
    };
    record(
        &mut tx,
        ns,
        TenantId(tenant),
        AuthKind::ApiKeyRevoked,
        event,
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Creates an API key; returns (key id, secret).
pub async fn create_api_key(
    pool: &PgPool,
    ns: &str,
    tenant: TenantId,
    scope: Scope,
    name: &str,
) -> anyhow::Result<(Uuid, String)> {
    create_api_key_for(pool, ns, tenant, scope, name, None).await
}

/// [`create_api_key`] made with the rights of the person `on_behalf_of`: their `admin` and
/// `read` keys are revoked when they stop being an owner or admin ([`revoke_keys_of`]).
pub async fn create_api_key_for(
    pool: &PgPool,
    ns: &str,
    tenant: TenantId,
    scope: Scope,
    name: &str,
    on_behalf_of: Option<Uuid>,
) -> anyhow::Result<(Uuid, String)> {
    let key = crate::secrets::api_key();
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    if let Some(person) = on_behalf_of {
        // Under the person's row lock: a demotion committing meanwhile either comes first
        // (and the key is refused) or revokes the key with the others.
        let still: bool = sqlx::query_scalar(
            "SELECT coalesce((SELECT status = 'active' AND role IN ('owner', 'admin')
                                FROM control.users WHERE id = $1 FOR SHARE), false)",
        )
        .bind(person)
        .fetch_one(&mut *tx)
        .await?;
        if !still {
            return Err(RightsGone.into());
        }
    }
    room_for_one(
        &mut tx,
        ("api_keys", "revoked_at IS NULL"),
        tenant,
        MAX_ACTIVE_API_KEYS,
        "API keys that are not revoked",
    )
    .await??;
    let inserted = sqlx::query(
        "INSERT INTO control.api_keys (id, tenant_id, name, scope, key_hash, on_behalf_of)
         SELECT $1, $2, $3, $4, $5, $6 WHERE EXISTS (SELECT 1 FROM control.tenants WHERE id = $2)",
    )
    .bind(id)
    .bind(tenant.0)
    .bind(name)
    .bind(scope.as_str())
    .bind(&key.hash)
    .bind(on_behalf_of)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    anyhow::ensure!(inserted == 1, "no tenant {tenant}");
    let event = AuthEvent {
        target: Some(format!("api_key:{id}")),
        detail: Some(format!("scope {}, name {name}", scope.as_str())),
        ..Default::default()
    };
    record(&mut tx, ns, tenant, AuthKind::ApiKeyCreated, event).await?;
    tx.commit().await?;
    Ok((id, key.secret))
}
