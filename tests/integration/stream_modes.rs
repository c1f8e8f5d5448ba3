//! Stream modes per run (`CreateRunRequest.stream_mode`): `deltas` stores every delta (the
//! default), `coalesced` stores the deltas of one item that arrive in one runner batch as
//! one, `final` stores none and fans them out live as ephemeral events. In every mode the
//! log stays gapless, resumable at any seq, and a resent batch is stored once.

use std::time::Instant;

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{self, RunStatus, StreamMode};
use agentrun_tests::*;
use serde_json::json;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Channel;

use crate::faults::{LONG, assert_replies_whole};

fn request(prompt: &str, mode: StreamMode) -> proto::CreateRunRequest {
    proto::CreateRunRequest {
        stream_mode: mode as i32,
        ..run_request(prompt)
    }
}

async fn create_in(runs: &mut RunServiceClient<Channel>, prompt: &str, mode: StreamMode) -> String {
    runs.create_run(request(prompt, mode))
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

async fn watch(
    runs: &mut RunServiceClient<Channel>,
    run_id: &str,
    after_seq: i64,
) -> Streaming<proto::Event> {
    runs.watch_run(proto::WatchRunRequest {
        run_id: run_id.into(),
        after_seq,
    })
    .await
    .expect("watch run")
    .into_inner()
}

/// Reads `stream` until it ends (after run.terminal), with a deadline.
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

/// Every event of the run through ListEvents, in seq order.
async fn list_all(runs: &mut RunServiceClient<Channel>, run_id: &str) -> Vec<proto::Event> {
    let mut all: Vec<proto::Event> = Vec::new();
    loop {
        let page = runs
            .list_events(proto::ListEventsRequest {
                run_id: run_id.into(),
                after_seq: all.last().map_or(0, |e| e.seq),
                limit: 1000,
            })
            .await
            .expect("list events")
            .into_inner();
        let done = page.events.len() < 1000;
        all.extend(page.events);
        if done {
            return all;
        }
    }
}

async fn wait_ended(runs: &RunServiceClient<Channel>, run_id: &str) -> proto::Run {
    wait_for(&format!("run {run_id} to end"), LONG, || {
        let mut runs = runs.clone();
        let run_id = run_id.to_owned();
        async move {
            let run = runs
                .get_run(proto::GetRunRequest { run_id })
                .await
                .ok()?
                .into_inner()
                .run?;
            (status_of(&run) != RunStatus::Pending
                && status_of(&run) != RunStatus::Claimed
                && status_of(&run) != RunStatus::Running
                && status_of(&run) != RunStatus::Waiting)
                .then_some(run)
        }
    })
    .await
}

fn tokens(n: usize) -> String {
    (1..=n)
        .map(|i| format!("token{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Seqs 1, 2, … without gap or duplicate, none ephemeral.
fn assert_gapless_and_durable(events: &[proto::Event]) {
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let want: Vec<i64> = (1..=events.len() as i64).collect();
    assert_eq!(seqs, want, "the stored log is gapless");
    assert!(
        events.iter().all(|e| !e.ephemeral),
        "no stored event is ephemeral"
    );
}

fn deltas_of(events: &[proto::Event]) -> Vec<&proto::Event> {
    events
        .iter()
        .filter(|e| e.r#type == "content.delta")
        .collect()
}

/// The text of the (last) completed assistant message.
fn completed_text(events: &[proto::Event]) -> String {
    events
        .iter()
        .rev()
        .find(|e| e.r#type == "item.completed" && payload(e)["kind"] == "assistant_message")
        .and_then(|e| payload(e)["text"].as_str().map(str::to_owned))
        .expect("a completed assistant message")
}

/// Checks what one watcher of a `final` run received: every durable event once and in
/// order (the same as ListEvents), and each ephemeral delta right after the durable event
/// whose seq it carries. Returns the ephemeral deltas' text.
fn check_final_watch(watched: &[proto::Event], stored: &[proto::Event]) -> String {
    let durable: Vec<&proto::Event> = watched.iter().filter(|e| !e.ephemeral).collect();
    assert_eq!(
        durable.iter().map(|e| e.seq).collect::<Vec<_>>(),
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        "the watcher got every stored event once, in order"
    );
    let mut last_durable = 0;
    let mut text = String::new();
    for event in watched {
        if event.ephemeral {
            assert_eq!(event.r#type, "content.delta");
            assert_eq!(
                event.seq, last_durable,
                "an ephemeral delta carries the seq of the stored event it follows"
            );
            text.push_str(payload(event)["delta"].as_str().unwrap_or_default());
        } else {
            last_durable = event.seq;
        }
    }
    text
}

#[tokio::test]
async fn the_default_mode_stores_every_delta() {
    let db_url = fresh_database().await;
    let manager = ManagerProcess::start(&db_url, &[]).await;
    let _runner = RunnerProcess::start(manager.addr, "deltas", &[]);
    let mut runs = RunServiceClient::new(manager.channel().await);
    let created = runs
        .create_run(run_request("[tokens:40]"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(created.stream_mode, StreamMode::Deltas as i32);
    let run = wait_ended(&runs, &created.run_id).await;
    assert_eq!(status_of(&run), RunStatus::Completed);
    assert_eq!(run.stream_mode, StreamMode::Deltas as i32, "GetRun says so");
    let events = list_all(&mut runs, &created.run_id).await;
    assert_gapless_and_durable(&events);
    assert_eq!(deltas_of(&events).len(), 40, "one stored delta per token");
    assert_eq!(assistant_text(&events), tokens(40));
    let db = db_client(&db_url).await;
    assert_event_log_consistent(&db).await;
    assert_eq!(assert_replies_whole(&db).await, 1);
}

#[tokio::test]
async fn coalesced_stores_fewer_deltas_with_the_same_text_and_resumes_mid_run() {
    let db_url = fresh_database().await;
    let manager = ManagerProcess::start(&db_url, &[]).await;
    let mut runs = RunServiceClient::new(manager.channel().await);
    let run_id = create_in(&mut runs, "[tokens:300]", StreamMode::Coalesced).await;
    assert_eq!(
        get_run_via(&mut runs, &run_id).await.stream_mode,
        StreamMode::Coalesced as i32
    );
    let _runner = RunnerProcess::start(
        manager.addr,
        "coalescing",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "1")],
    );

    // A watcher reads part of the run, goes away, and resumes from the last seq it saw.
    let mut first = watch(&mut runs, &run_id, 0).await;
    let mut seen: Vec<proto::Event> = Vec::new();
    while !seen.iter().any(|e| e.r#type == "content.delta") {
        let event = tokio::time::timeout(LONG, first.message())
            .await
            .expect("events in time")
            .unwrap()
            .expect("the watch goes on");
        seen.push(event);
    }
    drop(first);
    let resumed = watch(&mut runs, &run_id, seen.last().unwrap().seq).await;
    seen.extend(collect(resumed).await);

    let run = wait_ended(&runs, &run_id).await;
    assert_eq!(status_of(&run), RunStatus::Completed);
    let stored = list_all(&mut runs, &run_id).await;
    assert_gapless_and_durable(&stored);
    assert_eq!(
        seen.iter().map(|e| e.seq).collect::<Vec<_>>(),
        stored.iter().map(|e| e.seq).collect::<Vec<_>>(),
        "the resumed watch saw every event once"
    );
    let deltas = deltas_of(&stored).len();
    assert!(
        deltas < 300,
        "{deltas} deltas stored for 300 streamed: nothing was coalesced"
    );
    assert_eq!(assistant_text(&stored), tokens(300), "the same reply text");
    assert_eq!(completed_text(&stored), tokens(300));
    let db = db_client(&db_url).await;
    assert_event_log_consistent(&db).await;
    assert_eq!(assert_replies_whole(&db).await, 1);
}

async fn get_run_via(runs: &mut RunServiceClient<Channel>, run_id: &str) -> proto::Run {
    runs.get_run(proto::GetRunRequest {
        run_id: run_id.into(),
    })
    .await
    .expect("get run")
    .into_inner()
    .run
    .expect("run")
}

/// One runner batch, by hand: its deltas of one item become one stored event (cut at the
/// payload limit), a resend stores nothing, and the ack names the batch's last runner_seq.
#[tokio::test]
async fn a_coalesced_batch_is_merged_per_item_within_the_payload_limit_and_stored_once() {
    let mut app = TestApp::spawn_with(|s| {
        s.lease_ttl_ms = 120_000;
        s.max_payload_bytes = 2048;
    })
    .await;
    let run_id = app
        .runs
        .create_run(request("merged by hand", StreamMode::Coalesced))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let me = runner("by-hand");
    let held = claim(&mut app, &me, 1).await;
    let delta = |seq: i64, item: &str, text: String| proto::RunnerEvent {
        runner_seq: seq,
        r#type: "content.delta".into(),
        payload_json: json!({"item_id": item, "kind": "assistant_text", "delta": text}).to_string(),
    };
    // a: 3 small deltas, then b: 2, then a again: three stored deltas.
    let mut batch = vec![
        delta(1, "a", "one ".into()),
        delta(2, "a", "two ".into()),
        delta(3, "a", "three".into()),
        delta(4, "b", "x".into()),
        delta(5, "b", "y".into()),
        delta(6, "a", "!".into()),
    ];
    // Then 6 deltas of 500 bytes of c: 3,000 bytes do not fit one 2,048-byte payload.
    for i in 0..6 {
        batch.push(delta(
            7 + i,
            "c",
            char::from(b'0' + i as u8).to_string().repeat(500),
        ));
    }
    let ack = app
        .runners
        .append_events(append(&me, &held[0], batch.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ack.acked_runner_seq, 12,
        "the ack names the batch's last runner_seq"
    );

    let stored = list_all(&mut app.runs, &run_id).await;
    assert_gapless_and_durable(&stored);
    let deltas: Vec<serde_json::Value> = deltas_of(&stored).into_iter().map(payload).collect();
    let texts: Vec<(&str, &str)> = deltas
        .iter()
        .map(|p| (p["item_id"].as_str().unwrap(), p["delta"].as_str().unwrap()))
        .collect();
    assert_eq!(
        &texts[..3],
        [("a", "one two three"), ("b", "xy"), ("a", "!")]
    );
    let c: Vec<&str> = texts[3..].iter().map(|(_, t)| *t).collect();
    assert!(
        c.len() >= 2,
        "the merge was cut at the payload limit: {c:?}"
    );
    assert!(c.len() < 6, "c's deltas were merged: {c:?}");
    let want: String = (0..6)
        .map(|i| char::from(b'0' + i as u8).to_string().repeat(500))
        .collect();
    assert_eq!(c.concat(), want);
    for (p, e) in deltas.iter().zip(deltas_of(&stored)) {
        assert_eq!(
            p["kind"], "assistant_text",
            "the rest of the payload is kept"
        );
        assert!(
            e.payload_json.len() <= 2048,
            "a merged delta fits the payload limit"
        );
    }

    // The same batch again (its ack was lost): stored once.
    let again = app
        .runners
        .append_events(append(&me, &held[0], batch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.acked_runner_seq, 12);
    assert_eq!(again.duplicates, 12);
    assert_eq!(list_all(&mut app.runs, &run_id).await.len(), stored.len());
    app.runners
        .finish_run(finish(&me, &held[0], RunStatus::Completed))
        .await
        .unwrap();
    assert_event_log_consistent(&app.db().await).await;
}

/// `final` by hand on one replica: deltas are not stored and spend no seq, a watcher gets
/// them live as ephemeral events placed after the stored event whose seq they carry,
/// and the completed item holds the whole text.
#[tokio::test]
async fn final_stores_no_deltas_and_a_watcher_gets_them_live_as_ephemeral_events() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 120_000).await;
    let run_id = app
        .runs
        .create_run(request("final by hand", StreamMode::Final))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    let me = runner("by-hand");
    let held = claim(&mut app, &me, 1).await;
    let mut stream = watch(&mut app.runs.clone(), &run_id, 0).await;
    let before = last_seq_of(&mut app.runs, &run_id).await;
    // The watcher has caught up (and so is live) once it has read the stored events.
    let mut watched = Vec::new();
    while watched.last().map_or(0, |e: &proto::Event| e.seq) < before {
        watched.push(stream.message().await.unwrap().expect("the watch goes on"));
    }
    let event = |seq: i64, event_type: &str, payload: serde_json::Value| proto::RunnerEvent {
        runner_seq: seq,
        r#type: event_type.into(),
        payload_json: payload.to_string(),
    };
    let delta = |seq: i64, text: &str| {
        event(
            seq,
            "content.delta",
            json!({"item_id": "m", "kind": "assistant_text", "delta": text}),
        )
    };
    app.runners
        .append_events(append(
            &me,
            &held[0],
            vec![
                event(
                    1,
                    "item.started",
                    json!({"item_id": "m", "kind": "assistant_message"}),
                ),
                delta(2, "Hello"),
                delta(3, ", "),
            ],
        ))
        .await
        .unwrap();
    // Deltas alone: nothing stored, yet acknowledged.
    let ack = app
        .runners
        .append_events(append(&me, &held[0], vec![delta(4, "world")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.acked_runner_seq, 4);
    let after_deltas = last_seq_of(&mut app.runs, &run_id).await;
    app.runners
        .append_events(append(
            &me,
            &held[0],
            vec![
                delta(5, "!"),
                event(
                    6,
                    "item.completed",
                    json!({"item_id": "m", "kind": "assistant_message", "text": "Hello, world!"}),
                ),
            ],
        ))
        .await
        .unwrap();
    app.runners
        .finish_run(finish(&me, &held[0], RunStatus::Completed))
        .await
        .unwrap();
    watched.extend(collect(stream).await);

    let stored = list_all(&mut app.runs, &run_id).await;
    assert_gapless_and_durable(&stored);
    assert!(deltas_of(&stored).is_empty(), "no delta is stored");
    assert_eq!(
        after_deltas,
        before + 2,
        "run.started and item.started stored; deltas spend no seq"
    );
    assert_eq!(completed_text(&stored), "Hello, world!");
    assert_eq!(check_final_watch(&watched, &stored), "Hello, world!");
    assert_event_log_consistent(&app.db().await).await;
}

async fn last_seq_of(runs: &mut RunServiceClient<Channel>, run_id: &str) -> i64 {
    get_run_via(runs, run_id).await.last_event_seq
}

/// `final` with real processes and two replicas: the runner streams through one, a
/// watcher on each gets deltas live (the other replica's through NOTIFY), nothing but the
/// completed item holds the text, and the log stays gapless.
#[tokio::test]
async fn final_fans_deltas_out_live_on_both_replicas_and_stores_the_completed_item() {
    let db_url = fresh_database().await;
    let streaming = ManagerProcess::start(&db_url, &[]).await;
    let other = ManagerProcess::start(&db_url, &[]).await;
    let mut runs = RunServiceClient::new(streaming.channel().await);
    let mut other_runs = RunServiceClient::new(other.channel().await);
    let run_id = create_in(&mut runs, "[tokens:200]", StreamMode::Final).await;
    assert_eq!(
        get_run_via(&mut other_runs, &run_id).await.stream_mode,
        StreamMode::Final as i32
    );
    // Both watchers are live (caught up with the pending run) before the runner starts.
    let mut here = watch(&mut runs, &run_id, 0).await;
    let mut there = watch(&mut other_runs, &run_id, 0).await;
    let first_here = here.message().await.unwrap().expect("run.created");
    let first_there = there.message().await.unwrap().expect("run.created");
    let _runner = RunnerProcess::start(
        streaming.addr,
        "final",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")],
    );
    let (mut watched_here, mut watched_there) = (vec![first_here], vec![first_there]);
    let (rest_here, rest_there) = tokio::join!(collect(here), collect(there));
    watched_here.extend(rest_here);
    watched_there.extend(rest_there);

    let run = wait_ended(&runs, &run_id).await;
    assert_eq!(status_of(&run), RunStatus::Completed);
    let stored = list_all(&mut runs, &run_id).await;
    assert_gapless_and_durable(&stored);
    assert!(deltas_of(&stored).is_empty(), "no delta is stored");
    assert_eq!(
        completed_text(&stored),
        tokens(200),
        "the completed item has it all"
    );
    for (replica, watched) in [("same", &watched_here), ("other", &watched_there)] {
        let live = check_final_watch(watched, &stored);
        assert!(
            !live.is_empty(),
            "the watcher on the {replica} replica got no ephemeral delta"
        );
    }
    // Fast on one replica: every delta arrives, in order.
    assert_eq!(check_final_watch(&watched_here, &stored), tokens(200));
    let db = db_client(&db_url).await;
    assert_event_log_consistent(&db).await;
    assert_eq!(assert_replies_whole(&db).await, 1);
}

/// `final`, a reply larger than one payload: its `item.completed` cannot hold the text,
/// so the runner sends the whole text again as deltas marked `text_in_deltas`, which are
/// stored (only those), and the log keeps the reply.
#[tokio::test]
async fn final_stores_the_deltas_of_a_reply_too_large_for_its_completed_item() {
    let db_url = fresh_database().await;
    let manager = ManagerProcess::start(&db_url, &[("AGENTRUN_MAX_PAYLOAD_BYTES", "4096")]).await;
    let _runner = RunnerProcess::start(manager.addr, "final-big", &[]);
    let mut runs = RunServiceClient::new(manager.channel().await);
    let run_id = create_in(&mut runs, "[big:20000]", StreamMode::Final).await;
    let run = wait_ended(&runs, &run_id).await;
    assert_eq!(status_of(&run), RunStatus::Completed);
    let stored = list_all(&mut runs, &run_id).await;
    assert_gapless_and_durable(&stored);
    let deltas = deltas_of(&stored);
    assert!(deltas.len() >= 5, "20,000 bytes in pieces of at most 4,096");
    assert!(
        deltas.iter().all(|d| payload(d)["text_in_deltas"] == true),
        "only the replayed whole text is stored"
    );
    assert_eq!(assistant_text(&stored).len(), 20_000);
    let done = stored
        .iter()
        .find(|e| e.r#type == "item.completed")
        .expect("the completed item");
    assert_eq!(payload(done)["text_in_deltas"], true);
    assert!(
        payload(done)["text"]
            .as_str()
            .is_some_and(|t| assistant_text(&stored).starts_with(t)),
        "the completed item holds the start of the same text"
    );
    assert_event_log_consistent(&db_client(&db_url).await).await;
}

#[tokio::test]
async fn a_bad_stream_mode_is_refused_and_changes_nothing() {
    let mut app = TestApp::spawn().await;
    let db = app.db().await;
    let count = || async {
        db.query_one("SELECT count(*) FROM runs", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut bad = run_request("bad mode");
    bad.stream_mode = 42;
    let err = app.runs.create_run(bad.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("stream_mode"), "{}", err.message());
    let err = app
        .runs
        .create_runs(proto::CreateRunsRequest {
            runs: vec![run_request("fine"), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("runs[1].stream_mode"),
        "{}",
        err.message()
    );
    assert_eq!(count().await, 0, "nothing was created");
}

#[tokio::test]
async fn the_stream_mode_is_part_of_what_an_idempotency_key_compares() {
    let mut app = TestApp::spawn().await;
    let keyed = |mode: StreamMode| proto::CreateRunRequest {
        idempotency_key: "once".into(),
        ..request("keyed", mode)
    };
    let first = app
        .runs
        .create_run(keyed(StreamMode::Final))
        .await
        .unwrap()
        .into_inner();
    assert!(first.created);
    let again = app
        .runs
        .create_run(keyed(StreamMode::Final))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.run.unwrap().run_id, first.run.unwrap().run_id);
    let err = app
        .runs
        .create_run(keyed(StreamMode::Coalesced))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    // Unspecified is the default, deltas: a key first used without a mode matches it.
    let plain = |mode: StreamMode| proto::CreateRunRequest {
        idempotency_key: "plain".into(),
        ..request("plain", mode)
    };
    app.runs
        .create_run(plain(StreamMode::Unspecified))
        .await
        .unwrap();
    let same = app
        .runs
        .create_run(plain(StreamMode::Deltas))
        .await
        .unwrap()
        .into_inner();
    assert!(!same.created);
    assert_event_log_consistent(&app.db().await).await;
}
