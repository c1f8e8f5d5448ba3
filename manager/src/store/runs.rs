//! Runs: the run rows and their SQL — inserting (idempotent, in bulk), reading, listing,
//! and the row updates of the transitions other modules share (ending, requeueing,
//! flagging a cancellation). What those transitions do to commands, requests, sessions
//! and events is `lifecycle`; claiming and fenced runner writes are `leases`.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::SystemTime;

use agentrun_shared::ids::{CommandId, RunId, RunnerId, ScheduleId, SessionId};
use agentrun_shared::state::{CommandStatus, RunStatus, StreamMode};
use deadpool_postgres::GenericClient;
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};
use uuid::Uuid;

use super::{Tenant, fingerprint, parse_state};
use crate::error::{Error, Result};

/// A run as stored.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: RunId,
    pub tenant_id: String,
    pub project_id: String,
    pub session_id: Option<SessionId>,
    pub backend_profile: String,
    pub queue: String,
    pub priority: i32,
    pub labels: Vec<String>,
    pub input: Value,
    pub metadata: Value,
    pub status: RunStatus,
    pub attempt: i32,
    pub max_attempts: i32,
    pub queue_timeout_ms: Option<i64>,
    pub run_timeout_ms: Option<i64>,
    pub idempotency_key: Option<String>,
    /// The lease holder while the run is active. A run that ended keeps the runner that
    /// held it last, so a finish repeated after a lost acknowledgement is recognised;
    /// clients see the lease only while it is held ([`RunRecord::lease_holder`]).
    pub lease_runner_id: Option<RunnerId>,
    pub lease_epoch: i64,
    pub lease_expires_at: Option<SystemTime>,
    pub lease_runner_seq: i64,
    pub cancel_requested: bool,
    /// Why cancellation was requested, when the caller said.
    pub cancel_reason: Option<String>,
    pub failure_kind: Option<String>,
    pub failure_message: Option<String>,
    pub last_event_seq: i64,
    pub last_command_seq: i64,
    /// Payload bytes of the events its runners appended (the per-run quota).
    pub event_bytes: i64,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub claimed_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub scheduled_at: Option<SystemTime>,
    pub active_turn_id: Option<String>,
    pub stream_mode: StreamMode,
    /// When retention compacted its deltas (its event seqs have gaps from then on).
    pub events_compacted_at: Option<SystemTime>,
    /// The W3C `traceparent` of the call that created it.
    pub trace_parent: Option<String>,
    /// The schedule that created it, if one did.
    pub schedule_id: Option<ScheduleId>,
    /// Where it came from, when RerunRun or ForkRun made it.
    pub lineage: Lineage,
    /// Runs of one key are admitted at most the key's limit at once (`store::flow`).
    pub concurrency_key: Option<String>,
    /// Why the run is held back from claims (`"concurrency_key"`); `None`: it is not.
    pub held: Option<String>,
    /// Why a pending run is not being claimed, when the query asked (`run_waiting_reason`);
    /// empty otherwise.
    pub waiting_reason: String,
    /// The first turn (command seq 1) when the run's own row carries it (migration V28:
    /// runs created since with a prompt).
    pub first_turn_id: Option<CommandId>,
}

/// Where a run made by RerunRun or ForkRun came from, and where its conversation context
/// starts (see [`super::context`]). All `None` for other runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    pub rerun_of: Option<RunId>,
    /// The run and the turn (its `turn` command) forked from.
    pub forked_from: Option<(RunId, CommandId)>,
    /// The context source: this run's turns completed before this event seq.
    pub context: Option<(RunId, i64)>,
}

impl Lineage {
    /// A re-run of `run`: it starts with the context `run` started with, none of `run`'s
    /// own turns.
    pub fn rerun_of(run: RunId) -> Self {
        Self {
            rerun_of: Some(run),
            forked_from: None,
            context: Some((run, 0)),
        }
    }

    /// A fork of `run` at `turn`, whose `turn.started` is event `started_seq`: it starts
    /// with everything before that turn.
    pub fn fork_of(run: RunId, turn: CommandId, started_seq: i64) -> Self {
        Self {
            rerun_of: None,
            forked_from: Some((run, turn)),
            context: Some((run, started_seq)),
        }
    }

    fn from_row(c: &mut Columns) -> Self {
        let rerun_of = c.get::<Option<Uuid>>("rerun_of_run_id").map(RunId);
        let forked_run = c.get::<Option<Uuid>>("forked_from_run_id");
        let forked_turn = c.get::<Option<Uuid>>("forked_from_turn_id");
        let context_run = c.get::<Option<Uuid>>("context_run_id");
        let context_seq = c.get::<Option<i64>>("context_before_seq");
        Self {
            rerun_of,
            forked_from: forked_run
                .zip(forked_turn)
                .map(|(run, turn)| (RunId(run), CommandId(turn))),
            context: context_run
                .zip(context_seq)
                .map(|(run, seq)| (RunId(run), seq)),
        }
    }
}

/// A row's columns found by name, each looked for from just after the last one found:
/// read in the table's column order, every lookup hits at once. (`Row::get` by name
/// scans from the first column each time: about fifty scans of fifty names per run row,
/// a tenth of the manager's time when dispatching.)
struct Columns<'a> {
    row: &'a Row,
    next: usize,
}

impl<'a> Columns<'a> {
    fn new(row: &'a Row) -> Self {
        Self { row, next: 0 }
    }

    fn index(&mut self, name: &str) -> Option<usize> {
        let columns = self.row.columns();
        let found = (0..columns.len())
            .map(|k| (self.next + k) % columns.len())
            .find(|&i| columns[i].name() == name)?;
        self.next = found + 1;
        Some(found)
    }

    /// The column `name`; panics as [`Row::get`] does if it is missing or of another type.
    fn get<T: FromSql<'a>>(&mut self, name: &str) -> T {
        match self.index(name) {
            Some(i) => self.row.get(i),
            None => self.row.get(name),
        }
    }
}

