//! The manager's side of the Connect protocol where a healthy-looking runner used to
//! stop working, a stream hung, or a run burned its attempts for nothing. Each test
//! drives the stream by hand ([`RawRunner`]) so it can name the exact state it proves.
//! (The runner's side — slots, oversized output, abort — is in `runner_slots.rs`.)

use std::time::Duration;

use agentrun_shared::proto::manager_message::Body as FromManager;
use agentrun_shared::proto::runner_message::Body as ToManager;
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use tonic::Code;

use crate::faults::{LONG, RawRunner, create_all, finish_through};
use crate::operability::{sample, scrape};

/// A runner identity with `slots` slots.
fn runner_with(name: &str, slots: i32) -> proto::RunnerIdentity {
    proto::RunnerIdentity {
        max_concurrency: slots,
        ..runner(name)
    }
}

/// A runner that reconnects holding more runs than the stream's outgoing buffer
/// (1,024 messages) is welcomed with all of them: nothing is queued towards it before
/// its stream is being read.
#[tokio::test]
async fn a_runner_holding_more_runs_than_the_outgoing_buffer_is_welcomed() {
    const RUNS: usize = 1_100;
    let mut app = TestApp::spawn_with(|s| {
        // The leases must outlive the setup; the sweeper stays out of the way.
        s.lease_ttl_ms = 600_000;
        s.sweep_interval_ms = 600_000;
    })
    .await;
    let mut requests: Vec<proto::CreateRunRequest> = (0..RUNS)
        .map(|i| run_request(&format!("run {i}")))
        .collect();
    let rest = requests.split_off(1_000);
    create_all(&mut app.runs, requests).await;
    create_all(&mut app.runs, rest).await;
    let identity = runner_with("backlog", 2_000);
    let mut claimed = 0;
    while claimed < RUNS {
        claimed += app
            .runners
            .claim_runs(proto::ClaimRunsRequest {
                runner: Some(identity.clone()),
                max_runs: (RUNS - claimed).min(1_000) as i32,
            })
            .await
            .expect("claim runs")
            .into_inner()
            .assignments
            .len();
    }

    // The runner restarted: it names no lease, and gets every run back on connecting.
    let mut raw = tokio::time::timeout(
        LONG,
        RawRunner::connect(connect(app.addr).await, &identity, &[]),
    )
    .await
    .expect("the manager answers hello although the backlog exceeds its buffer")
    .expect("welcomed");
    let mut adopted = 0;
    while adopted < RUNS {
        match raw.next().await {
            FromManager::Assignment(_) => adopted += 1,
            other => panic!("expected the adopted runs, got {other:?}"),
        }
    }
}

/// A write refused for any reason but a lost lease ends its run on both sides: the run
/// fails at once with the refusal as its reason (instead of waiting out its lease and
/// burning attempts), and the slot it took is free again in the manager's view.
#[tokio::test]
async fn a_refused_write_fails_its_run_and_frees_the_slot() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner_with("one-slot", 1);
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    let first = create_all(&mut app.runs, vec![run_request("first")]).await;
    let lease = raw.take_one().await;
    assert_eq!(lease.run_id, first[0]);
    let second = create_all(&mut app.runs, vec![run_request("second")]).await;

    let oversized = proto::RunnerEvent {
        runner_seq: 1,
        r#type: "content.delta".into(),
        payload_json:
            serde_json::json!({"kind": "assistant_text", "delta": "x".repeat(300 * 1024)})
                .to_string(),
    };
    let refusal = raw.append_refused(&lease, vec![oversized]).await;
    assert_eq!(refusal.code, "INVALID_ARGUMENT");
    assert_eq!(refusal.run_id, lease.run_id);

    let failed = wait_for_run(&app, &lease.run_id, RunStatus::Failed, LONG).await;
    assert_eq!(failed.failure_kind, "payload_too_large");
    assert!(
        failed.failure_message.contains("more than the limit of"),
        "{}",
        failed.failure_message
    );
    assert_eq!(failed.attempt, 1, "no attempt was burned");

    // The runner stopped the run and gives its slot back: the manager has room for it.
    let next = raw.take_one().await;
    assert_eq!(next.run_id, second[0]);
}

