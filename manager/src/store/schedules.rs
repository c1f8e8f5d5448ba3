//! Schedules: the rows of ScheduleService and their SQL — inserting (idempotent by name),
//! reading, listing, pausing, deleting, and the due-row lock the firing loop takes. What
//! a due time does to runs is `firing`.

mod timing;

use std::time::{Duration, SystemTime};

use agentrun_shared::error::reason;
use agentrun_shared::ids::{RunId, ScheduleId, SessionId};
use agentrun_shared::state::StreamMode;
use deadpool_postgres::{GenericClient, Pool};
use serde_json::{Map, Value, json};
use tokio_postgres::Row;
use uuid::Uuid;

use super::runs::NewRun;
use super::{Created, Tenant, fingerprint, parse_state};
use crate::error::{Error, Result};

pub use timing::{MIN_INTERVAL_MS, Timing};

/// What a due time does while the schedule's previous run has not ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// Create no run for this due time.
    Skip,
    /// Create the run anyway.
    Queue,
    /// Cancel the previous run, then create the new one.
    CancelPrevious,
}

impl Overlap {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Skip => "skip",
            Self::Queue => "queue",
            Self::CancelPrevious => "cancel_previous",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        Some(match text {
            "skip" => Self::Skip,
            "queue" => Self::Queue,
            "cancel_previous" => Self::CancelPrevious,
            _ => return None,
        })
    }
}

/// What happens to due times that passed while no manager was running (older than the
/// catch-up grace when fired).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    /// One run for all the missed due times together.
    One,
    /// No run for missed due times.
    None,
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::One => "one",
            Self::None => "none",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        Some(match text {
            "one" => Self::One,
            "none" => Self::None,
            _ => return None,
        })
    }
}

/// A validated CreateSchedule request.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub project_id: String,
    pub name: String,
    pub timing: Timing,
    /// The run each due time creates (no idempotency key, no delayed start).
    pub template: NewRun,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
}

impl NewSchedule {
    /// Tells a retried CreateSchedule from a different schedule under the same name.
    fn fingerprint(&self) -> Vec<u8> {
        let (cron, zone, interval_ms) = self.timing.parts();
        fingerprint(&json!([
            self.project_id,
            self.name,
            cron,
            zone,
            interval_ms,
            template_to_json(&self.template),
            self.overlap.as_str(),
            self.catch_up.as_str(),
        ]))
    }
}

/// A schedule as stored.
#[derive(Debug, Clone)]
pub struct ScheduleRecord {
    pub id: ScheduleId,
    pub tenant: Tenant,
    pub project_id: String,
    pub name: String,
    pub timing: Timing,
    pub template: NewRun,
    pub overlap: Overlap,
    pub catch_up: CatchUp,
    pub paused: bool,
    /// The next due time; `None` while paused.
    pub next_run_at: Option<SystemTime>,
    pub last_run_at: Option<SystemTime>,
    pub last_run_id: Option<RunId>,
    /// Also the anchor of an interval's due times.
    pub created_at: SystemTime,
}

impl ScheduleRecord {
    /// Reads a row selected as `schedules.*`.
    fn from_row(row: &Row) -> Result<Self> {
        let cron: Option<String> = row.get("cron");
        let zone: String = row.get("time_zone");
        let timing = match (cron, row.get::<_, Option<i64>>("interval_ms")) {
            (Some(expr), _) => Timing::cron("cron", &expr, "time_zone", &zone),
            (None, Some(ms)) => Timing::interval("interval_ms", ms),
            (None, None) => return Err(Error::Internal("a schedule without timing".into())),
        }
        .map_err(|err| Error::Internal(format!("stored schedule unreadable: {err}")))?;
        Ok(Self {
            id: ScheduleId(row.get("id")),
            tenant: Tenant(row.get("tenant_id")),
            project_id: row.get("project_id"),
            name: row.get("name"),
            timing,
            template: template_from_json(&row.get::<_, Value>("run_template"))?,
            overlap: parse_state(
                "overlap policy",
                row.get("overlap_policy"),
                Overlap::from_db,
            )?,
            catch_up: parse_state(
                "catch-up policy",
                row.get("catch_up_policy"),
                CatchUp::from_db,
            )?,
            paused: row.get("paused"),
            next_run_at: row.get("next_run_at"),
            last_run_at: row.get("last_run_at"),
            last_run_id: row.get::<_, Option<Uuid>>("last_run_id").map(RunId),
            created_at: row.get("created_at"),
        })
    }
}

/// The run template as stored: the validated fields of a CreateRun request.
fn template_to_json(r: &NewRun) -> Value {
    json!({
        "project_id": r.project_id,
        "session_id": r.session_id.map(|s| s.to_string()),
        "backend_profile": r.backend_profile,
        "input": r.input,
        "queue": r.queue,
        "priority": r.priority,
        "labels": r.labels,
        "max_attempts": r.max_attempts,
        "queue_timeout_ms": r.queue_timeout_ms,
        "run_timeout_ms": r.run_timeout_ms,
        "metadata": r.metadata,
        "stream_mode": r.stream_mode.as_str(),
        "concurrency_key": r.concurrency_key,
    })
}

