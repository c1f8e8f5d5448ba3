//! Flow control: concurrency keys and rate limits — their settings, the admission of
//! runs held by their key, and what operators see of both.
//!
//! **Concurrency keys** work by admission. A run created with a key is inserted held
//! (`runs.held = 'concurrency_key'`), and [`admit`] releases the oldest held runs of the
//! key while it has fewer admitted, non-terminal runs than its limit
//! (`concurrency_limits`: the key's own, else the tenant's default under key `''`, else
//! 1). Claims never look at held runs (the claim index leaves them out), so a key's
//! limit costs the claim path nothing. `admit` runs under a per-(tenant, key) advisory
//! transaction lock, taken in hash order, in every transaction that can change the
//! count — creating, ending, setting a limit — so two replicas can never admit past the
//! limit. Held rows are taken `SKIP LOCKED`: a held run another transaction holds (it is
//! being cancelled or expired) is passed over, and the sweeper's [`readmit`] repairs
//! whatever such a skip left behind. The key locks are always the last locks a
//! transaction waits for (admission runs at the end of creating and of ending runs), so
//! they never close a cycle with row locks: nothing waits for a row while holding one.
//!
//! **Rate limits** are token buckets in `rate_limits`, taken at claim time by
//! `leases::rated`. This module only sets, lists and reports them.

use agentrun_shared::ids::RunId;
use deadpool_postgres::{GenericClient, Pool};

use crate::error::Result;

/// Namespace (first key) of the per-(tenant, key) advisory locks of admission.
const KEY_LOCK: i32 = 0x6172_636b; // "arck"

/// The key limit when neither the key nor its tenant has one.
pub const DEFAULT_MAX_ACTIVE: i32 = 1;

/// Takes the admission locks of these (tenant, key) pairs (duplicates welcome), in hash
/// order so transactions that lock several never wait on each other in a cycle.
async fn lock_keys(tx: &impl GenericClient, keys: &[(String, String)]) -> Result<()> {
    let stmt = tx
        .prepare_cached(&format!(
            "SELECT pg_advisory_xact_lock({KEY_LOCK}, h)
             FROM (SELECT DISTINCT hashtext(t || E'\\n' || k) AS h
                   FROM unnest($1::text[], $2::text[]) AS u(t, k)
                   ORDER BY h OFFSET 0) ordered"
        ))
        .await?;
    let (tenants, names): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(t, k)| (t.as_str(), k.as_str())).unzip();
    tx.query(&stmt, &[&tenants, &names]).await?;
    Ok(())
}

/// Admits the held runs of these (tenant, key) pairs that their limits have room for,
/// oldest first, and returns them. Locks the keys first (see the module doc).
pub(crate) async fn admit(
    tx: &impl GenericClient,
    keys: &[(String, String)],
) -> Result<Vec<RunId>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    lock_keys(tx, keys).await?;
    // A new statement: its snapshot starts after the locks, so it counts every admission
    // committed before.
    let stmt = tx
        .prepare_cached(
            "WITH k AS (SELECT DISTINCT tenant_id, ckey FROM unnest($1::text[], $2::text[])
                        AS k(tenant_id, ckey)),
             lim AS (
                 SELECT k.tenant_id, k.ckey,
                        coalesce(own.max_active, def.max_active, $3::int) AS max_active
                 FROM k
                 LEFT JOIN concurrency_limits own
                        ON own.tenant_id = k.tenant_id AND own.concurrency_key = k.ckey
                 LEFT JOIN concurrency_limits def
                        ON def.tenant_id = k.tenant_id AND def.concurrency_key = ''
             ),
             room AS (
                 SELECT lim.tenant_id, lim.ckey,
                        greatest(lim.max_active - (
                            SELECT count(*) FROM (
                                SELECT 1 FROM runs a
                                WHERE a.tenant_id = lim.tenant_id AND a.concurrency_key = lim.ckey
                                  AND a.held IS NULL
                                  AND a.status IN ('pending', 'claimed', 'running', 'waiting')
                                LIMIT lim.max_active) admitted), 0) AS room
                 FROM lim
             ),
             next AS (
                 SELECT h.id FROM room
                 CROSS JOIN LATERAL (
                     SELECT r.id FROM runs r
                     WHERE r.tenant_id = room.tenant_id AND r.concurrency_key = room.ckey
                       AND r.status = 'pending' AND r.held IS NOT NULL
                     ORDER BY r.created_at, r.id
                     LIMIT room.room
                     FOR UPDATE SKIP LOCKED
                 ) h
                 WHERE room.room > 0
             )
             UPDATE runs SET held = NULL, updated_at = now()
             FROM next WHERE runs.id = next.id
             RETURNING runs.id",
        )
        .await?;
    let (tenants, names): (Vec<&str>, Vec<&str>) =
        keys.iter().map(|(t, k)| (t.as_str(), k.as_str())).unzip();
    let rows = tx
        .query(&stmt, &[&tenants, &names, &DEFAULT_MAX_ACTIVE])
        .await?;
    Ok(rows.iter().map(|r| RunId(r.get(0))).collect())
}

