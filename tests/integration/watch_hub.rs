//! The per-replica watch hub: one reader per watched run fans events out to its
//! watchers; a stalled watcher falls behind alone and catches up from the database; idle
//! watchers cost the database nothing per watcher.

use std::time::{Duration, Instant};

use agentrun_manager::db;
use agentrun_manager::store::commands::CommandUpdate;
use agentrun_manager::store::leases::{self, LeaseWrite, RunnerEvent, Written};
use agentrun_manager::store::runs::Finish;
use agentrun_shared::events::EventType;
use agentrun_shared::ids::{CommandId, RunId, RunnerId};
use agentrun_shared::proto::manager_message::Body as FromManager;
use agentrun_shared::proto::runner_message::Body as ToManager;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_shared::state::CommandStatus;
use agentrun_tests::*;
use tonic::codec::Streaming;

use crate::faults::RawRunner;

const LONG: Duration = Duration::from_secs(60);

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
async fn collect(mut stream: Streaming<proto::Event>) -> Vec<i64> {
    let deadline = Instant::now() + LONG;
    let mut seqs = Vec::new();
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("the watch ended within the deadline")
            .expect("the watch stream failed");
        match next {
            Some(event) => seqs.push(event.seq),
            None => return seqs,
        }
    }
}

/// A manager whose test-played runner keeps its lease for the whole test.
async fn app() -> TestApp {
    TestApp::spawn_with(|s| s.lease_ttl_ms = 120_000).await
}

