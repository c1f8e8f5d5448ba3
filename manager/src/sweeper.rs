//! The lease sweeper: moves runs on when nobody else will.
//!
//! - an expired lease: the run is requeued (attempt + 1), or failed as `runner_lost`
//!   after `max_attempts`, or cancelled if its cancellation was requested;
//! - `run_timeout` passed since the claim: failed as `run_timeout` (the lease ends, so
//!   the runner's later writes are fenced out);
//! - `queue_timeout` passed while pending: expired as `queue_timeout`;
//! - a request open past its deadline: expired, and its run's provider told so.
//!
//! Every replica runs one. Each tick first reads what is due, in one statement
//! ([`DUE_SQL`]), and does only that: an idle replica's tick is that one read, not a
//! transaction for each kind of deadline. Rows are taken `FOR UPDATE SKIP LOCKED` in
//! bounded batches, so replicas split the work instead of doing it twice.

use std::sync::Arc;
use std::time::Duration;

use agentrun_shared::ids::RunId;
use agentrun_shared::state::RunStatus;
use deadpool_postgres::{GenericClient, Pool};
use tokio_util::sync::CancellationToken;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::store::runs::{Finish, RequeueReason};
use crate::store::{flow, lifecycle, requests};

/// Rows handled per transaction.
const BATCH: i64 = 500;

/// Sweeps every `interval` until `shutdown` is cancelled. Errors are logged and retried
/// on the next tick (the database may be briefly away).
pub async fn run(
    pool: Pool,
    notifier: Arc<Notifier>,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let (pool, notifier, metrics) = (&pool, &notifier, &metrics);
    crate::periodic::every(interval, shutdown, move || async move {
        match sweep_once(pool).await {
            Ok(swept) => {
                metrics.swept(swept.lease_expired, swept.requeued);
                if swept.admitted > 0 {
                    tracing::info!(
                        admitted = swept.admitted,
                        "held runs admitted by the sweeper"
                    );
                }
                // Requeued and admitted runs are claimable, and a run that ended may have
                // let its concurrency key's next run in; every moved run has new events.
                if swept.requeued > 0 || swept.admitted > 0 || !swept.moved.is_empty() {
                    notifier.work_available();
                }
                notifier.events_appended(swept.moved.iter().map(|r| r.0));
                notifier.commands_added(&swept.answered);
            }
            Err(err) => tracing::warn!(error = %err, "lease sweep failed; retrying next tick"),
        }
    })
    .await
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Leases found expired (each run was requeued, failed or cancelled).
    pub lease_expired: usize,
    /// Runs put back in the queue.
    pub requeued: usize,
    /// Every run that changed (requeued or ended).
    pub moved: Vec<RunId>,
    /// Runs whose expired requests got a `resolve` command for their runner.
    pub answered: Vec<RunId>,
    /// Held runs admitted by the safety net of concurrency-key admission (see
    /// [`flow::readmit`]).
    pub admitted: usize,
}

/// What a tick has to do: whether any row is due for each of the sweeps, and whether
/// runs wait held by their concurrency keys. The statuses are literals, so that each
/// check reads its partial index and stops at the first row it finds. Public for the
/// test of its plan.
pub const DUE_SQL: &str = "SELECT
     EXISTS (SELECT 1 FROM runs WHERE status IN ('claimed', 'running', 'waiting')
                                  AND lease_expires_at < now()),
     EXISTS (SELECT 1 FROM runs WHERE status IN ('claimed', 'running', 'waiting')
                                  AND run_deadline < now()),
     EXISTS (SELECT 1 FROM runs WHERE status = 'pending' AND queue_deadline < now()),
     EXISTS (SELECT 1 FROM requests WHERE status = 'open' AND deadline < now()),
     EXISTS (SELECT 1 FROM runs WHERE status = 'pending' AND held IS NOT NULL)";

/// [`DUE_SQL`]'s answer.
#[derive(Debug, Clone, Copy)]
struct Due {
    leases: bool,
    run_deadlines: bool,
    queue_deadlines: bool,
    requests: bool,
    held_runs: bool,
}

impl Due {
    async fn read(pool: &Pool) -> Result<Self> {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(DUE_SQL).await?;
        let row = client.query_one(&stmt, &[]).await?;
        Ok(Self {
            leases: row.get(0),
            run_deadlines: row.get(1),
            queue_deadlines: row.get(2),
            requests: row.get(3),
            held_runs: row.get(4),
        })
    }

    /// Whether a run or a request has a deadline or lease to end.
    fn anything_to_end(&self) -> bool {
        self.leases || self.run_deadlines || self.queue_deadlines || self.requests
    }
}

