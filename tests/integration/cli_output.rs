//! The `agentrun` command line for programs and operators, run as real processes against
//! a manager: `-o json` and `-o jsonl` on the client commands (parsed, field by field),
//! `approve`/`decline` without a request id, completion scripts, client options before
//! or after the command and not on `dev`, durations with units, and the operator
//! commands over AdminService (runners, drain, limits, API keys) with authentication on;
//! the webhook commands.

use std::process::Command;
use std::time::Duration;

use agentrun_manager::config::AuthMode;
use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::cli::*;
use agentrun_tests::*;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

/// Parses one JSON document printed on stdout.
fn json_of(done: &Finished) -> Value {
    assert_eq!(done.code(), Some(0), "stderr:\n{}", done.stderr);
    serde_json::from_str(&done.stdout)
        .unwrap_or_else(|err| panic!("not one JSON document ({err}):\n{}", done.stdout))
}

/// Parses JSON lines printed on stdout.
fn lines_of(done: &Finished) -> Vec<Value> {
    assert_eq!(done.code(), Some(0), "stderr:\n{}", done.stderr);
    done.stdout
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .collect()
}

/// True for an RFC 3339 UTC timestamp as the CLI prints them.
fn is_rfc3339(value: &Value) -> bool {
    value.as_str().is_some_and(|s| {
        s.len() >= 20 && s.as_bytes()[4] == b'-' && s.as_bytes()[10] == b'T' && s.ends_with('Z')
    })
}

/// A run claimed by a runner the test plays, with its first turn started.
struct Played {
    runner: proto::RunnerIdentity,
    assignment: proto::Assignment,
    run_id: String,
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
            next_seq: 1,
        };
        played
            .append(app, "turn.started", json!({ "turn_id": turn_id }))
            .await;
        played
    }

    async fn append(&mut self, app: &mut TestApp, event_type: &str, payload: Value) {
        let event = proto::RunnerEvent {
            runner_seq: self.next_seq,
            r#type: event_type.into(),
            payload_json: payload.to_string(),
        };
        let request = append(&self.runner, &self.assignment, vec![event]);
        app.runners
            .append_events(request)
            .await
            .expect("events are stored");
        self.next_seq += 1;
    }

    /// Opens an approval request and returns its id.
    async fn open(&mut self, app: &mut TestApp, command: &str) -> String {
        let request_id = uuid::Uuid::new_v4().to_string();
        let payload = json!({
            "request_id": request_id,
            "kind": "command",
            "detail": { "command": command },
            "options": ["accept", "decline"],
        });
        self.append(app, "request.opened", payload).await;
        request_id
    }

    async fn finish(&self, app: &mut TestApp) {
        app.runners
            .finish_run(finish(&self.runner, &self.assignment, RunStatus::Completed))
            .await
            .expect("finish run");
    }
}

