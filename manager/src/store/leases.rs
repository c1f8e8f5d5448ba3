//! Leases: claiming runs, renewing leases, and every write a runner makes under one.
//!
//! A lease is `(run, runner, epoch, expires_at)` on the run row. `epoch` rises by one on
//! every claim and is the fencing token: [`fence`] refuses any write that names a
//! stale epoch (or another runner, or a run no longer active) with `lease_lost`. The
//! writes made under a lease (events, command reports, finish, release) are batched in
//! [`writes`].

mod hello;
mod rated;
mod stream_modes;
mod writes;

pub use hello::{Hello, Welcome, hello};
pub use writes::{LeaseWrite, Written, write, write_one};

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, SystemTime};

use agentrun_shared::error::reason;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::payload::{redact, to_text};
use agentrun_shared::state::RunStatus;
use deadpool_postgres::{GenericClient, Pool};
use serde_json::json;
use uuid::Uuid;

use super::Tenant;
use super::commands::{self, CommandRecord};
use super::context::{self, Context};
use super::events::{self, NewEvent};
use super::runs::{self, RunRecord};
use crate::error::{Error, Result};

/// Who a runner is and what it can serve.
#[derive(Debug, Clone)]
pub struct RunnerIdentity {
    pub id: RunnerId,
    pub name: String,
    pub labels: Vec<String>,
    pub backend_profiles: Vec<String>,
    pub queues: Vec<String>,
    pub max_concurrency: i32,
    pub version: String,
    /// The tenant its API key is bound to: it claims, adopts and writes only that
    /// tenant's runs. `None` (authentication disabled): every tenant's.
    pub tenant: Option<Tenant>,
}

/// A run newly leased to a runner, with the commands it must carry out and the
/// conversation so far.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub run: RunRecord,
    pub commands: Vec<CommandRecord>,
    pub context: Context,
}

fn active_statuses() -> Vec<&'static str> {
    RunStatus::ACTIVE.iter().map(|s| s.as_str()).collect()
}

fn ttl_millis(ttl: Duration) -> i64 {
    ttl.as_millis() as i64
}

/// Records the runner as seen now (its identity may change between connections).
async fn upsert_runner(tx: &impl GenericClient, runner: &RunnerIdentity) -> Result<()> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO runners (id, name, labels, backend_profiles, queues, max_concurrency, version,
                                  tenant_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (tenant_id, id) DO UPDATE SET name = $2, labels = $3, backend_profiles = $4,
                 queues = $5, max_concurrency = $6, version = $7, last_heartbeat_at = now()",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &runner.id.0,
            &runner.name,
            &runner.labels,
            &runner.backend_profiles,
            &runner.queues,
            &runner.max_concurrency,
            &runner.version,
            &runner_tenant(runner.tenant.as_ref()),
        ],
    )
    .await?;
    Ok(())
}

/// The `runners.tenant_id` of a runner acting for `tenant`: runner ids are per tenant,
/// and `''` is the tenant of a runner without an API key (it serves every tenant).
fn runner_tenant(tenant: Option<&Tenant>) -> &str {
    tenant.map_or("", Tenant::as_str)
}

/// Namespace (first key) of the per-tenant advisory locks that make limits exact.
const TENANT_LIMIT_LOCK: i32 = 0x6172_746c; // "artl"

/// The tenants with pending runs, by a skip scan of the pending-runs index (one probe per
/// tenant, not one row per pending run). Shared by the two claim statements.
const PENDING_TENANTS: &str = "pending_tenants(tenant_id) AS (
        (SELECT tenant_id FROM runs WHERE status = 'pending' AND held IS NULL
         ORDER BY tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT r.tenant_id FROM runs r WHERE r.status = 'pending' AND r.held IS NULL
                  AND r.tenant_id > p.tenant_id
                ORDER BY r.tenant_id LIMIT 1)
        FROM pending_tenants p WHERE p.tenant_id IS NOT NULL
    )";

/// The common tail of the statements that lease runs (a claim, an adoption), given the
/// runs that may have commands in `commands` as `leasing(id)` (a claim names only those,
/// [`runs::HAS_COMMAND_ROWS`]; an adoption names all it leases): every open command of a
/// run in `commands` is delivered to its new holder (the first turn its row carries is
/// delivered by [`HAND_OVER_SET`]), in the same snapshot as it is counted, and
/// `delivered_per_run` says which. The
/// lease's row update then moves the run's event counter on by the events [`hand_over`]
/// appends (`run.claimed` and a `command.delivered` each), so the hand-over writes no
/// row version of its own. A command committed after the statement's snapshot stays
/// pending and goes with the next heartbeat.
///
/// `delivered_per_run` is one row, a JSON object from run id to its delivered command
/// ids in seq order, that the lease's update looks each run up in ([`HAND_OVER_SET`],
/// [`RETURN_DELIVERED`]). As a row per run it had to be joined, and the planner,
/// estimating the delivered commands at a row or two, joined them by a nested loop:
/// quadratic in the runs leased, some 40 % of a 1,000-run claim's time.
static DELIVER_OPEN_COMMANDS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "delivered AS (
            UPDATE commands c SET status = 'delivered', updated_at = now()
            -- A probe of the open commands' index per run; a join would scan them all.
            WHERE c.run_id = ANY(ARRAY(SELECT id FROM leasing)) AND c.status IN ({open})
            RETURNING c.run_id, c.id, c.seq
        ),
        delivered_per_run AS (
            SELECT coalesce(jsonb_object_agg(run_id::text, ids), '{{}}') AS ids FROM (
                SELECT run_id, jsonb_agg(id ORDER BY seq) AS ids FROM delivered GROUP BY run_id
            ) per_run
        )",
        open = *commands::OPEN_STATUSES
    )
});

