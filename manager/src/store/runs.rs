//! Runs: creation (idempotent, in bulk), reads, and the two transitions that other
//! modules share — ending runs ([`finish_many`]) and putting them back in the queue
//! ([`requeue_many`]). Claiming and fenced runner writes live in `leases`.

use std::time::SystemTime;

use agentrun_shared::error::reason;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::{RunId, RunnerId, SessionId};
use agentrun_shared::state::{CommandKind, CommandStatus, RunStatus};
use deadpool_postgres::{GenericClient, Pool};
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use super::events::{self, NewEvent};
use super::{Created, Tenant, commands, fingerprint, parse_state, sessions};
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
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
    pub claimed_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub scheduled_at: Option<SystemTime>,
    pub active_turn_id: Option<String>,
}

impl RunRecord {
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
        Ok(Self {
            id: RunId(row.get("id")),
            tenant_id: row.get("tenant_id"),
            project_id: row.get("project_id"),
            session_id: row.get::<_, Option<Uuid>>("session_id").map(SessionId),
            backend_profile: row.get("backend_profile"),
            queue: row.get("queue"),
            priority: row.get("priority"),
            labels: row.get("labels"),
            input: row.get("input"),
            metadata: row.get("metadata"),
            status: parse_state("run status", row.get("status"), RunStatus::from_db)?,
            attempt: row.get("attempt"),
            max_attempts: row.get("max_attempts"),
            queue_timeout_ms: row.get("queue_timeout_ms"),
            run_timeout_ms: row.get("run_timeout_ms"),
            idempotency_key: row.get("idempotency_key"),
            lease_runner_id: row.get::<_, Option<Uuid>>("lease_runner_id").map(RunnerId),
            lease_epoch: row.get("lease_epoch"),
            lease_expires_at: row.get("lease_expires_at"),
            lease_runner_seq: row.get("lease_runner_seq"),
            cancel_requested: row.get("cancel_requested"),
            cancel_reason: row.get("cancel_reason"),
            failure_kind: row.get("failure_kind"),
            failure_message: row.get("failure_message"),
            last_event_seq: row.get("last_event_seq"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
            claimed_at: row.get("claimed_at"),
            finished_at: row.get("finished_at"),
            scheduled_at: row.get("scheduled_at"),
            active_turn_id: row.get("active_turn_id"),
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
}

impl NewRun {
    /// The prompt of the first turn, if the input has one.
    fn first_prompt(&self) -> Option<&str> {
        self.input.get("prompt").and_then(Value::as_str)
    }

    fn fingerprint(&self) -> Vec<u8> {
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

/// Creates runs in one transaction: all are created (or found, for idempotent retries)
/// or none. A run whose input has a "prompt" gets it as its first `turn` command.
pub async fn create(
    pool: &Pool,
    tenant: &Tenant,
    new_runs: Vec<NewRun>,
) -> Result<Vec<Created<RunRecord>>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;

    for run in &new_runs {
        if let Some(session_id) = run.session_id {
            sessions::ensure(
                &tx,
                tenant,
                session_id,
                &run.project_id,
                &run.backend_profile,
            )
            .await?;
        }
    }

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

    let insert = tx
        .prepare_cached(
            "INSERT INTO runs (id, tenant_id, project_id, session_id, backend_profile, queue, priority,
                               labels, input, metadata, status, max_attempts, queue_timeout_ms,
                               run_timeout_ms, queue_deadline, idempotency_key, request_hash,
                               last_event_seq, last_command_seq, scheduled_at)
             SELECT r.id, $1, r.project_id, r.session_id, r.backend_profile, r.queue, r.priority,
                    ARRAY(SELECT jsonb_array_elements_text(r.labels)), r.input, r.metadata, 'pending',
                    r.max_attempts, r.queue_timeout_ms, r.run_timeout_ms,
                    greatest(now(), r.scheduled_at) + r.queue_timeout_ms * interval '1 millisecond',
                    r.idempotency_key, r.request_hash, r.event_count, r.command_count, r.scheduled_at
             FROM unnest($2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::text[], $7::int[],
                         $8::jsonb[], $9::jsonb[], $10::jsonb[], $11::int[], $12::bigint[],
                         $13::bigint[], $14::text[], $15::bytea[], $16::bigint[], $17::bigint[],
                         $18::timestamptz[])
                  AS r(id, project_id, session_id, backend_profile, queue, priority, labels, input,
                       metadata, max_attempts, queue_timeout_ms, run_timeout_ms, idempotency_key,
                       request_hash, event_count, command_count, scheduled_at)
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
            ],
        )
        .await?;
    let inserted = RunRecord::from_rows(&rows)?;

    // Runs not inserted hit an existing idempotency key: a retry if the request matches.
    let mut results = Vec::with_capacity(new_runs.len());
    let mut fresh_events = Vec::new();
    let mut first_turns = Vec::new();
    for (i, new_run) in new_runs.iter().enumerate() {
        if let Some(run) = inserted.iter().find(|r| r.id.0 == ids[i]) {
            let mut seq = 1;
            fresh_events.push((
                run.id,
                seq,
                NewEvent::manager(
                    EventType::RunCreated,
                    json!({"queue": run.queue, "backend_profile": run.backend_profile}),
                ),
            ));
            if let Some(prompt) = new_run.first_prompt() {
                seq += 1;
                let command = commands::NewCommand::first_turn(prompt);
                fresh_events.push((run.id, seq, command.created_event(1)));
                first_turns.push((run.id, command));
            }
            results.push(Created {
                value: run.clone(),
                created: true,
            });
        } else {
            let key = new_run.idempotency_key.as_deref().unwrap_or_default();
            let existing = find_by_idempotency_key(&tx, tenant, key).await?;
            if existing.1 != hashes[i] {
                return Err(Error::AlreadyExists {
                    reason: reason::IDEMPOTENCY_CONFLICT,
                    message: format!(
                        "idempotency_key {key:?} was used for a different run request"
                    ),
                });
            }
            results.push(Created {
                value: existing.0,
                created: false,
            });
        }
    }
    commands::insert_first_turns(&tx, &first_turns).await?;
    let in_sessions: Vec<Uuid> = inserted
        .iter()
        .filter(|r| r.session_id.is_some())
        .map(|r| r.id.0)
        .collect();
    sessions::touch_runs(&tx, &in_sessions).await?;
    events::insert_sequenced(&tx, &fresh_events).await?;
    tx.commit().await?;
    Ok(results)
}

async fn find_by_idempotency_key(
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

/// A run of the tenant.
pub async fn get(client: &impl GenericClient, tenant: &Tenant, run_id: RunId) -> Result<RunRecord> {
    let stmt = client
        .prepare_cached("SELECT * FROM runs WHERE id = $1 AND tenant_id = $2")
        .await?;
    let row = client
        .query_opt(&stmt, &[&run_id.0, &tenant.as_str()])
        .await?
        .ok_or(Error::NotFound { what: "run" })?;
    RunRecord::from_row(&row)
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
    /// Only runs older than this one (the page cursor).
    pub before: Option<RunId>,
    pub limit: i64,
}

/// Runs of the tenant, newest first (run ids are time-ordered).
pub async fn list(
    client: &impl GenericClient,
    tenant: &Tenant,
    filter: &RunFilter,
) -> Result<Vec<RunRecord>> {
    let stmt = client
        .prepare_cached(
            "SELECT * FROM runs
             WHERE tenant_id = $1
               AND (cardinality($2::text[]) = 0 OR status = ANY($2))
               AND ($3::text IS NULL OR queue = $3)
               AND ($4::uuid IS NULL OR session_id = $4)
               AND ($5::text IS NULL OR project_id = $5)
               AND ($6::uuid IS NULL OR id < $6)
             ORDER BY id DESC LIMIT $7",
        )
        .await?;
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    let rows = client
        .query(
            &stmt,
            &[
                &tenant.as_str(),
                &statuses,
                &filter.queue,
                &filter.session_id.map(|s| s.0),
                &filter.project_id,
                &filter.before.map(|r| r.0),
                &filter.limit,
            ],
        )
        .await?;
    RunRecord::from_rows(&rows)
}

/// Why and how a run ends.
#[derive(Debug, Clone)]
pub struct Finish {
    pub run_id: RunId,
    pub status: RunStatus,
    pub failure_kind: Option<String>,
    pub message: Option<String>,
}

/// Ends runs: the one place a run becomes terminal. Open commands are cancelled, open
/// requests closed as cancelled, and `run.terminal` is recorded. Runs not in a state that
/// may move to their target (see `RunStatus::sources`) are left alone and not returned.
/// The caller holds the rows' locks.
pub async fn finish_many(tx: &impl GenericClient, finishes: &[Finish]) -> Result<Vec<RunRecord>> {
    if finishes.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE runs SET status = f.status, failure_kind = f.failure_kind,
                    failure_message = f.message, finished_at = now(), updated_at = now(), active_turn_id = NULL,
                    lease_expires_at = NULL
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
                  AS f(id, status, failure_kind, message, sources)
             WHERE runs.id = f.id AND runs.status = ANY(string_to_array(f.sources, ','))
             RETURNING runs.*",
        )
        .await?;
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
            ],
        )
        .await?;
    let finished = RunRecord::from_rows(&rows)?;
    let ids: Vec<Uuid> = finished.iter().map(|r| r.id.0).collect();
    commands::cancel_open(tx, &ids, "run ended").await?;
    let close_requests = tx
        .prepare_cached(
            "UPDATE requests SET status = 'cancelled', resolved_at = now(),
                    resolution = '{\"decision\": \"cancel\", \"reason\": \"run ended\"}'
             WHERE run_id = ANY($1) AND status = 'open'",
        )
        .await?;
    tx.execute(&close_requests, &[&ids]).await?;
    sessions::touch_runs(tx, &ids).await?;
    let terminal: Vec<(RunId, NewEvent)> = finished
        .iter()
        .map(|run| {
            let payload = json!({
                "status": run.status.as_str(),
                "failure_kind": run.failure_kind,
                "message": run.failure_message,
                "attempt": run.attempt,
            });
            (run.id, NewEvent::manager(EventType::RunTerminal, payload))
        })
        .collect();
    events::append(tx, &terminal).await?;
    // `last_event_seq` moved on with the terminal event.
    Ok(finished
        .into_iter()
        .map(|mut run| {
            run.last_event_seq += 1;
            run
        })
        .collect())
}

