//! Schedules firing: what a due time (or TriggerSchedule) does — apply the overlap
//! policy to the schedule's previous run, create the run from the template, advance the
//! schedule — all in the one transaction that holds the schedule's row lock. That lock
//! (taken `FOR UPDATE SKIP LOCKED` by the firing loop of every replica) and the unique
//! `(schedule_id, schedule_due_at)` of runs make each due time create at most one run;
//! the advance committed with the run makes it at least one.
//!
//! It sits above `schedules`, `runs` and `lifecycle`, as `lifecycle` sits above the
//! aggregates.

use std::time::{Duration, SystemTime};

use agentrun_shared::ids::{RunId, ScheduleId, SessionId};
use agentrun_shared::state::CommandKind;
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde_json::{Map, Value};

use super::commands::NewCommand;
use super::runs::{self, RunRecord};
use super::schedules::{self, CatchUp, Overlap, ScheduleRecord};
use super::{Tenant, lifecycle};
use crate::error::{Error, Result};
use crate::limits::Quotas;

/// What one firing changed, for the wake-ups the caller sends after commit.
#[derive(Debug, Default)]
pub struct Fired {
    /// The run created, if any.
    pub run: Option<RunRecord>,
    /// A previous run cancelled, or whose cancellation was requested (cancel_previous):
    /// woken as CancelRun wakes its run.
    pub cancelled: Option<RunId>,
}

impl Fired {
    /// The session the new run joined, whose watchers want to hear of it.
    pub fn session(&self) -> Option<SessionId> {
        self.run.as_ref().and_then(|r| r.session_id)
    }
}

/// Fires the schedule due soonest that no other replica holds, in one transaction:
/// `None` when none is due. Due times that passed are one firing: the latest of them
/// gets the run (catch-up `one`), or none if it is older than `grace` (catch-up `none`);
/// the schedule then waits for its first due time after now.
pub async fn fire_next_due(
    pool: &Pool,
    quotas: &Quotas,
    grace: Duration,
) -> Result<Option<(ScheduleRecord, Fired)>> {
    let mut client = pool.get().await?;
    let mut tx = client.transaction().await?;
    let Some((schedule, now)) = schedules::lock_next_due(&tx).await? else {
        return Ok(None);
    };
    let due = schedule.next_run_at.unwrap_or(now);
    let latest = schedule
        .timing
        .last_at_or_before(schedule.created_at, now)
        .map_or(due, |last| last.max(due));
    let on_time = now.duration_since(latest).unwrap_or_default() <= grace;
    let fired = if schedule.catch_up == CatchUp::One || on_time {
        match create_under_policy(&mut tx, &schedule, Some(latest), quotas).await {
            Ok(fired) => fired,
            // The database is away: nothing is committed, the next tick retries.
            Err(err @ Error::Unavailable(_)) => return Err(err),
            Err(err) => {
                // The template no longer makes a run (a quota, a session since taken by
                // another project): this due time is skipped, not retried forever.
                tracing::warn!(schedule_id = %schedule.id, error = %err,
                    "a schedule's due time created no run");
                Fired::default()
            }
        }
    } else {
        tracing::info!(schedule_id = %schedule.id, "a missed due time skipped (catch-up none)");
        Fired::default()
    };
    let next = schedule.timing.next_after(schedule.created_at, now);
    schedules::record_fired(&tx, schedule.id, next, fired.run.as_ref().map(|r| r.id)).await?;
    tx.commit().await?;
    Ok(Some((schedule, fired)))
}

/// TriggerSchedule: a run from the schedule now, under its overlap policy, also when
/// paused; its due times are unchanged.
pub async fn trigger(
    pool: &Pool,
    tenant: &Tenant,
    id: ScheduleId,
    quotas: &Quotas,
) -> Result<Fired> {
    let mut client = pool.get().await?;
    let mut tx = client.transaction().await?;
    let (schedule, _) = schedules::lock(&tx, tenant, id).await?;
    let fired = create_under_policy(&mut tx, &schedule, None, quotas).await?;
    schedules::record_fired(
        &tx,
        schedule.id,
        schedule.next_run_at,
        fired.run.as_ref().map(|r| r.id),
    )
    .await?;
    tx.commit().await?;
    Ok(fired)
}

/// Applies the overlap policy to the schedule's previous run and creates the new one,
/// for `due_at` (`None`: a trigger). Done in a savepoint, so a run that cannot be
/// created leaves the caller's transaction usable.
async fn create_under_policy(
    tx: &mut Transaction<'_>,
    schedule: &ScheduleRecord,
    due_at: Option<SystemTime>,
    quotas: &Quotas,
) -> Result<Fired> {
    let sp = tx.savepoint("schedule_fire").await?;
    match create_in(&sp, schedule, due_at, quotas).await {
        Ok(fired) => {
            sp.commit().await?;
            Ok(fired)
        }
        Err(err) => {
            sp.rollback().await?;
            Err(err)
        }
    }
}

async fn create_in(
    tx: &impl GenericClient,
    schedule: &ScheduleRecord,
    due_at: Option<SystemTime>,
    quotas: &Quotas,
) -> Result<Fired> {
    let tenant = &schedule.tenant;
    let mut fired = Fired::default();
    let previous = match schedule.last_run_id {
        Some(run_id) => match runs::lock(tx, tenant, run_id).await {
            Ok(run) => Some(run).filter(|r| !r.status.is_terminal()),
            Err(Error::NotFound { .. }) => None,
            Err(err) => return Err(err),
        },
        None => None,
    };
    if let Some(previous) = previous {
        match schedule.overlap {
            Overlap::Skip => return Ok(fired),
            Overlap::Queue => {}
            Overlap::CancelPrevious => {
                let mut payload = Map::new();
                payload.insert(
                    "reason".into(),
                    Value::String(format!("superseded by schedule {:?}", schedule.name)),
                );
                let command = NewCommand {
                    kind: CommandKind::Cancel,
                    payload,
                    delivery_policy: None,
                    idempotency_key: None,
                };
                lifecycle::cancel_locked(tx, &previous, command).await?;
                fired.cancelled = Some(previous.id);
            }
        }
    }
    let created =
        lifecycle::create_runs_in(tx, tenant, vec![schedule.template.clone()], quotas, None)
            .await?;
    let mut run = created
        .into_iter()
        .next()
        .ok_or_else(|| Error::Internal("create returned nothing".into()))?
        .value;
    runs::mark_scheduled(tx, run.id, schedule.id, due_at).await?;
    run.schedule_id = Some(schedule.id);
    fired.run = Some(run);
    Ok(fired)
}

/// PauseSchedule: pauses (no next due time) or resumes a schedule. A resumed schedule is
/// due next at its first due time after now; nothing missed while paused is caught up.
/// Pausing a paused schedule, or resuming a running one, changes nothing.
pub async fn set_paused(
    pool: &Pool,
    tenant: &Tenant,
    id: ScheduleId,
    paused: bool,
) -> Result<ScheduleRecord> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let (schedule, now) = schedules::lock(&tx, tenant, id).await?;
    if schedule.paused == paused {
        return Ok(schedule);
    }
    let next = match paused {
        true => None,
        false => schedule.timing.next_after(schedule.created_at, now),
    };
    schedules::set_paused(&tx, id, paused, next).await?;
    let schedule = schedules::get(&tx, tenant, id).await?;
    tx.commit().await?;
    Ok(schedule)
}