/// The keys of the tenant (every tenant: `None`) that have held runs, at most `most`.
async fn held_keys(
    client: &impl GenericClient,
    tenant: Option<&str>,
    most: i64,
) -> Result<Vec<(String, String)>> {
    let stmt = client
        .prepare_cached(
            "SELECT DISTINCT tenant_id, concurrency_key FROM runs
             WHERE status = 'pending' AND held IS NOT NULL
               AND ($1::text IS NULL OR tenant_id = $1)
             LIMIT $2",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&tenant, &most])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// The sweeper's safety net: admits what the limits have room for on keys with held
/// runs (a held run skipped while another transaction held it, a limit raised while a
/// replica was away). Returns how many runs it admitted.
pub async fn readmit(pool: &Pool) -> Result<usize> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let keys = held_keys(&tx, None, 200).await?;
    let admitted = admit(&tx, &keys).await?;
    tx.commit().await?;
    Ok(admitted.len())
}

/// A key's limit as set.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit {
    pub tenant_id: String,
    /// `""`: the tenant's default.
    pub concurrency_key: String,
    pub max_active: i32,
    pub active_runs: i64,
    pub waiting_runs: i64,
}

/// Sets (`Some`) or removes (`None`) the limit of a key (`""`: the tenant's default),
/// then admits what the new limit has room for on the keys it governs. Returns the runs
/// admitted.
pub async fn set_concurrency_limit(
    pool: &Pool,
    tenant_id: &str,
    key: &str,
    max_active: Option<i32>,
) -> Result<Vec<RunId>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    match max_active {
        Some(n) => {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO concurrency_limits (tenant_id, concurrency_key, max_active)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (tenant_id, concurrency_key)
                     DO UPDATE SET max_active = $3, updated_at = now()",
                )
                .await?;
            tx.execute(&stmt, &[&tenant_id, &key, &n]).await?;
        }
        None => {
            let stmt = tx
                .prepare_cached(
                    "DELETE FROM concurrency_limits WHERE tenant_id = $1 AND concurrency_key = $2",
                )
                .await?;
            tx.execute(&stmt, &[&tenant_id, &key]).await?;
        }
    }
    let keys = if key.is_empty() {
        held_keys(&tx, Some(tenant_id), 10_000).await?
    } else {
        vec![(tenant_id.to_owned(), key.to_owned())]
    };
    let admitted = admit(&tx, &keys).await?;
    tx.commit().await?;
    Ok(admitted)
}

