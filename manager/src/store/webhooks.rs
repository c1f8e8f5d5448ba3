//! Webhooks and their deliveries: which HTTP endpoints a tenant wants told about which
//! run events, and the state of each delivery.
//!
//! Delivery rows are written by the event append itself ([`super::events`]: one
//! `INSERT ... SELECT` in the append's transaction, and only when the batch holds a
//! [`DELIVERABLE`] type), so a delivery exists exactly when its event is stored, once
//! per matching webhook. The delivery worker (`crate::webhooks`) takes due rows with
//! [`claim_due`] and records each attempt with [`record`].
//!
//! A webhook is deleted softly: an append racing the delete may still insert a delivery
//! for it (the append is never made to wait for, or fail on, a delete), and the worker
//! never picks deliveries of deleted webhooks.

use std::fmt;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use agentrun_shared::error::FieldError;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::RunId;
use deadpool_postgres::{GenericClient, Pool};
use serde_json::Value;
use tokio::sync::watch;
use tokio_postgres::Row;
use uuid::Uuid;

use super::events::{EventRecord, Producer};
use super::{Tenant, parse_state};
use crate::error::{Error, Result};

/// Event types a webhook may ask for: what tells a system a run needs it. Stream
/// content (`content.delta`, items) is not delivered.
pub const DELIVERABLE: &[EventType] = &[
    EventType::RunCreated,
    EventType::RunClaimed,
    EventType::RunStarted,
    EventType::RunRequeued,
    EventType::RunTerminal,
    EventType::TurnStarted,
    EventType::TurnCompleted,
    EventType::RequestOpened,
    EventType::RequestResolved,
    EventType::RuntimeError,
];

/// Whether events of this type may be delivered (some webhook could want them).
pub fn deliverable(event_type: EventType) -> bool {
    DELIVERABLE.contains(&event_type)
}

/// Bumped when an append wrote deliveries in this process. It is a hint, sent before
/// the append commits: the worker waits a moment before looking, and its poll catches
/// whatever a hint missed. Process-wide because the append path has no handle of its
/// own; a process running several managers (tests) wakes all their workers.
static NEW_DELIVERIES: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::channel(0).0);

pub(crate) fn new_deliveries_written() {
    NEW_DELIVERIES.send_modify(|n| *n = n.wrapping_add(1));
}

/// Changes whenever an append in this process wrote deliveries.
pub fn new_deliveries() -> watch::Receiver<u64> {
    NEW_DELIVERIES.subscribe()
}

/// Advisory lock class serialising webhook creation per tenant (the count limit).
const CREATE_LOCK: i32 = 0x6172_7768; // "arwh"

/// A webhook id (time-ordered v7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WebhookId(pub Uuid);

impl WebhookId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a canonical UUID; `field` names the request field in the error.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldError> {
        if text.is_empty() {
            return Err(FieldError::new(field, "is required"));
        }
        Uuid::try_parse(text)
            .map(Self)
            .map_err(|_| FieldError::new(field, "is not a valid UUID"))
    }
}

impl Default for WebhookId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for WebhookId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A webhook as the caller asked for it (validated at the edge).
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: String,
    pub event_types: Vec<String>,
    /// '' for every project.
    pub project_id: String,
    pub secret: String,
}

#[derive(Debug, Clone)]
pub struct WebhookRecord {
    pub id: WebhookId,
    pub url: String,
    pub event_types: Vec<String>,
    pub project_id: String,
    pub created_at: SystemTime,
}

