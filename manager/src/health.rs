//! `grpc.health.v1` status that follows the database: every service reports
//! NOT_SERVING while PostgreSQL is unreachable or the schema lacks migrations this
//! build expects, and SERVING again once it recovers.

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
/// (this replica migrated it); otherwise it is checked until it is.
pub async fn watch(
    pool: Pool,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    mut schema_checked: bool,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let probed = tokio::time::timeout(PROBE_TIMEOUT, probe(&pool, &mut schema_checked))
            .await
            .unwrap_or_else(|_| Err("database probe timed out".into()));
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

/// `SELECT 1` on a pool connection; then, until it has passed once, the schema check.
async fn probe(pool: &Pool, schema_checked: &mut bool) -> Result<(), String> {
    let mut client = pool
        .get()
        .await
        .map_err(|err| format!("no database connection: {err}"))?;
    client
        .simple_query("SELECT 1")
        .await
        .map_err(|err| format!("database query failed: {err}"))?;
    if !*schema_checked {
        let client: &mut tokio_postgres::Client = &mut client;
        *schema_checked = db::schema_current(client)
            .await
            .map_err(|err| format!("cannot read the schema version: {err}"))?;
        if !*schema_checked {
            return Err("database migrations are pending (run `agentrun-manager migrate`)".into());
        }
    }
    Ok(())
}
