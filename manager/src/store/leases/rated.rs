//! Claims under rate limits: the runs of tenants that have a rate limit (`rate_limits`)
//! are claimed here, not by the main claim statement, inside the same claim transaction.
//!
//! The buckets that can apply — the tenant's, those of the claiming runners' queues, and
//! the tenant's concurrency-key buckets — are locked `FOR UPDATE` in one fixed order
//! (tenant, scope, key), so claimers on every replica take tokens one after another and
//! never wait on each other in a cycle; then the level of each is read refilled to the
//! reading statement's time (`rate_limit_tokens`), which is after the lock was granted,
//! so bucket time only moves forward in the order claimers take tokens. Candidates are read in claim order (highest
//! priority, then oldest) per tenant and queue, `FOR UPDATE SKIP LOCKED`, leaving out
//! those whose bucket is empty; each run taken costs a token from every bucket that
//! applies to it, and the tenant's limit on active runs is kept as the main path keeps
//! it (the tenant's advisory lock is held, see `LOCK_LIMITED_TENANTS_SQL`). The buckets
//! are written back before commit.
//!
//! A run that waits for a token is retried when the earliest empty bucket has one again:
//! the claim answers when that is ([`Rated::retry_in`]) and the dispatcher sets a timer.
//!
//! Cost: only claims whose shape meets a rate-limited tenant with claimable work come
//! here; the others pay one pipelined query on the (small) `rate_limits` table.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use super::{DELIVER_OPEN_COMMANDS, Leased, RETURN_DELIVERED, RunnerIdentity, claim_run_set};
use crate::error::{Error, Result};

/// The rate-limited tenants a claim may reach (its runners' tenant, else all): every
/// one, and whether it has a run the claim could take. Parameters: $1 tenant (`NULL`:
/// any), $2 queues, $3 profiles, $4 labels.
pub(super) const RATED_TENANTS_SQL: &str = "SELECT t.tenant_id,
        EXISTS (SELECT 1 FROM runs r
                WHERE r.tenant_id = t.tenant_id AND r.status = 'pending' AND r.held IS NULL
                  AND r.queue = ANY($2::text[]) AND r.backend_profile = ANY($3::text[])
                  AND r.labels <@ $4::text[]
                  AND (r.scheduled_at IS NULL OR r.scheduled_at <= now()))
    FROM (SELECT DISTINCT tenant_id FROM rate_limits
          WHERE $1::text IS NULL OR tenant_id = $1::text) t";

/// Leases the runs this claim picked ($1), locked and pending, each to its slot's runner
/// ($2), for $3 ms.
static LEASE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH leasing AS (SELECT id FROM unnest($1::uuid[]) AS l(id)),
         {deliver}
         UPDATE runs SET {set}
         FROM unnest($1::uuid[], $2::uuid[]) AS p(id, runner) CROSS JOIN delivered_per_run d
         WHERE runs.id = p.id AND runs.status = 'pending'
         RETURNING runs.*, {RETURN_DELIVERED}",
        deliver = *DELIVER_OPEN_COMMANDS,
        set = claim_run_set("p.runner", "$3"),
    )
});

/// What the rate-limited part of a claim did.
#[derive(Debug, Default)]
pub(super) struct Rated {
    /// Runs leased, each to its slot's runner.
    pub claimed: Vec<Leased>,
    /// Some run waits for a token: when the earliest empty bucket has one again.
    pub retry_in: Option<Duration>,
}

/// One bucket as locked, refilled to now.
struct Bucket {
    tenant_id: String,
    scope: String,
    key: String,
    tokens: f64,
    runs: i32,
    period_ms: i64,
    taken: f64,
}

impl Bucket {
    fn left(&self) -> f64 {
        self.tokens - self.taken
    }

    /// How long until it holds a whole token again.
    fn refill_time(&self) -> Duration {
        let missing = (1.0 - self.left()).max(0.0);
        let ms = missing * self.period_ms as f64 / f64::from(self.runs.max(1));
        Duration::from_millis(ms.ceil() as u64 + 1)
    }
}

/// A claimable run of a rate-limited tenant.
struct Candidate {
    id: Uuid,
    tenant_id: String,
    queue: String,
    key: Option<String>,
    priority: i32,
    created_at: SystemTime,
}

