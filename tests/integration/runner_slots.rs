//! The real runner's slot accounting and payload limits (issue 10): a run that ends under
//! the runner (here by `run_timeout`) gives its slot back, and output larger than the
//! manager's payload limit is split (content deltas) or truncated (other events) so the
//! run still completes.

use std::time::Duration;

use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;

const LONG: Duration = Duration::from_secs(30);
/// The manager's default `max_payload_bytes`.
const MAX_PAYLOAD_BYTES: usize = 256 * 1024;

async fn create(app: &mut TestApp, request: proto::CreateRunRequest) -> String {
    app.runs
        .create_run(request)
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

/// The runner id named by the run's (first) `run.claimed` event.
async fn claimed_by(app: &mut TestApp, run_id: &str) -> String {
    let claimed = wait_for_event(app, run_id, "run.claimed", LONG).await;
    payload(&claimed)["runner_id"]
        .as_str()
        .expect("run.claimed names the runner")
        .to_owned()
}

/// A run for the `command` profile.
fn command_run(prompt: &str) -> proto::CreateRunRequest {
    let mut request = run_request(prompt);
    request.backend_profile = "command".into();
    request
}

/// Starts a runner with one slot whose agent CLI (`command` profile) is `agent`.
fn command_runner(app: &TestApp, agent: &str) -> RunnerProcess {
    RunnerProcess::start(
        app.addr,
        "r1",
        &[
            ("AGENTRUN_MAX_CONCURRENCY", "1"),
            ("AGENTRUN_COMMAND", agent),
            ("AGENTRUN_BACKEND_PROFILES", "command"),
        ],
    )
}

#[tokio::test]
async fn a_run_that_times_out_gives_its_slot_back_to_the_next_run() {
    let mut app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "r1", &[("AGENTRUN_MAX_CONCURRENCY", "1")]);

    let mut stalled = run_request("[stall] forever");
    stalled.run_timeout_ms = 1_500;
    let stalled = create(&mut app, stalled).await;
    // The runner is connected: it claimed the stalled run into its only slot. (Not
    // waited for as `running`: the run may be past that by the time it is looked at.)
    let runner_id = claimed_by(&mut app, &stalled).await;
    let failed = wait_for_run(&app, &stalled, RunStatus::Failed, LONG).await;
    assert_eq!(failed.failure_kind, "run_timeout");

    // The lease ended under the runner: its slot must take the next run.
    let next = create(&mut app, run_request("hello")).await;
    wait_for_run(&app, &next, RunStatus::Completed, LONG).await;
    assert_eq!(
        claimed_by(&mut app, &next).await,
        runner_id,
        "the same runner ran it"
    );
    assert!(assistant_text(&events_of(&mut app, &next).await).contains("hello"));
}

#[tokio::test]
async fn an_output_line_over_the_payload_limit_is_split_into_deltas_that_reassemble() {
    // A limit below the runner's default, so the runner must take it from the welcome.
    let limit = 100_000;
    let mut app = TestApp::spawn_with(|s| s.max_payload_bytes = limit).await;
    // One 480,000-byte line; its quotes and backslashes are escaped in JSON, so the
    // serialized delta is about 600 KB. Each repeat also has two- and three-byte
    // characters, so a split on a byte count would break one.
    let unit = r#"x"\é€"#;
    let repeats = 60_000;
    let agent = format!("yes '{unit}' | head -n {repeats} | tr -d '\\n'; echo");
    let _runner = command_runner(&app, &agent);

    let run_id = create(&mut app, command_run("print a lot")).await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;

    let events = events_of(&mut app, &run_id).await;
    let deltas: Vec<&proto::Event> = events
        .iter()
        .filter(|e| e.r#type == "content.delta")
        .collect();
    assert!(
        deltas.len() >= 6,
        "600 KB of output needs at least six deltas, got {}",
        deltas.len()
    );
    for delta in &deltas {
        assert!(
            delta.payload_json.len() <= limit,
            "a stored delta is {} bytes",
            delta.payload_json.len()
        );
        let p = payload(delta);
        assert_eq!(p["kind"], "command_output");
        assert_eq!(p["item_id"], payload(deltas[0])["item_id"]);
    }
    let text: String = deltas
        .iter()
        .map(|e| payload(e)["delta"].as_str().unwrap_or_default().to_owned())
        .collect();
    let want = format!("{}\n", unit.repeat(repeats));
    assert!(text == want, "the deltas do not reassemble the output line");
}

#[tokio::test]
async fn an_event_over_the_payload_limit_is_truncated_with_a_marker() {
    let mut app = TestApp::spawn().await;
    // A runtime.warning whose message alone is 540,000 bytes.
    let agent = "printf '{\"type\":\"runtime.warning\",\"message\":\"'; \
                 yes abcdefghi | head -n 60000 | tr -d '\\n'; printf '\"}\\n'";
    let _runner = command_runner(&app, agent);

    let run_id = create(&mut app, command_run("warn a lot")).await;
    wait_for_run(&app, &run_id, RunStatus::Completed, LONG).await;

    let events = events_of(&mut app, &run_id).await;
    let warning = events
        .iter()
        .find(|e| e.r#type == "runtime.warning")
        .expect("the warning is stored");
    assert!(warning.payload_json.len() <= MAX_PAYLOAD_BYTES);
    let p = payload(warning);
    assert_eq!(p["truncated"], true);
    let original = p["original_bytes"].as_u64().expect("original_bytes");
    assert!(original > 540_000, "original_bytes {original}");
    let message = p["message"].as_str().expect("the message stays a string");
    assert!(
        message.len() > 200_000 && "abcdefghi".repeat(60_000).starts_with(message),
        "the message is the start of the original ({} bytes)",
        message.len()
    );
}