#[tokio::test]
async fn client_commands_answer_json_with_the_proto_field_names() {
    // The played runner does not heartbeat: its lease must outlast the test.
    let mut app = TestApp::spawn_with(|s| s.lease_ttl_ms = 300_000).await;
    let mut played = Played::start(&mut app, "deploy please").await;
    let run_id = played.run_id.clone();
    let pending = create(&mut app, "still queued").await;
    let first = played.open(&mut app, "make deploy").await;
    let second = played.open(&mut app, "make migrate").await;

    // get: one document, enums lowercase, JSON text parsed, timestamps RFC 3339.
    let run = json_of(&agentrun(&app, &["get", &run_id, "-o", "json"]).await);
    assert_eq!(run["run_id"], run_id.as_str());
    assert_eq!(run["status"], "waiting", "{run}");
    assert_eq!(run["input"]["prompt"], "deploy please");
    assert_eq!(run["backend_profile"], "scripted");
    assert_eq!(run["queue"], "default");
    assert_eq!(run["attempt"], 1);
    assert!(is_rfc3339(&run["created_at"]), "{}", run["created_at"]);
    assert_eq!(run["finished_at"], Value::Null);
    assert_eq!(run["stream_mode"], "deltas");
    assert_eq!(run["schedule_id"], "", "not created by a schedule");
    // -o before the command, and -o jsonl for one object: one line.
    let before = agentrun(&app, &["-o", "jsonl", "get", &run_id]).await;
    assert_eq!(lines_of(&before).len(), 1, "{}", before.stdout);
    assert_eq!(lines_of(&before)[0]["run_id"], run_id.as_str());

    // list: an array, newest first; jsonl: one run per line.
    let listed = json_of(&agentrun(&app, &["list", "-o", "json"]).await);
    let ids: Vec<&str> = listed
        .as_array()
        .expect("an array")
        .iter()
        .map(|r| r["run_id"].as_str().expect("run_id is a string"))
        .collect();
    assert_eq!(ids, [pending.as_str(), run_id.as_str()]);
    let lines = lines_of(&agentrun(&app, &["list", "-o", "jsonl"]).await);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["status"], "pending");

    // requests: both open ones, with their detail parsed.
    let requests = json_of(&agentrun(&app, &["requests", &run_id, "-o", "json"]).await);
    let requests = requests.as_array().expect("an array");
    assert_eq!(requests.len(), 2, "{requests:?}");
    for request in requests {
        assert_eq!(request["run_id"], run_id.as_str());
        assert_eq!(request["status"], "open");
        assert_eq!(request["kind"], "command");
        assert_eq!(request["options"], json!(["accept", "decline"]));
        assert!(is_rfc3339(&request["created_at"]), "{request}");
    }
    assert_eq!(requests[0]["request_id"], second.as_str(), "newest first");
    assert_eq!(requests[0]["detail"]["command"], "make migrate");

    // approve without an id refuses with two open requests, naming both.
    let refused = agentrun(&app, &["approve", &run_id]).await;
    assert_eq!(refused.code(), Some(2), "stdout:\n{}", refused.stdout);
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    for id in [&first, &second] {
        assert!(refused.stderr.contains(id.as_str()), "{}", refused.stderr);
    }
    assert!(
        refused.stderr.contains("2 open requests"),
        "{}",
        refused.stderr
    );

    // approve with an id, as JSON.
    let approved = json_of(&agentrun(&app, &["approve", &run_id, &second, "-o", "json"]).await);
    assert_eq!(approved["resolved_now"], true);
    assert_eq!(approved["resolution"]["decision"], "accept");
    assert_eq!(approved["request"]["request_id"], second.as_str());
    assert_eq!(approved["request"]["status"], "resolved");

    // decline without an id answers the only open one left; then none is left.
    let declined = agentrun(&app, &["decline", &run_id]).await;
    assert_eq!(declined.code(), Some(0), "stderr:\n{}", declined.stderr);
    assert_eq!(
        declined.stdout,
        format!("request {first} resolved now: decline\n")
    );
    // Declining again, by id, as JSON: the first answer stands.
    let again = json_of(&agentrun(&app, &["decline", &run_id, &first, "-o", "json"]).await);
    assert_eq!(again["resolved_now"], false);
    assert_eq!(again["resolution"]["decision"], "decline");
    let none = agentrun(&app, &["approve", &run_id]).await;
    assert_eq!(none.code(), Some(2), "stdout:\n{}", none.stdout);
    assert!(
        none.stderr.contains("no open request to approve"),
        "{}",
        none.stderr
    );

    // send and cancel: the command, the run.
    let sent = json_of(&agentrun(&app, &["send", &run_id, "steer", "faster", "-o", "json"]).await);
    assert_eq!(sent["kind"], "steer");
    assert_eq!(sent["status"], "pending");
    assert_eq!(sent["payload"]["text"], "faster");
    assert!(sent["command_id"].is_string());
    let cancelled = json_of(&agentrun(&app, &["cancel", &pending, "-o", "json"]).await);
    assert_eq!(cancelled["run_id"], pending.as_str());
    assert_eq!(cancelled["status"], "cancelled");

    // stats and sessions: one document each.
    let stats = json_of(&agentrun(&app, &["stats", "-o", "json"]).await);
    assert!(stats["depths"].is_array(), "{stats}");
    assert!(stats["tenants"].is_array(), "{stats}");
    assert!(stats["runners"].is_array(), "{stats}");
    let sessions = json_of(&agentrun(&app, &["sessions", "-o", "json"]).await);
    assert!(sessions.is_array(), "{sessions}");

    // schedules: each action one document; list an array, jsonl one per line.
    let created = json_of(
        &agentrun(
            &app,
            &[
                "schedules",
                "create",
                "daily",
                "report",
                "--cron",
                "0 9 * * *",
                "--time-zone",
                "Europe/Berlin",
                "--overlap",
                "queue",
                "-o",
                "json",
            ],
        )
        .await,
    );
    let schedule_id = created["schedule_id"].as_str().expect("an id").to_owned();
    assert_eq!(created["name"], "daily");
    assert_eq!(created["cron"], "0 9 * * *");
    assert_eq!(created["time_zone"], "Europe/Berlin");
    assert_eq!(created["overlap_policy"], "queue");
    assert_eq!(created["catch_up_policy"], "one");
    assert_eq!(created["run_template"]["input"]["prompt"], "report");
    assert!(is_rfc3339(&created["next_run_at"]), "{created}");
    assert_eq!(created["last_run_at"], Value::Null);
    let listed = json_of(&agentrun(&app, &["schedules", "list", "-o", "json"]).await);
    assert_eq!(listed[0]["schedule_id"], schedule_id.as_str());
    let lines = lines_of(&agentrun(&app, &["schedules", "-o", "jsonl"]).await);
    assert_eq!(lines.len(), 1);
    let got = json_of(&agentrun(&app, &["schedules", "get", &schedule_id, "-o", "json"]).await);
    assert_eq!(got, created);
    let paused =
        json_of(&agentrun(&app, &["schedules", "pause", &schedule_id, "-o", "json"]).await);
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["next_run_at"], Value::Null);
    let resumed =
        json_of(&agentrun(&app, &["schedules", "resume", &schedule_id, "-o", "json"]).await);
    assert_eq!(resumed["paused"], false);
    let triggered =
        json_of(&agentrun(&app, &["schedules", "trigger", &schedule_id, "-o", "json"]).await);
    let scheduled_run = triggered["run_id"].as_str().expect("a run id").to_owned();
    let run = json_of(&agentrun(&app, &["get", &scheduled_run, "-o", "json"]).await);
    assert_eq!(run["schedule_id"], schedule_id.as_str());
    let deleted =
        json_of(&agentrun(&app, &["schedules", "delete", &schedule_id, "-o", "json"]).await);
    assert_eq!(deleted["deleted"], true);

    // events: an array of the stored events; jsonl one per line, the same ones.
    played.finish(&mut app).await;
    let events = json_of(&agentrun(&app, &["events", &run_id, "-o", "json"]).await);
    let events = events.as_array().expect("an array");
    assert_eq!(events[0]["type"], "run.created");
    assert_eq!(events[0]["seq"], 1);
    assert_eq!(events[0]["producer"], "manager");
    assert!(is_rfc3339(&events[0]["created_at"]), "{}", events[0]);
    let opened = events
        .iter()
        .find(|e| e["type"] == "request.opened")
        .expect("request.opened listed");
    assert_eq!(opened["payload"]["request_id"], first.as_str());
    let lines = lines_of(&agentrun(&app, &["events", &run_id, "-o", "jsonl"]).await);
    assert_eq!(lines.len(), events.len());
    // events --follow: one event per line to the end, or one array.
    let followed = lines_of(&agentrun(&app, &["events", &run_id, "--follow", "-o", "jsonl"]).await);
    assert_eq!(followed.len(), events.len());
    assert_eq!(followed.last().expect("events")["type"], "run.terminal");
    let followed = json_of(&agentrun(&app, &["events", &run_id, "--follow", "-o", "json"]).await);
    assert_eq!(followed.as_array().map(Vec::len), Some(events.len()));
}