/// What a lease's row update sets besides the lease: the first turn the run row carries
/// delivered when it is open, and the counter moved on by `run.claimed` and a
/// `command.delivered` for each command delivered (see [`DELIVER_OPEN_COMMANDS`],
/// cross-joined as `d`).
static HAND_OVER_SET: LazyLock<String> = LazyLock::new(|| {
    let first_turn_open = format!("runs.first_turn_status IN ({})", *commands::OPEN_STATUSES);
    format!(
        "first_turn_status = CASE WHEN {first_turn_open} THEN 'delivered'
                                  ELSE runs.first_turn_status END,
         first_turn_updated_at = CASE WHEN {first_turn_open} THEN now()
                                      ELSE runs.first_turn_updated_at END,
         last_event_seq = runs.last_event_seq + 1
             + CASE WHEN {first_turn_open} THEN 1 ELSE 0 END
             + coalesce(jsonb_array_length(d.ids -> runs.id::text), 0)"
    )
});

/// The row update of a pending run that a claim leases to `runner` for `ttl_ms` (SQL
/// expressions): a new epoch, the run's deadline started, the hand-over counted.
fn claim_run_set(runner: &str, ttl_ms: &str) -> String {
    format!(
        "status = 'claimed', lease_runner_id = {runner}, lease_epoch = runs.lease_epoch + 1,
         lease_expires_at = now() + {ttl_ms}::bigint * interval '1 millisecond',
         lease_runner_seq = 0, claimed_at = now(), updated_at = now(),
         run_deadline = now() + runs.run_timeout_ms * interval '1 millisecond',
         {hand_over}",
        hand_over = *HAND_OVER_SET
    )
}

/// What a lease statement returns besides the run: the commands it delivered, in seq
/// order — first the first turn the run row carries when it was open (only then is it
/// `delivered` after [`HAND_OVER_SET`]).
const RETURN_DELIVERED: &str = "array_cat(
           CASE WHEN runs.first_turn_status = 'delivered' THEN ARRAY[runs.first_turn_id]
                ELSE '{}'::uuid[] END,
           ARRAY(SELECT id::uuid
                 FROM jsonb_array_elements_text(d.ids -> runs.id::text) WITH ORDINALITY AS e(id, k)
                 ORDER BY k)) AS delivered_ids";

/// A run as a lease statement left it: leased, its open commands delivered (their ids,
/// in seq order) and its counter moved on by its hand-over's events. The first turn its
/// row carries comes with it, so handing over a run whose only command is that turn
/// reads no command.
#[derive(Debug)]
struct Leased {
    run: RunRecord,
    delivered: Vec<Uuid>,
    first_turn: Option<CommandRecord>,
}

impl Leased {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self> {
        Ok(Self {
            run: RunRecord::from_row(row)?,
            delivered: row.get("delivered_ids"),
            first_turn: CommandRecord::first_turn_of_run_row(row)?,
        })
    }

    /// Delivered commands that live in `commands`, not on the run's row.
    fn delivered_from_commands(&self) -> impl Iterator<Item = Uuid> + '_ {
        let on_row = self.first_turn.as_ref().map(|turn| turn.id.0);
        self.delivered
            .iter()
            .copied()
            .filter(move |id| Some(*id) != on_row)
    }
}

/// Statement 1 of a claim: takes the advisory lock of every limited tenant that has room
/// and a pending run this runner could take, in lock-key order (so claimers never wait
/// on each other in a cycle), and returns those tenants. A tenant at its limit is not
/// locked: it gets nothing from this claim anyway. Parameters: $1 the runners claiming
/// (one shape: see [`claim_for`]), $2 queues, $3 profiles, $4 labels, $5 default limit,
/// $6 their tenant (`NULL`: any).
static LOCK_LIMITED_TENANTS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH RECURSIVE {PENDING_TENANTS},
         limited AS (
             SELECT p.tenant_id, coalesce(tl.max_active_runs, $5::int) AS max_active
             FROM pending_tenants p LEFT JOIN tenant_limits tl ON tl.tenant_id = p.tenant_id
             WHERE p.tenant_id IS NOT NULL AND (tl.max_active_runs IS NOT NULL OR $5::int > 0)
               AND ($6::text IS NULL OR p.tenant_id = $6::text)
               -- Checked once, first: with no limit at all (the usual case) the pending
               -- runs are not scanned for their tenants.
               AND ($5::int > 0 OR EXISTS (SELECT 1 FROM tenant_limits
                                           WHERE max_active_runs IS NOT NULL))
         ),
         wanted AS (
             SELECT l.tenant_id FROM limited l
             WHERE EXISTS (SELECT 1 FROM unnest($1::uuid[]) AS c(runner)
                           WHERE NOT coalesce((SELECT draining FROM runners w
                                               WHERE w.id = c.runner
                                                 AND w.tenant_id = coalesce($6::text, '')), false))
               AND (SELECT count(*) FROM (SELECT 1 FROM runs a WHERE a.tenant_id = l.tenant_id
                        AND a.status IN ('claimed', 'running', 'waiting') LIMIT l.max_active) full_up)
                   < l.max_active
               AND EXISTS (SELECT 1 FROM runs r
                           WHERE r.tenant_id = l.tenant_id AND r.status = 'pending'
                             AND r.held IS NULL AND r.queue = ANY($2::text[]) AND r.backend_profile = ANY($3::text[])
                             AND r.labels <@ $4::text[]
                             AND (r.scheduled_at IS NULL OR r.scheduled_at <= now()))
             -- Locks are taken in key order, so claimers never wait on each other in a cycle.
             ORDER BY hashtext(l.tenant_id), l.tenant_id
             -- A fence: the filters above run first, and the locks below keep this order.
             OFFSET 0
         )
         SELECT tenant_id, pg_advisory_xact_lock({TENANT_LIMIT_LOCK}, hashtext(tenant_id)) FROM wanted"
    )
});

