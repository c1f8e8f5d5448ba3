//! The event log: per-run, append-only, seq gapless from 1.
//!
//! [`append`] is the writer (run creation pre-sequences its first events). It advances `runs.last_event_seq` under the run's row
//! lock and inserts the batch in one statement, so seq is gapless and a batch is stored
//! whole or not at all (the caller's transaction).

use std::collections::HashMap;
use std::time::SystemTime;

use agentrun_shared::events::EventType;
use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::payload::redact;
use deadpool_postgres::GenericClient;
use serde_json::Value;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Payload bytes one page of events carries (ListEvents, ListSessionEvents, a watcher's
/// read): the page ends with the event that reaches it, so it holds at least one event
/// and a response stays well under the 4 MiB message limit (one payload is at most 1 MiB).
pub const PAGE_BYTES: i64 = 2 * 1024 * 1024;

/// Who wrote an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Producer {
    Manager,
    Runner {
        runner_id: RunnerId,
        epoch: i64,
        runner_seq: i64,
    },
}

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_type: EventType,
    pub payload: Value,
    pub producer: Producer,
}

impl NewEvent {
    pub fn manager(event_type: EventType, payload: Value) -> Self {
        Self {
            event_type,
            payload,
            producer: Producer::Manager,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EventRecord {
    pub run_id: RunId,
    /// For an ephemeral event, the seq of the last stored event before it.
    pub seq: i64,
    pub event_type: String,
    pub payload: Value,
    pub producer: Producer,
    pub created_at: SystemTime,
    /// Sent live to watchers, never stored (a `final` run's `content.delta`).
    pub ephemeral: bool,
}

/// Appends events to runs, in order. Returns the seq given to each event.
///
/// The caller must hold the row lock of every run involved (it selected them `FOR
/// UPDATE`, or inserted them, in this transaction), which keeps lock order its own.
pub async fn append(tx: &impl GenericClient, events: &[(RunId, NewEvent)]) -> Result<Vec<i64>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // How many events each run gets.
    let mut counts: HashMap<Uuid, i64> = HashMap::new();
    for (run_id, _) in events {
        *counts.entry(run_id.0).or_default() += 1;
    }
    let (ids, ns): (Vec<Uuid>, Vec<i64>) = counts.iter().map(|(id, n)| (*id, *n)).unzip();
    let advance = tx
        .prepare_cached(
            "UPDATE runs SET last_event_seq = runs.last_event_seq + c.n
             FROM unnest($1::uuid[], $2::bigint[]) AS c(id, n)
             WHERE runs.id = c.id
             RETURNING runs.id, runs.last_event_seq - c.n",
        )
        .await?;
    let rows = tx.query(&advance, &[&ids, &ns]).await?;
    if rows.len() != counts.len() {
        return Err(Error::Internal(
            "event append for a run that does not exist".into(),
        ));
    }
    // The next seq of each run.
    let mut next: HashMap<Uuid, i64> = rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, i64>(1) + 1))
        .collect();

    let mut sequenced = Vec::with_capacity(events.len());
    for (run_id, event) in events {
        let seq = next
            .get_mut(&run_id.0)
            .expect("every run was advanced above");
        sequenced.push((*run_id, *seq, event.clone()));
        *seq += 1;
    }
    insert_sequenced(tx, &sequenced).await?;
    Ok(sequenced.iter().map(|(_, seq, _)| *seq).collect())
}

