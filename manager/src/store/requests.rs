//! Requests: open questions from a provider to a person — an approval or a user-input
//! form — and the one place their rows are written.
//!
//! A runner opens a request with a `request.opened` event; [`open`] stores it in the same
//! transaction as the event. It is closed exactly once:
//!
//! - `resolved` by a client ([`resolve`]): the first resolution wins, later calls get it
//!   back. The manager records `request.resolved` and queues a `resolve` command, so the
//!   answer (decision, a form's answers, a tool's value or error) reaches whichever
//!   runner holds the run, now or after a reclaim;
//! - `cancelled` when its turn ends ([`cancel_for_turns`]) or its run ends
//!   (`lifecycle::finish_many`), recorded as `request.resolved` (decision cancel, with
//!   the reason) so a client following events stops showing it;
//! - `expired` by the sweeper after its deadline ([`expire_due`]), which also tells the
//!   waiting provider with a `resolve` command whose decision is `expired`.
//!
//! Every write here happens under the run's row lock, taken before any request row, so
//! resolving, expiring and runner appends never deadlock and never interleave events.

use std::collections::HashSet;
use std::time::SystemTime;

use agentrun_shared::error::FieldError;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::{RequestId, RunId};
use agentrun_shared::state::{CommandKind, CommandStatus, RunStatus};
use deadpool_postgres::{GenericClient, Pool};
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use super::commands::{self, NewCommand};
use super::events::{self, NewEvent};
use super::runs::{self, RunRecord};
use super::{Tenant, parse_state};
use crate::error::{Error, Result};
use crate::store::events::PAGE_BYTES;

/// How long a request stays open when its `request.opened` names no `timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: i64 = 60 * 60 * 1000;

/// Lifecycle of a request: `open`, then closed exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    Open,
    Resolved,
    Cancelled,
    Expired,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Open => "open",
            RequestStatus::Resolved => "resolved",
            RequestStatus::Cancelled => "cancelled",
            RequestStatus::Expired => "expired",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "open" => Some(RequestStatus::Open),
            "resolved" => Some(RequestStatus::Resolved),
            "cancelled" => Some(RequestStatus::Cancelled),
            "expired" => Some(RequestStatus::Expired),
            _ => None,
        }
    }

    /// Parses a status a client names (`open`); `field` names the request field in the
    /// error.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldError> {
        Self::from_db(text).ok_or_else(|| {
            FieldError::new(field, "must be one of open, resolved, cancelled, expired")
        })
    }

    /// The states from which a request may move to `self`: only an open request closes,
    /// and a closed one never changes (the SQL says `WHERE status = 'open'`).
    pub fn sources(self) -> &'static [RequestStatus] {
        match self {
            RequestStatus::Open => &[],
            RequestStatus::Resolved | RequestStatus::Cancelled | RequestStatus::Expired => {
                &[RequestStatus::Open]
            }
        }
    }
}

/// The answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Accept,
    AcceptForSession,
    Decline,
    Cancel,
    /// Nobody answered before the deadline; only the sweeper decides this.
    Expired,
}

impl Decision {
    /// Decisions a client may give.
    pub const CLIENT: &'static [Decision] = &[
        Decision::Accept,
        Decision::AcceptForSession,
        Decision::Decline,
        Decision::Cancel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Accept => "accept",
            Decision::AcceptForSession => "accept_for_session",
            Decision::Decline => "decline",
            Decision::Cancel => "cancel",
            Decision::Expired => "expired",
        }
    }

    /// Parses a client's decision; `field` names the request field in the error.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldError> {
        if text.is_empty() {
            return Err(FieldError::new(field, "is required"));
        }
        Self::CLIENT
            .iter()
            .copied()
            .find(|d| d.as_str() == text)
            .ok_or_else(|| {
                let allowed: Vec<&str> = Self::CLIENT.iter().map(|d| d.as_str()).collect();
                FieldError::new(field, format!("must be one of {}", allowed.join(", ")))
            })
    }
}

