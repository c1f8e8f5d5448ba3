//! The connection pool and schema migrations.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Any key works as long as every replica uses the same one: it serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6167_656e_7472_756e; // "agentrun"

/// A pool of `size` connections to `url`. Connections are opened lazily.
pub fn pool(url: &str, size: usize) -> anyhow::Result<Pool> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager).max_size(size).build()?)
}

/// Applies pending migrations. Safe to call from several replicas at once: an advisory
/// lock makes them take turns, and the later ones find nothing left to do.
pub async fn migrate(pool: &Pool) -> anyhow::Result<()> {
    let mut client = pool.get().await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let client: &mut tokio_postgres::Client = &mut client;
    let result = embedded::migrations::runner().run_async(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let report = result?;
    for migration in report.applied_migrations() {
        tracing::info!(
            version = migration.version(),
            name = migration.name(),
            "applied migration"
        );
    }
    Ok(())
}

/// Whether every embedded migration has been applied (a newer schema, from a newer
/// replica, counts as current). `false` when no migration has run at all.
pub async fn schema_current(client: &mut tokio_postgres::Client) -> anyhow::Result<bool> {
    let runner = embedded::migrations::runner();
    let Some(latest) = runner.get_migrations().iter().map(|m| m.version()).max() else {
        return Ok(true);
    };
    // refinery's history table; querying it when it does not exist would be an error.
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(false);
    }
    let applied = runner.get_last_applied_migration_async(client).await?;
    Ok(applied.is_some_and(|m| m.version() >= latest))
}
