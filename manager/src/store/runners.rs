//! Runners as operators see them: who is connected, what each holds, draining one, and
//! the per-tenant limits on active runs that claims obey (`leases::claim`).
//!
//! A runner row is written when the runner connects or claims (`leases`); `draining` is
//! set here by an operator and read back by whichever manager replica holds the runner's
//! stream, so a drain works from any replica.

use std::time::{Duration, SystemTime};

use agentrun_shared::ids::{RunId, RunnerId};
use deadpool_postgres::GenericClient;

use crate::error::Result;

/// How recently a runner must have been seen to count as connected.
pub const SEEN_WITHIN: Duration = Duration::from_secs(5 * 60);

/// How long a runner row is kept after the runner was last seen. A connected runner is
/// seen at every heartbeat; one gone this long holds nothing (its leases expired long
/// ago) and comes back, if ever, with a hello that writes its row again.
pub const FORGOTTEN_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Deletes the runners not seen for [`FORGOTTEN_AFTER`]: with a new runner id per
/// process (the default), an autoscaled fleet would otherwise leave a row for every
/// process it ever ran. Returns how many went.
pub async fn forget_gone(client: &impl GenericClient) -> Result<u64> {
    let stmt = client
        .prepare_cached(
            "DELETE FROM runners
             WHERE last_heartbeat_at < now() - $1::bigint * interval '1 millisecond'",
        )
        .await?;
    Ok(client
        .execute(&stmt, &[&(FORGOTTEN_AFTER.as_millis() as i64)])
        .await?)
}

/// A runner seen recently, with the leases it holds.
#[derive(Debug, Clone)]
pub struct RunnerRecord {
    pub id: RunnerId,
    /// Its API key's tenant; empty for a runner without a key (it serves every tenant).
    pub tenant_id: String,
    pub name: String,
    pub labels: Vec<String>,
    pub backend_profiles: Vec<String>,
    pub max_concurrency: i32,
    pub version: String,
    pub last_heartbeat_at: SystemTime,
    pub draining: bool,
    /// Active runs leased to it, with their epochs.
    pub leases: Vec<(RunId, i64)>,
    /// The manager replica holding its stream.
    pub replica_id: Option<uuid::Uuid>,
}

fn seen_within_ms() -> i64 {
    SEEN_WITHIN.as_millis() as i64
}

/// Runners seen within [`SEEN_WITHIN`], by name, each with its active leases.
pub async fn list_recent(client: &impl GenericClient) -> Result<Vec<RunnerRecord>> {
    let stmt = client
        .prepare_cached(
            "SELECT w.id, w.name, w.labels, w.backend_profiles, w.max_concurrency, w.version,
                    w.last_heartbeat_at, w.draining,
                    coalesce(array_agg(r.id ORDER BY r.id) FILTER (WHERE r.id IS NOT NULL), '{}'),
                    coalesce(array_agg(r.lease_epoch ORDER BY r.id) FILTER (WHERE r.id IS NOT NULL), '{}'),
                    w.tenant_id, w.manager_id
             FROM runners w
             LEFT JOIN runs r ON r.lease_runner_id = w.id
                  AND (w.tenant_id = '' OR r.tenant_id = w.tenant_id)
                  AND r.status IN ('claimed', 'running', 'waiting')
             WHERE w.last_heartbeat_at > now() - $1::bigint * interval '1 millisecond'
             GROUP BY w.tenant_id, w.id, w.manager_id
             ORDER BY w.name, w.id, w.tenant_id",
        )
        .await?;
    let rows = client.query(&stmt, &[&seen_within_ms()]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let run_ids: Vec<uuid::Uuid> = row.get(8);
            let epochs: Vec<i64> = row.get(9);
            RunnerRecord {
                id: RunnerId(row.get(0)),
                tenant_id: row.get(10),
                name: row.get(1),
                labels: row.get(2),
                backend_profiles: row.get(3),
                max_concurrency: row.get(4),
                version: row.get(5),
                last_heartbeat_at: row.get(6),
                draining: row.get(7),
                leases: run_ids.into_iter().map(RunId).zip(epochs).collect(),
                replica_id: row.get(11),
            }
        })
        .collect())
}

/// Marks a runner seen within [`SEEN_WITHIN`] as draining: it is assigned nothing more,
/// and the replica holding its stream tells it to finish its runs and exit. Runner ids
/// are per tenant; an operator's drain applies to every tenant's runner with this id.
/// Returns false when no such runner is known. Idempotent.
pub async fn drain(client: &impl GenericClient, runner_id: RunnerId) -> Result<bool> {
    let stmt = client
        .prepare_cached(
            "UPDATE runners SET draining = true
             WHERE id = $1 AND last_heartbeat_at > now() - $2::bigint * interval '1 millisecond'",
        )
        .await?;
    let changed = client
        .execute(&stmt, &[&runner_id.0, &seen_within_ms()])
        .await?;
    Ok(changed > 0)
}

/// Sets a tenant's limit on active (claimed, running, waiting) runs; `None` removes it.
/// Runs already active above a lowered limit are left alone; no new ones are claimed
/// until the tenant is below it.
pub async fn set_tenant_limit(
    client: &impl GenericClient,
    tenant_id: &str,
    max_active_runs: Option<i32>,
) -> Result<()> {
    match max_active_runs {
        Some(max) => {
            let stmt = client
                .prepare_cached(
                    "INSERT INTO tenant_limits (tenant_id, max_active_runs) VALUES ($1, $2)
                     ON CONFLICT (tenant_id) DO UPDATE
                         SET max_active_runs = $2, updated_at = now()",
                )
                .await?;
            client.execute(&stmt, &[&tenant_id, &max]).await?;
        }
        None => {
            // The row may also hold the tenant's retention: only the limit goes.
            let stmt = client
                .prepare_cached(
                    "UPDATE tenant_limits SET max_active_runs = NULL, updated_at = now()
                     WHERE tenant_id = $1",
                )
                .await?;
            client.execute(&stmt, &[&tenant_id]).await?;
        }
    }
    Ok(())
}

/// Sets how long a tenant's ended runs keep every `content.delta` (0: forever); `None`
/// makes it follow the manager's default again. Leaves the tenant's limit alone.
pub async fn set_tenant_retention(
    client: &impl GenericClient,
    tenant_id: &str,
    event_retention_ms: Option<i64>,
) -> Result<()> {
    let stmt = client
        .prepare_cached(
            "INSERT INTO tenant_limits (tenant_id, event_retention_ms) VALUES ($1, $2)
             ON CONFLICT (tenant_id) DO UPDATE
                 SET event_retention_ms = $2, updated_at = now()",
        )
        .await?;
    client
        .execute(&stmt, &[&tenant_id, &event_retention_ms])
        .await?;
    Ok(())
}
