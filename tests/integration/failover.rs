//! A manager replica stopped with SIGTERM hands its runners to another replica: the
//! runner reconnects there with its leases and resends what was not acknowledged, and
//! the run finishes with every event stored once.

use std::time::Duration;

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;

const LONG: Duration = Duration::from_secs(60);

#[tokio::test]
async fn a_sigtermed_manager_hands_its_runners_to_another_replica() {
    let url = fresh_database().await;
    let (mut a, b) = tokio::join!(
        ManagerProcess::start(&url, &[]),
        ManagerProcess::start(&url, &[])
    );
    // The runner tries A first, then B.
    let managers = format!("http://{},http://{}", a.addr, b.addr);
    let _runner = RunnerProcess::start(
        a.addr,
        "r",
        &[
            ("AGENTRUN_MANAGER_URL", managers.as_str()),
            ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10"),
            ("AGENTRUN_MAX_BACKOFF_MS", "200"),
        ],
    );
    let mut client = RunServiceClient::new(b.channel().await);
    let run_id = client
        .create_run(run_request("[tokens:300] keep streaming"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let db = db_client(&url).await;
    let run_uuid = uuid::Uuid::parse_str(&run_id).unwrap();
    wait_for("the run to stream", LONG, || {
        let db = &db;
        async move {
            let n: i64 = db
                .query_one(
                    "SELECT count(*) FROM events WHERE run_id = $1 AND type = 'content.delta'",
                    &[&run_uuid],
                )
                .await
                .ok()?
                .get(0);
            (n >= 20).then_some(())
        }
    })
    .await;

    a.signal(libc::SIGTERM);
    let status = a.wait_exit(LONG).await;
    assert!(status.success(), "manager A exited {status:?}");

    wait_for("the run to complete through replica B", LONG, || {
        let mut client = client.clone();
        let run_id = run_id.clone();
        async move {
            let run = client
                .get_run(proto::GetRunRequest { run_id })
                .await
                .ok()?
                .into_inner()
                .run?;
            (status_of(&run) == RunStatus::Completed).then_some(run)
        }
    })
    .await;
    let run = client
        .get_run(proto::GetRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(
        (run.attempt, run.lease_epoch),
        (1, 1),
        "the lease was resumed, not lost"
    );
    let deltas: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE run_id = $1 AND type = 'content.delta'",
            &[&run_uuid],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deltas, 300, "every token stored exactly once");
    assert_event_log_consistent(&db).await;
}
