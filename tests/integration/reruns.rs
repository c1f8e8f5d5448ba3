//! Work done again without copying it by hand: RerunRun (the same input and settings, a
//! new run linked to the original), ForkRun (a new run from a given turn, with everything
//! before it as context) and CancelRuns (bulk, by filter, idempotent). Real manager, real
//! runner processes, real PostgreSQL; the openai provider against a local fake endpoint
//! that records what it is sent, so the context each run starts with is checked as the
//! provider received it.

use std::time::Duration;

use agentrun_shared::proto::{self, CommandKind, RunStatus};
use agentrun_tests::fake_openai::FakeOpenAi;
use agentrun_tests::*;
use serde_json::{Value, json};
use tonic::Code;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(30);

/// A runner serving the `openai` profile against `server`.
fn openai_runner(app: &TestApp, server: &FakeOpenAi) -> RunnerProcess {
    let base_url = format!("http://{}/v1", server.addr);
    RunnerProcess::start(
        app.addr,
        "openai",
        &[
            ("OPENAI_BASE_URL", base_url.as_str()),
            ("OPENAI_API_KEY", "sk-test"),
            ("AGENTRUN_BACKEND_PROFILES", "openai"),
        ],
    )
}

fn openai_request(prompt: &str) -> proto::CreateRunRequest {
    let mut request = run_request(prompt);
    request.backend_profile = "openai".into();
    request
}

async fn create_run(app: &mut TestApp, request: proto::CreateRunRequest) -> proto::Run {
    app.runs
        .create_run(request)
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
}

async fn send_turn(app: &mut TestApp, run_id: &str, prompt: &str) -> String {
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.into(),
            kind: CommandKind::Turn as i32,
            payload_json: json!({ "prompt": prompt }).to_string(),
            ..Default::default()
        })
        .await
        .expect("send turn")
        .into_inner()
        .command
        .expect("command")
        .command_id
}

