//! Hellos: runners (re)connecting, registered and given back their runs many at a time.
//!
//! A reconnect storm (a replica lost, its fleet coming back elsewhere) is thousands of
//! hellos within seconds, so [`hello`] settles a whole batch of them (see
//! `crate::hellos`) in one transaction with a fixed number of set-based statements:
//! one upsert of every runner row (recording the replica holding its stream), one
//! renewal of every lease named, one adoption of every run the runners' ids still hold
//! (with their commands delivered anew), then one hand-over (events, commands,
//! conversation context) for all of them.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;
use std::time::Duration;

use agentrun_shared::ids::RunId;
use deadpool_postgres::{GenericClient, Pool};
use serde_json::json;
use uuid::Uuid;

use super::writes::ATTEMPTS;
use super::{
    Assignment, DELIVER_OPEN_COMMANDS, HAND_OVER_SET, HeldLease, LeaseState, Leased,
    RETURN_DELIVERED, RunnerIdentity, active_statuses, hand_over, renew, runner_tenant, ttl_millis,
};
use crate::error::{Error, Result};
use crate::store::Tenant;

/// A runner saying hello: who it is, and the leases it says it holds.
#[derive(Debug, Clone)]
pub struct Hello {
    pub runner: RunnerIdentity,
    pub named: Vec<(RunId, i64)>,
}

/// What a (re)connecting runner learns: which of the leases it named survive, and the
/// runs its id still holds that it did not name (it restarted), handed back to it.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub named: Vec<LeaseState>,
    pub adopted: Vec<Assignment>,
    /// An operator drained this runner (`DrainRunner`); it stays drained when it
    /// reconnects, so it is told again.
    pub draining: bool,
}