#[tokio::test]
async fn run_answers_json_and_takes_durations_with_units() {
    let app = TestApp::spawn().await;
    let created = agentrun(
        &app,
        &[
            "run",
            "hello",
            "--queue-timeout",
            "10m",
            "--run-timeout",
            "1500",
            "-o",
            "json",
        ],
    )
    .await;
    let run = json_of(&created);
    assert_eq!(run["status"], "pending");
    assert_eq!(run["queue_timeout_ms"], 600_000);
    assert_eq!(run["run_timeout_ms"], 1_500);

    // Followed: one array of the events, ending with the run's end; the session
    // printed as its events too.
    let _runner = RunnerProcess::start(app.addr, "cli-json", &[]);
    let session_id = uuid::Uuid::new_v4().to_string();
    let followed = agentrun(
        &app,
        &[
            "run",
            "hi",
            "--session",
            &session_id,
            "--follow",
            "-o",
            "json",
        ],
    )
    .await;
    let events = json_of(&followed);
    let events = events.as_array().expect("an array");
    assert_eq!(events[0]["type"], "run.created");
    assert_eq!(events.last().expect("events")["type"], "run.terminal");
    assert_eq!(
        events.last().expect("events")["payload"]["status"],
        "completed"
    );
    let session = json_of(&agentrun(&app, &["session", &session_id, "-o", "json"]).await);
    assert_eq!(session.as_array().map(Vec::len), Some(events.len()));
    let lines = lines_of(&agentrun(&app, &["session", &session_id, "-o", "jsonl"]).await);
    assert_eq!(lines.len(), events.len());

    let bad = agentrun(&app, &["run", "hello", "--queue-timeout", "5x"]).await;
    assert_eq!(bad.code(), Some(2));
    assert!(
        bad.stderr.contains("--queue-timeout") && bad.stderr.contains("unknown unit"),
        "{}",
        bad.stderr
    );
}

