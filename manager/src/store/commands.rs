//! Commands: the per-run ordered inbox of turn / steer / interrupt / cancel / resolve.
//!
//! `seq` comes from `runs.last_command_seq`, advanced under the run's row lock. An
//! idempotency key is unique per run; reusing it with another payload is refused.
//!
//! A run's first turn (seq 1, its input's prompt) is carried by the run's own row
//! (`runs.first_turn_*`, migration V28): the run row is written at each step anyway,
//! and a command row of its own cost every run an insert and two row versions more.
//! Reads go through the `run_commands` view, which shows it as a command; each write
//! here updates whichever row holds the command.

use std::sync::LazyLock;
use std::time::SystemTime;

use agentrun_shared::events::EventType;
use agentrun_shared::ids::{CommandId, RunId};
use agentrun_shared::state::{CommandKind, CommandStatus, TurnDeliveryPolicy};
use deadpool_postgres::GenericClient;
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use super::events::{self, NewEvent};
use super::{fingerprint, parse_state};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct CommandRecord {
    pub id: CommandId,
    pub run_id: RunId,
    pub seq: i64,
    pub kind: CommandKind,
    pub payload: Value,
    pub status: CommandStatus,
    pub delivery_policy: Option<TurnDeliveryPolicy>,
    pub idempotency_key: Option<String>,
    pub error: Option<String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

impl CommandRecord {
    fn from_row(row: &Row) -> Result<Self> {
        Ok(Self {
            id: CommandId(row.get("id")),
            run_id: RunId(row.get("run_id")),
            seq: row.get("seq"),
            kind: parse_state("command kind", row.get("kind"), CommandKind::from_db)?,
            payload: row.get("payload"),
            status: parse_state("command status", row.get("status"), CommandStatus::from_db)?,
            delivery_policy: row
                .get::<_, Option<&str>>("delivery_policy")
                .map(|p| parse_state("delivery policy", p, TurnDeliveryPolicy::from_db))
                .transpose()?,
            idempotency_key: row.get("idempotency_key"),
            error: row.get("error"),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
        })
    }

    fn from_rows(rows: &[Row]) -> Result<Vec<Self>> {
        rows.iter().map(Self::from_row).collect()
    }

    /// The first turn a row of `runs` carries (migration V28), as `run_commands` shows
    /// it (the Rust twin of [`FIRST_TURN_COLUMNS`], which it must match); `None` when the
    /// row carries none. A statement that returns `runs.*` has it without reading
    /// `run_commands`.
    pub(crate) fn first_turn_of_run_row(row: &Row) -> Result<Option<Self>> {
        let Some(id) = row.get::<_, Option<Uuid>>("first_turn_id") else {
            return Ok(None);
        };
        let input: Value = row.get("input");
        Ok(Some(Self {
            id: CommandId(id),
            run_id: RunId(row.get("id")),
            seq: 1,
            kind: CommandKind::Turn,
            payload: json!({ "prompt": input.get("prompt") }),
            status: parse_state(
                "command status",
                row.get("first_turn_status"),
                CommandStatus::from_db,
            )?,
            delivery_policy: Some(TurnDeliveryPolicy::Queue),
            idempotency_key: None,
            error: row.get("first_turn_error"),
            created_at: row.get("created_at"),
            updated_at: row.get("first_turn_updated_at"),
        }))
    }
}

/// Payload key naming the turn a steer or interrupt is aimed at; the manager checks it
/// against the run's active turn, and the runner against the turn it is executing.
pub const EXPECTED_TURN_ID: &str = "expected_turn_id";

/// A validated SendCommand request.
#[derive(Debug, Clone)]
pub struct NewCommand {
    pub kind: CommandKind,
    pub payload: Map<String, Value>,
    /// Only for turns.
    pub delivery_policy: Option<TurnDeliveryPolicy>,
    pub idempotency_key: Option<String>,
}

impl NewCommand {
    /// The turn that a run's input prompt starts.
    pub fn first_turn(prompt: &str) -> Self {
        let mut payload = Map::new();
        payload.insert("prompt".into(), Value::String(prompt.to_owned()));
        Self {
            kind: CommandKind::Turn,
            payload,
            delivery_policy: Some(TurnDeliveryPolicy::Queue),
            idempotency_key: None,
        }
    }

    pub(crate) fn fingerprint(&self) -> Vec<u8> {
        fingerprint(&json!([
            self.kind.as_str(),
            self.payload,
            self.delivery_policy.map(TurnDeliveryPolicy::as_str)
        ]))
    }

    /// The `command.created` event for this command at `seq`.
    pub(crate) fn created_event(&self, seq: i64) -> NewEvent {
        NewEvent::manager(
            EventType::CommandCreated,
            json!({"seq": seq, "kind": self.kind.as_str(), "payload": self.payload}),
        )
    }
}

/// The command of a run that took idempotency `key`, with its payload hash (a first
/// turn has no key, so the command is a row of `commands`).
pub(crate) async fn find_by_idempotency_key(
    tx: &impl GenericClient,
    run_id: RunId,
    key: &str,
) -> Result<Option<(CommandRecord, Vec<u8>)>> {
    let stmt = tx
        .prepare_cached("SELECT * FROM commands WHERE run_id = $1 AND idempotency_key = $2")
        .await?;
    tx.query_opt(&stmt, &[&run_id.0, &key])
        .await?
        .map(|row| Ok((CommandRecord::from_row(&row)?, row.get("payload_hash"))))
        .transpose()
}

/// The open statuses ([`CommandStatus::OPEN`]) as an SQL list, for `status IN (...)`.
pub(crate) static OPEN_STATUSES: LazyLock<String> = LazyLock::new(|| sql_list(CommandStatus::OPEN));

/// Statuses as an SQL list of constants. Written into a statement rather than passed as a
/// parameter, so that the planner can tell the open commands' partial index
/// (`commands_open`) applies, also in a generic plan: a parameter leaves it reading every
/// command of the run.
fn sql_list(statuses: &[CommandStatus]) -> String {
    let quoted: Vec<String> = statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    quoted.join(", ")
}

/// A command row's columns, as `run_commands` has them ([`CommandRecord::from_row`]).
const COMMAND_COLUMNS: &str = "run_id, seq, id, kind, payload, status, delivery_policy,
    idempotency_key, error, created_at, updated_at";

/// [`COMMAND_COLUMNS`] of a run's first turn, from the run row that carries it, for the
/// `RETURNING` of a write to it (a statement's reads do not see its own writes): the
/// second half of the `run_commands` view (migration V28), which it must match (as must
/// [`CommandRecord::first_turn_of_run_row`]).
const FIRST_TURN_COLUMNS: &str = "id AS run_id, 1::bigint AS seq, first_turn_id AS id,
    'turn'::text AS kind, jsonb_build_object('prompt', input -> 'prompt') AS payload,
    first_turn_status AS status, 'queue'::text AS delivery_policy,
    NULL::text AS idempotency_key, first_turn_error AS error, created_at,
    first_turn_updated_at AS updated_at";

/// Whether a turn of the run is pending, delivered or acknowledged.
pub(crate) async fn has_open_turn(tx: &impl GenericClient, run_id: RunId) -> Result<bool> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT EXISTS (SELECT 1 FROM run_commands
                            WHERE run_id = $1 AND kind = 'turn' AND status IN ({}))",
            *OPEN_STATUSES
        )
    });
    let stmt = tx.prepare_cached(&SQL).await?;
    Ok(tx.query_one(&stmt, &[&run_id.0]).await?.get(0))
}

