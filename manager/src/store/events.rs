//! The event log: per-run, append-only, seq gapless from 1.
//!
//! [`append`] is the writer (run creation pre-sequences its first events). It advances
//! `runs.last_event_seq` under the run's row lock and inserts the batch in one
//! statement, so seq is gapless and a batch is stored whole or not at all (the caller's
//! transaction).
//!
//! The log is stored lean: the events of one append of a run are one `event_batches` row
//! holding their seq range and the events as parallel arrays (migration V19), so a
//! streamed reply costs a row per flush, not a row and two index entries per delta.
//! [`list`] unpacks the batches a page needs; other readers use the `events` view, one
//! row per event.
//!
//! Retention ([`lock_due_for_compaction`], [`compact`]) is the one exception to "append
//! only": once a run has ended and its tenant's retention has passed, the deltas of each
//! item are merged into the item's first delta and the rest removed from their batches,
//! leaving seq gaps that readers skip (a `seq > after_seq` range read needs no change).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use agentrun_shared::events::EventType;
use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::payload::{redact, to_text};
use deadpool_postgres::GenericClient;
use serde_json::Value;
use tokio_postgres::types::{FromSql, Type};
use uuid::Uuid;

use super::webhooks;
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
    pub payload: NewPayload,
    pub producer: Producer,
}

/// What a new event carries.
#[derive(Debug, Clone)]
pub enum NewPayload {
    /// Built by the manager: redacted and serialized as it is stored.
    Value(Value),
    /// JSON text redacted already (a runner's event, redacted as it came in): stored and
    /// fanned out as it is, never parsed or serialized again.
    Redacted(String),
}

impl NewEvent {
    pub fn manager(event_type: EventType, payload: Value) -> Self {
        Self {
            event_type,
            payload: NewPayload::Value(payload),
            producer: Producer::Manager,
        }
    }

    /// The event as stored at `seq`: redacted, as JSON text. Its time is set once the
    /// statement storing it has one.
    fn into_record(self, run_id: RunId, seq: i64, ephemeral: bool) -> EventRecord {
        let payload = match self.payload {
            NewPayload::Redacted(json) => json,
            // The one gate every stored event passes: no secret reaches the log.
            NewPayload::Value(mut payload) => {
                redact(&mut payload);
                to_text(&payload)
            }
        };
        EventRecord {
            run_id,
            seq,
            event_type: self.event_type.as_str().to_owned(),
            payload,
            producer: self.producer,
            created_at: SystemTime::UNIX_EPOCH,
            ephemeral,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EventRecord {
    pub run_id: RunId,
    /// For an ephemeral event, the seq of the last stored event before it.
    pub seq: i64,
    pub event_type: String,
    /// The payload as JSON text (an object), as stored: events travel as text from the
    /// runner to the log and from the log to watchers, parsed only where read.
    pub payload: String,
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
    let seqs = sequenced.iter().map(|(_, seq, _)| *seq).collect();
    insert_sequenced(tx, sequenced).await?;
    Ok(seqs)
}

/// Inserts events whose seqs the caller took from `runs.last_event_seq` itself: [`append`]
/// after advancing it, and run creation, which sets it in the same statement that inserts
/// the run. Returns the events as stored (redacted, with their time), in order.
///
/// The events are stored as log batches: one `event_batches` row per stretch of
/// consecutive seqs of one run with runner events of at most one lease (an append,
/// with the manager's events it causes, is one).
pub(crate) async fn insert_sequenced(
    tx: &impl GenericClient,
    events: Vec<(RunId, i64, NewEvent)>,
) -> Result<Vec<EventRecord>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    // A batch holding an event some webhook could want also writes its deliveries, in
    // the same statement (so in the same transaction, and without another round trip).
    // Batches of stream content, the hot path, never pay for it.
    let deliverable = events
        .iter()
        .any(|(_, _, e)| webhooks::deliverable(e.event_type));
    let mut records: Vec<EventRecord> = events
        .into_iter()
        .map(|(run_id, seq, event)| event.into_record(run_id, seq, false))
        .collect();
    let batches = Batches::of(&records);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 9] = [
        &batches.run_ids,
        &batches.first_seqs,
        &batches.last_seqs,
        &batches.producers,
        &batches.runner_ids,
        &batches.epochs,
        &batches.types,
        &batches.payloads,
        &batches.runner_seqs,
    ];
    let (created_at, stored): (Option<SystemTime>, usize) = if !deliverable {
        let insert = tx.prepare_cached(INSERT_BATCHES).await?;
        let rows = tx.query(&insert, &params).await?;
        (rows.first().map(|row| row.get(0)), rows.len())
    } else {
        let insert = tx.prepare_cached(INSERT_BATCHES_AND_DELIVERIES).await?;
        let row = tx.query_one(&insert, &params).await?;
        if row.get::<_, i64>(1) > 0 {
            webhooks::new_deliveries_written();
        }
        (row.get(0), row.get::<_, i64>(2) as usize)
    };
    // Seqs come from the run's locked counter, so a batch that would overlap one already
    // stored means the counter and the log disagree: nothing of it is stored (the
    // transaction fails), as the old per-event primary key refused a seq twice.
    let created_at = match created_at {
        Some(at) if stored == batches.run_ids.len() => at,
        _ => {
            return Err(Error::Internal(
                "an event batch overlaps the run's stored log".into(),
            ));
        }
    };
    for record in &mut records {
        record.created_at = created_at;
    }
    Ok(records)
}

/// Events cut into log batches, as statement parameters: a row per batch, its events'
/// fields each in one text (types and runner seqs comma-separated, payloads a JSON
/// array), so the statement's work grows with the events, whatever the batch sizes.
/// Types and runner seqs are written compactly where they can be (migration V29): one
/// type when every event has it, the first runner seq when the rest follow on from it.
#[derive(Default)]
struct Batches {
    run_ids: Vec<Uuid>,
    first_seqs: Vec<i64>,
    last_seqs: Vec<i64>,
    producers: Vec<&'static str>,
    runner_ids: Vec<Option<Uuid>>,
    epochs: Vec<Option<i64>>,
    types: Vec<String>,
    payloads: Vec<String>,
    runner_seqs: Vec<String>,
}

impl Batches {
    fn of(events: &[EventRecord]) -> Self {
        let mut order: Vec<&EventRecord> = events.iter().collect();
        order.sort_by_key(|e| (e.run_id.0, e.seq));
        let mut batches = Batches::default();
        let mut rest = &order[..];
        while !rest.is_empty() {
            let (batch, after) = rest.split_at(batch_len(rest));
            batches.push(batch);
            rest = after;
        }
        batches
    }