/// The key limits set, of one tenant or all, with each key's active and held runs.
pub async fn list_concurrency_limits(
    client: &impl GenericClient,
    tenant_id: Option<&str>,
) -> Result<Vec<ConcurrencyLimit>> {
    let stmt = client
        .prepare_cached(
            "SELECT c.tenant_id, c.concurrency_key, c.max_active,
                    CASE WHEN c.concurrency_key = '' THEN 0 ELSE
                        (SELECT count(*) FROM runs a WHERE a.tenant_id = c.tenant_id
                           AND a.concurrency_key = c.concurrency_key AND a.held IS NULL
                           AND a.status IN ('claimed', 'running', 'waiting')) END,
                    CASE WHEN c.concurrency_key = '' THEN 0 ELSE
                        (SELECT count(*) FROM runs h WHERE h.tenant_id = c.tenant_id
                           AND h.concurrency_key = c.concurrency_key
                           AND h.status = 'pending' AND h.held IS NOT NULL) END
             FROM concurrency_limits c
             WHERE $1::text IS NULL OR c.tenant_id = $1
             ORDER BY c.tenant_id, c.concurrency_key
             LIMIT 10000",
        )
        .await?;
    Ok(client
        .query(&stmt, &[&tenant_id])
        .await?
        .iter()
        .map(|r| ConcurrencyLimit {
            tenant_id: r.get(0),
            concurrency_key: r.get(1),
            max_active: r.get(2),
            active_runs: r.get(3),
            waiting_runs: r.get(4),
        })
        .collect())
}

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Tenant,
    Queue,
    ConcurrencyKey,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Tenant => "tenant",
            Scope::Queue => "queue",
            Scope::ConcurrencyKey => "concurrency_key",
        }
    }

    pub fn from_db(text: &str) -> Option<Self> {
        match text {
            "tenant" => Some(Scope::Tenant),
            "queue" => Some(Scope::Queue),
            "concurrency_key" => Some(Scope::ConcurrencyKey),
            _ => None,
        }
    }
}

/// A rate limit's setting: `runs` per `period_ms`, at most `burst` at once.
#[derive(Debug, Clone)]
pub struct RateSetting {
    pub runs: i32,
    pub period_ms: i64,
    pub burst: i32,
}

/// A rate limit as read.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub tenant_id: String,
    pub scope: Scope,
    pub key: String,
    pub runs: i32,
    pub period_ms: i64,
    pub burst: i32,
    /// The bucket's level now.
    pub tokens: f64,
    /// Pending runs of the scope that wait for a token (0 while the bucket has one).
    pub waiting_runs: i64,
}

fn rate_limit_from(row: &tokio_postgres::Row) -> Result<RateLimit> {
    Ok(RateLimit {
        tenant_id: row.get("tenant_id"),
        scope: super::parse_state("rate limit scope", row.get("scope"), Scope::from_db)?,
        key: row.get("key"),
        runs: row.get("runs"),
        period_ms: row.get("period_ms"),
        burst: row.get("burst"),
        tokens: row.get("tokens_now"),
        waiting_runs: row.get("waiting_runs"),
    })
}

/// The rate limit columns with the bucket refilled to now and the runs waiting on it.
const RATE_LIMIT_COLUMNS: &str = "l.tenant_id, l.scope, l.key, l.runs, l.period_ms, l.burst,
    rate_limit_tokens(l) AS tokens_now,
    CASE WHEN rate_limit_tokens(l) >= 1 THEN 0 ELSE
        (SELECT count(*) FROM runs r
         WHERE r.tenant_id = l.tenant_id AND r.status = 'pending' AND r.held IS NULL
           AND (r.scheduled_at IS NULL OR r.scheduled_at <= now())
           AND (l.scope = 'tenant' OR (l.scope = 'queue' AND r.queue = l.key)
                OR (l.scope = 'concurrency_key' AND r.concurrency_key = l.key))) END
        AS waiting_runs";