/// The columns of `runs.*`, in order, with `input` and `metadata` read as JSON `null`:
/// for statements that never use them, which would otherwise pay their size (a long
/// prompt, a conversation's context) on every call. The lease writes read their runs
/// on every append. A column added to `runs` is added here too (a test compares).
pub const COLUMNS_BUT_INPUT: &str = "runs.id, runs.tenant_id, runs.project_id, runs.session_id,
    runs.backend_profile, runs.queue, runs.priority, runs.labels,
    'null'::jsonb AS input, 'null'::jsonb AS metadata,
    runs.status, runs.attempt, runs.max_attempts, runs.queue_timeout_ms, runs.run_timeout_ms,
    runs.queue_deadline, runs.run_deadline, runs.idempotency_key, runs.request_hash,
    runs.lease_runner_id, runs.lease_epoch, runs.lease_expires_at, runs.lease_runner_seq,
    runs.cancel_requested, runs.failure_kind, runs.failure_message, runs.last_event_seq,
    runs.last_command_seq, runs.created_at, runs.updated_at, runs.claimed_at,
    runs.finished_at, runs.scheduled_at, runs.active_turn_id, runs.cancel_reason,
    runs.event_bytes, runs.stream_mode, runs.events_compacted_at, runs.trace_parent,
    runs.concurrency_key, runs.held, runs.schedule_id, runs.schedule_due_at,
    runs.rerun_of_run_id, runs.forked_from_run_id, runs.forked_from_turn_id,
    runs.context_run_id, runs.context_before_seq, runs.first_turn_id, runs.first_turn_status,
    runs.first_turn_error, runs.first_turn_updated_at";

/// Whether a run (`r`) may have commands in `commands`: any besides the first turn its
/// own row carries (migration V28). The usual run's one command is that turn, so a hot
/// path that names only these runs probes no index of `commands` for it.
/// [`RunRecord::may_have_command_rows`] is the same rule.
pub(crate) const HAS_COMMAND_ROWS: &str =
    "r.last_command_seq > CASE WHEN r.first_turn_id IS NULL THEN 0 ELSE 1 END";

impl RunRecord {
    /// [`HAS_COMMAND_ROWS`], for a run already read.
    pub(crate) fn may_have_command_rows(&self) -> bool {
        self.last_command_seq > i64::from(self.first_turn_id.is_some())
    }

    /// The runner holding the lease and when it expires: `None` unless the run is
    /// active (claimed, running or waiting).
    pub fn lease_holder(&self) -> Option<(RunnerId, Option<SystemTime>)> {
        let runner = self.lease_runner_id?;
        RunStatus::ACTIVE
            .contains(&self.status)
            .then_some((runner, self.lease_expires_at))
    }

    /// Reads a row selected as `runs.*`.
    pub(crate) fn from_row(row: &Row) -> Result<Self> {
        // In the table's column order (see `Columns`).
        let mut c = Columns::new(row);
        Ok(Self {
            id: RunId(c.get("id")),
            tenant_id: c.get("tenant_id"),
            project_id: c.get("project_id"),
            session_id: c.get::<Option<Uuid>>("session_id").map(SessionId),
            backend_profile: c.get("backend_profile"),
            queue: c.get("queue"),
            priority: c.get("priority"),
            labels: c.get("labels"),
            input: c.get("input"),
            metadata: c.get("metadata"),
            status: parse_state("run status", c.get("status"), RunStatus::from_db)?,
            attempt: c.get("attempt"),
            max_attempts: c.get("max_attempts"),
            queue_timeout_ms: c.get("queue_timeout_ms"),
            run_timeout_ms: c.get("run_timeout_ms"),
            idempotency_key: c.get("idempotency_key"),
            lease_runner_id: c.get::<Option<Uuid>>("lease_runner_id").map(RunnerId),
            lease_epoch: c.get("lease_epoch"),
            lease_expires_at: c.get("lease_expires_at"),
            lease_runner_seq: c.get("lease_runner_seq"),
            cancel_requested: c.get("cancel_requested"),
            failure_kind: c.get("failure_kind"),
            failure_message: c.get("failure_message"),
            last_event_seq: c.get("last_event_seq"),
            last_command_seq: c.get("last_command_seq"),
            created_at: c.get("created_at"),
            updated_at: c.get("updated_at"),
            claimed_at: c.get("claimed_at"),
            finished_at: c.get("finished_at"),
            scheduled_at: c.get("scheduled_at"),
            active_turn_id: c.get("active_turn_id"),
            cancel_reason: c.get("cancel_reason"),
            event_bytes: c.get("event_bytes"),
            stream_mode: parse_state("stream mode", c.get("stream_mode"), StreamMode::from_db)?,
            events_compacted_at: c.get("events_compacted_at"),
            trace_parent: c.get("trace_parent"),
            concurrency_key: c.get("concurrency_key"),
            held: c.get("held"),
            schedule_id: c.get::<Option<Uuid>>("schedule_id").map(ScheduleId),
            lineage: Lineage::from_row(&mut c),
            first_turn_id: c.get::<Option<Uuid>>("first_turn_id").map(CommandId),
            // Not a column of `runs`: only the statements that compute it have it.
            waiting_reason: c
                .index("waiting_reason")
                .and_then(|i| row.try_get::<_, Option<String>>(i).ok())
                .flatten()
                .unwrap_or_default(),
        })
    }

    fn from_rows(rows: &[Row]) -> Result<Vec<Self>> {
        rows.iter().map(Self::from_row).collect()
    }
}