    /// Adds one batch: events of one run, seqs consecutive, runner events of one lease.
    fn push(&mut self, batch: &[&EventRecord]) {
        let (first, last) = (batch[0], batch[batch.len() - 1]);
        let lease = batch.iter().find_map(|e| lease_of(e));
        self.run_ids.push(first.run_id.0);
        self.first_seqs.push(first.seq);
        self.last_seqs.push(last.seq);
        self.producers
            .push(if lease.is_some() { "runner" } else { "manager" });
        self.runner_ids.push(lease.map(|(runner_id, _)| runner_id));
        self.epochs.push(lease.map(|(_, epoch)| epoch));

        let types = if batch.iter().all(|e| e.event_type == first.event_type) {
            first.event_type.clone()
        } else {
            let mut types = String::with_capacity(batch.len() * 16);
            for (i, e) in batch.iter().enumerate() {
                types.push_str(if i == 0 { "" } else { "," });
                types.push_str(&e.event_type);
            }
            types
        };
        self.types.push(types);

        let runner_seqs: Vec<Option<i64>> = batch.iter().map(|e| runner_seq_of(e)).collect();
        self.runner_seqs.push(match runner_seqs[0] {
            // A manager batch has none.
            _ if lease.is_none() => String::new(),
            Some(from) if (0..).zip(&runner_seqs).all(|(i, s)| *s == Some(from + i)) => {
                from.to_string()
            }
            _ => {
                // An empty element is a manager event's NULL runner seq.
                let mut text = String::with_capacity(batch.len() * 8);
                for (i, seq) in runner_seqs.iter().enumerate() {
                    text.push_str(if i == 0 { "" } else { "," });
                    if let Some(seq) = seq {
                        write!(text, "{seq}").expect("writing to a String");
                    }
                }
                text
            }
        });

        let bytes: usize = batch.iter().map(|e| e.payload.len() + 1).sum();
        let mut payloads = String::with_capacity(bytes + 1);
        for (i, e) in batch.iter().enumerate() {
            payloads.push(if i == 0 { '[' } else { ',' });
            payloads.push_str(&e.payload);
        }
        payloads.push(']');
        self.payloads.push(payloads);
    }
}

/// How many of `events` (in run and seq order) the first batch takes. A batch ends
/// where the run, the seq's continuity or the lease of its runner events does. The
/// manager's events join the batch they fall in (an append's `run.started` and
/// `command.completed` share the row of the runner's events), and say so by having no
/// runner seq.
fn batch_len(events: &[&EventRecord]) -> usize {
    let mut lease = lease_of(events[0]);
    let follows = |pair: &&[&EventRecord]| {
        let (prev, next) = (pair[0], pair[1]);
        let next_lease = lease_of(next);
        let same_lease = lease.is_none() || next_lease.is_none() || lease == next_lease;
        lease = lease.or(next_lease);
        next.run_id == prev.run_id && next.seq == prev.seq + 1 && same_lease
    };
    1 + events.windows(2).take_while(follows).count()
}

/// The lease (runner, epoch) a runner's event was written under; `None` for the
/// manager's.
fn lease_of(event: &EventRecord) -> Option<(Uuid, i64)> {
    match event.producer {
        Producer::Manager => None,
        Producer::Runner {
            runner_id, epoch, ..
        } => Some((runner_id.0, epoch)),
    }
}

fn runner_seq_of(event: &EventRecord) -> Option<i64> {
    match event.producer {
        Producer::Manager => None,
        Producer::Runner { runner_seq, .. } => Some(runner_seq),
    }
}

/// The rows [`Batches`] describe, for an `INSERT INTO event_batches`. An event's time is
/// its statement's, not its transaction's: a claim that found its run only after another
/// transaction ended one (a concurrency key's slot) is logged after that end, as it
/// happened.
macro_rules! insert_batches {
    () => {
        "INSERT INTO event_batches (run_id, first_seq, last_seq, producer, runner_id, epoch,
                                    created_at, seqs, types, payloads, runner_seqs)
         SELECT b.run_id, b.first_seq, b.last_seq, b.producer, b.runner_id, b.epoch,
                -- Every seq of the range: `seqs` NULL (see migration V29).
                statement_timestamp(), NULL, string_to_array(b.types, ','), b.payloads,
                CASE WHEN b.runner_id IS NOT NULL
                     THEN string_to_array(b.runner_seqs, ',', '')::bigint[] END
         -- Unnested in a select list, in step: in FROM, the batches (a streamed one holds
         -- tens of kilobytes) would first be copied into a tuplestore.
         FROM (SELECT unnest($1::uuid[]) AS run_id, unnest($2::bigint[]) AS first_seq,
                      unnest($3::bigint[]) AS last_seq, unnest($4::text[]) AS producer,
                      unnest($5::uuid[]) AS runner_id, unnest($6::bigint[]) AS epoch,
                      unnest($7::text[]) AS types, unnest($8::text[]) AS payloads,
                      unnest($9::text[]) AS runner_seqs) AS b
         -- The backstop of a gapless, duplicate-free log: a batch goes after the run's
         -- last one or not at all (see `insert_sequenced`). A scalar subquery, so it is
         -- always one index probe per batch: as `NOT EXISTS` it became an anti join, and
         -- a generic plan made while the table was small hashed a scan of the whole
         -- table on every append until the table's statistics were next refreshed.
         WHERE coalesce((SELECT o.last_seq FROM event_batches o WHERE o.run_id = b.run_id
                         ORDER BY o.last_seq DESC LIMIT 1), 0) < b.first_seq
         RETURNING created_at"
    };
}

