//! The schedules' firing loop: a background task per replica that sleeps until the next
//! schedule comes due (at most [`MAX_SLEEP`], so schedules created on other replicas are
//! seen promptly) and fires every due schedule, one transaction each
//! (`store::firing::fire_next_due`). Replicas split the work with `SKIP LOCKED`; a
//! schedule fired by one is no longer due for the others. A due time that passed while
//! every manager was down is found due on the next start, and its catch-up policy
//! applies.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::limits::Quotas;
use crate::notify::Notifier;
use crate::store::{firing, schedules};

/// The longest the loop sleeps between looks at the schedules.
pub const MAX_SLEEP: Duration = Duration::from_secs(1);
/// The shortest sleep: a due schedule another replica is firing (its row locked) is
/// not polled in a tight loop.
pub const MIN_SLEEP: Duration = Duration::from_millis(20);
/// The most schedules fired in one pass; the rest wait for the next (a moment later).
pub const MAX_PER_PASS: usize = 1000;

/// Fires due schedules until `shutdown` is cancelled. Errors are logged and retried
/// after a sleep (the database may be briefly away).
pub async fn run(
    pool: Pool,
    notifier: Arc<Notifier>,
    quotas: Quotas,
    grace: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let pass = async {
            fire_due(&pool, &notifier, &quotas, grace, &shutdown).await?;
            let client = pool.get().await?;
            schedules::time_to_next_due(&client).await
        };
        let sleep = match pass.await {
            Ok(Some(next)) => next.clamp(MIN_SLEEP, MAX_SLEEP),
            Ok(None) => MAX_SLEEP,
            Err(err) => {
                tracing::warn!(error = ?err, "firing schedules failed; retrying");
                MAX_SLEEP
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Fires every schedule due now (up to [`MAX_PER_PASS`]), then wakes runners for the new
/// runs and the runners of cancelled ones.
pub async fn fire_due(
    pool: &Pool,
    notifier: &Notifier,
    quotas: &Quotas,
    grace: Duration,
    shutdown: &CancellationToken,
) -> Result<()> {
    for _ in 0..MAX_PER_PASS {
        if shutdown.is_cancelled() {
            break;
        }
        let Some((schedule, fired)) = firing::fire_next_due(pool, quotas, grace).await? else {
            break;
        };
        if let Some(run) = &fired.run {
            tracing::info!(schedule_id = %schedule.id, run_id = %run.id, "schedule fired");
            notifier.work_available();
        }
        if let Some(session) = fired.session() {
            notifier.events_appended([session.0]);
        }
        if let Some(cancelled) = fired.cancelled {
            notifier.commands_added(&[cancelled]);
        }
    }
    Ok(())
}