/// Statement 2 of a claim: picks and leases the runs. Parameters: $1 the slots (a runner
/// id per run wanted, in the order they are to be filled), $2 queues, $3 profiles, $4
/// labels, $5 batch size (the number of slots), $6 lease ttl in ms, $7 default limit, $8
/// the limited tenants whose lock this transaction holds, $9 the runners' tenant (`NULL`:
/// any), $10 tenants with rate limits (claimed by [`rated`] instead).
///
/// Runs held by their concurrency key (`held`) are never eligible; the pending-runs
/// index leaves them out.
///
/// - `slots`: the slots of runners not draining, numbered.
/// - `tenants` keeps only the runner's tenant when it has one (its API key's), so a
///   runner never leases another tenant's run.
///
/// - `tenants`: tenants with pending work and their limit (`NULL`: none). A limited
///   tenant whose lock we do not hold (it was full, or had nothing for this runner) is
///   left out, so a limit is never exceeded.
/// - `room`: each tenant's active runs — counted only when it matters: the tenant is
///   limited, or several tenants compete — and how many it may take now (at most the
///   batch, at most what its limit leaves).
/// - `available`: how many runs this runner could take from each tenant (eligible by
///   queue, profile, labels and `scheduled_at`; capped at its room), read from the
///   head of each tenant's queue in index order. No row locks.
/// - `quota`: the batch shared out. A tenant's k-th run would be its `active + k`-th
///   active run; the batch takes the lowest of those slots across tenants (ties: the
///   tenant whose waiting work is oldest). Tenants are interleaved and the least loaded
///   goes first, so one tenant's backlog never delays another's first run, even with a
///   batch of one. A lone tenant's quota is its room, and `available` is not read:
///   `locked` takes what there is. That spares a scan of the head of the pending
///   runs' index, which walks every entry the claims since the last vacuum left dead
///   there (some 750 pages, half a millisecond, 50,000 runs into a drain).
/// - `locked`: each tenant's quota, highest priority then oldest, locked with
///   `FOR UPDATE SKIP LOCKED` — rows other claimers hold are passed over and the scan
///   goes on, so concurrent claimers still fill their batches; `status = 'pending'` is
///   re-checked on the locked row version. (A runner serving several queues may lock up
///   to a quota per queue; `picked` keeps the best and the rest are left pending.)
/// - `picked` numbers the runs kept, best first, and the k-th goes to the k-th slot.
fn claim_sql() -> String {
    let eligible = "r.status = 'pending' AND r.held IS NULL AND r.backend_profile = ANY($3::text[])
                    AND r.labels <@ $4::text[]
                    AND (r.scheduled_at IS NULL OR r.scheduled_at <= now())";
    format!(
        "WITH RECURSIVE {PENDING_TENANTS},
         slots AS MATERIALIZED (
             SELECT s.runner, row_number() OVER (ORDER BY s.ord) AS slot
             FROM unnest($1::uuid[]) WITH ORDINALITY AS s(runner, ord)
             WHERE s.runner NOT IN (SELECT w.id FROM runners w
                                    WHERE w.id = ANY($1::uuid[]) AND w.draining
                                      AND w.tenant_id = coalesce($9::text, ''))
         ),
         tenants AS (
             SELECT p.tenant_id, coalesce(tl.max_active_runs, nullif($7::int, 0)) AS max_active
             FROM pending_tenants p LEFT JOIN tenant_limits tl ON tl.tenant_id = p.tenant_id
             WHERE p.tenant_id IS NOT NULL
               AND ($9::text IS NULL OR p.tenant_id = $9::text)
               AND NOT p.tenant_id = ANY($10::text[])
               AND EXISTS (SELECT 1 FROM slots)
         ),
         room AS MATERIALIZED (
             SELECT tenant_id, active,
                    CASE WHEN max_active IS NULL THEN $5::bigint
                         ELSE least($5::bigint, greatest(max_active - active, 0)) END AS room
             FROM (
                 SELECT t.tenant_id, t.max_active,
                        CASE WHEN t.max_active IS NOT NULL OR (SELECT count(*) FROM tenants) > 1
                             THEN (SELECT count(*) FROM runs a WHERE a.tenant_id = t.tenant_id
                                     AND a.status IN ('claimed', 'running', 'waiting'))
                             ELSE 0 END AS active
                 FROM tenants t
                 WHERE t.max_active IS NULL OR t.tenant_id = ANY($8::text[])
             ) load
         ),
         available AS (
             SELECT room.tenant_id, room.active, least(room.room, sum(c.n))::bigint AS n,
                    min(c.oldest) AS oldest
             FROM room
             CROSS JOIN unnest($2::text[]) AS q(queue)
             CROSS JOIN LATERAL (
                 SELECT count(*) AS n, min(created_at) AS oldest FROM (
                     SELECT r.created_at FROM runs r
                     WHERE r.tenant_id = room.tenant_id AND r.queue = q.queue AND {eligible}
                     ORDER BY r.priority DESC, r.created_at, r.id
                     LIMIT room.room
                 ) head
             ) c
             WHERE room.room > 0 AND (SELECT count(*) FROM room) > 1
             GROUP BY room.tenant_id, room.active, room.room
         ),
         quota AS (
             SELECT tenant_id, count(*) AS n FROM (
                 SELECT a.tenant_id FROM available a
                 CROSS JOIN LATERAL generate_series(1, a.n) AS g(k)
                 ORDER BY a.active + g.k, a.oldest, a.tenant_id
                 LIMIT $5::bigint
             ) chosen
             GROUP BY tenant_id
             UNION ALL
             SELECT tenant_id, room FROM room
             WHERE room > 0 AND (SELECT count(*) FROM room) = 1
         ),
         locked AS MATERIALIZED (
             SELECT quota.tenant_id, quota.n AS quota, l.id, l.priority, l.created_at,
                    l.has_command_rows
             FROM quota
             CROSS JOIN unnest($2::text[]) AS q(queue)
             CROSS JOIN LATERAL (
                 SELECT r.id, r.priority, r.created_at, {has_rows} AS has_command_rows
                 FROM runs r
                 WHERE r.tenant_id = quota.tenant_id AND r.queue = q.queue AND {eligible}
                 ORDER BY r.priority DESC, r.created_at, r.id
                 LIMIT quota.n
                 FOR UPDATE SKIP LOCKED
             ) l
         ),
         picked AS MATERIALIZED (
             SELECT id, has_command_rows,
                    row_number() OVER (ORDER BY priority DESC, created_at, id) AS slot
             FROM (
                 SELECT id, quota, priority, created_at, has_command_rows,
                        row_number() OVER (PARTITION BY tenant_id
                                           ORDER BY priority DESC, created_at, id) AS k
                 FROM locked
             ) best
             WHERE k <= quota
         ),
         leasing AS (SELECT id FROM picked WHERE has_command_rows),
         {deliver}
         UPDATE runs SET {set}
         FROM picked JOIN slots USING (slot) CROSS JOIN delivered_per_run d
         WHERE runs.id = picked.id
         RETURNING runs.*, {RETURN_DELIVERED}",
        deliver = *DELIVER_OPEN_COMMANDS,
        set = claim_run_set("slots.runner", "$6"),
        has_rows = runs::HAS_COMMAND_ROWS,
    )
}