impl WebhookRecord {
    fn from_row(row: &Row) -> Self {
        WebhookRecord {
            id: WebhookId(row.get("id")),
            url: row.get("url"),
            event_types: row.get("event_types"),
            project_id: row.get("project_id"),
            created_at: row.get("created_at"),
        }
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(DeliveryStatus::Pending),
            "delivered" => Some(DeliveryStatus::Delivered),
            "failed" => Some(DeliveryStatus::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeliveryRecord {
    pub id: Uuid,
    pub webhook_id: WebhookId,
    pub run_id: RunId,
    pub seq: i64,
    pub event_type: String,
    pub status: DeliveryStatus,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: SystemTime,
    /// `None` once it is no longer pending.
    pub next_attempt_at: Option<SystemTime>,
    pub delivered_at: Option<SystemTime>,
    /// The page cursor.
    pub position: i64,
}

impl DeliveryRecord {
    fn from_row(row: &Row) -> Result<Self> {
        let status = parse_state("delivery status", row.get("status"), DeliveryStatus::parse)?;
        Ok(DeliveryRecord {
            id: row.get("id"),
            webhook_id: WebhookId(row.get("webhook_id")),
            run_id: RunId(row.get("run_id")),
            seq: row.get("seq"),
            event_type: row.get("event_type"),
            status,
            attempts: row.get("attempts"),
            last_status_code: row.get("last_status_code"),
            last_error: row.get("last_error"),
            created_at: row.get("created_at"),
            next_attempt_at: (status == DeliveryStatus::Pending)
                .then(|| row.get("next_attempt_at")),
            delivered_at: row.get("delivered_at"),
            position: row.get("position"),
        })
    }
}

/// Creates a webhook, unless the tenant already has `max_per_tenant` (RESOURCE_EXHAUSTED
/// naming the limit). Creations of one tenant are serialised so the count holds.
pub async fn create(
    pool: &Pool,
    tenant: &Tenant,
    new: &NewWebhook,
    max_per_tenant: i64,
) -> Result<WebhookRecord> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&CREATE_LOCK, &tenant.as_str()],
    )
    .await?;
    let count: i64 = tx
        .query_one(
            "SELECT count(*) FROM webhooks WHERE tenant_id = $1 AND NOT deleted",
            &[&tenant.as_str()],
        )
        .await?
        .get(0);
    if count >= max_per_tenant {
        return Err(Error::ResourceExhausted(format!(
            "tenant_webhooks: the tenant already has {count} webhooks, the limit is \
             {max_per_tenant}; delete one first"
        )));
    }
    let row = tx
        .query_one(
            "INSERT INTO webhooks (id, tenant_id, project_id, url, event_types, secret)
             VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING id, url, event_types, project_id, created_at",
            &[
                &WebhookId::new().0,
                &tenant.as_str(),
                &new.project_id,
                &new.url,
                &new.event_types,
                &new.secret,
            ],
        )
        .await?;
    tx.commit().await?;
    Ok(WebhookRecord::from_row(&row))
}

/// The tenant's webhooks, oldest first; with `projects`, only those limited to one of
/// them (a project-limited key never sees a webhook of every project).
pub async fn list(
    client: &impl GenericClient,
    tenant: &Tenant,
    projects: &[String],
) -> Result<Vec<WebhookRecord>> {
    let stmt = client
        .prepare_cached(
            "SELECT id, url, event_types, project_id, created_at FROM webhooks
             WHERE tenant_id = $1 AND NOT deleted
               AND (cardinality($2::text[]) = 0 OR project_id = ANY($2))
             ORDER BY created_at, id",
        )
        .await?;
    let rows = client.query(&stmt, &[&tenant.as_str(), &projects]).await?;
    Ok(rows.iter().map(WebhookRecord::from_row).collect())
}

/// One webhook the caller may see, or NOT_FOUND (also for another tenant's).
pub async fn get(
    client: &impl GenericClient,
    tenant: &Tenant,
    projects: &[String],
    id: WebhookId,
) -> Result<WebhookRecord> {
    let stmt = client
        .prepare_cached(
            "SELECT id, url, event_types, project_id, created_at FROM webhooks
             WHERE id = $1 AND tenant_id = $2 AND NOT deleted
               AND (cardinality($3::text[]) = 0 OR project_id = ANY($3))",
        )
        .await?;
    client
        .query_opt(&stmt, &[&id.0, &tenant.as_str(), &projects])
        .await?
        .map(|row| WebhookRecord::from_row(&row))
        .ok_or(Error::NotFound { what: "webhook" })
}