fn template_from_json(v: &Value) -> Result<NewRun> {
    let bad = || Error::Internal("stored run template unreadable".into());
    let text = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let int = |key: &str| v.get(key).and_then(Value::as_i64);
    let object = |key: &str| -> Result<Map<String, Value>> {
        v.get(key)
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(bad)
    };
    Ok(NewRun {
        project_id: text("project_id").ok_or_else(bad)?,
        session_id: text("session_id")
            .map(|s| Uuid::try_parse(&s).map(SessionId).map_err(|_| bad()))
            .transpose()?,
        backend_profile: text("backend_profile").ok_or_else(bad)?,
        input: object("input")?,
        queue: text("queue").ok_or_else(bad)?,
        priority: int("priority").ok_or_else(bad)? as i32,
        labels: v
            .get("labels")
            .and_then(Value::as_array)
            .ok_or_else(bad)?
            .iter()
            .map(|l| l.as_str().map(str::to_owned).ok_or_else(bad))
            .collect::<Result<_>>()?,
        max_attempts: int("max_attempts").ok_or_else(bad)? as i32,
        queue_timeout_ms: int("queue_timeout_ms"),
        run_timeout_ms: int("run_timeout_ms"),
        metadata: object("metadata")?,
        idempotency_key: None,
        scheduled_at: None,
        stream_mode: parse_state(
            "stream mode",
            &text("stream_mode").ok_or_else(bad)?,
            StreamMode::from_db,
        )?,
        lineage: None,
        concurrency_key: text("concurrency_key"),
    })
}

/// Now, to the millisecond: an interval's due times are counted from the creation time
/// as stored, which must not depend on PostgreSQL's rounding of nanoseconds.
fn now_ms() -> SystemTime {
    let since = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64)
}

/// Most schedules one tenant may have.
pub const MAX_PER_TENANT: i64 = 1000;

/// Namespace (first key) of the per-tenant advisory lock that keeps the count exact.
const CREATE_LOCK: i32 = 0x6172_7363; // "arsc"

/// Inserts a schedule, due first at its first due time after now. A schedule of the
/// same name and definition is returned as is (a retry); one of the same name and a
/// different definition is ALREADY_EXISTS; a new one past [`MAX_PER_TENANT`] is
/// RESOURCE_EXHAUSTED. Creations of one tenant take turns, so the count holds.
pub async fn insert(
    pool: &Pool,
    tenant: &Tenant,
    new: &NewSchedule,
) -> Result<Created<ScheduleRecord>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&CREATE_LOCK, &tenant.as_str()],
    )
    .await?;
    let created = insert_locked(&tx, tenant, new).await?;
    tx.commit().await?;
    Ok(created)
}

async fn insert_locked(
    client: &impl GenericClient,
    tenant: &Tenant,
    new: &NewSchedule,
) -> Result<Created<ScheduleRecord>> {
    let created_at = now_ms();
    let next_run_at = new.timing.next_after(created_at, created_at);
    let (cron, zone, interval_ms) = new.timing.parts();
    let hash = new.fingerprint();
    let stmt = client
        .prepare_cached(
            "INSERT INTO schedules (id, tenant_id, project_id, name, cron, time_zone, interval_ms,
                                    run_template, overlap_policy, catch_up_policy, next_run_at,
                                    created_at, request_hash)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13
             WHERE (SELECT count(*) FROM schedules WHERE tenant_id = $2) < $14
             ON CONFLICT (tenant_id, name) DO NOTHING
             RETURNING *",
        )
        .await?;
    let row = client
        .query_opt(
            &stmt,
            &[
                &ScheduleId::new().0,
                &tenant.as_str(),
                &new.project_id,
                &new.name,
                &cron,
                &zone,
                &interval_ms,
                &template_to_json(&new.template),
                &new.overlap.as_str(),
                &new.catch_up.as_str(),
                &next_run_at,
                &created_at,
                &hash,
                &MAX_PER_TENANT,
            ],
        )
        .await?;
    if let Some(row) = row {
        return Ok(Created {
            value: ScheduleRecord::from_row(&row)?,
            created: true,
        });
    }
    let stmt = client
        .prepare_cached("SELECT * FROM schedules WHERE tenant_id = $1 AND name = $2")
        .await?;
    let row = client
        .query_opt(&stmt, &[&tenant.as_str(), &new.name])
        .await?;
    let Some(row) = row else {
        // Not a retry: the tenant is at its limit, or the name was freed meanwhile.
        let count: i64 = client
            .query_one(
                "SELECT count(*) FROM schedules WHERE tenant_id = $1",
                &[&tenant.as_str()],
            )
            .await?
            .get(0);
        return Err(if count >= MAX_PER_TENANT {
            Error::ResourceExhausted(format!(
                "tenant_schedules: the tenant already has {count} schedules, the limit is \
                 {MAX_PER_TENANT}; delete one first"
            ))
        } else {
            Error::Unavailable("schedule changed concurrently, retry".into())
        });
    };
    if row.get::<_, Vec<u8>>("request_hash") != hash {
        return Err(Error::AlreadyExists {
            reason: reason::IDEMPOTENCY_CONFLICT,
            message: format!("a different schedule is named {:?}", new.name),
        });
    }
    Ok(Created {
        value: ScheduleRecord::from_row(&row)?,
        created: false,
    })
}