/// [`claim_sql`]. Public for the test of its plan.
pub static CLAIM_SQL: LazyLock<String> = LazyLock::new(claim_sql);

/// Claims up to `max_runs` pending runs the runner can serve — its queues, a backend
/// profile it has, labels it all has, `scheduled_at` reached — fairly across tenants and
/// within each tenant's limit on active runs (`tenant_limits`, else
/// `default_max_active_runs`; 0 means none), highest priority first, then oldest, within
/// a tenant. A draining runner gets nothing.
///
/// `register` records the runner as seen first (the unary ClaimRuns).
pub async fn claim(
    pool: &Pool,
    runner: &RunnerIdentity,
    register: bool,
    max_runs: i64,
    ttl: Duration,
    default_max_active_runs: i32,
) -> Result<Vec<Assignment>> {
    let slots = vec![runner.id; usize::try_from(max_runs).unwrap_or(0)];
    let registered = register.then_some(runner);
    claim_for(
        pool,
        &[runner],
        &slots,
        registered,
        ttl,
        default_max_active_runs,
    )
    .await
    .map(|claimed| claimed.assignments)
}

/// [`claim`] for many runners of one shape (the same tenant, queues, profiles and labels,
/// as [`crate::dispatcher`] groups them) in one transaction: `slots` names a runner per
/// run wanted, and the best run goes to the first slot, the next to the second, and so
/// on. Runners that are draining are left out. Each assignment's run names its runner
/// (`lease_runner_id`).
///
/// Tenants with rate limits are claimed apart, first, by [`rated::claim`] in the same
/// transaction (it answers when to retry runs that wait for a token).
///
/// Two statements (see [`LOCK_LIMITED_TENANTS_SQL`] and [`CLAIM_SQL`]): the first takes a
/// per-tenant advisory transaction lock for each limited tenant with room and work, so
/// claimers serving the same limited tenant take turns and the second statement, whose
/// snapshot starts after the lock, counts every committed claim: limits are exact, never
/// overshot by concurrent claimers on any replica. Unlimited tenants take no lock. Rows
/// are leased with `FOR UPDATE SKIP LOCKED`, so concurrent claimers never get the same
/// run; each claim bumps the epoch and records `run.claimed`.
///
/// `register`: a runner to record as seen first (the unary ClaimRuns); a Connect stream's
/// runner was registered by its hello, and a claim that finds nothing writes nothing.
pub async fn claim_for(
    pool: &Pool,
    runners: &[&RunnerIdentity],
    slots: &[RunnerId],
    register: Option<&RunnerIdentity>,
    ttl: Duration,
    default_max_active_runs: i32,
) -> Result<Claimed> {
    let Some(shape) = runners.first() else {
        return Ok(Claimed::default());
    };
    if slots.is_empty() {
        return Ok(Claimed::default());
    }
    let tenant = shape.tenant.as_ref().map(Tenant::as_str);
    let runner_ids: Vec<Uuid> = runners.iter().map(|r| r.id.0).collect();
    let slots: Vec<Uuid> = slots.iter().map(|r| r.0).collect();
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let lock_limited = async {
        let stmt = tx.prepare_cached(&LOCK_LIMITED_TENANTS_SQL).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &runner_ids,
                    &shape.queues,
                    &shape.backend_profiles,
                    &shape.labels,
                    &default_max_active_runs,
                    &tenant,
                ],
            )
            .await?;
        Ok::<_, Error>(rows.iter().map(|r| r.get(0)).collect::<Vec<String>>())
    };
    let plan_once = super::plan_generically(&tx);
    // Pipelined on the one connection, sent and run in this order: no extra round trips.
    let registered = async {
        match register {
            Some(runner) => upsert_runner(&tx, runner).await,
            None => Ok(()),
        }
    };
    let rated_tenants = async {
        let stmt = tx.prepare_cached(rated::RATED_TENANTS_SQL).await?;
        let rows = tx
            .query(
                &stmt,
                &[
                    &tenant,
                    &shape.queues,
                    &shape.backend_profiles,
                    &shape.labels,
                ],
            )
            .await?;
        Ok::<_, Error>(
            rows.iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
                .collect::<Vec<_>>(),
        )
    };
    let ((), (), locked_tenants, rated_tenants) =
        tokio::try_join!(registered, plan_once, lock_limited, rated_tenants)?;
    // Runs of tenants with rate limits first: their tokens are scarce, and the main
    // claim below leaves those tenants out.
    let busy: Vec<String> = rated_tenants
        .iter()
        .filter(|(_, busy)| *busy)
        .map(|(t, _)| t.clone())
        .collect();
    let rated = if busy.is_empty() {
        rated::Rated::default()
    } else {
        rated::claim(
            &tx,
            shape,
            &busy,
            &slots,
            ttl_millis(ttl),
            default_max_active_runs,
            &locked_tenants,
        )
        .await?
    };
    let rated_tenants: Vec<String> = rated_tenants.into_iter().map(|(t, _)| t).collect();
    let slots = &slots[rated.claimed.len()..];
    let rows = if slots.is_empty() {
        Vec::new()
    } else {
        let stmt = tx.prepare_cached(&CLAIM_SQL).await?;
        tx.query(
            &stmt,
            &[
                &slots,
                &shape.queues,
                &shape.backend_profiles,
                &shape.labels,
                &(slots.len() as i64),
                &ttl_millis(ttl),
                &default_max_active_runs,
                &locked_tenants,
                &tenant,
                &rated_tenants,
            ],
        )
        .await?
    };
    let mut claimed: Vec<Leased> = rows.iter().map(Leased::from_row).collect::<Result<_>>()?;
    claimed.extend(rated.claimed);
    claimed.sort_by(|a, b| {
        b.run
            .priority
            .cmp(&a.run.priority)
            .then(a.run.created_at.cmp(&b.run.created_at))
    });
    let by_id: HashMap<RunnerId, &RunnerIdentity> = runners.iter().map(|r| (r.id, *r)).collect();
    let claimed = claimed
        .into_iter()
        .map(|leased| {
            let runner = leased.run.lease_runner_id.and_then(|id| by_id.get(&id));
            let runner = runner.ok_or_else(|| {
                Error::Internal("a claim leased a run to a runner that did not ask".into())
            })?;
            Ok((leased, *runner))
        })
        .collect::<Result<_>>()?;
    let assignments = hand_over(&tx, claimed, false).await?;
    tx.commit().await?;
    Ok(Claimed {
        assignments,
        retry_in: rated.retry_in,
    })
}

