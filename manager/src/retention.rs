//! Retention of ended runs' deltas: a background task per replica compacts the
//! `content.delta` events of runs whose tenant's retention has passed since they ended
//! (`store::events::compact` says how; item texts are kept whole). The same task forgets
//! runners gone for a day (`store::runners::forget_gone`).
//!
//! It works in small transactions of a few runs, taken `FOR UPDATE SKIP LOCKED`, so
//! replicas split the work and never compact a run twice, and nothing else waits for it:
//! appends and claims touch other rows, and a call on a run being compacted waits at
//! most one small transaction.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::store::events::{self, Compacted};
use crate::store::runners;

/// The longest retention a setting may ask for: 100 years (longer is "forever", 0).
pub const MAX_RETENTION_MS: i64 = 100 * 365 * 24 * 60 * 60 * 1000;

/// Runs compacted per transaction: their row locks and the deleted rows are held only
/// that long.
pub const RUNS_PER_TRANSACTION: i64 = 8;

/// Compacts due runs every `interval` until `shutdown` is cancelled. Errors are logged
/// and retried on the next tick (the database may be briefly away).
pub async fn run(
    pool: Pool,
    metrics: Arc<Metrics>,
    default_retention_ms: i64,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let (pool, metrics, stop) = (&pool, &metrics, &shutdown);
    crate::periodic::every(interval, shutdown.clone(), move || async move {
        match compact_due(pool, default_retention_ms, stop).await {
            Ok(done) if done.runs > 0 => {
                metrics.compacted(done.runs, done.deltas_removed);
                tracing::info!(
                    runs = done.runs,
                    deltas_removed = done.deltas_removed,
                    bytes_freed = done.bytes_freed,
                    "ended runs' deltas compacted"
                );
            }
            Ok(_) => {}
            Err(err) => tracing::warn!(error = ?err, "event compaction failed; retrying next tick"),
        }
        match forget_gone_runners(pool).await {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(forgotten, "runners gone for a day forgotten"),
            Err(err) => {
                tracing::warn!(error = ?err, "forgetting gone runners failed; retrying next tick")
            }
        }
    })
    .await
}

async fn forget_gone_runners(pool: &Pool) -> Result<u64> {
    runners::forget_gone(&pool.get().await?).await
}

/// Compacts every run due now, [`RUNS_PER_TRANSACTION`] at a time, until none is left
/// (or `shutdown`); returns the totals.
pub async fn compact_due(
    pool: &Pool,
    default_retention_ms: i64,
    shutdown: &CancellationToken,
) -> Result<Compacted> {
    let mut total = Compacted::default();
    while !shutdown.is_cancelled() {
        let done = compact_batch(pool, default_retention_ms).await?;
        total.runs += done.runs;
        total.deltas_removed += done.deltas_removed;
        total.bytes_freed += done.bytes_freed;
        if done.runs < RUNS_PER_TRANSACTION as u64 {
            break;
        }
    }
    Ok(total)
}

/// One transaction: lock a few due runs, compact and mark them.
async fn compact_batch(pool: &Pool, default_retention_ms: i64) -> Result<Compacted> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let due =
        events::lock_due_for_compaction(&tx, default_retention_ms, RUNS_PER_TRANSACTION).await?;
    let done = events::compact(&tx, &due).await?;
    tx.commit().await?;
    Ok(done)
}
