//! Leases: claiming runs, renewing leases, and every write a runner makes under one.
//!
//! A lease is `(run, runner, epoch, expires_at)` on the run row. `epoch` rises by one on
//! every claim and is the fencing token: [`lock_fenced`] refuses any write that names a
//! stale epoch (or another runner, or a run no longer active) with `lease_lost`.

use std::time::{Duration, SystemTime};

use agentrun_shared::error::reason;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::state::RunStatus;
use deadpool_postgres::{GenericClient, Pool};
use serde_json::json;
use uuid::Uuid;

use super::commands::{self, CommandRecord, CommandUpdate};
use super::events::{self, NewEvent, Producer};
use super::runs::{self, Finish, RequeueReason, RunRecord};
use crate::error::{Error, Result};

/// Who a runner is and what it can serve.
#[derive(Debug, Clone)]
pub struct RunnerIdentity {
    pub id: RunnerId,
    pub name: String,
    pub labels: Vec<String>,
    pub backend_profiles: Vec<String>,
    pub queues: Vec<String>,
    pub max_concurrency: i32,
    pub version: String,
}

/// A run newly leased to a runner, with the commands it must carry out.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub run: RunRecord,
    pub commands: Vec<CommandRecord>,
}

fn active_statuses() -> Vec<&'static str> {
    RunStatus::ACTIVE.iter().map(|s| s.as_str()).collect()
}

fn ttl_millis(ttl: Duration) -> i64 {
    ttl.as_millis() as i64
}

/// Records the runner as seen now (its identity may change between connections).
async fn upsert_runner(tx: &impl GenericClient, runner: &RunnerIdentity) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO runners (id, name, labels, backend_profiles, queues, max_concurrency, version)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO UPDATE SET name = $2, labels = $3, backend_profiles = $4,
                 queues = $5, max_concurrency = $6, version = $7, last_heartbeat_at = now()",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &runner.id.0,
            &runner.name,
            &runner.labels,
            &runner.backend_profiles,
            &runner.queues,
            &runner.max_concurrency,
            &runner.version,
        ],
    )
    .await?;
    Ok(())
}

/// Claims up to `max_runs` pending runs the runner can serve — its queues, a backend
/// profile it has, labels it all has — highest priority first, then oldest. One statement
/// picks and leases them all (`FOR UPDATE SKIP LOCKED`, so concurrent claimers on any
/// replica never get the same run); each claim bumps the epoch and records `run.claimed`.
pub async fn claim(
    pool: &Pool,
    runner: &RunnerIdentity,
    max_runs: i64,
    ttl: Duration,
) -> Result<Vec<Assignment>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    upsert_runner(&tx, runner).await?;
    let stmt = tx
        .prepare_cached(
            "WITH picked AS (
                 SELECT id FROM runs
                 WHERE status = 'pending' AND queue = ANY($2) AND backend_profile = ANY($3)
                   AND labels <@ $4
                 ORDER BY priority DESC, created_at, id
                 LIMIT $5
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE runs SET status = 'claimed', lease_runner_id = $1,
                    lease_epoch = runs.lease_epoch + 1,
                    lease_expires_at = now() + $6::bigint * interval '1 millisecond',
                    lease_runner_seq = 0, claimed_at = now(), updated_at = now(),
                    run_deadline = now() + runs.run_timeout_ms * interval '1 millisecond'
             FROM picked WHERE runs.id = picked.id
             RETURNING runs.*",
        )
        .await?;
    let rows = tx
        .query(
            &stmt,
            &[
                &runner.id.0,
                &runner.queues,
                &runner.backend_profiles,
                &runner.labels,
                &max_runs,
                &ttl_millis(ttl),
            ],
        )
        .await?;
    let mut claimed: Vec<RunRecord> = rows
        .iter()
        .map(RunRecord::from_row)
        .collect::<Result<_>>()?;
    claimed.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_at.cmp(&b.created_at))
    });
    let ids: Vec<Uuid> = claimed.iter().map(|r| r.id.0).collect();

    let claimed_events: Vec<(RunId, NewEvent)> = claimed
        .iter()
        .map(|run| {
            let payload = json!({
                "runner_id": runner.id.to_string(),
                "runner_name": runner.name,
                "epoch": run.lease_epoch,
                "attempt": run.attempt,
            });
            (run.id, NewEvent::manager(EventType::RunClaimed, payload))
        })
        .collect();
    events::append(&tx, &claimed_events).await?;
    let mut delivered = commands::deliver_pending(&tx, &ids).await?;
    tx.commit().await?;

    Ok(claimed
        .into_iter()
        .map(|run| {
            let (mine, rest) = delivered.drain(..).partition(|c| c.run_id == run.id);
            delivered = rest;
            Assignment {
                run,
                commands: mine,
            }
        })
        .collect())
}

