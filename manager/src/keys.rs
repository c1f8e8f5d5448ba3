//! `agentrun-manager keys create|list|revoke`: API key management straight against the
//! database (`DATABASE_URL`), so the first admin key can be made before any exists.
//! AdminService offers the same once one does.

use crate::db::{self, Database};
use crate::store::api_keys::{self, ApiKeyRecord, Role};

/// What `keys` does.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Creates a key and prints it — once: only a hash of it is stored.
    Create {
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// client (RunService, SessionService), runner (RunnerService) or admin
        /// (AdminService, cluster-wide).
        #[arg(long, value_parser = ["client", "runner", "admin"])]
        role: String,
        /// Limits a client key to a project (repeatable); default: all of the tenant's.
        #[arg(long = "project")]
        projects: Vec<String>,
        /// A label for people: where the key is used.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Lists keys (never their secrets).
    List {
        /// Only this tenant's keys.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revokes a key by id; managers refuse it within seconds (their key cache: 5 s).
    Revoke {
        /// The key id (the hex after `ark_`, as `keys list` shows it).
        id: String,
    },
}

/// Runs a `keys` command against `database`.
/// Applies pending migrations first when `migrate` is set (the table may be new).
pub async fn run(database: &Database, migrate: bool, command: KeysCommand) -> anyhow::Result<()> {
    let pool = database.pool(1)?;
    if migrate {
        db::migrate(&pool).await?;
    }
    let client = pool.get().await?;
    match command {
        KeysCommand::Create {
            tenant,
            role,
            projects,
            name,
        } => {
            anyhow::ensure!(!tenant.is_empty(), "--tenant must not be empty");
            let role = Role::parse(&role).ok_or_else(|| anyhow::anyhow!("unknown role {role}"))?;
            let created = api_keys::create(&client, &tenant, role, &projects, &name).await?;
            eprintln!(
                "created {} key {} for tenant {tenant}; it is shown only once:",
                role.as_str(),
                created.record.id.simple()
            );
            println!("{}", created.key);
        }
        KeysCommand::List { tenant } => {
            let keys = api_keys::list(&client, tenant.as_deref()).await?;
            println!(
                "{:<32}  {:<16}  {:<6}  {:<20}  {:<8}  NAME",
                "ID", "TENANT", "ROLE", "PROJECTS", "STATE"
            );
            for key in &keys {
                println!("{}", row(key));
            }
        }
        KeysCommand::Revoke { id } => {
            let id = uuid::Uuid::try_parse(&id)
                .map_err(|_| anyhow::anyhow!("{id:?} is not a key id"))?;
            let revoked = api_keys::revoke(&client, id)
                .await
                .map_err(|err| anyhow::anyhow!("cannot revoke key {}: {err}", id.simple()))?;
            println!("revoked key {}", revoked.id.simple());
        }
    }
    Ok(())
}

fn row(key: &ApiKeyRecord) -> String {
    let projects = if key.project_ids.is_empty() {
        "*".to_owned()
    } else {
        key.project_ids.join(",")
    };
    let state = match key.revoked_at {
        Some(_) => "revoked",
        None => "active",
    };
    format!(
        "{:<32}  {:<16}  {:<6}  {:<20}  {:<8}  {}",
        key.id.simple(),
        key.tenant_id,
        key.role.as_str(),
        projects,
        state,
        key.name
    )
}
