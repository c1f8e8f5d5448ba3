//! The per-replica dispatcher: one claim serves the waiting credit of every runner
//! stream on the replica, and a new run wakes only as many streams as can take it.

use std::collections::HashMap;
use std::time::Duration;

use agentrun_shared::proto::manager_message::Body as FromManager;
use agentrun_shared::proto::{self, runner_message::Body as ToManager};
use agentrun_tests::*;
use tokio::sync::mpsc;

use crate::faults::{LONG, RawRunner, create_all};
use crate::hellos::{commits, connect_all, disconnected, quiet_app_on};

/// Hands every assignment any of `runners` receives to the returned channel, as
/// (runner index, run id); each runner first gives `credit` slots.
fn forward_assignments(
    runners: Vec<RawRunner>,
    credit: i32,
) -> mpsc::UnboundedReceiver<(usize, String)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (i, mut runner) in runners.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            runner
                .send(ToManager::Credit(proto::Credit { slots: credit }))
                .await;
            // A silent runner is given no work: it heartbeats its leases like a real one.
            let every = Duration::from_millis(runner.welcome.heartbeat_interval_ms as u64);
            let mut heartbeat = tokio::time::interval(every);
            let mut held = Vec::new();
            // Until the receiver is dropped: the stream then closes with the task.
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    _ = heartbeat.tick() => {
                        runner
                            .send(ToManager::Heartbeat(proto::HeartbeatRequest {
                                runner_id: runner.identity.runner_id.clone(),
                                leases: held.clone(),
                            }))
                            .await;
                        continue;
                    }
                    message = runner.next() => message,
                };
                match message {
                    FromManager::Assignment(a) => {
                        let run = a.run.expect("an assigned run");
                        held.push(proto::LeaseRef {
                            run_id: run.run_id.clone(),
                            epoch: a.epoch,
                        });
                        let _ = tx.send((i, run.run_id));
                    }
                    other => panic!("runner {i}: expected assignments only, got {other:?}"),
                }
            }
        });
    }
    rx
}

async fn next_assignment(
    assigned: &mut mpsc::UnboundedReceiver<(usize, String)>,
) -> (usize, String) {
    tokio::time::timeout(LONG, assigned.recv())
        .await
        .expect("an assignment in time")
        .expect("the runners are still streaming")
}

/// A hundred streams wait with credit; twenty runs created one at a time are each
/// assigned at once to one of them, in a few transactions per run — not one claim per
/// waiting stream per run (about 2,000 before the dispatcher).
#[tokio::test]
async fn a_new_run_costs_one_claim_however_many_streams_wait() {
    const STREAMS: usize = 100;
    const RUNS: usize = 20;
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

    let mut app = quiet_app_on(&url).await;
    let identities: Vec<_> = (0..STREAMS)
        .map(|i| runner(&format!("waiting-{i}")))
        .collect();
    let mut assigned = forward_assignments(connect_all(&app, &identities).await, 1);
    let mut taken: HashMap<usize, String> = HashMap::new();
    for i in 0..RUNS {
        let run_id = create(&mut app, &format!("run {i}")).await;
        let (runner, got) = next_assignment(&mut assigned).await;
        assert_eq!(got, run_id, "the new run is assigned");
        assert!(
            taken.insert(runner, got).is_none(),
            "runner {runner} got more runs than its one slot of credit"
        );
    }
    drop(assigned);
    drop(app);
    disconnected(&cluster, &name).await;
    let used = commits(&cluster, &name).await - before;
    println!("{used} transactions for {RUNS} runs with {STREAMS} streams waiting");
    // The hellos, the creates and a claim or two per run: well under 10 per run.
    assert!(
        used < (RUNS * 10) as i64,
        "{used} transactions for {RUNS} runs with {STREAMS} streams waiting"
    );
}

/// A batch of runs is shared out over the waiting streams: each gets at most its
/// credit, all the credit is used, and what is left stays pending.
#[tokio::test]
async fn runs_are_shared_out_within_each_streams_credit() {
    const STREAMS: usize = 5;
    const CREDIT: i32 = 2;
    let mut app = quiet_app_on(&fresh_database().await).await;
    let identities: Vec<_> = (0..STREAMS)
        .map(|i| runner(&format!("share-{i}")))
        .collect();
    let mut assigned = forward_assignments(connect_all(&app, &identities).await, CREDIT);
    let requests = (0..15).map(|i| run_request(&format!("run {i}"))).collect();
    create_all(&mut app.runs, requests).await;
    let mut per_runner: HashMap<usize, usize> = HashMap::new();
    for _ in 0..STREAMS * CREDIT as usize {
        let (runner, _) = next_assignment(&mut assigned).await;
        *per_runner.entry(runner).or_default() += 1;
    }
    assert_eq!(per_runner.len(), STREAMS, "every stream got runs");
    assert!(
        per_runner.values().all(|&n| n == CREDIT as usize),
        "each stream got exactly its credit: {per_runner:?}"
    );
    let db = app.db().await;
    wait_for("the rest to stay pending", LONG, || async {
        let pending: i64 = db
            .query_one("SELECT count(*) FROM runs WHERE status = 'pending'", &[])
            .await
            .unwrap()
            .get(0);
        (pending == 5).then_some(())
    })
    .await;
    assert!(
        assigned.try_recv().is_err(),
        "nothing was assigned past the credit"
    );
}

/// A stream that goes away with credit waiting takes nothing with it: the next run
/// goes to a stream still there, without waiting out a lease.
#[tokio::test]
async fn a_stream_gone_with_credit_waiting_takes_no_run_with_it() {
    let mut app = quiet_app_on(&fresh_database().await).await;
    let gone = connect_all(&app, &[runner("gone")]).await;
    drop(forward_assignments(gone, 1));
    let staying = connect_all(&app, &[runner("staying")]).await;
    let mut assigned = forward_assignments(staying, 1);
    let run_id = create(&mut app, "after a stream left").await;
    let (_, got) = next_assignment(&mut assigned).await;
    assert_eq!(got, run_id);
}

/// More credit than one claim statement asks for (1,000 slots): the rest is claimed in
/// the next rounds, and still no stream gets more than its credit.
#[tokio::test]
async fn credit_past_one_statement_is_claimed_in_rounds() {
    const STREAMS: usize = 3;
    const CREDIT: i32 = 600;
    const RUNS: usize = 1_500;
    let mut app = quiet_app_on(&fresh_database().await).await;
    let identities: Vec<_> = (0..STREAMS)
        .map(|i| proto::RunnerIdentity {
            max_concurrency: CREDIT,
            ..runner(&format!("wide-{i}"))
        })
        .collect();
    let mut assigned = forward_assignments(connect_all(&app, &identities).await, CREDIT);
    for chunk in 0..RUNS / 500 {
        let requests = (0..500)
            .map(|i| run_request(&format!("run {chunk}-{i}")))
            .collect();
        create_all(&mut app.runs, requests).await;
    }
    let mut per_runner: HashMap<usize, usize> = HashMap::new();
    for _ in 0..RUNS {
        let (runner, _) = next_assignment(&mut assigned).await;
        *per_runner.entry(runner).or_default() += 1;
    }
    assert!(
        per_runner.values().all(|&n| n <= CREDIT as usize),
        "no stream past its credit: {per_runner:?}"
    );
}
