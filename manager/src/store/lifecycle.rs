//! Use cases that span aggregates: creating runs with their first turn, sending a
//! command, cancelling, finishing and requeueing runs. Each touches runs, commands,
//! requests, sessions and events; the aggregates' modules hold only their own SQL, and
//! this module sequences them in one transaction. It sits above them: no aggregate
//! imports it.

use std::collections::HashMap;

use agentrun_shared::error::reason;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::{CommandId, RunId};
use agentrun_shared::state::{CommandKind, CommandStatus, RunStatus, TurnDeliveryPolicy};
use deadpool_postgres::{GenericClient, Pool};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::commands::{self, CommandRecord, NewCommand};
use super::events::{self, EventRecord, NewEvent};
use super::runs::{self, Finish, LeaseProgress, NewRun, RequeueReason, RunRecord};
use super::{Created, Tenant, flow, requests, sessions};
use crate::error::{Error, Result};
use crate::limits::Quotas;

/// Creates runs in one transaction: all are created (or found, for idempotent retries)
/// or none. A run whose input has a "prompt" gets it as its first `turn` command. New
/// runs that would take the tenant past its quota of pending runs are refused. The runs
/// keep `trace_parent`, the creating call's trace context, for their runners. Runs with
/// a concurrency key are admitted as far as their key's limit allows, else held
/// ([`flow::admit`]).
pub async fn create_runs(
    pool: &Pool,
    tenant: &Tenant,
    new_runs: Vec<NewRun>,
    quotas: &Quotas,
    trace_parent: Option<&str>,
) -> Result<Vec<Created<RunRecord>>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let results = create_runs_in(&tx, tenant, new_runs, quotas, trace_parent).await?;
    tx.commit().await?;
    Ok(results)
}

/// [`create_runs`] in the caller's transaction (a schedule's firing creates its run in
/// the transaction that holds the schedule's lock).
pub(crate) async fn create_runs_in(
    tx: &impl GenericClient,
    tenant: &Tenant,
    new_runs: Vec<NewRun>,
    quotas: &Quotas,
    trace_parent: Option<&str>,
) -> Result<Vec<Created<RunRecord>>> {
    for run in &new_runs {
        if let Some(session_id) = run.session_id {
            sessions::ensure(
                tx,
                tenant,
                session_id,
                &run.project_id,
                &run.backend_profile,
            )
            .await?;
        }
    }
    let inserted = runs::insert_new(tx, tenant, &new_runs, trace_parent).await?;
    if quotas.tenant_pending_runs > 0 && inserted.iter().any(Option::is_some) {
        // Counted after the insert, in its transaction: retries found above add nothing.
        let pending = runs::count_pending(tx, tenant, quotas.tenant_pending_runs + 1).await?;
        if pending > quotas.tenant_pending_runs {
            return Err(Error::ResourceExhausted(format!(
                "the tenant would have more than {} pending runs (--tenant-max-pending-runs); \
                 retry when some have started",
                quotas.tenant_pending_runs
            )));
        }
    }

    let keys = flow::keys_of(inserted.iter().flatten());

    // Runs not inserted hit an existing idempotency key: a retry if the request matches.
    let mut results = Vec::with_capacity(new_runs.len());
    let mut fresh_events = Vec::new();
    let mut in_sessions = Vec::new();
    let mut lineages = Vec::new();
    for (new_run, inserted) in new_runs.iter().zip(inserted) {
        let Some(mut run) = inserted else {
            let key = new_run.idempotency_key.as_deref().unwrap_or_default();
            let (existing, hash) = runs::find_by_idempotency_key(tx, tenant, key).await?;
            if hash != new_run.fingerprint() {
                return Err(Error::AlreadyExists {
                    reason: reason::IDEMPOTENCY_CONFLICT,
                    message: format!(
                        "idempotency_key {key:?} was used for a different run request"
                    ),
                });
            }
            results.push(Created {
                value: existing,
                created: false,
            });
            continue;
        };
        // Sequenced by hand: the insert set last_event_seq and last_command_seq.
        fresh_events.push((
            run.id,
            1,
            NewEvent::manager(
                EventType::RunCreated,
                json!({"queue": run.queue, "backend_profile": run.backend_profile}),
            ),
        ));
        if let Some(prompt) = new_run.first_prompt() {
            let command = NewCommand::first_turn(prompt);
            fresh_events.push((run.id, 2, command.created_event(1)));
        }
        if run.session_id.is_some() {
            in_sessions.push(run.id.0);
        }
        if let Some(lineage) = &new_run.lineage {
            lineages.push((run.id, lineage));
            run.lineage = lineage.clone();
        }
        results.push(Created {
            value: run,
            created: true,
        });
    }
    runs::set_lineage(tx, &lineages).await?;
    sessions::touch_runs(tx, &in_sessions).await?;
    events::insert_sequenced(tx, fresh_events).await?;
    // Keyed runs were inserted held: admit what their keys have room for, oldest first.
    // Last, so the key locks are the last locks this transaction waits for.
    let admitted = flow::admit(tx, &keys).await?;
    for created in results.iter_mut().filter(|c| c.created) {
        if admitted.contains(&created.value.id) {
            created.value.held = None;
        }
    }
    Ok(results)
}