/// What [`claim_for`] leased.
#[derive(Debug, Default)]
pub struct Claimed {
    pub assignments: Vec<Assignment>,
    /// Some run waits for a rate limit's token: claim again after this long.
    pub retry_in: Option<Duration>,
}

/// Records `run.claimed` for runs just leased, each to its runner (`resumed`: taken back
/// by a restarted runner), with a `command.delivered` for each command the lease
/// statement delivered, and reads their conversation context ([`context::load`], one
/// statement for all of them), in run order. The runs' counters already count these
/// events ([`DELIVER_OPEN_COMMANDS`]).
///
/// Only a run in a session, one leased before (its epoch is past its first claim's) or
/// one re-run or forked from another can have context, so a claim of fresh runs outside
/// sessions reads nothing more.
async fn hand_over(
    tx: &impl GenericClient,
    runs: Vec<(Leased, &RunnerIdentity)>,
    resumed: bool,
) -> Result<Vec<Assignment>> {
    let delivered_ids: Vec<Uuid> = runs
        .iter()
        .flat_map(|(leased, _)| leased.delivered_from_commands())
        .collect();
    let run_ids: Vec<Uuid> = runs.iter().map(|(leased, _)| leased.run.id.0).collect();
    let mut delivered: HashMap<Uuid, CommandRecord> =
        commands::get_many(tx, &run_ids, &delivered_ids)
            .await?
            .into_iter()
            .map(|c| (c.id.0, c))
            .collect();
    let mut new_events = Vec::with_capacity(runs.len() + delivered_ids.len());
    let mut assigned = Vec::with_capacity(runs.len());
    for (leased, runner) in runs {
        if let Some(turn) = leased.first_turn {
            delivered.insert(turn.id.0, turn);
        }
        let run = leased.run;
        let mut payload = json!({
            "runner_id": runner.id.to_string(),
            "runner_name": runner.name,
            "epoch": run.lease_epoch,
            "attempt": run.attempt,
        });
        if resumed {
            payload["resumed"] = json!(true);
        }
        let commands: Vec<CommandRecord> = leased
            .delivered
            .iter()
            .map(|id| {
                delivered.remove(id).ok_or_else(|| {
                    Error::Internal("a command delivered with a lease is gone".into())
                })
            })
            .collect::<Result<_>>()?;
        // Per run: claimed, then its commands delivered, up to its counter.
        let first_seq = run.last_event_seq - commands.len() as i64;
        new_events.push((
            run.id,
            first_seq,
            NewEvent::manager(EventType::RunClaimed, payload),
        ));
        new_events.extend(
            (first_seq + 1..)
                .zip(&commands)
                .map(|(seq, command)| (run.id, seq, commands::delivered_event(command).1)),
        );
        assigned.push((run, commands));
    }
    events::insert_sequenced(tx, new_events).await?;
    let with_context: Vec<Uuid> = assigned
        .iter()
        .filter(|(run, _)| {
            run.session_id.is_some() || run.lease_epoch > 1 || run.lineage.context.is_some()
        })
        .map(|(run, _)| run.id.0)
        .collect();
    let mut contexts = context::load(tx, &with_context).await?;
    Ok(assigned
        .into_iter()
        .map(|(run, commands)| Assignment {
            context: contexts.remove(&run.id.0).unwrap_or_default(),
            commands,
            run,
        })
        .collect())
}

