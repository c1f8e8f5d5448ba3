//! `grpc.health.v1` status that follows the database: every service reports
//! NOT_SERVING while PostgreSQL is unreachable or the schema lacks migrations this
//! build expects, and SERVING again once it recovers; a schema too new for this build
//! stops the replica. [`check_serving`] is the other side: `agentrun-manager health`, a
//! container health check asking a manager.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::db;

/// How often the database is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe slower than this counts as a failure.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Sets every one of `services` ("" is the server as a whole) to `status`.
pub async fn set_all(reporter: &HealthReporter, services: &[&str], status: ServingStatus) {
    for service in services {
        reporter.set_service_status(*service, status).await;
    }
}

/// Probes the database every [`PROBE_INTERVAL`] and reports the outcome for `services`
/// until `shutdown`. `schema_checked` says the schema is already known to be current
/// (this replica migrated it); otherwise it is checked until it is. `migrate`: this
/// replica was to migrate at start but the database did not answer; it does so first,
/// on each tick until that succeeds.
///
/// A schema this build must not serve ([`db::incompatibility`]: a newer replica
/// migrated it past what this build reads correctly) stops the replica: every service
/// turns NOT_SERVING, the reason goes into `stop` and the manager shuts down as on
/// SIGTERM (runner streams drain to other replicas), then exits with it as its error.
pub async fn watch(
    pool: Pool,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    mut schema_checked: bool,
    mut migrate: bool,
    stop: SelfStop,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = None;
    // The last reason the deferred migration failed, logged when it changes.
    let mut migration_failed: Option<String> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if migrate {
            // Not under the probe's timeout: a migration may take longer, and is not
            // to be cut off halfway.
            match db::migrate(&pool).await {
                Ok(()) => {
                    tracing::info!("the database answers: migrations applied");
                    migrate = false;
                }
                Err(err) => {
                    let reason = format!("{err:#}");
                    if migration_failed.as_ref() != Some(&reason) {
                        tracing::warn!(%reason, "migrating failed; trying again");
                        migration_failed = Some(reason);
                    }
                }
            }
        }
        let probed = tokio::time::timeout(PROBE_TIMEOUT, probe(&pool, &mut schema_checked))
            .await
            .unwrap_or_else(|_| Err(NotServing::Unavailable("database probe timed out".into())));
        if let Err(NotServing::Incompatible(reason)) = &probed {
            tracing::error!(%reason, "stopping: this build must not serve the schema");
            set_all(&reporter, &services, ServingStatus::NotServing).await;
            stop.stop(reason.clone());
            return;
        }
        let now_serving = probed.is_ok();
        if serving == Some(now_serving) {
            continue;
        }
        match &probed {
            Ok(()) => tracing::info!("database reachable and schema current: serving"),
            Err(reason) => tracing::warn!(%reason, "not serving"),
        }
        let status = if now_serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        set_all(&reporter, &services, status).await;
        serving = Some(now_serving);
    }
}

/// How a replica stops by itself: the token that shuts it down, and why it did.
#[derive(Clone)]
pub struct SelfStop {
    token: CancellationToken,
    reason: Arc<OnceLock<String>>,
}

impl SelfStop {
    /// Stops the replica whose shutdown is `token`.
    pub fn new(token: CancellationToken) -> Self {
        Self {
            token,
            reason: Arc::default(),
        }
    }

    fn stop(&self, reason: String) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    /// Why the replica stopped by itself, if it did.
    pub fn reason(&self) -> Option<&str> {
        self.reason.get().map(String::as_str)
    }
}

/// Why a probe found the replica not serving.
#[derive(Debug)]
enum NotServing {
    /// The database is unreachable or behind: serving resumes once it is back.
    Unavailable(String),
    /// The schema is too new for this build: the replica stops.
    Incompatible(String),
}

impl std::fmt::Display for NotServing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotServing::Unavailable(reason) | NotServing::Incompatible(reason) => {
                f.write_str(reason)
            }
        }
    }
}

/// Until the schema has been found current once, `SELECT 1` on a pool connection and
/// the schema check; from then on, the schema's compatibility with this build (one
/// query either way).
async fn probe(pool: &Pool, schema_checked: &mut bool) -> Result<(), NotServing> {
    let unavailable =
        |what: &str, err: &dyn std::fmt::Display| NotServing::Unavailable(format!("{what}: {err}"));
    let mut client = pool
        .get()
        .await
        .map_err(|err| unavailable("no database connection", &err))?;
    if *schema_checked {
        return match db::incompatibility(&client).await {
            Ok(None) => Ok(()),
            Ok(Some(reason)) => Err(NotServing::Incompatible(reason)),
            Err(err) => Err(unavailable("cannot read the schema's compatibility", &err)),
        };
    }
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|err| unavailable("database query failed", &err))?;
    let client: &mut tokio_postgres::Client = &mut client;
    *schema_checked = db::schema_current(client)
        .await
        .map_err(|err| unavailable("cannot read the schema version", &err))?;
    if !*schema_checked {
        return Err(NotServing::Unavailable(
            "database migrations are pending (run `agentrun-manager migrate`)".into(),
        ));
    }
    Ok(())
}

/// `agentrun-manager health`: which manager to probe, and how.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The manager's URL; default this manager's `--listen` port on loopback (https://
    /// when it serves TLS, then also give `--ca` and a URL naming its certificate's host).
    #[arg(long)]
    pub url: Option<String>,
    /// PEM CA certificate to trust over https:// (default: the system roots).
    #[arg(long)]
    pub ca: Option<std::path::PathBuf>,
    /// How long the probe may take, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    pub timeout_ms: u64,
}

/// Asks the manager's health service about the server as a whole; true when it is
/// SERVING. Prints what it found.
pub async fn check_serving(settings: &crate::Settings, args: &ProbeArgs) -> anyhow::Result<bool> {
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let url = args.url.clone().unwrap_or_else(|| {
        let scheme = if settings.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        let port = settings.listen.port();
        format!("{scheme}://127.0.0.1:{port}")
    });
    let tls = agentrun_shared::tls::ClientTls {
        ca: args.ca.clone(),
        ..Default::default()
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let endpoint = tls
        .endpoint(&url)?
        .connect_timeout(timeout)
        .timeout(timeout);
    let asked = async {
        let mut client = HealthClient::new(endpoint.connect().await?);
        let response = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(response.into_inner().status())
    };
    let status = match tokio::time::timeout(timeout, asked).await {
        Ok(Ok(status)) => status,
        Ok(Err(err)) => {
            println!("{url}: not reachable: {err}");
            return Ok(false);
        }
        Err(_) => {
            println!("{url}: no answer within {timeout:?}");
            return Ok(false);
        }
    };
    println!("{url}: {}", status.as_str_name());
    Ok(status == Status::Serving)
}