/// Registers connecting runners (runner rows are per tenant), records the manager
/// replica holding their streams (`manager_id`), and settles their leases, all in one
/// transaction. Answers one welcome per hello, in order.
///
/// Each runner renews only the leases it names, and adopts only the runs its id holds
/// in its own tenant (any tenant's without one): adopted runs get a new epoch, fencing
/// any older incarnation of the runner, and all their open commands again.
///
/// Two hellos of one runner in a batch are settled one after the other, as if they had
/// come in separate transactions (the later one adopts what the earlier one took).
///
/// A transient failure (see [`Error::Unavailable`]) is retried like a lease write
/// (`writes::write`): the whole transaction rolled back, so nothing was settled twice.
pub async fn hello(
    pool: &Pool,
    hellos: &[Hello],
    ttl: Duration,
    manager_id: Uuid,
) -> Result<Vec<Welcome>> {
    if hellos.is_empty() {
        return Ok(Vec::new());
    }
    let mut attempt = 1;
    loop {
        match hello_once(pool, hellos, ttl, manager_id).await {
            Err(Error::Unavailable(why)) if attempt < ATTEMPTS => {
                let backoff = RETRY_BACKOFF * 2u32.pow(attempt - 1);
                tracing::debug!(attempt, %why, hellos = hellos.len(), "hello batch failed; retrying");
                tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64())).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Back-off before the first retry, doubled for each further one.
const RETRY_BACKOFF: Duration = Duration::from_millis(20);

async fn hello_once(
    pool: &Pool,
    hellos: &[Hello],
    ttl: Duration,
    manager_id: Uuid,
) -> Result<Vec<Welcome>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let mut welcomes: Vec<Option<Welcome>> = vec![None; hellos.len()];
    for round in rounds(hellos) {
        let batch: Vec<&Hello> = round.iter().map(|&i| &hellos[i]).collect();
        let settled = settle(&tx, &batch, ttl, manager_id).await?;
        for (i, welcome) in round.into_iter().zip(settled) {
            welcomes[i] = Some(welcome);
        }
    }
    tx.commit().await?;
    Ok(welcomes
        .into_iter()
        .map(|w| w.expect("every hello is in one round"))
        .collect())
}

/// The hellos split into rounds in which each runner (tenant and id) says hello at most
/// once (an upsert cannot touch one row twice): the first hello of each runner in the
/// first round, its second in the second, and so on. Almost always one round.
fn rounds(hellos: &[Hello]) -> Vec<Vec<usize>> {
    let mut seen: HashMap<(&str, Uuid), usize> = HashMap::new();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for (i, hello) in hellos.iter().enumerate() {
        let key = (
            runner_tenant(hello.runner.tenant.as_ref()),
            hello.runner.id.0,
        );
        let round = seen.entry(key).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(i);
        *round += 1;
    }
    rounds
}

/// Upserts every runner of the batch (identities may change between connections) as
/// connected to this replica now. The identities travel as one JSON array because their
/// labels, profiles and queues are arrays themselves; rows are written in key order so
/// concurrent batches lock them in the same order.
const UPSERT_RUNNERS_SQL: &str = "
    INSERT INTO runners (id, tenant_id, name, labels, backend_profiles, queues, max_concurrency,
                         version, manager_id, connected_at, last_heartbeat_at)
    SELECT h.id, h.tenant_id, h.name, h.labels, h.backend_profiles, h.queues, h.max_concurrency,
           h.version, $2::uuid, now(), now()
    FROM jsonb_to_recordset($1::jsonb) AS h(id uuid, tenant_id text, name text, labels text[],
         backend_profiles text[], queues text[], max_concurrency int, version text)
    ORDER BY h.tenant_id, h.id
    ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name, labels = excluded.labels,
        backend_profiles = excluded.backend_profiles, queues = excluded.queues,
        max_concurrency = excluded.max_concurrency, version = excluded.version,
        manager_id = excluded.manager_id, connected_at = now(), last_heartbeat_at = now()
    RETURNING id, tenant_id, draining";

/// Adopts, for every hello `ord`, the active runs its runner's id holds in its tenant
/// (`NULL`: any) and that it did not name: a new epoch, a fresh lease of $4 ms, and
/// everything the old incarnation held owed again (every open command delivered anew).
/// A run matches at most one hello (runner ids are per tenant; a round names each runner
/// once). Parameters: $1 ords, $2 runner ids, $3 tenants, $4 ttl, $5 active statuses,
/// $6/$7 the named leases as (ord, run) pairs.
static ADOPT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH leasing AS MATERIALIZED (
             SELECT runs.id, h.ord
             FROM runs, unnest($1::int[], $2::uuid[], $3::text[]) AS h(ord, runner, tenant)
             WHERE runs.lease_runner_id = h.runner AND runs.status = ANY($5)
               AND (h.tenant IS NULL OR runs.tenant_id = h.tenant)
               AND NOT EXISTS (SELECT 1 FROM unnest($6::int[], $7::uuid[]) AS n(ord, run)
                               WHERE n.ord = h.ord AND n.run = runs.id)
             FOR UPDATE OF runs
         ),
         {deliver}
         UPDATE runs SET lease_epoch = runs.lease_epoch + 1, lease_runner_seq = 0,
                updated_at = now(),
                lease_expires_at = now() + $4::bigint * interval '1 millisecond',
                {hand_over}
         FROM leasing l CROSS JOIN delivered_per_run d
         WHERE runs.id = l.id
         RETURNING runs.*, l.ord AS hello_ord, {RETURN_DELIVERED}",
        deliver = *DELIVER_OPEN_COMMANDS,
        hand_over = *HAND_OVER_SET,
    )
});