/// Appends a command to a run of the tenant (SendCommand). A `cancel` goes through the
/// run's cancellation; a `turn` with the `reject` policy is refused while a turn is open.
pub async fn send_command(
    pool: &Pool,
    tenant: &Tenant,
    run_id: RunId,
    command: NewCommand,
    quotas: &Quotas,
) -> Result<Created<CommandRecord>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let run = runs::lock(&tx, tenant, run_id).await?;

    // A retry is answered before anything else, even if the run has ended since.
    if let Some(key) = command.idempotency_key.as_deref()
        && let Some((existing, hash)) = commands::find_by_idempotency_key(&tx, run_id, key).await?
    {
        if hash != command.fingerprint() {
            return Err(Error::AlreadyExists {
                reason: reason::IDEMPOTENCY_CONFLICT,
                message: format!("idempotency_key {key:?} was used for a different command"),
            });
        }
        return Ok(Created {
            value: existing,
            created: false,
        });
    }

    let result = if command.kind == CommandKind::Cancel {
        cancel_locked(&tx, &run, command).await?
    } else {
        if run.status.is_terminal() {
            return Err(Error::precondition(
                reason::RUN_TERMINAL,
                format!("run is already {}", run.status.as_str()),
            ));
        }
        if quotas.commands_per_run > 0 && run.last_command_seq >= quotas.commands_per_run {
            return Err(Error::ResourceExhausted(format!(
                "the run has {} commands, the most one run may have (--max-commands-per-run)",
                run.last_command_seq
            )));
        }
        if let Some(expected) = command
            .payload
            .get(commands::EXPECTED_TURN_ID)
            .and_then(Value::as_str)
            && run.active_turn_id.as_deref() != Some(expected)
        {
            return Err(Error::precondition(
                reason::TURN_NOT_ACTIVE,
                "the turn this command is aimed at is no longer active",
            ));
        }
        if command.delivery_policy == Some(TurnDeliveryPolicy::Reject)
            && commands::has_open_turn(&tx, run_id).await?
        {
            return Err(Error::precondition(
                reason::ILLEGAL_TRANSITION,
                "a turn is active and delivery_policy is reject",
            ));
        }
        Created {
            value: commands::insert(&tx, run.id, command, CommandStatus::Pending).await?,
            created: true,
        }
    };
    tx.commit().await?;
    Ok(result)
}

/// Commands of a run of the tenant with `seq > after_seq`.
pub async fn list_commands(
    client: &impl GenericClient,
    tenant: &Tenant,
    run_id: RunId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<CommandRecord>> {
    runs::position(client, tenant, run_id).await?;
    commands::list(client, run_id, after_seq, limit).await
}

/// CancelRun: requests cancellation (see [`cancel_locked`]) and returns the run as it is
/// afterwards. Idempotent: a run already cancelled, or being cancelled, is returned as is.
pub async fn cancel_run(
    pool: &Pool,
    tenant: &Tenant,
    run_id: RunId,
    payload: Map<String, Value>,
) -> Result<RunRecord> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let run = runs::lock(&tx, tenant, run_id).await?;
    if run.status == RunStatus::Cancelled || run.cancel_requested {
        return Ok(run);
    }
    let command = NewCommand {
        kind: CommandKind::Cancel,
        payload,
        delivery_policy: None,
        idempotency_key: None,
    };
    cancel_locked(&tx, &run, command).await?;
    let run = runs::get_explained(&tx, tenant, run_id).await?;
    tx.commit().await?;
    Ok(run)
}

/// CancelRuns: requests cancellation (see [`cancel_locked`]) of up to `filter.limit` of
/// the tenant's matching runs that are neither terminal nor being cancelled, oldest
/// first, in one transaction. Returns them as they were, and whether more matched. A
/// rare, bounded operator action, so each run goes through the same steps as CancelRun
/// rather than a batched statement of its own.
pub async fn cancel_runs(
    pool: &Pool,
    tenant: &Tenant,
    filter: &runs::RunFilter,
    payload: Map<String, Value>,
) -> Result<(Vec<RunRecord>, bool)> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut probe = filter.clone();
    probe.limit += 1;
    let mut matching = runs::lock_uncancelled(&tx, tenant, &probe).await?;
    let more = matching.len() as i64 > filter.limit;
    matching.truncate(filter.limit as usize);
    for run in &matching {
        let command = NewCommand {
            kind: CommandKind::Cancel,
            payload: payload.clone(),
            delivery_policy: None,
            idempotency_key: None,
        };
        cancel_locked(&tx, run, command).await?;
    }
    tx.commit().await?;
    Ok((matching, more))
}