/// A validated CreateRun request.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub project_id: String,
    pub session_id: Option<SessionId>,
    pub backend_profile: String,
    pub input: Map<String, Value>,
    pub queue: String,
    pub priority: i32,
    pub labels: Vec<String>,
    pub max_attempts: i32,
    pub queue_timeout_ms: Option<i64>,
    pub run_timeout_ms: Option<i64>,
    pub metadata: Map<String, Value>,
    pub idempotency_key: Option<String>,
    /// Delayed start: not claimed before this time (a past time means at once).
    pub scheduled_at: Option<SystemTime>,
    pub stream_mode: StreamMode,
    /// Set for runs made by RerunRun and ForkRun.
    pub lineage: Option<Lineage>,
    /// See `CreateRunRequest.concurrency_key`.
    pub concurrency_key: Option<String>,
}

impl NewRun {
    /// A new run with the input and settings of `run` (RerunRun, ForkRun): not scheduled,
    /// without idempotency key or lineage, for the caller to set.
    pub fn copy_of(run: &RunRecord) -> Self {
        let object = |value: &Value| value.as_object().cloned().unwrap_or_default();
        Self {
            project_id: run.project_id.clone(),
            session_id: run.session_id,
            backend_profile: run.backend_profile.clone(),
            input: object(&run.input),
            queue: run.queue.clone(),
            priority: run.priority,
            labels: run.labels.clone(),
            max_attempts: run.max_attempts,
            queue_timeout_ms: run.queue_timeout_ms,
            run_timeout_ms: run.run_timeout_ms,
            metadata: object(&run.metadata),
            idempotency_key: None,
            scheduled_at: None,
            stream_mode: run.stream_mode,
            lineage: None,
            concurrency_key: run.concurrency_key.clone(),
        }
    }

    /// The prompt of the first turn, if the input has one.
    pub(crate) fn first_prompt(&self) -> Option<&str> {
        self.input.get("prompt").and_then(Value::as_str)
    }

    pub(crate) fn fingerprint(&self) -> Vec<u8> {
        let mut canonical = json!([
            self.project_id,
            self.session_id.map(|s| s.to_string()),
            self.backend_profile,
            self.input,
            self.queue,
            self.priority,
            self.labels,
            self.max_attempts,
            self.queue_timeout_ms,
            self.run_timeout_ms,
            self.metadata,
        ]);
        // Appended only when set, so runs created before delayed starts existed keep their
        // fingerprint. The requested time as given (not "now" for a past time): a retry
        // after the time has passed is still the same request.
        if let (Some(at), Value::Array(parts)) = (self.scheduled_at, &mut canonical) {
            parts.push(json!({ "scheduled_at_us": micros_since_epoch(at) }));
        }
        // Likewise only when not the default, so keyed runs from before keep theirs.
        if let (StreamMode::Coalesced | StreamMode::Final, Value::Array(parts)) =
            (self.stream_mode, &mut canonical)
        {
            parts.push(json!({ "stream_mode": self.stream_mode.as_str() }));
        }
        if let (Some(key), Value::Array(parts)) = (&self.concurrency_key, &mut canonical) {
            parts.push(json!({ "concurrency_key": key }));
        }
        if let (Some(lineage), Value::Array(parts)) = (&self.lineage, &mut canonical) {
            parts.push(json!({
                "rerun_of": lineage.rerun_of.map(|r| r.to_string()),
                "forked_from": lineage.forked_from.map(|(r, t)| [r.to_string(), t.to_string()]),
            }));
        }
        fingerprint(&canonical)
    }
}

/// Microseconds since the Unix epoch (negative before it), PostgreSQL's precision.
fn micros_since_epoch(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => after.as_micros() as i64,
        Err(before) => -(before.duration().as_micros() as i64),
    }
}

/// The tenant's pending runs, counted up to `most` (index scans that stop there: the
/// claimable ones, then the held ones).
pub async fn count_pending(client: &impl GenericClient, tenant: &Tenant, most: i64) -> Result<i64> {
    let stmt = client
        .prepare_cached(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM runs WHERE tenant_id = $1 AND status = 'pending'
                                           AND held IS NULL LIMIT $2) ready)
                  + (SELECT count(*) FROM (SELECT 1 FROM runs WHERE tenant_id = $1 AND status = 'pending'
                                           AND held IS NOT NULL LIMIT $2) held)",
        )
        .await?;
    Ok(client
        .query_one(&stmt, &[&tenant.as_str(), &most])
        .await?
        .get(0))
}

