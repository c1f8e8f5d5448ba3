//! The `agentrun` session, approval and stats commands, run as real processes against a
//! manager with a real runner process (scripted provider): `sessions` lists a session
//! with its attention for a reader, `session` prints and follows the replies of all its
//! runs and marks it read, `approve`/`decline` answer a waiting run's request (the first
//! answer wins), `run --follow` says how to approve, and `stats` shows the queue,
//! tenants and runners.

use std::time::Duration;

use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::cli::*;
use agentrun_tests::*;
use serde_json::Value;
use uuid::Uuid;

/// How long a scripted run may take to be claimed and finish.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates a run with `prompt` in `session_id` and returns its id.
async fn create_in(app: &mut TestApp, session_id: &str, prompt: &str) -> String {
    let mut request = run_request(prompt);
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

/// The text a completed run replied.
async fn reply_of(app: &mut TestApp, run_id: &str) -> String {
    let text = assistant_text(&events_of(app, run_id).await);
    assert!(!text.is_empty(), "run {run_id} replied nothing");
    text
}

/// The lines of a table printed on stdout that name `id`.
fn rows_naming<'a>(stdout: &'a str, id: &str) -> Vec<&'a str> {
    stdout.lines().filter(|l| l.contains(id)).collect()
}

/// The cells of a table row, split on whitespace.
fn cells(row: &str) -> Vec<&str> {
    row.split_whitespace().collect()
}

/// Waits for the run's first `request.opened` and returns its request id.
async fn opened_request(app: &mut TestApp, run_id: &str) -> String {
    let event = wait_for_event(app, run_id, "request.opened", RUN_TIMEOUT).await;
    let payload: Value = serde_json::from_str(&event.payload_json).expect("JSON payload");
    payload["request_id"]
        .as_str()
        .expect("request.opened names its request")
        .to_owned()
}

#[tokio::test]
async fn sessions_lists_a_session_and_session_prints_its_runs_and_marks_it_read() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "cli-sessions", &[]);
    let session_id = Uuid::new_v4().to_string();
    let first = create_in(&mut app, &session_id, "first question").await;
    wait_for_run(&app, &first, RunStatus::Completed, RUN_TIMEOUT).await;
    let second = create_in(&mut app, &session_id, "second question").await;
    wait_for_run(&app, &second, RunStatus::Completed, RUN_TIMEOUT).await;
    let (first_reply, second_reply) = (
        reply_of(&mut app, &first).await,
        reply_of(&mut app, &second).await,
    );
    assert_ne!(first_reply, second_reply);

    // Both runs ended and nobody read them: listed, marked unread, by default and with
    // --state unread.
    let listed = agentrun(&app, &["sessions"]).await;
    assert_eq!(listed.code(), Some(0), "stderr:\n{}", listed.stderr);
    assert!(
        listed.stdout.starts_with("   ID"),
        "a table: {}",
        listed.stdout
    );
    let rows = rows_naming(&listed.stdout, &session_id);
    assert_eq!(rows.len(), 1, "{}", listed.stdout);
    assert_eq!(
        cells(rows[0])[..4],
        ["*", session_id.as_str(), "first", "question"],
        "unread, titled by its first prompt: {}",
        rows[0]
    );
    let unread = agentrun(&app, &["sessions", "--state", "unread"]).await;
    assert_eq!(unread.code(), Some(0), "stderr:\n{}", unread.stderr);
    assert_eq!(
        rows_naming(&unread.stdout, &session_id).len(),
        1,
        "{}",
        unread.stdout
    );
    let running = agentrun(&app, &["sessions", "--state", "running"]).await;
    assert!(
        rows_naming(&running.stdout, &session_id).is_empty(),
        "{}",
        running.stdout
    );

    // The session's replies, in run order, on stdout; its details on stderr.
    let shown = agentrun(&app, &["session", &session_id]).await;
    assert_eq!(shown.code(), Some(0), "stderr:\n{}", shown.stderr);
    assert_eq!(
        shown.stdout,
        format!("{first_reply}\n{second_reply}\n"),
        "stderr:\n{}",
        shown.stderr
    );
    assert!(
        shown.stderr.contains(&format!("session     {session_id}")),
        "{}",
        shown.stderr
    );
    assert!(shown.stderr.contains(&format!("── run {first}")));
    assert!(shown.stderr.contains("run.terminal completed"));
    // Showing alone does not mark it read.
    let still = agentrun(&app, &["sessions", "--state", "unread"]).await;
    assert_eq!(rows_naming(&still.stdout, &session_id).len(), 1);

    // --mark-read: read for the default reader, still unread for another one.
    let marked = agentrun(&app, &["session", &session_id, "--mark-read"]).await;
    assert_eq!(marked.code(), Some(0), "stderr:\n{}", marked.stderr);
    assert!(
        marked.stderr.contains("marked read up to version"),
        "{}",
        marked.stderr
    );
    let unread = agentrun(&app, &["sessions", "--state", "unread"]).await;
    assert_eq!(unread.code(), Some(0), "stderr:\n{}", unread.stderr);
    assert!(
        rows_naming(&unread.stdout, &session_id).is_empty(),
        "read now: {}",
        unread.stdout
    );
    let idle = agentrun(&app, &["sessions", "--state", "idle"]).await;
    let rows = rows_naming(&idle.stdout, &session_id);
    assert_eq!(rows.len(), 1, "{}", idle.stdout);
    assert_eq!(cells(rows[0])[0], session_id, "no marker once read");
    let bob = agentrun(&app, &["sessions", "--state", "unread", "--reader", "bob"]).await;
    assert_eq!(
        rows_naming(&bob.stdout, &session_id).len(),
        1,
        "{}",
        bob.stdout
    );
}