/// Inserts events whose seqs the caller took from `runs.last_event_seq` itself: [`append`]
/// after advancing it, and run creation, which sets it in the same statement that inserts
/// the run.
pub(crate) async fn insert_sequenced(
    tx: &impl GenericClient,
    events: &[(RunId, i64, NewEvent)],
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut run_ids = Vec::with_capacity(events.len());
    let mut seqs = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut payloads = Vec::with_capacity(events.len());
    let mut producers = Vec::with_capacity(events.len());
    let mut runner_ids: Vec<Option<Uuid>> = Vec::with_capacity(events.len());
    let mut epochs: Vec<Option<i64>> = Vec::with_capacity(events.len());
    let mut runner_seqs: Vec<Option<i64>> = Vec::with_capacity(events.len());
    for (run_id, seq, event) in events {
        run_ids.push(run_id.0);
        seqs.push(*seq);
        types.push(event.event_type.as_str());
        // The one gate every stored event passes: no secret reaches the log.
        let mut payload = event.payload.clone();
        redact(&mut payload);
        payloads.push(payload);
        match event.producer {
            Producer::Manager => {
                producers.push("manager");
                runner_ids.push(None);
                epochs.push(None);
                runner_seqs.push(None);
            }
            Producer::Runner {
                runner_id,
                epoch,
                runner_seq,
            } => {
                producers.push("runner");
                runner_ids.push(Some(runner_id.0));
                epochs.push(Some(epoch));
                runner_seqs.push(Some(runner_seq));
            }
        }
    }
    let insert = tx
        .prepare_cached(
            "INSERT INTO events (run_id, seq, type, payload, producer, runner_id, epoch, runner_seq)
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[],
                                  $6::uuid[], $7::bigint[], $8::bigint[])",
        )
        .await?;
    tx.execute(
        &insert,
        &[
            &run_ids,
            &seqs,
            &types,
            &payloads,
            &producers,
            &runner_ids,
            &epochs,
            &runner_seqs,
        ],
    )
    .await?;
    Ok(())
}

/// Events of a run with `seq > after_seq`, oldest first: at most `limit`, and no more
/// than [`PAGE_BYTES`] of payload past the first.
pub async fn list(
    client: &impl GenericClient,
    run_id: RunId,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<EventRecord>> {
    // The byte bound is applied in the database: a page of large events is never
    // fetched whole only to be cut here.
    let stmt = client
        .prepare_cached(
            "SELECT run_id, seq, type, payload, producer, runner_id, epoch, runner_seq, created_at
             FROM (SELECT p.*, sum(octet_length(p.payload::text)) OVER (ORDER BY p.seq)
                               - octet_length(p.payload::text) AS bytes_before
                   FROM (SELECT * FROM events WHERE run_id = $1 AND seq > $2
                         ORDER BY seq LIMIT $3) p) page
             WHERE bytes_before < $4
             ORDER BY seq",
        )
        .await?;
    let rows = client
        .query(&stmt, &[&run_id.0, &after_seq, &limit, &PAGE_BYTES])
        .await?;
    Ok(rows.iter().map(EventRecord::from_row).collect())
}

impl EventRecord {
    /// An event that watchers get live and the log never holds, placed after the stored
    /// event `follows_seq`. Redacted like every stored event.
    pub(crate) fn ephemeral(run_id: RunId, follows_seq: i64, event: NewEvent) -> Self {
        let mut payload = event.payload;
        redact(&mut payload);
        EventRecord {
            run_id,
            seq: follows_seq,
            event_type: event.event_type.as_str().to_owned(),
            payload,
            producer: event.producer,
            created_at: SystemTime::now(),
            ephemeral: true,
        }
    }

    /// Reads a row with the `events` columns.
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> Self {
        EventRecord {
            run_id: RunId(row.get("run_id")),
            seq: row.get("seq"),
            event_type: row.get("type"),
            payload: row.get("payload"),
            producer: match row.get::<_, Option<Uuid>>("runner_id") {
                Some(id) => Producer::Runner {
                    runner_id: RunnerId(id),
                    epoch: row.get::<_, Option<i64>>("epoch").unwrap_or_default(),
                    runner_seq: row.get::<_, Option<i64>>("runner_seq").unwrap_or_default(),
                },
                None => Producer::Manager,
            },
            created_at: row.get("created_at"),
            ephemeral: false,
        }
    }
}