/// Every kind of refusal but `lease_lost` ends its run with the refusal as the reason:
/// a batch that skips ahead (a runner that lost events cannot make them whole again)
/// and a finish that overtakes its events alike.
#[tokio::test]
async fn every_refusal_ends_its_run_with_its_reason() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner_with("buggy", 2);
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(
        &mut app.runs,
        vec![run_request("skips"), run_request("overtakes")],
    )
    .await;
    let skipping = raw.take_one().await;
    let overtaking = raw.take_one().await;

    raw.append(&skipping, 1, 5).await;
    let refused = raw.append_refused(&skipping, deltas(11, 15)).await;
    assert_eq!(refused.code, "INVALID_ARGUMENT", "{refused:?}");
    let failed = wait_for_run(&app, &skipping.run_id, RunStatus::Failed, LONG).await;
    assert_eq!(failed.failure_kind, "write_refused");
    assert!(
        failed.failure_message.contains("events[0].runner_seq"),
        "{}",
        failed.failure_message
    );

    raw.append(&overtaking, 1, 5).await;
    raw.send(finish_through(&overtaking, &identity.runner_id, 9))
        .await;
    match raw.next().await {
        FromManager::Error(refused) => assert_eq!(refused.code, "FAILED_PRECONDITION"),
        other => panic!("expected the early finish refused, got {other:?}"),
    }
    let failed = wait_for_run(&app, &overtaking.run_id, RunStatus::Failed, LONG).await;
    assert_eq!(failed.failure_kind, "events_missing");

    // Later writes for those runs are fenced: they are no longer this runner's.
    let fenced = raw.append_refused(&skipping, deltas(6, 6)).await;
    assert!(fenced.message.starts_with("lease_lost"), "{fenced:?}");
    let db = app.db().await;
    assert_event_log_consistent(&db).await;
}

/// When a runner reconnects to the same replica, its old stream ending late must not
/// unregister the new stream from its runs' command wake-ups: a command reaches the new
/// stream at once, not at the next heartbeat (this runner never heartbeats).
#[tokio::test]
async fn an_old_stream_ending_late_leaves_command_wake_ups_with_the_new_one() {
    let mut app = TestApp::spawn_with(|s| {
        s.lease_ttl_ms = 60_000;
        s.metrics_listen = "127.0.0.1:0".into();
    })
    .await;
    let metrics = app.metrics_addr.expect("metrics enabled");
    let identity = runner_with("reconnecting", 1);
    let mut old = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("[stall] steer me")]).await;
    let lease = old.take_one().await;

    let mut new = RawRunner::connect(
        connect(app.addr).await,
        &identity,
        std::slice::from_ref(&lease),
    )
    .await
    .expect("reconnect");
    assert_eq!(new.welcome.resumed.len(), 1, "{:?}", new.welcome);
    drop(old);
    wait_for("the old stream to end", LONG, || async move {
        let text = scrape(metrics).await;
        (sample(&text, "agentrun_connected_runners", &[]) == 1.0).then_some(())
    })
    .await;

    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: lease.run_id.clone(),
            kind: proto::CommandKind::Steer as i32,
            payload_json: serde_json::json!({"text": "left"}).to_string(),
            ..Default::default()
        })
        .await
        .expect("steer");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), new.next()).await {
            Ok(FromManager::Command(delivery)) => {
                let command = delivery.command.expect("a command");
                if command.kind == proto::CommandKind::Steer as i32 {
                    break;
                }
            }
            Ok(_) => continue,
            Err(_) => panic!("the steer did not reach the new stream"),
        }
    }
}

/// A serialization failure in the transaction storing a runner's writes is retried; the
/// stream (and every other run on it) carries on.
#[tokio::test]
async fn a_transient_database_error_is_retried_without_ending_the_stream() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner("unlucky");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("hello")]).await;
    let lease = raw.take_one().await;

    // The next two statements inserting events fail as PostgreSQL fails a transaction
    // it cannot serialise (the sequence counts outside the failed transactions).
    let db = app.db().await;
    db.batch_execute(
        "CREATE SEQUENCE injected_faults;
         CREATE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF nextval('injected_faults') <= 2 THEN
                 RAISE EXCEPTION 'injected' USING ERRCODE = 'serialization_failure';
             END IF;
             RETURN NULL;
         END $$;
         CREATE TRIGGER inject_fault BEFORE INSERT ON event_batches
             FOR EACH STATEMENT EXECUTE FUNCTION inject_fault();",
    )
    .await
    .expect("install the fault");

    let acked = raw.append(&lease, 1, 3).await;
    assert_eq!(acked.acked_runner_seq, 3);
    let tries: i64 = db
        .query_one("SELECT last_value FROM injected_faults", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        tries >= 3,
        "the fault fired twice, then the write went through"
    );
    db.batch_execute("DROP TRIGGER inject_fault ON event_batches")
        .await
        .unwrap();
    raw.send(finish_through(&lease, &identity.runner_id, 3))
        .await;
    assert!(matches!(raw.next().await, FromManager::FinishAck(_)));
    assert_event_log_consistent(&db).await;
}