/// The state of one lease after a heartbeat.
#[derive(Debug, Clone)]
pub struct LeaseState {
    pub run_id: RunId,
    pub epoch: i64,
    /// `None`: the lease is lost.
    pub expires_at: Option<SystemTime>,
    pub cancel_requested: bool,
    /// Highest runner_seq stored for this epoch.
    pub acked_runner_seq: i64,
    /// Commands newly delivered with this heartbeat.
    pub commands: Vec<CommandRecord>,
}

impl LeaseState {
    /// A lease that is not (or no longer) the runner's.
    pub fn lost(run_id: RunId, epoch: i64) -> Self {
        Self {
            run_id,
            epoch,
            expires_at: None,
            cancel_requested: false,
            acked_runner_seq: 0,
            commands: Vec::new(),
        }
    }
}

/// One runner's heartbeat: the leases it says it holds.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub runner_id: RunnerId,
    /// The runner's tenant (its API key's); `None`: any.
    pub tenant: Option<Tenant>,
    pub leases: Vec<(RunId, i64)>,
}

/// What a heartbeat renewed.
#[derive(Debug, Clone)]
pub struct Renewed {
    /// Each lease named, in order: held (and extended) or lost, with commands delivered.
    pub leases: Vec<LeaseState>,
    /// An operator drained the runner (`DrainRunner`).
    pub draining: bool,
}

/// Heartbeats of many runners in one transaction (see `crate::heartbeats`): records them
/// as seen, renews every lease they hold by `ttl` in one statement, delivers the pending
/// commands of the renewed runs, and reports the rest as lost. Answers in order.
pub async fn heartbeat(pool: &Pool, beats: &[Heartbeat], ttl: Duration) -> Result<Vec<Renewed>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let ids: Vec<Uuid> = beats.iter().map(|b| b.runner_id.0).collect();
    let tenants: Vec<&str> = beats
        .iter()
        .map(|b| runner_tenant(b.tenant.as_ref()))
        .collect();
    let seen = async {
        let stmt = tx
            .prepare_cached(
                "UPDATE runners SET last_heartbeat_at = now()
                 FROM unnest($1::uuid[], $2::text[]) AS b(id, tenant_id)
                 WHERE runners.id = b.id AND runners.tenant_id = b.tenant_id
                 RETURNING runners.id, runners.tenant_id, runners.draining",
            )
            .await?;
        Ok::<_, Error>(tx.query(&stmt, &[&ids, &tenants]).await?)
    };
    // Pipelined, in this order: a plan made while `runners` was nearly empty would scan
    // it, every heartbeat after, however many runners it came to hold.
    let ((), seen) = tokio::try_join!(super::plan_generically(&tx), seen)?;
    let draining: HashSet<(Uuid, String)> = seen
        .iter()
        .filter(|row| row.get::<_, bool>(2))
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let held: Vec<HeldLease> = beats
        .iter()
        .flat_map(|b| HeldLease::all(b.runner_id, b.tenant.as_ref(), &b.leases))
        .collect();
    let mut states = renew(&tx, &held, Some(ttl)).await?.into_iter();
    tx.commit().await?;
    Ok(beats
        .iter()
        .map(|b| Renewed {
            leases: states.by_ref().take(b.leases.len()).collect(),
            draining: draining
                .contains(&(b.runner_id.0, runner_tenant(b.tenant.as_ref()).to_owned())),
        })
        .collect())
}

