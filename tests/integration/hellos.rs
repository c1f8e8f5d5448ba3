//! Batched hellos: a reconnect storm (a replica lost, its fleet coming back at once) is
//! settled in a few transactions, and every runner still gets back exactly its own runs,
//! fenced with a new epoch.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use agentrun_manager::db;
use agentrun_manager::store::Tenant;
use agentrun_manager::store::leases::{self, Hello, RunnerIdentity};
use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::proto::manager_message::Body as FromManager;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use uuid::Uuid;

use crate::faults::{LONG, RawRunner, create_all, lazy_channel};

/// Runner streams opened per HTTP/2 connection (well under the stream limit).
const STREAMS_PER_CHANNEL: usize = 50;

/// Transactions committed in database `name`, read from outside it ([`cluster_client`]).
/// Only what its backends have flushed is counted: see [`disconnected`].
pub(crate) async fn commits(cluster: &tokio_postgres::Client, name: &str) -> i64 {
    cluster
        .query_one(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
            &[&name],
        )
        .await
        .expect("read pg_stat_database")
        .get(0)
}

/// Waits until nothing is connected to database `name`. A backend flushes its
/// statistics as it exits (while connected it may hold them back for seconds), so
/// [`commits`] is then exact.
pub(crate) async fn disconnected(cluster: &tokio_postgres::Client, name: &str) {
    wait_for(
        "every connection to the test database to close",
        LONG,
        || async {
            let open: i64 = cluster
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
                    &[&name],
                )
                .await
                .expect("read pg_stat_activity")
                .get(0);
            (open == 0).then_some(())
        },
    )
    .await;
}

/// A manager whose background work (sweeps, safety-net polls) stays out of the count.
async fn quiet_app() -> TestApp {
    quiet_app_on(&fresh_database().await).await
}

pub(crate) async fn quiet_app_on(url: &str) -> TestApp {
    TestApp::spawn_on(url, |s| {
        s.lease_ttl_ms = 600_000;
        s.sweep_interval_ms = 600_000;
        s.runner_poll_interval_ms = 600_000;
        s.schedule_poll_interval_ms = 600_000;
    })
    .await
}

/// Connects every identity at once, each naming no lease (restarted), spread over a few
/// HTTP/2 connections; returns them welcomed, in order.
pub(crate) async fn connect_all(
    app: &TestApp,
    identities: &[proto::RunnerIdentity],
) -> Vec<RawRunner> {
    let channels: Vec<_> = (0..identities.len().div_ceil(STREAMS_PER_CHANNEL))
        .map(|_| lazy_channel(app.addr))
        .collect();
    let connecting: Vec<_> = identities
        .iter()
        .enumerate()
        .map(|(i, identity)| {
            let channel = channels[i / STREAMS_PER_CHANNEL].clone();
            let identity = identity.clone();
            tokio::spawn(async move { RawRunner::connect(channel, &identity, &[]).await })
        })
        .collect();
    tokio::time::timeout(LONG, async {
        let mut welcomed = Vec::with_capacity(connecting.len());
        for runner in connecting {
            welcomed.push(runner.await.expect("connect task").expect("welcomed"));
        }
        welcomed
    })
    .await
    .expect("every runner is welcomed in time")
}