/// The state of one lease after a heartbeat.
#[derive(Debug, Clone)]
pub struct LeaseState {
    pub run_id: RunId,
    pub epoch: i64,
    /// `None`: the lease is lost.
    pub expires_at: Option<SystemTime>,
    pub cancel_requested: bool,
    /// Highest runner_seq stored for this epoch.
    pub acked_runner_seq: i64,
    /// Commands newly delivered with this heartbeat.
    pub commands: Vec<CommandRecord>,
}

/// Renews all the given leases of a runner in one statement, delivers pending commands of
/// the renewed runs, and reports the rest as lost.
pub async fn heartbeat(
    pool: &Pool,
    runner_id: RunnerId,
    leases: &[(RunId, i64)],
    ttl: Duration,
) -> Result<Vec<LeaseState>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let seen = tx
        .prepare_cached("UPDATE runners SET last_heartbeat_at = now() WHERE id = $1")
        .await?;
    tx.execute(&seen, &[&runner_id.0]).await?;
    let states = renew(&tx, runner_id, leases, Some(ttl)).await?;
    tx.commit().await?;
    Ok(states)
}

/// Delivers pending commands of the runner's current leases without renewing them: the
/// manager pushing commands must never keep a silent runner's lease alive.
pub async fn deliver_commands(
    pool: &Pool,
    runner_id: RunnerId,
    leases: &[(RunId, i64)],
) -> Result<Vec<LeaseState>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let states = renew(&tx, runner_id, leases, None).await?;
    tx.commit().await?;
    Ok(states)
}

/// Checks the leases (extending them by `ttl` when given) and delivers their pending
/// commands.
async fn renew(
    tx: &impl GenericClient,
    runner_id: RunnerId,
    leases: &[(RunId, i64)],
    ttl: Option<Duration>,
) -> Result<Vec<LeaseState>> {
    let renew = tx
        .prepare_cached(
            "UPDATE runs SET lease_expires_at = coalesce(now() + $4::bigint * interval '1 millisecond',
                                                 runs.lease_expires_at)
             FROM unnest($2::uuid[], $3::bigint[]) AS l(id, epoch)
             WHERE runs.id = l.id AND runs.lease_epoch = l.epoch AND runs.lease_runner_id = $1
               AND runs.status = ANY($5)
             RETURNING runs.id, runs.lease_expires_at, runs.cancel_requested, runs.lease_runner_seq",
        )
        .await?;
    let ids: Vec<Uuid> = leases.iter().map(|(r, _)| r.0).collect();
    let epochs: Vec<i64> = leases.iter().map(|(_, e)| *e).collect();
    let rows = tx
        .query(
            &renew,
            &[
                &runner_id.0,
                &ids,
                &epochs,
                &ttl.map(ttl_millis),
                &active_statuses(),
            ],
        )
        .await?;
    let renewed: Vec<(Uuid, SystemTime, bool, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let renewed_ids: Vec<Uuid> = renewed.iter().map(|r| r.0).collect();
    let mut delivered = commands::deliver_pending(tx, &renewed_ids).await?;

    Ok(leases
        .iter()
        .map(|(run_id, epoch)| {
            let held = renewed.iter().find(|r| r.0 == run_id.0);
            let (mine, rest) = delivered.drain(..).partition(|c| c.run_id == *run_id);
            delivered = rest;
            LeaseState {
                run_id: *run_id,
                epoch: *epoch,
                expires_at: held.map(|r| r.1),
                cancel_requested: held.is_some_and(|r| r.2),
                acked_runner_seq: held.map_or(0, |r| r.3),
                commands: mine,
            }
        })
        .collect())
}

/// What a (re)connecting runner learns: which of the leases it named survive, and the
/// runs its id still holds that it did not name (it restarted), handed back to it.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub named: Vec<LeaseState>,
    pub adopted: Vec<Assignment>,
}