#[tokio::test]
async fn client_options_go_before_or_after_the_command_and_not_on_dev() {
    let mut app = TestApp::spawn().await;
    let run_id = create(&mut app, "hello").await;
    let manager = format!("http://{}", app.addr);
    // The environment names a manager that is not there: the flag wins, in both places.
    for args in [
        vec!["--manager", manager.as_str(), "get", run_id.as_str()],
        vec!["get", run_id.as_str(), "--manager", manager.as_str()],
    ] {
        let mut command = agentrun_command(app.addr, &args);
        command.env("AGENTRUN_MANAGER_URL", format!("http://{}", free_addr()));
        let done = CliProcess::spawn(command).wait(COMMAND_TIMEOUT).await;
        assert_eq!(done.code(), Some(0), "{args:?}: {}", done.stderr);
    }

    let help = |args: &[&str]| {
        let out = Command::new(binary("agentrun"))
            .args(args)
            .output()
            .expect("agentrun runs");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).expect("UTF-8 help")
    };
    let dev = help(&["dev", "--help"]);
    for flag in ["--manager", "--api-key", "--tenant", "--tls-ca", "--output"] {
        assert!(!dev.contains(flag), "dev --help lists {flag}:\n{dev}");
    }
    assert!(help(&["list", "--help"]).contains("--manager"));
    assert!(help(&["keys", "list", "--help"]).contains("--api-key"));
    let refused = Command::new(binary("agentrun"))
        .args(["--manager", "http://127.0.0.1:1", "dev"])
        .output()
        .expect("agentrun runs");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--manager does nothing"), "{stderr}");
}

#[tokio::test]
async fn completion_scripts_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(binary("agentrun"))
            .args(["completion", shell])
            .output()
            .expect("agentrun runs");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).expect("UTF-8 script");
        for command in [
            "approve",
            "requests",
            "keys",
            "runners",
            "schedules",
            "webhooks",
            "completion",
        ] {
            assert!(script.contains(command), "{shell} script lacks {command}");
        }
    }
}

