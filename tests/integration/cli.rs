//! The `agentrun` command line, run as a real process against a manager: following a
//! run streams its reply and exits by the run's outcome, the client commands reach the
//! manager and report its errors, and `agentrun dev` starts a whole stack and removes
//! it again on SIGTERM.
//!
//! The test plays the runner over the unary RunnerService RPCs, so what the CLI prints
//! is fully determined by the events the test appends.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::{self, CommandKind, RunStatus};
use agentrun_tests::cli::*;
use agentrun_tests::*;
use serde_json::{Value, json};
use tonic::transport::Channel;

/// How long `agentrun dev` may take to start (initdb, migrations) or to stop.
const DEV_TIMEOUT: Duration = Duration::from_secs(60);

/// A content delta of `kind` as the runner would append it.
fn delta(runner_seq: i64, kind: &str, text: &str) -> proto::RunnerEvent {
    proto::RunnerEvent {
        runner_seq,
        r#type: "content.delta".into(),
        payload_json: json!({ "kind": kind, "delta": text }).to_string(),
    }
}

async fn create_run(app: &mut TestApp, prompt: &str) -> String {
    app.runs
        .create_run(run_request(prompt))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap()
        .run_id
}

#[tokio::test]
async fn run_follow_streams_the_reply_to_stdout_and_exits_0() {
    let mut app = TestApp::spawn().await;
    let mut cli = CliProcess::start(app.addr, &["run", "hello", "--follow"]);

    let runner = runner("cli-test");
    let held = claim(&mut app, &runner, 1).await;
    let assignment = &held[0];
    let run = assignment.run.as_ref().unwrap();
    assert_eq!(
        run.backend_profile, "scripted",
        "default profile without a key"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&run.input_json).unwrap(),
        json!({"prompt": "hello"})
    );

    app.runners
        .append_events(append(
            &runner,
            assignment,
            vec![delta(1, "assistant_text", "Hel")],
        ))
        .await
        .unwrap();
    // The reply streams: the first delta is printed before the run ends.
    wait_for("the first delta on stdout", COMMAND_TIMEOUT, || {
        let out = cli.stdout();
        async move { (out == "Hel").then_some(()) }
    })
    .await;
    let rest = vec![
        delta(2, "reasoning_text", "thinking"),
        delta(3, "assistant_text", "lo "),
        delta(4, "assistant_text", "world"),
    ];
    app.runners
        .append_events(append(&runner, assignment, rest))
        .await
        .unwrap();
    app.runners
        .finish_run(finish(&runner, assignment, RunStatus::Completed))
        .await
        .unwrap();

    let done = cli.wait(COMMAND_TIMEOUT).await;
    assert_eq!(done.stdout, "Hello world\n", "stderr:\n{}", done.stderr);
    assert_eq!(done.code(), Some(0), "stderr:\n{}", done.stderr);
    // The run id, the other events and the outcome go to stderr.
    assert!(done.stderr.contains(&run.run_id), "{}", done.stderr);
    assert!(
        done.stderr.contains("content.delta reasoning_text"),
        "{}",
        done.stderr
    );
    assert!(
        done.stderr.contains("run.terminal completed"),
        "{}",
        done.stderr
    );
    assert!(
        done.stderr
            .contains(&format!("run {} completed", run.run_id)),
        "{}",
        done.stderr
    );
}

#[tokio::test]
async fn run_follow_exits_1_when_the_run_fails() {
    let mut app = TestApp::spawn().await;
    let mut cli = CliProcess::start(app.addr, &["run", "doomed", "--follow"]);

    let runner = runner("cli-test");
    let held = claim(&mut app, &runner, 1).await;
    let assignment = &held[0];
    app.runners
        .append_events(append(
            &runner,
            assignment,
            vec![delta(1, "assistant_text", "partial")],
        ))
        .await
        .unwrap();
    let mut failed = finish(&runner, assignment, RunStatus::Failed);
    failed.failure_kind = "provider_error".into();
    failed.message = "boom".into();
    app.runners.finish_run(failed).await.unwrap();

    let done = cli.wait(COMMAND_TIMEOUT).await;
    assert_eq!(done.code(), Some(1), "stderr:\n{}", done.stderr);
    assert_eq!(done.stdout, "partial\n");
    assert!(
        done.stderr.contains("failed: provider_error: boom"),
        "{}",
        done.stderr
    );
}