pub async fn get(
    client: &impl GenericClient,
    tenant: &Tenant,
    id: ScheduleId,
) -> Result<ScheduleRecord> {
    let stmt = client
        .prepare_cached("SELECT * FROM schedules WHERE tenant_id = $1 AND id = $2")
        .await?;
    let row = client
        .query_opt(&stmt, &[&tenant.as_str(), &id.0])
        .await?
        .ok_or(Error::NotFound { what: "schedule" })?;
    ScheduleRecord::from_row(&row)
}

/// Locks one of the tenant's schedules; returns it and the database's clock.
pub async fn lock(
    tx: &impl GenericClient,
    tenant: &Tenant,
    id: ScheduleId,
) -> Result<(ScheduleRecord, SystemTime)> {
    let stmt = tx
        .prepare_cached(
            "SELECT *, now() AS db_now FROM schedules WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        )
        .await?;
    let row = tx
        .query_opt(&stmt, &[&tenant.as_str(), &id.0])
        .await?
        .ok_or(Error::NotFound { what: "schedule" })?;
    Ok((ScheduleRecord::from_row(&row)?, row.get("db_now")))
}

/// Locks the schedule due soonest that no other transaction holds (another replica may
/// be firing it); returns it and the database's clock.
pub async fn lock_next_due(
    tx: &impl GenericClient,
) -> Result<Option<(ScheduleRecord, SystemTime)>> {
    let stmt = tx
        .prepare_cached(
            "SELECT *, now() AS db_now FROM schedules
             WHERE NOT paused AND next_run_at <= now()
             ORDER BY next_run_at
             FOR UPDATE SKIP LOCKED
             LIMIT 1",
        )
        .await?;
    match tx.query_opt(&stmt, &[]).await? {
        Some(row) => Ok(Some((ScheduleRecord::from_row(&row)?, row.get("db_now")))),
        None => Ok(None),
    }
}

/// How long until the next schedule comes due (zero if one is due), by the database's
/// clock; `None` if no schedule is waiting.
pub async fn time_to_next_due(client: &impl GenericClient) -> Result<Option<Duration>> {
    let stmt = client
        .prepare_cached(
            // NULL (none waiting) when no row has a due time.
            "SELECT (extract(epoch FROM min(next_run_at) - now()) * 1000)::bigint
             FROM schedules WHERE NOT paused",
        )
        .await?;
    let ms: Option<i64> = client.query_one(&stmt, &[]).await?.get(0);
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0) as u64)))
}

/// After a due time or a trigger: the next due time, and the run created if one was.
pub async fn record_fired(
    tx: &impl GenericClient,
    id: ScheduleId,
    next_run_at: Option<SystemTime>,
    created: Option<RunId>,
) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "UPDATE schedules
             SET next_run_at = $2,
                 last_run_at = CASE WHEN $3::uuid IS NULL THEN last_run_at ELSE now() END,
                 last_run_id = coalesce($3, last_run_id)
             WHERE id = $1",
        )
        .await?;
    tx.execute(&stmt, &[&id.0, &next_run_at, &created.map(|r| r.0)])
        .await?;
    Ok(())
}

/// Pauses (`next_run_at` `None`) or resumes a locked schedule.
pub async fn set_paused(
    tx: &impl GenericClient,
    id: ScheduleId,
    paused: bool,
    next_run_at: Option<SystemTime>,
) -> Result<()> {
    let stmt = tx
        .prepare_cached("UPDATE schedules SET paused = $2, next_run_at = $3 WHERE id = $1")
        .await?;
    tx.execute(&stmt, &[&id.0, &paused, &next_run_at]).await?;
    Ok(())
}

/// The tenant's schedules after `after` (a page token), oldest first.
pub async fn list(
    client: &impl GenericClient,
    tenant: &Tenant,
    after: Option<ScheduleId>,
    limit: i64,
) -> Result<Vec<ScheduleRecord>> {
    let stmt = client
        .prepare_cached(
            "SELECT * FROM schedules
             WHERE tenant_id = $1 AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id LIMIT $3",
        )
        .await?;
    client
        .query(&stmt, &[&tenant.as_str(), &after.map(|a| a.0), &limit])
        .await?
        .iter()
        .map(ScheduleRecord::from_row)
        .collect()
}

/// Deletes one of the tenant's schedules; the runs it created are kept.
pub async fn delete(client: &impl GenericClient, tenant: &Tenant, id: ScheduleId) -> Result<()> {
    let stmt = client
        .prepare_cached("DELETE FROM schedules WHERE tenant_id = $1 AND id = $2")
        .await?;
    match client.execute(&stmt, &[&tenant.as_str(), &id.0]).await? {
        0 => Err(Error::NotFound { what: "schedule" }),
        _ => Ok(()),
    }
}