#[tokio::test]
async fn session_follow_streams_a_new_runs_reply_until_ctrl_c() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(
        app.addr,
        "cli-sessions",
        &[("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "25")],
    );
    let session_id = Uuid::new_v4().to_string();
    let first = create_in(&mut app, &session_id, "first question").await;
    wait_for_run(&app, &first, RunStatus::Completed, RUN_TIMEOUT).await;
    let first_reply = reply_of(&mut app, &first).await;

    let mut cli = CliProcess::start(
        app.addr,
        &["session", &session_id, "--follow", "--output-only"],
    );
    cli.wait_output("the first run's reply", COMMAND_TIMEOUT, |out, _| {
        out == first_reply
    })
    .await;

    // A second run of the session, created while following: its reply streams.
    let second = create_in(&mut app, &session_id, "[tokens:60] second").await;
    cli.wait_output("the second reply to start", RUN_TIMEOUT, |out, _| {
        out.contains("token1 ")
    })
    .await;
    let run = get_run(&mut app, &second).await;
    assert!(
        !matches!(status_of(&run), RunStatus::Completed),
        "the reply is printed as it streams, before the run ends"
    );
    wait_for_run(&app, &second, RunStatus::Completed, RUN_TIMEOUT).await;
    let second_reply = reply_of(&mut app, &second).await;
    let expected = format!("{first_reply}\n{second_reply}");
    cli.wait_output("the whole second reply", COMMAND_TIMEOUT, |out, _| {
        out.len() >= expected.len()
    })
    .await;
    // The run ended, but a session has no end: following goes on until Ctrl-C.
    cli.wait_output("the second run's end", COMMAND_TIMEOUT, |_, err| {
        err.matches("run.terminal completed").count() == 2
    })
    .await;
    assert!(cli.is_running(), "still following");

    cli.interrupt();
    let done = cli.wait(COMMAND_TIMEOUT).await;
    assert_eq!(done.code(), Some(130), "stderr:\n{}", done.stderr);
    // Ctrl-C ends the last reply's line, as the end of a run does.
    assert_eq!(
        done.stdout,
        format!("{expected}\n"),
        "each reply once, in order"
    );
    // Output only: no lifecycle events.
    assert!(!done.stderr.contains("run.claimed"), "{}", done.stderr);
}

#[tokio::test]
async fn approve_resolves_a_waiting_run_and_decline_reports_the_earlier_answer() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "cli-approvals", &[]);
    let run_id = create(&mut app, "[approval] deploy").await;
    let request_id = opened_request(&mut app, &run_id).await;
    wait_for_run(&app, &run_id, RunStatus::Waiting, RUN_TIMEOUT).await;

    let approved = agentrun(&app, &["approve", &run_id, &request_id]).await;
    assert_eq!(approved.code(), Some(0), "stderr:\n{}", approved.stderr);
    assert_eq!(
        approved.stdout,
        format!("request {request_id} resolved now: accept\n")
    );
    wait_for_run(&app, &run_id, RunStatus::Completed, RUN_TIMEOUT).await;
    let reply = reply_of(&mut app, &run_id).await;
    assert!(reply.contains("Approval: accept"), "{reply}");

    // The first answer wins: a later decline is reported, not applied, and is no error.
    let declined = agentrun(&app, &["decline", &run_id, &request_id]).await;
    assert_eq!(declined.code(), Some(0), "stderr:\n{}", declined.stderr);
    assert_eq!(
        declined.stdout,
        format!(
            "request {request_id} was resolved earlier: accept (this decline was not applied)\n"
        )
    );

    // A request closed unanswered (its run was cancelled) cannot be approved: exit 1.
    let cancelled = create(&mut app, "[approval] drop tables").await;
    let closed = opened_request(&mut app, &cancelled).await;
    wait_for_run(&app, &cancelled, RunStatus::Waiting, RUN_TIMEOUT).await;
    app.runs
        .cancel_run(proto::CancelRunRequest {
            run_id: cancelled.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .expect("cancel run");
    wait_for_run(&app, &cancelled, RunStatus::Cancelled, RUN_TIMEOUT).await;
    let refused = agentrun(&app, &["approve", &cancelled, &closed]).await;
    assert_eq!(refused.code(), Some(1), "stdout:\n{}", refused.stdout);
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    assert!(
        refused.stderr.starts_with("error: ") && refused.stderr.contains("can no longer be"),
        "{}",
        refused.stderr
    );
}

#[tokio::test]
async fn run_follow_says_how_to_approve_a_waiting_run() {
    let app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "cli-approvals", &[]);
    let mut cli = CliProcess::start(app.addr, &["run", "[approval] deploy", "--follow"]);
    cli.wait_output("the approval hint", RUN_TIMEOUT, |_, err| {
        err.contains("agentrun approve ")
    })
    .await;
    // `… agentrun approve RUN REQUEST  (or: …)`
    let stderr = cli.stderr();
    let hint: Vec<&str> = stderr
        .split("agentrun approve ")
        .nth(1)
        .expect("the hint")
        .split_whitespace()
        .take(2)
        .collect();
    let (run_id, request_id) = (hint[0], hint[1]);
    assert!(
        stderr.contains(&format!("run {run_id}")),
        "the hint names the followed run: {stderr}"
    );
    assert!(
        stderr.contains(&format!("request_id={request_id}")),
        "and its request: {stderr}"
    );

    let approved = agentrun(&app, &["approve", run_id, request_id]).await;
    assert_eq!(approved.code(), Some(0), "stderr:\n{}", approved.stderr);
    let done = cli.wait(RUN_TIMEOUT).await;
    assert_eq!(done.code(), Some(0), "stderr:\n{}", done.stderr);
    assert_eq!(done.stdout, "Approval: accept\n");
    assert!(done.stderr.contains("request.resolved"), "{}", done.stderr);
}