#[tokio::test]
async fn client_commands_reach_the_manager() {
    let mut app = TestApp::spawn().await;
    let run_id = create_run(&mut app, "hi").await;

    // send: a steer after the first turn (command 1).
    let sent = agentrun(&app, &["send", &run_id, "steer", "x"]).await;
    assert_eq!(sent.code(), Some(0), "stderr:\n{}", sent.stderr);
    assert_eq!(sent.stdout, "command 2 (steer) pending\n");
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
    let steer = commands
        .iter()
        .find(|c| c.kind == CommandKind::Steer as i32)
        .expect("the steer was stored");
    assert_eq!(
        serde_json::from_str::<Value>(&steer.payload_json).unwrap(),
        json!({"text": "x"})
    );

    // A turn needs its text: a usage error, and nothing is sent.
    let refused = agentrun(&app, &["send", &run_id, "turn"]).await;
    assert_eq!(refused.code(), Some(2), "stderr:\n{}", refused.stderr);

    // get and list show the run.
    let got = agentrun(&app, &["get", &run_id]).await;
    assert_eq!(got.code(), Some(0), "stderr:\n{}", got.stderr);
    assert!(got.stdout.contains("status      pending"), "{}", got.stdout);
    let listed = agentrun(&app, &["list", "--status", "pending"]).await;
    assert_eq!(listed.code(), Some(0), "stderr:\n{}", listed.stderr);
    assert!(listed.stdout.starts_with("ID "), "{}", listed.stdout);
    assert!(listed.stdout.contains(&run_id), "{}", listed.stdout);

    // cancel: a pending run ends cancelled at once.
    let cancelled = agentrun(&app, &["cancel", &run_id, "--reason", "enough"]).await;
    assert_eq!(cancelled.code(), Some(0), "stderr:\n{}", cancelled.stderr);
    assert_eq!(cancelled.stdout, format!("run {run_id} cancelled\n"));
    let run = get_run(&mut app, &run_id).await;
    assert_eq!(status_of(&run), RunStatus::Cancelled);
    assert_eq!(run.failure_message, "enough");

    // events --json: one JSON object per line, seqs gapless from 1, ending the log.
    let events = agentrun(&app, &["events", &run_id, "--json"]).await;
    assert_eq!(events.code(), Some(0), "stderr:\n{}", events.stderr);
    let lines: Vec<Value> = events
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let seqs: Vec<i64> = lines.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=run.last_event_seq).collect::<Vec<_>>());
    assert_eq!(lines.last().unwrap()["type"], "run.terminal");
    assert_eq!(lines.last().unwrap()["payload"]["status"], "cancelled");
    // --after skips what was seen; --follow on an ended run stops at once.
    let tail = agentrun(
        &app,
        &["events", &run_id, "--json", "--follow", "--after", "2"],
    )
    .await;
    assert_eq!(tail.code(), Some(0), "stderr:\n{}", tail.stderr);
    assert_eq!(tail.stdout.lines().count() as i64, run.last_event_seq - 2);
}

#[tokio::test]
async fn errors_are_reported_with_the_field_and_exit_1() {
    let mut app = TestApp::spawn().await;
    let run_id = create_run(&mut app, "hi").await;

    let malformed = agentrun(&app, &["get", "not-a-uuid"]).await;
    assert_eq!(malformed.code(), Some(1));
    assert!(
        malformed.stderr.starts_with("error: "),
        "{}",
        malformed.stderr
    );
    assert!(malformed.stderr.contains("run_id"), "{}", malformed.stderr);
    let malformed = agentrun(&app, &["events", "not-a-uuid", "--follow"]).await;
    assert_eq!(malformed.code(), Some(1));
    assert!(malformed.stderr.contains("run_id"), "{}", malformed.stderr);

    // The tenant header is sent: another tenant cannot see the run.
    let other = agentrun(&app, &["--tenant", "other", "get", &run_id]).await;
    assert_eq!(other.code(), Some(1));
    assert!(other.stderr.contains("not found"), "{}", other.stderr);

    // Nothing listening: a clear message naming the URL.
    let nowhere = free_addr();
    let unreachable = CliProcess::start(nowhere, &["list"])
        .wait(COMMAND_TIMEOUT)
        .await;
    assert_eq!(unreachable.code(), Some(1));
    assert!(
        unreachable
            .stderr
            .contains(&format!("cannot reach the manager at http://{nowhere}")),
        "{}",
        unreachable.stderr
    );
}