/// How many runs a runner can hold; `None`: no such runner.
pub async fn capacity(
    client: &impl GenericClient,
    runner_id: RunnerId,
    tenant: Option<&Tenant>,
) -> Result<Option<i32>> {
    let stmt = client
        .prepare_cached("SELECT max_concurrency FROM runners WHERE id = $1 AND tenant_id = $2")
        .await?;
    Ok(client
        .query_opt(&stmt, &[&runner_id.0, &runner_tenant(tenant)])
        .await?
        .map(|row| row.get(0)))
}

/// Which of `leases` the runner holds now: what a runner without a stream (unary
/// `Heartbeat`) may renew, asked before the shared heartbeat batch so that leases the
/// caller does not hold never reach it.
pub async fn held_by(
    client: &impl GenericClient,
    runner_id: RunnerId,
    leases: &[(RunId, i64)],
) -> Result<HashSet<(RunId, i64)>> {
    let stmt = client
        .prepare_cached(
            "SELECT id, lease_epoch FROM runs WHERE id = ANY($1) AND lease_runner_id = $2",
        )
        .await?;
    let ids: Vec<Uuid> = leases.iter().map(|(run, _)| run.0).collect();
    Ok(client
        .query(&stmt, &[&ids, &runner_id.0])
        .await?
        .iter()
        .map(|row| (RunId(row.get(0)), row.get(1)))
        .collect())
}

/// Delivers pending commands of the runner's current leases without renewing them: the
/// manager pushing commands must never keep a silent runner's lease alive.
pub async fn deliver_commands(
    pool: &Pool,
    runner_id: RunnerId,
    tenant: Option<&Tenant>,
    leases: &[(RunId, i64)],
) -> Result<Vec<LeaseState>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let states = renew(&tx, &HeldLease::all(runner_id, tenant, leases), None).await?;
    tx.commit().await?;
    Ok(states)
}

/// A lease a runner says it holds.
struct HeldLease<'a> {
    run_id: RunId,
    epoch: i64,
    runner_id: RunnerId,
    tenant: Option<&'a Tenant>,
}

impl<'a> HeldLease<'a> {
    fn all(
        runner_id: RunnerId,
        tenant: Option<&'a Tenant>,
        leases: &[(RunId, i64)],
    ) -> Vec<HeldLease<'a>> {
        leases
            .iter()
            .map(|(run_id, epoch)| HeldLease {
                run_id: *run_id,
                epoch: *epoch,
                runner_id,
                tenant,
            })
            .collect()
    }
}

/// Checks the leases (extending them by `ttl` when given) and delivers their pending
/// commands, in one statement each however many runners they belong to. A lease that
/// has expired (see [`fence`]), or a run of another tenant than its runner's, counts as
/// lost. Answers in order.
async fn renew(
    tx: &impl GenericClient,
    leases: &[HeldLease<'_>],
    ttl: Option<Duration>,
) -> Result<Vec<LeaseState>> {
    if leases.is_empty() {
        return Ok(Vec::new());
    }
    // Each renewed run says where its pending commands can be: its first turn on its
    // row, the others in `commands` (only when it has some there).
    static RENEW_SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "UPDATE runs r SET lease_expires_at = coalesce(now() + $5::bigint * interval '1 millisecond',
                                                   r.lease_expires_at)
             FROM unnest($1::uuid[], $2::bigint[], $3::uuid[], $4::text[]) AS l(id, epoch, runner, tenant)
             WHERE r.id = l.id AND r.lease_epoch = l.epoch AND r.lease_runner_id = l.runner
               AND r.status = ANY($6) AND (l.tenant IS NULL OR r.tenant_id = l.tenant)
               AND r.lease_expires_at > now()
             RETURNING r.id, r.lease_expires_at, r.cancel_requested, r.lease_runner_seq,
                       coalesce(r.first_turn_status = 'pending', false), {has_rows}",
            has_rows = runs::HAS_COMMAND_ROWS
        )
    });
    let renew = tx.prepare_cached(&RENEW_SQL).await?;
    let ids: Vec<Uuid> = leases.iter().map(|l| l.run_id.0).collect();
    let epochs: Vec<i64> = leases.iter().map(|l| l.epoch).collect();
    let runners: Vec<Uuid> = leases.iter().map(|l| l.runner_id.0).collect();
    let tenants: Vec<Option<&str>> = leases
        .iter()
        .map(|l| l.tenant.map(Tenant::as_str))
        .collect();
    let rows = tx
        .query(
            &renew,
            &[
                &ids,
                &epochs,
                &runners,
                &tenants,
                &ttl.map(ttl_millis),
                &active_statuses(),
            ],
        )
        .await?;
    let renewed: HashMap<Uuid, (SystemTime, bool, i64)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    let with = |column: usize| -> Vec<Uuid> {
        rows.iter()
            .filter(|r| r.get::<_, bool>(column))
            .map(|r| r.get(0))
            .collect()
    };
    let mut delivered: HashMap<RunId, Vec<CommandRecord>> = HashMap::new();
    let commands = commands::deliver_pending(tx, &with(4), &with(5)).await?;
    let delivered_events: Vec<_> = commands.iter().map(commands::delivered_event).collect();
    events::append(tx, &delivered_events).await?;
    for command in commands {
        delivered.entry(command.run_id).or_default().push(command);
    }
    Ok(leases
        .iter()
        .map(|lease| {
            let held = renewed.get(&lease.run_id.0);
            LeaseState {
                run_id: lease.run_id,
                epoch: lease.epoch,
                expires_at: held.map(|r| r.0),
                cancel_requested: held.is_some_and(|r| r.1),
                acked_runner_seq: held.map_or(0, |r| r.2),
                commands: delivered.remove(&lease.run_id).unwrap_or_default(),
            }
        })
        .collect())
}