/// A request as stored.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub id: RequestId,
    pub tenant_id: String,
    pub run_id: RunId,
    /// The turn that asked (the turn command's id), if a turn was active.
    pub turn_id: Option<String>,
    pub kind: String,
    pub detail: Value,
    pub options: Vec<String>,
    pub status: RequestStatus,
    pub resolution: Option<Value>,
    pub deadline: Option<SystemTime>,
    pub created_at: SystemTime,
    pub resolved_at: Option<SystemTime>,
}

impl RequestRecord {
    fn from_row(row: &Row) -> Result<Self> {
        let options: Value = row.get("options");
        Ok(Self {
            id: RequestId(row.get("id")),
            tenant_id: row.get("tenant_id"),
            run_id: RunId(row.get("run_id")),
            turn_id: row.get("turn_id"),
            kind: row.get("kind"),
            detail: row.get("detail"),
            options: options
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|o| o.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            status: parse_state("request status", row.get("status"), RequestStatus::from_db)?,
            resolution: row.get("resolution"),
            deadline: row.get("deadline"),
            created_at: row.get("created_at"),
            resolved_at: row.get("resolved_at"),
        })
    }
}

/// A request a runner opened, read from its `request.opened` payload (already checked
/// against the event rules at the edge).
#[derive(Debug, Clone)]
pub struct OpenedRequest {
    /// Where the payload came from, e.g. `events[3].payload_json`, for errors.
    pub field: String,
    pub id: RequestId,
    pub turn_id: Option<String>,
    pub kind: String,
    pub detail: Value,
    pub options: Value,
    pub timeout_ms: Option<i64>,
}

impl OpenedRequest {
    /// Reads a `request.opened` payload; `turn_id` is the turn active when it was written.
    /// Its detail and options are redacted like the event's copy: no secret reaches the
    /// `requests` table, nor clients reading it back.
    pub fn from_payload(field: String, payload: &Value, turn_id: Option<String>) -> Result<Self> {
        let text = |key: &str| payload.get(key).and_then(Value::as_str).unwrap_or_default();
        let redacted = |key: &str, default: Value| {
            let mut value = payload.get(key).cloned().unwrap_or(default);
            agentrun_shared::payload::redact(&mut value);
            value
        };
        let id = RequestId::parse(&format!("{field}.request_id"), text("request_id"))?;
        Ok(Self {
            id,
            turn_id,
            kind: text("kind").to_owned(),
            detail: redacted("detail", json!({})),
            options: redacted("options", json!([])),
            timeout_ms: payload.get("timeout_ms").and_then(Value::as_i64),
            field,
        })
    }
}

/// Filters for [`list`].
#[derive(Debug, Clone)]
pub struct RequestFilter {
    /// Only requests of this run.
    pub run_id: Option<RunId>,
    /// Only requests in one of these statuses (never empty).
    pub statuses: Vec<RequestStatus>,
    /// Only requests of runs in these projects; empty: every project.
    pub projects: Vec<String>,
    /// Only requests older than this one, in listing order (the page cursor).
    pub before: Option<Cursor>,
    pub limit: i64,
}

/// Where a page of [`list`] resumes: the last request listed, by its place in the
/// order (`created_at`, then id, both descending).
#[derive(Debug, Clone, Copy)]
pub struct Cursor {
    pub created_at: SystemTime,
    pub id: RequestId,
}

/// The cursor of a request of the tenant, `None` when the tenant has no such request.
pub async fn cursor(
    client: &impl GenericClient,
    tenant: &Tenant,
    request_id: RequestId,
) -> Result<Option<Cursor>> {
    let stmt = client
        .prepare_cached("SELECT created_at FROM requests WHERE tenant_id = $1 AND id = $2")
        .await?;
    let row = client
        .query_opt(&stmt, &[&tenant.as_str(), &request_id.0])
        .await?;
    Ok(row.map(|row| Cursor {
        created_at: row.get(0),
        id: request_id,
    }))
}