/// Registers a connecting runner and settles its leases in one transaction. Adopted runs
/// get a new epoch (fencing any older incarnation of the runner) and all their open
/// commands again.
pub async fn hello(
    pool: &Pool,
    runner: &RunnerIdentity,
    named: &[(RunId, i64)],
    ttl: Duration,
) -> Result<Welcome> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    upsert_runner(&tx, runner).await?;
    let named_states = renew(&tx, runner.id, named, Some(ttl)).await?;
    let adopt = tx
        .prepare_cached(
            "UPDATE runs SET lease_epoch = lease_epoch + 1, lease_runner_seq = 0, updated_at = now(),
                    lease_expires_at = now() + $3::bigint * interval '1 millisecond'
             WHERE lease_runner_id = $1 AND status = ANY($4) AND id <> ALL($2)
             RETURNING *",
        )
        .await?;
    let named_ids: Vec<Uuid> = named.iter().map(|(r, _)| r.0).collect();
    let rows = tx
        .query(
            &adopt,
            &[
                &runner.id.0,
                &named_ids,
                &ttl_millis(ttl),
                &active_statuses(),
            ],
        )
        .await?;
    let adopted: Vec<RunRecord> = rows
        .iter()
        .map(RunRecord::from_row)
        .collect::<Result<_>>()?;
    let adopted_ids: Vec<Uuid> = adopted.iter().map(|r| r.id.0).collect();
    let resumed_events: Vec<(RunId, NewEvent)> = adopted
        .iter()
        .map(|run| {
            let payload = json!({
                "runner_id": runner.id.to_string(),
                "runner_name": runner.name,
                "epoch": run.lease_epoch,
                "attempt": run.attempt,
                "resumed": true,
            });
            (run.id, NewEvent::manager(EventType::RunClaimed, payload))
        })
        .collect();
    events::append(&tx, &resumed_events).await?;
    commands::redeliver(&tx, &adopted_ids).await?;
    let mut delivered = commands::deliver_pending(&tx, &adopted_ids).await?;
    tx.commit().await?;
    let adopted = adopted
        .into_iter()
        .map(|run| {
            let (mine, rest) = delivered.drain(..).partition(|c| c.run_id == run.id);
            delivered = rest;
            Assignment {
                run,
                commands: mine,
            }
        })
        .collect();
    Ok(Welcome {
        named: named_states,
        adopted,
    })
}

/// Locks a run for a write by the runner holding `epoch`; anything else is `lease_lost`.
async fn lock_fenced(
    tx: &impl GenericClient,
    run_id: RunId,
    runner_id: RunnerId,
    epoch: i64,
) -> Result<RunRecord> {
    let stmt = tx
        .prepare_cached("SELECT * FROM runs WHERE id = $1 FOR UPDATE")
        .await?;
    let row = tx
        .query_opt(&stmt, &[&run_id.0])
        .await?
        .ok_or(Error::NotFound { what: "run" })?;
    let run = RunRecord::from_row(&row)?;
    fence(&run, runner_id, epoch)?;
    Ok(run)
}

fn fence(run: &RunRecord, runner_id: RunnerId, epoch: i64) -> Result<()> {
    if run.lease_epoch != epoch || run.lease_runner_id != Some(runner_id) {
        return Err(Error::precondition(
            reason::LEASE_LOST,
            format!("epoch {epoch} is not the current lease of this run"),
        ));
    }
    if !RunStatus::ACTIVE.contains(&run.status) {
        return Err(Error::precondition(
            reason::LEASE_LOST,
            format!("run is {} and no longer leased", run.status.as_str()),
        ));
    }
    Ok(())
}

/// A validated event from a runner.
#[derive(Debug, Clone)]
pub struct RunnerEvent {
    pub runner_seq: i64,
    pub event_type: EventType,
    pub payload: serde_json::Value,
}

/// What an append stored.
#[derive(Debug, Clone, Default)]
pub struct AppendOutcome {
    pub first_seq: i64,
    pub last_seq: i64,
    pub acked_runner_seq: i64,
    pub duplicates: i32,
}