#[tokio::test]
async fn runners_lists_and_drains_a_runner() {
    let app = TestApp::spawn().await;
    let _runner = RunnerProcess::start(app.addr, "cli-drain", &[]);
    let listed = wait_for("the runner listed", LONG, || async {
        let done = agentrun(&app, &["runners", "-o", "json"]).await;
        let runners = json_of(&done);
        let runner = runners
            .as_array()?
            .iter()
            .find(|r| r["name"] == "cli-drain")?
            .clone();
        Some(runner)
    })
    .await;
    let runner_id = listed["runner_id"].as_str().expect("runner_id").to_owned();
    assert_eq!(listed["draining"], false);
    assert!(listed["replica_id"].is_string(), "{listed}");
    assert!(is_rfc3339(&listed["last_heartbeat_at"]), "{listed}");

    let table = agentrun(&app, &["runners"]).await;
    assert!(table.stdout.contains("cli-drain"), "{}", table.stdout);

    let drained = agentrun(&app, &["runners", "drain", &runner_id]).await;
    assert_eq!(drained.code(), Some(0), "stderr:\n{}", drained.stderr);
    assert_eq!(drained.stdout, format!("runner {runner_id} draining\n"));
    let again = json_of(&agentrun(&app, &["runners", "drain", &runner_id, "-o", "json"]).await);
    assert_eq!(again, json!({ "runner_id": runner_id, "found": true }));
    wait_for("the runner draining", LONG, || async {
        let runners = json_of(&agentrun(&app, &["runners", "list", "-o", "json"]).await);
        runners
            .as_array()?
            .iter()
            .any(|r| r["runner_id"] == runner_id.as_str() && r["draining"] == true)
            .then_some(())
    })
    .await;

    let nobody = uuid::Uuid::new_v4().to_string();
    let unknown = agentrun(&app, &["runners", "drain", &nobody]).await;
    assert_eq!(unknown.code(), Some(1));
    assert!(unknown.stderr.contains(&nobody), "{}", unknown.stderr);
}

/// Creates a key straight in the database, as `agentrun-manager keys create` does.
async fn key_in_database(app: &TestApp, tenant: &str, role: Role) -> String {
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    api_keys::create(&client, tenant, role, &[], "test", None)
        .await
        .expect("create key")
        .key
}