/// Why a run goes back to the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeueReason {
    /// Its lease expired: counts as a failed attempt.
    LeaseExpired,
    /// The runner gave it back (drain): does not count.
    Released,
}

/// Puts active runs back in the queue with their lease cleared; delivered commands go
/// back to pending so the next runner gets them again. The caller holds the rows' locks.
pub async fn requeue_many(
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
    let requeued = RunRecord::from_rows(&rows)?;
    let requeued_ids: Vec<Uuid> = requeued.iter().map(|r| r.id.0).collect();
    commands::redeliver(tx, &requeued_ids).await?;
    let reason_text = match reason {
        RequeueReason::LeaseExpired => "lease_expired",
        RequeueReason::Released => "released",
    };
    let requeued_events: Vec<(RunId, NewEvent)> = requeued
        .iter()
        .map(|run| {
            let payload = json!({"reason": reason_text, "attempt": run.attempt});
            (run.id, NewEvent::manager(EventType::RunRequeued, payload))
        })
        .collect();
    events::append(tx, &requeued_events).await?;
    Ok(requeued)
}

/// CancelRun: requests cancellation (see [`cancel_locked`]) and returns the run as it is
/// afterwards. Idempotent: a run already cancelled, or being cancelled, is returned as is.
pub async fn cancel(
    pool: &Pool,
    tenant: &Tenant,
    run_id: RunId,
    payload: Map<String, Value>,
) -> Result<RunRecord> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let run = lock(&tx, tenant, run_id).await?;
    if run.status == RunStatus::Cancelled || run.cancel_requested {
        return Ok(run);
    }
    let command = commands::NewCommand {
        kind: CommandKind::Cancel,
        payload,
        delivery_policy: None,
        idempotency_key: None,
    };
    cancel_locked(&tx, &run, command).await?;
    let run = get(&tx, tenant, run_id).await?;
    tx.commit().await?;
    Ok(run)
}