/// Deletes a webhook the caller may see (NOT_FOUND otherwise, and when it is already
/// gone) and drops its deliveries.
pub async fn delete(
    pool: &Pool,
    tenant: &Tenant,
    projects: &[String],
    id: WebhookId,
) -> Result<()> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let deleted = tx
        .execute(
            "UPDATE webhooks SET deleted = true
             WHERE id = $1 AND tenant_id = $2 AND NOT deleted
               AND (cardinality($3::text[]) = 0 OR project_id = ANY($3))",
            &[&id.0, &tenant.as_str(), &projects],
        )
        .await?;
    if deleted == 0 {
        return Err(Error::NotFound { what: "webhook" });
    }
    tx.execute(
        "DELETE FROM webhook_deliveries WHERE webhook_id = $1",
        &[&id.0],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A webhook's deliveries, newest first: at most `limit`, those before the cursor
/// `before` (a position) when given.
pub async fn list_deliveries(
    client: &impl GenericClient,
    webhook: WebhookId,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<DeliveryRecord>> {
    let stmt = client
        .prepare_cached(
            "SELECT id, webhook_id, run_id, seq, event_type, status, attempts,
                    last_status_code, last_error, created_at, next_attempt_at, delivered_at,
                    position
             FROM webhook_deliveries
             WHERE webhook_id = $1 AND ($2::bigint IS NULL OR position < $2)
             ORDER BY position DESC
             LIMIT $3",
        )
        .await?;
    let rows = client.query(&stmt, &[&webhook.0, &before, &limit]).await?;
    rows.iter().map(DeliveryRecord::from_row).collect()
}

/// A delivery taken for one attempt, with what sending it needs.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub id: Uuid,
    pub webhook_id: WebhookId,
    pub url: String,
    pub secret: String,
    /// This attempt's number, from 1.
    pub attempt: i32,
    pub event: EventRecord,
}

/// Takes up to `limit` due deliveries for one attempt each, in one statement (its own
/// transaction): attempts + 1, and `next_attempt_at` pushed `lease` ahead, so no other
/// replica (nor this one) takes them again while the attempt is in flight; if this
/// replica dies meanwhile, they come due again when the lease has passed. `SKIP
/// LOCKED`: replicas split the due rows, never wait on each other.
///
/// Per webhook, at most `per_webhook` minus what `busy` says this replica already has in
/// flight for it: one slow receiver cannot take every slot from the others.
pub async fn claim_due(
    client: &impl GenericClient,
    limit: i64,
    per_webhook: i64,
    busy: &[(WebhookId, i64)],
    lease: Duration,
) -> Result<Vec<DueDelivery>> {
    let stmt = client
        .prepare_cached(
            "WITH busy AS (
                 SELECT * FROM unnest($3::uuid[], $4::bigint[]) AS b(webhook_id, n)
             ),
             candidates AS (
                 SELECT d.id, d.webhook_id, d.next_attempt_at FROM webhook_deliveries d
                 JOIN webhooks w ON w.id = d.webhook_id AND NOT w.deleted
                 WHERE d.status = 'pending' AND d.next_attempt_at <= now()
                   AND d.webhook_id NOT IN (SELECT webhook_id FROM busy WHERE n >= $5)
                 ORDER BY d.next_attempt_at
                 LIMIT $1::bigint * 4
                 FOR UPDATE OF d SKIP LOCKED
             ),
             due AS (
                 SELECT c.id FROM (
                     SELECT c.*, row_number() OVER (PARTITION BY c.webhook_id
                                                    ORDER BY c.next_attempt_at) AS rank
                     FROM candidates c
                 ) c
                 LEFT JOIN busy b ON b.webhook_id = c.webhook_id
                 WHERE c.rank + coalesce(b.n, 0) <= $5
                 ORDER BY c.next_attempt_at
                 LIMIT $1
             ),
             taken AS (
                 UPDATE webhook_deliveries d
                 SET attempts = d.attempts + 1,
                     next_attempt_at = now() + $2::bigint * interval '1 millisecond'
                 FROM due WHERE d.id = due.id
                 RETURNING d.id, d.webhook_id, d.run_id, d.seq, d.attempts
             )
             SELECT t.id AS delivery_id, t.webhook_id, t.attempts, w.url, w.secret,
                    e.run_id, e.seq, e.type, e.payload, e.producer, e.runner_id, e.epoch,
                    e.runner_seq, e.created_at
             FROM taken t
             JOIN webhooks w ON w.id = t.webhook_id
             -- The event's log batch, found by its seq range, then the event in it.
             JOIN event_batches b ON b.run_id = t.run_id AND b.last_seq >= t.seq
                                 AND b.first_seq <= t.seq
             CROSS JOIN LATERAL (
                 SELECT b.run_id, u.seq, u.type, u.payload, b.producer, b.runner_id, b.epoch,
                        u.runner_seq, b.created_at
                 FROM event_batch_events(b.first_seq, b.seqs, b.types, b.runner_seqs,
                                         b.payloads) u
                 WHERE u.seq = t.seq
             ) e",
        )
        .await?;
    let lease_ms = lease.as_millis() as i64;
    let (busy_ids, busy_counts): (Vec<Uuid>, Vec<i64>) =
        busy.iter().map(|(id, n)| (id.0, *n)).unzip();
    let rows = client
        .query(
            &stmt,
            &[&limit, &lease_ms, &busy_ids, &busy_counts, &per_webhook],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| DueDelivery {
            id: row.get("delivery_id"),
            webhook_id: WebhookId(row.get("webhook_id")),
            url: row.get("url"),
            secret: row.get("secret"),
            attempt: row.get("attempts"),
            event: EventRecord::from_row(row),
        })
        .collect())
}