/// Returns the events' time (the statement's), once per batch. Public for the test of
/// its plan.
pub const INSERT_BATCHES: &str = insert_batches!();

/// [`INSERT_BATCHES`], and one delivery per stored event and webhook of the run's tenant
/// (and project, when the webhook names one) that asks for its type. Returns the events'
/// time and how many deliveries were written.
pub const INSERT_BATCHES_AND_DELIVERIES: &str = concat!(
    "WITH stored AS (",
    insert_batches!(),
    ", run_id, first_seq, last_seq, types
     ),
     -- A stored batch holds every seq of its range; only a one-type batch has no type
     -- after its first event (as `event_batch_events` reads it, without the payloads).
     stored_events AS (
         SELECT s.run_id, e.seq, coalesce(e.type, s.types[1]) AS type
         FROM stored s
         CROSS JOIN LATERAL ROWS FROM (generate_series(s.first_seq, s.last_seq),
                                       unnest(s.types)) AS e (seq, type)
     ),
     delivered AS (
         INSERT INTO webhook_deliveries (id, webhook_id, tenant_id, run_id, seq, event_type)
         SELECT gen_random_uuid(), w.id, r.tenant_id, s.run_id, s.seq, s.type
         FROM stored_events s
         JOIN runs r ON r.id = s.run_id
         JOIN webhooks w ON w.tenant_id = r.tenant_id AND NOT w.deleted
                        AND s.type = ANY(w.event_types)
                        AND (w.project_id = '' OR w.project_id = r.project_id)
         -- A one-time check: without any webhook, no join is made at all.
         WHERE EXISTS (SELECT 1 FROM webhooks WHERE NOT deleted)
         ON CONFLICT (webhook_id, run_id, seq) DO NOTHING
         RETURNING 1
     )
     SELECT (SELECT created_at FROM stored LIMIT 1), (SELECT count(*) FROM delivered),
            (SELECT count(*) FROM stored)"
);

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
                   FROM (SELECT b.run_id, e.seq, e.type, e.payload, b.producer, b.runner_id,
                                b.epoch, e.runner_seq, b.created_at
                         FROM event_batches b
                         CROSS JOIN LATERAL event_batch_events(b.first_seq, b.seqs, b.types,
                                                               b.runner_seqs, b.payloads) e
                         WHERE b.run_id = $1 AND b.last_seq > $2 AND e.seq > $2
                         -- Batches never overlap: in batch order, then seq order within
                         -- one, so the page reads only the batches it returns.
                         ORDER BY b.last_seq, e.seq LIMIT $3) p) page
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
        EventRecord {
            created_at: SystemTime::now(),
            ..event.into_record(run_id, follows_seq, true)
        }
    }

    /// Its payload parsed (an object; `Null` if the text were not JSON).
    pub fn payload_value(&self) -> Value {
        serde_json::from_str(&self.payload).unwrap_or(Value::Null)
    }

    /// Reads a row with the `events` columns.
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> Self {
        EventRecord {
            run_id: RunId(row.get("run_id")),
            seq: row.get("seq"),
            event_type: row.get("type"),
            payload: row.get::<_, JsonText>("payload").0,
            // A batch may hold the manager's events among a runner's: only a runner's
            // event has a runner seq.
            producer: match (
                row.get::<_, Option<i64>>("runner_seq"),
                row.get::<_, Option<Uuid>>("runner_id"),
            ) {
                (Some(runner_seq), Some(id)) => Producer::Runner {
                    runner_id: RunnerId(id),
                    epoch: row.get::<_, Option<i64>>("epoch").unwrap_or_default(),
                    runner_seq,
                },
                _ => Producer::Manager,
            },
            created_at: row.get("created_at"),
            ephemeral: false,
        }
    }
}

