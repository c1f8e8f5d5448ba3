//! WatchRun: replay then live, no gap and no duplicate at the seam, across replicas (woken
//! by NOTIFY, and catching up through a dropped LISTEN connection), after a client
//! reconnect, and with a slow client around.

use std::time::{Duration, Instant};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::runner_service_client::RunnerServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use tonic::Code;
use tonic::codec::Streaming;

const LONG: Duration = Duration::from_secs(60);

/// The watchers' safety-net poll (`--watch-poll-interval-ms`).
const WATCH_POLL_ENV: &str = "AGENTRUN_WATCH_POLL_INTERVAL_MS";

/// How soon a wake-up from another replica must arrive: far below the polls the NOTIFY
/// test configures (60 s), far above a NOTIFY's round trip on a loaded machine.
const WAKE: Duration = Duration::from_secs(3);

async fn watch(app: &mut TestApp, run_id: &str, after_seq: i64) -> Streaming<proto::Event> {
    app.runs
        .watch_run(proto::WatchRunRequest {
            run_id: run_id.into(),
            after_seq,
        })
        .await
        .expect("watch run")
        .into_inner()
}

/// Reads the stream to its end (after run.terminal), with a deadline.
async fn collect(mut stream: Streaming<proto::Event>) -> Vec<proto::Event> {
    let deadline = Instant::now() + LONG;
    let mut events = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("the watch ended within the deadline")
            .expect("the watch stream failed");
        match next {
            Some(event) => events.push(event),
            None => return events,
        }
    }
}

fn seqs(events: &[proto::Event]) -> Vec<i64> {
    events.iter().map(|e| e.seq).collect()
}