/// Inserts new runs, pending (held when they have a concurrency key: the caller admits
/// them, see `flow::admit`), with `last_event_seq` and `last_command_seq` counting the
/// `run.created` (and first turn's `command.created`) event and first turn command the
/// caller stores with them, and `trace_parent`, the creating call's trace context. A run
/// whose idempotency key is taken is not inserted: per new run, in order, the inserted
/// row or `None`.
pub(crate) async fn insert_new(
    tx: &impl GenericClient,
    tenant: &Tenant,
    new_runs: &[NewRun],
    trace_parent: Option<&str>,
) -> Result<Vec<Option<RunRecord>>> {
    let ids: Vec<Uuid> = new_runs.iter().map(|_| RunId::new().0).collect();
    let hashes: Vec<Vec<u8>> = new_runs.iter().map(NewRun::fingerprint).collect();
    let labels: Vec<Value> = new_runs.iter().map(|r| json!(r.labels)).collect();
    let inputs: Vec<Value> = new_runs
        .iter()
        .map(|r| Value::Object(r.input.clone()))
        .collect();
    let metadata: Vec<Value> = new_runs
        .iter()
        .map(|r| Value::Object(r.metadata.clone()))
        .collect();
    // run.created, plus command.created when there is a first turn.
    let event_counts: Vec<i64> = new_runs
        .iter()
        .map(|r| 1 + i64::from(r.first_prompt().is_some()))
        .collect();
    let command_counts: Vec<i64> = new_runs
        .iter()
        .map(|r| i64::from(r.first_prompt().is_some()))
        .collect();
    // The first turn, when there is one, is carried by the run's row (see `store::commands`).
    let first_turn_ids: Vec<Option<Uuid>> = new_runs
        .iter()
        .map(|r| r.first_prompt().map(|_| CommandId::new().0))
        .collect();

    let insert = tx
        .prepare_cached(
            "INSERT INTO runs (id, tenant_id, project_id, session_id, backend_profile, queue, priority,
                               labels, input, metadata, status, max_attempts, queue_timeout_ms,
                               run_timeout_ms, queue_deadline, idempotency_key, request_hash,
                               last_event_seq, last_command_seq, scheduled_at, stream_mode,
                               trace_parent, concurrency_key, held, first_turn_id,
                               first_turn_status, first_turn_updated_at)
             SELECT r.id, $1, r.project_id, r.session_id, r.backend_profile, r.queue, r.priority,
                    ARRAY(SELECT jsonb_array_elements_text(r.labels)), r.input, r.metadata, 'pending',
                    r.max_attempts, r.queue_timeout_ms, r.run_timeout_ms,
                    greatest(now(), r.scheduled_at) + r.queue_timeout_ms * interval '1 millisecond',
                    r.idempotency_key, r.request_hash, r.event_count, r.command_count, r.scheduled_at,
                    r.stream_mode, $20, r.concurrency_key,
                    CASE WHEN r.concurrency_key IS NOT NULL THEN 'concurrency_key' END,
                    r.first_turn_id, CASE WHEN r.first_turn_id IS NOT NULL THEN 'pending' END,
                    CASE WHEN r.first_turn_id IS NOT NULL THEN now() END
             FROM unnest($2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::int[],
                         $8::jsonb[], $9::jsonb[], $10::jsonb[], $11::int[], $12::bigint[],
                         $13::bigint[], $14::text[], $15::bytea[], $16::bigint[], $17::bigint[],
                         $18::timestamptz[], $19::text[], $21::text[], $22::uuid[])
                  AS r(id, project_id, session_id, backend_profile, queue, priority, labels, input,
                       metadata, max_attempts, queue_timeout_ms, run_timeout_ms, idempotency_key,
                       request_hash, event_count, command_count, scheduled_at, stream_mode,
                       concurrency_key, first_turn_id)
             ON CONFLICT (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING *",
        )
        .await?;
    let rows = tx
        .query(
            &insert,
            &[
                &tenant.as_str(),
                &ids,
                &new_runs
                    .iter()
                    .map(|r| r.project_id.as_str())
                    .collect::<Vec<_>>(),
                &new_runs
                    .iter()
                    .map(|r| r.session_id.map(|s| s.0))
                    .collect::<Vec<_>>(),
                &new_runs
                    .iter()
                    .map(|r| r.backend_profile.as_str())
                    .collect::<Vec<_>>(),
                &new_runs
                    .iter()
                    .map(|r| r.queue.as_str())
                    .collect::<Vec<_>>(),
                &new_runs.iter().map(|r| r.priority).collect::<Vec<_>>(),
                &labels,
                &inputs,
                &metadata,
                &new_runs.iter().map(|r| r.max_attempts).collect::<Vec<_>>(),
                &new_runs
                    .iter()
                    .map(|r| r.queue_timeout_ms)
                    .collect::<Vec<_>>(),
                &new_runs
                    .iter()
                    .map(|r| r.run_timeout_ms)
                    .collect::<Vec<_>>(),
                &new_runs
                    .iter()
                    .map(|r| r.idempotency_key.as_deref())
                    .collect::<Vec<_>>(),
                &hashes,
                &event_counts,
                &command_counts,
                &new_runs.iter().map(|r| r.scheduled_at).collect::<Vec<_>>(),
                &new_runs
                    .iter()
                    .map(|r| r.stream_mode.as_str())
                    .collect::<Vec<_>>(),
                &trace_parent,
                &new_runs
                    .iter()
                    .map(|r| r.concurrency_key.as_deref())
                    .collect::<Vec<_>>(),
                &first_turn_ids,
            ],
        )
        .await?;
    let mut inserted = RunRecord::from_rows(&rows)?;
    Ok(ids
        .iter()
        .map(|id| {
            let at = inserted.iter().position(|r| r.id.0 == *id)?;
            Some(inserted.swap_remove(at))
        })
        .collect())
}

/// Records where runs just inserted came from (RerunRun, ForkRun): rare, so kept out of
/// [`insert_new`], the statement every CreateRun runs.
pub(crate) async fn set_lineage(tx: &impl GenericClient, runs: &[(RunId, &Lineage)]) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE runs SET rerun_of_run_id = l.rerun_of, forked_from_run_id = l.forked_run,
                    forked_from_turn_id = l.forked_turn, context_run_id = l.context_run,
                    context_before_seq = l.context_seq
             FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[], $6::bigint[])
                  AS l(id, rerun_of, forked_run, forked_turn, context_run, context_seq)
             WHERE runs.id = l.id",
        )
        .await?;
    let column = |f: &dyn Fn(&Lineage) -> Option<Uuid>| -> Vec<Option<Uuid>> {
        runs.iter().map(|(_, l)| f(l)).collect()
    };
    tx.execute(
        &stmt,
        &[
            &runs.iter().map(|(id, _)| id.0).collect::<Vec<_>>(),
            &column(&|l| l.rerun_of.map(|r| r.0)),
            &column(&|l| l.forked_from.map(|(r, _)| r.0)),
            &column(&|l| l.forked_from.map(|(_, t)| t.0)),
            &column(&|l| l.context.map(|(r, _)| r.0)),
            &runs
                .iter()
                .map(|(_, l)| l.context.map(|(_, seq)| seq))
                .collect::<Vec<_>>(),
        ],
    )
    .await?;
    Ok(())
}

