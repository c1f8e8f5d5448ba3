//! The writes a runner makes under its leases — event batches, command updates, finishes
//! and releases — applied many at a time: one transaction and a fixed number of
//! statements however many runs a batch touches.
//!
//! The batch's runs are locked up front (in id order, so concurrent batches never
//! deadlock). Each write is then checked, in order, against the runs as the writes
//! before it left them — in memory, before anything is written. A write that fails its
//! checks is refused alone and changes nothing; the others are stored. Only a database
//! error fails the whole batch (nothing is acknowledged, the runner resends).

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::time::SystemTime;

use agentrun_shared::error::reason;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::state::{CommandStatus, RunStatus};
use deadpool_postgres::{GenericClient, Pool};
use serde_json::json;
use uuid::Uuid;

use super::stream_modes::{self, Shaped};
use super::{AppendOutcome, RunnerEvent, fence};
use crate::error::{Error, Result};
use crate::limits::Quotas;
use crate::store::commands::{self, CommandUpdate};
use crate::store::events::{EventRecord, NewEvent, NewPayload, Producer};
use crate::store::lifecycle;
use crate::store::requests::{self, OpenedRequest};
use crate::store::runs::{
    self, COLUMNS_BUT_INPUT, Finish, LeaseProgress, RequeueReason, RunRecord,
};
use crate::store::{self, Tenant, parse_state};

/// One write a runner makes under the lease `epoch` of a run.
#[derive(Debug, Clone)]
pub enum LeaseWrite {
    /// Events (resends are skipped by `runner_seq`) and command status reports.
    Append {
        run_id: RunId,
        epoch: i64,
        events: Vec<RunnerEvent>,
        updates: Vec<CommandUpdate>,
    },
    /// Ends the run. Refused while events up to `last_runner_seq` are not all stored, so
    /// a finish never overtakes the run's own events (0: no check).
    Finish {
        epoch: i64,
        outcome: Finish,
        last_runner_seq: i64,
    },
    /// Gives the run back to the queue without counting an attempt (graceful drain).
    Release { run_id: RunId, epoch: i64 },
}

impl LeaseWrite {
    pub fn run_id(&self) -> RunId {
        match self {
            LeaseWrite::Append { run_id, .. } | LeaseWrite::Release { run_id, .. } => *run_id,
            LeaseWrite::Finish { outcome, .. } => outcome.run_id,
        }
    }

    pub fn epoch(&self) -> i64 {
        match self {
            LeaseWrite::Append { epoch, .. }
            | LeaseWrite::Release { epoch, .. }
            | LeaseWrite::Finish { epoch, .. } => *epoch,
        }
    }
}

/// What a stored write did.
#[derive(Debug, Clone)]
pub enum Written {
    Appended(AppendOutcome),
    /// The run as it ended (also when this finish repeated one already stored), and the
    /// events its end stored, in seq order, when its watchers may take them in memory
    /// (with its appends' in the same batch: see [`AppendOutcome::stored`]); empty
    /// otherwise.
    Finished(Box<RunRecord>, Vec<EventRecord>),
    Released,
}