/// A `json` or `jsonb` value read as its JSON text, without building a `Value`.
struct JsonText(String);

impl<'a> FromSql<'a> for JsonText {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        // jsonb's binary form is a version byte (1) before the text.
        let text = match (*ty == Type::JSONB, raw.split_first()) {
            (false, _) => raw,
            (true, Some((1, text))) => text,
            (true, _) => return Err("unsupported jsonb version".into()),
        };
        Ok(JsonText(std::str::from_utf8(text)?.to_owned()))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::JSON | Type::JSONB)
    }
}

/// Deltas merged into one event hold at most this much text plus one original delta, so
/// a merged event stays near the payload limit and a page of them under the message
/// limit.
pub const COMPACTED_DELTA_BYTES: i64 = 64 * 1024;

/// What one [`compact`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Compacted {
    /// Runs marked compacted (some may have had no delta to merge).
    pub runs: u64,
    /// `content.delta` rows deleted (their text is in the item's first delta).
    pub deltas_removed: u64,
    /// Payload bytes the run no longer stores (subtracted from `runs.event_bytes`).
    pub bytes_freed: i64,
}

/// Locks up to `limit` ended runs, not compacted yet, whose tenant's retention (its own,
/// else `default_retention_ms`; 0 keeps forever) has passed since they ended, oldest
/// first within a tenant. `SKIP LOCKED`: runs another replica is compacting, or that a
/// caller holds, are left for a later pass, and nobody waits on the compactor.
///
/// Finding them costs one index probe per tenant with uncompacted ended runs
/// (`runs_compaction_due`, walked tenant by tenant), not a scan of the runs kept forever.
pub async fn lock_due_for_compaction(
    tx: &impl GenericClient,
    default_retention_ms: i64,
    limit: i64,
) -> Result<Vec<RunId>> {
    let stmt = tx
        .prepare_cached(
            "WITH RECURSIVE tenants AS (
                 (SELECT tenant_id FROM runs
                  WHERE finished_at IS NOT NULL AND events_compacted_at IS NULL
                  ORDER BY tenant_id LIMIT 1)
                 UNION ALL
                 SELECT (SELECT r.tenant_id FROM runs r
                         WHERE r.finished_at IS NOT NULL AND r.events_compacted_at IS NULL
                           AND r.tenant_id > t.tenant_id
                         ORDER BY r.tenant_id LIMIT 1)
                 FROM tenants t WHERE t.tenant_id IS NOT NULL
             ),
             retention AS (
                 SELECT t.tenant_id, coalesce(tl.event_retention_ms, $1::bigint) AS ms
                 FROM tenants t LEFT JOIN tenant_limits tl ON tl.tenant_id = t.tenant_id
                 WHERE t.tenant_id IS NOT NULL
             ),
             -- More candidates than wanted, so a replica whose first picks are locked by
             -- another still finds work.
             due AS (
                 SELECT d.id FROM retention rt
                 CROSS JOIN LATERAL (
                     SELECT r.id FROM runs r
                     WHERE r.tenant_id = rt.tenant_id
                       AND r.finished_at IS NOT NULL AND r.events_compacted_at IS NULL
                       AND r.finished_at < now() - rt.ms * interval '1 millisecond'
                     ORDER BY r.finished_at LIMIT $2::bigint * 4
                 ) d
                 WHERE rt.ms > 0
                 LIMIT $2::bigint * 4
             )
             SELECT id FROM runs
             WHERE id IN (SELECT id FROM due) AND events_compacted_at IS NULL
             LIMIT $2::bigint
             FOR UPDATE SKIP LOCKED",
        )
        .await?;
    let rows = tx.query(&stmt, &[&default_retention_ms, &limit]).await?;
    Ok(rows.iter().map(|row| RunId(row.get(0))).collect())
}