async fn listeners(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Catch-up, not NOTIFY: mid-stream every LISTEN connection is cut, so wake-ups sent
/// meanwhile are lost; a replica whose listener reconnects wakes its watchers (and the
/// one-second poll is the safety net), and the watcher still sees every event once. The
/// NOTIFY path alone is `a_watcher_on_another_replica_is_woken_by_notify_not_the_poll`.
#[tokio::test]
async fn a_watcher_on_another_replica_sees_every_event_through_a_listener_drop() {
    let a = TestApp::spawn().await;
    let mut b = TestApp::spawn_on(&a.database_url, |_| {}).await;
    let db = a.db().await;
    wait_for("both replicas to listen", LONG, || {
        let db = &db;
        async move { (listeners(db).await == 2).then_some(()) }
    })
    .await;
    let _runner = RunnerProcess::start(
        a.addr,
        "on-a",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10")],
    );
    let run_id = b
        .runs
        .create_run(run_request("[tokens:300] stream"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let stream = watch(&mut b, &run_id, 0).await;
    let watcher = tokio::spawn(collect(stream));

    // Mid-stream, cut every LISTEN connection; the replicas reconnect and catch up.
    wait_for_event(&mut b, &run_id, "content.delta", LONG).await;
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        &[],
    )
    .await
    .unwrap();
    wait_for("the listeners to come back", LONG, || {
        let db = &db;
        async move { (listeners(db).await == 2).then_some(()) }
    })
    .await;

    let watched = watcher.await.unwrap();
    let stored = events_of(&mut b, &run_id).await;
    assert_eq!(
        seqs(&watched),
        (1..=stored.len() as i64).collect::<Vec<_>>(),
        "in order, no gap, no duplicate"
    );
    assert_eq!(watched.last().unwrap().r#type, "run.terminal");
    assert_eq!(assistant_text(&watched), assistant_text(&stored));
}

/// The next event of `stream` within `within`, or a panic naming `what`.
async fn next_within(
    stream: &mut Streaming<proto::Event>,
    within: Duration,
    what: &str,
) -> Option<proto::Event> {
    tokio::time::timeout(within, stream.message())
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {within:?}"))
        .expect("the watch stream failed")
}

/// The NOTIFY path alone: two replicas whose safety-net polls (claims and watchers) are
/// set to a minute, a watcher on B, a runner (played by the test) writing on A. Each
/// event A stores reaches B's watcher within [`WAKE`]: only A's NOTIFY can wake it so
/// soon.
#[tokio::test]
async fn a_watcher_on_another_replica_is_woken_by_notify_not_the_poll() {
    let settings = [
        (WATCH_POLL_ENV, "60000"),
        ("AGENTRUN_RUNNER_POLL_INTERVAL_MS", "60000"),
        // The test's runner never heartbeats; its lease must outlive the test.
        ("AGENTRUN_LEASE_TTL_MS", "120000"),
    ];
    let url = fresh_database().await;
    let (a, b) = tokio::join!(
        ManagerProcess::start(&url, &settings),
        ManagerProcess::start(&url, &settings)
    );
    // A listener that (re)connects wakes every watcher of its replica: start once both
    // listen, so that no such wake-up can stand in for a NOTIFY.
    let db = db_client(&url).await;
    wait_for("both replicas to listen", LONG, || {
        let db = &db;
        async move { (listeners(db).await == 2).then_some(()) }
    })
    .await;
    let mut runs_b = RunServiceClient::new(b.channel().await);
    let mut runners_a = RunnerServiceClient::new(a.channel().await);
    let run_id = runs_b
        .create_run(run_request("watched from the other replica"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let me = runner("on-a");
    let held = runners_a
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(me.clone()),
            max_runs: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .assignments;
    assert_eq!(held.len(), 1, "the run is claimed on A");
    let lease = &held[0];

    // Read the replay up to the claim: the watcher has read the log and now waits.
    let mut stream = runs_b
        .watch_run(proto::WatchRunRequest {
            run_id: run_id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let stored: i64 = db
        .query_one(
            "SELECT last_event_seq FROM runs WHERE id = $1::text::uuid",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    let mut seen = 0;
    while seen < stored {
        seen = next_within(&mut stream, LONG, "the replay")
            .await
            .expect("the replay goes on")
            .seq;
    }

    for runner_seq in 1..=3 {
        runners_a
            .append_events(append(&me, lease, deltas(runner_seq, runner_seq)))
            .await
            .unwrap();
        let mut got = Vec::new();
        // The first append also stores run.started before the delta.
        while got
            .last()
            .is_none_or(|e: &proto::Event| e.r#type != "content.delta")
        {
            let event = next_within(&mut stream, WAKE, "an event appended on A")
                .await
                .expect("the run has not ended");
            got.push(event);
        }
        assert_eq!(got[0].seq, seen + 1, "no gap");
        seen = got.last().unwrap().seq;
    }
    runners_a
        .finish_run(finish(&me, lease, RunStatus::Completed))
        .await
        .unwrap();
    // The turn the runner never reported on is closed with the run, then run.terminal.
    let closed = next_within(&mut stream, WAKE, "command.completed appended on A")
        .await
        .expect("command.completed");
    assert_eq!(
        (closed.seq, closed.r#type.as_str()),
        (seen + 1, "command.completed")
    );
    let last = next_within(&mut stream, WAKE, "run.terminal appended on A")
        .await
        .expect("run.terminal");
    assert_eq!((last.seq, last.r#type.as_str()), (seen + 2, "run.terminal"));
    assert!(
        next_within(&mut stream, WAKE, "the end of the watch")
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_client_reconnecting_with_its_last_seq_gets_exactly_the_rest() {
    let mut app = TestApp::spawn().await;
    let _runner =
        RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "10")]);
    let run_id = app
        .runs
        .create_run(run_request("[tokens:120] go"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;

    let mut first = watch(&mut app, &run_id, 0).await;
    let mut seen = Vec::new();
    while seen.len() < 15 {
        seen.push(first.message().await.unwrap().expect("more events"));
    }
    drop(first); // the client goes away mid-run

    let rest = collect(watch(&mut app, &run_id, seen.last().unwrap().seq).await).await;
    seen.extend(rest);
    let stored = events_of(&mut app, &run_id).await;
    assert_eq!(seqs(&seen), seqs(&stored));
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Completed
    );

    // Resuming after the end ends at once; replaying from the start gives everything.
    assert!(
        collect(watch(&mut app, &run_id, stored.len() as i64).await)
            .await
            .is_empty()
    );
    assert_eq!(
        seqs(&collect(watch(&mut app, &run_id, 0).await).await),
        seqs(&stored)
    );
}

#[tokio::test]
async fn a_slow_watcher_blocks_nobody() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "0")]);
    let run_id = app
        .runs
        .create_run(run_request("[tokens:3000] flood"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    // Never read: its buffer fills and its task waits.
    let _stalled = watch(&mut app, &run_id, 0).await;
    let reader = collect(watch(&mut app, &run_id, 0).await).await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    assert_eq!(reader.len(), events_of(&mut app, &run_id).await.len());
}

#[tokio::test]
async fn watch_run_checks_its_input_and_tenant() {
    let mut app = TestApp::spawn().await;
    let run_id = app
        .runs
        .create_run(run_request("x"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let err = app
        .runs
        .watch_run(proto::WatchRunRequest {
            run_id: "nope".into(),
            after_seq: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("run_id"));
    let err = app
        .runs
        .watch_run(proto::WatchRunRequest {
            run_id: run_id.clone(),
            after_seq: -1,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("after_seq"));
    let err = app
        .runs
        .watch_run(as_tenant(
            "intruder",
            proto::WatchRunRequest {
                run_id,
                after_seq: 0,
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn watch_session_follows_every_run_of_the_session_live() {
    use agentrun_shared::proto::session_service_client::SessionServiceClient;
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[]);
    let session_id = uuid::Uuid::new_v4().to_string();
    let in_session = |prompt: &str| {
        let mut request = run_request(prompt);
        request.session_id = session_id.clone();
        request
    };
    let first = app
        .runs
        .create_run(in_session("first"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    wait_for_run(&app, &first, RunStatus::Completed, LONG).await;

    let mut sessions = SessionServiceClient::new(connect(app.addr).await);
    let mut stream = sessions
        .watch_session(proto::WatchSessionRequest {
            session_id: session_id.clone(),
            output_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // A run created after the watch began is followed live.
    let second = app
        .runs
        .create_run(in_session("second"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let mut seen: Vec<proto::Event> = Vec::new();
    let deadline = Instant::now() + LONG;
    while !seen
        .iter()
        .any(|e| e.run_id == second && e.r#type == "run.terminal")
    {
        let next = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("in time")
            .unwrap()
            .expect("open");
        seen.push(next.event.unwrap());
    }
    let runs: Vec<&str> = seen.iter().map(|e| e.run_id.as_str()).collect();
    let switch = runs.iter().position(|r| *r == second).unwrap();
    assert!(
        runs[..switch].iter().all(|r| *r == first) && runs[switch..].iter().all(|r| *r == second),
        "run order"
    );
    assert!(
        seen.iter().all(|e| matches!(
            e.r#type.as_str(),
            "content.delta" | "item.completed" | "run.terminal" | "runtime.error" | "diff.updated"
        )),
        "output only"
    );
    assert!(assistant_text(&seen).contains("second"));
}