#[tokio::test]
async fn operator_commands_manage_keys_and_limits_with_an_admin_key() {
    let app = TestApp::spawn_with(|s| s.auth = AuthMode::Required).await;
    let admin = key_in_database(&app, "ops", Role::Admin).await;
    let client = key_in_database(&app, "acme", Role::Client).await;

    // A client key is refused, and the refusal says what is needed.
    let refused = agentrun(&app, &["--api-key", &client, "keys", "list"]).await;
    assert_eq!(refused.code(), Some(1));
    assert!(
        refused.stderr.contains("need an admin API key"),
        "{}",
        refused.stderr
    );
    let missing = agentrun(&app, &["runners"]).await;
    assert_eq!(missing.code(), Some(1));
    assert!(missing.stderr.contains("--api-key"), "{}", missing.stderr);

    // create (key on stdout), list, revoke: the key works until revoked.
    let created = agentrun(
        &app,
        &[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--role",
            "client",
            "--project",
            "web",
            "--name",
            "laptop",
            "--expires-in",
            "30d",
            "--api-key",
            &admin,
            "-o",
            "json",
        ],
    )
    .await;
    let created = json_of(&created);
    let new_key = created["key"].as_str().expect("the key").to_owned();
    assert!(new_key.starts_with("ark_"), "{created}");
    let key_id = created["api_key"]["key_id"]
        .as_str()
        .expect("key_id")
        .to_owned();
    assert_eq!(created["api_key"]["role"], "client");
    assert_eq!(created["api_key"]["project_ids"], json!(["web"]));
    assert!(is_rfc3339(&created["api_key"]["expires_at"]), "{created}");

    let works = agentrun(&app, &["list", "--api-key", &new_key]).await;
    assert_eq!(works.code(), Some(0), "stderr:\n{}", works.stderr);

    let listed = json_of(
        &agentrun(
            &app,
            &[
                "--api-key",
                &admin,
                "keys",
                "list",
                "--tenant",
                "acme",
                "-o",
                "json",
            ],
        )
        .await,
    );
    let listed = listed.as_array().expect("an array");
    let mine = listed
        .iter()
        .find(|k| k["key_id"] == key_id.as_str())
        .expect("the new key listed");
    assert_eq!(mine["name"], "laptop");
    assert_eq!(mine["revoked_at"], Value::Null);
    assert!(listed.iter().all(|k| k["tenant_id"] == "acme"));
    assert!(listed.iter().all(|k| k.get("key").is_none()), "no secrets");

    let revoked = json_of(
        &agentrun(
            &app,
            &["keys", "revoke", &key_id, "--api-key", &admin, "-o", "json"],
        )
        .await,
    );
    assert!(is_rfc3339(&revoked["revoked_at"]), "{revoked}");
    wait_for("the revoked key refused", LONG, || async {
        let done = agentrun(&app, &["list", "--api-key", &new_key]).await;
        (done.code() == Some(1)).then_some(())
    })
    .await;

    // limits set: stored for the tenant.
    let set = agentrun(
        &app,
        &[
            "limits",
            "set",
            "--tenant",
            "acme",
            "--max-active-runs",
            "3",
            "--event-retention",
            "7d",
            "--api-key",
            &admin,
        ],
    )
    .await;
    assert_eq!(set.code(), Some(0), "stderr:\n{}", set.stderr);
    assert_eq!(
        set.stdout,
        "tenant acme: at most 3 active runs\ntenant acme: deltas of ended runs compacted after 7d\n"
    );
    let db = app.db().await;
    let row = db
        .query_one(
            "SELECT max_active_runs, event_retention_ms FROM tenant_limits WHERE tenant_id = 'acme'",
            &[],
        )
        .await
        .expect("acme's limits");
    assert_eq!(row.get::<_, Option<i32>>(0), Some(3));
    assert_eq!(row.get::<_, Option<i64>>(1), Some(7 * 86_400_000));
    let bad = agentrun(
        &app,
        &["limits", "set", "--tenant", "acme", "--api-key", &admin],
    )
    .await;
    assert_eq!(bad.code(), Some(2), "a limit to set is required");
    let unset = agentrun(
        &app,
        &[
            "limits",
            "set",
            "--tenant",
            "acme",
            "--max-active-runs",
            "0",
            "--event-retention",
            "default",
            "--api-key",
            &admin,
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(
        json_of(&unset),
        json!({ "tenant_id": "acme", "max_active_runs": 0, "event_retention_ms": null })
    );
}

#[tokio::test]
async fn flow_limit_commands_set_and_list_rate_and_concurrency_limits_as_json() {
    let app = TestApp::spawn().await;
    let set = agentrun(
        &app,
        &[
            "limits", "rate", "set", "--tenant", "default", "--scope", "queue", "--key", "slow",
            "--runs", "1", "--period", "1h", "-o", "json",
        ],
    )
    .await;
    assert_eq!(
        json_of(&set),
        json!({
            "tenant_id": "default", "scope": "queue", "key": "slow", "runs": 1,
            "period_ms": 3_600_000, "burst": 1, "tokens": 1.0, "waiting_runs": 0,
        })
    );
    let listed = agentrun(&app, &["limits", "rate", "list", "-o", "json"]).await;
    assert_eq!(json_of(&listed)[0]["key"], "slow");
    let text = agentrun(&app, &["limits", "rate", "list"]).await;
    assert_eq!(
        text.stdout,
        "tenant default queue slow: 1 runs per 1h, burst 1, 1.0 tokens, 0 waiting\n"
    );
    let bad = agentrun(
        &app,
        &[
            "limits", "rate", "set", "--tenant", "default", "--scope", "queue", "--runs", "5",
        ],
    )
    .await;
    assert_eq!(bad.code(), Some(1), "a queue scope needs its key");
    assert!(bad.stderr.contains("rate_limit.key"), "{}", bad.stderr);

    let set = agentrun(
        &app,
        &[
            "limits",
            "concurrency",
            "set",
            "--tenant",
            "default",
            "--key",
            "user-7",
            "--max-active",
            "2",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(
        json_of(&set),
        json!({ "tenant_id": "default", "concurrency_key": "user-7", "max_active": 2 })
    );
    for prompt in ["one", "two", "three"] {
        let created = agentrun(
            &app,
            &["run", prompt, "--concurrency-key", "user-7", "-o", "json"],
        )
        .await;
        assert_eq!(json_of(&created)["concurrency_key"], "user-7");
    }
    let listed = agentrun(&app, &["limits", "concurrency", "list", "-o", "json"]).await;
    assert_eq!(
        json_of(&listed),
        json!([{ "tenant_id": "default", "concurrency_key": "user-7", "max_active": 2,
                 "active_runs": 0, "waiting_runs": 1 }])
    );
    let stats = agentrun(&app, &["stats", "-o", "json"]).await;
    assert_eq!(
        json_of(&stats)["waiting"],
        json!([{ "tenant_id": "default", "queue": "default", "reason": "concurrency_key",
                 "runs": 1 }])
    );
    let runs = agentrun(&app, &["list", "-o", "json"]).await;
    let reasons: Vec<Value> = json_of(&runs)
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| r["waiting_reason"].clone())
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "concurrency_key").count(),
        1
    );
}

/// Answers every HTTP request with 204 (reads the request head and body first).
async fn accepting_receiver() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = socket.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..at]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if buf.len() >= at + 4 + length {
                        break;
                    }
                }
                let _ = socket
                    .write_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")
                    .await;
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn webhooks_commands_answer_json() {
    let mut app = TestApp::spawn().await;
    let receiver = accepting_receiver().await;
    let url = format!("http://{receiver}/hook");

    // create: the webhook and its secret, shown once.
    let created = json_of(
        &agentrun(
            &app,
            &[
                "webhooks",
                "create",
                "--url",
                &url,
                "--event",
                "run.created",
                "--event",
                "run.terminal",
                "-o",
                "json",
            ],
        )
        .await,
    );
    let hook = &created["webhook"];
    let webhook_id = hook["webhook_id"].as_str().expect("an id").to_owned();
    assert_eq!(hook["url"], url.as_str());
    assert_eq!(hook["event_types"], json!(["run.created", "run.terminal"]));
    assert_eq!(hook["project_id"], "");
    assert!(is_rfc3339(&hook["created_at"]), "{hook}");
    assert!(
        created["secret"].as_str().is_some_and(|s| s.len() >= 64),
        "{created}"
    );

    // list: an array without secrets; jsonl: one per line; text: a table.
    let listed = json_of(&agentrun(&app, &["webhooks", "list", "-o", "json"]).await);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["webhook_id"], webhook_id.as_str());
    assert!(listed[0].get("secret").is_none());
    let lines = lines_of(&agentrun(&app, &["-o", "jsonl", "webhooks"]).await);
    assert_eq!(lines.len(), 1);
    let text = agentrun(&app, &["webhooks", "list"]).await;
    assert!(text.stdout.contains(&webhook_id), "{}", text.stdout);

    // deliveries: the run's run.created, delivered.
    let run_id = create(&mut app, "notify me").await;
    let delivered = wait_for("the delivery shown delivered", LONG, || async {
        let shown =
            json_of(&agentrun(&app, &["webhooks", "deliveries", &webhook_id, "-o", "json"]).await);
        (shown[0]["status"] == "delivered").then_some(shown)
    })
    .await;
    let delivery = &delivered[0];
    assert_eq!(delivered.as_array().map(Vec::len), Some(1), "{delivered}");
    assert_eq!(delivery["webhook_id"], webhook_id.as_str());
    assert_eq!(delivery["run_id"], run_id.as_str());
    assert_eq!(delivery["seq"], 1);
    assert_eq!(delivery["event_type"], "run.created");
    assert_eq!(delivery["attempts"], 1);
    assert_eq!(delivery["last_status_code"], 204);
    assert_eq!(delivery["last_error"], "");
    assert!(is_rfc3339(&delivery["delivered_at"]), "{delivery}");
    assert_eq!(delivery["next_attempt_at"], Value::Null);
    assert!(delivery["delivery_id"].as_str().is_some());

    // Bad input: a usage error naming the field.
    let refused = agentrun(
        &app,
        &[
            "webhooks",
            "create",
            "--url",
            "ftp://x",
            "--event",
            "run.terminal",
        ],
    )
    .await;
    assert_ne!(refused.code(), Some(0));
    assert!(refused.stderr.contains("url"), "{}", refused.stderr);

    // delete, then the list is empty.
    let deleted =
        json_of(&agentrun(&app, &["webhooks", "delete", &webhook_id, "-o", "json"]).await);
    assert_eq!(
        deleted,
        json!({ "webhook_id": webhook_id, "deleted": true })
    );
    let listed = json_of(&agentrun(&app, &["webhooks", "-o", "json"]).await);
    assert_eq!(listed, json!([]));
}
