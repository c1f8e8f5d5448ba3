//! Requests (approvals, user input) end to end: a runner opens one, a client answers it
//! through any replica, and the answer reaches whichever runner holds the run — even a
//! new one after a crash. The first answer wins; turn end, run end and the deadline
//! close what nobody answered; other tenants see nothing and bad input changes nothing.

use std::time::{Duration, Instant};

use agentrun_shared::proto::{self, CommandKind, Producer, RunStatus};
use agentrun_tests::*;
use serde_json::{Value, json};
use tonic::Code;

const LONG: Duration = Duration::from_secs(30);

fn resolve_request(
    run_id: &str,
    request_id: &str,
    decision: &str,
    answers_json: &str,
) -> proto::ResolveRequestRequest {
    proto::ResolveRequestRequest {
        run_id: run_id.into(),
        request_id: request_id.into(),
        decision: decision.into(),
        answers_json: answers_json.into(),
        ..Default::default()
    }
}

async fn resolve(
    app: &mut TestApp,
    run_id: &str,
    request_id: &str,
    decision: &str,
) -> Result<proto::ResolveRequestResponse, tonic::Status> {
    app.runs
        .resolve_request(resolve_request(run_id, request_id, decision, ""))
        .await
        .map(tonic::Response::into_inner)
}