/// Marks a run just inserted as created by `schedule_id`, for its due time `due_at`
/// (`None`: triggered by hand). A second run for one due time of a schedule violates
/// `runs_schedule_due`.
pub(crate) async fn mark_scheduled(
    tx: &impl GenericClient,
    run_id: RunId,
    schedule_id: ScheduleId,
    due_at: Option<SystemTime>,
) -> Result<()> {
    let stmt = tx
        .prepare_cached("UPDATE runs SET schedule_id = $2, schedule_due_at = $3 WHERE id = $1")
        .await?;
    tx.execute(&stmt, &[&run_id.0, &schedule_id.0, &due_at])
        .await?;
    Ok(())
}

pub(crate) async fn find_by_idempotency_key(
    tx: &impl GenericClient,
    tenant: &Tenant,
    key: &str,
) -> Result<(RunRecord, Vec<u8>)> {
    let stmt = tx
        .prepare_cached("SELECT * FROM runs WHERE tenant_id = $1 AND idempotency_key = $2")
        .await?;
    let row = tx
        .query_opt(&stmt, &[&tenant.as_str(), &key])
        .await?
        .ok_or_else(|| Error::Internal("idempotency conflict without a row".into()))?;
    Ok((RunRecord::from_row(&row)?, row.get("request_hash")))
}

/// Where a run stands: enough to read its log, or to check it is the caller's, without
/// reading all of it (its input may be large).
#[derive(Debug, Clone, Copy)]
pub struct RunPosition {
    pub status: RunStatus,
    /// The seq of its last stored event.
    pub last_event_seq: i64,
}

/// Where a run of the tenant stands (NOT_FOUND for another tenant's, like an unknown
/// one).
pub async fn position(
    client: &impl GenericClient,
    tenant: &Tenant,
    run_id: RunId,
) -> Result<RunPosition> {
    let stmt = client
        .prepare_cached("SELECT status, last_event_seq FROM runs WHERE id = $1 AND tenant_id = $2")
        .await?;
    let row = client
        .query_opt(&stmt, &[&run_id.0, &tenant.as_str()])
        .await?
        .ok_or(Error::NotFound { what: "run" })?;
    Ok(RunPosition {
        status: parse_state("run status", row.get(0), RunStatus::from_db)?,
        last_event_seq: row.get(1),
    })
}

/// A run of the tenant, without its waiting reason (see [`get_explained`]).
pub async fn get(client: &impl GenericClient, tenant: &Tenant, run_id: RunId) -> Result<RunRecord> {
    get_with(
        client,
        "SELECT * FROM runs WHERE id = $1 AND tenant_id = $2",
        tenant,
        run_id,
    )
    .await
}

/// A run of the tenant with why it waits, for an answer to a client. Only where it is
/// shown: the reason costs more to work out than reading the run.
pub async fn get_explained(
    client: &impl GenericClient,
    tenant: &Tenant,
    run_id: RunId,
) -> Result<RunRecord> {
    let sql = "SELECT runs.*, run_waiting_reason(runs) AS waiting_reason FROM runs
               WHERE id = $1 AND tenant_id = $2";
    get_with(client, sql, tenant, run_id).await
}

async fn get_with(
    client: &impl GenericClient,
    sql: &str,
    tenant: &Tenant,
    run_id: RunId,
) -> Result<RunRecord> {
    let stmt = client.prepare_cached(sql).await?;
    let row = client
        .query_opt(&stmt, &[&run_id.0, &tenant.as_str()])
        .await?
        .ok_or(Error::NotFound { what: "run" })?;
    RunRecord::from_row(&row)
}

/// The `last_event_seq` of each of `run_ids` that exists: one indexed query, however
/// many (the watch hub's safety-net poll).
pub async fn last_event_seqs(
    client: &impl GenericClient,
    run_ids: &[RunId],
) -> Result<Vec<(RunId, i64)>> {
    let ids: Vec<Uuid> = run_ids.iter().map(|r| r.0).collect();
    let stmt = client
        .prepare_cached("SELECT id, last_event_seq FROM runs WHERE id = ANY($1)")
        .await?;
    let rows = client.query(&stmt, &[&ids]).await?;
    Ok(rows
        .iter()
        .map(|row| (RunId(row.get("id")), row.get("last_event_seq")))
        .collect())
}

/// The runs of `run_ids` that exist, whole, in no particular order.
pub(crate) async fn get_many(
    client: &impl GenericClient,
    run_ids: &[Uuid],
) -> Result<Vec<RunRecord>> {
    if run_ids.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached("SELECT * FROM runs WHERE id = ANY($1)")
        .await?;
    RunRecord::from_rows(&client.query(&stmt, &[&run_ids]).await?)
}

/// Locks a run of the tenant for the rest of the transaction.
pub async fn lock(tx: &impl GenericClient, tenant: &Tenant, run_id: RunId) -> Result<RunRecord> {
    let stmt = tx
        .prepare_cached("SELECT * FROM runs WHERE id = $1 AND tenant_id = $2 FOR UPDATE")
        .await?;
    let row = tx
        .query_opt(&stmt, &[&run_id.0, &tenant.as_str()])
        .await?
        .ok_or(Error::NotFound { what: "run" })?;
    RunRecord::from_row(&row)
}

/// Filters for [`list`]; empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub statuses: Vec<RunStatus>,
    pub queue: Option<String>,
    pub session_id: Option<SessionId>,
    pub project_id: Option<String>,
    pub backend_profile: Option<String>,
    /// Only runs that have every one of these labels.
    pub labels: Vec<String>,
    /// Only runs created at or after this time.
    pub created_after: Option<SystemTime>,
    /// Only runs created before this time.
    pub created_before: Option<SystemTime>,
    /// Only runs of this concurrency key.
    pub concurrency_key: Option<String>,
    /// Only runs older than this one (the page cursor).
    pub before: Option<RunId>,
    pub limit: i64,
}

