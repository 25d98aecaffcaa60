//! Operator subcommands: `ingest-api admin tenant create …`, `ingest-api admin api-key …`.

use crate::outbox;
use clap::Subcommand;
use shared::apikey::{self, Scope};
use shared::events::{Actor, AuthEvent, AuthKind};
use shared::tenant::TenantId;
use sqlx::PgPool;
use uuid::Uuid;

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage API keys.
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Manage people who log in.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage the keys that sign access tokens.
    #[command(subcommand, name = "signing-key")]
    SigningKey(SigningKeyCommand),
    /// Manage platform-operator keys.
    #[command(subcommand, name = "operator-key")]
    OperatorKey(OperatorKeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password comes from TALLY_USER_PASSWORD or the first line of stdin.
    Create {
        #[arg(long)]
        tenant: Uuid,
        #[arg(long)]
        email: String,
        #[arg(long, value_parser = ["owner", "admin", "manager", "developer", "viewer"])]
        role: String,
        /// The user id this person's events carry (default: the e-mail address).
        #[arg(long)]
        external_id: Option<String>,
        /// A team (as events name it) this person belongs to; repeatable.
        #[arg(long = "team")]
        teams: Vec<String>,
    },
    /// Deactivate a user: logins and refreshes stop at once, access tokens within 10 s.
    Deactivate {
        #[arg(long)]
        email: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum OperatorKeyCommand {
    /// Create a platform-operator key (manages tenants over HTTP); printed once.
    Create {
        #[arg(long, default_value = "operator")]
        name: String,
    },
    /// List operator keys (ids and names, never the secrets).
    List,
    /// Revoke an operator key by id: refused at its next request.
    Revoke {
        #[arg(long)]
        id: Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum SigningKeyCommand {
    /// Sign with a new key; the previous one stays published until its tokens expire.
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; prints its id.
    Create {
        #[arg(long)]
        name: String,
    },
    /// List tenants.
    List,
    /// Set a tenant's plan (free 100, professional 1000, enterprise 5000 requests/min) and
    /// optionally its own limit.
    SetPlan {
        #[arg(long)]
        id: Uuid,
        #[arg(long, value_parser = ["free", "professional", "enterprise"])]
        plan: String,
        /// Requests per minute, overriding the plan's.
        #[arg(long)]
        rate_limit: Option<u32>,
    },
    /// Deactivate a tenant: its keys stop working (within the key cache delay).
    Deactivate {
        #[arg(long)]
        id: Uuid,
    },
    /// Reactivate a deactivated tenant.
    Reactivate {
        #[arg(long)]
        id: Uuid,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key; prints the secret once (it is stored only as a hash).
    Create {
        #[arg(long)]
        tenant: Uuid,
        /// `ingest` (send events), `read` (dashboards) or `admin` (manage users and keys).
        #[arg(long, value_parser = ["ingest", "read", "admin"])]
        scope: String,
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Revoke a key by id.
    Revoke {
        #[arg(long)]
        id: Uuid,
    },
    /// List a tenant's keys (never their secrets).
    List {
        #[arg(long)]
        tenant: Uuid,
    },
}

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
    anyhow::ensure!(
        (1..=200).contains(&name.chars().count()),
        "a tenant name has 1..=200 characters"
    );
    let mut tx = pool.begin().await?;
    let id = TenantId::new();
    sqlx::query("INSERT INTO control.tenants (id, name) VALUES ($1, $2)")
        .bind(id.0)
        .bind(name)
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
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
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

/// Deactivates a user and ends their sessions.
pub async fn deactivate_user(pool: &PgPool, ns: &str, email: &str) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, Uuid)> = sqlx::query_as(
        "UPDATE control.users SET status = 'deactivated', token_version = token_version + 1,
                updated_at = now()
          WHERE email = $1 RETURNING id, tenant_id",
    )
    .bind(email.trim().to_lowercase())
    .fetch_optional(&mut *tx)
    .await?;
    let (id, tenant) = row.ok_or_else(|| anyhow::anyhow!("no user {email}"))?;
    sqlx::query(
        "UPDATE control.refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
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

/// Creates a platform-operator key; returns the secret (stored only as a hash).
pub async fn create_operator_key(pool: &PgPool, name: &str) -> anyhow::Result<String> {
    Ok(create_operator_key_with_id(pool, name).await?.1)
}

/// Creates a platform-operator key; returns its id and the secret (stored only as a hash).
pub async fn create_operator_key_with_id(
    pool: &PgPool,
    name: &str,
) -> anyhow::Result<(Uuid, String)> {
    let key = apikey::generate_operator();
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
          ORDER BY id FOR UPDATE",
    )
    .bind(c.tenant.0)
    .fetch_all(&mut *tx)
    .await?;
    let current: Option<String> = sqlx::query_scalar(
        "SELECT role FROM control.users WHERE id = $1 AND tenant_id = $2 FOR UPDATE",
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
    let key = apikey::generate();
    let id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO control.api_keys (id, tenant_id, name, scope, key_hash)
         SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM control.tenants WHERE id = $2)",
    )
    .bind(id)
    .bind(tenant.0)
    .bind(name)
    .bind(scope.as_str())
    .bind(&key.hash)
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

/// Runs an operator command; events go to the outbox of deployment `ns` (the topic prefix).
pub async fn run(
    pool: &PgPool,
    ns: &str,
    timescale: shared::config::Timescale,
    cmd: AdminCommand,
) -> anyhow::Result<()> {
    shared::db::migrate(pool, timescale).await?;
    match cmd {
        AdminCommand::Tenant(TenantCommand::Create { name }) => {
            println!("{}", create_tenant(pool, ns, &name).await?);
        }
        AdminCommand::Tenant(TenantCommand::List) => {
            let rows: Vec<(Uuid, String, String)> =
                sqlx::query_as("SELECT id, name, status FROM control.tenants ORDER BY created_at")
                    .fetch_all(pool)
                    .await?;
            for (id, name, status) in rows {
                println!("{id}\t{status}\t{name}");
            }
        }
        AdminCommand::User(UserCommand::Create {
            tenant,
            email,
            role,
            external_id,
            teams,
        }) => {
            let password = match std::env::var("TALLY_USER_PASSWORD") {
                Ok(p) => p,
                Err(_) => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            let role = shared::jwt::Role::parse(&role).expect("clap checked the role");
            let id = create_user(
                pool,
                ns,
                NewUser {
                    tenant: TenantId(tenant),
                    email: &email,
                    password: &password,
                    role,
                    external_id: external_id.as_deref(),
                    teams: &teams,
                },
            )
            .await?;
            println!("{id}");
        }
        AdminCommand::User(UserCommand::Deactivate { email }) => {
            deactivate_user(pool, ns, &email).await?;
            println!("{email} deactivated");
        }
        AdminCommand::OperatorKey(OperatorKeyCommand::Create { name }) => {
            let (id, secret) = create_operator_key_with_id(pool, &name).await?;
            eprintln!("operator key {id}");
            println!("{secret}");
        }
        AdminCommand::OperatorKey(OperatorKeyCommand::List) => {
            let rows: Vec<(Uuid, String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
                "SELECT id, name, revoked_at FROM control.operator_keys ORDER BY created_at",
            )
            .fetch_all(pool)
            .await?;
            for (id, name, revoked) in rows {
                let state = revoked.map_or("active".to_string(), |t| format!("revoked {t}"));
                println!("{id}\t{state}\t{name}");
            }
        }
        AdminCommand::OperatorKey(OperatorKeyCommand::Revoke { id }) => {
            revoke_operator_key(pool, id).await?;
            println!("revoked operator key {id}");
        }
        AdminCommand::SigningKey(SigningKeyCommand::Rotate) => {
            println!("signing with {}", crate::keys::rotate(pool).await?);
        }
        AdminCommand::Tenant(TenantCommand::SetPlan {
            id,
            plan,
            rate_limit,
        }) => {
            let limit = rate_limit.map(i32::try_from).transpose()?;
            set_plan(pool, TenantId(id), &plan, limit).await?;
            println!("tenant {id}: plan {plan}");
        }
        AdminCommand::Tenant(TenantCommand::Deactivate { id }) => {
            set_status(pool, ns, TenantId(id), "deactivated").await?;
            println!("tenant {id} deactivated");
        }
        AdminCommand::Tenant(TenantCommand::Reactivate { id }) => {
            set_status(pool, ns, TenantId(id), "active").await?;
            println!("tenant {id} active");
        }
        AdminCommand::ApiKey(ApiKeyCommand::Create {
            tenant,
            scope,
            name,
        }) => {
            let scope = Scope::parse(&scope).expect("clap checked the scope");
            let (_, secret) = create_api_key(pool, ns, TenantId(tenant), scope, &name).await?;
            println!("{secret}");
        }
        AdminCommand::ApiKey(ApiKeyCommand::Revoke { id }) => {
            revoke_api_key(pool, ns, id).await?;
            println!(
                "revoked {id} (services forget it within {} s)",
                shared::auth::KEY_CACHE_TTL.as_secs()
            );
        }
        AdminCommand::ApiKey(ApiKeyCommand::List { tenant }) => {
            let rows: Vec<(Uuid, String, String, Option<chrono::DateTime<chrono::Utc>>)> = sqlx::query_as(
                "SELECT id, name, scope, revoked_at FROM control.api_keys WHERE tenant_id = $1 ORDER BY created_at",
            )
            .bind(tenant)
            .fetch_all(pool)
            .await?;
            for (id, name, scope, revoked) in rows {
                let state = revoked.map_or("active".to_string(), |t| format!("revoked {t}"));
                println!("{id}\t{scope}\t{state}\t{name}");
            }
        }
    }
    Ok(())
}