/// Inserts one command at the run's next seq, with its `command.created` event. The
/// caller holds the run's row lock.
pub(crate) async fn insert(
    tx: &impl GenericClient,
    run_id: RunId,
    command: NewCommand,
    status: CommandStatus,
) -> Result<CommandRecord> {
    let next_seq = tx
        .prepare_cached("UPDATE runs SET last_command_seq = last_command_seq + 1 WHERE id = $1 RETURNING last_command_seq")
        .await?;
    let seq: i64 = tx.query_one(&next_seq, &[&run_id.0]).await?.get(0);
    let stmt = tx
        .prepare_cached(
            "INSERT INTO commands (run_id, seq, id, kind, payload, status, delivery_policy,
                                   idempotency_key, payload_hash)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             RETURNING *",
        )
        .await?;
    let row = tx
        .query_one(
            &stmt,
            &[
                &run_id.0,
                &seq,
                &CommandId::new().0,
                &command.kind.as_str(),
                &Value::Object(command.payload.clone()),
                &status.as_str(),
                &command.delivery_policy.map(TurnDeliveryPolicy::as_str),
                &command.idempotency_key,
                &command.fingerprint(),
            ],
        )
        .await?;
    events::append(tx, &[(run_id, command.created_event(seq))]).await?;
    CommandRecord::from_row(&row)
}

/// The newest command of `kind` for a run.
pub(crate) async fn latest_of_kind(
    tx: &impl GenericClient,
    run_id: RunId,
    kind: CommandKind,
) -> Result<Option<CommandRecord>> {
    let stmt = tx
        .prepare_cached(
            "SELECT * FROM run_commands WHERE run_id = $1 AND kind = $2 ORDER BY seq DESC LIMIT 1",
        )
        .await?;
    tx.query_opt(&stmt, &[&run_id.0, &kind.as_str()])
        .await?
        .map(|row| CommandRecord::from_row(&row))
        .transpose()
}

