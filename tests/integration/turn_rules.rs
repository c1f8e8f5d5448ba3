//! The rules a run's turns follow on the real runner: an interrupt pauses the queue
//! until a new turn or a `resume`; a steer is never taken as the answer to a request and
//! a resolution reaches the waiting turn whole; a reply over the payload limit is read
//! back whole; a human gate ends the run `blocked` when declined and lets it go on when
//! accepted.

use std::time::Duration;

use agentrun_shared::proto::{self, CommandKind, CommandStatus, RunStatus, TurnDeliveryPolicy};
use agentrun_tests::fake_openai::FakeOpenAi;
use agentrun_tests::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

async fn send(
    app: &mut TestApp,
    run_id: &str,
    kind: CommandKind,
    payload: Value,
    policy: TurnDeliveryPolicy,
) -> proto::Command {
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.into(),
            kind: kind as i32,
            payload_json: payload.to_string(),
            delivery_policy: policy as i32,
            ..Default::default()
        })
        .await
        .expect("send command")
        .into_inner()
        .command
        .expect("the command")
}

async fn command(app: &mut TestApp, run_id: &str, command_id: &str) -> proto::Command {
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
        .into_iter()
        .find(|c| c.command_id == command_id)
        .expect("the command is listed")
}

async fn wait_for_command(app: &mut TestApp, run_id: &str, command_id: &str, want: CommandStatus) {
    let client = app.runs.clone();
    wait_for(
        &format!("command {command_id} to be {want:?}"),
        LONG,
        || {
            let mut runs = client.clone();
            let (run_id, command_id) = (run_id.to_owned(), command_id.to_owned());
            async move {
                let commands = runs
                    .list_commands(proto::ListCommandsRequest {
                        run_id,
                        limit: 1000,
                        ..Default::default()
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .commands;
                commands
                    .iter()
                    .any(|c| c.command_id == command_id && c.status == want as i32)
                    .then_some(())
            }
        },
    )
    .await
}

/// Waits for the first event of the run that `matches`.
async fn wait_for_matching(
    app: &mut TestApp,
    run_id: &str,
    what: &str,
    matches: impl Fn(&proto::Event) -> bool,
) -> proto::Event {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        if let Some(event) = events_of(app, run_id).await.into_iter().find(&matches) {
            return event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} within {LONG:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn turn_states(events: &[proto::Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.r#type == "turn.completed")
        .map(|e| payload(e)["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn started_commands(events: &[proto::Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.r#type == "turn.started")
        .map(|e| {
            payload(e)["command_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn is_queue_paused(event: &proto::Event) -> bool {
    event.r#type == "runtime.warning" && payload(event)["queue_paused"] == true
}

/// A stalled turn, a turn queued behind it, then an interrupt (with `interrupt_payload`).
async fn stalled_with_queued_turn(
    app: &mut TestApp,
    interrupt_payload: Value,
) -> (String, proto::Command) {
    let run_id = create(app, "[stall] first").await;
    wait_for_event(app, &run_id, "turn.started", LONG).await;
    let queued = send(
        app,
        &run_id,
        CommandKind::Turn,
        json!({"prompt": "second"}),
        TurnDeliveryPolicy::Queue,
    )
    .await;
    // The runner holds the queued turn before the interrupt comes.
    wait_for_command(
        app,
        &run_id,
        &queued.command_id,
        CommandStatus::Acknowledged,
    )
    .await;
    send(
        app,
        &run_id,
        CommandKind::Interrupt,
        interrupt_payload,
        TurnDeliveryPolicy::Unspecified,
    )
    .await;
    (run_id, queued)
}

#[tokio::test]
async fn an_interrupt_pauses_the_queue_until_resume() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")]);
    let (run_id, queued) = stalled_with_queued_turn(&mut app, json!({})).await;

    // The runner reports the pause once the interrupted turn has ended and it decided
    // not to start the queued one.
    let paused =
        wait_for_matching(&mut app, &run_id, "a queue_paused warning", is_queue_paused).await;
    assert_eq!(
        payload(&paused)["queued_command_ids"],
        json!([queued.command_id])
    );
    let events = events_of(&mut app, &run_id).await;
    assert_eq!(turn_states(&events), ["interrupted"]);
    assert_eq!(
        started_commands(&events).len(),
        1,
        "the queued turn did not start"
    );
    assert_eq!(
        command(&mut app, &run_id, &queued.command_id).await.status,
        CommandStatus::Acknowledged as i32,
        "the queued turn waits"
    );
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Running
    );

    let resume = send(
        &mut app,
        &run_id,
        CommandKind::Resume,
        json!({}),
        TurnDeliveryPolicy::Unspecified,
    )
    .await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    assert_eq!(turn_states(&events), ["interrupted", "completed"]);
    assert_eq!(started_commands(&events)[1], queued.command_id);
    assert!(assistant_text(&events).contains("second"));
    assert_eq!(
        command(&mut app, &run_id, &resume.command_id).await.status,
        CommandStatus::Completed as i32
    );
}

#[tokio::test]
async fn a_new_turn_after_an_interrupt_lets_the_queue_go_on_in_order() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")]);
    let (run_id, queued) = stalled_with_queued_turn(&mut app, json!({})).await;
    wait_for_matching(&mut app, &run_id, "a queue_paused warning", is_queue_paused).await;

    let third = send(
        &mut app,
        &run_id,
        CommandKind::Turn,
        json!({"prompt": "third"}),
        TurnDeliveryPolicy::Queue,
    )
    .await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    assert_eq!(
        turn_states(&events),
        ["interrupted", "completed", "completed"]
    );
    assert_eq!(
        started_commands(&events)[1..],
        [queued.command_id, third.command_id]
    );
}

#[tokio::test]
async fn an_interrupt_asked_to_resume_the_queue_starts_the_queued_turn_at_once() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")]);
    let (run_id, queued) = stalled_with_queued_turn(&mut app, json!({"resume_queue": true})).await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    assert_eq!(turn_states(&events), ["interrupted", "completed"]);
    assert_eq!(started_commands(&events)[1], queued.command_id);
    assert!(!events.iter().any(is_queue_paused));
}

/// Waits for the run's first `request.opened` and returns its payload.
async fn opened_request(app: &mut TestApp, run_id: &str) -> Value {
    let event = wait_for_event(app, run_id, "request.opened", LONG).await;
    payload(&event)
}

async fn request_status(app: &TestApp, request_id: &str) -> String {
    let id: uuid::Uuid = request_id.parse().expect("a request id");
    app.db()
        .await
        .query_one("SELECT status FROM requests WHERE id = $1", &[&id])
        .await
        .expect("the request is stored")
        .get(0)
}

async fn resolve(app: &mut TestApp, run_id: &str, request_id: &str, decision: &str, answers: &str) {
    app.runs
        .resolve_request(proto::ResolveRequestRequest {
            run_id: run_id.into(),
            request_id: request_id.into(),
            decision: decision.into(),
            answers_json: answers.into(),
            ..Default::default()
        })
        .await
        .expect("resolve request");
}

#[tokio::test]
async fn a_steer_is_not_an_answer_and_the_resolution_reaches_the_turn() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")]);
    let run_id = create(&mut app, "[approval] clean up").await;
    let opened = opened_request(&mut app, &run_id).await;
    let request_id = opened["request_id"].as_str().unwrap().to_owned();
    wait_for_run(&app, &run_id, RunStatus::Waiting, LONG).await;

    // The steer reaches the waiting turn (its command completes) but decides nothing.
    let steer = send(
        &mut app,
        &run_id,
        CommandKind::Steer,
        json!({"text": "accept"}),
        TurnDeliveryPolicy::Unspecified,
    )
    .await;
    wait_for_command(
        &mut app,
        &run_id,
        &steer.command_id,
        CommandStatus::Completed,
    )
    .await;
    assert_eq!(request_status(&app, &request_id).await, "open");
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Waiting
    );
    assert!(turn_states(&events_of(&mut app, &run_id).await).is_empty());

    resolve(&mut app, &run_id, &request_id, "decline", "").await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let text = assistant_text(&events_of(&mut app, &run_id).await);
    assert!(text.contains("Approval: decline"), "{text}");
    // The steer was kept as input and shown in the reply, not taken as the decision.
    assert!(text.contains("[steer: accept]"), "{text}");
}

#[tokio::test]
async fn user_input_answers_reach_the_provider() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")]);
    let run_id = create(&mut app, "[input] what next").await;
    let opened = opened_request(&mut app, &run_id).await;
    assert_eq!(opened["kind"], "user_input");
    let request_id = opened["request_id"].as_str().unwrap().to_owned();
    resolve(
        &mut app,
        &run_id,
        &request_id,
        "accept",
        r#"{"next": "ship it", "n": 3}"#,
    )
    .await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let text = assistant_text(&events_of(&mut app, &run_id).await);
    assert!(text.contains(r#"{"n":3,"next":"ship it"}"#), "{text}");
}

#[tokio::test]
async fn a_reply_over_the_payload_limit_is_read_back_whole() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "0")]);
    const BYTES: usize = 300 * 1024;
    let run_id = create(&mut app, &format!("[big:{BYTES}]")).await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    let text = assistant_text(&events);
    assert_eq!(text.len(), BYTES, "the whole reply is in the deltas");
    assert!(text.starts_with("0123456789abcdefghijklmnopqrstuvwxyz 0123"));
    let done = events
        .iter()
        .find(|e| e.r#type == "item.completed")
        .expect("the reply item completed");
    assert!(done.payload_json.len() <= 256 * 1024);
    let done = payload(done);
    assert_eq!(done["kind"], "assistant_message");
    assert_eq!(
        done["text_in_deltas"], true,
        "the reader is told where the text is"
    );
    assert_eq!(done["truncated"], true);
}

#[tokio::test]
async fn a_human_gate_lets_the_run_go_on_or_blocks_it() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r", &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")]);

    let passed = create(&mut app, "[gate] deploy").await;
    let opened = opened_request(&mut app, &passed).await;
    assert_eq!(opened["detail"]["gate"], "deploy");
    let request_id = opened["request_id"].as_str().unwrap().to_owned();
    wait_for_run(&app, &passed, RunStatus::Waiting, LONG).await;
    assert_eq!(request_status(&app, &request_id).await, "open");
    resolve(&mut app, &passed, &request_id, "accept", "").await;
    wait_for_run(&app, &passed, RunStatus::Completed, LONG).await;
    assert!(assistant_text(&events_of(&mut app, &passed).await).contains("Gate passed: deploy"));

    let declined = create(&mut app, "[gate] deploy").await;
    let opened = opened_request(&mut app, &declined).await;
    let request_id = opened["request_id"].as_str().unwrap().to_owned();
    resolve(&mut app, &declined, &request_id, "decline", "").await;
    let run = wait_for_run(&app, &declined, RunStatus::Blocked, LONG).await;
    assert_eq!(run.failure_kind, "blocked");
    assert_eq!(run.failure_message, "deploy");
    assert_eq!(
        turn_states(&events_of(&mut app, &declined).await),
        ["blocked"]
    );
}