/// Claims runs of the rate-limited tenants `busy` for `slots` (a runner per run wanted,
/// in order). `locked_tenants`: the limited tenants whose advisory lock this transaction
/// holds; a limited tenant not among them gets nothing.
#[allow(clippy::too_many_arguments)]
pub(super) async fn claim(
    tx: &impl GenericClient,
    shape: &RunnerIdentity,
    busy: &[String],
    slots: &[Uuid],
    ttl_ms: i64,
    default_max_active_runs: i32,
    locked_tenants: &[String],
) -> Result<Rated> {
    let tenant = shape.tenant.as_ref().map(|t| t.as_str());
    let lock = tx
        .prepare_cached(
            "SELECT 1 FROM rate_limits l
             WHERE l.tenant_id = ANY($1::text[]) AND (l.scope <> 'queue' OR l.key = ANY($2::text[]))
             ORDER BY l.tenant_id, l.scope, l.key
             FOR UPDATE",
        )
        .await?;
    // A statement of its own, after the lock: its snapshot has every committed take.
    let read = tx
        .prepare_cached(
            "SELECT l.tenant_id, l.scope, l.key, rate_limit_tokens(l), l.runs, l.period_ms,
                    statement_timestamp()
             FROM rate_limits l
             WHERE l.tenant_id = ANY($1::text[]) AND (l.scope <> 'queue' OR l.key = ANY($2::text[]))",
        )
        .await?;
    let rooms = tx
        .prepare_cached(
            "SELECT t.tenant_id, coalesce(tl.max_active_runs, nullif($2::int, 0)),
                    (SELECT count(*) FROM runs a WHERE a.tenant_id = t.tenant_id
                       AND a.status IN ('claimed', 'running', 'waiting'))
             FROM unnest($1::text[]) AS t(tenant_id)
             LEFT JOIN tenant_limits tl ON tl.tenant_id = t.tenant_id",
        )
        .await?;
    let draining = tx
        .prepare_cached(
            "SELECT id FROM runners
             WHERE id = ANY($1::uuid[]) AND draining AND tenant_id = coalesce($2::text, '')",
        )
        .await?;
    let bucket_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&busy, &shape.queues];
    let room_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
        [&busy, &default_max_active_runs];
    let draining_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&slots, &tenant];
    // Pipelined, run in this order: the read and the counts come after the lock.
    let (_, bucket_rows, room_rows, draining_rows) = tokio::try_join!(
        tx.query(&lock, &bucket_params),
        tx.query(&read, &bucket_params),
        tx.query(&rooms, &room_params),
        tx.query(&draining, &draining_params),
    )?;
    let draining: Vec<Uuid> = draining_rows.iter().map(|r| r.get(0)).collect();
    let slots: Vec<Uuid> = slots
        .iter()
        .copied()
        .filter(|s| !draining.contains(s))
        .collect();
    // The time the levels were read at: what the buckets are refilled to.
    let read_at: Option<SystemTime> = bucket_rows.first().map(|r| r.get(6));
    let mut buckets: Vec<Bucket> = bucket_rows
        .iter()
        .map(|r| Bucket {
            tenant_id: r.get(0),
            scope: r.get(1),
            key: r.get(2),
            tokens: r.get(3),
            runs: r.get(4),
            period_ms: r.get(5),
            taken: 0.0,
        })
        .collect();
    let index: HashMap<(String, String, String), usize> = buckets
        .iter()
        .enumerate()
        .map(|(i, b)| ((b.tenant_id.clone(), b.scope.clone(), b.key.clone()), i))
        .collect();
    let find = |tenant: &str, scope: &str, key: &str| {
        index
            .get(&(tenant.to_owned(), scope.to_owned(), key.to_owned()))
            .copied()
    };
    // Room per tenant: `None` is no limit.
    let mut room: HashMap<String, Option<i64>> = HashMap::new();
    for row in &room_rows {
        let tenant_id: String = row.get(0);
        let max: Option<i32> = row.get(1);
        let active: i64 = row.get(2);
        let r = match max {
            None => None,
            Some(_) if !locked_tenants.contains(&tenant_id) => Some(0),
            Some(max) => Some((i64::from(max) - active).max(0)),
        };
        room.insert(tenant_id, r);
    }

    // Which (tenant, queue) pairs can give a run at all, and which keys are empty.
    let empty = |i: Option<usize>, buckets: &[Bucket]| i.is_some_and(|i| buckets[i].left() < 1.0);
    let mut pair_tenants = Vec::new();
    let mut pair_queues = Vec::new();
    for tenant_id in busy {
        if room.get(tenant_id).copied().flatten() == Some(0)
            || empty(find(tenant_id, "tenant", ""), &buckets)
        {
            continue;
        }
        for queue in &shape.queues {
            if !empty(find(tenant_id, "queue", queue), &buckets) {
                pair_tenants.push(tenant_id.clone());
                pair_queues.push(queue.clone());
            }
        }
    }
    let empty_keys: Vec<String> = buckets
        .iter()
        .filter(|b| b.scope == "concurrency_key" && b.left() < 1.0)
        .map(|b| format!("{}\n{}", b.tenant_id, b.key))
        .collect();

    let mut candidates = Vec::new();
    if !pair_tenants.is_empty() && !slots.is_empty() {
        let pick = tx
            .prepare_cached(
                "SELECT c.id, c.tenant_id, c.queue, c.concurrency_key, c.priority, c.created_at
                 FROM unnest($1::text[], $2::text[]) AS p(tenant_id, queue)
                 CROSS JOIN LATERAL (
                     SELECT r.id, r.tenant_id, r.queue, r.concurrency_key, r.priority, r.created_at
                     FROM runs r
                     WHERE r.tenant_id = p.tenant_id AND r.queue = p.queue
                       AND r.status = 'pending' AND r.held IS NULL
                       AND r.backend_profile = ANY($3::text[]) AND r.labels <@ $4::text[]
                       AND (r.scheduled_at IS NULL OR r.scheduled_at <= now())
                       AND (r.concurrency_key IS NULL
                            OR NOT (r.tenant_id || E'\\n' || r.concurrency_key) = ANY($5::text[]))
                     ORDER BY r.priority DESC, r.created_at, r.id
                     LIMIT $6
                     FOR UPDATE SKIP LOCKED
                 ) c",
            )
            .await?;
        let rows = tx
            .query(
                &pick,
                &[
                    &pair_tenants,
                    &pair_queues,
                    &shape.backend_profiles,
                    &shape.labels,
                    &empty_keys,
                    &(slots.len() as i64),
                ],
            )
            .await?;
        candidates = rows
            .iter()
            .map(|r| Candidate {
                id: r.get(0),
                tenant_id: r.get(1),
                queue: r.get(2),
                key: r.get(3),
                priority: r.get(4),
                created_at: r.get(5),
            })
            .collect();
    }
    candidates.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then(a.created_at.cmp(&b.created_at))
            .then(a.id.cmp(&b.id))
    });

    // Each run takes a token from every bucket that applies to it, while all have one.
    let mut picked: Vec<Uuid> = Vec::new();
    let mut waits = false;
    for c in &candidates {
        if picked.len() == slots.len() {
            break;
        }
        if room.get(&c.tenant_id).copied().flatten() == Some(0) {
            continue;
        }
        let applies: Vec<usize> = [
            find(&c.tenant_id, "tenant", ""),
            find(&c.tenant_id, "queue", &c.queue),
            c.key
                .as_deref()
                .and_then(|k| find(&c.tenant_id, "concurrency_key", k)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if applies.iter().any(|&i| buckets[i].left() < 1.0) {
            waits = true;
            continue;
        }
        for &i in &applies {
            buckets[i].taken += 1.0;
        }
        if let Some(Some(left)) = room.get_mut(&c.tenant_id) {
            *left -= 1;
        }
        picked.push(c.id);
    }

    let mut claimed = Vec::new();
    if !picked.is_empty() {
        let lease = tx.prepare_cached(&LEASE_SQL).await?;
        let runners: Vec<Uuid> = slots[..picked.len()].to_vec();
        let rows = tx.query(&lease, &[&picked, &runners, &ttl_ms]).await?;
        claimed = rows.iter().map(Leased::from_row).collect::<Result<_>>()?;
        if claimed.len() != picked.len() {
            // The rows were locked by this transaction and pending: this cannot happen.
            return Err(Error::Internal(
                "a rate-limited claim lost a locked run".into(),
            ));
        }
        let used: Vec<&Bucket> = buckets.iter().filter(|b| b.taken > 0.0).collect();
        let take = tx
            .prepare_cached(
                "UPDATE rate_limits l SET tokens = u.tokens,
                        refilled_at = greatest(l.refilled_at, $5::timestamptz)
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[])
                      AS u(tenant_id, scope, key, tokens)
                 WHERE l.tenant_id = u.tenant_id AND l.scope = u.scope AND l.key = u.key",
            )
            .await?;
        tx.execute(
            &take,
            &[
                &used
                    .iter()
                    .map(|b| b.tenant_id.as_str())
                    .collect::<Vec<_>>(),
                &used.iter().map(|b| b.scope.as_str()).collect::<Vec<_>>(),
                &used.iter().map(|b| b.key.as_str()).collect::<Vec<_>>(),
                &used.iter().map(|b| b.left()).collect::<Vec<_>>(),
                &read_at,
            ],
        )
        .await?;
    }
    // Runs wait for a token when a bucket that applies ran dry: retry when the first
    // empty one refills.
    let dry = waits || candidates.len() < slots.len();
    let retry_in = dry
        .then(|| {
            buckets
                .iter()
                .filter(|b| b.left() < 1.0)
                .map(Bucket::refill_time)
                .min()
        })
        .flatten();
    Ok(Rated { claimed, retry_in })
}