/// The messages of the provider request that carried `prompt` last.
fn messages_ending_with(server: &FakeOpenAi, prompt: &str) -> Value {
    let bodies = server.bodies();
    bodies
        .iter()
        .rev()
        .find(|body| {
            body["messages"]
                .as_array()
                .and_then(|m| m.last())
                .is_some_and(|m| m["content"] == prompt)
        })
        .unwrap_or_else(|| panic!("no request ended with {prompt:?}: {bodies:#?}"))["messages"]
        .clone()
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn assistant(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

#[tokio::test]
async fn a_rerun_repeats_the_input_and_settings_with_the_context_its_original_started_with() {
    let server = FakeOpenAi::start().await;
    let mut app = TestApp::spawn().await;
    let _runner = openai_runner(&app, &server);
    let session_id = Uuid::now_v7().to_string();

    let mut first = openai_request("my name is Ada");
    first.session_id = session_id.clone();
    let first = create_run(&mut app, first).await;
    wait_for_run(&app, &first.run_id, RunStatus::Completed, LONG).await;
    let mut second = openai_request("what is my name?");
    second.session_id = session_id.clone();
    second.priority = 7;
    second.labels = vec![];
    second.metadata_json = json!({"ticket": 42}).to_string();
    second.max_attempts = 5;
    let second = create_run(&mut app, second).await;
    wait_for_run(&app, &second.run_id, RunStatus::Completed, LONG).await;

    let rerun = app
        .runs
        .rerun_run(proto::RerunRunRequest {
            run_id: second.run_id.clone(),
            idempotency_key: "rerun-1".into(),
        })
        .await
        .expect("rerun")
        .into_inner();
    assert!(rerun.created);
    let rerun = rerun.run.expect("run");
    assert_ne!(rerun.run_id, second.run_id);
    assert_eq!(rerun.rerun_of_run_id, second.run_id);
    assert_eq!(rerun.session_id, session_id);
    assert_eq!(rerun.input_json, second.input_json);
    assert_eq!(rerun.metadata_json, second.metadata_json);
    assert_eq!(
        (rerun.priority, rerun.max_attempts, &rerun.queue),
        (7, 5, &second.queue)
    );
    assert_eq!(status_of(&rerun), RunStatus::Pending);
    wait_for_run(&app, &rerun.run_id, RunStatus::Completed, LONG).await;

    // Its provider saw the session as the original did: the first run's exchange, not
    // the original's own reply.
    let bodies = server.bodies();
    assert_eq!(bodies.len(), 3, "{bodies:#?}");
    assert_eq!(
        bodies[2]["messages"],
        json!([
            user("my name is Ada"),
            assistant("reply 1"),
            user("what is my name?")
        ]),
    );

    // A retry with the key returns the same re-run.
    let again = app
        .runs
        .rerun_run(proto::RerunRunRequest {
            run_id: second.run_id.clone(),
            idempotency_key: "rerun-1".into(),
        })
        .await
        .expect("rerun retry")
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.run.expect("run").run_id, rerun.run_id);
    // The same key for a re-run of another run is a different request.
    let conflict = app
        .runs
        .rerun_run(proto::RerunRunRequest {
            run_id: first.run_id.clone(),
            idempotency_key: "rerun-1".into(),
        })
        .await
        .expect_err("a key reused for another run");
    assert_eq!(conflict.code(), Code::AlreadyExists);
    // Every stored request hash (re-runs' included) matches its row.
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn a_fork_starts_from_a_turn_with_everything_before_it_and_nothing_after() {
    let server = FakeOpenAi::start().await;
    let mut app = TestApp::spawn().await;
    // Three turns queued before any runner is there, so they run one after the other.
    let run = create_run(&mut app, openai_request("one")).await;
    send_turn(&mut app, &run.run_id, "two").await;
    send_turn(&mut app, &run.run_id, "three").await;
    let _runner = openai_runner(&app, &server);
    wait_for_run(&app, &run.run_id, RunStatus::Completed, LONG).await;
    assert_eq!(
        messages_ending_with(&server, "three"),
        json!([
            user("one"),
            assistant("reply 1"),
            user("two"),
            assistant("reply 2"),
            user("three")
        ]),
    );
    let turns: Vec<proto::Command> = app
        .runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run.run_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list commands")
        .into_inner()
        .commands
        .into_iter()
        .filter(|c| c.kind == CommandKind::Turn as i32)
        .collect();
    assert_eq!(turns.len(), 3, "{turns:#?}");

    // From the second turn with a new prompt: the first exchange, then the new prompt.
    let fork = app
        .runs
        .fork_run(proto::ForkRunRequest {
            run_id: run.run_id.clone(),
            turn_id: turns[1].command_id.clone(),
            input_json: json!({"prompt": "two, differently"}).to_string(),
            idempotency_key: String::new(),
        })
        .await
        .expect("fork")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(fork.forked_from_run_id, run.run_id);
    assert_eq!(fork.forked_from_turn_id, turns[1].command_id);
    assert_eq!(fork.backend_profile, "openai");
    wait_for_run(&app, &fork.run_id, RunStatus::Completed, LONG).await;
    assert_eq!(
        messages_ending_with(&server, "two, differently"),
        json!([user("one"), assistant("reply 1"), user("two, differently")]),
    );

    // Without input it asks the forked turn's prompt again; from the first turn there
    // is nothing before it.
    let again = app
        .runs
        .fork_run(proto::ForkRunRequest {
            run_id: run.run_id.clone(),
            turn_id: turns[0].command_id.clone(),
            ..Default::default()
        })
        .await
        .expect("fork at the first turn")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(
        serde_json::from_str::<Value>(&again.input_json).unwrap()["prompt"],
        "one"
    );
    wait_for_run(&app, &again.run_id, RunStatus::Completed, LONG).await;
    let bodies = server.bodies();
    assert_eq!(bodies.last().unwrap()["messages"], json!([user("one")]));

    // A fork of a fork keeps what its source started with.
    let fork_turns = app
        .runs
        .list_commands(proto::ListCommandsRequest {
            run_id: fork.run_id.clone(),
            ..Default::default()
        })
        .await
        .expect("list fork commands")
        .into_inner()
        .commands;
    let deeper = app
        .runs
        .rerun_run(proto::RerunRunRequest {
            run_id: fork.run_id.clone(),
            ..Default::default()
        })
        .await
        .expect("rerun of a fork")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(fork_turns.len(), 1);
    wait_for_run(&app, &deeper.run_id, RunStatus::Completed, LONG).await;
    assert_eq!(
        server.bodies().last().unwrap()["messages"],
        json!([user("one"), assistant("reply 1"), user("two, differently")]),
    );
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn fork_refuses_what_it_cannot_start_from() {
    let mut app = TestApp::spawn().await;
    // No runner: the run's first turn never starts.
    let run = create(&mut app, "not yet").await;
    let turn = app
        .runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands
        .remove(0);
    let fork = |run_id: &str, turn_id: &str, input_json: &str| proto::ForkRunRequest {
        run_id: run_id.into(),
        turn_id: turn_id.into(),
        input_json: input_json.into(),
        idempotency_key: String::new(),
    };
    let runs_before = count_runs(&app).await;

    let not_started = app
        .runs
        .fork_run(fork(&run, &turn.command_id, ""))
        .await
        .expect_err("a turn that has not started");
    assert_eq!(not_started.code(), Code::FailedPrecondition);
    assert!(not_started.message().contains("turn_id"), "{not_started:?}");

    let unknown = app
        .runs
        .fork_run(fork(&run, &Uuid::now_v7().to_string(), ""))
        .await
        .expect_err("an unknown turn");
    assert_eq!(unknown.code(), Code::NotFound);

    for (request, field) in [
        (fork("nope", &turn.command_id, ""), "run_id"),
        (fork(&run, "nope", ""), "turn_id"),
        (fork(&run, &turn.command_id, "[1]"), "input_json"),
        (
            fork(&run, &turn.command_id, r#"{"prompt": 5}"#),
            "input_json.prompt",
        ),
    ] {
        let refused = app
            .runs
            .fork_run(request)
            .await
            .expect_err("bad input accepted");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{field}: {refused:?}"
        );
        assert!(refused.message().contains(field), "{field}: {refused:?}");
    }
    let unknown_run = app
        .runs
        .rerun_run(proto::RerunRunRequest {
            run_id: Uuid::now_v7().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown run");
    assert_eq!(unknown_run.code(), Code::NotFound);
    // Another tenant's run answers exactly like an unknown one, and its bulk cancel
    // reaches none of ours.
    let foreign = app
        .runs
        .rerun_run(as_tenant(
            "other",
            proto::RerunRunRequest {
                run_id: run.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect_err("another tenant's run");
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(foreign.message(), unknown_run.message());
    let foreign_fork = app
        .runs
        .fork_run(as_tenant("other", fork(&run, &turn.command_id, "")))
        .await
        .expect_err("another tenant's run");
    assert_eq!(foreign_fork.code(), Code::NotFound);
    let none = app
        .runs
        .cancel_runs(as_tenant(
            "other",
            proto::CancelRunsRequest {
                all: true,
                ..Default::default()
            },
        ))
        .await
        .expect("cancel another tenant's runs")
        .into_inner();
    assert_eq!(none.cancelled, 0);
    assert_eq!(
        status_of(&get_run(&mut app, &run).await),
        RunStatus::Pending
    );
    assert_eq!(
        count_runs(&app).await,
        runs_before,
        "a refusal created a run"
    );
}

async fn count_runs(app: &TestApp) -> i64 {
    app.db()
        .await
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .unwrap()
        .get(0)
}

fn on_queue(queue: &str, i: usize) -> proto::CreateRunRequest {
    let mut request = run_request(&format!("{queue} {i}"));
    request.queue = queue.into();
    request
}

async fn statuses_on(app: &TestApp, queue: &str) -> Vec<(String, bool)> {
    app.db()
        .await
        .query(
            "SELECT status, cancel_requested FROM runs WHERE queue = $1 ORDER BY id",
            &[&queue],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

#[tokio::test]
async fn cancel_runs_cancels_what_matches_once_and_nothing_else() {
    let mut app = TestApp::spawn().await;
    app.runs
        .create_runs(proto::CreateRunsRequest {
            runs: (0..5).map(|i| on_queue("bulk", i)).collect(),
        })
        .await
        .unwrap();
    app.runs
        .create_runs(proto::CreateRunsRequest {
            runs: (0..2).map(|i| on_queue("other", i)).collect(),
        })
        .await
        .unwrap();
    // One of the queue's runs is held by a runner: it is asked to cancel, not ended.
    let held_runner = proto::RunnerIdentity {
        queues: vec!["bulk".into()],
        ..runner("holder")
    };
    let held = claim(&mut app, &held_runner, 1).await;
    let held_id = held[0].run.as_ref().unwrap().run_id.clone();

    let cancel = |queue: &str| proto::CancelRunsRequest {
        queue: queue.into(),
        reason: "clearing the queue".into(),
        ..Default::default()
    };
    let done = app
        .runs
        .cancel_runs(cancel("bulk"))
        .await
        .expect("cancel runs")
        .into_inner();
    assert_eq!((done.cancelled, done.more), (5, false));
    assert!(done.run_ids.contains(&held_id));
    let statuses = statuses_on(&app, "bulk").await;
    assert_eq!(
        statuses.iter().filter(|(s, _)| s == "cancelled").count(),
        4,
        "{statuses:?}"
    );
    let held_run = get_run(&mut app, &held_id).await;
    assert!(held_run.cancel_requested, "{held_run:?}");
    assert_eq!(held_run.failure_message, "");
    // The other queue is untouched.
    assert!(
        statuses_on(&app, "other")
            .await
            .iter()
            .all(|(s, cancelling)| s == "pending" && !cancelling)
    );

    // Again: nothing new to cancel.
    let again = app
        .runs
        .cancel_runs(cancel("bulk"))
        .await
        .expect("cancel runs again")
        .into_inner();
    assert_eq!((again.cancelled, again.more), (0, false), "{again:?}");
    assert_eq!(
        event_types(&mut app, &held_id)
            .await
            .iter()
            .filter(|t| *t == "command.created")
            .count(),
        2,
        "the held run got one cancel command (after its first turn's)"
    );
}

#[tokio::test]
async fn cancel_runs_works_through_a_backlog_a_thousand_at_a_time() {
    let mut app = TestApp::spawn().await;
    for batch in 0..2 {
        let n = if batch == 0 { 1000 } else { 1 };
        app.runs
            .create_runs(proto::CreateRunsRequest {
                runs: (0..n).map(|i| on_queue("backlog", i)).collect(),
            })
            .await
            .unwrap();
    }
    let all = proto::CancelRunsRequest {
        all: true,
        ..Default::default()
    };
    let first = app
        .runs
        .cancel_runs(all.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.cancelled, first.more), (1000, true));
    let second = app.runs.cancel_runs(all).await.unwrap().into_inner();
    assert_eq!((second.cancelled, second.more), (1, false));
    assert!(
        statuses_on(&app, "backlog")
            .await
            .iter()
            .all(|(s, _)| s == "cancelled")
    );
}

#[tokio::test]
async fn cancel_runs_refuses_bad_filters_and_changes_nothing() {
    let mut app = TestApp::spawn().await;
    let run = create(&mut app, "stays").await;
    let cases = [
        (proto::CancelRunsRequest::default(), "all"),
        (
            proto::CancelRunsRequest {
                statuses: vec![RunStatus::Completed as i32],
                ..Default::default()
            },
            "statuses[0]",
        ),
        (
            proto::CancelRunsRequest {
                statuses: vec![99],
                ..Default::default()
            },
            "statuses[0]",
        ),
        (
            proto::CancelRunsRequest {
                session_id: "nope".into(),
                ..Default::default()
            },
            "session_id",
        ),
        (
            proto::CancelRunsRequest {
                all: true,
                reason: "x".repeat(5000),
                ..Default::default()
            },
            "reason",
        ),
        (
            proto::CancelRunsRequest {
                all: true,
                created_after: Some(prost_types::Timestamp {
                    seconds: 2_000_000_000,
                    nanos: 0,
                }),
                created_before: Some(prost_types::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "created_before",
        ),
    ];
    for (request, field) in cases {
        let refused = app
            .runs
            .cancel_runs(request)
            .await
            .expect_err("bad filter accepted");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{field}: {refused:?}"
        );
        assert!(refused.message().contains(field), "{field}: {refused:?}");
    }
    assert_eq!(
        status_of(&get_run(&mut app, &run).await),
        RunStatus::Pending,
        "a refused call cancelled a run"
    );
}

#[tokio::test]
async fn rerun_fork_and_bulk_cancel_from_the_command_line() {
    use agentrun_tests::cli::{Finished, agentrun};
    fn json_of(done: &Finished) -> Value {
        assert_eq!(done.code(), Some(0), "stderr:\n{}", done.stderr);
        serde_json::from_str(&done.stdout).expect("one JSON document")
    }

    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "scripted", &[]);
    let run_id = create(&mut app, "hello there").await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let turn_id = wait_for_event(&mut app, &run_id, "turn.started", LONG)
        .await
        .payload_json;
    let turn_id = serde_json::from_str::<Value>(&turn_id).unwrap()["turn_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let rerun = json_of(&agentrun(&app, &["rerun", &run_id, "-o", "json"]).await);
    assert_eq!(rerun["rerun_of_run_id"], run_id.as_str());
    assert_eq!(rerun["input"]["prompt"], "hello there");
    let followed = agentrun(&app, &["rerun", &run_id, "--follow"]).await;
    assert_eq!(followed.code(), Some(0), "stderr:\n{}", followed.stderr);
    assert!(!followed.stdout.trim().is_empty(), "no reply streamed");

    let fork = json_of(
        &agentrun(
            &app,
            &["fork", &run_id, &turn_id, "--prompt", "again", "-o", "json"],
        )
        .await,
    );
    assert_eq!(fork["forked_from_run_id"], run_id.as_str());
    assert_eq!(fork["forked_from_turn_id"], turn_id.as_str());
    assert_eq!(fork["input"]["prompt"], "again");

    // Bulk cancel by queue: nobody serves it, so its runs are pending.
    app.runs
        .create_runs(proto::CreateRunsRequest {
            runs: (0..3).map(|i| on_queue("parked", i)).collect(),
        })
        .await
        .unwrap();
    let cancelled = json_of(&agentrun(&app, &["cancel", "--queue", "parked", "-o", "json"]).await);
    assert_eq!(cancelled["cancelled"], 3, "{cancelled}");
    assert_eq!(cancelled["run_ids"].as_array().map(Vec::len), Some(3));
    let text = agentrun(&app, &["cancel", "--queue", "parked"]).await;
    assert_eq!(text.stdout, "cancelled 0 runs\n");
    // Neither a run nor a filter: a usage error, nothing sent.
    let bare = agentrun(&app, &["cancel"]).await;
    assert_eq!(bare.code(), Some(2), "stdout:\n{}", bare.stdout);
    let both = agentrun(&app, &["cancel", &run_id, "--queue", "parked"]).await;
    assert_eq!(both.code(), Some(2), "stdout:\n{}", both.stdout);
}