/// A rate limit and a server error from the model are retried within the turn, each
/// with a `runtime.warning` in the log, and the turn completes with the reply that
/// finally came: through the API, with the real runner and a local model endpoint.
#[tokio::test]
async fn a_rate_limited_model_call_is_retried_and_the_turn_completes() {
    let server = FakeOpenAi::failing_first(vec![(429, Some("0")), (500, None)]).await;
    let mut app = TestApp::spawn().await;
    let base_url = format!("http://{}/v1", server.addr);
    let _runner = RunnerProcess::start(
        app.addr,
        "openai",
        &[
            ("OPENAI_BASE_URL", base_url.as_str()),
            ("OPENAI_API_KEY", "sk-test"),
            ("AGENTRUN_BACKEND_PROFILES", "openai"),
            ("AGENTRUN_OPENAI_RETRY_BASE_MS", "10"),
        ],
    );
    let mut request = run_request("hello");
    request.backend_profile = "openai".into();
    let run_id = app
        .runs
        .create_run(request)
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;

    let events = events_of(&mut app, &run_id).await;
    let retries: Vec<Value> = events
        .iter()
        .filter(|e| e.r#type == "runtime.warning")
        .map(payload)
        .filter(|p| p["retry"] == json!(true))
        .collect();
    let statuses: Vec<&Value> = retries.iter().map(|p| &p["status"]).collect();
    assert_eq!(statuses, [&json!(429), &json!(500)], "{retries:#?}");
    assert_eq!(assistant_text(&events), "reply 1");
    assert_eq!(
        server.bodies().len(),
        3,
        "two failed calls, then the one answered"
    );
}