/// Three hundred runners connecting at once are all welcomed and registered (as
/// connected to this replica), in far fewer transactions than one per runner.
#[tokio::test]
async fn many_runners_connecting_at_once_are_registered_in_a_few_transactions() {
    const RUNNERS: usize = 300;
    let url = fresh_database().await;
    let name: String = db_client(&url)
        .await
        .query_one("SELECT current_database()", &[])
        .await
        .expect("name the database")
        .get(0);
    let cluster = cluster_client().await;
    // A first manager migrates the schema; counting starts once its connections closed.
    drop(quiet_app_on(&url).await);
    disconnected(&cluster, &name).await;
    let before = commits(&cluster, &name).await;

    let app = quiet_app_on(&url).await;
    let identities: Vec<_> = (0..RUNNERS)
        .map(|i| runner(&format!("storm-{i}")))
        .collect();
    let welcomed = connect_all(&app, &identities).await;
    let manager_id = welcomed[0].welcome.manager_id.clone();
    for (runner, identity) in welcomed.iter().zip(&identities) {
        assert_eq!(
            runner.welcome.runner_id, identity.runner_id,
            "its own welcome"
        );
    }
    drop(welcomed);
    drop(app);
    disconnected(&cluster, &name).await;
    let used = commits(&cluster, &name).await - before;

    // One transaction per hello would be 300 on their own; batches, plus the manager's
    // start and stop, are a few dozen at most.
    assert!(
        used < (RUNNERS / 3) as i64,
        "{used} transactions for {RUNNERS} hellos"
    );
    let registered: i64 = db_client(&url)
        .await
        .query_one(
            "SELECT count(*) FROM runners WHERE id = ANY($1) AND manager_id::text = $2",
            &[
                &identities
                    .iter()
                    .map(|r| Uuid::parse_str(&r.runner_id).expect("a uuid"))
                    .collect::<Vec<_>>(),
                &manager_id,
            ],
        )
        .await
        .expect("count runners")
        .get(0);
    assert_eq!(
        registered, RUNNERS as i64,
        "every runner is registered as connected to the replica that welcomed it"
    );
}

/// Runners that restarted (they name no lease) reconnecting all at once each get back
/// exactly the runs their id holds, each with a new epoch.
#[tokio::test]
async fn runners_reconnecting_at_once_each_get_back_exactly_their_own_runs() {
    const RUNNERS: usize = 60;
    const RUNS_EACH: usize = 2;
    let mut app = quiet_app().await;
    let requests = (0..RUNNERS * RUNS_EACH)
        .map(|i| run_request(&format!("run {i}")))
        .collect();
    create_all(&mut app.runs, requests).await;
    let identities: Vec<_> = (0..RUNNERS)
        .map(|i| runner(&format!("restarted-{i}")))
        .collect();
    // Held before the restart: run -> epoch, per runner.
    let mut held: Vec<HashMap<String, i64>> = Vec::new();
    for identity in &identities {
        let claimed = claim(&mut app, identity, RUNS_EACH as i32).await;
        held.push(
            claimed
                .into_iter()
                .map(|a| (a.run.expect("a run").run_id, a.epoch))
                .collect(),
        );
    }

    let mut runners = connect_all(&app, &identities).await;
    for (runner, held) in runners.iter_mut().zip(&held) {
        let mut adopted = HashMap::new();
        while adopted.len() < held.len() {
            match runner.next().await {
                FromManager::Assignment(a) => {
                    let run = a.run.expect("a run");
                    assert_eq!(status_of(&run), RunStatus::Claimed);
                    adopted.insert(run.run_id, a.epoch);
                }
                other => panic!("expected the runner's runs back, got {other:?}"),
            }
        }
        let expected: HashMap<String, i64> = held
            .iter()
            .map(|(run, epoch)| (run.clone(), epoch + 1))
            .collect();
        assert_eq!(
            adopted, expected,
            "exactly its own runs, each with a new epoch"
        );
    }
    // Nothing else was adopted: the old epochs are fenced in the database too.
    let db = app.db().await;
    let stale: i64 = db
        .query_one(
            "SELECT count(*) FROM runs WHERE status = 'claimed' AND lease_epoch <> 2",
            &[],
        )
        .await
        .expect("count runs")
        .get(0);
    assert_eq!(stale, 0);
}

fn identity(id: RunnerId, tenant: &str) -> RunnerIdentity {
    RunnerIdentity {
        id,
        name: format!("{tenant}-runner"),
        labels: Vec::new(),
        backend_profiles: vec!["scripted".into()],
        queues: vec!["default".into()],
        max_concurrency: 10,
        version: String::new(),
        tenant: Some(Tenant(tenant.into())),
    }
}