/// Requests of the tenant, newest first (`created_at`, ties by id; request ids are
/// random, so unlike runs they do not order by themselves). The index
/// `requests_inbox` serves it.
pub async fn list(
    client: &impl GenericClient,
    tenant: &Tenant,
    filter: &RequestFilter,
) -> Result<RequestPage> {
    // Cut in the database at PAGE_BYTES of detail and resolution, as event pages are: a
    // page of large requests is never fetched whole only to be refused.
    let stmt = client
        .prepare_cached(
            "SELECT * FROM (
               SELECT p.*,
                      sum(p.bytes) OVER (ORDER BY p.created_at DESC, p.id DESC) - p.bytes
                          AS bytes_before,
                      count(*) OVER () AS fetched
               FROM (SELECT r.*,
                            octet_length(r.detail::text)
                            + coalesce(octet_length(r.resolution::text), 0) AS bytes
                     FROM requests r
                     WHERE tenant_id = $1
                       AND status = ANY($2)
                       AND ($3::uuid IS NULL OR run_id = $3)
                       AND (cardinality($4::text[]) = 0
                            OR run_id IN (SELECT id FROM runs
                                          WHERE tenant_id = $1 AND project_id = ANY($4)))
                       AND ($5::timestamptz IS NULL OR (created_at, id) < ($5, $6::uuid))
                     ORDER BY created_at DESC, id DESC LIMIT $7) p) page
             WHERE bytes_before < $8
             ORDER BY created_at DESC, id DESC",
        )
        .await?;
    let statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
    let rows = client
        .query(
            &stmt,
            &[
                &tenant.as_str(),
                &statuses,
                &filter.run_id.map(|r| r.0),
                &filter.projects,
                &filter.before.map(|c| c.created_at),
                &filter.before.map(|c| c.id.0),
                &filter.limit,
                &PAGE_BYTES,
            ],
        )
        .await?;
    let fetched: i64 = rows.first().map_or(0, |r| r.get("fetched"));
    Ok(RequestPage {
        more: rows.len() as i64 == filter.limit || (rows.len() as i64) < fetched,
        requests: rows
            .iter()
            .map(RequestRecord::from_row)
            .collect::<Result<_>>()?,
    })
}

/// A page of [`list`].
pub struct RequestPage {
    pub requests: Vec<RequestRecord>,
    /// More may follow: the page is full, or was cut at [`PAGE_BYTES`].
    pub more: bool,
}

/// Stores the requests a runner opened on `run`, each with the run's tenant, its turn and
/// a deadline (`timeout_ms`, or [`DEFAULT_TIMEOUT_MS`]). Reopening an id this run already
/// has is a no-op (a provider re-executing a turn may ask again); an id another run
/// holds is refused. The caller holds the run's row lock.
pub(crate) async fn open(
    tx: &impl GenericClient,
    run: &RunRecord,
    opened: &[OpenedRequest],
) -> Result<()> {
    if opened.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO requests (id, tenant_id, run_id, turn_id, kind, detail, options, status, deadline)
             SELECT o.id, $1, $2, o.turn_id, o.kind, o.detail, o.options, 'open',
                    now() + coalesce(o.timeout_ms, $3) * interval '1 millisecond'
             FROM unnest($4::uuid[], $5::text[], $6::text[], $7::jsonb[], $8::jsonb[], $9::bigint[])
                  AS o(id, turn_id, kind, detail, options, timeout_ms)
             ON CONFLICT (tenant_id, id) DO NOTHING
             RETURNING id",
        )
        .await?;
    let ids: Vec<Uuid> = opened.iter().map(|o| o.id.0).collect();
    let inserted = tx
        .query(
            &stmt,
            &[
                &run.tenant_id,
                &run.id.0,
                &DEFAULT_TIMEOUT_MS,
                &ids,
                &opened
                    .iter()
                    .map(|o| o.turn_id.as_deref())
                    .collect::<Vec<_>>(),
                &opened.iter().map(|o| o.kind.as_str()).collect::<Vec<_>>(),
                &opened.iter().map(|o| o.detail.clone()).collect::<Vec<_>>(),
                &opened.iter().map(|o| o.options.clone()).collect::<Vec<_>>(),
                &opened.iter().map(|o| o.timeout_ms).collect::<Vec<_>>(),
            ],
        )
        .await?;
    if inserted.len() == opened.len() {
        return Ok(());
    }
    let taken = tx
        .prepare_cached(
            "SELECT id FROM requests WHERE tenant_id = $3 AND id = ANY($1) AND run_id <> $2",
        )
        .await?;
    let rows = tx.query(&taken, &[&ids, &run.id.0, &run.tenant_id]).await?;
    if let Some(row) = rows.first() {
        let id: Uuid = row.get(0);
        let field = opened
            .iter()
            .find(|o| o.id.0 == id)
            .map_or("request_id", |o| o.field.as_str());
        return Err(Error::invalid(
            format!("{field}.request_id"),
            "is already the id of another run's request",
        ));
    }
    Ok(())
}