/// Waits for the run's `n`-th `request.opened` (1-based) and returns its request id.
async fn opened_request(app: &mut TestApp, run_id: &str, n: usize) -> String {
    let client = app.runs.clone();
    wait_for(&format!("request.opened #{n}"), LONG, || {
        let mut app_runs = client.clone();
        let run_id = run_id.to_owned();
        async move {
            let events = app_runs
                .list_events(proto::ListEventsRequest {
                    run_id,
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .events;
            let opened: Vec<&proto::Event> = events
                .iter()
                .filter(|e| e.r#type == "request.opened")
                .collect();
            let event = opened.get(n - 1)?;
            payload(event)["request_id"].as_str().map(str::to_owned)
        }
    })
    .await
}

/// The stored status of a request, straight from the database.
async fn request_status(app: &TestApp, request_id: &str) -> String {
    let id: uuid::Uuid = request_id.parse().expect("a request id");
    app.db()
        .await
        .query_one("SELECT status FROM requests WHERE id = $1", &[&id])
        .await
        .expect("the request is stored")
        .get(0)
}

async fn wait_for_request_status(app: &TestApp, request_id: &str, want: &str) {
    wait_for(
        &format!("request {request_id} to become {want}"),
        LONG,
        || async move { (request_status(app, request_id).await == want).then_some(()) },
    )
    .await;
}

/// `request.resolved` events of a run.
async fn resolved_events(app: &mut TestApp, run_id: &str) -> Vec<proto::Event> {
    events_of(app, run_id)
        .await
        .into_iter()
        .filter(|e| e.r#type == "request.resolved")
        .collect()
}

/// `resolve` commands of a run.
async fn resolve_commands(app: &mut TestApp, run_id: &str) -> Vec<proto::Command> {
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
        .filter(|c| c.kind == CommandKind::Resolve as i32)
        .collect()
}

fn runner_event(runner_seq: i64, event_type: &str, payload: Value) -> proto::RunnerEvent {
    proto::RunnerEvent {
        runner_seq,
        r#type: event_type.into(),
        payload_json: payload.to_string(),
    }
}

/// A run claimed by a unary "runner" the test plays, with its first turn started.
struct Played {
    runner: proto::RunnerIdentity,
    assignment: proto::Assignment,
    run_id: String,
    turn_id: String,
    next_seq: i64,
}

impl Played {
    async fn start(app: &mut TestApp, prompt: &str) -> Self {
        let run_id = create(app, prompt).await;
        let runner = runner("played");
        let assignment = claim(app, &runner, 1).await.remove(0);
        let turn_id = assignment.commands[0].command_id.clone();
        let mut played = Self {
            runner,
            assignment,
            run_id,
            turn_id: turn_id.clone(),
            next_seq: 1,
        };
        played
            .append(app, "turn.started", json!({"turn_id": turn_id}))
            .await
            .expect("turn.started is stored");
        played
    }

    async fn append(
        &mut self,
        app: &mut TestApp,
        event_type: &str,
        payload: Value,
    ) -> Result<proto::AppendEventsResponse, tonic::Status> {
        let event = runner_event(self.next_seq, event_type, payload);
        let request = append(&self.runner, &self.assignment, vec![event]);
        let response = app.runners.append_events(request).await?.into_inner();
        self.next_seq += 1;
        Ok(response)
    }

    /// Opens a request and returns its id.
    async fn open(&mut self, app: &mut TestApp, kind: &str, extra: Value) -> String {
        let request_id = uuid::Uuid::new_v4().to_string();
        let mut payload = json!({
            "request_id": request_id,
            "kind": kind,
            "detail": {"command": "make deploy"},
            "options": ["accept", "decline"],
        });
        if let (Some(payload), Some(extra)) = (payload.as_object_mut(), extra.as_object()) {
            payload.extend(extra.clone());
        }
        self.append(app, "request.opened", payload)
            .await
            .expect("request.opened is stored");
        request_id
    }

    /// Commands newly delivered to this runner by a heartbeat.
    async fn heartbeat(&self, app: &mut TestApp) -> Vec<proto::Command> {
        let response = app
            .runners
            .heartbeat(proto::HeartbeatRequest {
                runner_id: self.runner.runner_id.clone(),
                leases: vec![proto::LeaseRef {
                    run_id: self.run_id.clone(),
                    epoch: self.assignment.epoch,
                }],
            })
            .await
            .expect("heartbeat")
            .into_inner();
        response
            .leases
            .into_iter()
            .flat_map(|l| l.commands)
            .collect()
    }
}

#[tokio::test]
async fn an_answer_given_through_another_replica_reaches_the_runner() {
    let mut a = TestApp::spawn().await;
    let mut b = TestApp::spawn_on(&a.database_url, |_| {}).await;
    let _runner = RunnerProcess::start(a.addr, "r1", &[]);
    let run_id = create(&mut a, "[approval] deploy").await;
    let request_id = opened_request(&mut a, &run_id, 1).await;
    wait_for_run(&a, &run_id, RunStatus::Waiting, LONG).await;

    let resolved = resolve(&mut b, &run_id, &request_id, "accept")
        .await
        .expect("resolve through replica b");
    assert!(resolved.resolved_now);
    let resolution: Value = serde_json::from_str(&resolved.resolution_json).unwrap();
    assert_eq!(resolution["decision"], "accept");
    let request = resolved.request.expect("the request");
    assert_eq!(request.request_id, request_id);
    assert_eq!(request.run_id, run_id);
    assert_eq!(request.status, "resolved");
    assert_eq!(request.kind, "command");
    assert_eq!(request.options, ["accept", "decline"]);
    assert!(!request.turn_id.is_empty(), "the request names its turn");
    assert!(request.deadline.is_some() && request.resolved_at.is_some());

    wait_for_run(&a, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut a, &run_id).await;
    let text = assistant_text(&events);
    assert!(text.contains("Approval: accept"), "{text}");
    let resolved_events: Vec<&proto::Event> = events
        .iter()
        .filter(|e| e.r#type == "request.resolved")
        .collect();
    assert_eq!(resolved_events.len(), 1, "request.resolved exactly once");
    assert_eq!(resolved_events[0].producer, Producer::Manager as i32);
    assert_eq!(payload(resolved_events[0])["request_id"], request_id);
    assert_eq!(payload(resolved_events[0])["decision"], "accept");
    assert_eq!(resolve_commands(&mut a, &run_id).await.len(), 1);
    assert_eq!(request_status(&a, &request_id).await, "resolved");
    assert_event_log_consistent(&a.db().await).await;
}

#[tokio::test]
async fn an_answer_reaches_the_next_runner_after_a_crash() {
    let mut a = TestApp::spawn_with(|s| s.lease_ttl_ms = 1_000).await;
    let mut b = TestApp::spawn_on(&a.database_url, |s| s.lease_ttl_ms = 1_000).await;
    let r1 = RunnerProcess::start(a.addr, "r1", &[]);
    let run_id = create(&mut a, "[approval] deploy").await;
    let request_id = opened_request(&mut a, &run_id, 1).await;
    wait_for_run(&a, &run_id, RunStatus::Waiting, LONG).await;

    r1.signal(libc::SIGKILL);
    let requeued = wait_for_run(&a, &run_id, RunStatus::Pending, LONG).await;
    assert_eq!(requeued.attempt, 2);
    assert_eq!(
        request_status(&a, &request_id).await,
        "open",
        "a requeue leaves the request open"
    );

    let resolved = resolve(&mut b, &run_id, &request_id, "accept")
        .await
        .expect("the original request can still be answered");
    assert!(resolved.resolved_now);
    assert_eq!(
        status_of(&get_run(&mut a, &run_id).await),
        RunStatus::Pending,
        "nobody holds the run yet"
    );

    let _r2 = RunnerProcess::start(a.addr, "r2", &[]);
    let run = wait_for_run(&a, &run_id, RunStatus::Completed, LONG).await;
    assert_eq!(run.attempt, 2);
    let events = events_of(&mut a, &run_id).await;
    let text = assistant_text(&events);
    assert!(text.contains("Approval: accept"), "{text}");
    let resolved_events = resolved_events(&mut a, &run_id).await;
    assert_eq!(payload(&resolved_events[0])["request_id"], request_id);
    assert_eq!(payload(&resolved_events[0])["decision"], "accept");
    assert_eq!(request_status(&a, &request_id).await, "resolved");
    // The re-executed turn asked again; the answer it was handed settled it, and its
    // request closed with the turn — in the log too.
    let second = opened_request(&mut a, &run_id, 2).await;
    assert_ne!(second, request_id);
    assert_eq!(request_status(&a, &second).await, "cancelled");
    assert_eq!(resolved_events.len(), 2);
    assert_eq!(payload(&resolved_events[1])["request_id"], second);
    assert_eq!(payload(&resolved_events[1])["decision"], "cancel");
    assert_event_log_consistent(&a.db().await).await;
}

#[tokio::test]
async fn the_first_resolution_wins() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let mut played = Played::start(&mut app, "approve me").await;
    let request_id = played.open(&mut app, "command", json!({})).await;
    assert_eq!(
        status_of(&get_run(&mut app, &played.run_id).await),
        RunStatus::Waiting
    );
    let run_id = played.run_id.clone();

    let first = resolve(&mut app, &run_id, &request_id, "accept")
        .await
        .unwrap();
    assert!(first.resolved_now);
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Running,
        "nothing else is open"
    );
    for decision in ["decline", "accept", "cancel"] {
        let again = resolve(&mut app, &run_id, &request_id, decision)
            .await
            .unwrap();
        assert!(!again.resolved_now);
        assert_eq!(again.resolution_json, first.resolution_json);
        let request = again.request.unwrap();
        assert_eq!(request.status, "resolved");
        assert_eq!(
            request.resolved_at,
            first.request.as_ref().unwrap().resolved_at
        );
    }
    let resolution: Value = serde_json::from_str(&first.resolution_json).unwrap();
    assert_eq!(resolution["decision"], "accept");
    assert_eq!(resolved_events(&mut app, &run_id).await.len(), 1);
    let commands = resolve_commands(&mut app, &run_id).await;
    assert_eq!(commands.len(), 1);
    let command: Value = serde_json::from_str(&commands[0].payload_json).unwrap();
    assert_eq!(command["request_id"], request_id);
    assert_eq!(command["decision"], "accept");

    // The runner holding the run gets the answer.
    let delivered = played.heartbeat(&mut app).await;
    assert!(
        delivered
            .iter()
            .any(|c| c.command_id == commands[0].command_id),
        "{delivered:?}"
    );
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn requests_close_when_their_turn_or_run_ends() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r1", &[]);
    let run_id = create(&mut app, "[approval] first").await;
    let first = opened_request(&mut app, &run_id, 1).await;
    wait_for_run(&app, &run_id, RunStatus::Waiting, LONG).await;

    // An interrupted turn takes its open request with it; the run stays for more turns.
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.clone(),
            kind: CommandKind::Interrupt as i32,
            payload_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ended = wait_for_event(&mut app, &run_id, "turn.completed", LONG).await;
    assert_eq!(payload(&ended)["state"], "interrupted");
    assert_eq!(request_status(&app, &first).await, "cancelled");
    wait_for_run(&app, &run_id, RunStatus::Running, LONG).await;
    // A client following events sees the question go away with its turn.
    let closed = resolved_events(&mut app, &run_id).await;
    assert_eq!(closed.len(), 1);
    assert_eq!(payload(&closed[0])["request_id"], first);
    assert_eq!(payload(&closed[0])["decision"], "cancel");
    assert_eq!(payload(&closed[0])["reason"], "turn ended");
    // A late answer gets the closure back, and changes nothing.
    let late = resolve(&mut app, &run_id, &first, "accept").await.unwrap();
    assert!(!late.resolved_now);
    let resolution: Value = serde_json::from_str(&late.resolution_json).unwrap();
    assert_eq!(resolution["decision"], "cancel");
    assert_eq!(late.request.unwrap().status, "cancelled");

    // Cancelling the run closes the next turn's request.
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.clone(),
            kind: CommandKind::Turn as i32,
            payload_json: json!({"prompt": "[approval] second"}).to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let second = opened_request(&mut app, &run_id, 2).await;
    wait_for_run(&app, &run_id, RunStatus::Waiting, LONG).await;
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_run(&app, &run_id, RunStatus::Cancelled, LONG).await;
    assert_eq!(request_status(&app, &second).await, "cancelled");
    let late = resolve(&mut app, &run_id, &second, "accept").await.unwrap();
    assert!(!late.resolved_now);
    assert_eq!(late.request.unwrap().status, "cancelled");

    // Each closure is in the log once; nobody answered, so nothing was sent.
    let closed = resolved_events(&mut app, &run_id).await;
    assert_eq!(closed.len(), 2);
    assert_eq!(payload(&closed[1])["request_id"], second);
    assert_eq!(payload(&closed[1])["decision"], "cancel");
    assert!(resolve_commands(&mut app, &run_id).await.is_empty());
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn an_unanswered_request_expires_and_the_runner_is_told() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let mut played = Played::start(&mut app, "approve me soon").await;
    let request_id = played
        .open(&mut app, "command", json!({"timeout_ms": 300}))
        .await;
    let run_id = played.run_id.clone();
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Waiting
    );

    wait_for_request_status(&app, &request_id, "expired").await;
    let events = resolved_events(&mut app, &run_id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].producer, Producer::Manager as i32);
    assert_eq!(payload(&events[0])["request_id"], request_id);
    assert_eq!(payload(&events[0])["decision"], "expired");
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Running
    );

    // The runner learns the decision, so a provider waiting for it stops waiting.
    let deadline = Instant::now() + LONG;
    let command = loop {
        let delivered = played.heartbeat(&mut app).await;
        if let Some(command) = delivered
            .into_iter()
            .find(|c| c.kind == CommandKind::Resolve as i32)
        {
            break command;
        }
        assert!(
            Instant::now() < deadline,
            "no resolve command delivered within {LONG:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let command: Value = serde_json::from_str(&command.payload_json).unwrap();
    assert_eq!(command["request_id"], request_id);
    assert_eq!(command["decision"], "expired");

    // A late answer gets the expiry back: the first resolution wins.
    let late = resolve(&mut app, &run_id, &request_id, "accept")
        .await
        .unwrap();
    assert!(!late.resolved_now);
    let resolution: Value = serde_json::from_str(&late.resolution_json).unwrap();
    assert_eq!(resolution["decision"], "expired");
    assert_eq!(late.request.unwrap().status, "expired");
    assert_eq!(resolved_events(&mut app, &run_id).await.len(), 1);
    assert_eq!(resolve_commands(&mut app, &run_id).await.len(), 1);
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn other_tenants_and_bad_input_change_nothing() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let mut played = Played::start(&mut app, "a form").await;
    let request_id = played
        .open(
            &mut app,
            "user_input",
            json!({"detail": {"questions": ["name?"]}, "options": []}),
        )
        .await;
    let run_id = played.run_id.clone();
    let other_run = create(&mut app, "another run").await;

    // Another tenant cannot tell the run or the request exists.
    let err = app
        .runs
        .resolve_request(as_tenant(
            "intruder",
            resolve_request(&run_id, &request_id, "accept", ""),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // A request is only found under its own run.
    let unknown = uuid::Uuid::new_v4().to_string();
    for (run, request) in [(&other_run, &request_id), (&run_id, &unknown)] {
        let err = resolve(&mut app, run, request, "accept").await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }

    let bad = [
        (resolve_request("nope", &request_id, "accept", ""), "run_id"),
        (resolve_request(&run_id, "nope", "accept", ""), "request_id"),
        (resolve_request(&run_id, "", "accept", ""), "request_id"),
        (
            resolve_request(&run_id, &request_id, "maybe", ""),
            "decision",
        ),
        (resolve_request(&run_id, &request_id, "", ""), "decision"),
        (
            resolve_request(&run_id, &request_id, "expired", ""),
            "decision",
        ),
        (
            resolve_request(&run_id, &request_id, "accept", "[1, 2]"),
            "answers_json",
        ),
        (
            resolve_request(&run_id, &request_id, "accept", "\"yes\""),
            "answers_json",
        ),
        (
            resolve_request(&run_id, &request_id, "accept", "{oops"),
            "answers_json",
        ),
    ];
    for (request, field) in bad {
        let err = app.runs.resolve_request(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }

    assert_eq!(request_status(&app, &request_id).await, "open");
    assert!(resolved_events(&mut app, &run_id).await.is_empty());
    assert!(resolve_commands(&mut app, &run_id).await.is_empty());
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Waiting
    );

    // The right tenant's answer to the form carries its answers.
    let answers = json!({"name": "Ada"});
    let resolved = app
        .runs
        .resolve_request(resolve_request(
            &run_id,
            &request_id,
            "accept",
            &answers.to_string(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.resolved_now);
    let resolution: Value = serde_json::from_str(&resolved.resolution_json).unwrap();
    assert_eq!(resolution["answers"], answers);
    let events = resolved_events(&mut app, &run_id).await;
    assert_eq!(payload(&events[0])["answers"], answers);
    // The runner gets everything the client said.
    let commands = resolve_commands(&mut app, &run_id).await;
    assert_eq!(commands.len(), 1);
    let command: Value = serde_json::from_str(&commands[0].payload_json).unwrap();
    assert_eq!(
        command,
        json!({"request_id": request_id, "decision": "accept", "answers": answers,
               "value": null, "error": null})
    );
    let request = resolved.request.unwrap();
    assert_eq!(request.kind, "user_input");
    assert_eq!(request.turn_id, played.turn_id);
    assert_eq!(
        serde_json::from_str::<Value>(&request.detail_json).unwrap(),
        json!({"questions": ["name?"]})
    );
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn runner_request_events_are_checked() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let mut first = Played::start(&mut app, "first").await;
    let taken = first.open(&mut app, "tool", json!({})).await;
    let mut second = Played::start(&mut app, "second").await;
    let before = events_of(&mut app, &second.run_id).await.len();

    // Resolving is the manager's: a runner cannot write request.resolved.
    let err = second
        .append(
            &mut app,
            "request.resolved",
            json!({"request_id": taken, "decision": "accept"}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[0].type"),
        "{}",
        err.message()
    );

    // A request id must be a UUID, and not one another run already uses.
    let err = second
        .append(
            &mut app,
            "request.opened",
            json!({"request_id": "7", "kind": "tool"}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[0].payload_json.request_id"),
        "{}",
        err.message()
    );
    let err = second
        .append(
            &mut app,
            "request.opened",
            json!({"request_id": taken, "kind": "tool"}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("events[0].payload_json.request_id"),
        "{}",
        err.message()
    );

    assert_eq!(events_of(&mut app, &second.run_id).await.len(), before);
    assert_eq!(
        status_of(&get_run(&mut app, &second.run_id).await),
        RunStatus::Running
    );
    let db = app.db().await;
    let owner: uuid::Uuid = db
        .query_one(
            "SELECT run_id FROM requests WHERE id = $1",
            &[&taken.parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner.to_string(), first.run_id);

    // Resending the batch that opened a request stores it once.
    let resent = append(
        &first.runner,
        &first.assignment,
        vec![runner_event(
            first.next_seq - 1,
            "request.opened",
            json!({"request_id": taken, "kind": "tool"}),
        )],
    );
    let ack = app
        .runners
        .append_events(resent)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ack.duplicates, 1);
    let count: i64 = db
        .query_one(
            "SELECT count(*) FROM requests WHERE run_id = $1",
            &[&first.run_id.parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);

    // The turn ending closes its request and the run runs again.
    first
        .append(
            &mut app,
            "turn.completed",
            json!({"turn_id": first.turn_id, "state": "completed"}),
        )
        .await
        .unwrap();
    assert_eq!(request_status(&app, &taken).await, "cancelled");
    assert_eq!(
        status_of(&get_run(&mut app, &first.run_id).await),
        RunStatus::Running
    );
    assert_event_log_consistent(&db).await;
}

/// A resolution can carry what an external tool returned (`value_json`, any JSON) or how
/// it failed (`error`): stored in the resolution, in `request.resolved` and in the
/// `resolve` command the runner gets. Bad values are refused, naming the field, and
/// change nothing.
#[tokio::test]
async fn a_resolution_carries_a_value_or_an_error() {
    let mut app = TestApp::spawn_with(|s| {
        s.lease_ttl_ms = 60_000;
        s.max_payload_bytes = 64 * 1024;
    })
    .await;
    let mut played = Played::start(&mut app, "use tools").await;
    let run_id = played.run_id.clone();
    let with_value = played.open(&mut app, "tool", json!({})).await;
    let with_error = played.open(&mut app, "tool", json!({})).await;

    let answer = |request_id: &str, value_json: &str, error: &str| proto::ResolveRequestRequest {
        run_id: run_id.clone(),
        request_id: request_id.into(),
        decision: "accept".into(),
        value_json: value_json.into(),
        error: error.into(),
        ..Default::default()
    };
    let bad = [
        (answer(&with_value, "{oops", ""), "value_json"),
        (
            answer(&with_value, &json!({"rows": "x\u{0}"}).to_string(), ""),
            "value_json",
        ),
        (
            answer(&with_value, &json!("x".repeat(70 * 1024)).to_string(), ""),
            "value_json",
        ),
        (answer(&with_value, "", "a\0b"), "error"),
        (answer(&with_value, "", &"e".repeat(5000)), "error"),
        (answer(&with_value, "[1]", "both"), "error"),
    ];
    for (request, field) in bad {
        let err = app.runs.resolve_request(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    assert_eq!(request_status(&app, &with_value).await, "open");
    assert!(resolved_events(&mut app, &run_id).await.is_empty());

    let value = json!({"rows": [1, 2, 3], "ok": true});
    let resolved = app
        .runs
        .resolve_request(answer(&with_value, &value.to_string(), ""))
        .await
        .unwrap()
        .into_inner();
    assert!(resolved.resolved_now);
    let resolution: Value = serde_json::from_str(&resolved.resolution_json).unwrap();
    assert_eq!(resolution, json!({"decision": "accept", "value": value}));
    let failed = app
        .runs
        .resolve_request(answer(&with_error, "", "tool crashed"))
        .await
        .unwrap()
        .into_inner();
    let resolution: Value = serde_json::from_str(&failed.resolution_json).unwrap();
    assert_eq!(
        resolution,
        json!({"decision": "accept", "error": "tool crashed"})
    );

    // The first resolution wins, value and all.
    let again = app
        .runs
        .resolve_request(answer(&with_value, "\"other\"", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.resolved_now);
    assert_eq!(again.resolution_json, resolved.resolution_json);

    let events = resolved_events(&mut app, &run_id).await;
    assert_eq!(events.len(), 2);
    assert_eq!(payload(&events[0])["value"], value);
    assert_eq!(payload(&events[0])["error"], Value::Null);
    assert_eq!(payload(&events[1])["error"], "tool crashed");
    assert_eq!(payload(&events[1])["value"], Value::Null);

    // The runner holding the run gets both answers in full.
    let mut delivered = Vec::new();
    let deadline = Instant::now() + LONG;
    while delivered.len() < 2 {
        delivered.extend(
            played
                .heartbeat(&mut app)
                .await
                .into_iter()
                .filter(|c| c.kind == CommandKind::Resolve as i32),
        );
        assert!(Instant::now() < deadline, "resolve commands not delivered");
        if delivered.len() < 2 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let payloads: Vec<Value> = delivered
        .iter()
        .map(|c| serde_json::from_str(&c.payload_json).unwrap())
        .collect();
    assert_eq!(
        payloads,
        [
            json!({"request_id": with_value, "decision": "accept", "answers": null,
                   "value": value, "error": null}),
            json!({"request_id": with_error, "decision": "accept", "answers": null,
                   "value": null, "error": "tool crashed"}),
        ]
    );
    assert_event_log_consistent(&app.db().await).await;
}