async fn last_seq(db: &tokio_postgres::Client, run_id: &str) -> i64 {
    db.query_one(
        "SELECT last_event_seq FROM runs WHERE id = $1::text::uuid",
        &[&run_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// Appends `batches` batches of `per_batch` deltas to the held run, then finishes it.
async fn play(
    app: &mut TestApp,
    me: &proto::RunnerIdentity,
    lease: &proto::Assignment,
    batches: i64,
    per_batch: i64,
) {
    for batch in 0..batches {
        let from = batch * per_batch + 1;
        app.runners
            .append_events(append(me, lease, deltas(from, from + per_batch - 1)))
            .await
            .unwrap();
    }
    app.runners
        .finish_run(finish(me, lease, RunStatus::Completed))
        .await
        .unwrap();
}

#[tokio::test]
async fn fifty_watchers_of_one_run_each_get_every_event_once_in_order() {
    let mut app = app().await;
    let run_id = create(&mut app, "watched by fifty").await;
    let me = runner("played");
    let held = claim(&mut app, &me, 1).await;
    let mut watchers = Vec::new();
    for _ in 0..50 {
        watchers.push(tokio::spawn(collect(watch(&mut app, &run_id, 0).await)));
    }
    play(&mut app, &me, &held[0], 40, 5).await;
    let db = app.db().await;
    let expected: Vec<i64> = (1..=last_seq(&db, &run_id).await).collect();
    for watcher in watchers {
        assert_eq!(
            watcher.await.unwrap(),
            expected,
            "every event once, in order"
        );
    }
}

/// A runner's `content.delta` of the token numbered `runner_seq`.
fn token_delta(runner_seq: i64) -> RunnerEvent {
    let text = format!(r#"{{"kind":"assistant_text","delta":"token {runner_seq} "}}"#);
    RunnerEvent::as_sent(runner_seq, EventType::ContentDelta, text)
}

/// A runner that streams faster than its session stores sends several appends of one run
/// that the manager stores in one transaction. The watch hub gets all of them in memory,
/// in seq order: given only the last (as before), its watchers were left a gap, and the
/// run's hub reader went back to the database for that and every later append of the
/// stream (at full speed, reading as much from the log as was written to it).
#[tokio::test]
async fn every_append_of_a_run_stored_together_goes_to_the_watch_hub() {
    let mut app = app().await;
    create(&mut app, "streamed fast").await;
    let me = runner("fast");
    let lease = claim(&mut app, &me, 1).await.remove(0);
    let run_id = RunId::parse("run_id", &lease.run.as_ref().unwrap().run_id).unwrap();
    let append = |runner_seqs: std::ops::RangeInclusive<i64>| LeaseWrite::Append {
        run_id,
        epoch: lease.epoch,
        events: runner_seqs.map(token_delta).collect(),
        updates: vec![],
    };
    // The turn's acknowledgement in between: its `command.completed` is news too.
    let turn = &lease.commands[0];
    let ack = LeaseWrite::Append {
        run_id,
        epoch: lease.epoch,
        events: vec![],
        updates: vec![CommandUpdate {
            command_id: CommandId::parse("command_id", &turn.command_id).unwrap(),
            status: CommandStatus::Completed,
            error: None,
        }],
    };
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let written = leases::write(
        &pool,
        RunnerId::parse("runner_id", &me.runner_id).unwrap(),
        None,
        vec![append(1..=2), ack, append(3..=5)],
        &test_settings(&app.database_url).quotas(),
    )
    .await
    .expect("the batch is stored");
    let handed: Vec<Vec<i64>> = written
        .into_iter()
        .map(|written| match written.expect("each append is stored") {
            Written::Appended(outcome) => outcome.stored.iter().map(|e| e.seq).collect(),
            _ => panic!("an append answered as something else"),
        })
        .collect();
    let db = app.db().await;
    let end = last_seq(&db, &run_id.to_string()).await;
    // The first append also holds the manager's `run.started`.
    assert_eq!(
        handed[2],
        [end - 2, end - 1, end],
        "the second append, whole"
    );
    assert_eq!(handed[1], [end - 3], "the acknowledgement's event");
    assert_eq!(handed[0].len(), 3, "the first append, whole: {handed:?}");
    let all = handed.concat();
    assert_eq!(
        all,
        (all[0]..=end).collect::<Vec<_>>(),
        "in seq order, no gap"
    );
}

/// A run that ends in a batch of lease writes hands all of its news to the watch hub:
/// its last append, and with its finish's answer its end (`run.terminal`). (Before, a run's last append and its end were left to its watchers'
/// reader, which read them back from the database: up to a whole batch of events parsed
/// again for every run.)
#[tokio::test]
async fn a_run_ending_in_a_batch_hands_its_last_append_and_its_end_to_the_watch_hub() {
    let mut app = app().await;
    create(&mut app, "ends at once").await;
    let me = runner("ending");
    let lease = claim(&mut app, &me, 1).await.remove(0);
    let run_id = RunId::parse("run_id", &lease.run.as_ref().unwrap().run_id).unwrap();
    // The reply, and the turn acknowledged.
    let append = LeaseWrite::Append {
        run_id,
        epoch: lease.epoch,
        events: (1..=3).map(token_delta).collect(),
        updates: vec![CommandUpdate {
            command_id: CommandId::parse("command_id", &lease.commands[0].command_id).unwrap(),
            status: CommandStatus::Completed,
            error: None,
        }],
    };
    let finish = LeaseWrite::Finish {
        epoch: lease.epoch,
        outcome: Finish {
            run_id,
            status: agentrun_shared::state::RunStatus::Completed,
            failure_kind: None,
            message: None,
        },
        last_runner_seq: 3,
    };
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let written = leases::write(
        &pool,
        RunnerId::parse("runner_id", &me.runner_id).unwrap(),
        None,
        vec![append, finish],
        &test_settings(&app.database_url).quotas(),
    )
    .await
    .expect("the batch is stored");
    let handed: Vec<Vec<(i64, String)>> = written
        .into_iter()
        .map(|written| {
            let events = match written.expect("each write is stored") {
                Written::Appended(outcome) => outcome.stored,
                Written::Finished(_, events) => events,
                Written::Released => panic!("a write answered as a release"),
            };
            events.into_iter().map(|e| (e.seq, e.event_type)).collect()
        })
        .collect();
    let db = app.db().await;
    let end = last_seq(&db, &run_id.to_string()).await;
    // The append also holds the manager's `run.started` and `command.completed`.
    assert_eq!(handed[0].len(), 5, "the last append, whole: {handed:?}");
    let types: Vec<&str> = handed[1].iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(types, ["run.terminal"], "the end");
    let seqs: Vec<i64> = handed.concat().iter().map(|(seq, _)| *seq).collect();
    assert_eq!(
        seqs,
        (seqs[0]..=end).collect::<Vec<_>>(),
        "in seq order, no gap, to the log's end"
    );
}

/// The same on a runner's stream: an append and the turn's acknowledgement sent together
/// reach a watcher without the safety-net poll (here too slow to help), the
/// acknowledgement's `command.completed` included.
#[tokio::test]
async fn an_append_and_an_acknowledgement_sent_together_reach_watchers_at_once() {
    let mut app = TestApp::spawn_with(|s| {
        s.lease_ttl_ms = 120_000;
        s.watch_poll_interval_ms = 3_600_000;
    })
    .await;
    let run_id = create(&mut app, "acknowledged fast").await;
    let me = runner("fast");
    let mut raw = RawRunner::connect(connect(app.addr).await, &me, &[])
        .await
        .expect("welcome");
    raw.send(ToManager::Credit(proto::Credit { slots: 1 }))
        .await;
    let assignment = match raw.next().await {
        FromManager::Assignment(assignment) => assignment,
        other => panic!("expected an assignment, got {other:?}"),
    };
    let mut watcher = watch(&mut app, &run_id, 0).await;
    // Attached once it has had the claim.
    while next_type(&mut watcher).await != "command.delivered" {}
    raw.send(ToManager::Events(append(&me, &assignment, deltas(1, 3))))
        .await;
    raw.send(ToManager::CommandAck(proto::CommandAck {
        run_id: run_id.clone(),
        epoch: assignment.epoch,
        update: Some(proto::CommandUpdate {
            command_id: assignment.commands[0].command_id.clone(),
            status: proto::CommandStatus::Completed as i32,
            error: String::new(),
        }),
    }))
    .await;
    let mut seen = Vec::new();
    while seen.last().map(String::as_str) != Some("command.completed") {
        seen.push(next_type(&mut watcher).await);
    }
    let delta = "content.delta";
    assert_eq!(
        seen,
        ["run.started", delta, delta, delta, "command.completed"]
    );
}

/// The type of the watcher's next event, within [`LONG`].
async fn next_type(watcher: &mut Streaming<proto::Event>) -> String {
    tokio::time::timeout(LONG, watcher.message())
        .await
        .expect("an event in time")
        .expect("the watch stream is healthy")
        .expect("the watch stream is open")
        .r#type
}

#[tokio::test]
async fn a_stalled_watcher_holds_back_nobody_and_catches_up_without_gap_or_duplicate() {
    let mut app = app().await;
    let run_id = create(&mut app, "one stalls").await;
    let me = runner("played");
    let held = claim(&mut app, &me, 1).await;
    // Never read until the run has ended: far more than its buffer is appended meanwhile.
    let mut stalled = watch(&mut app, &run_id, 0).await;
    let first = stalled.message().await.unwrap().expect("the first event");
    assert_eq!(first.seq, 1);
    let readers: Vec<_> = {
        let mut readers = Vec::new();
        for _ in 0..5 {
            readers.push(tokio::spawn(collect(watch(&mut app, &run_id, 0).await)));
        }
        readers
    };
    // 4 KiB deltas: 3,000 of them are ~12 MiB, several times what a watcher buffers.
    let big = "x".repeat(4096);
    for batch in 0..60 {
        let events = (1..=50)
            .map(|i| proto::RunnerEvent {
                runner_seq: batch * 50 + i,
                r#type: "content.delta".into(),
                payload_json: serde_json::json!({"kind": "assistant_text", "delta": big})
                    .to_string(),
            })
            .collect();
        app.runners
            .append_events(append(&me, &held[0], events))
            .await
            .unwrap();
    }
    app.runners
        .finish_run(finish(&me, &held[0], RunStatus::Completed))
        .await
        .unwrap();
    let db = app.db().await;
    let expected: Vec<i64> = (1..=last_seq(&db, &run_id).await).collect();
    // The readers finish while the stalled watcher still has not read.
    for reader in readers {
        assert_eq!(reader.await.unwrap(), expected, "a reader was held back");
    }
    let mut rest = vec![first.seq];
    rest.extend(collect(stalled).await);
    assert_eq!(
        rest, expected,
        "the stalled watcher got a gap or a duplicate"
    );
}

/// How long PostgreSQL (15+) may hold an idle backend's statistics before publishing
/// them (`PGSTAT_IDLE_INTERVAL`, 10 s): a window opened sooner after a burst of queries
/// counts some of the burst.
const STATS_SETTLE: Duration = Duration::from_secs(11);

/// Commits per second in the test database over `window`, counted once the statistics
/// of what came before have been published ([`STATS_SETTLE`]).
async fn commits_per_second(db: &tokio_postgres::Client, window: Duration) -> f64 {
    // Not synchronisation: the statistics have no signal to wait on.
    tokio::time::sleep(STATS_SETTLE).await;
    let commits = || async {
        db.query_one(
            "SELECT sum(xact_commit)::bigint FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    // A fresh snapshot for each read (statistics are cached within a transaction only).
    let before = commits().await;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let after = commits().await;
    (after - before) as f64 / started.elapsed().as_secs_f64()
}

/// 200 idle watchers over 20 runs cost the database next to nothing more than none: the
/// safety-net poll is one query per replica, not one per watcher (which was ~400 commits/s
/// at the default one-second poll).
#[tokio::test]
async fn idle_watchers_cost_no_queries_per_watcher() {
    const WATCHERS: usize = 200;
    const RUNS: usize = 20;
    const WINDOW: Duration = Duration::from_secs(5);
    // A slower sweep than the tests' default: less background to measure against.
    let mut app = TestApp::spawn_with(|s| s.sweep_interval_ms = 1_000).await;
    let db = app.db().await;
    let mut runs = Vec::new();
    for i in 0..RUNS {
        runs.push(create(&mut app, &format!("idle {i}")).await);
    }
    let without = commits_per_second(&db, WINDOW).await;

    let mut streams = Vec::new();
    for i in 0..WATCHERS {
        let run_id = &runs[i % RUNS];
        let mut stream = watch(&mut app, run_id, 0).await;
        // Read the replay: the watcher has caught up and now waits.
        let stored = last_seq(&db, run_id).await;
        let mut seen = 0;
        while seen < stored {
            seen = tokio::time::timeout(LONG, stream.message())
                .await
                .expect("the replay in time")
                .unwrap()
                .expect("the watch goes on")
                .seq;
        }
        streams.push(stream);
    }
    let with = commits_per_second(&db, WINDOW).await;
    println!("idle watchers: {without:.1} commits/s without, {with:.1} with {WATCHERS} watchers");
    assert!(
        with - without < 20.0,
        "{WATCHERS} idle watchers cost {:.1} commits/s ({without:.1} without, {with:.1} with)",
        with - without
    );
    // They are still live: a new event reaches every watcher of its run.
    let me = runner("played");
    let held = claim(&mut app, &me, 1).await;
    let claimed = held[0].run.as_ref().unwrap().run_id.clone();
    let stored = last_seq(&db, &claimed).await;
    for (i, stream) in streams.iter_mut().enumerate() {
        if runs[i % RUNS] != claimed {
            continue;
        }
        let mut seen = 0;
        while seen < stored {
            seen = tokio::time::timeout(LONG, stream.message())
                .await
                .expect("the claim's events reach an idle watcher")
                .unwrap()
                .expect("the watch goes on")
                .seq;
        }
    }
}

// ---- session watchers ------------------------------------------------------------------

/// Creates a run in session `session_id` (a new session on its first run).
async fn create_in_session(app: &mut TestApp, session_id: &str, prompt: &str) -> String {
    let mut request = run_request(prompt);
    request.session_id = session_id.into();
    app.runs
        .create_run(request)
        .await
        .expect("create a run in the session")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

async fn watch_session(app: &TestApp, session_id: &str) -> Streaming<proto::SessionEvent> {
    use agentrun_shared::proto::session_service_client::SessionServiceClient;
    SessionServiceClient::new(connect(app.addr).await)
        .watch_session(proto::WatchSessionRequest {
            session_id: session_id.into(),
            ..Default::default()
        })
        .await
        .expect("watch session")
        .into_inner()
}

/// The seq of the next event of `stream`, within the deadline.
async fn next_session_seq(stream: &mut Streaming<proto::SessionEvent>) -> i64 {
    tokio::time::timeout(LONG, stream.message())
        .await
        .expect("a session event in time")
        .expect("the watch goes on")
        .expect("the watch is open")
        .event
        .expect("an event")
        .seq
}

/// 100 idle WatchSession streams cost the database next to nothing more than none: no
/// watcher polls on its own (each used to read its session twice a second).
#[tokio::test]
async fn idle_session_watchers_cost_no_queries_per_watcher() {
    const WATCHERS: usize = 100;
    const SESSIONS: usize = 10;
    const WINDOW: Duration = Duration::from_secs(5);
    let mut app = TestApp::spawn_with(|s| s.sweep_interval_ms = 1_000).await;
    let db = app.db().await;
    let mut sessions = Vec::new();
    for i in 0..SESSIONS {
        let session_id = uuid::Uuid::new_v4().to_string();
        create_in_session(&mut app, &session_id, &format!("idle {i}")).await;
        sessions.push(session_id);
    }
    let without = commits_per_second(&db, WINDOW).await;
    let mut streams = Vec::new();
    for i in 0..WATCHERS {
        let mut stream = watch_session(&app, &sessions[i % SESSIONS]).await;
        // The replay (run.created and the command's events): then it waits.
        next_session_seq(&mut stream).await;
        streams.push(stream);
    }
    let with = commits_per_second(&db, WINDOW).await;
    println!("idle session watchers: {without:.1} commits/s without, {with:.1} with {WATCHERS}");
    assert!(
        with - without < 20.0,
        "{WATCHERS} idle session watchers cost {:.1} commits/s ({without:.1} without, {with:.1} with)",
        with - without
    );
}

/// Events no wake-up announced (written straight into the database here; in life, a
/// NOTIFY lost with its connection) still reach a session watcher: the replica's one
/// safety-net poll covers watched sessions too.
#[tokio::test]
async fn a_session_watcher_sees_events_no_wake_up_announced() {
    let mut app = TestApp::spawn_with(|s| s.watch_poll_interval_ms = 200).await;
    let db = app.db().await;
    let session_id = uuid::Uuid::new_v4().to_string();
    let run_id = create_in_session(&mut app, &session_id, "unannounced").await;
    let mut stream = watch_session(&app, &session_id).await;
    let stored = last_seq(&db, &run_id).await;
    let mut seen = 0;
    while seen < stored {
        seen = next_session_seq(&mut stream).await;
    }
    agentrun_tests::tamper::make_events_writable(&db).await;
    db.execute(
        "WITH advanced AS (
             UPDATE runs SET last_event_seq = last_event_seq + 1
             WHERE id = $1::text::uuid RETURNING id, last_event_seq)
         INSERT INTO events (run_id, seq, type, payload, producer)
         SELECT id, last_event_seq, 'runtime.warning', '{\"message\": \"unannounced\"}', 'manager'
         FROM advanced",
        &[&run_id],
    )
    .await
    .expect("write an event behind the manager's back");
    assert_eq!(next_session_seq(&mut stream).await, stored + 1);
}
