//! The manager's side of a conversation's rules: turns follow their lifecycle even when a
//! runner does not, typed text is trimmed, a queued turn can be withdrawn, and every
//! closure the manager makes (a request or command ended with its turn or run) is an
//! event, so a client that follows only events never shows what no longer exists.

use agentrun_shared::proto::manager_message::Body as FromManager;
use agentrun_shared::proto::runner_message::Body as ToManager;
use agentrun_shared::proto::{self, CommandKind, CommandStatus, Producer, RunStatus};
use agentrun_tests::invariants::{Settled, assert_invariants};
use agentrun_tests::*;
use serde_json::{Value, json};
use tonic::Code;

use crate::faults::{LONG, RawRunner, create_all};

fn runner_event(runner_seq: i64, event_type: &str, payload: Value) -> proto::RunnerEvent {
    proto::RunnerEvent {
        runner_seq,
        r#type: event_type.into(),
        payload_json: payload.to_string(),
    }
}

fn turn(run_id: &str, prompt: &str) -> proto::SendCommandRequest {
    proto::SendCommandRequest {
        run_id: run_id.into(),
        kind: CommandKind::Turn as i32,
        payload_json: json!({ "prompt": prompt }).to_string(),
        ..Default::default()
    }
}

async fn send(app: &mut TestApp, request: proto::SendCommandRequest) -> proto::Command {
    app.runs
        .send_command(request)
        .await
        .expect("send command")
        .into_inner()
        .command
        .expect("command")
}

async fn commands_of(app: &mut TestApp, run_id: &str) -> Vec<proto::Command> {
    app.runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run_id.into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list commands")
        .into_inner()
        .commands
}

fn cancel_command(run_id: &str, command_id: &str) -> proto::CancelCommandRequest {
    proto::CancelCommandRequest {
        run_id: run_id.into(),
        command_id: command_id.into(),
    }
}

fn get_command(run_id: &str, command_id: &str) -> proto::GetCommandRequest {
    proto::GetCommandRequest {
        run_id: run_id.into(),
        command_id: command_id.into(),
    }
}

/// The `command.completed` events of a run naming `command_id`.
fn completions<'a>(events: &'a [proto::Event], command_id: &str) -> Vec<&'a proto::Event> {
    events
        .iter()
        .filter(|e| e.r#type == "command.completed" && payload(e)["command_id"] == command_id)
        .collect()
}

// ---- turn lifecycle guard