/// Closes the open requests of turns that ended, `(run, turn)`, as `cancelled`, and
/// returns them: the caller records their `request.resolved` ([`resolved_event`]) in the
/// same transaction, so a client following events sees the question go away. The
/// caller holds the runs' row locks.
pub(crate) async fn cancel_for_turns(
    tx: &impl GenericClient,
    ended_turns: &[(Uuid, String)],
) -> Result<Vec<RequestRecord>> {
    if ended_turns.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE requests SET status = 'cancelled', resolved_at = now(),
                    resolution = '{\"decision\": \"cancel\", \"reason\": \"turn ended\"}'
             FROM unnest($1::uuid[], $2::text[]) AS t(run_id, turn_id)
             WHERE requests.run_id = t.run_id AND requests.turn_id = t.turn_id
               AND requests.status = 'open'
             RETURNING requests.*",
        )
        .await?;
    let (runs, turns): (Vec<Uuid>, Vec<&str>) =
        ended_turns.iter().map(|(r, t)| (*r, t.as_str())).unzip();
    closed(tx.query(&stmt, &[&runs, &turns]).await?)
}

/// Closes the open requests of runs that ended, as cancelled, and returns them (the
/// caller records their `request.resolved`).
pub(crate) async fn cancel_for_runs(
    tx: &impl GenericClient,
    run_ids: &[Uuid],
) -> Result<Vec<RequestRecord>> {
    if run_ids.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = tx
        .prepare_cached(
            "UPDATE requests SET status = 'cancelled', resolved_at = now(),
                    resolution = '{\"decision\": \"cancel\", \"reason\": \"run ended\"}'
             WHERE run_id = ANY($1) AND status = 'open'
             RETURNING *",
        )
        .await?;
    closed(tx.query(&stmt, &[&run_ids]).await?)
}

/// Requests just closed, in the order they were opened per run.
fn closed(rows: Vec<Row>) -> Result<Vec<RequestRecord>> {
    let mut closed: Vec<RequestRecord> = rows
        .iter()
        .map(RequestRecord::from_row)
        .collect::<Result<_>>()?;
    closed.sort_by_key(|r| (r.run_id, r.created_at, r.id.0));
    Ok(closed)
}

/// The `request.resolved` event of a request closed by the manager (its turn or run
/// ended), from its stored resolution.
pub(crate) fn resolved_event(request: &RequestRecord) -> (RunId, NewEvent) {
    let resolution = request.resolution.clone().unwrap_or(Value::Null);
    (
        request.run_id,
        NewEvent::manager(
            EventType::RequestResolved,
            answer_payload(request.id, &resolution),
        ),
    )
}

/// Which of `run_ids` have an open request.
pub(crate) async fn with_open(tx: &impl GenericClient, run_ids: &[Uuid]) -> Result<HashSet<Uuid>> {
    if run_ids.is_empty() {
        return Ok(HashSet::new());
    }
    let stmt = tx
        .prepare_cached(
            "SELECT DISTINCT run_id FROM requests WHERE run_id = ANY($1) AND status = 'open'",
        )
        .await?;
    let rows = tx.query(&stmt, &[&run_ids]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Moves waiting runs with no open request left back to running. The caller holds the
/// runs' row locks.
async fn resume_unblocked(tx: &impl GenericClient, run_ids: &[Uuid]) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE runs SET status = 'running', updated_at = now()
             WHERE id = ANY($1) AND status = 'waiting'
               AND NOT EXISTS (SELECT 1 FROM requests q WHERE q.run_id = runs.id AND q.status = 'open')",
        )
        .await?;
    tx.execute(&stmt, &[&run_ids]).await?;
    Ok(())
}