/// How one attempt ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Delivered {
        status_code: i32,
    },
    /// Retried at `retry_in` from now, or failed for good when `retry_in` is `None`.
    Failed {
        /// 0 when no answer came.
        status_code: i32,
        error: String,
        retry_in: Option<Duration>,
    },
}

/// Records an attempt's outcome. Guarded by the attempt number and `pending`, so an
/// attempt that outlived its lease (another replica took the delivery since) changes
/// nothing.
pub async fn record(
    client: &impl GenericClient,
    id: Uuid,
    attempt: i32,
    outcome: &Outcome,
) -> Result<()> {
    let stmt = client
        .prepare_cached(
            "UPDATE webhook_deliveries
             SET status = $3, last_status_code = $4, last_error = $5,
                 delivered_at = CASE WHEN $3 = 'delivered' THEN now() END,
                 next_attempt_at = CASE WHEN $6::bigint IS NULL THEN next_attempt_at
                                        ELSE now() + $6::bigint * interval '1 millisecond' END
             WHERE id = $1 AND attempts = $2 AND status = 'pending'",
        )
        .await?;
    let (status, code, error, retry_ms) = match outcome {
        Outcome::Delivered { status_code } => (DeliveryStatus::Delivered, *status_code, None, None),
        Outcome::Failed {
            status_code,
            error,
            retry_in,
        } => (
            if retry_in.is_some() {
                DeliveryStatus::Pending
            } else {
                DeliveryStatus::Failed
            },
            *status_code,
            Some(error.as_str()),
            retry_in.map(|d| d.as_millis() as i64),
        ),
    };
    client
        .execute(
            &stmt,
            &[&id, &attempt, &status.as_str(), &code, &error, &retry_ms],
        )
        .await?;
    Ok(())
}

/// Deletes up to `limit` finished (delivered or failed) deliveries created more than
/// `keep` ago, and deliveries of deleted webhooks; returns how many. Keeps the table
/// bounded by traffic over `keep`.
pub async fn prune(client: &impl GenericClient, keep: Duration, limit: i64) -> Result<u64> {
    let stmt = client
        .prepare_cached(
            "DELETE FROM webhook_deliveries WHERE id IN (
                 (SELECT id FROM webhook_deliveries
                  WHERE status <> 'pending'
                    AND created_at < now() - $1::bigint * interval '1 millisecond'
                  LIMIT $2)
                 UNION ALL
                 (SELECT d.id FROM webhook_deliveries d
                  JOIN webhooks w ON w.id = d.webhook_id AND w.deleted
                  WHERE d.status = 'pending'
                  LIMIT $2))",
        )
        .await?;
    let keep_ms = keep.as_millis() as i64;
    Ok(client.execute(&stmt, &[&keep_ms, &limit]).await?)
}

/// The event as ListEvents gives it, as JSON (the CLI's `-o json` shape): the payload
/// as an object, the producer by name, the time in RFC 3339.
pub fn event_json(e: &EventRecord) -> Value {
    let (producer, runner_id, epoch) = match e.producer {
        Producer::Manager => ("manager", String::new(), 0),
        Producer::Runner {
            runner_id, epoch, ..
        } => ("runner", runner_id.to_string(), epoch),
    };
    serde_json::json!({
        "run_id": e.run_id.to_string(),
        "seq": e.seq,
        "type": e.event_type,
        "payload": e.payload_value(),
        "producer": producer,
        "runner_id": runner_id,
        "epoch": epoch,
        "created_at": rfc3339(e.created_at),
        "ephemeral": false,
    })
}

/// A time as RFC 3339 (UTC), as protobuf's JSON mapping writes a Timestamp.
pub fn rfc3339(t: SystemTime) -> String {
    prost_types::Timestamp::from(t).to_string()
}