/// Requests cancellation of a run the caller has locked. A pending run ends cancelled at
/// once; an active one is flagged (with the caller's reason, its failure message once
/// it ends) and gets a `cancel` command for its runner. Returns the `cancel` command that
/// stands for the request (the existing one on a retry).
pub(crate) async fn cancel_locked(
    tx: &impl GenericClient,
    run: &RunRecord,
    command: NewCommand,
) -> Result<Created<CommandRecord>> {
    if (run.cancel_requested || run.status == RunStatus::Cancelled)
        && let Some(existing) = commands::latest_of_kind(tx, run.id, CommandKind::Cancel).await?
    {
        return Ok(Created {
            value: existing,
            created: false,
        });
    }
    if run.status.is_terminal() {
        return Err(Error::precondition(
            reason::RUN_TERMINAL,
            format!("run is already {}", run.status.as_str()),
        ));
    }
    let reason_text = command
        .payload
        .get("reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    if run.status == RunStatus::Pending {
        // Nobody holds the run: the manager carries the cancel out itself, and says so.
        let recorded = commands::insert(tx, run.id, command, CommandStatus::Completed).await?;
        events::append(tx, &[commands::closed_event(&recorded)]).await?;
        finish_many(
            tx,
            &[Finish {
                run_id: run.id,
                status: RunStatus::Cancelled,
                failure_kind: Some("cancelled".into()),
                message: reason_text,
            }],
        )
        .await?;
        return Ok(Created {
            value: recorded,
            created: true,
        });
    }
    runs::flag_cancel(tx, run.id, reason_text.as_deref()).await?;
    let recorded = commands::insert(tx, run.id, command, CommandStatus::Pending).await?;
    Ok(Created {
        value: recorded,
        created: true,
    })
}

/// Ends runs: the one place a run becomes terminal. Open commands are cancelled
/// (`command.completed`, status cancelled), open requests closed as cancelled
/// (`request.resolved`, decision cancel), sessions touched and `run.terminal` recorded
/// last, so a client following only events never shows a question or a queued turn
/// that no longer exists. A run with a concurrency key lets its key's next held runs
/// in ([`flow::admit`]). Runs not in a state that may move to their target (see
/// `RunStatus::sources`) are left alone and not returned. The caller holds the rows'
/// locks.
pub async fn finish_many(tx: &impl GenericClient, finishes: &[Finish]) -> Result<Vec<RunRecord>> {
    let (finished, _) = finish_many_with(tx, finishes, &HashMap::new(), Vec::new()).await?;
    Ok(finished)
}

/// [`finish_many`] of runs that a runner's appends also changed in this transaction:
/// their `progress` (by run id) is written by the update that ends them, and the
/// appends' events, numbered but not stored yet (`appended`), are stored with the ends'
/// in one statement (a run's last append and its end make one log batch). Returns the
/// runs ended, and the events as stored, in order: the appended ones, then each ended
/// run's own (its closures, then `run.terminal`).
pub async fn finish_many_with(
    tx: &impl GenericClient,
    finishes: &[Finish],
    progress: &HashMap<Uuid, LeaseProgress>,
    appended: Vec<(RunId, i64, NewEvent)>,
) -> Result<(Vec<RunRecord>, Vec<EventRecord>)> {
    // The runs' counters already count the events appended below. In id order, as
    // their closures are sorted.
    let mut finished = runs::mark_finished(tx, finishes, progress).await?;
    finished.sort_by_key(|(run, _)| run.id);
    if progress.keys().any(|id| {
        finished
            .binary_search_by_key(&RunId(*id), |(run, _)| run.id)
            .is_err()
    }) {
        return Err(Error::Internal(
            "a run whose progress its end was to write did not end".into(),
        ));
    }
    let (finished, appending): (Vec<RunRecord>, Vec<i64>) = finished.into_iter().unzip();
    if finished.is_empty() {
        return Ok((finished, events::insert_sequenced(tx, appended).await?));
    }
    // Only runs with more to append than run.terminal have anything open to close, and
    // only runs in sessions a session to touch.
    let with_open: Vec<Uuid> = finished
        .iter()
        .zip(&appending)
        .filter(|(_, n)| **n > 1)
        .map(|(run, _)| run.id.0)
        .collect();
    let in_sessions: Vec<Uuid> = finished
        .iter()
        .filter(|run| run.session_id.is_some())
        .map(|run| run.id.0)
        .collect();
    let cancelled = commands::cancel_open(tx, &with_open, "run ended").await?;
    let closed = requests::cancel_for_runs(tx, &with_open).await?;
    let mut closing: Vec<(RunId, NewEvent)> = cancelled
        .iter()
        .map(commands::closed_event)
        .chain(closed.iter().map(requests::resolved_event))
        .collect();
    // Per run: its closures in order, then run.terminal, numbered up to its counter.
    closing.sort_by_key(|(run_id, _)| *run_id);
    let mut closing = closing.into_iter().peekable();
    let mut sequenced = appended;
    sequenced.reserve(finished.len() + cancelled.len() + closed.len());
    for (run, appending) in finished.iter().zip(appending) {
        let mut events: Vec<NewEvent> = Vec::new();
        while let Some((_, event)) = closing.next_if(|(run_id, _)| *run_id == run.id) {
            events.push(event);
        }
        events.push(NewEvent::manager(
            EventType::RunTerminal,
            json!({
                "status": run.status.as_str(),
                "failure_kind": run.failure_kind,
                "message": run.failure_message,
                "attempt": run.attempt,
            }),
        ));
        if events.len() as i64 != appending {
            return Err(Error::Internal(format!(
                "run {} ends with {} events, but its counter moved on by {appending}",
                run.id,
                events.len()
            )));
        }
        let first_seq = run.last_event_seq - appending + 1;
        sequenced.extend(
            (first_seq..)
                .zip(events)
                .map(|(seq, event)| (run.id, seq, event)),
        );
    }
    let stored = events::insert_sequenced(tx, sequenced).await?;
    // After the events: a session keeps the thread id its runs' turns last reported.
    sessions::touch_runs(tx, &in_sessions).await?;
    // Room for the keys' next runs, admitted before commit. Last, so the key locks are
    // the last locks this transaction waits for (see `flow`).
    flow::admit(tx, &flow::keys_of(&finished)).await?;
    Ok((finished, stored))
}