/// Commands of a run with `seq > after_seq` (`lifecycle::list_commands` checks the
/// caller's tenant).
pub(crate) async fn list(
    client: &impl GenericClient,
    run_id: RunId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<CommandRecord>> {
    let stmt = client
        .prepare_cached(
            "SELECT * FROM run_commands WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .await?;
    CommandRecord::from_rows(
        &client
            .query(&stmt, &[&run_id.0, &after_seq, &limit])
            .await?,
    )
}

/// Marks pending commands delivered, in seq order per run: the first turns of
/// `first_turns` (carried by their rows) and the commands in `commands` of
/// `with_command_rows` (see `runs::HAS_COMMAND_ROWS`); the caller records
/// `command.delivered`. The caller holds the runs' row locks.
pub(crate) async fn deliver_pending(
    tx: &impl GenericClient,
    first_turns: &[Uuid],
    with_command_rows: &[Uuid],
) -> Result<Vec<CommandRecord>> {
    if first_turns.is_empty() && with_command_rows.is_empty() {
        return Ok(Vec::new());
    }
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH first_turns AS (
                 UPDATE runs SET first_turn_status = 'delivered', first_turn_updated_at = now()
                 WHERE id = ANY($1) AND first_turn_status = 'pending'
                 RETURNING {FIRST_TURN_COLUMNS}
             ),
             others AS (
                 UPDATE commands SET status = 'delivered', updated_at = now()
                 WHERE run_id = ANY($2) AND status = 'pending'
                 RETURNING {COMMAND_COLUMNS}
             )
             SELECT * FROM first_turns UNION ALL SELECT * FROM others"
        )
    });
    let stmt = tx.prepare_cached(&SQL).await?;
    let rows = tx.query(&stmt, &[&first_turns, &with_command_rows]).await?;
    let mut delivered = CommandRecord::from_rows(&rows)?;
    delivered.sort_by_key(|c| (c.run_id, c.seq));
    Ok(delivered)
}

/// The `command.delivered` event of a command just delivered; the caller appends it.
pub(crate) fn delivered_event(command: &CommandRecord) -> (RunId, NewEvent) {
    let payload = json!({"command_id": command.id.to_string(), "seq": command.seq, "kind": command.kind.as_str()});
    (
        command.run_id,
        NewEvent::manager(EventType::CommandDelivered, payload),
    )
}

/// A runner's report on a command of the run it holds.
#[derive(Debug, Clone)]
pub struct CommandUpdate {
    pub command_id: CommandId,
    pub status: CommandStatus,
    pub error: Option<String>,
}

/// Stores runner reports, each on a command of the run named with it, already checked
/// against the commands' current status (see `leases::write`), in one statement; of
/// several reports on one command the last wins.
pub(crate) async fn store_updates(
    tx: &impl GenericClient,
    updates: &[(RunId, CommandUpdate)],
) -> Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut seen = std::collections::HashSet::new();
    let last: Vec<&(RunId, CommandUpdate)> = updates
        .iter()
        .rev()
        .filter(|(_, u)| seen.insert(u.command_id))
        .collect();
    let stmt = tx
        .prepare_cached(
            "WITH u AS (
                 SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[])
                     AS u(run_id, id, status, error)
             ),
             first_turns AS (
                 UPDATE runs SET first_turn_status = u.status, first_turn_error = u.error,
                                 first_turn_updated_at = now()
                 FROM u WHERE runs.id = u.run_id AND runs.first_turn_id = u.id
             )
             UPDATE commands SET status = u.status, error = u.error, updated_at = now()
             FROM u WHERE commands.run_id = u.run_id AND commands.id = u.id",
        )
        .await?;
    let run_ids: Vec<Uuid> = last.iter().map(|(run, _)| run.0).collect();
    let ids: Vec<Uuid> = last.iter().map(|(_, u)| u.command_id.0).collect();
    let statuses: Vec<&str> = last.iter().map(|(_, u)| u.status.as_str()).collect();
    let errors: Vec<Option<&str>> = last.iter().map(|(_, u)| u.error.as_deref()).collect();
    tx.execute(&stmt, &[&run_ids, &ids, &statuses, &errors])
        .await?;
    Ok(())
}

