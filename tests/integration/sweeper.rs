//! The sweeper: expired leases requeue or fail runs, timeouts end them. Nothing waits
//! for a human.

use std::time::Duration;

use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use tonic::Code;

#[tokio::test]
async fn an_expired_lease_is_requeued_with_its_commands() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 300).await;
    let run = app
        .runs
        .create_run(run_request("crashy"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let dead = runner("dead");
    let a = claim(&mut app, &dead, 1).await.remove(0);
    app.runners
        .append_events(append(&dead, &a, deltas(1, 3)))
        .await
        .unwrap();

    // No heartbeat: the sweeper puts it back in the queue, attempt 2.
    let requeued = wait_for_run(
        &app,
        &run.run_id,
        RunStatus::Pending,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(requeued.attempt, 2);
    assert!(requeued.lease_runner_id.is_empty());
    let types = event_types(&mut app, &run.run_id).await;
    assert_eq!(types.iter().filter(|t| *t == "run.requeued").count(), 1);

    // The next runner gets the turn again.
    let next = claim(&mut app, &runner("alive"), 1).await.remove(0);
    assert_eq!(next.commands.len(), 1);
    assert_eq!(next.epoch, a.epoch + 1);
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn max_attempts_ends_in_runner_lost() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 200).await;
    let mut request = run_request("doomed");
    request.max_attempts = 2;
    let run = app
        .runs
        .create_run(request)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    for attempt in 1..=2 {
        let a = claim(&mut app, &runner(&format!("dies-{attempt}")), 1)
            .await
            .remove(0);
        assert_eq!(a.run.unwrap().attempt, attempt);
    }
    let failed = wait_for_run(
        &app,
        &run.run_id,
        RunStatus::Failed,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(failed.failure_kind, "runner_lost");
    assert_eq!(failed.attempt, 2);
    let types = event_types(&mut app, &run.run_id).await;
    assert_eq!(types.last().unwrap(), "run.terminal");
    assert_eq!(types.iter().filter(|t| *t == "run.claimed").count(), 2);
}

#[tokio::test]
async fn a_run_cancelled_while_its_runner_died_ends_cancelled() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 300).await;
    let run = app
        .runs
        .create_run(run_request("abandon"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    claim(&mut app, &runner("dead"), 1).await;
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ended = wait_for_run(
        &app,
        &run.run_id,
        RunStatus::Cancelled,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(ended.attempt, 1, "not requeued");
}

#[tokio::test]
async fn queue_timeout_expires_unclaimed_runs() {
    let mut app = TestApp::spawn().await;
    let mut request = run_request("nobody home");
    request.queue_timeout_ms = 200;
    let run = app
        .runs
        .create_run(request)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let expired = wait_for_run(
        &app,
        &run.run_id,
        RunStatus::Expired,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(expired.failure_kind, "queue_timeout");
    let claimed = app
        .runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(runner("late")),
            max_runs: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(claimed.assignments.is_empty());
}

#[tokio::test]
async fn run_timeout_fails_the_run_and_fences_its_runner() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let mut request = run_request("slow");
    request.run_timeout_ms = 300;
    let run = app
        .runs
        .create_run(request)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let me = runner("slowpoke");
    let a = claim(&mut app, &me, 1).await.remove(0);
    app.runners
        .append_events(append(&me, &a, deltas(1, 1)))
        .await
        .unwrap();

    let failed = wait_for_run(
        &app,
        &run.run_id,
        RunStatus::Failed,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(failed.failure_kind, "run_timeout");
    let err = app
        .runners
        .append_events(append(&me, &a, deltas(2, 2)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = app
        .runners
        .finish_run(finish(&me, &a, RunStatus::Completed))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        status_of(&get_run(&mut app, &run.run_id).await),
        RunStatus::Failed
    );
}

/// The sweeper finds expired leases among the active runs, through their partial index,
/// even in a generic plan: it never scans the runs' whole history (the expiry is not
/// indexed, so that renewals write no index entry).
#[tokio::test]
async fn expired_leases_are_found_through_the_active_runs_index() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let plan = generic_plan(&db, agentrun_manager::sweeper::EXPIRED_LEASES_SQL).await;
    assert!(
        !plan.contains("Seq Scan on runs"),
        "the sweeper scans every run:\n{plan}"
    );
}

/// The sweeper's read of what is due finds each kind of deadline through an index, even
/// in a plan made on empty tables: every replica runs it every tick.
#[tokio::test]
async fn what_is_due_is_read_through_indexes() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    let plan = generic_plan(&db, agentrun_manager::sweeper::DUE_SQL).await;
    assert!(
        !plan.contains("Seq Scan"),
        "the sweeper scans a table:\n{plan}"
    );
}

/// A sweep with nothing due (every tick of every replica of an idle fleet) reads what is
/// due in one statement and does nothing else: an idle replica's sweeper costs the
/// database one transaction a tick, not one for each kind of deadline it checks.
#[tokio::test]
async fn an_idle_sweep_is_one_statement() {
    use agentrun_manager::{db, sweeper};

    let url = fresh_database().await;
    let pool = db::pool(&url, 1).expect("pool");
    db::migrate(&pool).await.expect("migrate");
    // A first sweep prepares its statements on the connection, as every replica's does
    // once; each tick after it is what is measured.
    sweeper::sweep_once(&pool).await.expect("sweep");
    let before = transactions(&pool).await;
    let swept = sweeper::sweep_once(&pool).await.expect("sweep");
    let after = transactions(&pool).await;
    assert_eq!(swept, sweeper::Swept::default(), "nothing was due");
    // Three of the difference are `transactions`' own (see there).
    assert_eq!(after - before - 3, 1, "transactions of an idle sweep");
}

/// Transactions committed and rolled back so far in the database of `pool` (one
/// connection, the database's only one), its statistics flushed first. The call is
/// three transactions, counted by the next call: the flush, and the read, which is
/// prepared (a transaction of its own) and then run.
async fn transactions(pool: &agentrun_manager::db::Pool) -> i64 {
    let client = pool.get().await.expect("a connection");
    flush_statistics(&client).await;
    client
        .query_one(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database
             WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("read the statistics")
        .get(0)
}