#[tokio::test]
async fn stats_shows_the_queue_the_tenants_and_the_runners() {
    let mut app = TestApp::spawn().await;
    // A runner that serves another profile: listed, but it claims nothing.
    let _runner = RunnerProcess::start(
        app.addr,
        "cli-stats-runner",
        &[("AGENTRUN_BACKEND_PROFILES", "elsewhere")],
    );
    let run_id = create(&mut app, "hello").await;
    let admin = app.admin.clone();
    wait_for("the runner to be listed", COMMAND_TIMEOUT, || {
        let mut admin = admin.clone();
        async move {
            let runners = admin
                .list_runners(proto::ListRunnersRequest {})
                .await
                .ok()?
                .into_inner()
                .runners;
            runners
                .iter()
                .any(|r| r.name == "cli-stats-runner")
                .then_some(())
        }
    })
    .await;

    let stats = agentrun(&app, &["stats"]).await;
    assert_eq!(stats.code(), Some(0), "stderr:\n{}", stats.stderr);
    let lines: Vec<Vec<&str>> = stats.stdout.lines().map(cells).collect();
    assert!(
        lines.contains(&vec!["QUEUE", "STATUS", "RUNS", "OLDEST", "PENDING"]),
        "{}",
        stats.stdout
    );
    let pending = lines
        .iter()
        .find(|l| l.starts_with(&["default", "pending"]))
        .unwrap_or_else(|| panic!("no pending row:\n{}", stats.stdout));
    assert_eq!(pending[2], "1", "{}", stats.stdout);
    assert_eq!(pending.len(), 4, "with the oldest pending age: {pending:?}");
    assert!(
        lines.contains(&vec!["default", "1", "0", "none"]),
        "the tenant line: {}",
        stats.stdout
    );
    let runner = lines
        .iter()
        .find(|l| l.first() == Some(&"cli-stats-runner"))
        .unwrap_or_else(|| panic!("no runner row:\n{}", stats.stdout));
    assert_eq!(runner[2], "elsewhere", "{runner:?}");
    assert_eq!(runner[3], "0/4", "no leases of its 4 slots: {runner:?}");
    assert_eq!(runner.last(), Some(&"no"), "not draining: {runner:?}");
    assert_eq!(
        status_of(&get_run(&mut app, &run_id).await),
        RunStatus::Pending
    );
}