/// Cancels the open commands of runs that ended and returns them; the caller records
/// their `command.completed` ([`closed_event`]) in the same transaction.
pub(crate) async fn cancel_open(
    tx: &impl GenericClient,
    run_ids: &[Uuid],
    why: &str,
) -> Result<Vec<CommandRecord>> {
    if run_ids.is_empty() {
        return Ok(Vec::new());
    }
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH first_turns AS (
                 UPDATE runs SET first_turn_status = 'cancelled', first_turn_error = $2,
                                 first_turn_updated_at = now()
                 WHERE id = ANY($1) AND first_turn_status IN ({open})
                 RETURNING {FIRST_TURN_COLUMNS}
             ),
             others AS (
                 UPDATE commands SET status = 'cancelled', error = $2, updated_at = now()
                 WHERE run_id = ANY($1) AND status IN ({open})
                 RETURNING {COMMAND_COLUMNS}
             )
             SELECT * FROM first_turns UNION ALL SELECT * FROM others",
            open = *OPEN_STATUSES
        )
    });
    let stmt = tx.prepare_cached(&SQL).await?;
    let mut cancelled = CommandRecord::from_rows(&tx.query(&stmt, &[&run_ids, &why]).await?)?;
    cancelled.sort_by_key(|c| (c.run_id, c.seq));
    Ok(cancelled)
}

/// Why a command withdrawn with CancelCommand was cancelled (its `error`).
pub const WITHDRAWN: &str = "withdrawn before delivery";

/// Cancels a command of a run the caller has locked if, and only if, it is still
/// pending: the guard is in the SQL, so a delivery racing with it cannot slip past.
/// Returns the command as cancelled, or `None` when it was not pending (or is not a
/// command of the run).
pub(crate) async fn withdraw_pending(
    tx: &impl GenericClient,
    run_id: RunId,
    command_id: CommandId,
) -> Result<Option<CommandRecord>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH first_turn AS (
                 UPDATE runs SET first_turn_status = 'cancelled', first_turn_error = $3,
                                 first_turn_updated_at = now()
                 WHERE id = $1 AND first_turn_id = $2 AND first_turn_status = 'pending'
                 RETURNING {FIRST_TURN_COLUMNS}
             ),
             other AS (
                 UPDATE commands SET status = 'cancelled', error = $3, updated_at = now()
                 WHERE run_id = $1 AND id = $2 AND status = 'pending'
                 RETURNING {COMMAND_COLUMNS}
             )
             SELECT * FROM first_turn UNION ALL SELECT * FROM other"
        )
    });
    let stmt = tx.prepare_cached(&SQL).await?;
    tx.query_opt(&stmt, &[&run_id.0, &command_id.0, &WITHDRAWN])
        .await?
        .map(|row| CommandRecord::from_row(&row))
        .transpose()
}

/// One command of a run (`lifecycle` checks the caller's tenant through the run).
pub(crate) async fn get(
    client: &impl GenericClient,
    run_id: RunId,
    command_id: CommandId,
) -> Result<CommandRecord> {
    let stmt = client
        .prepare_cached("SELECT * FROM run_commands WHERE run_id = $1 AND id = $2")
        .await?;
    let row = client
        .query_opt(&stmt, &[&run_id.0, &command_id.0])
        .await?
        .ok_or(crate::error::Error::NotFound { what: "command" })?;
    CommandRecord::from_row(&row)
}

/// Commands of these runs by id, in no particular order (the ones that exist).
pub(crate) async fn get_many(
    client: &impl GenericClient,
    run_ids: &[Uuid],
    ids: &[Uuid],
) -> Result<Vec<CommandRecord>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = client
        .prepare_cached("SELECT * FROM run_commands WHERE run_id = ANY($1) AND id = ANY($2)")
        .await?;
    CommandRecord::from_rows(&client.query(&stmt, &[&run_ids, &ids]).await?)
}

/// The `command.completed` of a command the manager closed itself (cancelled with its
/// run, withdrawn before delivery, or a cancel it carried out): `closed_by` tells it
/// from a runner's report, which follows a delivery.
pub(crate) fn closed_event(command: &CommandRecord) -> (RunId, NewEvent) {
    let payload = json!({
        "command_id": command.id.to_string(),
        "status": command.status.as_str(),
        "error": command.error,
        "closed_by": "manager",
    });
    (
        command.run_id,
        NewEvent::manager(EventType::CommandCompleted, payload),
    )
}

/// Commands held by a runner that lost its lease go back to pending for the next one.
pub(crate) async fn redeliver(tx: &impl GenericClient, run_ids: &[Uuid]) -> Result<()> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "WITH first_turns AS (
                 UPDATE runs SET first_turn_status = 'pending', first_turn_updated_at = now()
                 WHERE id = ANY($1) AND first_turn_status IN ({sources})
             )
             UPDATE commands SET status = 'pending', updated_at = now()
             WHERE run_id = ANY($1) AND status IN ({sources})",
            sources = sql_list(CommandStatus::Pending.sources())
        )
    });
    let stmt = tx.prepare_cached(&SQL).await?;
    tx.execute(&stmt, &[&run_ids]).await?;
    Ok(())
}