/// A runner's stray turn events — a second `turn.started` while a turn is active, a
/// `turn.completed` naming another turn or when none is active — are refused, naming the
/// event, and store nothing: the active turn stays, and a steer aimed at it still works.
#[tokio::test]
async fn stray_turn_events_are_refused_and_change_nothing() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let run_id = create(&mut app, "talk").await;
    let me = runner("buggy");
    let a = claim(&mut app, &me, 1).await.remove(0);
    let turn_id = a.commands[0].command_id.clone();
    app.runners
        .append_events(append(
            &me,
            &a,
            vec![runner_event(1, "turn.started", json!({"turn_id": turn_id}))],
        ))
        .await
        .expect("the first turn starts");
    let before = events_of(&mut app, &run_id).await.len();

    let other = uuid::Uuid::new_v4().to_string();
    let delta = || {
        runner_event(
            2,
            "content.delta",
            json!({"kind": "assistant_text", "delta": "x"}),
        )
    };
    let stray: Vec<(Vec<proto::RunnerEvent>, &str)> = vec![
        (
            vec![runner_event(2, "turn.started", json!({"turn_id": other}))],
            "events[0].type",
        ),
        (
            vec![runner_event(2, "turn.started", json!({"turn_id": turn_id}))],
            "events[0].type",
        ),
        (
            vec![runner_event(
                2,
                "turn.completed",
                json!({"turn_id": other, "state": "completed"}),
            )],
            "events[0].payload_json.turn_id",
        ),
        // A refused event takes its whole batch with it.
        (
            vec![
                delta(),
                runner_event(
                    3,
                    "turn.completed",
                    json!({"turn_id": other, "state": "completed"}),
                ),
            ],
            "events[1].payload_json.turn_id",
        ),
    ];
    for (events, field) in stray {
        let err = app
            .runners
            .append_events(append(&me, &a, events))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert_eq!(events_of(&mut app, &run_id).await.len(), before);
    let run = get_run(&mut app, &run_id).await;
    assert_eq!(run.active_turn_id, turn_id, "the active turn is kept");
    assert_eq!(status_of(&run), RunStatus::Running);

    // A steer aimed at the active turn is still accepted.
    let steer = proto::SendCommandRequest {
        run_id: run_id.clone(),
        kind: CommandKind::Steer as i32,
        payload_json: json!({"text": "left"}).to_string(),
        expected_turn_id: turn_id.clone(),
        ..Default::default()
    };
    send(&mut app, steer).await;

    // The turn ends once; another end with no turn active is refused.
    app.runners
        .append_events(append(
            &me,
            &a,
            vec![runner_event(
                2,
                "turn.completed",
                json!({"turn_id": turn_id, "state": "completed"}),
            )],
        ))
        .await
        .expect("the active turn ends");
    assert!(get_run(&mut app, &run_id).await.active_turn_id.is_empty());
    let err = app
        .runners
        .append_events(append(
            &me,
            &a,
            vec![runner_event(
                3,
                "turn.completed",
                json!({"state": "completed"}),
            )],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[0].type"),
        "{}",
        err.message()
    );
    assert_event_log_consistent(&app.db().await).await;
}

/// On the Connect stream the same refusal fails the run (`write_refused`), as every
/// refusal but `lease_lost` does.
#[tokio::test]
async fn a_stray_turn_event_on_the_stream_fails_the_run() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let identity = runner("buggy-stream");
    let mut raw = RawRunner::connect(connect(app.addr).await, &identity, &[])
        .await
        .expect("connect");
    create_all(&mut app.runs, vec![run_request("talk")]).await;
    let lease = raw.take_one().await;
    let events = |list: Vec<proto::RunnerEvent>| {
        ToManager::Events(proto::AppendEventsRequest {
            runner_id: identity.runner_id.clone(),
            run_id: lease.run_id.clone(),
            epoch: lease.epoch,
            events: list,
            command_updates: vec![],
        })
    };
    raw.send(events(vec![runner_event(
        1,
        "turn.started",
        json!({"turn_id": "first"}),
    )]))
    .await;
    match raw.next().await {
        FromManager::EventAck(ack) => {
            assert_eq!(ack.result.expect("a result").acked_runner_seq, 1)
        }
        other => panic!("expected the first turn acknowledged, got {other:?}"),
    }
    let refusal = raw
        .append_refused(
            &lease,
            vec![runner_event(
                2,
                "turn.started",
                json!({"turn_id": "second"}),
            )],
        )
        .await;
    assert_eq!(refusal.code, "INVALID_ARGUMENT", "{refusal:?}");
    let failed = wait_for_run(&app, &lease.run_id, RunStatus::Failed, LONG).await;
    assert_eq!(failed.failure_kind, "write_refused");
    assert!(
        failed.failure_message.contains("events[0].type"),
        "{}",
        failed.failure_message
    );
    let types = event_types(&mut app, &lease.run_id).await;
    assert_eq!(
        types.iter().filter(|t| *t == "turn.started").count(),
        1,
        "{types:?}"
    );
    assert_invariants(&app.db().await, Settled::Any, &[]).await;
}

// ---- typed text is trimmed

