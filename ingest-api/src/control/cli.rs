//! Operator subcommands: `ingest-api admin tenant create …`, `ingest-api admin api-key …`,
//! over the control plane's store.

use clap::Subcommand;
use shared::apikey::Scope;
use shared::tenant::TenantId;
use sqlx::PgPool;
use uuid::Uuid;

use super::store::{
    create_api_key, create_operator_key_with_id, create_tenant_with_privacy, create_user,
    deactivate_user, revoke_api_key, revoke_operator_key, set_plan, set_status, NewUser,
};
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
        /// The tenant, when the address has accounts in several.
        #[arg(long)]
        tenant: Option<Uuid>,
    },
    /// Remove a deactivated user for good (their control-plane records are erased).
    Remove {
        #[arg(long)]
        email: String,
        /// The tenant, when the address has accounts in several.
        #[arg(long)]
        tenant: Option<Uuid>,
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
        /// Start in privacy mode: aggregates of at least `--privacy-k` people for managers,
        /// viewers and read keys; individual views for the person themself.
        #[arg(long)]
        privacy_mode: bool,
        /// The smallest group an aggregate covers in privacy mode (2..=1000, default 5).
        #[arg(long)]
        privacy_k: Option<i32>,
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
/// Runs an operator command; events go to the outbox of deployment `ns` (the topic prefix).
pub async fn run(pool: &PgPool, ns: &str, cmd: AdminCommand) -> anyhow::Result<()> {
    shared::db::migrate(pool).await?;
    match cmd {
        AdminCommand::Tenant(TenantCommand::Create {
            name,
            privacy_mode,
            privacy_k,
        }) => {
            let tenant =
                create_tenant_with_privacy(pool, ns, &name, privacy_mode, privacy_k).await?;
            println!("{tenant}");
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
        AdminCommand::User(UserCommand::Deactivate { email, tenant }) => {
            deactivate_user(pool, ns, &email, tenant.map(TenantId)).await?;
            println!("{email} deactivated");
        }
        AdminCommand::User(UserCommand::Remove { email, tenant }) => {
            use super::store::{account_of, remove_user, UserRemoval};
            let (id, tenant) = account_of(pool, &email, tenant.map(TenantId)).await?;
            let operator = (true, shared::events::Actor::default());
            match remove_user(pool, ns, tenant, id, operator).await? {
                UserRemoval::Removed => println!("{email} removed"),
                UserRemoval::StillActive => anyhow::bail!("{email} is active; deactivate first"),
                UserRemoval::NotFound | UserRemoval::OwnerOnly => anyhow::bail!("no user {email}"),
            }
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