/// One tick: ends what is due, in batches until nothing is left (or what is left is
/// locked by another replica), then admits held runs if any wait.
pub async fn sweep_once(pool: &Pool) -> Result<Swept> {
    let mut swept = Swept::default();
    let first = Due::read(pool).await?;
    let mut due = first;
    while due.anything_to_end() {
        let (requeued, mut moved) = if due.leases {
            expire_leases(pool).await?
        } else {
            (0, Vec::new())
        };
        swept.lease_expired += moved.len();
        swept.requeued += requeued;
        if due.run_deadlines {
            moved.extend(time_out_runs(pool).await?);
        }
        if due.queue_deadlines {
            moved.extend(expire_queued(pool).await?);
        }
        let answered = if due.requests {
            expire_requests(pool).await?
        } else {
            Vec::new()
        };
        if moved.is_empty() && answered.is_empty() {
            break;
        }
        swept.moved.extend(moved);
        swept.answered.extend(answered);
        due = Due::read(pool).await?;
    }
    if first.held_runs {
        swept.admitted = flow::readmit(pool).await?;
    }
    Ok(swept)
}

/// Expires requests open past their deadline; returns the runs that got an answer.
async fn expire_requests(pool: &Pool) -> Result<Vec<RunId>> {
    let (answered, expired) = requests::expire_due(pool, BATCH).await?;
    if expired > 0 {
        tracing::info!(requests = expired, "expired requests swept");
    }
    Ok(answered)
}

/// Up to `$1` runs whose lease has expired, locked, the longest expired first. The
/// statuses are literals, so that even a generic plan reads the active runs through
/// their partial index: the expiry itself is not indexed, so that renewing a lease is a
/// heap-only update (migration V31). Public for the test of its plan.
pub const EXPIRED_LEASES_SQL: &str = "SELECT id, attempt, max_attempts, cancel_requested FROM runs
     WHERE status IN ('claimed', 'running', 'waiting') AND lease_expires_at < now()
     ORDER BY lease_expires_at LIMIT $1
     FOR UPDATE SKIP LOCKED";

/// Returns how many runs were requeued, and every run moved.
async fn expire_leases(pool: &Pool) -> Result<(usize, Vec<RunId>)> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(EXPIRED_LEASES_SQL).await?;
    let rows = tx.query(&stmt, &[&BATCH]).await?;
    let mut requeue = Vec::new();
    let mut finish = Vec::new();
    for row in &rows {
        let run_id = RunId(row.get(0));
        let (attempt, max_attempts): (i32, i32) = (row.get(1), row.get(2));
        if row.get::<_, bool>(3) {
            finish.push(ended(
                run_id,
                RunStatus::Cancelled,
                "cancelled",
                "runner lost while cancelling",
            ));
        } else if attempt >= max_attempts {
            let message = format!("runner lost on the last of {max_attempts} attempts");
            finish.push(ended(run_id, RunStatus::Failed, "runner_lost", &message));
        } else {
            requeue.push(run_id);
        }
    }
    lifecycle::requeue_many(&tx, &requeue, RequeueReason::LeaseExpired).await?;
    lifecycle::finish_many(&tx, &finish).await?;
    tx.commit().await?;
    if !rows.is_empty() {
        tracing::info!(
            requeued = requeue.len(),
            failed = finish.len(),
            "expired leases swept"
        );
    }
    let moved = requeue
        .iter()
        .copied()
        .chain(finish.iter().map(|f| f.run_id))
        .collect();
    Ok((requeue.len(), moved))
}

async fn time_out_runs(pool: &Pool) -> Result<Vec<RunId>> {
    finish_due(
        pool,
        "SELECT id FROM runs WHERE status = ANY($1) AND run_deadline < now()
         ORDER BY run_deadline LIMIT $2 FOR UPDATE SKIP LOCKED",
        RunStatus::ACTIVE,
        |run_id| {
            ended(
                run_id,
                RunStatus::Failed,
                "run_timeout",
                "run_timeout passed",
            )
        },
    )
    .await
}

async fn expire_queued(pool: &Pool) -> Result<Vec<RunId>> {
    finish_due(
        pool,
        "SELECT id FROM runs WHERE status = ANY($1) AND queue_deadline < now()
         ORDER BY queue_deadline LIMIT $2 FOR UPDATE SKIP LOCKED",
        &[RunStatus::Pending],
        |run_id| {
            ended(
                run_id,
                RunStatus::Expired,
                "queue_timeout",
                "not claimed before queue_timeout",
            )
        },
    )
    .await
}

/// Ends the runs that `select` picks (it takes the status list and the batch size).
async fn finish_due(
    pool: &Pool,
    select: &str,
    statuses: &[RunStatus],
    outcome: fn(RunId) -> Finish,
) -> Result<Vec<RunId>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx.prepare_cached(select).await?;
    let statuses: Vec<&str> = statuses.iter().map(|s| s.as_str()).collect();
    let rows = tx.query(&stmt, &[&statuses, &BATCH]).await?;
    let finishes: Vec<Finish> = rows.iter().map(|row| outcome(RunId(row.get(0)))).collect();
    lifecycle::finish_many(&tx, &finishes).await?;
    tx.commit().await?;
    if !rows.is_empty() {
        tracing::info!(runs = rows.len(), "timed-out runs swept");
    }
    Ok(finishes.iter().map(|f| f.run_id).collect())
}

fn ended(run_id: RunId, status: RunStatus, kind: &str, message: &str) -> Finish {
    Finish {
        run_id,
        status,
        failure_kind: Some(kind.to_owned()),
        message: Some(message.to_owned()),
    }
}