/// A lease past its expiry is lost even before the sweeper requeues the run: the write
/// of a runner that missed its renewal is refused `lease_lost`, on the stream and unary.
#[tokio::test]
async fn an_expired_lease_is_fenced_before_the_sweeper_comes() {
    let mut app = TestApp::spawn_with(|s| {
        s.lease_ttl_ms = 300;
        // The sweeper would requeue the run; this test is about the gap before it does.
        s.sweep_interval_ms = 600_000;
    })
    .await;
    let identity = runner("late");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("hello")]).await;
    let lease = raw.take_one().await;
    let db = app.db().await;
    let (db_ref, run_id) = (&db, &lease.run_id);
    wait_for("the lease to expire", LONG, || async move {
        let expired: bool = db_ref
            .query_one(
                "SELECT lease_expires_at < now() FROM runs WHERE id = $1::text::uuid",
                &[run_id],
            )
            .await
            .ok()?
            .get(0);
        expired.then_some(())
    })
    .await;
    let status = db
        .query_one(
            "SELECT status FROM runs WHERE id = $1::text::uuid",
            &[&lease.run_id],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert_eq!(status, "claimed", "the sweeper has not moved the run");

    let refusal = raw.append_refused(&lease, deltas(1, 1)).await;
    assert_eq!(refusal.code, "FAILED_PRECONDITION");
    assert!(refusal.message.starts_with("lease_lost"), "{refusal:?}");
    let unary = app
        .runners
        .append_events(proto::AppendEventsRequest {
            runner_id: identity.runner_id.clone(),
            run_id: lease.run_id.clone(),
            epoch: lease.epoch,
            events: deltas(1, 1),
            command_updates: vec![],
        })
        .await
        .expect_err("an expired lease is fenced");
    assert_eq!(unary.code(), Code::FailedPrecondition);
    assert!(unary.message().starts_with("lease_lost"), "{unary:?}");
    let stored: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE run_id = $1::text::uuid AND runner_seq IS NOT NULL",
            &[&lease.run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "nothing was written under the expired lease");
}

/// CancelRun's reason becomes the failure message of a running run, whatever generic
/// message its runner sends with the cancelled finish.
#[tokio::test]
async fn the_reason_given_to_cancel_run_ends_a_running_run() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner("cancelled");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("hello")]).await;
    let lease = raw.take_one().await;
    raw.append(&lease, 1, 1).await;
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: lease.run_id.clone(),
            reason: "wrong repository".into(),
        })
        .await
        .expect("cancel");
    raw.send(ToManager::Finish(proto::FinishRunRequest {
        runner_id: identity.runner_id.clone(),
        run_id: lease.run_id.clone(),
        epoch: lease.epoch,
        status: RunStatus::Cancelled as i32,
        failure_kind: "cancelled".into(),
        message: "cancellation was requested".into(),
        last_runner_seq: 1,
    }))
    .await;
    let run = wait_for_run(&app, &lease.run_id, RunStatus::Cancelled, LONG).await;
    assert_eq!(run.failure_message, "wrong repository");
    let terminal = events_of(&mut app, &lease.run_id)
        .await
        .into_iter()
        .find(|e| e.r#type == "run.terminal")
        .expect("run.terminal");
    assert!(
        terminal.payload_json.contains("wrong repository"),
        "{}",
        terminal.payload_json
    );
}

/// The lease a client sees is the lease held: present while the run is active, empty
/// once it ended (the epoch stays, as the last fencing token).
#[tokio::test]
async fn a_finished_run_shows_no_lease() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner("holder");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("hello")]).await;
    let lease = raw.take_one().await;
    let held = get_run(&mut app, &lease.run_id).await;
    assert_eq!(held.lease_runner_id, identity.runner_id);
    assert!(held.lease_expires_at.is_some());

    raw.send(finish_through(&lease, &identity.runner_id, 0))
        .await;
    assert!(matches!(raw.next().await, FromManager::FinishAck(_)));
    let ended = get_run(&mut app, &lease.run_id).await;
    assert_eq!(status_of(&ended), RunStatus::Completed);
    assert_eq!(ended.lease_runner_id, "", "no lease is held");
    assert_eq!(ended.lease_expires_at, None);
    assert_eq!(ended.lease_epoch, lease.epoch);
}