/// Prompts and steers are stored trimmed; one that is only whitespace is refused,
/// naming its field, and creates nothing.
#[tokio::test]
async fn prompts_are_trimmed_and_blank_ones_refused() {
    let mut app = TestApp::spawn().await;
    let run_id = create(&mut app, "  \n hello there \t").await;
    let commands = commands_of(&mut app, &run_id).await;
    let first: Value = serde_json::from_str(&commands[0].payload_json).unwrap();
    assert_eq!(first["prompt"], "hello there");
    let run = get_run(&mut app, &run_id).await;
    let input: Value = serde_json::from_str(&run.input_json).unwrap();
    assert_eq!(input["prompt"], "hello there");
    let created = events_of(&mut app, &run_id).await;
    let created = created
        .iter()
        .find(|e| e.r#type == "command.created")
        .expect("command.created");
    assert_eq!(payload(created)["payload"]["prompt"], "hello there");

    let second = send(&mut app, turn(&run_id, "  again  ")).await;
    let second: Value = serde_json::from_str(&second.payload_json).unwrap();
    assert_eq!(second["prompt"], "again");

    let runs_before = app
        .runs
        .list_runs(proto::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs
        .len();
    let blank = " \n\t ";
    let err = app.runs.create_run(run_request(blank)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("input_json.prompt"),
        "{}",
        err.message()
    );
    let err = app
        .runs
        .create_runs(proto::CreateRunsRequest {
            runs: vec![run_request("fine"), run_request("")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("runs[1].input_json.prompt"),
        "{}",
        err.message()
    );
    let runs_after = app
        .runs
        .list_runs(proto::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs
        .len();
    assert_eq!(runs_after, runs_before, "no run was created");

    let commands_before = commands_of(&mut app, &run_id).await.len();
    let steer = proto::SendCommandRequest {
        run_id: run_id.clone(),
        kind: CommandKind::Steer as i32,
        payload_json: json!({"text": blank}).to_string(),
        ..Default::default()
    };
    for (request, field) in [
        (turn(&run_id, blank), "payload_json.prompt"),
        (turn(&run_id, ""), "payload_json.prompt"),
        (steer, "payload_json.text"),
    ] {
        let err = app.runs.send_command(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert_eq!(commands_of(&mut app, &run_id).await.len(), commands_before);
}

// ---- a queued turn can be withdrawn

/// A turn queued behind the first is withdrawn before delivery: it is cancelled, with
/// its `command.completed` in the log, and no runner ever gets it. The first turn (once
/// a runner has it) can no longer be withdrawn, and the run carries on with the next
/// turn sent after the withdrawn one.
#[tokio::test]
async fn a_queued_turn_is_withdrawn_and_never_runs() {
    let mut app = TestApp::spawn().await;
    // No runner yet: the queued turn stays pending, whatever a runner would do with it.
    let run_id = create(&mut app, "[stall] first").await;
    let first = commands_of(&mut app, &run_id).await.remove(0);
    let queued = send(&mut app, turn(&run_id, "second")).await;
    assert_eq!(queued.status, CommandStatus::Pending as i32);

    let withdrawn = app
        .runs
        .cancel_command(cancel_command(&run_id, &queued.command_id))
        .await
        .expect("withdraw the queued turn")
        .into_inner();
    assert!(withdrawn.cancelled_now);
    let command = withdrawn.command.expect("the command");
    assert_eq!(command.status, CommandStatus::Cancelled as i32);
    assert_eq!(command.command_id, queued.command_id);
    // Again: the same answer, nothing new.
    let again = app
        .runs
        .cancel_command(cancel_command(&run_id, &queued.command_id))
        .await
        .expect("withdrawing twice is fine")
        .into_inner();
    assert!(!again.cancelled_now);
    assert_eq!(
        again.command.unwrap().status,
        CommandStatus::Cancelled as i32
    );
    let got = app
        .runs
        .get_command(get_command(&run_id, &queued.command_id))
        .await
        .expect("get the command")
        .into_inner()
        .command
        .expect("the command");
    assert_eq!(got.status, CommandStatus::Cancelled as i32);
    assert_eq!(got.seq, queued.seq);
    let events = events_of(&mut app, &run_id).await;
    let closed = completions(&events, &queued.command_id);
    assert_eq!(
        closed.len(),
        1,
        "one command.completed for the withdrawn turn"
    );
    assert_eq!(payload(closed[0])["status"], "cancelled");
    assert_eq!(payload(closed[0])["closed_by"], "manager");
    assert_eq!(closed[0].producer, Producer::Manager as i32);

    // Another tenant cannot tell the command exists; unknown ids are not found either.
    let err = app
        .runs
        .cancel_command(as_tenant(
            "intruder",
            cancel_command(&run_id, &queued.command_id),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = app
        .runs
        .get_command(as_tenant(
            "intruder",
            get_command(&run_id, &queued.command_id),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let unknown = uuid::Uuid::new_v4().to_string();
    for request in [
        cancel_command(&run_id, &unknown),
        cancel_command(&unknown, &queued.command_id),
    ] {
        let err = app.runs.cancel_command(request).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }
    let err = app
        .runs
        .get_command(get_command(&run_id, &unknown))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    for (request, field) in [
        (cancel_command("nope", &queued.command_id), "run_id"),
        (cancel_command(&run_id, ""), "command_id"),
        (cancel_command(&run_id, "nope"), "command_id"),
    ] {
        let err = app.runs.cancel_command(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    for (request, field) in [
        (get_command("nope", &queued.command_id), "run_id"),
        (get_command(&run_id, ""), "command_id"),
        (get_command(&run_id, "nope"), "command_id"),
    ] {
        let err = app.runs.get_command(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }

    // A runner takes the run: the stalled first turn is active, and, delivered, can no
    // longer be withdrawn.
    let _runner = RunnerProcess::start(app.addr, "r1", &[]);
    wait_for_event(&mut app, &run_id, "turn.started", LONG).await;
    let err = app
        .runs
        .cancel_command(cancel_command(&run_id, &first.command_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("withdrawn"), "{}", err.message());

    // Interrupting the first turn does not start the withdrawn one; the next turn sent
    // runs, and the run completes with it.
    send(
        &mut app,
        proto::SendCommandRequest {
            run_id: run_id.clone(),
            kind: CommandKind::Interrupt as i32,
            payload_json: "{}".into(),
            ..Default::default()
        },
    )
    .await;
    let ended = wait_for_event(&mut app, &run_id, "turn.completed", LONG).await;
    assert_eq!(payload(&ended)["state"], "interrupted");
    let third = send(&mut app, turn(&run_id, "third")).await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;

    let events = events_of(&mut app, &run_id).await;
    let started: Vec<String> = events
        .iter()
        .filter(|e| e.r#type == "turn.started")
        .map(|e| {
            payload(e)["turn_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        started,
        [first.command_id.clone(), third.command_id.clone()]
    );
    assert!(
        !events.iter().any(|e| e.r#type == "command.delivered"
            && payload(e)["command_id"] == queued.command_id.as_str()),
        "the withdrawn turn was never delivered"
    );
    assert!(!assistant_text(&events).contains("second"));
    assert_invariants(&app.db().await, Settled::AllTerminal, &[]).await;
}

/// A `cancel` or `resolve` command is not withdrawn: the run's cancellation stands.
#[tokio::test]
async fn a_cancel_is_not_withdrawn() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let run_id = create(&mut app, "held").await;
    let me = runner("holder");
    claim(&mut app, &me, 1).await;
    let cancel = send(
        &mut app,
        proto::SendCommandRequest {
            run_id: run_id.clone(),
            kind: CommandKind::Cancel as i32,
            payload_json: "{}".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(cancel.status, CommandStatus::Pending as i32);
    let err = app
        .runs
        .cancel_command(cancel_command(&run_id, &cancel.command_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let got = app
        .runs
        .get_command(get_command(&run_id, &cancel.command_id))
        .await
        .unwrap()
        .into_inner()
        .command
        .unwrap();
    assert_eq!(got.status, CommandStatus::Pending as i32);
}

// ---- closures are events

/// A run cancelled while queued: the manager cancels its turns and carries out the
/// cancel itself, and says so in the log — one `command.completed` per command, before
/// `run.terminal`.
#[tokio::test]
async fn commands_closed_with_their_run_are_events() {
    let mut app = TestApp::spawn().await;
    let run_id = create(&mut app, "first").await;
    let queued = send(&mut app, turn(&run_id, "second")).await;
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run_id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .expect("cancel the queued run");
    wait_for_run(&app, &run_id, RunStatus::Cancelled, LONG).await;

    let commands = commands_of(&mut app, &run_id).await;
    assert_eq!(commands.len(), 3, "{commands:?}");
    let events = events_of(&mut app, &run_id).await;
    let terminal = events
        .iter()
        .position(|e| e.r#type == "run.terminal")
        .expect("run.terminal");
    assert_eq!(terminal, events.len() - 1, "run.terminal is last");
    for command in &commands {
        let closed = completions(&events, &command.command_id);
        assert_eq!(
            closed.len(),
            1,
            "command {} closed once: {events:?}",
            command.seq
        );
        let event = payload(closed[0]);
        let want = if command.kind == CommandKind::Cancel as i32 {
            "completed"
        } else {
            "cancelled"
        };
        assert_eq!(event["status"], want, "{event}");
        assert_eq!(event["closed_by"], "manager");
        assert!(closed[0].seq < events[terminal].seq);
    }
    let queued_closed = payload(completions(&events, &queued.command_id)[0]);
    assert_eq!(queued_closed["error"], "run ended");
    assert_invariants(&app.db().await, Settled::AllTerminal, &[]).await;
}

/// An approval open when its run is cancelled is closed in the log
/// (`request.resolved`, decision cancel, with the reason), and answering it afterwards
/// gets that resolution back.
#[tokio::test]
async fn a_request_closed_with_its_run_is_an_event() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r1", &[]);
    let run_id = create(&mut app, "[approval] deploy").await;
    let opened = wait_for_event(&mut app, &run_id, "request.opened", LONG).await;
    let request_id = payload(&opened)["request_id"]
        .as_str()
        .expect("a request id")
        .to_owned();
    wait_for_run(&app, &run_id, RunStatus::Waiting, LONG).await;
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_run(&app, &run_id, RunStatus::Cancelled, LONG).await;

    let events = events_of(&mut app, &run_id).await;
    let resolved: Vec<&proto::Event> = events
        .iter()
        .filter(|e| e.r#type == "request.resolved")
        .collect();
    assert_eq!(resolved.len(), 1, "{events:?}");
    let event = payload(resolved[0]);
    assert_eq!(event["request_id"], request_id.as_str());
    assert_eq!(event["decision"], "cancel");
    assert!(
        matches!(event["reason"].as_str(), Some("turn ended" | "run ended")),
        "{event}"
    );
    assert_eq!(resolved[0].producer, Producer::Manager as i32);
    let terminal = events.iter().rposition(|e| e.r#type == "run.terminal");
    assert_eq!(terminal, Some(events.len() - 1));

    let late = app
        .runs
        .resolve_request(proto::ResolveRequestRequest {
            run_id: run_id.clone(),
            request_id: request_id.clone(),
            decision: "accept".into(),
            ..Default::default()
        })
        .await
        .expect("a late answer gets the closure back")
        .into_inner();
    assert!(!late.resolved_now);
    let resolution: Value = serde_json::from_str(&late.resolution_json).unwrap();
    assert_eq!(resolution["decision"], "cancel");
    assert_eq!(late.request.unwrap().status, "cancelled");
    assert_eq!(
        events_of(&mut app, &run_id).await.len(),
        events.len(),
        "the late answer recorded nothing"
    );
    assert_invariants(&app.db().await, Settled::AllTerminal, &[]).await;
}