/// One batch of hellos from runners of two tenants that share their ids: each adopts
/// only its own tenant's runs (no run twice), renews what it names, and each tenant
/// has a runner row of its own.
#[tokio::test]
async fn one_batch_of_hellos_keeps_tenants_apart() {
    const IDS: usize = 20;
    let mut app = quiet_app().await;
    let pool = db::pool(&app.database_url, 2).expect("pool");
    let ttl = Duration::from_secs(600);
    for tenant in ["acme", "globex"] {
        for i in 0..IDS * 2 {
            app.runs
                .create_run(as_tenant(tenant, run_request(&format!("{tenant} {i}"))))
                .await
                .expect("create run");
        }
    }
    let ids: Vec<RunnerId> = (0..IDS).map(|_| RunnerId(Uuid::new_v4())).collect();
    // Per (tenant, runner): the runs it holds, run -> epoch.
    let mut held: HashMap<(String, Uuid), HashMap<Uuid, i64>> = HashMap::new();
    for tenant in ["acme", "globex"] {
        for id in &ids {
            let claimed = leases::claim(&pool, &identity(*id, tenant), true, 2, ttl, 0)
                .await
                .expect("claim");
            assert_eq!(claimed.len(), 2);
            held.insert(
                (tenant.into(), id.0),
                claimed
                    .iter()
                    .map(|a| (a.run.id.0, a.run.lease_epoch))
                    .collect(),
            );
        }
    }

    // Every runner restarted, except acme's first, which still holds its first run.
    let first = ids[0];
    let (&kept, &kept_epoch) = held[&("acme".to_string(), first.0)]
        .iter()
        .next()
        .expect("a held run");
    let hellos: Vec<Hello> = ["acme", "globex"]
        .iter()
        .flat_map(|tenant| ids.iter().map(move |id| (*tenant, *id)))
        .map(|(tenant, id)| Hello {
            runner: identity(id, tenant),
            named: match (tenant, id == first) {
                ("acme", true) => vec![(RunId(kept), kept_epoch)],
                _ => Vec::new(),
            },
        })
        .collect();
    let welcomes = leases::hello(&pool, &hellos, ttl, Uuid::new_v4())
        .await
        .expect("hello batch");

    let mut adopted_anywhere = HashSet::new();
    for (hello, welcome) in hellos.iter().zip(&welcomes) {
        let tenant = hello.runner.tenant.as_ref().expect("a tenant").0.clone();
        let mut expected = held[&(tenant.clone(), hello.runner.id.0)].clone();
        if !hello.named.is_empty() {
            assert_eq!(welcome.named.len(), 1);
            assert!(
                welcome.named[0].expires_at.is_some(),
                "the named lease is renewed"
            );
            expected.remove(&kept);
        }
        let adopted: HashMap<Uuid, i64> = welcome
            .adopted
            .iter()
            .map(|a| (a.run.id.0, a.run.lease_epoch))
            .collect();
        let expected: HashMap<Uuid, i64> = expected.into_iter().map(|(r, e)| (r, e + 1)).collect();
        assert_eq!(
            adopted, expected,
            "{tenant} runner adopts its own runs only"
        );
        for a in &welcome.adopted {
            assert_eq!(a.run.tenant_id, tenant);
            assert!(adopted_anywhere.insert(a.run.id.0), "a run adopted twice");
        }
    }
    assert_eq!(adopted_anywhere.len(), IDS * 2 * 2 - 1);
    let db = app.db().await;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM runners WHERE id = ANY($1) AND manager_id IS NOT NULL",
            &[&ids.iter().map(|id| id.0).collect::<Vec<_>>()],
        )
        .await
        .expect("count runners")
        .get(0);
    assert_eq!(rows, (IDS * 2) as i64, "one runner row per tenant and id");
}