/// Requests cancellation of a run the caller has locked. A pending run ends cancelled at
/// once; an active one is flagged and gets a `cancel` command for its runner. Returns the
/// `cancel` command that stands for the request (the existing one on a retry).
pub(crate) async fn cancel_locked(
    tx: &impl GenericClient,
    run: &RunRecord,
    command: commands::NewCommand,
) -> Result<Created<commands::CommandRecord>> {
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
        // Nobody holds the run: the manager carries the cancel out itself.
        let recorded = commands::insert(tx, run, command, CommandStatus::Completed).await?;
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
    let flag = tx
        .prepare_cached(
            "UPDATE runs SET cancel_requested = true, cancel_reason = $2, updated_at = now()
             WHERE id = $1",
        )
        .await?;
    tx.execute(&flag, &[&run.id.0, &reason_text]).await?;
    let recorded = commands::insert(tx, run, command, CommandStatus::Pending).await?;
    Ok(Created {
        value: recorded,
        created: true,
    })
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
            "SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'pending'
                              AND (scheduled_at IS NULL OR scheduled_at <= now()))",
        )
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}

/// Depth by queue and status (non-terminal only), the oldest pending age per queue, and
/// per tenant its pending and active runs and its limit (`default_max_active_runs` for
/// tenants without one of their own; 0 means none).
pub async fn queue_stats(
    client: &impl GenericClient,
    default_max_active_runs: i32,
) -> Result<QueueStats> {
    let stmt = client
        .prepare_cached(
            "SELECT queue, status, count(*),
                    (extract(epoch FROM now() - min(created_at)) * 1000)::bigint
             FROM runs WHERE status = ANY($1)
             GROUP BY queue, status ORDER BY queue, status",
        )
        .await?;
    let open: Vec<&str> = RunStatus::ALL
        .iter()
        .filter(|s| !s.is_terminal())
        .map(|s| s.as_str())
        .collect();
    let mut stats = QueueStats::default();
    for row in client.query(&stmt, &[&open]).await? {
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
        .prepare_cached(
            "SELECT r.tenant_id,
                    count(*) FILTER (WHERE r.status = 'pending'),
                    count(*) FILTER (WHERE r.status = ANY($1)),
                    coalesce(tl.max_active_runs, $2::int)
             FROM runs r LEFT JOIN tenant_limits tl ON tl.tenant_id = r.tenant_id
             WHERE r.status = ANY($3)
             GROUP BY r.tenant_id, tl.max_active_runs ORDER BY r.tenant_id",
        )
        .await?;
    let active: Vec<&str> = RunStatus::ACTIVE.iter().map(|s| s.as_str()).collect();
    for row in client
        .query(&by_tenant, &[&active, &default_max_active_runs, &open])
        .await?
    {
        stats.tenants.push(TenantStats {
            tenant_id: row.get(0),
            pending_runs: row.get(1),
            active_runs: row.get(2),
            max_active_runs: row.get(3),
        });
    }
    Ok(stats)
}
