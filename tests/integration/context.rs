//! Conversations that remember: a session's next run starts with its earlier turns, a
//! requeued run with its own completed turns, and a provider's thread id is kept on the
//! session and handed to the next run; session titles. Real manager, real runner
//! processes, real PostgreSQL; the openai provider against a local fake endpoint that
//! records what it is sent.

use std::time::Duration;

use agentrun_shared::proto::session_service_client::SessionServiceClient;
use agentrun_shared::proto::{self, CommandKind, RunStatus};
use agentrun_tests::fake_openai::FakeOpenAi;
use agentrun_tests::*;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(30);

type Sessions = SessionServiceClient<Channel>;

async fn sessions_client(app: &TestApp) -> Sessions {
    SessionServiceClient::new(connect(app.addr).await)
}

/// Creates a run of `profile` with a prompt in `session_id` and returns its id.
async fn create_in(app: &mut TestApp, profile: &str, session_id: &str, prompt: &str) -> String {
    let mut request = run_request(prompt);
    request.backend_profile = profile.into();
    request.session_id = session_id.into();
    app.runs
        .create_run(request)
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

async fn session(sessions: &mut Sessions, session_id: &str) -> proto::Session {
    sessions
        .get_session(proto::GetSessionRequest {
            session_id: session_id.into(),
            reader: String::new(),
        })
        .await
        .expect("get session")
        .into_inner()
        .session
        .expect("view")
        .session
        .expect("session")
}

/// The `[recall: ...]` the scripted provider streamed in the events after `from`.
fn recall_after(events: &[proto::Event], from: usize) -> Option<String> {
    let text = assistant_text(&events[from..]);
    let start = text.find("[recall:")?;
    let thread = start + text[start..].find("; thread: ")?;
    let end = thread + text[thread..].find(']')?;
    Some(text[start..=end].to_owned())
}

#[tokio::test]
async fn a_sessions_next_run_sends_the_earlier_exchange_to_openai() {
    let server = FakeOpenAi::start().await;
    let mut app = TestApp::spawn().await;
    let base_url = format!("http://{}/v1", server.addr);
    let _runner = RunnerProcess::start(
        app.addr,
        "openai",
        &[
            ("OPENAI_BASE_URL", base_url.as_str()),
            ("OPENAI_API_KEY", "sk-test"),
            ("AGENTRUN_BACKEND_PROFILES", "openai"),
        ],
    );
    let session_id = Uuid::now_v7().to_string();
    let first = create_in(&mut app, "openai", &session_id, "my name is Ada").await;
    wait_for_run(&app, &first, RunStatus::Completed, LONG).await;
    let second = create_in(&mut app, "openai", &session_id, "what did I just say?").await;
    wait_for_run(&app, &second, RunStatus::Completed, LONG).await;

    let bodies = server.bodies();
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    assert_eq!(
        bodies[0]["messages"],
        json!([{"role": "user", "content": "my name is Ada"}]),
        "the first run starts the conversation"
    );
    assert_eq!(
        bodies[1]["messages"],
        json!([
            {"role": "user", "content": "my name is Ada"},
            {"role": "assistant", "content": "reply 1"},
            {"role": "user", "content": "what did I just say?"},
        ]),
        "the second run sends the first run's exchange before its own prompt"
    );

    // A run outside the session starts afresh.
    let mut alone = run_request("who am I?");
    alone.backend_profile = "openai".into();
    let alone = app
        .runs
        .create_run(alone)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    wait_for_run(&app, &alone, RunStatus::Completed, LONG).await;
    assert_eq!(
        server.bodies()[2]["messages"],
        json!([{"role": "user", "content": "who am I?"}])
    );
}

#[tokio::test]
async fn a_requeued_run_replays_its_completed_turns_to_the_next_runner() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 1_500).await;
    let first = RunnerProcess::start(app.addr, "first", &[]);
    let run_id = app
        .runs
        .create_run(run_request("remember the number 7"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.clone(),
            kind: CommandKind::Turn as i32,
            payload_json: json!({"prompt": "[stall] [recall] which number?"}).to_string(),
            ..Default::default()
        })
        .await
        .unwrap();

    // The first turn completed (its command too) and the second is stalled mid-reply,
    // having recalled the first turn on this runner.
    let first_recall = wait_for(
        "the second turn to recall on the first runner",
        LONG,
        || {
            let mut app_runs = app.runs.clone();
            let run_id = run_id.clone();
            async move {
                let events = app_runs
                    .list_events(proto::ListEventsRequest {
                        run_id,
                        after_seq: 0,
                        limit: 1000,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .events;
                recall_after(&events, 0)
            }
        },
    )
    .await;
    assert!(
        first_recall.starts_with("[recall: 1 turns; last prompt: remember the number 7;"),
        "{first_recall}"
    );
    let commands = app
        .runs
        .list_commands(proto::ListCommandsRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .commands;
    assert_eq!(
        commands[0].status,
        proto::CommandStatus::Completed as i32,
        "{commands:#?}"
    );

    first.signal(libc::SIGKILL);
    let _second = RunnerProcess::start(app.addr, "second", &[]);
    let requeued = wait_for_event(&mut app, &run_id, "run.requeued", LONG)
        .await
        .seq;
    let recalled = wait_for(
        "the re-run turn to recall on the second runner",
        LONG,
        || {
            let mut app_runs = app.runs.clone();
            let run_id = run_id.clone();
            async move {
                let events = app_runs
                    .list_events(proto::ListEventsRequest {
                        run_id,
                        after_seq: 0,
                        limit: 1000,
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .events;
                let after = events.iter().position(|e| e.seq > requeued)?;
                recall_after(&events, after)
            }
        },
    )
    .await;
    assert!(
        recalled.starts_with("[recall: 1 turns; last prompt: remember the number 7; last reply: Hello! You said: remember the number 7."),
        "the re-run turn gets the run's first turn as history: {recalled}"
    );

    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_run(&app, &run_id, RunStatus::Cancelled, LONG).await;
}

#[tokio::test]
async fn a_provider_thread_id_is_kept_on_the_session_and_handed_to_the_next_run() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r1", &[]);
    let mut sessions = sessions_client(&app).await;
    let session_id = Uuid::now_v7().to_string();

    let first = create_in(&mut app, "scripted", &session_id, "hello [thread:thr-42]").await;
    wait_for_run(&app, &first, RunStatus::Completed, LONG).await;
    let stored = session(&mut sessions, &session_id).await;
    assert_eq!(stored.provider_thread_id, "thr-42");

    let second = create_in(
        &mut app,
        "scripted",
        &session_id,
        "[recall] what did I say?",
    )
    .await;
    wait_for_run(&app, &second, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &second).await;
    let recalled = recall_after(&events, 0).expect("a recall");
    assert_eq!(
        recalled,
        "[recall: 1 turns; last prompt: hello [thread:thr-42]; last reply: Hello! You said: \
         hello [thread:thr-42]. This reply comes from the scripted provider.; thread: thr-42]",
    );
    // The second run reported no thread: the session keeps the one it had.
    assert_eq!(
        session(&mut sessions, &session_id).await.provider_thread_id,
        "thr-42"
    );

    // A later thread id replaces it, and the third run gets both earlier turns.
    let third = create_in(&mut app, "scripted", &session_id, "again [thread:thr-43]").await;
    wait_for_run(&app, &third, RunStatus::Completed, LONG).await;
    assert_eq!(
        session(&mut sessions, &session_id).await.provider_thread_id,
        "thr-43"
    );
    let fourth = create_in(&mut app, "scripted", &session_id, "[recall]").await;
    wait_for_run(&app, &fourth, RunStatus::Completed, LONG).await;
    let recalled = recall_after(&events_of(&mut app, &fourth).await, 0).expect("a recall");
    assert!(
        recalled.starts_with("[recall: 3 turns; last prompt: again [thread:thr-43];"),
        "{recalled}"
    );
    assert!(recalled.ends_with("thread: thr-43]"), "{recalled}");
}

#[tokio::test]
async fn an_agent_cli_gets_the_sessions_turns_and_its_own_thread_id_back() {
    let mut app = TestApp::spawn().await;
    // The agent answers a conversation's first turn with a result and a thread id, and
    // any later turn by printing the prompt line it was given (prefixed: a JSON line
    // with a "type" would be taken as an event).
    let agent = r#"read -r line
case "$line" in
  *'"history":[]'*) echo '{"type":"result","text":"the answer is 42","thread_id":"cli-thread-1"}' ;;
  *) printf 'got %s\n' "$line" ;;
esac"#;
    let _runner = RunnerProcess::start(
        app.addr,
        "cli",
        &[
            ("AGENTRUN_COMMAND", agent),
            ("AGENTRUN_BACKEND_PROFILES", "command"),
        ],
    );
    let mut sessions = sessions_client(&app).await;
    let session_id = Uuid::now_v7().to_string();
    let first = create_in(&mut app, "command", &session_id, "what is the answer?").await;
    wait_for_run(&app, &first, RunStatus::Completed, LONG).await;
    assert_eq!(
        session(&mut sessions, &session_id).await.provider_thread_id,
        "cli-thread-1"
    );

    let second = create_in(&mut app, "command", &session_id, "and why?").await;
    wait_for_run(&app, &second, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &second).await;
    let output: String = events
        .iter()
        .filter(|e| e.r#type == "content.delta")
        .filter_map(|e| {
            let payload: Value = serde_json::from_str(&e.payload_json).ok()?;
            (payload["kind"] == "command_output")
                .then(|| payload["delta"].as_str().unwrap_or_default().to_owned())
        })
        .collect();
    let line = output.strip_prefix("got ").unwrap_or(&output).trim_end();
    let prompt: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("the prompt line ({e}): {events:#?}"));
    assert_eq!(prompt["text"], "and why?");
    assert_eq!(
        prompt["history"],
        json!([{"prompt": "what is the answer?", "reply": "the answer is 42"}])
    );
    assert_eq!(prompt["provider_thread_id"], "cli-thread-1");
}

#[tokio::test]
async fn session_titles_come_from_metadata_or_the_first_prompt_and_can_be_set() {
    let mut app = TestApp::spawn().await;
    let mut sessions = sessions_client(&app).await;

    // From metadata, whitespace collapsed.
    let titled = Uuid::now_v7().to_string();
    let mut request = run_request("the prompt");
    request.session_id = titled.clone();
    request.metadata_json = json!({"title": "  My \n  project  "}).to_string();
    app.runs.create_run(request).await.unwrap();
    assert_eq!(session(&mut sessions, &titled).await.title, "My project");

    // From the first prompt, bounded to 80 characters on a character boundary.
    let prompted = Uuid::now_v7().to_string();
    let long_prompt = format!("  Résumé\tof {}", "é".repeat(100));
    create_in(&mut app, "scripted", &prompted, &long_prompt).await;
    let title = session(&mut sessions, &prompted).await.title;
    assert_eq!(title.chars().count(), 80, "{title}");
    assert!(title.starts_with("Résumé of éé"), "{title}");
    assert!(title.ends_with("é…"), "{title}");
    // A later run does not change it.
    create_in(&mut app, "scripted", &prompted, "something else").await;
    assert_eq!(session(&mut sessions, &prompted).await.title, title);

    // A short prompt is the title as it is.
    let short = Uuid::now_v7().to_string();
    create_in(&mut app, "scripted", &short, "fix the build").await;
    assert_eq!(session(&mut sessions, &short).await.title, "fix the build");

    // Set by a client: trimmed, version bumped once.
    let before = session(&mut sessions, &prompted).await;
    let set = sessions
        .set_session_title(proto::SetSessionTitleRequest {
            session_id: prompted.clone(),
            title: "  Renamed  ".into(),
            reader: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session
        .unwrap();
    assert_eq!(set.title, "Renamed");
    assert_eq!(set.version, before.version + 1);
    assert_eq!(session(&mut sessions, &prompted).await.title, "Renamed");
    let again = sessions
        .set_session_title(proto::SetSessionTitleRequest {
            session_id: prompted.clone(),
            title: "Renamed".into(),
            reader: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session
        .unwrap();
    assert_eq!(again.version, set.version, "the same title changes nothing");

    // Bad input is refused, naming the field, and changes nothing.
    for (session_id, title, field) in [
        (prompted.as_str(), "   ", "title"),
        (prompted.as_str(), "a\u{7}b", "title"),
        (prompted.as_str(), &"x".repeat(201), "title"),
        ("not-a-uuid", "ok", "session_id"),
        (prompted.as_str(), "ok", "reader"),
    ] {
        let reader = if field == "reader" { "two words" } else { "" };
        let err = sessions
            .set_session_title(proto::SetSessionTitleRequest {
                session_id: session_id.into(),
                title: title.into(),
                reader: reader.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let after = session(&mut sessions, &prompted).await;
    assert_eq!(
        (after.title.as_str(), after.version),
        ("Renamed", set.version)
    );
    // 200 characters are fine.
    let longest = "é".repeat(200);
    let set = sessions
        .set_session_title(proto::SetSessionTitleRequest {
            session_id: short.clone(),
            title: longest.clone(),
            reader: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(set.session.unwrap().session.unwrap().title, longest);

    // Unknown, and another tenant's, sessions are NOT_FOUND.
    let unknown = sessions
        .set_session_title(proto::SetSessionTitleRequest {
            session_id: Uuid::now_v7().to_string(),
            title: "x".into(),
            reader: String::new(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    let foreign = sessions
        .set_session_title(as_tenant(
            "other",
            proto::SetSessionTitleRequest {
                session_id: titled.clone(),
                title: "hijacked".into(),
                reader: String::new(),
            },
        ))
        .await
        .expect_err("another tenant's");
    assert_eq!(foreign.code(), Code::NotFound);
    assert_eq!(session(&mut sessions, &titled).await.title, "My project");
}
