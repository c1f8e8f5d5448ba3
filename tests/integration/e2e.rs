//! End to end with real runner processes on the Connect stream: runs complete, steer,
//! interrupt and cancel reach the provider, crashed or restarted runners are recovered,
//! and a runner that lost its lease is fenced.

use std::time::{Duration, Instant};

use agentrun_shared::proto::{self, CommandKind, RunStatus};
use agentrun_tests::*;
use serde_json::Value;

const LONG: Duration = Duration::from_secs(30);

async fn create(app: &mut TestApp, prompt: &str) -> String {
    app.runs
        .create_run(run_request(prompt))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id
}

async fn send(app: &mut TestApp, run_id: &str, kind: CommandKind, payload: Value) {
    app.runs
        .send_command(proto::SendCommandRequest {
            run_id: run_id.into(),
            kind: kind as i32,
            payload_json: payload.to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
}

/// Waits until the run has streamed at least `n` content deltas.
async fn wait_for_deltas(app: &mut TestApp, run_id: &str, n: usize) {
    let deadline = Instant::now() + LONG;
    loop {
        let deltas = events_of(app, run_id)
            .await
            .iter()
            .filter(|e| e.r#type == "content.delta")
            .count();
        if deltas >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "run {run_id} streamed only {deltas} deltas"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_run_completes_with_its_events_in_order() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r1", &[]);
    let run_id = create(&mut app, "hello").await;
    let run = wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    assert_eq!(run.attempt, 1);

    let events = events_of(&mut app, &run_id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    let types: Vec<&str> = events.iter().map(|e| e.r#type.as_str()).collect();
    let position = |t: &str| {
        types
            .iter()
            .position(|x| *x == t)
            .unwrap_or_else(|| panic!("no {t} in {types:?}"))
    };
    assert!(position("run.claimed") < position("run.started"));
    assert!(position("run.started") < position("turn.started"));
    assert!(position("turn.started") < position("content.delta"));
    assert!(position("content.delta") < position("turn.completed"));
    assert_eq!(types.last(), Some(&"run.terminal"));
    assert!(
        assistant_text(&events).contains("hello"),
        "{}",
        assistant_text(&events)
    );
    let turn_end = events
        .iter()
        .find(|e| e.r#type == "turn.completed")
        .unwrap();
    assert_eq!(payload(turn_end)["state"], "completed");
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn steer_reaches_the_active_turn() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(
        app.addr,
        "r1",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20")],
    );
    let run_id = create(&mut app, "[slow] tell me a story").await;
    wait_for_deltas(&mut app, &run_id, 3).await;
    send(
        &mut app,
        &run_id,
        CommandKind::Steer,
        serde_json::json!({"text": "make it about whales"}),
    )
    .await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let text = assistant_text(&events_of(&mut app, &run_id).await);
    assert!(text.contains("[steer: make it about whales]"), "{text}");
}

#[tokio::test]
async fn interrupt_keeps_the_run_for_the_next_turn() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r1", &[]);
    let run_id = create(&mut app, "[stall] think forever").await;
    wait_for_event(&mut app, &run_id, "turn.started", LONG).await;
    send(
        &mut app,
        &run_id,
        CommandKind::Interrupt,
        serde_json::json!({}),
    )
    .await;
    let ended = wait_for_event(&mut app, &run_id, "turn.completed", LONG).await;
    assert_eq!(payload(&ended)["state"], "interrupted");
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Running,
        "the run stays open"
    );

    send(
        &mut app,
        &run_id,
        CommandKind::Turn,
        serde_json::json!({"prompt": "second turn"}),
    )
    .await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    let events = events_of(&mut app, &run_id).await;
    let states: Vec<Value> = events
        .iter()
        .filter(|e| e.r#type == "turn.completed")
        .map(|e| payload(e)["state"].clone())
        .collect();
    assert_eq!(states, ["interrupted", "completed"]);
    assert!(assistant_text(&events).contains("second turn"));
}

#[tokio::test]
async fn cancel_stops_a_child_process_and_ends_the_run_cancelled() {
    let mut app = TestApp::spawn().await;
    // The "agent CLI" says its pid, then ignores SIGTERM and runs forever.
    let agent = r#"echo "pid $$"; trap '' TERM; while true; do sleep 1; done"#;
    let _runner = RunnerProcess::start(
        app.addr,
        "r1",
        &[
            ("AGENTRUN_COMMAND", agent),
            ("AGENTRUN_COMMAND_GRACE_MS", "300"),
            ("AGENTRUN_BACKEND_PROFILES", "command"),
        ],
    );
    let mut request = run_request("work hard");
    request.backend_profile = "command".into();
    let run_id = app
        .runs
        .create_run(request)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    wait_for_deltas(&mut app, &run_id, 1).await;
    let output = events_of(&mut app, &run_id)
        .await
        .iter()
        .filter(|e| e.r#type == "content.delta")
        .map(|e| payload(e)["delta"].as_str().unwrap_or_default().to_owned())
        .collect::<String>();
    let pid: i32 = output
        .trim()
        .strip_prefix("pid ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{output:?}"));

    let asked = Instant::now();
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let run = wait_for_run(&app, &run_id, RunStatus::Cancelled, LONG).await;
    eprintln!("cancelled after {:?}", asked.elapsed());
    assert_eq!(run.failure_kind, "cancelled");
    wait_for("the agent process to be gone", LONG, || async move {
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        (!alive).then_some(())
    })
    .await;
}

#[tokio::test]
async fn cancel_closes_the_http_request_of_an_openai_turn() {
    let server = SlowSse::start().await;
    let mut app = TestApp::spawn().await;
    let base_url = format!("http://{}/v1", server.addr);
    let _runner = RunnerProcess::start(
        app.addr,
        "r1",
        &[
            ("OPENAI_BASE_URL", base_url.as_str()),
            ("OPENAI_API_KEY", "sk-test"),
            ("AGENTRUN_BACKEND_PROFILES", "openai"),
        ],
    );
    let mut request = run_request("hi");
    request.backend_profile = "openai".into();
    let run_id = app
        .runs
        .create_run(request)
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id;
    wait_for_deltas(&mut app, &run_id, 1).await;
    assert!(!server.closed(), "the stream is still open");
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: run_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for_run(&app, &run_id, RunStatus::Cancelled, LONG).await;
    let closed = &server;
    wait_for("the HTTP request to be closed", LONG, || async move {
        closed.closed().then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_killed_runners_run_moves_to_another_runner() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 1_500).await;
    let delay = [("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20")];
    let first = RunnerProcess::start(app.addr, "first", &delay);
    let run_id = create(&mut app, "[slow] keep going").await;
    wait_for_deltas(&mut app, &run_id, 5).await;
    let _second = RunnerProcess::start(app.addr, "second", &delay);

    first.signal(libc::SIGKILL);
    let run = wait_for_run(&app, &run_id, RunStatus::Completed, Duration::from_secs(60)).await;
    assert_eq!(run.attempt, 2);
    let events = events_of(&mut app, &run_id).await;
    let claimers: Vec<String> = events
        .iter()
        .filter(|e| e.r#type == "run.claimed")
        .map(|e| {
            payload(e)["runner_name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(claimers, ["first", "second"]);
    assert!(events.iter().any(|e| e.r#type == "run.requeued"));
    assert_eq!(
        payload(
            events
                .iter()
                .rfind(|e| e.r#type == "turn.completed")
                .unwrap()
        )["state"],
        "completed"
    );
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn a_restarted_runner_resumes_its_lease_without_duplicates() {
    // A long lease: the resumed run must not wait for it to expire.
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 60_000).await;
    let runner_id = uuid::Uuid::new_v4().to_string();
    let env = [
        ("AGENTRUN_RUNNER_ID", runner_id.as_str()),
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20"),
    ];
    let mut before = RunnerProcess::start(app.addr, "phoenix", &env);
    let run_id = create(&mut app, "[slow] survive").await;
    wait_for_deltas(&mut app, &run_id, 5).await;
    before.signal(libc::SIGKILL);
    before.wait_exit(LONG).await;

    let _after = RunnerProcess::start(app.addr, "phoenix", &env);
    let run = wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;
    assert_eq!(run.attempt, 1, "resumed, not requeued");
    assert_eq!(run.lease_epoch, 2);
    let events = events_of(&mut app, &run_id).await;
    let resumed = events
        .iter()
        .filter(|e| e.r#type == "run.claimed")
        .nth(1)
        .expect("a second claim");
    assert_eq!(payload(resumed)["resumed"], true);
    assert!(!events.iter().any(|e| e.r#type == "run.requeued"));
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn a_runner_that_lost_its_lease_is_fenced() {
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 1_000).await;
    let delay = [("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20")];
    let zombie = RunnerProcess::start(app.addr, "zombie", &delay);
    let run_id = create(&mut app, "[slow] contested").await;
    wait_for_deltas(&mut app, &run_id, 5).await;

    // Frozen past its lease: the run is requeued and another runner takes it.
    zombie.signal(libc::SIGSTOP);
    wait_for_event(&mut app, &run_id, "run.requeued", LONG).await;
    let _healthy = RunnerProcess::start(app.addr, "healthy", &delay);
    wait_for_deltas(&mut app, &run_id, 40).await;
    zombie.signal(libc::SIGCONT);

    wait_for_run(&app, &run_id, RunStatus::Completed, Duration::from_secs(60)).await;
    let events = events_of(&mut app, &run_id).await;
    let requeued_at = events
        .iter()
        .find(|e| e.r#type == "run.requeued")
        .unwrap()
        .seq;
    let late: Vec<i64> = events
        .iter()
        .filter(|e| e.epoch == 1 && e.seq > requeued_at)
        .map(|e| e.seq)
        .collect();
    assert!(
        late.is_empty(),
        "the fenced runner wrote after losing its lease: {late:?}"
    );
    assert_event_log_consistent(&app.db().await).await;
}

#[tokio::test]
async fn sigterm_drains_and_exits_zero() {
    let mut app = TestApp::spawn().await;
    let env = [
        ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "20"),
        ("AGENTRUN_MAX_CONCURRENCY", "2"),
    ];
    let mut runner = RunnerProcess::start(app.addr, "r1", &env);
    let run_id = create(&mut app, "[tokens:100] finish me").await;
    wait_for_deltas(&mut app, &run_id, 3).await;
    runner.signal(libc::SIGTERM);
    // Work that arrives during the drain is not started (the runner still had credit).
    let later = create(&mut app, "after the drain began").await;
    // The running run finishes inside the grace period, then the runner exits 0.
    let status = runner.wait_exit(LONG).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Completed
    );
    let later = get_run(&mut app, &later).await;
    assert_eq!(status_of(&later), RunStatus::Pending);
    assert_eq!(later.attempt, 1, "a released run does not lose an attempt");
}

/// An OpenAI-compatible endpoint that streams one delta, then holds the response open,
/// and records when the client goes away.
struct SlowSse {
    addr: std::net::SocketAddr,
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowSse {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = closed.clone();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the request head and body (the body ends the JSON object).
            while !String::from_utf8_lossy(&request).contains("\"stream\"") {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n";
            let chunk = r#"data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#;
            socket.write_all(head.as_bytes()).await.unwrap();
            socket
                .write_all(format!("{chunk}\n\n").as_bytes())
                .await
                .unwrap();
            // Hold the response open until the client closes the connection.
            loop {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        Self { addr, closed }
    }

    fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test]
async fn work_created_on_one_replica_is_pushed_to_a_runner_on_another() {
    // The safety-net poll is an hour: only the LISTEN/NOTIFY wake-up can deliver in time.
    let no_poll = |s: &mut agentrun_manager::Settings| s.runner_poll_interval_ms = 3_600_000;
    let a = TestApp::spawn_with(no_poll).await;
    let mut b = TestApp::spawn_on(&a.database_url, no_poll).await;
    let _runner = RunnerProcess::start(a.addr, "on-a", &[]);
    // Let the runner connect and spend its credit on nothing, so it waits for a wake-up.
    let db = a.db().await;
    wait_for("the runner to register", LONG, || {
        let db = &db;
        async move {
            let n: i64 = db
                .query_one("SELECT count(*) FROM runners", &[])
                .await
                .ok()?
                .get(0);
            (n == 1).then_some(())
        }
    })
    .await;

    for i in 0..3 {
        let run_id = create(&mut b, &format!("via replica b {i}")).await;
        wait_for_run(&b, &run_id, RunStatus::Completed, LONG).await;
    }
    // Commands sent through B reach the runner on A too.
    let run_id = create(&mut b, "[stall] wait for me").await;
    wait_for_event(&mut b, &run_id, "turn.started", LONG).await;
    send(
        &mut b,
        &run_id,
        CommandKind::Interrupt,
        serde_json::json!({}),
    )
    .await;
    let ended = wait_for_event(&mut b, &run_id, "turn.completed", LONG).await;
    assert_eq!(payload(&ended)["state"], "interrupted");
}