/// The conditions of a [`RunFilter`]: $1 tenant, $2 statuses, $3 queue, $4 session, $5
/// project, $6 page cursor, $7 backend profile, $8 labels, $9/$10 creation window, $12
/// concurrency key.
const FILTER_SQL: &str = "tenant_id = $1
       AND (cardinality($2::text[]) = 0 OR status = ANY($2))
       AND ($3::text IS NULL OR queue = $3)
       AND ($4::uuid IS NULL OR session_id = $4)
       AND ($5::text IS NULL OR project_id = $5)
       AND ($6::uuid IS NULL OR id < $6)
       AND ($7::text IS NULL OR backend_profile = $7)
       AND labels @> $8::text[]
       AND ($9::timestamptz IS NULL OR created_at >= $9)
       AND ($10::timestamptz IS NULL OR created_at < $10)
       AND ($12::text IS NULL OR concurrency_key = $12)";

/// The statements of [`list`], by the statuses a filter asks for: each names its
/// statuses as literals, so that even a generic plan reads them through the partial
/// indexes that hold them rather than walking the tenant's whole history.
struct ListSql {
    /// No status, or some completed: the tenant's runs newest first (most have completed).
    any: String,
    /// Only statuses of runs not ended: the tenant's open runs ([`OPEN_RUNS`]).
    open: String,
    /// Only unsuccessful ends: the `runs_ended_unsuccessfully` index.
    ended_unsuccessfully: String,
}

impl ListSql {
    fn for_statuses(&self, statuses: &[RunStatus]) -> &str {
        if statuses.is_empty() || statuses.contains(&RunStatus::Completed) {
            &self.any
        } else if statuses.iter().all(|s| !s.is_terminal()) {
            &self.open
        } else if statuses.iter().all(|s| s.is_terminal()) {
            &self.ended_unsuccessfully
        } else {
            &self.any
        }
    }
}

static LIST_SQL: LazyLock<ListSql> = LazyLock::new(|| {
    let select = "SELECT runs.*, run_waiting_reason(runs) AS waiting_reason FROM runs";
    let newest_first = "ORDER BY id DESC LIMIT $11";
    ListSql {
        any: format!("{select} WHERE {FILTER_SQL} {newest_first}"),
        open: format!(
            "{select} WHERE id IN (SELECT id FROM {OPEN_RUNS} open WHERE tenant_id = $1)
               AND {NOT_ENDED} AND {FILTER_SQL} {newest_first}"
        ),
        ended_unsuccessfully: format!(
            "{select} WHERE status IN ('failed', 'cancelled', 'blocked', 'expired')
               AND {FILTER_SQL} {newest_first}"
        ),
    }
});

/// Oldest first, so repeated calls make progress through a backlog; locked in that
/// order, so two bulk cancels never wait on each other in a cycle. The candidates are
/// the tenant's open runs ([`OPEN_RUNS`]), not its whole history; the status is checked
/// again on the row as locked (a run that ended meanwhile is passed over).
static LOCK_UNCANCELLED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT * FROM runs
         WHERE id IN (SELECT id FROM {OPEN_RUNS} open WHERE tenant_id = $1)
           AND {FILTER_SQL} AND {NOT_ENDED} AND NOT cancel_requested
         ORDER BY id LIMIT $11 FOR UPDATE"
    )
});

/// A [`RunFilter`] as the parameters $1..=$12 of [`FILTER_SQL`] ($11: its limit).
struct FilterParams<'a> {
    tenant: &'a str,
    filter: &'a RunFilter,
    statuses: Vec<&'static str>,
    session: Option<Uuid>,
    before: Option<Uuid>,
}

impl<'a> FilterParams<'a> {
    fn new(tenant: &'a Tenant, filter: &'a RunFilter) -> Self {
        Self {
            tenant: tenant.as_str(),
            filter,
            statuses: filter.statuses.iter().map(|s| s.as_str()).collect(),
            session: filter.session_id.map(|s| s.0),
            before: filter.before.map(|r| r.0),
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.tenant,
            &self.statuses,
            &self.filter.queue,
            &self.session,
            &self.filter.project_id,
            &self.before,
            &self.filter.backend_profile,
            &self.filter.labels,
            &self.filter.created_after,
            &self.filter.created_before,
            &self.filter.limit,
            &self.filter.concurrency_key,
        ]
    }
}

/// Runs of the tenant, newest first (run ids are time-ordered). A filter by statuses of
/// open runs, or by unsuccessful ends, reads only those runs ([`ListSql`]); otherwise
/// the tenant's runs are read newest first until the page is full.
pub async fn list(
    client: &impl GenericClient,
    tenant: &Tenant,
    filter: &RunFilter,
) -> Result<Vec<RunRecord>> {
    let stmt = client
        .prepare_cached(LIST_SQL.for_statuses(&filter.statuses))
        .await?;
    let params = FilterParams::new(tenant, filter);
    let rows = client.query(&stmt, &params.params()).await?;
    RunRecord::from_rows(&rows)
}

/// Locks up to `filter.limit` of the tenant's runs that match the filter, are not
/// terminal and are not being cancelled yet, oldest first (CancelRuns).
pub async fn lock_uncancelled(
    tx: &impl GenericClient,
    tenant: &Tenant,
    filter: &RunFilter,
) -> Result<Vec<RunRecord>> {
    let stmt = tx.prepare_cached(&LOCK_UNCANCELLED_SQL).await?;
    let params = FilterParams::new(tenant, filter);
    let rows = tx.query(&stmt, &params.params()).await?;
    RunRecord::from_rows(&rows)
}

/// What a runner's appends made of a run's row (the rest of its progress, status and
/// active turn, an end overrides).
#[derive(Debug, Clone)]
pub struct LeaseProgress {
    pub lease_runner_seq: i64,
    pub event_bytes: i64,
    pub last_event_seq: i64,
    /// The runner's last report on the first turn the run's row carries, written with
    /// the row's end (one row version fewer than a report of its own).
    pub first_turn: Option<(CommandStatus, Option<String>)>,
}