/// The log insert's duplicate check stays one index probe per batch in the plan a
/// connection keeps (the lease writes run on generic plans), even when that plan is made
/// on an empty log: as an anti join it hashed a scan of the whole `event_batches` table
/// on every append until the table was next analyzed. Likewise the webhook deliveries
/// find their runs by key: planned on an empty database, they joined every run.
#[tokio::test]
async fn the_log_insert_never_scans_the_whole_log_even_when_planned_on_an_empty_one() {
    use agentrun_manager::store::events::{INSERT_BATCHES, INSERT_BATCHES_AND_DELIVERIES};

    let app = TestApp::spawn().await;
    let db = app.db().await;
    for (name, sql) in [
        ("plain", INSERT_BATCHES),
        ("with_deliveries", INSERT_BATCHES_AND_DELIVERIES),
    ] {
        let plan = generic_plan(&db, sql).await;
        assert!(
            !plan.contains("Seq Scan on event_batches"),
            "{name}: the log is scanned whole:\n{plan}"
        );
        assert!(
            !plan.contains("Seq Scan on runs"),
            "{name}: every run is read:\n{plan}"
        );
        assert!(
            plan.contains("using event_batches_pkey on event_batches"),
            "{name}: no index probe of the log:\n{plan}"
        );
    }
}

/// The lean log: an append of many events is one stored row (a log batch holding their
/// seq range), a resent append stores nothing, and the log reads from any seq —
/// including one inside a batch — gapless and in order, a page at a time.
#[tokio::test]
async fn an_append_is_one_row_and_the_log_resumes_at_any_seq_inside_it() {
    const EVENTS: i64 = 60;
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner("batcher");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("hello")]).await;
    let lease = raw.take_one().await;
    let db = app.db().await;
    // The first append also starts the run: the manager's `run.started` shares its row.
    let claimed = rows(&db, &lease.run_id).await;
    raw.append(&lease, 1, EVENTS / 2).await;
    let before = rows(&db, &lease.run_id).await;
    assert_eq!(
        before,
        claimed + 1,
        "the manager's events join the append's row"
    );
    let acked = raw.append(&lease, EVENTS / 2 + 1, EVENTS).await;
    assert_eq!(acked.acked_runner_seq, EVENTS);
    assert_eq!(
        rows(&db, &lease.run_id).await,
        before + 1,
        "one row per append"
    );
    let resent = raw.append(&lease, 1, EVENTS).await;
    assert_eq!(resent.duplicates as i64, EVENTS);
    assert_eq!(
        rows(&db, &lease.run_id).await,
        before + 1,
        "a resend stores nothing"
    );

    let all = events_of(&mut app, &lease.run_id).await;
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "gapless from 1"
    );
    // Each event says who wrote it, also in a row holding both producers' events.
    let started = all.iter().find(|e| e.r#type == "run.started").unwrap();
    assert_eq!(started.producer, proto::Producer::Manager as i32);
    assert_eq!((started.runner_id.as_str(), started.epoch), ("", 0));
    for delta in all.iter().filter(|e| e.r#type == "content.delta") {
        assert_eq!(delta.producer, proto::Producer::Runner as i32, "{delta:?}");
        assert_eq!(delta.runner_id, identity.runner_id);
        assert_eq!(delta.epoch, lease.epoch);
    }
    let deltas: Vec<String> = all
        .iter()
        .filter(|e| e.r#type == "content.delta")
        .map(|e| payload(e)["delta"].as_str().unwrap().to_owned())
        .collect();
    let sent: Vec<String> = (1..=EVENTS).map(|i| format!("token {i} ")).collect();
    assert_eq!(deltas, sent, "stored once, in order");
    // From every seq, in pages of 7 that start and end inside batches.
    let last = *seqs.last().unwrap();
    for after in 0..last {
        let rest = events_after(&mut app, &lease.run_id, after, 7).await;
        let got: Vec<i64> = rest.iter().map(|e| e.seq).collect();
        assert_eq!(
            got,
            ((after + 1)..=last).collect::<Vec<_>>(),
            "after {after}"
        );
    }
}

/// A streamed append's row writes its per-event arrays only where they say something
/// (migration V29): no seqs (the row's range holds every seq), one type for deltas that
/// all have it, the first runner seq for runner seqs that follow on. A row mixing the
/// manager's event with the runner's keeps an element per event. Both read back event
/// by event, each with its own seq, type and runner seq.
#[tokio::test]
async fn a_streamed_append_stores_its_arrays_compactly_and_reads_back_in_full() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner("compact");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("hello")]).await;
    let lease = raw.take_one().await;
    // The first append also starts the run: its row holds the manager's `run.started`.
    raw.append(&lease, 1, 30).await;
    raw.append(&lease, 31, 60).await;
    let db = app.db().await;
    let batch = |order: &'static str| {
        let db = &db;
        let run_id = &lease.run_id;
        async move {
            db.query_one(
                &format!(
                    "SELECT seqs IS NULL, types, runner_seqs FROM event_batches
                     WHERE run_id = $1::text::uuid ORDER BY last_seq {order} LIMIT 1"
                ),
                &[run_id],
            )
            .await
            .unwrap()
        }
    };
    let streamed = batch("DESC").await;
    assert!(streamed.get::<_, bool>(0), "no seqs written");
    assert_eq!(streamed.get::<_, Vec<String>>(1), ["content.delta"]);
    assert_eq!(streamed.get::<_, Vec<Option<i64>>>(2), [Some(31)]);
    let started: Vec<(String, Option<i64>)> = {
        let mixed = db
            .query(
                "SELECT t, r FROM event_batches b,
                        unnest(b.types, b.runner_seqs) AS e (t, r)
                 WHERE b.run_id = $1::text::uuid AND 'run.started' = ANY(b.types)",
                &[&lease.run_id],
            )
            .await
            .unwrap();
        mixed.iter().map(|row| (row.get(0), row.get(1))).collect()
    };
    assert_eq!(started.len(), 31, "an element per event: {started:?}");
    assert!(started.contains(&("run.started".to_owned(), None)));
    assert!(started.contains(&("content.delta".to_owned(), Some(30))));

    let read = db
        .query(
            "SELECT seq, type, runner_seq FROM events
             WHERE run_id = $1::text::uuid AND producer = 'runner' ORDER BY seq",
            &[&lease.run_id],
        )
        .await
        .unwrap();
    let runner_seqs: Vec<i64> = read.iter().map(|row| row.get(2)).collect();
    assert_eq!(runner_seqs, (1..=60).collect::<Vec<_>>());
    assert!(
        read.iter()
            .all(|row| row.get::<_, String>(1) == "content.delta")
    );
    let seqs: Vec<i64> = read.iter().map(|row| row.get(0)).collect();
    assert_eq!(
        seqs,
        (seqs[0]..seqs[0] + 60).collect::<Vec<_>>(),
        "every seq of the range, in order"
    );
}