/// Allows a write by the runner holding `epoch` of an active run whose lease has not
/// expired by `now` (the database's clock); anything else is `lease_lost`. Expiry is a
/// fence of its own: between expiry and the sweeper's requeue nobody may write, so a
/// runner that missed its renewal cannot race the run's next holder.
fn fence(run: &RunRecord, runner_id: RunnerId, epoch: i64, now: SystemTime) -> Result<()> {
    if run.lease_epoch != epoch || run.lease_runner_id != Some(runner_id) {
        return Err(Error::precondition(
            reason::LEASE_LOST,
            format!("epoch {epoch} is not the current lease of this run"),
        ));
    }
    if !RunStatus::ACTIVE.contains(&run.status) {
        return Err(Error::precondition(
            reason::LEASE_LOST,
            format!("run is {} and no longer leased", run.status.as_str()),
        ));
    }
    if run.lease_expires_at.is_none_or(|expires| expires <= now) {
        return Err(Error::precondition(
            reason::LEASE_LOST,
            format!("the lease of epoch {epoch} has expired"),
        ));
    }
    Ok(())
}

/// A validated event from a runner, redacted ([`RunnerEvent::new`]).
#[derive(Debug, Clone)]
pub struct RunnerEvent {
    pub runner_seq: i64,
    pub event_type: EventType,
    /// The payload as JSON text, stored and fanned out as it is: the runner's own text when
    /// redaction changed nothing, so a streamed event is never serialized again.
    pub json: String,
    /// `json` parsed, once something needs a field of it: a plain delta never does.
    parsed: OnceLock<serde_json::Value>,
    /// Its payload's size as sent, counted against the run's quota.
    pub payload_bytes: usize,
}

impl RunnerEvent {
    /// The event whose `payload` was parsed from `sent`, the runner's text, redacted: the
    /// one place a runner's events pass [`redact`] on their way to the log.
    pub fn new(
        runner_seq: i64,
        event_type: EventType,
        mut payload: serde_json::Value,
        sent: &str,
    ) -> Self {
        let json = if redact(&mut payload) || sent.trim().is_empty() {
            to_text(&payload)
        } else {
            sent.to_owned()
        };
        Self {
            runner_seq,
            event_type,
            json,
            parsed: OnceLock::from(payload),
            payload_bytes: sent.len(),
        }
    }

    /// An event whose text `sent` needs no redaction and was checked without being parsed
    /// ([`agentrun_shared::events::is_plain_delta`]).
    pub fn as_sent(runner_seq: i64, event_type: EventType, sent: String) -> Self {
        Self {
            runner_seq,
            event_type,
            payload_bytes: sent.len(),
            json: sent,
            parsed: OnceLock::new(),
        }
    }

    /// The payload (an object), parsed from its text the first time it is asked for.
    pub fn payload(&self) -> &serde_json::Value {
        self.parsed
            .get_or_init(|| serde_json::from_str(&self.json).unwrap_or_default())
    }

    /// The payload to change in place; call [`Self::payload_changed`] after.
    pub fn payload_mut(&mut self) -> &mut serde_json::Value {
        self.payload();
        self.parsed.get_mut().expect("parsed just above")
    }

    /// After its payload changed (deltas merged): redacts it again (a secret may span
    /// the merged texts) and renews its text.
    pub fn payload_changed(&mut self) {
        let payload = self.payload_mut();
        redact(payload);
        self.json = to_text(payload);
    }
}

/// What an append stored.
#[derive(Debug, Clone, Default)]
pub struct AppendOutcome {
    pub first_seq: i64,
    pub last_seq: i64,
    pub acked_runner_seq: i64,
    pub duplicates: i32,
    /// Deltas of a `final` run, accepted but not stored: ephemeral events for watchers.
    pub live: Vec<events::EventRecord>,
    /// The events stored, in seq order, for this replica's watchers (the watch hub):
    /// empty unless the batch's appends of the run (this one among them) hold all that
    /// the batch added to its log, so together they leave watchers no gap.
    pub stored: Vec<events::EventRecord>,
}