/// Compacts the deltas of `runs` (locked by [`lock_due_for_compaction`] in this
/// transaction) and marks them, in one statement.
///
/// Per run, lease epoch (a re-executed turn's deltas are not mixed with the lost
/// attempt's), item and stream kind, the `content.delta` events are cut into chunks of
/// about [`COMPACTED_DELTA_BYTES`] of text; each chunk of several becomes its first
/// event, holding the chunk's texts concatenated in seq order and `compacted_deltas` /
/// `compacted_through_seq`, and its other events are deleted. Deltas without an
/// `item_id` and all other event types are left as they are.
pub async fn compact(tx: &impl GenericClient, runs: &[RunId]) -> Result<Compacted> {
    if runs.is_empty() {
        return Ok(Compacted::default());
    }
    let stmt = tx
        .prepare_cached(
            "WITH logged AS (
                 SELECT b.run_id, b.last_seq AS batch, b.epoch, e.seq, e.type,
                        e.payload AS stored, e.payload::jsonb AS payload, e.runner_seq
                 FROM event_batches b
                 CROSS JOIN LATERAL event_batch_events(b.first_seq, b.seqs, b.types,
                                                       b.runner_seqs, b.payloads) e
                 WHERE b.run_id = ANY($1)
             ),
             deltas AS (
                 SELECT e.run_id, e.seq, e.epoch, e.payload->>'item_id' AS item_id,
                        e.payload->>'kind' AS kind, e.payload->>'delta' AS delta,
                        octet_length(e.payload::text) AS bytes,
                        (sum(octet_length(e.payload->>'delta')) OVER w
                         - octet_length(e.payload->>'delta')) / $2::bigint AS chunk
                 FROM logged e
                 WHERE e.type = 'content.delta' AND jsonb_typeof(e.payload->'item_id') = 'string'
                 WINDOW w AS (PARTITION BY e.run_id, e.epoch, e.payload->>'item_id',
                                           e.payload->>'kind'
                              ORDER BY e.seq)
             ),
             chunks AS (
                 SELECT run_id, epoch, item_id, kind, chunk, min(seq) AS first_seq,
                        max(seq) AS last_seq, count(*) AS merged,
                        string_agg(delta, '' ORDER BY seq) AS text, sum(bytes) AS bytes
                 FROM deltas
                 GROUP BY run_id, epoch, item_id, kind, chunk
                 HAVING count(*) > 1
             ),
             -- Every delta of a merged chunk: its first is kept, holding the chunk's text,
             -- the others are dropped.
             fate AS (
                 SELECT d.run_id, d.seq, d.seq = c.first_seq AS kept,
                        jsonb_build_object('delta', c.text, 'compacted_deltas', c.merged,
                                           'compacted_through_seq', c.last_seq) AS merged,
                        c.bytes
                 FROM deltas d
                 JOIN chunks c ON c.run_id = d.run_id AND c.epoch IS NOT DISTINCT FROM d.epoch
                              AND c.item_id = d.item_id AND c.kind = d.kind
                              AND c.chunk = d.chunk
             ),
             -- The batches holding such deltas, rebuilt without the dropped ones: every
             -- array in full, seqs with their gaps (NULL arrays when none is left).
             rebuilt AS (
                 SELECT l.run_id, l.batch,
                        array_agg(l.seq ORDER BY l.seq) FILTER (WHERE f.kept IS NOT false) AS seqs,
                        array_agg(l.type ORDER BY l.seq) FILTER (WHERE f.kept IS NOT false) AS types,
                        -- The events left alone keep their text as stored.
                        json_agg(CASE WHEN f.kept THEN (l.payload || f.merged)::json
                                      ELSE l.stored END
                                 ORDER BY l.seq) FILTER (WHERE f.kept IS NOT false) AS payloads,
                        array_agg(l.runner_seq ORDER BY l.seq) FILTER (WHERE f.kept IS NOT false)
                            AS runner_seqs,
                        sum(f.bytes - octet_length((l.payload || f.merged)::text))
                            FILTER (WHERE f.kept) AS freed,
                        count(*) FILTER (WHERE NOT f.kept) AS removed
                 FROM logged l LEFT JOIN fate f ON f.run_id = l.run_id AND f.seq = l.seq
                 GROUP BY l.run_id, l.batch
                 HAVING bool_or(f.seq IS NOT NULL)
             ),
             kept AS (
                 UPDATE event_batches b
                 SET seqs = r.seqs, types = r.types, payloads = r.payloads::text,
                     runner_seqs = CASE WHEN b.runner_seqs IS NOT NULL THEN r.runner_seqs END
                 FROM rebuilt r
                 WHERE b.run_id = r.run_id AND b.last_seq = r.batch AND r.seqs IS NOT NULL
             ),
             emptied AS (
                 DELETE FROM event_batches b USING rebuilt r
                 WHERE b.run_id = r.run_id AND b.last_seq = r.batch AND r.seqs IS NULL
             ),
             freed AS (
                 SELECT run_id, sum(freed)::bigint AS bytes, sum(removed)::bigint AS removed
                 FROM rebuilt GROUP BY run_id
             ),
             marked AS (
                 UPDATE runs r
                 SET events_compacted_at = now(),
                     event_bytes = greatest(r.event_bytes - coalesce(f.bytes, 0), 0)
                 FROM unnest($1::uuid[]) AS t(id) LEFT JOIN freed f ON f.run_id = t.id
                 WHERE r.id = t.id
                 RETURNING r.id
             )
             SELECT (SELECT count(*) FROM marked),
                    (SELECT coalesce(sum(removed), 0)::bigint FROM freed),
                    (SELECT coalesce(sum(bytes), 0)::bigint FROM freed)",
        )
        .await?;
    let ids: Vec<Uuid> = runs.iter().map(|r| r.0).collect();
    let row = tx.query_one(&stmt, &[&ids, &COMPACTED_DELTA_BYTES]).await?;
    Ok(Compacted {
        runs: row.get::<_, i64>(0) as u64,
        deltas_removed: row.get::<_, i64>(1) as u64,
        bytes_freed: row.get(2),
    })
}