/// Applies `writes` of `runner` in one transaction. Returns one result per write, in
/// order: a refused write's error, or what it stored. `Err` only when the batch as a
/// whole failed (the database), in which case nothing was stored.
///
/// A transient failure (a serialization failure, a deadlock, a dropped connection: see
/// [`Error::Unavailable`]) is retried up to [`ATTEMPTS`] times with jittered back-off, so
/// one unlucky transaction does not end a runner stream carrying many runs. Retrying is
/// safe because every lease write is idempotent: resent events are skipped by
/// `runner_seq`, a repeated finish returns the run as it ended.
pub async fn write(
    pool: &Pool,
    runner_id: RunnerId,
    tenant: Option<&Tenant>,
    writes: Vec<LeaseWrite>,
    quotas: &Quotas,
) -> Result<Vec<Result<Written>>> {
    if writes.is_empty() {
        return Ok(Vec::new());
    }
    let mut attempt = 1;
    loop {
        match write_once(pool, runner_id, tenant, &writes, quotas).await {
            Err(Error::Unavailable(why)) if attempt < ATTEMPTS => {
                let backoff = RETRY_BACKOFF * 2u32.pow(attempt - 1);
                tracing::debug!(attempt, %why, "lease writes failed; retrying");
                tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// How often a batch of lease writes is tried before its transient failure ends the
/// runner stream (the runner then reconnects and resends).
pub const ATTEMPTS: u32 = 4;
/// Back-off before the first retry, doubled for each further one.
const RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_millis(20);

async fn write_once(
    pool: &Pool,
    runner_id: RunnerId,
    tenant: Option<&Tenant>,
    writes: &[LeaseWrite],
    quotas: &Quotas,
) -> Result<Vec<Result<Written>>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let ((), mut batch) = tokio::try_join!(
        store::plan_generically(&tx),
        Batch::load(&tx, tenant, writes)
    )?;
    batch.max_event_bytes = quotas.event_bytes_per_run;
    batch.max_payload_bytes = quotas.payload_bytes;
    let plans: Vec<Result<Planned>> = writes.iter().map(|w| batch.plan(runner_id, w)).collect();
    let mut stored = batch.store(&tx).await?;
    tx.commit().await?;
    Ok(plans
        .into_iter()
        .map(|plan| plan.and_then(|p| stored.outcome(p)))
        .collect())
}

/// [`write`] of a single write (the unary RPCs).
pub async fn write_one(
    pool: &Pool,
    runner_id: RunnerId,
    tenant: Option<&Tenant>,
    write: LeaseWrite,
    quotas: &Quotas,
) -> Result<Written> {
    self::write(pool, runner_id, tenant, vec![write], quotas)
        .await?
        .pop()
        .unwrap_or_else(|| Err(Error::Internal("a write got no result".into())))
}

/// A write that passed its checks, waiting for the batch to be stored.
enum Planned {
    Appended {
        /// Its events among the batch's stored events.
        events: Range<usize>,
        /// Its deltas sent live only (a `final` run's), among the batch's.
        live: Range<usize>,
        acked_runner_seq: i64,
        duplicates: i32,
    },
    /// A finish stored, or a repeat of one that already happened (then the run as it
    /// ended is read whole when the batch is stored), or a finish that requeued the run
    /// for a turn the runner had not taken (then the run as requeued).
    Finished(RunId),
    Released,
}

/// The columns of a run row that appends change.
#[derive(Debug, Clone, PartialEq)]
struct RunProgress {
    status: RunStatus,
    lease_runner_seq: i64,
    active_turn_id: Option<String>,
    event_bytes: i64,
    /// The seq of the run's last stored event. The row is locked, so the batch numbers
    /// its events itself and writes the counter once, with the rest of the progress
    /// (one row version per run instead of two).
    last_event_seq: i64,
}

impl RunProgress {
    fn of(run: &RunRecord) -> Self {
        Self {
            status: run.status,
            lease_runner_seq: run.lease_runner_seq,
            active_turn_id: run.active_turn_id.clone(),
            event_bytes: run.event_bytes,
            last_event_seq: run.last_event_seq,
        }
    }
}

/// The batch's runs and commands as the writes planned so far leave them, and what the
/// accepted writes will store.
struct Batch {
    /// The database's clock for this transaction: leases expired by then are lost.
    now: SystemTime,
    /// The locked rows, with status, runner_seq and active turn as planned so far.
    runs: HashMap<Uuid, RunRecord>,
    /// Appends' effect on each run row, written before finishes and releases.
    progress: HashMap<Uuid, RunProgress>,
    /// Status of every command the batch reports on, and of the finishing runs' untaken
    /// turns, as planned so far: by id, its run and status.
    commands: HashMap<Uuid, (Uuid, CommandStatus)>,
    /// Which run holds each request id opened in this batch that already exists, by
    /// `(tenant, request id)`: request ids are per tenant.
    request_owners: HashMap<(String, Uuid), Uuid>,
    command_updates: Vec<(RunId, CommandUpdate)>,
    events: Vec<(RunId, NewEvent)>,
    /// Deltas fanned out but not stored, each with the index in `events` of the run's
    /// event it follows (`None`: the run's last event before this batch).
    live: Vec<(RunId, Option<usize>, NewEvent)>,
    /// Requests each accepted append opened, stored one statement per append.
    opened: Vec<(RunId, Vec<OpenedRequest>)>,
    ended_turns: Vec<(Uuid, String)>,
    /// Runs whose requests changed: waiting only if one is still open when stored.
    requests_changed: HashSet<Uuid>,
    finishes: Vec<Finish>,
    /// Runs whose finish was repeated (an acknowledgement lost): answered as they ended.
    repeated_finishes: Vec<Uuid>,
    releases: Vec<RunId>,
    /// Per run being finished, its open turns the runner may not have taken yet: pending,
    /// or delivered since the claim (perhaps still on their way to the runner).
    untaken_turns: HashMap<Uuid, Vec<Uuid>>,
    /// Runs a runner ended with such a turn queued: requeued instead, for that turn.
    turn_queued: Vec<RunId>,
    /// The per-run quota of event payload bytes; 0: none.
    max_event_bytes: i64,
    /// The largest payload of one event (a coalesced delta stays within it).
    max_payload_bytes: usize,
}

/// Whether a turn of a run being finished may not have been taken by its runner yet:
/// pending, or delivered since the claim (by a heartbeat, perhaps still on its way). A
/// turn delivered at the claim went with the assignment: its update and the claim share
/// a timestamp.
fn untaken(status: CommandStatus, updated_at: SystemTime, claimed_at: Option<SystemTime>) -> bool {
    match status {
        CommandStatus::Pending => true,
        CommandStatus::Delivered => claimed_at.is_some_and(|claimed| updated_at > claimed),
        _ => false,
    }
}

impl Batch {
    /// Locks the runs the writes name and reads the commands and requests they touch.
    async fn load(
        tx: &impl GenericClient,
        tenant: Option<&Tenant>,
        writes: &[LeaseWrite],
    ) -> Result<Self> {
        let mut ids: Vec<Uuid> = writes.iter().map(|w| w.run_id().0).collect();
        ids.sort_unstable();
        ids.dedup();
        // Without the runs' input: a write never needs it, and it may be large.
        let lock = tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS_BUT_INPUT}, now() AS db_now FROM runs
                 WHERE id = ANY($1) AND ($2::text IS NULL OR tenant_id = $2::text)
                 ORDER BY id FOR UPDATE"
            ))
            .await?;
        let rows = tx
            .query(&lock, &[&ids, &tenant.map(Tenant::as_str)])
            .await?;
        let mut batch = Batch {
            now: SystemTime::UNIX_EPOCH,
            runs: HashMap::new(),
            progress: HashMap::new(),
            commands: HashMap::new(),
            request_owners: HashMap::new(),
            command_updates: Vec::new(),
            events: Vec::new(),
            live: Vec::new(),
            opened: Vec::new(),
            ended_turns: Vec::new(),
            requests_changed: HashSet::new(),
            max_event_bytes: 0,
            max_payload_bytes: usize::MAX,
            finishes: Vec::new(),
            repeated_finishes: Vec::new(),
            releases: Vec::new(),
            untaken_turns: HashMap::new(),
            turn_queued: Vec::new(),
        };
        // The commands the updates name, and the turns of the runs being finished that
        // their runner may not have taken yet ([`untaken`]). A first turn carried by its
        // run's row (the usual run's one command) is read with the row; the others in
        // one read of `commands`, for the runs that have some there.
        let finishing: HashSet<Uuid> = writes
            .iter()
            .filter(|w| matches!(w, LeaseWrite::Finish { .. }))
            .map(|w| w.run_id().0)
            .collect();
        for row in &rows {
            let run = RunRecord::from_row(row)?;
            batch.now = row.get("db_now");
            if let Some(turn) = run.first_turn_id {
                let status = row.get("first_turn_status");
                let status = parse_state("command status", status, CommandStatus::from_db)?;
                batch.commands.insert(turn.0, (run.id.0, status));
                let updated_at = row.get("first_turn_updated_at");
                if finishing.contains(&run.id.0) && untaken(status, updated_at, run.claimed_at) {
                    batch
                        .untaken_turns
                        .entry(run.id.0)
                        .or_default()
                        .push(turn.0);
                }
            }
            batch.runs.insert(run.id.0, run);
        }
        let in_commands = |run_id: &Uuid, command_id: Option<Uuid>| {
            batch.runs.get(run_id).is_some_and(|run| {
                run.first_turn_id.map(|t| t.0) != command_id && run.may_have_command_rows()
            })
        };
        let (reporting, command_ids): (Vec<Uuid>, Vec<Uuid>) = writes
            .iter()
            .filter_map(|w| match w {
                LeaseWrite::Append { updates, .. } => Some((w.run_id(), updates)),
                _ => None,
            })
            .flat_map(|(run_id, updates)| updates.iter().map(move |u| (run_id.0, u.command_id.0)))
            .filter(|(run_id, command_id)| in_commands(run_id, Some(*command_id)))
            .unzip();
        let finishing: Vec<Uuid> = finishing
            .into_iter()
            .filter(|run_id| in_commands(run_id, None))
            .collect();
        if !(command_ids.is_empty() && finishing.is_empty()) {
            let stmt = tx
                .prepare_cached(
                    // Two branches, each served by its own index. (As one `OR`, its plan
                    // was a scan in some benchmark runs: 30 % of the database's time.)
                    "SELECT id, run_id, status, false AS finishing, updated_at FROM commands
                     WHERE run_id = ANY($3) AND id = ANY($1)
                     UNION ALL
                     SELECT id, run_id, status, true, updated_at FROM commands
                     WHERE run_id = ANY($2) AND kind = 'turn'
                       AND status IN ('pending', 'delivered')",
                )
                .await?;
            for row in tx
                .query(&stmt, &[&command_ids, &finishing, &reporting])
                .await?
            {
                let (id, run_id): (Uuid, Uuid) = (row.get(0), row.get(1));
                let status = parse_state("command status", row.get(2), CommandStatus::from_db)?;
                batch.commands.insert(id, (run_id, status));
                let claimed_at = batch.runs.get(&run_id).and_then(|run| run.claimed_at);
                if row.get::<_, bool>(3) && untaken(status, row.get(4), claimed_at) {
                    batch.untaken_turns.entry(run_id).or_default().push(id);
                }
            }
        }

        let request_ids: Vec<Uuid> = writes
            .iter()
            .filter_map(|w| match w {
                LeaseWrite::Append { events, .. } => Some(events),
                _ => None,
            })
            .flatten()
            .filter(|e| e.event_type == EventType::RequestOpened)
            .filter_map(|e| e.payload().get("request_id")?.as_str()?.parse().ok())
            .collect();
        if !request_ids.is_empty() {
            let stmt = tx
                .prepare_cached("SELECT tenant_id, id, run_id FROM requests WHERE id = ANY($1)")
                .await?;
            for row in tx.query(&stmt, &[&request_ids]).await? {
                batch
                    .request_owners
                    .insert((row.get(0), row.get(1)), row.get(2));
            }
        }
        Ok(batch)
    }

    fn run(&self, run_id: RunId) -> Result<&RunRecord> {
        self.runs
            .get(&run_id.0)
            .ok_or(Error::NotFound { what: "run" })
    }

    /// Plans one write; it is borrowed, so a retried batch is planned again without
    /// copying its events.
    fn plan(&mut self, runner_id: RunnerId, write: &LeaseWrite) -> Result<Planned> {
        match write {
            LeaseWrite::Append {
                run_id,
                epoch,
                events,
                updates,
            } => self.plan_append(runner_id, *run_id, *epoch, events, updates.clone()),
            LeaseWrite::Finish {
                epoch,
                outcome,
                last_runner_seq,
            } => self.plan_finish(runner_id, *epoch, outcome.clone(), *last_runner_seq),
            LeaseWrite::Release { run_id, epoch } => {
                let run = self.run(*run_id)?;
                fence(run, runner_id, *epoch, self.now)?;
                self.releases.push(*run_id);
                self.set_status(*run_id, RunStatus::Pending);
                Ok(Planned::Released)
            }
        }
    }

    /// Checks an event batch and its command updates; on success, records what to store.
    ///
    /// Events at or below the epoch's stored runner_seq are resends and are skipped; the
    /// rest must continue it without a gap. The first events of an epoch move the run
    /// from claimed to running (`run.started`); `request.opened` stores the request and
    /// makes the run waiting; `turn.completed` cancels the turn's open requests, and the
    /// run is running again once none is open. Turns follow their lifecycle: a
    /// `turn.started` while a turn is active, or a `turn.completed` when none is or naming
    /// another turn, is refused (a buggy runner cannot end the turn a steer is aimed at).
    /// The run's stream mode then decides which fresh deltas are stored, merged, or only
    /// sent live ([`stream_modes`]); the acknowledgement names the last runner_seq either way.
    fn plan_append(
        &mut self,
        runner_id: RunnerId,
        run_id: RunId,
        epoch: i64,
        batch: &[RunnerEvent],
        updates: Vec<CommandUpdate>,
    ) -> Result<Planned> {
        let run = self.run(run_id)?;
        fence(run, runner_id, epoch, self.now)?;
        let mut progress = RunProgress::of(run);
        let duplicates = batch
            .iter()
            .take_while(|e| e.runner_seq <= progress.lease_runner_seq)
            .count();
        let fresh = &batch[duplicates..];
        if let Some(first) = fresh.first()
            && first.runner_seq != progress.lease_runner_seq + 1
        {
            return Err(Error::invalid(
                format!("events[{duplicates}].runner_seq"),
                format!(
                    "is {}, expected {} (events must not skip)",
                    first.runner_seq,
                    progress.lease_runner_seq + 1
                ),
            ));
        }

        // The run's stream mode decides which deltas are stored; only those count.
        let Shaped { stored, live } =
            stream_modes::shape(run.stream_mode, fresh, self.max_payload_bytes);
        progress.event_bytes += stored.iter().map(|e| e.payload_bytes as i64).sum::<i64>();
        if self.max_event_bytes > 0 && progress.event_bytes > self.max_event_bytes {
            return Err(Error::ResourceExhausted(format!(
                "the run's events would hold {} payload bytes, over the quota of {} per run \
                 (--max-run-event-bytes)",
                progress.event_bytes, self.max_event_bytes
            )));
        }

        // A turn left active by an earlier holder of the run (a runner that restarted and
        // was handed its run back under a new epoch) ended with that holder: the new one
        // runs its turns again from the start.
        if progress.lease_runner_seq == 0 && !fresh.is_empty() {
            progress.active_turn_id = None;
        }
        let mut to_store = Vec::with_capacity(fresh.len() + 1);
        if progress.status == RunStatus::Claimed && !(fresh.is_empty() && updates.is_empty()) {
            progress.status = RunStatus::Running;
            to_store.push(NewEvent::manager(
                EventType::RunStarted,
                json!({"epoch": epoch, "attempt": run.attempt}),
            ));
        }
        let mut opened = Vec::new();
        let mut ended_turns = Vec::new();
        for (i, event) in fresh.iter().enumerate() {
            let field = |name: &str| format!("events[{}]{name}", duplicates + i);
            let turn_id = || event.payload().get("turn_id").and_then(|t| t.as_str());
            // The active turn guards steers aimed at a turn that has already ended, so a
            // runner may only start a turn when none is active and end the active one.
            match event.event_type {
                EventType::TurnStarted => {
                    if let Some(active) = &progress.active_turn_id {
                        return Err(Error::invalid(
                            field(".type"),
                            format!(
                                "is turn.started while turn {active:?} is active (end it with turn.completed first)"
                            ),
                        ));
                    }
                    progress.active_turn_id = turn_id().map(str::to_owned);
                }
                EventType::TurnCompleted => {
                    let Some(active) = progress.active_turn_id.take() else {
                        return Err(Error::invalid(
                            field(".type"),
                            "is turn.completed while no turn is active",
                        ));
                    };
                    if let Some(ended) = turn_id()
                        && ended != active
                    {
                        return Err(Error::invalid(
                            field(".payload_json.turn_id"),
                            format!("is {ended:?}, but the active turn is {active:?}"),
                        ));
                    }
                    ended_turns.push(active);
                }
                EventType::RequestOpened => {
                    let request = OpenedRequest::from_payload(
                        format!("events[{}].payload_json", duplicates + i),
                        event.payload(),
                        progress.active_turn_id.clone(),
                    )?;
                    let tenant = self.runs[&run_id.0].tenant_id.clone();
                    if self
                        .request_owners
                        .get(&(tenant, request.id.0))
                        .is_some_and(|owner| *owner != run_id.0)
                    {
                        return Err(Error::invalid(
                            format!("{}.request_id", request.field),
                            "is already the id of another run's request",
                        ));
                    }
                    if progress.status == RunStatus::Running {
                        progress.status = RunStatus::Waiting;
                    }
                    opened.push(request);
                }
                _ => {}
            }
        }
        let from_runner = |event: &RunnerEvent| NewEvent {
            event_type: event.event_type,
            payload: NewPayload::Redacted(event.json.clone()),
            producer: Producer::Runner {
                runner_id,
                epoch,
                runner_seq: event.runner_seq,
            },
        };
        // Where this append's stored runner events start, for the live deltas' place.
        let runner_events_at = to_store.len();
        to_store.extend(stored.iter().map(|e| from_runner(e)));
        let (accepted, completed) = self.check_command_updates(run_id, updates)?;
        to_store.extend(completed);
        if let Some(last) = fresh.last() {
            progress.lease_runner_seq = last.runner_seq;
        }
        let acked_runner_seq = progress.lease_runner_seq;

        // Every check passed: record the effects.
        for update in &accepted {
            if let Some(command) = self.commands.get_mut(&update.command_id.0) {
                command.1 = update.status;
            }
        }
        self.command_updates
            .extend(accepted.into_iter().map(|u| (run_id, u)));
        if !(opened.is_empty() && ended_turns.is_empty()) {
            self.requests_changed.insert(run_id.0);
        }
        let tenant = self.run(run_id)?.tenant_id.clone();
        for request in &opened {
            self.request_owners
                .insert((tenant.clone(), request.id.0), run_id.0);
        }
        if !opened.is_empty() {
            self.opened.push((run_id, opened));
        }
        self.ended_turns
            .extend(ended_turns.into_iter().map(|t| (run_id.0, t)));
        let start = self.events.len();
        // A live delta follows the stored event before it: of this append, else the
        // run's last one planned earlier in the batch, else its last one stored.
        let earlier = if live.is_empty() {
            None
        } else {
            self.events.iter().rposition(|(run, _)| *run == run_id)
        };
        let live_start = self.live.len();
        self.live
            .extend(live.into_iter().map(|(stored_before, event)| {
                let at = runner_events_at + stored_before;
                let follows = if at == 0 {
                    earlier
                } else {
                    Some(start + at - 1)
                };
                (run_id, follows, from_runner(event))
            }));
        self.events
            .extend(to_store.into_iter().map(|e| (run_id, e)));
        let run = self.runs.get_mut(&run_id.0).expect("checked above");
        run.status = progress.status;
        run.lease_runner_seq = progress.lease_runner_seq;
        run.active_turn_id = progress.active_turn_id.clone();
        run.event_bytes = progress.event_bytes;
        self.progress.insert(run_id.0, progress);
        Ok(Planned::Appended {
            events: start..self.events.len(),
            live: live_start..self.live.len(),
            acked_runner_seq,
            duplicates: duplicates as i32,
        })
    }

    /// Checks a runner's command reports against the commands as planned so far.
    /// Repeating a report is a no-op; an illegal transition is refused. Returns the
    /// updates to store and the `command.completed` events of commands that ended.
    fn check_command_updates(
        &self,
        run_id: RunId,
        updates: Vec<CommandUpdate>,
    ) -> Result<(Vec<CommandUpdate>, Vec<NewEvent>)> {
        let mut planned: HashMap<Uuid, CommandStatus> = HashMap::new();
        let mut accepted = Vec::new();
        let mut completed = Vec::new();
        for (i, update) in updates.into_iter().enumerate() {
            let field = format!("command_updates[{i}]");
            let current = match (
                planned.get(&update.command_id.0),
                self.commands.get(&update.command_id.0),
            ) {
                (Some(status), _) => *status,
                (None, Some((owner, status))) if *owner == run_id.0 => *status,
                _ => {
                    return Err(Error::invalid(
                        format!("{field}.command_id"),
                        "is not a command of this run",
                    ));
                }
            };
            if current == update.status {
                continue;
            }
            if !CommandStatus::can_transition(current, update.status) {
                return Err(Error::precondition(
                    reason::ILLEGAL_TRANSITION,
                    format!(
                        "{field}: command is {} and cannot become {}",
                        current.as_str(),
                        update.status.as_str()
                    ),
                ));
            }
            planned.insert(update.command_id.0, update.status);
            if update.status.is_final() {
                completed.push(NewEvent::manager(
                    EventType::CommandCompleted,
                    json!({"command_id": update.command_id.to_string(), "status": update.status.as_str(), "error": update.error, "closed_by": "runner"}),
                ));
            }
            accepted.push(update);
        }
        Ok((accepted, completed))
    }

    /// Checks a finish. If the run's cancellation was requested, it ends cancelled
    /// whatever the runner reports. Repeating the finish that already happened (an
    /// acknowledgement lost) returns the run as it ended; a run that ended otherwise
    /// (timed out, say) is `lease_lost`.
    fn plan_finish(
        &mut self,
        runner_id: RunnerId,
        epoch: i64,
        outcome: Finish,
        last_runner_seq: i64,
    ) -> Result<Planned> {
        let run = self.run(outcome.run_id)?;
        let same_holder = run.lease_epoch == epoch && run.lease_runner_id == Some(runner_id);
        let same_outcome = run.status == outcome.status
            || (run.cancel_requested && run.status == RunStatus::Cancelled);
        if same_holder && run.status.is_terminal() && same_outcome {
            self.repeated_finishes.push(outcome.run_id.0);
            return Ok(Planned::Finished(outcome.run_id));
        }
        fence(run, runner_id, epoch, self.now)?;
        if last_runner_seq > run.lease_runner_seq {
            return Err(Error::precondition(
                reason::EVENTS_MISSING,
                format!(
                    "events up to runner_seq {last_runner_seq} must be stored first; {} are",
                    run.lease_runner_seq
                ),
            ));
        }
        // A cancelled run ends cancelled, with the reason its canceller gave.
        let outcome = if run.cancel_requested {
            Finish {
                status: RunStatus::Cancelled,
                failure_kind: Some("cancelled".into()),
                message: run.cancel_reason.clone().or(outcome.message),
                ..outcome
            }
        } else {
            outcome
        };
        let run_id = outcome.run_id;
        if outcome.status == RunStatus::Completed && self.has_untaken_turn(run_id) {
            // Ending the run would drop a turn the runner has not seen: the next holder
            // runs it, with the turns completed so far as its conversation.
            self.set_status(run_id, RunStatus::Pending);
            self.turn_queued.push(run_id);
            return Ok(Planned::Finished(run_id));
        }
        self.set_status(run_id, outcome.status);
        self.finishes.push(outcome);
        Ok(Planned::Finished(run_id))
    }

    /// Whether the run has a turn the runner has not taken (acknowledged), also as the
    /// batch's earlier writes leave it.
    fn has_untaken_turn(&self, run_id: RunId) -> bool {
        self.untaken_turns.get(&run_id.0).is_some_and(|turns| {
            turns.iter().any(|id| {
                matches!(
                    self.commands.get(id),
                    Some((_, CommandStatus::Pending | CommandStatus::Delivered))
                )
            })
        })
    }

    /// A finish or release planned: later writes of the batch see the run gone.
    fn set_status(&mut self, run_id: RunId, status: RunStatus) {
        if let Some(run) = self.runs.get_mut(&run_id.0) {
            run.status = status;
        }
    }

    /// Stores every accepted write: command updates, events, requests (with the
    /// `request.resolved` of those closed by their turn's end), the runs' progress, then
    /// finishes and releases.
    async fn store(mut self, tx: &impl GenericClient) -> Result<Stored> {
        // A run that ends in this batch after appends takes their progress into the
        // update that ends it (below), and so the last report on the first turn its row
        // carries (the usual run's turn completes in the batch that ends it): one row
        // version fewer. Every other report is stored first.
        let ending_runs: HashSet<Uuid> = self
            .finishes
            .iter()
            .map(|f| f.run_id.0)
            .filter(|id| self.progress.contains_key(id))
            .collect();
        let (carried, updates): (Vec<_>, Vec<_>) = std::mem::take(&mut self.command_updates)
            .into_iter()
            .partition(|(run_id, update)| {
                ending_runs.contains(&run_id.0)
                    && self.runs[&run_id.0].first_turn_id == Some(update.command_id)
            });
        // Of several reports on one turn, the last.
        let mut first_turns: HashMap<Uuid, (CommandStatus, Option<String>)> = carried
            .into_iter()
            .map(|(run_id, update)| (run_id.0, (update.status, update.error)))
            .collect();
        commands::store_updates(tx, &updates).await?;
        let events = std::mem::take(&mut self.events);
        let appended = events.len();
        let mut sequenced = self.number(events)?;
        for (run_id, opened) in &self.opened {
            requests::open(tx, &self.runs[&run_id.0], opened).await?;
        }
        // A request its turn took with it is closed in the log too.
        let closed = requests::cancel_for_turns(tx, &self.ended_turns).await?;
        let closed_events: Vec<(RunId, NewEvent)> =
            closed.iter().map(requests::resolved_event).collect();
        sequenced.extend(self.number(closed_events)?);
        // A run waits only while one of its requests is open.
        let rechecked: Vec<Uuid> = self
            .requests_changed
            .iter()
            .filter(|id| self.progress[id].status == RunStatus::Waiting)
            .copied()
            .collect();
        let still_waiting = requests::with_open(tx, &rechecked).await?;
        for id in rechecked {
            if !still_waiting.contains(&id) {
                self.progress
                    .get_mut(&id)
                    .expect("rechecked runs have progress")
                    .status = RunStatus::Running;
            }
        }
        // The ending runs' progress goes with their ends; the others' is written first
        // (the finishes append after it).
        let ending: HashMap<Uuid, LeaseProgress> = self
            .finishes
            .iter()
            .filter_map(|f| {
                let p = self.progress.get(&f.run_id.0)?;
                Some((
                    f.run_id.0,
                    LeaseProgress {
                        lease_runner_seq: p.lease_runner_seq,
                        event_bytes: p.event_bytes,
                        last_event_seq: p.last_event_seq,
                        first_turn: first_turns.remove(&f.run_id.0),
                    },
                ))
            })
            .collect();
        store_progress(tx, &self.progress, &ending).await?;
        // The events are stored with the finishes' own, in one statement.
        let (mut finished, mut stored) =
            lifecycle::finish_many_with(tx, &self.finishes, &ending, sequenced).await?;
        // The batch read its runs without their input; a repeated finish answers whole.
        finished.extend(runs::get_many(tx, &self.repeated_finishes).await?);
        // After the appends' own events: the requests their ended turns closed, and the
        // finishes' events.
        let closing = stored.split_off(appended);
        lifecycle::requeue_many(tx, &self.releases, RequeueReason::Released).await?;
        finished.extend(
            lifecycle::requeue_many(tx, &self.turn_queued, RequeueReason::TurnQueued).await?,
        );
        let live = self
            .live
            .into_iter()
            .map(|(run_id, follows, event)| {
                let follows_seq = match follows {
                    Some(i) => stored[i].seq,
                    None => self.runs[&run_id.0].last_event_seq,
                };
                EventRecord::ephemeral(run_id, follows_seq, event)
            })
            .collect();
        // The runs that go on whose news in this batch is all in their appends' events:
        // their appends reach the log's end (a release or requeue appends more of its own
        // in another statement).
        let mut appended_ends: HashMap<Uuid, i64> = HashMap::new();
        for event in &stored {
            let end = appended_ends.entry(event.run_id.0).or_default();
            *end = (*end).max(event.seq);
        }
        let requeued: HashSet<Uuid> = self
            .releases
            .iter()
            .chain(&self.turn_queued)
            .map(|r| r.0)
            .collect();
        let finishing: HashSet<Uuid> = self.finishes.iter().map(|f| f.run_id.0).collect();
        let mut whole_news: HashSet<Uuid> = self
            .progress
            .iter()
            .filter(|(id, p)| {
                !finishing.contains(id)
                    && !requeued.contains(id)
                    && appended_ends.get(id) == Some(&p.last_event_seq)
            })
            .map(|(id, _)| *id)
            .collect();
        // A run that ends here (and is not requeued by another statement) has all of its
        // news in this batch: its appends, the requests their turns closed and its end,
        // which its finish's answer takes.
        let mut finish_news: HashMap<Uuid, Vec<EventRecord>> = finishing
            .difference(&requeued)
            .map(|id| (*id, Vec::new()))
            .collect();
        for event in closing {
            if let Some(news) = finish_news.get_mut(&event.run_id.0) {
                news.push(event);
            }
        }
        for news in finish_news.values_mut() {
            news.sort_by_key(|e| e.seq);
        }
        whole_news.extend(finish_news.keys());
        Ok(Stored {
            events: stored.into_iter().map(Some).collect(),
            whole_news,
            finish_news,
            live,
            finished,
        })
    }
}

