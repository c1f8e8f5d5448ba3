//! Several manager replicas on one database, as real processes.

use std::collections::HashSet;
use std::time::Duration;

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::runner_service_client::RunnerServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;

#[tokio::test]
async fn two_manager_processes_share_one_database_correctly() {
    let url = fresh_database().await;
    // Both migrate at start-up at the same time; the advisory lock makes that safe.
    let (a, b) = tokio::join!(
        ManagerProcess::start(&url, &[]),
        ManagerProcess::start(&url, &[])
    );
    let mut runs_a = RunServiceClient::new(a.channel().await);
    let runners_a = RunnerServiceClient::new(a.channel().await);
    let runners_b = RunnerServiceClient::new(b.channel().await);

    let requests: Vec<_> = (0..200)
        .map(|i| run_request(&format!("shared {i}")))
        .collect();
    runs_a
        .create_runs(proto::CreateRunsRequest { runs: requests })
        .await
        .unwrap();

    // Runners on both replicas claim at once; every run goes to exactly one of them.
    let mut claimers = Vec::new();
    for (i, client) in [runners_a.clone(), runners_b.clone(), runners_a, runners_b]
        .into_iter()
        .enumerate()
    {
        let mut client = client;
        claimers.push(tokio::spawn(async move {
            let me = runner(&format!("r{i}"));
            let mut mine = Vec::new();
            loop {
                let got = client
                    .claim_runs(proto::ClaimRunsRequest {
                        runner: Some(me.clone()),
                        max_runs: 9,
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .assignments;
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|a| a.run.unwrap().run_id));
            }
        }));
    }
    let mut seen = HashSet::new();
    for c in claimers {
        for id in c.await.unwrap() {
            assert!(seen.insert(id), "a run was claimed twice across replicas");
        }
    }
    assert_eq!(seen.len(), 200);

    // Nobody heartbeats: both replicas' sweepers race to requeue; each run is requeued once.
    let db = db_client(&url).await;
    wait_for(
        "all leases to be swept",
        Duration::from_secs(20),
        || async {
            let pending: i64 = db
                .query_one("SELECT count(*) FROM runs WHERE status = 'pending'", &[])
                .await
                .ok()?
                .get(0);
            (pending == 200).then_some(())
        },
    )
    .await;
    let requeues: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE type = 'run.requeued'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(requeues, 200);
    let attempts: i64 = db
        .query_one("SELECT count(*) FROM runs WHERE attempt = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 200);
    assert_event_log_consistent(&db).await;

    // One replica crashes; the other still serves everything.
    drop(a);
    let mut runs_b = RunServiceClient::new(b.channel().await);
    let listed = runs_b
        .list_runs(proto::ListRunsRequest {
            statuses: vec![RunStatus::Pending as i32],
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 200);
}