/// Sets (`Some`) or removes (`None`) a rate limit. A new bucket starts full; a changed
/// one keeps its level (at most the new burst). Returns the limit as stored (`None`
/// when removed).
pub async fn set_rate_limit(
    pool: &Pool,
    tenant_id: &str,
    scope: Scope,
    key: &str,
    setting: Option<RateSetting>,
) -> Result<Option<RateLimit>> {
    let client = pool.get().await?;
    let Some(setting) = setting else {
        let stmt = client
            .prepare_cached(
                "DELETE FROM rate_limits WHERE tenant_id = $1 AND scope = $2 AND key = $3",
            )
            .await?;
        client
            .execute(&stmt, &[&tenant_id, &scope.as_str(), &key])
            .await?;
        return Ok(None);
    };
    let stmt = client
        .prepare_cached(
            "INSERT INTO rate_limits AS l (tenant_id, scope, key, runs, period_ms, burst, tokens,
                                           refilled_at)
             VALUES ($1, $2, $3, $4::int, $5::bigint, $6::int, $6::int::double precision,
                     statement_timestamp())
             ON CONFLICT (tenant_id, scope, key) DO UPDATE
             SET tokens = least(rate_limit_tokens(l), $6::int::double precision),
                 refilled_at = greatest(l.refilled_at, statement_timestamp()),
                 runs = $4, period_ms = $5, burst = $6, updated_at = now()",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[
                &tenant_id,
                &scope.as_str(),
                &key,
                &setting.runs,
                &setting.period_ms,
                &setting.burst,
            ],
        )
        .await?;
    let read = client
        .prepare_cached(&format!(
            "SELECT {RATE_LIMIT_COLUMNS} FROM rate_limits l
             WHERE l.tenant_id = $1 AND l.scope = $2 AND l.key = $3"
        ))
        .await?;
    let row = client
        .query_one(&read, &[&tenant_id, &scope.as_str(), &key])
        .await?;
    rate_limit_from(&row).map(Some)
}

/// The rate limits of one tenant or all, with their buckets' levels now.
pub async fn list_rate_limits(
    client: &impl GenericClient,
    tenant_id: Option<&str>,
) -> Result<Vec<RateLimit>> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {RATE_LIMIT_COLUMNS} FROM rate_limits l
             WHERE $1::text IS NULL OR l.tenant_id = $1
             ORDER BY l.tenant_id, l.scope, l.key
             LIMIT 10000"
        ))
        .await?;
    client
        .query(&stmt, &[&tenant_id])
        .await?
        .iter()
        .map(rate_limit_from)
        .collect()
}

/// Pending runs held back by a concurrency key or a rate limit.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub tenant_id: String,
    pub queue: String,
    /// `concurrency_key` or `rate_limit`.
    pub reason: String,
    pub runs: i64,
}

/// Pending runs held back, by tenant, queue and reason: held runs and the pending runs
/// of tenants with rate limits (each an index scan).
pub async fn waiting(client: &impl GenericClient) -> Result<Vec<Waiting>> {
    let stmt = client
        .prepare_cached(
            "SELECT tenant_id, queue, reason, count(*) FROM (
                 SELECT r.tenant_id, r.queue, run_waiting_reason(r) AS reason FROM runs r
                 WHERE r.status = 'pending' AND r.held IS NOT NULL
                 UNION ALL
                 SELECT r.tenant_id, r.queue, run_waiting_reason(r) FROM runs r
                 WHERE r.status = 'pending' AND r.held IS NULL
                   AND r.tenant_id IN (SELECT DISTINCT tenant_id FROM rate_limits)
             ) w
             WHERE reason IN ('concurrency_key', 'rate_limit')
             GROUP BY tenant_id, queue, reason
             ORDER BY tenant_id, queue, reason",
        )
        .await?;
    Ok(client
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| Waiting {
            tenant_id: r.get(0),
            queue: r.get(1),
            reason: r.get(2),
            runs: r.get(3),
        })
        .collect())
}

/// The (tenant, key) pairs of these runs that have a key.
pub(crate) fn keys_of<'a>(
    runs: impl IntoIterator<Item = &'a super::runs::RunRecord>,
) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> = runs
        .into_iter()
        .filter_map(|r| Some((r.tenant_id.clone(), r.concurrency_key.clone()?)))
        .collect();
    keys.sort();
    keys.dedup();
    keys
}
