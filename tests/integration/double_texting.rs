//! A turn sent while another is active follows its delivery policy; steers aimed at an
//! ended turn are refused.

use std::time::Duration;

use agentrun_shared::proto::{self, CommandKind, RunStatus, TurnDeliveryPolicy};
use agentrun_tests::*;
use serde_json::{Value, json};
use tonic::Code;

const LONG: Duration = Duration::from_secs(60);

fn turn(run_id: &str, prompt: &str, policy: TurnDeliveryPolicy) -> proto::SendCommandRequest {
    proto::SendCommandRequest {
        run_id: run_id.into(),
        kind: CommandKind::Turn as i32,
        payload_json: json!({ "prompt": prompt }).to_string(),
        delivery_policy: policy as i32,
        ..Default::default()
    }
}

fn turn_states(events: &[proto::Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.r#type == "turn.completed")
        .map(|e| {
            serde_json::from_str::<Value>(&e.payload_json).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

async fn started(app: &mut TestApp, prompt: &str) -> (String, RunnerProcess) {
    let runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20")]);
    let run_id = app
        .runs
        .create_run(run_request(prompt))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    wait_for_event(app, &run_id, "turn.started", LONG).await;
    (run_id, runner)
}

#[tokio::test]
async fn queue_runs_the_turn_after_the_active_one() {
    let mut app = TestApp::spawn().await;
    let (run_id, _runner) = started(&mut app, "[tokens:40] first").await;
    app.runs
        .send_command(turn(&run_id, "second", TurnDeliveryPolicy::Queue))
        .await
        .unwrap();
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    assert_eq!(turn_states(&events), ["completed", "completed"]);
    let text = assistant_text(&events);
    assert!(
        text.find("token40").unwrap() < text.find("second").unwrap(),
        "{text}"
    );
}

#[tokio::test]
async fn interrupt_stops_the_active_turn_then_starts_the_new_one() {
    let mut app = TestApp::spawn().await;
    let (run_id, _runner) = started(&mut app, "[stall] first").await;
    app.runs
        .send_command(turn(&run_id, "second", TurnDeliveryPolicy::Interrupt))
        .await
        .unwrap();
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    assert_eq!(turn_states(&events), ["interrupted", "completed"]);
    assert!(assistant_text(&events).contains("second"));
}

#[tokio::test]
async fn steer_policy_injects_into_the_active_turn() {
    let mut app = TestApp::spawn().await;
    let (run_id, _runner) = started(&mut app, "[tokens:60] first").await;
    app.runs
        .send_command(turn(&run_id, "whales", TurnDeliveryPolicy::Steer))
        .await
        .unwrap();
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    assert_eq!(turn_states(&events), ["completed"], "no second turn");
    assert!(assistant_text(&events).contains("[steer: whales]"));
}

#[tokio::test]
async fn reject_refuses_while_a_turn_is_active() {
    let mut app = TestApp::spawn().await;
    let (run_id, _runner) = started(&mut app, "[stall] busy").await;
    let err = app
        .runs
        .send_command(turn(&run_id, "no", TurnDeliveryPolicy::Reject))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn a_steer_aimed_at_an_ended_turn_is_refused() {
    let mut app = TestApp::spawn().await;
    let (run_id, _runner) = started(&mut app, "[stall] first").await;
    let first_turn = get_run(&mut app, &run_id).await.active_turn_id;
    wait_for("the manager to know the active turn", LONG, || {
        let mut app_runs = app.runs.clone();
        let run_id = run_id.clone();
        async move {
            let run = app_runs
                .get_run(proto::GetRunRequest { run_id })
                .await
                .ok()?
                .into_inner()
                .run?;
            (!run.active_turn_id.is_empty()).then_some(())
        }
    })
    .await;
    let first_turn = if first_turn.is_empty() {
        get_run(&mut app, &run_id).await.active_turn_id
    } else {
        first_turn
    };
    let steer = |expected: &str| proto::SendCommandRequest {
        run_id: run_id.clone(),
        kind: CommandKind::Steer as i32,
        payload_json: json!({"text": "left"}).to_string(),
        expected_turn_id: expected.into(),
        ..Default::default()
    };
    // Aimed at the active turn: accepted.
    app.runs.send_command(steer(&first_turn)).await.unwrap();

    // The turn is interrupted and a new one starts: the old aim is refused.
    app.runs
        .send_command(turn(
            &run_id,
            "[stall] second",
            TurnDeliveryPolicy::Interrupt,
        ))
        .await
        .unwrap();
    wait_for("the second turn to be active", LONG, || {
        let mut app_runs = app.runs.clone();
        let run_id = run_id.clone();
        let first_turn = first_turn.clone();
        async move {
            let run = app_runs
                .get_run(proto::GetRunRequest { run_id })
                .await
                .ok()?
                .into_inner()
                .run?;
            (!run.active_turn_id.is_empty() && run.active_turn_id != first_turn).then_some(())
        }
    })
    .await;
    let err = app.runs.send_command(steer(&first_turn)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.metadata().get("agentrun-error").unwrap(),
        "turn_not_active"
    );
}

/// A turn queued while the runner streams can be on its way to the runner when the
/// runner's turn ends with nothing queued that it knows of: its finish must not end the
/// run and drop the turn. The run goes back to the queue (`run.requeued`, reason
/// `turn_queued`, not an attempt), and the next claim hands the turn over. A runner that
/// finishes again without taking a turn handed over with its claim ends the run as
/// before (the turn is cancelled), so a runner that ignores turns cannot loop forever.
#[tokio::test]
async fn a_turn_on_its_way_to_the_runner_survives_the_runners_finish() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 120_000).await;
    let run_id = create(&mut app, "first").await;
    let me = runner("finisher");
    let first = claim(&mut app, &me, 1).await.remove(0);
    let second = app
        .runs
        .send_command(turn(&run_id, "second", TurnDeliveryPolicy::Queue))
        .await
        .expect("queue a second turn")
        .into_inner()
        .command
        .expect("the command");
    // The heartbeat delivers it; the runner has not read it when it finishes.
    app.runners
        .heartbeat(proto::HeartbeatRequest {
            runner_id: me.runner_id.clone(),
            leases: vec![proto::LeaseRef {
                run_id: run_id.clone(),
                epoch: first.epoch,
            }],
        })
        .await
        .expect("heartbeat");
    let answered = app
        .runners
        .finish_run(finish(&me, &first, RunStatus::Completed))
        .await
        .expect("the finish is answered")
        .into_inner()
        .run
        .expect("the run");
    assert_eq!(status_of(&answered), RunStatus::Pending, "{answered:?}");
    let events = events_of(&mut app, &run_id).await;
    let requeued = events
        .iter()
        .find(|e| e.r#type == "run.requeued")
        .expect("the run went back to the queue");
    assert_eq!(payload(requeued)["reason"], "turn_queued");
    assert!(events.iter().all(|e| e.r#type != "run.terminal"));

    let again = claim(&mut app, &me, 1).await.remove(0);
    assert_eq!(again.epoch, first.epoch + 1);
    let handed: Vec<&str> = again
        .commands
        .iter()
        .map(|c| c.command_id.as_str())
        .collect();
    assert!(handed.contains(&second.command_id.as_str()), "{handed:?}");
    // Finishing again without taking the turn it was handed ends the run.
    let ended = app
        .runners
        .finish_run(finish(&me, &again, RunStatus::Completed))
        .await
        .expect("the finish is answered")
        .into_inner()
        .run
        .expect("the run");
    assert_eq!(status_of(&ended), RunStatus::Completed);
    assert_eq!(
        get_run(&mut app, &run_id).await.attempt,
        1,
        "not an attempt"
    );
    assert_event_log_consistent(&app.db().await).await;
}