/// Throwaway cluster dirs that a process with `pid` created in the temp dir.
fn pg_dirs_of(pid: u32) -> HashSet<PathBuf> {
    let prefix = format!("agentrun-pg-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .expect("read the temp dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Polls GetQueueStats at `addr` until it answers.
async fn wait_until_serving(addr: SocketAddr, dev: &CliProcess) {
    let endpoint = Channel::from_shared(format!("http://{addr}")).unwrap();
    let deadline = Instant::now() + DEV_TIMEOUT;
    loop {
        if let Ok(channel) = endpoint.connect().await {
            let mut admin = AdminServiceClient::new(channel);
            if admin
                .get_queue_stats(proto::GetQueueStatsRequest {})
                .await
                .is_ok()
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "agentrun dev did not serve within {DEV_TIMEOUT:?}\nstdout:\n{}\nstderr:\n{}",
            dev.stdout(),
            dev.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `agentrun dev` with its own throwaway PostgreSQL (DATABASE_URL removed) on `addr`,
/// its web UI on a free port.
fn start_dev(addr: SocketAddr, runners: &str) -> CliProcess {
    let mut command = agentrun_command(addr, &as_strs(&dev_args(addr, runners)));
    command.env_remove("DATABASE_URL").env("RUST_LOG", "info");
    CliProcess::spawn(command)
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `dev` on `addr` with `runners`, its UI on a free port (tests run side by side).
fn dev_args(addr: SocketAddr, runners: &str) -> Vec<String> {
    ["dev", "--listen", &addr.to_string(), "--runners", runners]
        .into_iter()
        .map(String::from)
        .chain(["--ui-listen".into(), free_addr().to_string()])
        .collect()
}

/// `dev`'s banner, once it is printed whole (the manager may serve before it is).
async fn banner_of(dev: &CliProcess) -> String {
    let deadline = Instant::now() + DEV_TIMEOUT;
    loop {
        let banner = dev.stdout();
        if banner.contains("stop: Ctrl-C") {
            return banner;
        }
        assert!(
            Instant::now() < deadline,
            "no banner within {DEV_TIMEOUT:?}\nstdout:\n{banner}\nstderr:\n{}",
            dev.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `agentrun dev` serves; on SIGTERM it stops gracefully and exits 0 (a requested
/// stop is a success; only a second signal exits 130), and its cluster is gone.
#[tokio::test]
async fn dev_serves_and_cleans_up_on_sigterm() {
    let addr = free_addr();
    let mut dev = start_dev(addr, "0");
    wait_until_serving(addr, &dev).await;
    let clusters = pg_dirs_of(dev.pid());
    assert_eq!(clusters.len(), 1, "one throwaway cluster: {clusters:?}");
    let banner = banner_of(&dev).await;
    assert!(banner.contains(&format!("http://{addr}")), "{banner}");
    assert!(banner.contains("auth      off"), "{banner}");
    // The banner names the web UI, and it answers there.
    let ui = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("ui"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no ui line: {banner}"));
    let ui_addr = ui.trim_start_matches("http://").trim_end_matches('/');
    let mut page = tokio::net::TcpStream::connect(ui_addr)
        .await
        .expect("the UI listens");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // As a browser asks: the Host is the address opened (an unauthenticated UI answers
    // only loopback hosts).
    page.write_all(
        format!("GET / HTTP/1.1\r\nhost: {ui_addr}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    page.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("<base href=\"/\">"), "{answer}");

    terminate(dev.pid());
    let done = dev.wait(DEV_TIMEOUT).await;
    assert_eq!(done.code(), Some(0), "stderr:\n{}", done.stderr);
    assert!(
        done.stdout.contains("removed the throwaway PostgreSQL"),
        "{}",
        done.stdout
    );
    // Removed by dev itself before exiting, not later by the cluster's watchdog.
    for dir in &clusters {
        assert!(!dir.exists(), "{} was left behind", dir.display());
    }
    assert!(
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .is_err(),
        "the manager still listens after dev exited"
    );
}

/// `agentrun dev`'s log is one stream in one format: the runners' lines join the
/// manager's on stderr (not stdout, which has the banner), and off a terminal neither
/// is coloured — without NO_COLOR set to say so.
#[tokio::test]
async fn dev_logs_manager_and_runner_lines_on_stderr_without_colour_off_a_terminal() {
    let addr = free_addr();
    let mut command = agentrun_command(addr, &as_strs(&dev_args(addr, "1")));
    command
        .env_remove("DATABASE_URL")
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info");
    let mut dev = CliProcess::spawn(command);
    dev.wait_output("the runner's own log line", DEV_TIMEOUT, |_, err| {
        err.contains("runner starting") && err.contains("started runner")
    })
    .await;
    banner_of(&dev).await;
    terminate(dev.pid());
    let done = dev.wait(DEV_TIMEOUT).await;
    assert_eq!(done.code(), Some(0), "stderr:\n{}", done.stderr);
    assert!(!done.stdout.contains("runner starting"), "{}", done.stdout);
    assert!(!done.stderr.contains('\x1b'), "coloured:\n{}", done.stderr);
    assert!(!done.stdout.contains('\x1b'), "coloured:\n{}", done.stdout);
}

/// The whole stack from one command: `agentrun dev` with a real runner serves
/// `agentrun run --follow`, and SIGTERM drains the runner before dev exits.
#[tokio::test]
async fn dev_runs_a_prompt_end_to_end_with_its_runner() {
    let addr = free_addr();
    let mut dev = start_dev(addr, "1");
    wait_until_serving(addr, &dev).await;

    let mut cli = CliProcess::start(addr, &["run", "hello", "--follow"]);
    let done = cli.wait(DEV_TIMEOUT).await;
    assert_eq!(
        done.code(),
        Some(0),
        "stderr:\n{}\ndev stderr:\n{}",
        done.stderr,
        dev.stderr()
    );
    assert!(
        !done.stdout.is_empty(),
        "no reply streamed: {}",
        done.stderr
    );

    // The runner's pid, from dev's log line `started runner runner=runner-1 pid=N`.
    let log = dev.stderr();
    let runner_pid: u32 = log
        .lines()
        .find(|l| l.contains("started runner"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no runner pid in dev's log:\n{log}"));
    terminate(dev.pid());
    let stopped = dev.wait(DEV_TIMEOUT).await;
    assert_eq!(stopped.code(), Some(0), "stderr:\n{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("runner stopped"),
        "{}",
        stopped.stderr
    );
    assert!(
        !PathBuf::from(format!("/proc/{runner_pid}")).exists(),
        "runner {runner_pid} outlived dev"
    );
}

/// An OpenAI-compatible endpoint that answers every chat completion with `words`,
/// streamed as SSE deltas.
async fn fake_openai(words: &'static [&'static str]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !String::from_utf8_lossy(&request).contains("\"stream\"") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let mut body = String::new();
                for word in words {
                    let chunk = json!({"choices": [{"index": 0, "delta": {"content": word}}]});
                    body.push_str(&format!("data: {chunk}\n\n"));
                }
                let done = json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
                body.push_str(&format!("data: {done}\n\ndata: [DONE]\n\n"));
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
            });
        }
    });
    addr
}

/// With an OpenAI-compatible base URL and key configured, the same two commands use the
/// openai provider: `dev`'s runners serve the `openai` profile and `run` picks it.
#[tokio::test]
async fn dev_uses_the_openai_provider_when_configured() {
    let model = fake_openai(&["Hi ", "from ", "the ", "model"]).await;
    let base_url = format!("http://{model}/v1");
    let addr = free_addr();
    let mut command = agentrun_command(addr, &as_strs(&dev_args(addr, "1")));
    command
        .env_remove("DATABASE_URL")
        .env("OPENAI_BASE_URL", &base_url)
        .env("OPENAI_API_KEY", "sk-test-key");
    let mut dev = CliProcess::spawn(command);
    wait_until_serving(addr, &dev).await;

    let mut run = agentrun_command(addr, &["run", "hello", "--follow"]);
    run.env("OPENAI_API_KEY", "sk-test-key");
    let done = CliProcess::spawn(run).wait(DEV_TIMEOUT).await;
    assert_eq!(
        done.code(),
        Some(0),
        "stderr:\n{}\ndev stderr:\n{}",
        done.stderr,
        dev.stderr()
    );
    assert_eq!(done.stdout, "Hi from the model\n");
    terminate(dev.pid());
    dev.wait(DEV_TIMEOUT).await;
}

/// `agentrun dev --auth` requires keys: it prints a client key that works, its runners
/// use a runner key of their own, and a call without a key is refused.
#[tokio::test]
async fn dev_with_auth_prints_a_key_that_works_and_refuses_calls_without_one() {
    let addr = free_addr();
    let mut args = dev_args(addr, "1");
    args.push("--auth".into());
    let mut command = agentrun_command(addr, &as_strs(&args));
    command.env_remove("DATABASE_URL").env("RUST_LOG", "info");
    let mut dev = CliProcess::spawn(command);
    let banner = banner_of(&dev).await;
    let key = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("api key"))
        .unwrap_or_else(|| panic!("no api key in dev's banner:\n{banner}"))
        .trim()
        .to_owned();
    assert!(banner.contains("admin key "), "{banner}");

    let refused = CliProcess::start(addr, &["list"]).wait(DEV_TIMEOUT).await;
    assert_ne!(refused.code(), Some(0), "{}", refused.stdout);
    assert!(refused.stderr.contains("API key"), "{}", refused.stderr);

    let done = CliProcess::start(addr, &["--api-key", &key, "run", "hello", "--follow"])
        .wait(DEV_TIMEOUT)
        .await;
    assert_eq!(
        done.code(),
        Some(0),
        "stderr:\n{}\ndev stderr:\n{}",
        done.stderr,
        dev.stderr()
    );
    assert!(
        !done.stdout.is_empty(),
        "no reply streamed: {}",
        done.stderr
    );
    terminate(dev.pid());
    dev.wait(DEV_TIMEOUT).await;
}