/// CancelCommand: withdraws a command of a run of the tenant that has not been delivered
/// yet. It becomes `cancelled`, with its `command.completed` in the log. Idempotent: a
/// command already cancelled is returned as it is. A command already delivered (or
/// further) is `FAILED_PRECONDITION`, and so is a `cancel` or `resolve` command: the
/// run's cancellation and a request's answer stand once given.
pub async fn cancel_command(
    pool: &Pool,
    tenant: &Tenant,
    run_id: RunId,
    command_id: CommandId,
) -> Result<Created<CommandRecord>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    runs::lock(&tx, tenant, run_id).await?;
    let command = commands::get(&tx, run_id, command_id).await?;
    if command.status == CommandStatus::Cancelled {
        return Ok(Created {
            value: command,
            created: false,
        });
    }
    if matches!(command.kind, CommandKind::Cancel | CommandKind::Resolve) {
        return Err(Error::precondition(
            reason::ILLEGAL_TRANSITION,
            format!("a {} command cannot be withdrawn", command.kind.as_str()),
        ));
    }
    let Some(cancelled) = commands::withdraw_pending(&tx, run_id, command_id).await? else {
        return Err(Error::precondition(
            reason::ILLEGAL_TRANSITION,
            format!(
                "command is {} and can no longer be withdrawn (only a pending command can)",
                command.status.as_str()
            ),
        ));
    };
    events::append(&tx, &[commands::closed_event(&cancelled)]).await?;
    tx.commit().await?;
    Ok(Created {
        value: cancelled,
        created: true,
    })
}

/// GetCommand: one command of a run of the tenant.
pub async fn get_command(
    client: &impl GenericClient,
    tenant: &Tenant,
    run_id: RunId,
    command_id: CommandId,
) -> Result<CommandRecord> {
    runs::position(client, tenant, run_id).await?;
    commands::get(client, run_id, command_id).await
}

/// Puts active runs back in the queue with their lease cleared (`run.requeued`);
/// delivered commands go back to pending so the next runner gets them again. The caller
/// holds the rows' locks.
pub async fn requeue_many(
    tx: &impl GenericClient,
    run_ids: &[RunId],
    reason: RequeueReason,
) -> Result<Vec<RunRecord>> {
    let requeued = runs::mark_requeued(tx, run_ids, reason).await?;
    if requeued.is_empty() {
        return Ok(requeued);
    }
    let requeued_ids: Vec<Uuid> = requeued.iter().map(|r| r.id.0).collect();
    commands::redeliver(tx, &requeued_ids).await?;
    let requeued_events: Vec<(RunId, NewEvent)> = requeued
        .iter()
        .map(|run| {
            let payload = json!({"reason": reason.as_str(), "attempt": run.attempt});
            (run.id, NewEvent::manager(EventType::RunRequeued, payload))
        })
        .collect();
    events::append(tx, &requeued_events).await?;
    Ok(requeued)
}
