//! The database: where and how to connect (TLS included, see [`tls`]), the connection
//! pool, and schema migrations.

pub mod tls;

use std::path::Path;

pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod};
use tokio_postgres::{Client, Connection, Socket};

use crate::config::Settings;

pub use tls::SslMode;

mod embedded {
    refinery::embed_migrations!("../migrations");
}

/// Any key works as long as every replica uses the same one: it serialises migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6167_656e_7472_756e; // "agentrun"

/// Where the database is and how to reach it: the one place that decides TLS. Every
/// connection (the pool, the LISTEN connection, the `migrate` and `keys` commands) is
/// opened through it.
#[derive(Clone)]
pub struct Database {
    config: tokio_postgres::Config,
    ssl_mode: SslMode,
    tls: tls::MakeRustlsConnect,
}

impl Database {
    /// The database at `url` (libpq's `sslmode` and `sslrootcert` honoured), trusting
    /// `ca_file` (`--database-ca-file`) if given.
    pub fn new(url: &str, ca_file: Option<&Path>) -> Result<Self, tls::SettingError> {
        let (config, ssl_mode, tls) = tls::configure(url, ca_file)?;
        Ok(Self {
            config,
            ssl_mode,
            tls,
        })
    }

    /// The database `settings` name (`DATABASE_URL`, `--database-ca-file`).
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let url = settings
            .database_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("DATABASE_URL (or --database-url) is required"))?;
        Ok(Self::new(url, settings.database_ca_file.as_deref())?)
    }

    pub fn ssl_mode(&self) -> SslMode {
        self.ssl_mode
    }

    /// A pool of `size` connections. Connections are opened lazily.
    pub fn pool(&self, size: usize) -> anyhow::Result<Pool> {
        let manager = Manager::from_config(
            self.config.clone(),
            self.tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        Ok(Pool::builder(manager).max_size(size).build()?)
    }

    /// One connection outside the pool; the caller must poll (or spawn) the connection.
    pub async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, tls::RustlsStream<Socket>>), tokio_postgres::Error>
    {
        self.config.connect(self.tls.clone()).await
    }
}

/// A pool of `size` connections to `url` (no `--database-ca-file`).
pub fn pool(url: &str, size: usize) -> anyhow::Result<Pool> {
    Database::new(url, None)?.pool(size)
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

/// Whether `err`, getting a connection, says the database does not answer yet: nothing
/// listens, the connection was cut or timed out, the server is starting up or shutting
/// down or has no connection slot free. Waiting mends those; it does not mend a
/// misconfigured replica (a failed TLS handshake, a refused login, a missing database),
/// which is `false`.
pub fn not_answering_yet(err: &deadpool_postgres::PoolError) -> bool {
    use std::io::ErrorKind;
    use tokio_postgres::error::SqlState;
    let err = match err {
        deadpool_postgres::PoolError::Timeout(_) => return true,
        deadpool_postgres::PoolError::Backend(err) => err,
        _ => return false,
    };
    if let Some(code) = err.code() {
        return [
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::TOO_MANY_CONNECTIONS,
        ]
        .contains(code);
    }
    if err.is_closed() {
        return true;
    }
    let mut cause = std::error::Error::source(err);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotConnected
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::UnexpectedEof
            );
        }
        cause = error.source();
    }
    false
}

/// The newest migration this build embeds.
pub fn newest_migration() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.version())
        .max()
        .unwrap_or(0)
}

/// Why this build must not serve the (current) schema, if it must not: the schema names
/// the oldest build that still reads it correctly (migration V30), and a migration that
/// older builds would misread raises it.
pub async fn incompatibility(client: &Client) -> anyhow::Result<Option<String>> {
    let oldest_reader: i32 = client
        .query_one("SELECT oldest_reader FROM schema_compatibility", &[])
        .await?
        .get(0);
    let newest = newest_migration();
    Ok((oldest_reader > newest).then(|| {
        format!(
            "the schema needs a manager built with migration V{oldest_reader} or later; \
             this one has V{newest}: upgrade it"
        )
    }))
}

/// Whether every embedded migration has been applied (a newer schema, from a newer
/// replica, counts as current). `false` when no migration has run at all.
pub async fn schema_current(client: &mut tokio_postgres::Client) -> anyhow::Result<bool> {
    let latest = newest_migration();
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
    let applied = embedded::migrations::runner()
        .get_last_applied_migration_async(client)
        .await?;
    Ok(applied.is_some_and(|m| m.version() >= latest))
}