/// Why and how a run ends.
#[derive(Debug, Clone)]
pub struct Finish {
    pub run_id: RunId,
    pub status: RunStatus,
    pub failure_kind: Option<String>,
    pub message: Option<String>,
}

/// The statement of [`mark_finished`]. Public for the test of its plan.
pub static MARK_FINISHED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE runs SET status = f.status, failure_kind = f.failure_kind,
            failure_message = f.message, finished_at = now(), updated_at = now(), active_turn_id = NULL,
            lease_expires_at = NULL,
            lease_runner_seq = coalesce(f.runner_seq, runs.lease_runner_seq),
            event_bytes = coalesce(f.event_bytes, runs.event_bytes),
            last_event_seq = coalesce(f.last_event_seq, runs.last_event_seq)
                             + ending.events,
            first_turn_status = coalesce(f.first_turn_status, runs.first_turn_status),
            first_turn_error = CASE WHEN f.first_turn_status IS NULL THEN runs.first_turn_error
                                    ELSE f.first_turn_error END,
            first_turn_updated_at = CASE WHEN f.first_turn_status IS NULL
                                         THEN runs.first_turn_updated_at ELSE now() END
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                 $6::bigint[], $7::bigint[], $8::bigint[], $9::text[], $10::text[])
          AS f(id, status, failure_kind, message, sources, runner_seq, event_bytes,
               last_event_seq, first_turn_status, first_turn_error)
     CROSS JOIN LATERAL (
         -- A first turn (seq 1) reported in this update counts as it is reported. The
         -- run's commands are counted where they are (`run_commands` spelled out): the
         -- first turn on its row, the others in `commands`, probed only when it has some.
         SELECT 1 + coalesce((
                    SELECT CASE WHEN {has_rows} THEN
                                (SELECT count(*) FROM commands c
                                 WHERE c.run_id = r.id AND c.status IN ({open})
                                   AND (f.first_turn_status IS NULL OR c.seq <> 1))
                           ELSE 0 END
                           + CASE WHEN f.first_turn_status IS NULL
                                       AND r.first_turn_status IN ({open}) THEN 1 ELSE 0 END
                    FROM runs r WHERE r.id = f.id), 0)
                  + CASE WHEN f.first_turn_status IN ({open}) THEN 1 ELSE 0 END
                  + (SELECT count(*) FROM requests q
                     WHERE q.run_id = f.id AND q.status = 'open') AS events
         -- A fence: pulled up, the counts ran twice, for SET and for RETURNING.
         OFFSET 0
     ) ending
     WHERE runs.id = f.id AND runs.status = ANY(string_to_array(f.sources, ','))
     RETURNING runs.*, ending.events",
        open = *super::commands::OPEN_STATUSES,
        has_rows = HAS_COMMAND_ROWS,
    )
});

/// Moves runs to their terminal status, clearing the lease's expiry and the active turn
/// (what else ending a run does is `lifecycle::finish_many`). Runs not in a state that
/// may move to their target (see `RunStatus::sources`) are left alone and not returned.
///
/// The run's event counter moves on in the same row update by the events its ending
/// appends: one for each open command and open request (closed as cancelled) and
/// `run.terminal`. Returned with each run, that count is exact because the caller holds
/// the run's lock, without which nothing opens or closes them. A run in `progress` (by
/// id) takes the lease's progress with it, its first turn's report included, also in
/// that one row version.
pub(crate) async fn mark_finished(
    tx: &impl GenericClient,
    finishes: &[Finish],
    progress: &HashMap<Uuid, LeaseProgress>,
) -> Result<Vec<(RunRecord, i64)>> {
    if finishes.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = tx.prepare_cached(&MARK_FINISHED_SQL).await?;
    let sources: Vec<String> = finishes
        .iter()
        .map(|f| {
            f.status
                .sources()
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let first_turns: Vec<Option<&(CommandStatus, Option<String>)>> = finishes
        .iter()
        .map(|f| progress.get(&f.run_id.0)?.first_turn.as_ref())
        .collect();
    let carried = |field: fn(&LeaseProgress) -> i64| -> Vec<Option<i64>> {
        finishes
            .iter()
            .map(|f| progress.get(&f.run_id.0).map(field))
            .collect()
    };
    let rows = tx
        .query(
            &stmt,
            &[
                &finishes.iter().map(|f| f.run_id.0).collect::<Vec<_>>(),
                &finishes
                    .iter()
                    .map(|f| f.status.as_str())
                    .collect::<Vec<_>>(),
                &finishes
                    .iter()
                    .map(|f| f.failure_kind.as_deref())
                    .collect::<Vec<_>>(),
                &finishes
                    .iter()
                    .map(|f| f.message.as_deref())
                    .collect::<Vec<_>>(),
                &sources,
                &carried(|p| p.lease_runner_seq),
                &carried(|p| p.event_bytes),
                &carried(|p| p.last_event_seq),
                &first_turns
                    .iter()
                    .map(|t| t.map(|(s, _)| s.as_str()))
                    .collect::<Vec<_>>(),
                &first_turns
                    .iter()
                    .map(|t| t.and_then(|(_, e)| e.as_deref()))
                    .collect::<Vec<_>>(),
            ],
        )
        .await?;
    rows.iter()
        .map(|row| Ok((RunRecord::from_row(row)?, row.get("events"))))
        .collect()
}

/// Why a run goes back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueReason {
    /// Its lease expired: counts as a failed attempt.
    LeaseExpired,
    /// The runner gave it back (drain): does not count.
    Released,
    /// The runner ended it while a turn it had not taken yet was queued (on its way to
    /// the runner, or not yet sent): the next holder runs that turn. Does not count.
    TurnQueued,
}

impl RequeueReason {
    /// As `run.requeued` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            RequeueReason::LeaseExpired => "lease_expired",
            RequeueReason::Released => "released",
            RequeueReason::TurnQueued => "turn_queued",
        }
    }
}

