//! The schedules' firing loop: a background task per replica that sleeps until the next
//! schedule comes due — at most the poll interval (`--schedule-poll-interval-ms`), and
//! woken early when a schedule is created or resumed on this replica — and fires every
//! due schedule, one transaction each (`store::firing::fire_next_due`). Replicas split
//! the work with `SKIP LOCKED`; a schedule fired by one is no longer due for the others.
//! A due time that passed while every manager was down is found due on the next start,
//! and its catch-up policy applies. While nothing is due a pass is one small query.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::limits::Quotas;
use crate::notify::Notifier;
use crate::store::{firing, schedules};

/// The shortest sleep: a due schedule another replica is firing (its row locked) is
/// not polled in a tight loop.
pub const MIN_SLEEP: Duration = Duration::from_millis(20);
/// The most schedules fired in one pass; the rest wait for the next (a moment later).
pub const MAX_PER_PASS: usize = 1000;

/// The loop's settings.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The quotas a created run counts against.
    pub quotas: Quotas,
    /// How late a due time may be fired and still be on time (catch-up none).
    pub grace: Duration,
    /// The longest sleep between looks at the schedules.
    pub poll: Duration,
}

/// Fires due schedules until `shutdown` is cancelled. Errors are logged and retried
/// after the poll interval (the database may be briefly away).
pub async fn run(
    pool: Pool,
    notifier: Arc<Notifier>,
    changed: Arc<Notify>,
    timing: Timing,
    shutdown: CancellationToken,
) {
    loop {
        // Armed before the pass: a schedule created during it still wakes the loop.
        let woken = changed.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let sleep = match pass(&pool, &notifier, &timing, &shutdown).await {
            Ok(sleep) => sleep,
            Err(err) => {
                tracing::warn!(error = ?err, "firing schedules failed; retrying");
                timing.poll
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(sleep) => {}
            _ = woken => {}
        }
    }
}

/// One look at the schedules: fires those due, and says how long to sleep.
async fn pass(
    pool: &Pool,
    notifier: &Notifier,
    timing: &Timing,
    shutdown: &CancellationToken,
) -> Result<Duration> {
    let next = {
        let client = pool.get().await?;
        schedules::time_to_next_due(&client).await?
    };
    match next {
        Some(wait) if wait.is_zero() => {
            fire_due(pool, notifier, &timing.quotas, timing.grace, shutdown).await?;
            // Look again at once, for what became due meanwhile.
            Ok(MIN_SLEEP)
        }
        Some(wait) => Ok(wait.clamp(MIN_SLEEP, timing.poll)),
        None => Ok(timing.poll),
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
