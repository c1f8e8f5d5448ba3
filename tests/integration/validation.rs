//! Bad input gets a clear error naming the field, and changes nothing.

use agentrun_shared::proto::{self, CommandKind, RunStatus};
use agentrun_tests::*;
use tonic::Code;

/// Row counts of every table that a bad request might touch.
async fn fingerprint(app: &TestApp) -> Vec<i64> {
    let db = app.db().await;
    let mut counts = Vec::new();
    for table in ["runs", "commands", "events", "sessions", "runners"] {
        counts.push(
            db.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await
                .unwrap()
                .get(0),
        );
    }
    let updated: i64 = db
        .query_one("SELECT coalesce(sum(last_event_seq + last_command_seq + lease_epoch), 0)::bigint FROM runs", &[])
        .await
        .unwrap()
        .get(0);
    counts.push(updated);
    counts
}

fn assert_invalid(result: Result<impl std::fmt::Debug, tonic::Status>, field: &str) {
    let err = result.expect_err("bad input must be refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains(field),
        "message {:?} does not name {field}",
        err.message()
    );
}

#[tokio::test]
async fn bad_client_input_is_refused_and_changes_nothing() {
    let mut app = TestApp::spawn_with(|s| s.max_payload_bytes = 1024).await;
    let run = app
        .runs
        .create_run(run_request("fine"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let before = fingerprint(&app).await;

    let with = |f: fn(&mut proto::CreateRunRequest)| {
        let mut r = run_request("x");
        f(&mut r);
        r
    };
    let cases: Vec<(proto::CreateRunRequest, &str)> = vec![
        (with(|r| r.backend_profile.clear()), "backend_profile"),
        (with(|r| r.input_json = "[1, 2]".into()), "input_json"),
        (with(|r| r.input_json = "{not json".into()), "input_json"),
        (
            with(|r| r.input_json = format!("{{\"prompt\": \"{}\"}}", "a".repeat(2000))),
            "input_json",
        ),
        (
            with(|r| r.input_json = r#"{"prompt": 42}"#.into()),
            "input_json.prompt",
        ),
        (
            with(|r| r.metadata_json = "\"text\"".into()),
            "metadata_json",
        ),
        (with(|r| r.session_id = "not-a-uuid".into()), "session_id"),
        (with(|r| r.queue = "has space".into()), "queue"),
        (
            with(|r| r.labels = vec!["ok".into(), String::new()]),
            "labels[1]",
        ),
        (with(|r| r.priority = 5000), "priority"),
        (with(|r| r.max_attempts = -1), "max_attempts"),
        (with(|r| r.run_timeout_ms = -5), "run_timeout_ms"),
    ];
    for (request, field) in cases {
        assert_invalid(app.runs.create_run(request).await, field);
    }

    assert_invalid(
        app.runs
            .get_run(proto::GetRunRequest {
                run_id: "123".into(),
            })
            .await,
        "run_id",
    );
    assert_invalid(
        app.runs
            .list_runs(proto::ListRunsRequest {
                statuses: vec![99],
                ..Default::default()
            })
            .await,
        "statuses[0]",
    );
    assert_invalid(
        app.runs
            .list_runs(proto::ListRunsRequest {
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await,
        "page_token",
    );
    assert_invalid(
        app.runs
            .list_events(proto::ListEventsRequest {
                run_id: run.run_id.clone(),
                after_seq: -1,
                limit: 0,
            })
            .await,
        "after_seq",
    );
    let command = |kind: i32, payload: &str| proto::SendCommandRequest {
        run_id: run.run_id.clone(),
        kind,
        payload_json: payload.into(),
        ..Default::default()
    };
    assert_invalid(app.runs.send_command(command(42, "{}")).await, "kind");
    assert_invalid(
        app.runs
            .send_command(command(CommandKind::Turn as i32, "{}"))
            .await,
        "payload_json.prompt",
    );
    assert_invalid(
        app.runs
            .send_command(command(CommandKind::Steer as i32, r#"{"text": 1}"#))
            .await,
        "payload_json.text",
    );
    assert_invalid(
        app.runs
            .send_command(command(
                CommandKind::Resolve as i32,
                r#"{"request_id": "x", "decision": "accept"}"#,
            ))
            .await,
        "kind",
    );
    let mut steer_with_policy = command(CommandKind::Steer as i32, r#"{"text": "hi"}"#);
    steer_with_policy.delivery_policy = 3;
    assert_invalid(
        app.runs.send_command(steer_with_policy).await,
        "delivery_policy",
    );
    assert_invalid(
        app.runs
            .create_run(as_tenant("bad tenant", run_request("x")))
            .await,
        "agentrun-tenant",
    );

    assert_eq!(fingerprint(&app).await, before);
}

#[tokio::test]
async fn bad_runner_input_is_refused_and_changes_nothing() {
    let mut app = TestApp::spawn_with(|s| {
        s.max_payload_bytes = 1024;
        s.max_batch_events = 10;
    })
    .await;
    app.runs.create_run(run_request("fine")).await.unwrap();
    let me = runner("r");
    let a = claim(&mut app, &me, 1).await.remove(0);
    let before = fingerprint(&app).await;

    let mut no_runner = me.clone();
    no_runner.runner_id = "nope".into();
    assert_invalid(
        app.runners
            .claim_runs(proto::ClaimRunsRequest {
                runner: Some(no_runner),
                max_runs: 1,
            })
            .await,
        "runner.runner_id",
    );
    let mut no_profiles = me.clone();
    no_profiles.backend_profiles.clear();
    assert_invalid(
        app.runners
            .claim_runs(proto::ClaimRunsRequest {
                runner: Some(no_profiles),
                max_runs: 1,
            })
            .await,
        "runner.backend_profiles",
    );
    assert_invalid(
        app.runners
            .claim_runs(proto::ClaimRunsRequest {
                runner: None,
                max_runs: 1,
            })
            .await,
        "runner",
    );
    assert_invalid(
        app.runners
            .claim_runs(proto::ClaimRunsRequest {
                runner: Some(me.clone()),
                max_runs: 5000,
            })
            .await,
        "max_runs",
    );

    let event = |t: &str, payload: &str| proto::RunnerEvent {
        runner_seq: 1,
        r#type: t.into(),
        payload_json: payload.into(),
    };
    let cases: Vec<(Vec<proto::RunnerEvent>, &str)> = vec![
        (vec![event("run.exploded", "{}")], "events[0].type"),
        (vec![event("run.terminal", "{}")], "events[0].type"),
        (vec![event("content.delta", "[]")], "events[0].payload_json"),
        (
            vec![event("content.delta", r#"{"kind": "assistant_text"}"#)],
            "events[0].payload_json.delta",
        ),
        (
            vec![event("turn.completed", r#"{"state": "great"}"#)],
            "events[0].payload_json.state",
        ),
        (
            vec![event(
                "runtime.error",
                &format!("{{\"message\": \"{}\"}}", "e".repeat(2000)),
            )],
            "events[0].payload_json",
        ),
        (deltas(1, 11), "events"),
        (
            vec![deltas(1, 1).remove(0), deltas(3, 3).remove(0)],
            "events[1].runner_seq",
        ),
        (deltas(0, 0), "events[0].runner_seq"),
        // A valid event after an invalid one: the whole batch is refused.
        (
            [deltas(1, 1), vec![event("content.delta", "{}")]].concat(),
            "events[1]",
        ),
    ];
    for (events, field) in cases {
        assert_invalid(
            app.runners.append_events(append(&me, &a, events)).await,
            field,
        );
    }
    let mut bad_epoch = append(&me, &a, deltas(1, 1));
    bad_epoch.epoch = 0;
    assert_invalid(app.runners.append_events(bad_epoch).await, "epoch");
    let mut bad_update = append(&me, &a, vec![]);
    bad_update.command_updates = vec![proto::CommandUpdate {
        command_id: "x".into(),
        status: 4,
        error: String::new(),
    }];
    assert_invalid(
        app.runners.append_events(bad_update).await,
        "command_updates[0].command_id",
    );
    assert_invalid(
        app.runners
            .finish_run(finish(&me, &a, RunStatus::Running))
            .await,
        "status",
    );
    assert_invalid(
        app.runners
            .finish_run(finish(&me, &a, RunStatus::Expired))
            .await,
        "status",
    );

    assert_eq!(fingerprint(&app).await, before);
}