/// How many log batches (stored rows) the run's events take.
async fn rows(db: &tokio_postgres::Client, run_id: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM event_batches WHERE run_id = $1::text::uuid",
        &[&run_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// The log's backstop against a counter that disagrees with it (the old per-event
/// primary key's job): when seqs the run's counter would give out are already stored —
/// written here behind the manager's back — an append is refused whole, and no seq is
/// stored twice.
#[tokio::test]
async fn an_append_overlapping_the_stored_log_is_refused_whole() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let me = runner("overlapped");
    create(&mut app, "overlap").await;
    let held = claim(&mut app, &me, 1).await;
    let run_id = held[0].run.as_ref().unwrap().run_id.clone();
    app.runners
        .append_events(append(&me, &held[0], deltas(1, 3)))
        .await
        .expect("a plain append");
    let db = app.db().await;
    db.execute(
        "INSERT INTO event_batches (run_id, first_seq, last_seq, producer, created_at, seqs,
                                    types, payloads)
         SELECT id, last_event_seq + 1, last_event_seq + 2, 'manager', now(),
                ARRAY[last_event_seq + 1, last_event_seq + 2],
                ARRAY['runtime.warning', 'runtime.warning'], '[{}, {}]'
         FROM runs WHERE id = $1::text::uuid",
        &[&run_id],
    )
    .await
    .expect("write events behind the manager's back");

    let refused = app
        .runners
        .append_events(append(&me, &held[0], deltas(4, 6)))
        .await
        .expect_err("the overlapping append is refused");
    assert_eq!(refused.code(), Code::Internal, "{refused:?}");
    let twice: i64 = db
        .query_one(
            "SELECT count(*) FROM (SELECT seq FROM events WHERE run_id = $1::text::uuid
                                   GROUP BY seq HAVING count(*) > 1) d",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(twice, 0, "no seq is stored twice");
    let runner_seqs: i64 = db
        .query_one(
            "SELECT count(*) FROM events WHERE run_id = $1::text::uuid AND runner_seq > 3",
            &[&run_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(runner_seqs, 0, "nothing of the refused append is stored");
}