/// Settles one round: hellos of distinct runners.
async fn settle(
    tx: &impl GenericClient,
    hellos: &[&Hello],
    ttl: Duration,
    manager_id: Uuid,
) -> Result<Vec<Welcome>> {
    let identities: Vec<serde_json::Value> = hellos
        .iter()
        .map(|h| {
            let r = &h.runner;
            json!({
                "id": r.id.0.to_string(),
                "tenant_id": runner_tenant(r.tenant.as_ref()),
                "name": r.name,
                "labels": r.labels,
                "backend_profiles": r.backend_profiles,
                "queues": r.queues,
                "max_concurrency": r.max_concurrency,
                "version": r.version,
            })
        })
        .collect();
    let upsert = tx.prepare_cached(UPSERT_RUNNERS_SQL).await?;
    let draining: HashSet<(Uuid, String)> = tx
        .query(
            &upsert,
            &[&serde_json::Value::Array(identities), &manager_id],
        )
        .await?
        .iter()
        .filter(|row| row.get::<_, bool>(2))
        .map(|row| (row.get(0), row.get(1)))
        .collect();

    let held: Vec<HeldLease> = hellos
        .iter()
        .flat_map(|h| HeldLease::all(h.runner.id, h.runner.tenant.as_ref(), &h.named))
        .collect();
    let mut named = renew(tx, &held, Some(ttl)).await?.into_iter();

    let ords: Vec<i32> = (0..hellos.len() as i32).collect();
    let runner_ids: Vec<Uuid> = hellos.iter().map(|h| h.runner.id.0).collect();
    let tenants: Vec<Option<&str>> = hellos
        .iter()
        .map(|h| h.runner.tenant.as_ref().map(Tenant::as_str))
        .collect();
    let (named_ords, named_runs): (Vec<i32>, Vec<Uuid>) = hellos
        .iter()
        .zip(&ords)
        .flat_map(|(h, &ord)| h.named.iter().map(move |(run, _)| (ord, run.0)))
        .unzip();
    let adopt = tx.prepare_cached(&ADOPT_SQL).await?;
    let rows = tx
        .query(
            &adopt,
            &[
                &ords,
                &runner_ids,
                &tenants,
                &ttl_millis(ttl),
                &active_statuses(),
                &named_ords,
                &named_runs,
            ],
        )
        .await?;
    let mut adopted: Vec<(Leased, &RunnerIdentity)> = Vec::with_capacity(rows.len());
    let mut adopted_by: Vec<usize> = Vec::with_capacity(rows.len());
    for row in &rows {
        let ord = row.get::<_, i32>("hello_ord") as usize;
        adopted.push((Leased::from_row(row)?, &hellos[ord].runner));
        adopted_by.push(ord);
    }
    let mut handed: Vec<Vec<Assignment>> = vec![Vec::new(); hellos.len()];
    for (assignment, ord) in hand_over(tx, adopted, true)
        .await?
        .into_iter()
        .zip(adopted_by)
    {
        handed[ord].push(assignment);
    }

    Ok(hellos
        .iter()
        .zip(handed)
        .map(|(h, adopted)| Welcome {
            named: named.by_ref().take(h.named.len()).collect(),
            adopted,
            draining: draining.contains(&(
                h.runner.id.0,
                runner_tenant(h.runner.tenant.as_ref()).to_owned(),
            )),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use agentrun_shared::ids::RunnerId;

    use super::*;

    fn hello(id: u128, tenant: Option<&str>) -> Hello {
        Hello {
            runner: RunnerIdentity {
                id: RunnerId(Uuid::from_u128(id)),
                name: "r".into(),
                labels: Vec::new(),
                backend_profiles: Vec::new(),
                queues: Vec::new(),
                max_concurrency: 1,
                version: String::new(),
                tenant: tenant.map(|t| Tenant(t.into())),
            },
            named: Vec::new(),
        }
    }

    #[test]
    fn a_runner_saying_hello_twice_is_settled_in_a_later_round() {
        let hellos = [
            hello(1, Some("a")),
            hello(1, Some("b")),
            hello(1, Some("a")),
            hello(2, None),
            hello(1, Some("a")),
        ];
        assert_eq!(rounds(&hellos), vec![vec![0, 1, 3], vec![2], vec![4]]);
    }

    #[test]
    fn distinct_runners_are_one_round() {
        let hellos: Vec<Hello> = (0..50).map(|i| hello(i, Some("a"))).collect();
        assert_eq!(rounds(&hellos), vec![(0..50).collect::<Vec<_>>()]);
    }
}