/// A client's answer to a request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub decision: Decision,
    /// For user-input requests: the answers, as a JSON object.
    pub answers: Option<Map<String, Value>>,
    /// What an external tool returned (any JSON value).
    pub value: Option<Value>,
    /// How an external tool failed.
    pub error: Option<String>,
}

impl Answer {
    fn resolution(&self) -> Value {
        let mut resolution = json!({"decision": self.decision.as_str()});
        if let Some(answers) = &self.answers {
            resolution["answers"] = Value::Object(answers.clone());
        }
        if let Some(value) = &self.value {
            resolution["value"] = value.clone();
        }
        if let Some(error) = &self.error {
            resolution["error"] = Value::String(error.clone());
        }
        resolution
    }
}

/// What [`resolve`] found or did.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub request: RequestRecord,
    /// False when the request had been closed before (resolved, cancelled or expired:
    /// its first resolution is kept).
    pub resolved_now: bool,
}

/// The `request.resolved` event and the `resolve` command payload for a resolution:
/// `request_id` and `decision`, then `answers`, `value` and `error` (null when the
/// resolution has none), and `reason` when the manager closed the request itself.
fn answer_payload(request_id: RequestId, resolution: &Value) -> Value {
    let field = |key: &str| resolution.get(key).cloned().unwrap_or(Value::Null);
    let mut payload = json!({
        "request_id": request_id.to_string(),
        "decision": field("decision"),
        "answers": field("answers"),
        "value": field("value"),
        "error": field("error"),
    });
    if let Some(reason) = resolution.get("reason") {
        payload["reason"] = reason.clone();
    }
    payload
}

/// ResolveRequest: answers an open request of a run of the tenant, in one transaction.
/// The first resolution wins: a request already closed — resolved, cancelled with its
/// turn or run, or expired — is returned as it is, with `resolved_now` false, and its
/// stored resolution says how it ended.
/// Resolving records `request.resolved` (as the manager), moves the run from waiting to
/// running if nothing else is open, and queues a `resolve` command for the runner —
/// the caller wakes its stream after commit.
pub async fn resolve(
    pool: &Pool,
    tenant: &Tenant,
    run_id: RunId,
    request_id: RequestId,
    answer: Answer,
) -> Result<Resolved> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let run = runs::lock(&tx, tenant, run_id).await?;
    let resolution = answer.resolution();
    let update = tx
        .prepare_cached(
            "UPDATE requests SET status = 'resolved', resolution = $3, resolved_at = now()
             WHERE id = $1 AND run_id = $2 AND status = 'open'
             RETURNING *",
        )
        .await?;
    let Some(row) = tx
        .query_opt(&update, &[&request_id.0, &run_id.0, &resolution])
        .await?
    else {
        let request = get_locked(&tx, run_id, request_id).await?;
        if request.status == RequestStatus::Open {
            return Err(Error::Internal("an open request was not resolved".into()));
        }
        return Ok(Resolved {
            request,
            resolved_now: false,
        });
    };
    let request = RequestRecord::from_row(&row)?;
    let payload = answer_payload(request_id, &resolution);
    events::append(
        &tx,
        &[(
            run_id,
            NewEvent::manager(EventType::RequestResolved, payload.clone()),
        )],
    )
    .await?;
    if run.status == RunStatus::Waiting {
        resume_unblocked(&tx, &[run_id.0]).await?;
    }
    let command = resolve_command(payload);
    commands::insert(&tx, run.id, command, CommandStatus::Pending).await?;
    tx.commit().await?;
    Ok(Resolved {
        request,
        resolved_now: true,
    })
}

fn resolve_command(payload: Value) -> NewCommand {
    NewCommand {
        kind: CommandKind::Resolve,
        payload: match payload {
            Value::Object(map) => map,
            _ => Map::new(),
        },
        delivery_policy: None,
        idempotency_key: None,
    }
}

