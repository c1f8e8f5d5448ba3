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