impl Batch {
    /// Numbers `events` after each run's last stored event (its row is locked, and only
    /// [`store_progress`] or its finish writes the counter back), in order.
    fn number(&mut self, events: Vec<(RunId, NewEvent)>) -> Result<Vec<(RunId, i64, NewEvent)>> {
        events
            .into_iter()
            .map(|(run_id, event)| {
                let progress = self.progress.get_mut(&run_id.0).ok_or_else(|| {
                    Error::Internal("an event for a run the batch did not append to".into())
                })?;
                progress.last_event_seq += 1;
                Ok((run_id, progress.last_event_seq, event))
            })
            .collect()
    }
}

/// Writes the appends' effect on each run row in one statement, but for the runs
/// `ending` (their finish writes it).
async fn store_progress(
    tx: &impl GenericClient,
    progress: &HashMap<Uuid, RunProgress>,
    ending: &HashMap<Uuid, LeaseProgress>,
) -> Result<()> {
    let ids: Vec<Uuid> = progress
        .keys()
        .filter(|id| !ending.contains_key(id))
        .copied()
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE runs SET status = p.status, lease_runner_seq = p.runner_seq,
                    active_turn_id = p.turn_id, event_bytes = p.event_bytes,
                    last_event_seq = p.last_event_seq, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                         $6::bigint[])
                  AS p(id, status, runner_seq, turn_id, event_bytes, last_event_seq)
             WHERE runs.id = p.id",
        )
        .await?;
    let statuses: Vec<&str> = ids.iter().map(|id| progress[id].status.as_str()).collect();
    let seqs: Vec<i64> = ids.iter().map(|id| progress[id].lease_runner_seq).collect();
    let turns: Vec<Option<&str>> = ids
        .iter()
        .map(|id| progress[id].active_turn_id.as_deref())
        .collect();
    let bytes: Vec<i64> = ids.iter().map(|id| progress[id].event_bytes).collect();
    let last_seqs: Vec<i64> = ids.iter().map(|id| progress[id].last_event_seq).collect();
    tx.execute(&stmt, &[&ids, &statuses, &seqs, &turns, &bytes, &last_seqs])
        .await?;
    Ok(())
}