/// A request of a run the caller has locked.
async fn get_locked(
    tx: &impl GenericClient,
    run_id: RunId,
    request_id: RequestId,
) -> Result<RequestRecord> {
    let stmt = tx
        .prepare_cached("SELECT * FROM requests WHERE id = $1 AND run_id = $2")
        .await?;
    let row = tx
        .query_opt(&stmt, &[&request_id.0, &run_id.0])
        .await?
        .ok_or(Error::NotFound { what: "request" })?;
    RequestRecord::from_row(&row)
}

/// Expires open requests whose deadline passed, for up to `batch` runs, in one
/// transaction. The runs are locked first (`FOR UPDATE SKIP LOCKED`, so replicas split
/// the work and a run being written to is left for the next pass); each expired request
/// gets `request.resolved {decision: expired}` and a `resolve` command with that
/// decision, so a provider waiting for the answer stops waiting. Returns the runs that
/// got commands (to wake their runners) and how many requests expired.
pub async fn expire_due(pool: &Pool, batch: i64) -> Result<(Vec<RunId>, usize)> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let lock = tx
        .prepare_cached(
            "SELECT * FROM runs
             WHERE id IN (SELECT run_id FROM requests
                          WHERE status = 'open' AND deadline < now()
                          GROUP BY run_id ORDER BY min(deadline) LIMIT $1)
             FOR UPDATE SKIP LOCKED",
        )
        .await?;
    let locked: Vec<RunRecord> = tx
        .query(&lock, &[&batch])
        .await?
        .iter()
        .map(RunRecord::from_row)
        .collect::<Result<_>>()?;
    if locked.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let ids: Vec<Uuid> = locked.iter().map(|r| r.id.0).collect();
    let expire = tx
        .prepare_cached(
            "UPDATE requests SET status = 'expired', resolved_at = now(),
                    resolution = '{\"decision\": \"expired\"}'
             WHERE run_id = ANY($1) AND status = 'open' AND deadline < now()
             RETURNING *",
        )
        .await?;
    let mut expired: Vec<RequestRecord> = tx
        .query(&expire, &[&ids])
        .await?
        .iter()
        .map(RequestRecord::from_row)
        .collect::<Result<_>>()?;
    expired.sort_by_key(|r| (r.run_id, r.deadline, r.created_at));

    // A run that has ended keeps its log closed after run.terminal (its requests were
    // cancelled when it ended, so this is only a safety net).
    let live: Vec<&RequestRecord> = expired
        .iter()
        .filter(|r| {
            locked
                .iter()
                .any(|run| run.id == r.run_id && !run.status.is_terminal())
        })
        .collect();
    let expired_answer = json!({"decision": Decision::Expired.as_str()});
    let resolved_events: Vec<(RunId, NewEvent)> = live
        .iter()
        .map(|r| {
            let payload = answer_payload(r.id, &expired_answer);
            (
                r.run_id,
                NewEvent::manager(EventType::RequestResolved, payload),
            )
        })
        .collect();
    events::append(&tx, &resolved_events).await?;
    resume_unblocked(&tx, &ids).await?;
    let mut woken: Vec<RunId> = Vec::new();
    for request in &live {
        let run = locked
            .iter()
            .find(|run| run.id == request.run_id)
            .ok_or_else(|| Error::Internal("expired a request of a run not locked".into()))?;
        commands::insert(
            &tx,
            run.id,
            resolve_command(answer_payload(request.id, &expired_answer)),
            CommandStatus::Pending,
        )
        .await?;
        if !woken.contains(&run.id) {
            woken.push(run.id);
        }
    }
    tx.commit().await?;
    Ok((woken, expired.len()))
}

/// Requests open across all runs and tenants (the metric), from the partial index of
/// open requests.
pub async fn count_open(client: &impl GenericClient) -> Result<i64> {
    let stmt = client
        .prepare_cached("SELECT count(*) FROM requests WHERE status = 'open'")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.get(0))
}