/// Moves active runs back to pending with their lease cleared (what else requeueing does
/// is `lifecycle::requeue_many`).
pub(crate) async fn mark_requeued(
    tx: &impl GenericClient,
    run_ids: &[RunId],
    reason: RequeueReason,
) -> Result<Vec<RunRecord>> {
    if run_ids.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE runs SET status = 'pending', attempt = attempt + $2, lease_runner_id = NULL,
                    lease_expires_at = NULL, lease_runner_seq = 0, run_deadline = NULL, active_turn_id = NULL,
                    updated_at = now()
             WHERE id = ANY($1) AND status = ANY($3)
             RETURNING *",
        )
        .await?;
    let ids: Vec<Uuid> = run_ids.iter().map(|r| r.0).collect();
    let attempt_step = i32::from(reason == RequeueReason::LeaseExpired);
    let sources: Vec<&str> = RunStatus::Pending
        .sources()
        .iter()
        .map(|s| s.as_str())
        .collect();
    let rows = tx.query(&stmt, &[&ids, &attempt_step, &sources]).await?;
    RunRecord::from_rows(&rows)
}

/// Flags an active run's cancellation as requested, with the caller's reason.
pub(crate) async fn flag_cancel(
    tx: &impl GenericClient,
    run_id: RunId,
    reason: Option<&str>,
) -> Result<()> {
    let flag = tx
        .prepare_cached(
            "UPDATE runs SET cancel_requested = true, cancel_reason = $2, updated_at = now()
             WHERE id = $1",
        )
        .await?;
    tx.execute(&flag, &[&run_id.0, &reason]).await?;
    Ok(())
}

/// Runs in one queue and non-terminal status.
#[derive(Debug, Clone)]
pub struct QueueDepth {
    pub queue: String,
    pub status: RunStatus,
    pub runs: i64,
}

/// One tenant's share of the queue.
#[derive(Debug, Clone)]
pub struct TenantStats {
    pub tenant_id: String,
    pub pending_runs: i64,
    /// Claimed, running or waiting.
    pub active_runs: i64,
    /// The limit claims obey (the tenant's own, else the default); 0 means none.
    pub max_active_runs: i32,
    /// How long its ended runs keep every delta (its own, else the default); 0: forever.
    pub event_retention_ms: i64,
}

#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    pub depths: Vec<QueueDepth>,
    /// Per queue: age of the oldest pending run, in milliseconds.
    pub oldest_pending_ms: Vec<(String, i64)>,
    /// Tenants with pending or active runs, by id.
    pub tenants: Vec<TenantStats>,
}

/// Whether some run is claimable: pending, its `scheduled_at` reached.
pub async fn any_claimable(client: &impl GenericClient) -> Result<bool> {
    let stmt = client
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'pending' AND held IS NULL
                              AND (scheduled_at IS NULL OR scheduled_at <= now()))",
        )
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// The runs not ended, read through the partial indexes that hold them (the claim
/// index for claimable runs, the held runs' index, the lease index for active ones): a
/// scan of `runs` filtered by a status array would read the whole history. The
/// conditions are literals so that even a generic plan proves the indexes' predicates;
/// a condition on the tenant is pushed down into every part.
const OPEN_RUNS: &str = "(SELECT * FROM runs WHERE status = 'pending' AND held IS NULL
                          UNION ALL
                          SELECT * FROM runs WHERE status = 'pending' AND held IS NOT NULL
                          UNION ALL
                          SELECT * FROM runs WHERE status IN ('claimed', 'running', 'waiting'))";

/// A run not ended, as a condition on a row (checked again on a row found through
/// [`OPEN_RUNS`], which may have ended since).
const NOT_ENDED: &str = "status IN ('pending', 'claimed', 'running', 'waiting')";

/// Depth by queue and status (non-terminal only), the oldest pending age per queue, and
/// per tenant its pending and active runs and its limit (`default_max_active_runs` for
/// tenants without one of their own; 0 means none). Reads only the open runs
/// ([`OPEN_RUNS`]), so a metrics scrape costs what the open work is, not the history.
pub async fn queue_stats(
    client: &impl GenericClient,
    default_max_active_runs: i32,
    default_event_retention_ms: i64,
) -> Result<QueueStats> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT queue, status, count(*),
                    (extract(epoch FROM now() - min(created_at)) * 1000)::bigint
             FROM {OPEN_RUNS} open
             GROUP BY queue, status ORDER BY queue, status"
        ))
        .await?;
    let mut stats = QueueStats::default();
    for row in client.query(&stmt, &[]).await? {
        let status = parse_state("run status", row.get(1), RunStatus::from_db)?;
        let queue: String = row.get(0);
        if status == RunStatus::Pending {
            stats.oldest_pending_ms.push((queue.clone(), row.get(3)));
        }
        stats.depths.push(QueueDepth {
            queue,
            status,
            runs: row.get(2),
        });
    }
    let by_tenant = client
        .prepare_cached(&format!(
            "SELECT r.tenant_id,
                    count(*) FILTER (WHERE r.status = 'pending'),
                    count(*) FILTER (WHERE r.status <> 'pending'),
                    coalesce(tl.max_active_runs, $1::int),
                    coalesce(tl.event_retention_ms, $2::bigint)
             FROM {OPEN_RUNS} r LEFT JOIN tenant_limits tl ON tl.tenant_id = r.tenant_id
             GROUP BY r.tenant_id, tl.max_active_runs, tl.event_retention_ms
             ORDER BY r.tenant_id"
        ))
        .await?;
    for row in client
        .query(
            &by_tenant,
            &[&default_max_active_runs, &default_event_retention_ms],
        )
        .await?
    {
        stats.tenants.push(TenantStats {
            tenant_id: row.get(0),
            pending_runs: row.get(1),
            active_runs: row.get(2),
            max_active_runs: row.get(3),
            event_retention_ms: row.get(4),
        });
    }
    Ok(stats)
}
