//! Creating, reading, listing and cancelling runs; idempotency; tenant isolation.

use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use serde_json::Value;
use tonic::Code;

#[tokio::test]
async fn create_get_and_list_runs() {
    let mut app = TestApp::spawn().await;
    let created = app
        .runs
        .create_run(run_request("hello"))
        .await
        .unwrap()
        .into_inner();
    assert!(created.created);
    let run = created.run.unwrap();
    assert_eq!(status_of(&run), RunStatus::Pending);
    assert_eq!(
        (
            run.queue.as_str(),
            run.project_id.as_str(),
            run.attempt,
            run.max_attempts
        ),
        ("default", "default", 1, 3)
    );

    let got = app
        .runs
        .get_run(proto::GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.run.unwrap().run_id, run.run_id);

    // run.created, then command.created for the first turn.
    let events = app
        .runs
        .list_events(proto::ListEventsRequest {
            run_id: run.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let types: Vec<&str> = events.events.iter().map(|e| e.r#type.as_str()).collect();
    assert_eq!(types, ["run.created", "command.created"]);
    assert_eq!(
        events.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    assert!(!events.end_of_run);
    let commands = app
        .runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run.run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0].kind, proto::CommandKind::Turn as i32);
    let payload: Value = serde_json::from_str(&commands[0].payload_json).unwrap();
    assert_eq!(payload["prompt"], "hello");

    for i in 0..4 {
        app.runs
            .create_run(run_request(&format!("more {i}")))
            .await
            .unwrap();
    }
    let page1 = app
        .runs
        .list_runs(proto::ListRunsRequest {
            page_size: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.runs.len(), 3);
    assert!(!page1.next_page_token.is_empty());
    let page2 = app
        .runs
        .list_runs(proto::ListRunsRequest {
            page_size: 3,
            page_token: page1.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.runs.len(), 2);
    let mut all: Vec<String> = page1
        .runs
        .iter()
        .chain(&page2.runs)
        .map(|r| r.run_id.clone())
        .collect();
    assert_eq!(
        all.last().unwrap(),
        &run.run_id,
        "newest first, the first run last"
    );
    all.dedup();
    assert_eq!(all.len(), 5);

    let pending = app
        .runs
        .list_runs(proto::ListRunsRequest {
            statuses: vec![RunStatus::Completed as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pending.runs.is_empty());
}

#[tokio::test]
async fn create_run_is_idempotent_per_key() {
    let mut app = TestApp::spawn().await;
    let mut request = run_request("once");
    request.idempotency_key = "key-1".into();
    let first = app
        .runs
        .create_run(request.clone())
        .await
        .unwrap()
        .into_inner();
    let again = app
        .runs
        .create_run(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(first.created && !again.created);
    assert_eq!(first.run.unwrap().run_id, again.run.unwrap().run_id);

    request.input_json = r#"{"prompt": "something else"}"#.into();
    let err = app.runs.create_run(request).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("idempotency_key"),
        "{}",
        err.message()
    );

    let count: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

#[tokio::test]
async fn bulk_create_is_all_or_nothing() {
    let mut app = TestApp::spawn().await;
    let runs: Vec<_> = (0..50).map(|i| run_request(&format!("bulk {i}"))).collect();
    let created = app
        .runs
        .create_runs(proto::CreateRunsRequest { runs: runs.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.runs.len(), 50);

    let mut bad = runs;
    bad[7].backend_profile.clear();
    let err = app
        .runs
        .create_runs(proto::CreateRunsRequest { runs: bad })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("runs[7].backend_profile"),
        "{}",
        err.message()
    );
    let count: i64 = app
        .db()
        .await
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 50);
}

#[tokio::test]
async fn tenants_cannot_see_or_touch_each_others_runs() {
    let mut app = TestApp::spawn().await;
    let run = app
        .runs
        .create_run(as_tenant("tenant-a", run_request("secret")))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let id = run.run_id.clone();

    let err = app
        .runs
        .get_run(as_tenant(
            "tenant-b",
            proto::GetRunRequest { run_id: id.clone() },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = app
        .runs
        .cancel_run(as_tenant(
            "tenant-b",
            proto::CancelRunRequest {
                run_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = app
        .runs
        .list_events(as_tenant(
            "tenant-b",
            proto::ListEventsRequest {
                run_id: id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let listed = app
        .runs
        .list_runs(as_tenant("tenant-b", proto::ListRunsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.runs.is_empty());

    let still = app
        .runs
        .get_run(as_tenant("tenant-a", proto::GetRunRequest { run_id: id }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status_of(&still.run.unwrap()), RunStatus::Pending);
}

#[tokio::test]
async fn sessions_are_reused_within_their_boundary() {
    let mut app = TestApp::spawn().await;
    let session_id = uuid::Uuid::new_v4().to_string();
    let mut request = run_request("first");
    request.session_id = session_id.clone();
    app.runs.create_run(request.clone()).await.unwrap();
    app.runs.create_run(request.clone()).await.unwrap();

    let listed = app
        .runs
        .list_runs(proto::ListRunsRequest {
            session_id: session_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.runs.len(), 2);

    let mut other_profile = request.clone();
    other_profile.backend_profile = "openai:gpt-4o-mini".into();
    let err = app.runs.create_run(other_profile).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("session_id"), "{}", err.message());

    // Session ids are per tenant: another tenant naming this id starts a session of its
    // own, exactly as with a fresh id, and learns nothing of this one.
    app.runs
        .create_run(as_tenant("intruder", request))
        .await
        .expect("another tenant may use the same session id for its own session");
    let theirs = app
        .runs
        .list_runs(as_tenant(
            "intruder",
            proto::ListRunsRequest {
                session_id: session_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.runs.len(), 1);
    let ours = app
        .runs
        .list_runs(proto::ListRunsRequest {
            session_id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ours.runs.len(), 2);
}