/// Appends a runner's event batch (and command updates) under its lease, in one
/// transaction. Events at or below the epoch's stored runner_seq are resends and are
/// skipped; the rest must continue it without a gap. The first events of an epoch move
/// the run from claimed to running (`run.started`); `request.opened` makes it waiting and
/// `request.resolved` running again.
pub async fn append(
    pool: &Pool,
    runner_id: RunnerId,
    run_id: RunId,
    epoch: i64,
    batch: Vec<RunnerEvent>,
    updates: Vec<CommandUpdate>,
) -> Result<AppendOutcome> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let run = lock_fenced(&tx, run_id, runner_id, epoch).await?;

    let duplicates = batch
        .iter()
        .take_while(|e| e.runner_seq <= run.lease_runner_seq)
        .count();
    let fresh = &batch[duplicates..];
    if let Some(first) = fresh.first()
        && first.runner_seq != run.lease_runner_seq + 1
    {
        return Err(Error::invalid(
            format!("events[{duplicates}].runner_seq"),
            format!(
                "is {}, expected {} (events must not skip)",
                first.runner_seq,
                run.lease_runner_seq + 1
            ),
        ));
    }

    let mut status = run.status;
    let mut to_store: Vec<(RunId, NewEvent)> = Vec::with_capacity(fresh.len() + 1);
    if status == RunStatus::Claimed && !(fresh.is_empty() && updates.is_empty()) {
        status = RunStatus::Running;
        to_store.push((
            run_id,
            NewEvent::manager(
                EventType::RunStarted,
                json!({"epoch": epoch, "attempt": run.attempt}),
            ),
        ));
    }
    let mut active_turn = run.active_turn_id.clone();
    for event in fresh {
        status = match (event.event_type, status) {
            (EventType::RequestOpened, RunStatus::Running) => RunStatus::Waiting,
            (EventType::RequestResolved, RunStatus::Waiting) => RunStatus::Running,
            (_, s) => s,
        };
        // The active turn guards steers aimed at a turn that has already ended.
        match event.event_type {
            EventType::TurnStarted => {
                active_turn = event
                    .payload
                    .get("turn_id")
                    .and_then(|t| t.as_str())
                    .map(str::to_owned);
            }
            EventType::TurnCompleted => active_turn = None,
            _ => {}
        }
        let producer = Producer::Runner {
            runner_id,
            epoch,
            runner_seq: event.runner_seq,
        };
        to_store.push((
            run_id,
            NewEvent {
                event_type: event.event_type,
                payload: event.payload.clone(),
                producer,
            },
        ));
    }
    for ended in commands::apply_updates(&tx, run_id, &updates).await? {
        to_store.push((run_id, ended));
    }
    let seqs = events::append(&tx, &to_store).await?;
    let acked_runner_seq = fresh.last().map_or(run.lease_runner_seq, |e| e.runner_seq);
    if status != run.status
        || acked_runner_seq != run.lease_runner_seq
        || active_turn != run.active_turn_id
    {
        debug_assert!(status == run.status || RunStatus::can_transition(run.status, status));
        let stmt = tx
            .prepare_cached(
                "UPDATE runs SET status = $2, lease_runner_seq = $3, active_turn_id = $4, updated_at = now()
                 WHERE id = $1",
            )
            .await?;
        tx.execute(
            &stmt,
            &[&run_id.0, &status.as_str(), &acked_runner_seq, &active_turn],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(AppendOutcome {
        first_seq: seqs.first().copied().unwrap_or(0),
        last_seq: seqs.last().copied().unwrap_or(0),
        acked_runner_seq,
        duplicates: duplicates as i32,
    })
}

/// Ends a run under the runner's lease. If its cancellation was requested, it ends
/// cancelled whatever the runner reports. Repeating the finish that already happened
/// (an acknowledgement lost) returns the run as it ended; a run that ended otherwise
/// (timed out, say) is `lease_lost`.
pub async fn finish(
    pool: &Pool,
    runner_id: RunnerId,
    epoch: i64,
    outcome: Finish,
) -> Result<RunRecord> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let stmt = tx
        .prepare_cached("SELECT * FROM runs WHERE id = $1 FOR UPDATE")
        .await?;
    let row = tx
        .query_opt(&stmt, &[&outcome.run_id.0])
        .await?
        .ok_or(Error::NotFound { what: "run" })?;
    let run = RunRecord::from_row(&row)?;
    let same_holder = run.lease_epoch == epoch && run.lease_runner_id == Some(runner_id);
    let same_outcome = run.status == outcome.status
        || (run.cancel_requested && run.status == RunStatus::Cancelled);
    if same_holder && run.status.is_terminal() && same_outcome {
        return Ok(run);
    }
    fence(&run, runner_id, epoch)?;
    let outcome = if run.cancel_requested && outcome.status != RunStatus::Cancelled {
        Finish {
            status: RunStatus::Cancelled,
            failure_kind: Some("cancelled".into()),
            message: Some("cancellation was requested".into()),
            ..outcome
        }
    } else {
        outcome
    };
    let finished = runs::finish_many(&tx, &[outcome]).await?;
    tx.commit().await?;
    finished
        .into_iter()
        .next()
        .ok_or_else(|| Error::Internal("fenced finish changed no row".into()))
}

/// Gives a run back to the queue without counting an attempt (graceful drain).
pub async fn release(pool: &Pool, runner_id: RunnerId, run_id: RunId, epoch: i64) -> Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    lock_fenced(&tx, run_id, runner_id, epoch).await?;
    runs::requeue_many(&tx, &[run_id], RequeueReason::Released).await?;
    tx.commit().await?;
    Ok(())
}