/// What the batch stored, to answer each write.
struct Stored {
    /// Each taken by the answer of the write that appended it.
    events: Vec<Option<EventRecord>>,
    /// The runs whose news in this batch its answers carry whole: their appends' events
    /// (and, for a run that ended, [`Stored::finish_news`]) are all the batch added to
    /// their logs.
    whole_news: HashSet<Uuid>,
    /// Of a run that ended: the events the batch stored after its appends' own.
    finish_news: HashMap<Uuid, Vec<EventRecord>>,
    live: Vec<EventRecord>,
    finished: Vec<RunRecord>,
}

impl Stored {
    fn outcome(&mut self, plan: Planned) -> Result<Written> {
        Ok(match plan {
            Planned::Appended {
                events,
                live,
                acked_runner_seq,
                duplicates,
            } => {
                let mut stored: Vec<EventRecord> = self.events[events]
                    .iter_mut()
                    .filter_map(Option::take)
                    .collect();
                let (first_seq, last_seq) = (
                    stored.first().map_or(0, |e| e.seq),
                    stored.last().map_or(0, |e| e.seq),
                );
                // Only a run's whole news is worth handing to watchers in memory (all of
                // its appends in the batch, in seq order): other events in between would
                // leave them a gap to read.
                if stored
                    .first()
                    .is_some_and(|e| !self.whole_news.contains(&e.run_id.0))
                {
                    stored.clear();
                }
                Written::Appended(AppendOutcome {
                    first_seq,
                    last_seq,
                    acked_runner_seq,
                    duplicates,
                    live: self.live[live].to_vec(),
                    stored,
                })
            }
            Planned::Finished(run_id) => Written::Finished(
                Box::new(
                    self.finished
                        .iter()
                        .find(|r| r.id == run_id)
                        .cloned()
                        .ok_or_else(|| Error::Internal("a fenced finish changed no row".into()))?,
                ),
                self.finish_news.remove(&run_id.0).unwrap_or_default(),
            ),
            Planned::Released => Written::Released,
        })
    }
}
