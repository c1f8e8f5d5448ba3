//! Bad input, by property: malformed input gets a clear error and changes nothing
//! (DESIGN.md §4, invariant 9).
//!
//! Each test starts one in-process manager on a fresh database, seeds it with a little of
//! everything (runs pending and held, a session, commands, events, an open request, a
//! runner, an API key, a tenant limit), and then lets proptest generate requests for every
//! unary RPC of RunService, SessionService, RunnerService and AdminService (and the opening
//! call of the streaming ones) in which at least one field is malformed. Every such request
//! must be refused with INVALID_ARGUMENT whose message names a field that really was
//! malformed, and the database must be exactly what it was: every table's rows are hashed
//! before and after.
//!
//! A second property drives random operation sequences through the API (create, cancel,
//! send commands, claim, append, finish, resolve, with current, stale and foreign lease
//! epochs) and checks each run status change against `RunStatus::can_transition`, that a
//! terminal run never changes, and that an operation refused with an error changed nothing.
//!
//! proptest drives synchronous closures, so each test owns a tokio runtime and blocks on
//! it per case; case counts are kept modest so the file runs in seconds.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::time::{SystemTime, UNIX_EPOCH};

use agentrun_shared::events::EventType;
use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::runner_service_client::RunnerServiceClient;
use agentrun_shared::proto::session_service_client::SessionServiceClient;
use agentrun_shared::proto::{self, CommandKind};
use agentrun_shared::state::RunStatus;
use agentrun_tests::*;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestCaseResult, TestRunner};
use serde_json::json;
use tokio::runtime::Runtime;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};
use uuid::Uuid;

/// Payload limit of the test manager: small, so oversize payloads are cheap to send.
const MAX_PAYLOAD: usize = 1024;
/// Event batch limit of the test manager.
const MAX_BATCH: usize = 10;
/// Cases per RPC property.
const CASES: u32 = 32;

// ---------------------------------------------------------------------------------------
// Harness: one manager, its clients, seeded rows and a digest of the whole database
// ---------------------------------------------------------------------------------------

#[derive(Clone)]
struct Clients {
    runs: RunServiceClient<Channel>,
    runners: RunnerServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    sessions: SessionServiceClient<Channel>,
}

/// Ids of the rows the seed created, so generated requests can aim at real objects.
#[derive(Clone, Debug)]
struct Seed {
    runs: Vec<String>,
    session: String,
    runner: proto::RunnerIdentity,
    epoch: i64,
    commands: Vec<String>,
    request: String,
}

/// Row count and hash of every table's rows.
type Digest = Vec<(String, i64, String)>;

struct Harness {
    _app: TestApp,
    clients: Clients,
    db: tokio_postgres::Client,
    digest_sql: String,
    seed: Seed,
    // Last: dropped after the app and clients that run on it.
    rt: Runtime,
}

impl Harness {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (app, clients, db, digest_sql, seed) = rt.block_on(async {
            let mut app = TestApp::spawn_with(|s| {
                s.max_payload_bytes = MAX_PAYLOAD;
                s.max_batch_events = MAX_BATCH;
                // Nothing may change on its own while a property runs.
                s.lease_ttl_ms = 600_000;
            })
            .await;
            let clients = Clients {
                runs: app.runs.clone(),
                runners: app.runners.clone(),
                admin: app.admin.clone(),
                sessions: SessionServiceClient::new(connect(app.addr).await),
            };
            let seed = seed(&mut app, clients.clone()).await;
            let db = app.db().await;
            let tables: Vec<String> = db
                .query(
                    "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
                    &[],
                )
                .await
                .expect("list tables")
                .iter()
                .map(|r| r.get(0))
                .collect();
            assert!(tables.iter().any(|t| t == "runs"), "{tables:?}");
            let digest_sql = tables
                .iter()
                .map(|t| {
                    format!(
                        "SELECT '{t}'::text, count(*), \
                         md5(coalesce(string_agg(x::text, '|' ORDER BY x::text), '')) \
                         FROM \"{t}\" x"
                    )
                })
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            (app, clients, db, digest_sql, seed)
        });
        Self {
            _app: app,
            clients,
            db,
            digest_sql,
            seed,
            rt,
        }
    }

    async fn digest(&self) -> Digest {
        self.db
            .query(&self.digest_sql, &[])
            .await
            .expect("digest the database")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    }

    /// Runs `cases` generated malformed requests through `call`; each must be refused with
    /// INVALID_ARGUMENT naming one of its malformed fields, and leave the database as it was.
    fn refuses<R, S, F>(&self, rpc: &str, cases: u32, strategy: S, call: F)
    where
        R: Debug + Clone,
        S: Strategy<Value = Bad<R>>,
        F: AsyncFn(Clients, R) -> Result<(), Status>,
    {
        let baseline = self.rt.block_on(self.digest());
        let mut runner = TestRunner::new(Config {
            cases,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |bad| {
            self.rt.block_on(async {
                let outcome = call(self.clients.clone(), bad.request.clone()).await;
                let after = self.digest().await;
                check_refused(&outcome, &bad.fields)?;
                check_unchanged(&baseline, &after)
            })
        });
        if let Err(err) = result {
            panic!("{rpc}: {err}");
        }
    }
}

/// What a seeded manager holds: a pending run in a session (queue `idle`, never claimed),
/// a run held by a runner with events, commands and an open request, an API key and a
/// tenant limit.
async fn seed(app: &mut TestApp, mut c: Clients) -> Seed {
    let session = Uuid::new_v4().to_string();
    let mut idle = run_request("seeded, never claimed");
    idle.session_id = session.clone();
    idle.queue = "idle".into();
    let idle = c
        .runs
        .create_run(idle)
        .await
        .expect("seed a run")
        .into_inner();
    let held = c
        .runs
        .create_run(run_request("seeded and held"))
        .await
        .expect("seed a run")
        .into_inner();
    let runner = runner("seed-runner");
    let a = claim(app, &runner, 1).await.remove(0);
    let request = Uuid::new_v4().to_string();
    let events = vec![
        runner_event(1, "turn.started", json!({"turn_id": "seed-turn"})),
        runner_event(
            2,
            "content.delta",
            json!({"kind": "assistant_text", "delta": "hi"}),
        ),
        runner_event(
            3,
            "request.opened",
            json!({"request_id": request, "kind": "tool", "detail": {"tool": "ls"}}),
        ),
    ];
    c.runners
        .append_events(append(&runner, &a, events))
        .await
        .expect("seed events");
    let mut commands = Vec::new();
    for run in [&idle, &held] {
        let sent = c
            .runs
            .send_command(proto::SendCommandRequest {
                run_id: run.run.as_ref().expect("run").run_id.clone(),
                kind: CommandKind::Turn as i32,
                payload_json: json!({"prompt": "next"}).to_string(),
                ..Default::default()
            })
            .await
            .expect("seed a command")
            .into_inner();
        commands.push(sent.command.expect("command").command_id);
    }
    c.admin
        .create_api_key(proto::CreateApiKeyRequest {
            tenant_id: "default".into(),
            role: proto::ApiKeyRole::Client as i32,
            project_ids: vec![],
            name: "seed".into(),
            expires_at: None,
        })
        .await
        .expect("seed an API key");
    c.admin
        .set_tenant_limit(proto::SetTenantLimitRequest {
            tenant_id: "seeded-tenant".into(),
            max_active_runs: 5,
        })
        .await
        .expect("seed a tenant limit");
    Seed {
        runs: [idle, held]
            .iter()
            .map(|r| r.run.as_ref().expect("run").run_id.clone())
            .collect(),
        session,
        runner,
        epoch: a.epoch,
        commands,
        request,
    }
}

fn runner_event(
    runner_seq: i64,
    event_type: &str,
    payload: serde_json::Value,
) -> proto::RunnerEvent {
    proto::RunnerEvent {
        runner_seq,
        r#type: event_type.into(),
        payload_json: payload.to_string(),
    }
}

/// The field an INVALID_ARGUMENT message names (`invalid <field>: <reason>`).
fn named_field(message: &str) -> Option<&str> {
    message
        .strip_prefix("invalid ")?
        .split_once(": ")
        .map(|(field, _)| field)
}

/// `named` is `bad` or a part of it (`input_json.prompt`, `labels[2]`).
fn names(named: &str, bad: &str) -> bool {
    named == bad
        || named
            .strip_prefix(bad)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

fn check_refused(outcome: &Result<(), Status>, bad: &[String]) -> TestCaseResult {
    let status = match outcome {
        Ok(()) => {
            return Err(TestCaseError::fail(format!(
                "accepted a request with malformed {bad:?}"
            )));
        }
        Err(status) => status,
    };
    prop_assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "malformed {:?}: {}",
        bad,
        status.message()
    );
    let named = named_field(status.message());
    prop_assert!(
        named.is_some_and(|n| bad.iter().any(|b| names(n, b))),
        "message {:?} names none of the malformed fields {:?}",
        status.message(),
        bad
    );
    Ok(())
}

fn check_unchanged(before: &Digest, after: &Digest) -> TestCaseResult {
    if before != after {
        let changed: Vec<&str> = before
            .iter()
            .zip(after)
            .filter(|(b, a)| b != a)
            .map(|(b, _)| b.0.as_str())
            .collect();
        return Err(TestCaseError::fail(format!(
            "the database changed (tables {changed:?}; before {before:?}, after {after:?})"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Field strategies: each yields a value and, when it is malformed, the field it breaks
// ---------------------------------------------------------------------------------------

/// A generated request and the fields in it that are malformed (never empty).
#[derive(Debug, Clone)]
struct Bad<R> {
    request: R,
    fields: Vec<String>,
}

type Field<T> = BoxedStrategy<(T, Option<String>)>;

/// Mostly `good`, sometimes `bad` (marked as breaking `field`).
fn field<T: Debug + Clone + 'static>(
    name: &str,
    good: impl Strategy<Value = T> + 'static,
    bad: impl Strategy<Value = T> + 'static,
) -> Field<T> {
    let name = name.to_owned();
    prop_oneof![
        3 => good.prop_map(|v| (v, None)),
        1 => bad.prop_map(move |v| (v, Some(name.clone()))),
    ]
    .boxed()
}

/// Always malformed.
fn always_bad<T: Debug + Clone + 'static>(
    name: &str,
    bad: impl Strategy<Value = T> + 'static,
) -> Field<T> {
    let name = name.to_owned();
    bad.prop_map(move |v| (v, Some(name.clone()))).boxed()
}

/// The malformed fields among `parts`.
fn collect(parts: &[&Option<String>]) -> Vec<String> {
    parts.iter().filter_map(|p| (*p).clone()).collect()
}

/// Keeps only requests with at least one malformed field.
fn some_bad<R: Debug + Clone>(s: impl Strategy<Value = Bad<R>>) -> impl Strategy<Value = Bad<R>> {
    s.prop_filter("at least one malformed field", |b| !b.fields.is_empty())
}

fn good_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9][a-z0-9_.:/-]{0,24}",
        1 => "[a-zé日😀]{1,8}",
        1 => "[a-z]{128}",
    ]
}

/// Not a name: too long (in bytes), or with whitespace or a control character.
fn bad_name() -> impl Strategy<Value = String> {
    let odd = select(vec![
        ' ', '\t', '\n', '\r', '\0', '\x07', '\x7f', '\u{85}', '\u{a0}', '\u{2028}', '\u{3000}',
    ]);
    prop_oneof![
        "[a-z]{129,200}",
        "[😀]{33,40}",
        ("[a-z]{0,6}", odd, "[a-z]{0,6}").prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ]
}

/// A required name.
fn name_field(name: &str) -> Field<String> {
    field(
        name,
        good_name(),
        prop_oneof![Just(String::new()), bad_name()],
    )
}

/// A name that may be empty (a default, or "not given").
fn optional_name_field(name: &str) -> Field<String> {
    field(
        name,
        prop_oneof![Just(String::new()), good_name()],
        bad_name(),
    )
}

/// A list of names; the first malformed one is `name[i]`.
fn names_field(name: &str, max: usize) -> Field<Vec<String>> {
    let name = name.to_owned();
    vec(
        prop_oneof![
            4 => good_name().prop_map(|n| (n, false)),
            1 => prop_oneof![Just(String::new()), bad_name()].prop_map(|n| (n, true)),
        ],
        0..=max,
    )
    .prop_map(move |items| {
        let bad = items
            .iter()
            .position(|(_, bad)| *bad)
            .map(|i| format!("{name}[{i}]"));
        (items.into_iter().map(|(n, _)| n).collect(), bad)
    })
    .boxed()
}

fn random_uuid() -> impl Strategy<Value = String> {
    any::<u128>().prop_map(|n| Uuid::from_u128(n).to_string())
}

/// A UUID of an existing object, or of none.
fn good_uuid(existing: Vec<String>) -> BoxedStrategy<String> {
    if existing.is_empty() {
        random_uuid().boxed()
    } else {
        prop_oneof![select(existing), random_uuid()].boxed()
    }
}

/// Not a UUID (and not empty).
fn bad_uuid() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("not-a-uuid".to_owned()),
        Just("123".to_owned()),
        "[0-9a-z-]{1,40}",
        ".{1,12}",
        // One character of a valid id replaced, or one added.
        (random_uuid(), 0..36usize).prop_map(|(id, at)| {
            let mut chars: Vec<char> = id.chars().collect();
            chars[at] = 'g';
            chars.into_iter().collect()
        }),
        random_uuid().prop_map(|id| format!("{id}0")),
        random_uuid().prop_map(|id| format!(" {id}")),
    ]
    .prop_filter("not a UUID", |s| {
        !s.is_empty() && Uuid::try_parse(s).is_err()
    })
}

fn uuid_field(name: &str, existing: Vec<String>) -> Field<String> {
    field(
        name,
        good_uuid(existing),
        prop_oneof![Just(String::new()), bad_uuid()],
    )
}

fn optional_uuid_field(name: &str, existing: Vec<String>) -> Field<String> {
    field(
        name,
        prop_oneof![Just(String::new()), good_uuid(existing)],
        bad_uuid(),
    )
}

/// Always a malformed UUID: empty or not one.
fn bad_uuid_field(name: &str) -> Field<String> {
    always_bad(name, prop_oneof![Just(String::new()), bad_uuid()])
}

/// Text that is not a JSON object within the limit.
fn bad_json() -> impl Strategy<Value = String> {
    prop_oneof![
        select(vec![
            "[]",
            "[1, 2]",
            "42",
            "\"text\"",
            "null",
            "true",
            "{",
            "{\"a\":}",
            "nope",
            "{\"a\": 1,}",
            "{'a': 1}",
            "{\"a\": 1} {}",
            "\u{feff}{}",
        ])
        .prop_map(str::to_owned),
        // Over the limit, whatever it holds.
        (MAX_PAYLOAD - 10..MAX_PAYLOAD + 200)
            .prop_map(|n| json!({ "pad": "x".repeat(n) }).to_string()),
        // Nested past the parser's recursion limit.
        (129..400usize).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
    ]
    .prop_filter("really malformed", |s| {
        s.len() > MAX_PAYLOAD
            || !serde_json::from_str::<serde_json::Value>(s).is_ok_and(|v| v.is_object())
    })
}

/// A JSON object within the limit, or nothing.
fn good_json() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" \n".to_owned()),
        Just("{}".to_owned()),
        "[a-z ]{0,20}".prop_map(|v| json!({ "note": v, "n": [1, 2.5, null] }).to_string()),
    ]
}

fn json_field(name: &str) -> Field<String> {
    field(name, good_json(), bad_json())
}

/// An i32 in `min..=max`, where zero means the default.
fn bounded_field(name: &str, min: i32, max: i32) -> Field<i32> {
    field(
        name,
        prop_oneof![Just(0), min..=max],
        any::<i32>().prop_filter("out of range", move |v| *v != 0 && !(min..=max).contains(v)),
    )
}

/// A non-negative i64 (a cursor, a timeout).
fn non_negative_field(name: &str) -> Field<i64> {
    field(
        name,
        prop_oneof![Just(0), 1..=86_400_000i64],
        prop_oneof![Just(-1), Just(i64::MIN), i64::MIN..0],
    )
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

fn scheduled_at_field() -> Field<Option<prost_types::Timestamp>> {
    let now = now_secs();
    field(
        "scheduled_at",
        prop_oneof![
            Just(None),
            (now - 86_400..now + 86_400, 0..1_000_000_000i32)
                .prop_map(|(seconds, nanos)| Some(prost_types::Timestamp { seconds, nanos })),
        ],
        prop_oneof![
            // Before year 1, more than a year ahead, beyond any clock.
            (i64::MIN..-62_135_596_800)
                .prop_map(|seconds| Some(prost_types::Timestamp { seconds, nanos: 0 })),
            (now + 2 * 366 * 86_400..i64::MAX)
                .prop_map(|seconds| Some(prost_types::Timestamp { seconds, nanos: 0 })),
        ],
    )
}

// ---------------------------------------------------------------------------------------
// RunService
// ---------------------------------------------------------------------------------------

/// A CreateRunRequest with each field good or malformed.
fn create_run_request(seed: &Seed) -> impl Strategy<Value = Bad<proto::CreateRunRequest>> + use<> {
    let input = field(
        "input_json",
        prop_oneof![
            good_json(),
            " {0,2}[a-z][a-z ]{0,20}".prop_map(|p| json!({ "prompt": p }).to_string()),
        ],
        bad_json(),
    );
    // A prompt that is not a string, or is blank, is named as such.
    let input = prop_oneof![
        4 => input,
        1 => always_bad(
            "input_json.prompt",
            select(vec!["42", "null", "[\"a\"]", "{\"text\": \"a\"}", "true", "\"\"", "\" \\n\\t \""])
                .prop_map(|p| format!("{{\"prompt\": {p}}}")),
        ),
    ];
    let first = (
        optional_name_field("project_id"),
        optional_uuid_field("session_id", vec![seed.session.clone()]),
        name_field("backend_profile"),
        input,
        optional_name_field("queue"),
        bounded_field("priority", -1000, 1000),
        names_field("labels", 3),
    );
    let second = (
        bounded_field("max_attempts", 1, 100),
        non_negative_field("queue_timeout_ms"),
        non_negative_field("run_timeout_ms"),
        json_field("metadata_json"),
        optional_name_field("idempotency_key"),
        scheduled_at_field(),
        // An enum: 0 (deltas) to 3 are known.
        bounded_field("stream_mode", 0, 3),
    );
    (first, second).prop_map(
        |(
            (project, session, profile, input, queue, priority, labels),
            (attempts, queue_timeout, run_timeout, metadata, key, scheduled_at, stream_mode),
        )| Bad {
            fields: collect(&[
                &project.1,
                &session.1,
                &profile.1,
                &input.1,
                &queue.1,
                &priority.1,
                &labels.1,
                &attempts.1,
                &queue_timeout.1,
                &run_timeout.1,
                &metadata.1,
                &key.1,
                &scheduled_at.1,
                &stream_mode.1,
            ]),
            request: proto::CreateRunRequest {
                project_id: project.0,
                session_id: session.0,
                backend_profile: profile.0,
                input_json: input.0,
                queue: queue.0,
                priority: priority.0,
                labels: labels.0,
                max_attempts: attempts.0,
                queue_timeout_ms: queue_timeout.0,
                run_timeout_ms: run_timeout.0,
                metadata_json: metadata.0,
                idempotency_key: key.0,
                scheduled_at: scheduled_at.0,
                stream_mode: stream_mode.0,
                ..Default::default()
            },
        },
    )
}

fn create_runs_request(
    seed: &Seed,
) -> impl Strategy<Value = Bad<proto::CreateRunsRequest>> + use<> {
    let one = create_run_request(seed);
    let good_one = Just(Bad {
        request: run_request("fine"),
        fields: vec![],
    });
    // No runs, or too many.
    let count = |n: usize| Bad {
        request: proto::CreateRunsRequest {
            runs: vec![run_request("x"); n],
        },
        fields: vec!["runs".into()],
    };
    prop_oneof![
        1 => Just(count(0)),
        1 => Just(count(1001)),
        // Good runs around malformed ones: the first malformed one is named.
        6 => vec(prop_oneof![good_one, one], 1..5).prop_map(|runs| {
            let first_bad = runs.iter().position(|r| !r.fields.is_empty());
            Bad {
                fields: first_bad
                    .map(|i| runs[i].fields.iter().map(|f| format!("runs[{i}].{f}")).collect())
                    .unwrap_or_default(),
                request: proto::CreateRunsRequest {
                    runs: runs.into_iter().map(|r| r.request).collect(),
                },
            }
        }),
    ]
}

fn list_runs_request(seed: &Seed) -> impl Strategy<Value = Bad<proto::ListRunsRequest>> + use<> {
    let statuses = vec(
        prop_oneof![
            4 => (1..=9i32).prop_map(|s| (s, false)),
            1 => any::<i32>()
                .prop_filter("unknown", |s| !(1..=9).contains(s))
                .prop_map(|s| (s, true)),
        ],
        0..4,
    )
    .prop_map(|items| {
        let bad = items
            .iter()
            .position(|(_, b)| *b)
            .map(|i| format!("statuses[{i}]"));
        (items.into_iter().map(|(s, _)| s).collect::<Vec<_>>(), bad)
    });
    (
        statuses,
        optional_name_field("queue"),
        optional_uuid_field("session_id", vec![seed.session.clone()]),
        optional_name_field("project_id"),
        optional_uuid_field("page_token", seed.runs.clone()),
        bounded_field("page_size", 1, 500),
    )
        .prop_map(|(statuses, queue, session, project, token, size)| Bad {
            fields: collect(&[
                &statuses.1,
                &queue.1,
                &session.1,
                &project.1,
                &token.1,
                &size.1,
            ]),
            request: proto::ListRunsRequest {
                statuses: statuses.0,
                queue: queue.0,
                session_id: session.0,
                project_id: project.0,
                page_token: token.0,
                page_size: size.0,
                ..Default::default()
            },
        })
}

/// A SendCommand body: kind, payload, expected turn, delivery policy, and the field it
/// breaks (at most one, so the rest stays valid).
type Body = (i32, String, String, i32, Option<String>);

fn body(kind: i32, payload: &str, expected: &str, policy: i32, bad: Option<&str>) -> Body {
    (
        kind,
        payload.to_owned(),
        expected.to_owned(),
        policy,
        bad.map(str::to_owned),
    )
}

fn command_body() -> impl Strategy<Value = Body> {
    const TURN: i32 = CommandKind::Turn as i32;
    const STEER: i32 = CommandKind::Steer as i32;
    const INTERRUPT: i32 = CommandKind::Interrupt as i32;
    const CANCEL: i32 = CommandKind::Cancel as i32;
    const STEER_POLICY: i32 = proto::TurnDeliveryPolicy::Steer as i32;
    const PROMPT: &str = r#"{"prompt": "go on"}"#;
    const TEXT: &str = r#"{"text": "and this"}"#;
    let no_prompt = select(vec![
        "{}",
        r#"{"prompt": ""}"#,
        r#"{"prompt": " \t\n "}"#,
        r#"{"prompt": 7}"#,
        r#"{"text": "x"}"#,
    ]);
    let no_text = select(vec![
        "{}",
        r#"{"text": ""}"#,
        r#"{"text": "   "}"#,
        r#"{"text": [1]}"#,
        r#"{"prompt": "x"}"#,
    ]);
    let unknown_kind = prop_oneof![
        any::<i32>().prop_filter("unknown", |k| !(1..=6).contains(k)),
        // Resolve is answered through ResolveRequest.
        Just(CommandKind::Resolve as i32),
    ];
    let unknown_policy = any::<i32>().prop_filter("unknown", |p| !(0..=4).contains(p));
    prop_oneof![
        // Valid bodies.
        3 => prop_oneof![
            (0..=4i32).prop_map(|p| body(TURN, PROMPT, "", p, None)),
            random_uuid().prop_map(|t| body(STEER, TEXT, &t, 0, None)),
            random_uuid().prop_map(|t| body(TURN, PROMPT, &t, STEER_POLICY, None)),
            Just(body(INTERRUPT, "", "", 0, None)),
            Just(body(CANCEL, "{}", "", 0, None)),
        ],
        1 => unknown_kind.prop_map(|k| body(k, PROMPT, "", 0, Some("kind"))),
        // A payload that is no JSON object.
        1 => (select(vec![TURN, STEER, INTERRUPT, CANCEL]), bad_json())
            .prop_map(|(k, p)| body(k, &p, "", 0, Some("payload_json"))),
        // A turn without a usable prompt, a steer without text.
        1 => no_prompt.prop_map(|p| body(TURN, p, "", 0, Some("payload_json.prompt"))),
        1 => no_text.prop_map(|p| body(STEER, p, "", 0, Some("payload_json.text"))),
        // expected_turn_id where it means nothing, or not an id.
        1 => (random_uuid(), select(vec![(TURN, 0), (TURN, 1), (TURN, 2), (CANCEL, 0)]))
            .prop_map(|(t, (k, p))| {
                let payload = if k == TURN { PROMPT } else { "" };
                body(k, payload, &t, p, Some("expected_turn_id"))
            }),
        1 => bad_uuid().prop_map(|t| body(STEER, TEXT, &t, 0, Some("expected_turn_id"))),
        // A delivery policy on a command that is not a turn, or an unknown one.
        1 => (1..=4i32).prop_map(|p| body(STEER, TEXT, "", p, Some("delivery_policy"))),
        1 => unknown_policy.prop_map(|p| body(TURN, PROMPT, "", p, Some("delivery_policy"))),
    ]
}

fn send_command_request(
    seed: &Seed,
) -> impl Strategy<Value = Bad<proto::SendCommandRequest>> + use<> {
    (
        uuid_field("run_id", seed.runs.clone()),
        command_body(),
        optional_name_field("idempotency_key"),
    )
        .prop_map(
            |(run, (kind, payload, expected, policy, body_bad), key)| Bad {
                fields: collect(&[&run.1, &body_bad, &key.1]),
                request: proto::SendCommandRequest {
                    run_id: run.0,
                    kind,
                    payload_json: payload,
                    delivery_policy: policy,
                    idempotency_key: key.0,
                    expected_turn_id: expected,
                },
            },
        )
}

fn cursor_request<R: Debug + Clone>(
    seed: &Seed,
    limit_max: i32,
    make: fn(String, i64, i32) -> R,
) -> impl Strategy<Value = Bad<R>> + use<R> {
    (
        uuid_field("run_id", seed.runs.clone()),
        non_negative_field("after_seq"),
        bounded_field("limit", 1, limit_max),
    )
        .prop_map(move |(run, after, limit)| Bad {
            fields: collect(&[&run.1, &after.1, &limit.1]),
            request: make(run.0, after.0, limit.0),
        })
}

fn resolve_request(
    seed: &Seed,
) -> impl Strategy<Value = Bad<proto::ResolveRequestRequest>> + use<> {
    let decision = field(
        "decision",
        select(vec!["accept", "accept_for_session", "decline", "cancel"]).prop_map(str::to_owned),
        prop_oneof![
            select(vec!["", "expired", "Accept", "accept ", "yes", "approve"])
                .prop_map(str::to_owned),
            ".{1,12}".prop_filter("not a decision", |d| {
                !["accept", "accept_for_session", "decline", "cancel"].contains(&d.as_str())
            }),
        ],
    );
    (
        uuid_field("run_id", seed.runs.clone()),
        uuid_field("request_id", vec![seed.request.clone()]),
        decision,
        json_field("answers_json"),
    )
        .prop_map(|(run, request, decision, answers)| Bad {
            fields: collect(&[&run.1, &request.1, &decision.1, &answers.1]),
            request: proto::ResolveRequestRequest {
                run_id: run.0,
                request_id: request.0,
                decision: decision.0,
                answers_json: answers.0,
                ..Default::default()
            },
        })
}

#[test]
fn run_service_refuses_malformed_requests_and_changes_nothing() {
    let h = Harness::start();
    let seed = h.seed.clone();

    h.refuses(
        "CreateRun",
        CASES * 2,
        some_bad(create_run_request(&seed)),
        async |mut c, r| c.runs.create_run(r).await.map(drop),
    );
    h.refuses(
        "CreateRuns",
        CASES,
        some_bad(create_runs_request(&seed)),
        async |mut c, r| c.runs.create_runs(r).await.map(drop),
    );
    let get = bad_uuid_field("run_id").prop_map(|(run_id, bad)| Bad {
        request: proto::GetRunRequest { run_id },
        fields: collect(&[&bad]),
    });
    h.refuses("GetRun", CASES, get, async |mut c, r| {
        c.runs.get_run(r).await.map(drop)
    });
    h.refuses(
        "ListRuns",
        CASES,
        some_bad(list_runs_request(&seed)),
        async |mut c, r| c.runs.list_runs(r).await.map(drop),
    );
    let cancel =
        (bad_uuid_field("run_id"), "[^\\x00]{0,20}").prop_map(|((run_id, bad), reason)| Bad {
            request: proto::CancelRunRequest { run_id, reason },
            fields: collect(&[&bad]),
        });
    h.refuses("CancelRun", CASES, cancel, async |mut c, r| {
        c.runs.cancel_run(r).await.map(drop)
    });
    h.refuses(
        "SendCommand",
        CASES * 2,
        some_bad(send_command_request(&seed)),
        async |mut c, r| c.runs.send_command(r).await.map(drop),
    );
    let list_commands = cursor_request(&seed, 1000, |run_id, after_seq, limit| {
        proto::ListCommandsRequest {
            run_id,
            after_seq,
            limit,
        }
    });
    h.refuses(
        "ListCommands",
        CASES,
        some_bad(list_commands),
        async |mut c, r| c.runs.list_commands(r).await.map(drop),
    );
    let list_events = cursor_request(&seed, 1000, |run_id, after_seq, limit| {
        proto::ListEventsRequest {
            run_id,
            after_seq,
            limit,
        }
    });
    h.refuses(
        "ListEvents",
        CASES,
        some_bad(list_events),
        async |mut c, r| c.runs.list_events(r).await.map(drop),
    );
    let watch = (
        uuid_field("run_id", seed.runs.clone()),
        non_negative_field("after_seq"),
    )
        .prop_map(|(run, after)| Bad {
            fields: collect(&[&run.1, &after.1]),
            request: proto::WatchRunRequest {
                run_id: run.0,
                after_seq: after.0,
            },
        });
    h.refuses("WatchRun", CASES, some_bad(watch), async |mut c, r| {
        c.runs.watch_run(r).await.map(drop)
    });
    h.refuses(
        "ResolveRequest",
        CASES,
        some_bad(resolve_request(&seed)),
        async |mut c, r| c.runs.resolve_request(r).await.map(drop),
    );
}

// ---------------------------------------------------------------------------------------
// SessionService
// ---------------------------------------------------------------------------------------

/// Page tokens that no listing produced.
fn bad_page_token() -> impl Strategy<Value = String> {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    prop_oneof![
        select(vec!["x", "abc", "zz", "0g"]).prop_map(str::to_owned),
        "[g-z]{2,10}",
        Just("ab".repeat(129)),
        Just(hex("garbage")),
        Just(hex("1.2.3")),
        Just(hex(&format!("9.5.{}", Uuid::new_v4()))),
        Just(hex(&format!("1.{}.{}", u64::MAX, Uuid::new_v4()))),
        Just(hex(&format!("1.5.{}.extra", Uuid::new_v4()))),
        Just("ff".repeat(8)),
    ]
}

#[test]
fn session_service_refuses_malformed_requests_and_changes_nothing() {
    let h = Harness::start();
    let seed = h.seed.clone();
    let sessions = vec![seed.session.clone()];

    let get = (
        uuid_field("session_id", sessions.clone()),
        optional_name_field("reader"),
    )
        .prop_map(|(session, reader)| Bad {
            fields: collect(&[&session.1, &reader.1]),
            request: proto::GetSessionRequest {
                session_id: session.0,
                reader: reader.0,
            },
        });
    h.refuses("GetSession", CASES, some_bad(get), async |mut c, r| {
        c.sessions.get_session(r).await.map(drop)
    });

    let state = field(
        "state",
        0..=5i32,
        any::<i32>().prop_filter("unknown", |s| !(0..=5).contains(s)),
    );
    let list = (
        state,
        optional_name_field("reader"),
        optional_name_field("backend_profile"),
        optional_name_field("project_id"),
        field("page_token", Just(String::new()), bad_page_token()),
        bounded_field("page_size", 1, 200),
    )
        .prop_map(|(state, reader, profile, project, token, size)| Bad {
            fields: collect(&[
                &state.1, &reader.1, &profile.1, &project.1, &token.1, &size.1,
            ]),
            request: proto::ListSessionsRequest {
                state: state.0,
                reader: reader.0,
                backend_profile: profile.0,
                project_id: project.0,
                page_token: token.0,
                page_size: size.0,
            },
        });
    h.refuses("ListSessions", CASES, some_bad(list), async |mut c, r| {
        c.sessions.list_sessions(r).await.map(drop)
    });

    let mark = (
        uuid_field("session_id", sessions.clone()),
        optional_name_field("reader"),
        non_negative_field("version"),
    )
        .prop_map(|(session, reader, version)| Bad {
            fields: collect(&[&session.1, &reader.1, &version.1]),
            request: proto::MarkSessionReadRequest {
                session_id: session.0,
                reader: reader.0,
                version: version.0,
            },
        });
    h.refuses(
        "MarkSessionRead",
        CASES,
        some_bad(mark),
        async |mut c, r| c.sessions.mark_session_read(r).await.map(drop),
    );

    // A title is 1 to 200 characters once trimmed, without control characters.
    let title = field(
        "title",
        prop_oneof![
            3 => "[A-Za-z0-9 é日😀.,!?-]{0,40}[A-Za-z0-9é日😀]",
            1 => "[é😀]{200}",
        ],
        prop_oneof![
            Just(String::new()),
            "[ \t\n]{1,4}",
            "[a-z]{201,240}",
            "[a-z]{1,8}[\u{0}-\u{1f}\u{7f}][a-z]{1,8}",
        ],
    );
    let set_title = (
        uuid_field("session_id", sessions.clone()),
        title,
        optional_name_field("reader"),
    )
        .prop_map(|(session, title, reader)| Bad {
            fields: collect(&[&session.1, &title.1, &reader.1]),
            request: proto::SetSessionTitleRequest {
                session_id: session.0,
                title: title.0,
                reader: reader.0,
            },
        });
    h.refuses(
        "SetSessionTitle",
        CASES,
        some_bad(set_title),
        async |mut c, r| c.sessions.set_session_title(r).await.map(drop),
    );

    // after_seq needs after_run_id: a positive one without it is malformed too.
    let position = (
        optional_uuid_field("after_run_id", seed.runs.clone()),
        non_negative_field("after_seq"),
    )
        .prop_map(|(run, seq)| {
            let orphan = run.0.is_empty() && seq.0 > 0 && run.1.is_none();
            let seq_bad = seq.1.or(orphan.then(|| "after_seq".to_owned()));
            ((run.0, run.1), (seq.0, seq_bad))
        });
    let list_events = (
        uuid_field("session_id", sessions.clone()),
        any::<bool>(),
        position.clone(),
        bounded_field("limit", 1, 1000),
    )
        .prop_map(|(session, output_only, (run, seq), limit)| Bad {
            fields: collect(&[&session.1, &run.1, &seq.1, &limit.1]),
            request: proto::ListSessionEventsRequest {
                session_id: session.0,
                output_only,
                after_run_id: run.0,
                after_seq: seq.0,
                limit: limit.0,
            },
        });
    h.refuses(
        "ListSessionEvents",
        CASES,
        some_bad(list_events),
        async |mut c, r| c.sessions.list_session_events(r).await.map(drop),
    );

    let watch = (uuid_field("session_id", sessions), any::<bool>(), position).prop_map(
        |(session, output_only, (run, seq))| Bad {
            fields: collect(&[&session.1, &run.1, &seq.1]),
            request: proto::WatchSessionRequest {
                session_id: session.0,
                output_only,
                after_run_id: run.0,
                after_seq: seq.0,
            },
        },
    );
    h.refuses("WatchSession", CASES, some_bad(watch), async |mut c, r| {
        c.sessions.watch_session(r).await.map(drop)
    });
}

// ---------------------------------------------------------------------------------------
// RunnerService (unary)
// ---------------------------------------------------------------------------------------

fn runner_identity(seed: &Seed) -> Field<Option<proto::RunnerIdentity>> {
    let profiles = prop_oneof![
        5 => names_field("runner.backend_profiles", 3)
            .prop_map(|(p, bad)| {
                // An empty list is malformed on its own.
                let bad = bad.or(p.is_empty().then(|| "runner.backend_profiles".to_owned()));
                (p, bad)
            }),
        1 => Just((vec![], Some("runner.backend_profiles".to_owned()))),
    ];
    let identity = (
        uuid_field("runner.runner_id", vec![seed.runner.runner_id.clone()]),
        optional_name_field("runner.name"),
        names_field("runner.labels", 3),
        profiles,
        names_field("runner.queues", 3),
        bounded_field("runner.max_concurrency", 1, 100_000),
        // Free text: anything but NUL, which is refused (see nul_characters_are_refused_by_field).
        "[^\\x00]{0,10}",
    )
        .prop_map(
            |(id, name, labels, profiles, queues, concurrency, version)| {
                let bad = collect(&[
                    &id.1,
                    &name.1,
                    &labels.1,
                    &profiles.1,
                    &queues.1,
                    &concurrency.1,
                ]);
                let identity = proto::RunnerIdentity {
                    runner_id: id.0,
                    name: name.0,
                    labels: labels.0,
                    backend_profiles: profiles.0,
                    queues: queues.0,
                    max_concurrency: concurrency.0,
                    version,
                };
                (Some(identity), bad)
            },
        );
    prop_oneof![
        8 => identity.prop_map(|(identity, bad)| {
            // Several may be malformed: any of them can be named first.
            let joined = (!bad.is_empty()).then(|| bad.join("|"));
            (identity, joined)
        }),
        1 => Just((None, Some("runner".to_owned()))),
    ]
    .boxed()
}

/// `collect`, with `a|b` entries (several malformed fields of one part) split apart.
fn split(fields: Vec<String>) -> Vec<String> {
    fields
        .iter()
        .flat_map(|f| f.split('|').map(str::to_owned))
        .collect()
}

/// How one event of a batch is malformed, if it is.
#[derive(Debug, Clone)]
enum EventFault {
    None,
    Seq(i64),
    UnknownType(String),
    ManagerType(&'static str),
    Payload(String),
    MissingField(&'static str, &'static str),
}

fn event_fault() -> impl Strategy<Value = EventFault> {
    let manager_types: Vec<&'static str> = EventType::ALL
        .iter()
        .filter(|t| !t.runner_may_write())
        .map(|t| t.as_str())
        .collect();
    prop_oneof![
        8 => Just(EventFault::None),
        1 => prop_oneof![Just(0i64), Just(-1), i64::MIN..0, 1..5i64].prop_map(EventFault::Seq),
        1 => prop_oneof![
            Just(String::new()),
            Just("run.exploded".to_owned()),
            Just("Content.Delta".to_owned()),
            Just("content.delta ".to_owned()),
            ".{1,16}",
        ]
        .prop_filter("not a type", |t| EventType::ALL.iter().all(|e| e.as_str() != t))
        .prop_map(EventFault::UnknownType),
        1 => select(manager_types).prop_map(EventFault::ManagerType),
        1 => bad_json().prop_map(EventFault::Payload),
        1 => select(vec![
            ("content.delta", r#"{"kind": "assistant_text"}"#),
            ("content.delta", r#"{"kind": 1, "delta": "x"}"#),
            ("turn.started", r#"{}"#),
            ("turn.completed", r#"{"state": "great"}"#),
            ("item.updated", r#"{"item_id": 5, "kind": "plan"}"#),
            ("request.opened", r#"{"kind": "tool"}"#),
            ("request.opened", r#"{"request_id": "nope", "kind": "tool"}"#),
            ("request.opened", r#"{"request_id": "8a1f3c2e-4b5d-4e6f-9a0b-1c2d3e4f5a6b"}"#),
            ("request.opened", r#"{"request_id": "8a1f3c2e-4b5d-4e6f-9a0b-1c2d3e4f5a6b",
                                   "kind": 1}"#),
            ("runtime.error", r#"{}"#),
        ])
        .prop_map(|(t, p)| EventFault::MissingField(t, p)),
    ]
}

/// Valid runner events, by type.
const GOOD_EVENTS: &[(&str, &str)] = &[
    (
        "content.delta",
        r#"{"kind": "assistant_text", "delta": "x"}"#,
    ),
    ("turn.started", r#"{"turn_id": "t"}"#),
    ("item.started", r#"{"item_id": "i", "kind": "tool_call"}"#),
    ("usage.updated", r#"{"input_tokens": 3}"#),
    ("plan.updated", ""),
    (
        "runtime.warning",
        r#"{"message": "careful", "api_key": "sk-whatever"}"#,
    ),
];

/// A batch of events starting at runner_seq `start`, each spoiled by its fault; the first
/// faulty event `i` is named `events[i]`.
fn spoiled_batch(
    start: i64,
    items: Vec<(EventFault, (&str, &str))>,
) -> (Vec<proto::RunnerEvent>, Option<String>) {
    let mut bad = None;
    let mut events = Vec::new();
    for (i, (fault, (t, p))) in items.into_iter().enumerate() {
        let seq = start + i as i64;
        let mut e = proto::RunnerEvent {
            runner_seq: seq,
            r#type: t.into(),
            payload_json: p.into(),
        };
        if !matches!(fault, EventFault::None) && bad.is_none() {
            bad = Some(format!("events[{i}]"));
        }
        match fault {
            EventFault::None => {}
            // The first event needs a positive seq; later ones continue without a gap.
            EventFault::Seq(k) if i == 0 => e.runner_seq = k.min(0),
            EventFault::Seq(k) => e.runner_seq = seq + if k == 0 { 1 } else { k },
            EventFault::UnknownType(t) => e.r#type = t,
            EventFault::ManagerType(t) => e.r#type = t.into(),
            EventFault::Payload(p) => e.payload_json = p,
            EventFault::MissingField(t, p) => {
                e.r#type = t.into();
                e.payload_json = p.into();
            }
        }
        events.push(e);
    }
    (events, bad)
}

/// An event batch; the first malformed event `i` is named `events[i]`.
fn event_batch() -> impl Strategy<Value = (Vec<proto::RunnerEvent>, Option<String>)> {
    let items = vec((event_fault(), select(GOOD_EVENTS)), 0..5);
    prop_oneof![
        8 => (1..1000i64, items).prop_map(|(start, items)| spoiled_batch(start, items)),
        // More than the batch limit.
        1 => (1..100i64, MAX_BATCH + 1..MAX_BATCH + 5).prop_map(|(start, n)| {
            (deltas(start, start + n as i64 - 1), Some("events".to_owned()))
        }),
    ]
}

fn command_updates(
    seed: &Seed,
) -> impl Strategy<Value = (Vec<proto::CommandUpdate>, Option<String>)> + use<> {
    let update = (
        prop_oneof![
            4 => (3..=6i32).prop_map(|s| (s, false)),
            1 => prop_oneof![Just(0), Just(1), Just(2), Just(7), any::<i32>()]
                .prop_filter("not an update status", |s| !(3..=6).contains(s))
                .prop_map(|s| (s, true)),
        ],
        prop_oneof![
            4 => good_uuid(seed.commands.clone()).prop_map(|c| (c, false)),
            1 => prop_oneof![Just(String::new()), bad_uuid()].prop_map(|c| (c, true)),
        ],
        "[^\\x00]{0,10}",
    );
    vec(update, 0..3).prop_map(|items| {
        let bad = items
            .iter()
            .position(|((_, a), (_, b), _)| *a || *b)
            .map(|i| format!("command_updates[{i}]"));
        let updates = items
            .into_iter()
            .map(
                |((status, _), (command_id, _), error)| proto::CommandUpdate {
                    command_id,
                    status,
                    error,
                },
            )
            .collect();
        (updates, bad)
    })
}

fn epoch_field() -> Field<i64> {
    field(
        "epoch",
        1..1_000_000i64,
        prop_oneof![Just(0i64), Just(-1), i64::MIN..1],
    )
}

#[test]
fn runner_service_refuses_malformed_requests_and_changes_nothing() {
    let h = Harness::start();
    let seed = h.seed.clone();

    let claim =
        (runner_identity(&seed), bounded_field("max_runs", 1, 1000)).prop_map(|(runner, max)| {
            Bad {
                fields: split(collect(&[&runner.1, &max.1])),
                request: proto::ClaimRunsRequest {
                    runner: runner.0,
                    max_runs: max.0,
                },
            }
        });
    h.refuses("ClaimRuns", CASES, some_bad(claim), async |mut c, r| {
        c.runners.claim_runs(r).await.map(drop)
    });

    let lease = (
        prop_oneof![
            4 => good_uuid(seed.runs.clone()).prop_map(|r| (r, None)),
            1 => prop_oneof![Just(String::new()), bad_uuid()].prop_map(|r| (r, Some("run_id"))),
        ],
        prop_oneof![
            4 => (1..100i64).prop_map(|e| (e, None)),
            1 => (i64::MIN..1).prop_map(|e| (e, Some("epoch"))),
        ],
    );
    let leases = prop_oneof![
        8 => vec(lease, 0..4).prop_map(|items| {
            // The first malformed lease is named, run_id before epoch.
            let bad = items.iter().enumerate().find_map(|(i, ((_, r), (_, e)))| {
                r.or(*e).map(|f| format!("leases[{i}].{f}"))
            });
            let leases = items
                .into_iter()
                .map(|((run_id, _), (epoch, _))| proto::LeaseRef { run_id, epoch })
                .collect::<Vec<_>>();
            (leases, bad)
        }),
        1 => Just((
            vec![proto::LeaseRef { run_id: Uuid::nil().to_string(), epoch: 1 }; 10_001],
            Some("leases".to_owned()),
        )),
    ];
    let heartbeat = (
        uuid_field("runner_id", vec![seed.runner.runner_id.clone()]),
        leases,
    )
        .prop_map(|(runner, leases)| Bad {
            fields: collect(&[&runner.1, &leases.1]),
            request: proto::HeartbeatRequest {
                runner_id: runner.0,
                leases: leases.0,
            },
        });
    h.refuses("Heartbeat", CASES, some_bad(heartbeat), async |mut c, r| {
        c.runners.heartbeat(r).await.map(drop)
    });

    let append = (
        uuid_field("runner_id", vec![seed.runner.runner_id.clone()]),
        uuid_field("run_id", seed.runs.clone()),
        prop_oneof![4 => Just((seed.epoch, None)), 1 => epoch_field()],
        event_batch(),
        command_updates(&seed),
    )
        .prop_map(|(runner, run, epoch, events, updates)| {
            // An empty batch with no updates is malformed as a whole.
            let empty = (events.0.is_empty() && updates.0.is_empty()).then(|| "events".to_owned());
            Bad {
                fields: collect(&[&runner.1, &run.1, &epoch.1, &events.1, &updates.1, &empty]),
                request: proto::AppendEventsRequest {
                    runner_id: runner.0,
                    run_id: run.0,
                    epoch: epoch.0,
                    events: events.0,
                    command_updates: updates.0,
                },
            }
        });
    h.refuses(
        "AppendEvents",
        CASES * 2,
        some_bad(append),
        async |mut c, r| c.runners.append_events(r).await.map(drop),
    );

    let status = field(
        "status",
        5..=8i32,
        prop_oneof![Just(0), 1..=4i32, Just(9), any::<i32>()]
            .prop_filter("not an outcome", |s| !(5..=8).contains(s)),
    );
    let finish = (
        uuid_field("runner_id", vec![seed.runner.runner_id.clone()]),
        uuid_field("run_id", seed.runs.clone()),
        prop_oneof![4 => Just((seed.epoch, None)), 1 => epoch_field()],
        status,
        optional_name_field("failure_kind"),
        "[^\\x00]{0,20}",
        field("last_runner_seq", 0..1000i64, i64::MIN..0),
    )
        .prop_map(|(runner, run, epoch, status, kind, message, last)| Bad {
            fields: collect(&[&runner.1, &run.1, &epoch.1, &status.1, &kind.1, &last.1]),
            request: proto::FinishRunRequest {
                runner_id: runner.0,
                run_id: run.0,
                epoch: epoch.0,
                status: status.0,
                failure_kind: kind.0,
                message,
                last_runner_seq: last.0,
            },
        });
    h.refuses("FinishRun", CASES, some_bad(finish), async |mut c, r| {
        c.runners.finish_run(r).await.map(drop)
    });
}

// ---------------------------------------------------------------------------------------
// AdminService
// ---------------------------------------------------------------------------------------

#[test]
fn admin_service_refuses_malformed_requests_and_changes_nothing() {
    let h = Harness::start();
    let seed = h.seed.clone();

    let limit = (
        name_field("tenant_id"),
        field("max_active_runs", 0..1000i32, i32::MIN..0),
    )
        .prop_map(|(tenant, max)| Bad {
            fields: collect(&[&tenant.1, &max.1]),
            request: proto::SetTenantLimitRequest {
                tenant_id: tenant.0,
                max_active_runs: max.0,
            },
        });
    h.refuses(
        "SetTenantLimit",
        CASES,
        some_bad(limit),
        async |mut c, r| c.admin.set_tenant_limit(r).await.map(drop),
    );

    let max = agentrun_manager::retention::MAX_RETENTION_MS;
    let retention = (
        name_field("tenant_id"),
        field(
            "event_retention_ms",
            prop_oneof![Just(None), (0..=max).prop_map(Some)],
            prop_oneof![(i64::MIN..0).prop_map(Some), (max + 1..).prop_map(Some)],
        ),
    )
        .prop_map(|(tenant, ms)| Bad {
            fields: collect(&[&tenant.1, &ms.1]),
            request: proto::SetTenantRetentionRequest {
                tenant_id: tenant.0,
                event_retention_ms: ms.0,
            },
        });
    h.refuses(
        "SetTenantRetention",
        CASES,
        some_bad(retention),
        async |mut c, r| c.admin.set_tenant_retention(r).await.map(drop),
    );

    let drain = bad_uuid_field("runner_id").prop_map(|(runner_id, bad)| Bad {
        request: proto::DrainRunnerRequest { runner_id },
        fields: collect(&[&bad]),
    });
    h.refuses("DrainRunner", CASES, drain, async |mut c, r| {
        c.admin.drain_runner(r).await.map(drop)
    });

    let role = field(
        "role",
        1..=3i32,
        prop_oneof![Just(0), any::<i32>()].prop_filter("not a role", |r| !(1..=3).contains(r)),
    );
    let create = (
        name_field("tenant_id"),
        role,
        names_field("project_ids", 3),
        field("name", "[^\\x00]{0,40}", "[a-z]{201,260}"),
    )
        .prop_map(|(tenant, role, projects, name)| Bad {
            fields: collect(&[&tenant.1, &role.1, &projects.1, &name.1]),
            request: proto::CreateApiKeyRequest {
                tenant_id: tenant.0,
                role: role.0,
                project_ids: projects.0,
                name: name.0,
                expires_at: None,
            },
        });
    h.refuses("CreateApiKey", CASES, some_bad(create), async |mut c, r| {
        c.admin.create_api_key(r).await.map(drop)
    });

    let list = always_bad("tenant_id", bad_name()).prop_map(|(tenant_id, bad)| Bad {
        request: proto::ListApiKeysRequest { tenant_id },
        fields: collect(&[&bad]),
    });
    h.refuses("ListApiKeys", CASES, list, async |mut c, r| {
        c.admin.list_api_keys(r).await.map(drop)
    });

    let revoke = bad_uuid_field("key_id").prop_map(|(key_id, bad)| Bad {
        request: proto::RevokeApiKeyRequest { key_id },
        fields: collect(&[&bad]),
    });
    h.refuses("RevokeApiKey", CASES, revoke, async |mut c, r| {
        c.admin.revoke_api_key(r).await.map(drop)
    });
    drop(seed);
}

// ---------------------------------------------------------------------------------------
// The tenant header, on every service
// ---------------------------------------------------------------------------------------

/// A malformed `agentrun-tenant` header on an otherwise valid request of any service is
/// refused before anything else happens (the requests would all succeed without it).
#[test]
fn malformed_tenant_headers_are_refused_on_every_service() {
    let h = Harness::start();
    let seed = h.seed.clone();
    let header = prop_oneof![
        Just(b"".to_vec()),
        Just(b"bad tenant".to_vec()),
        Just(b"tenant\t1".to_vec()),
        Just("t".repeat(129).into_bytes()),
        Just(b"caf\xc3\xa9".to_vec()),
        Just(b"\xff\xfe".to_vec()),
        "[a-z]{1,4} [a-z]{1,4}".prop_map(String::into_bytes),
    ];
    let strategy = (header, 0..8usize).prop_map(|(header, rpc)| Bad {
        request: (header, rpc),
        fields: vec!["agentrun-tenant".to_owned()],
    });
    let runner = seed.runner.clone();
    let run_id = seed.runs[1].clone();
    let epoch = seed.epoch;
    h.refuses(
        "tenant header",
        CASES,
        strategy,
        async |mut c, (header, rpc)| {
            let value = AsciiMetadataValue::try_from(header.as_slice()).expect("a header value");
            fn with<T>(value: &AsciiMetadataValue, message: T) -> tonic::Request<T> {
                let mut request = tonic::Request::new(message);
                request
                    .metadata_mut()
                    .insert("agentrun-tenant", value.clone());
                request
            }
            match rpc {
                0 => c
                    .runs
                    .create_run(with(&value, run_request("x")))
                    .await
                    .map(drop),
                1 => c
                    .runs
                    .cancel_run(with(
                        &value,
                        proto::CancelRunRequest {
                            run_id: run_id.clone(),
                            reason: String::new(),
                        },
                    ))
                    .await
                    .map(drop),
                2 => c
                    .runs
                    .send_command(with(
                        &value,
                        proto::SendCommandRequest {
                            run_id: run_id.clone(),
                            kind: CommandKind::Interrupt as i32,
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop),
                3 => c
                    .sessions
                    .mark_session_read(with(
                        &value,
                        proto::MarkSessionReadRequest {
                            session_id: seed.session.clone(),
                            ..Default::default()
                        },
                    ))
                    .await
                    .map(drop),
                4 => c
                    .runners
                    .claim_runs(with(
                        &value,
                        proto::ClaimRunsRequest {
                            runner: Some(runner.clone()),
                            max_runs: 1,
                        },
                    ))
                    .await
                    .map(drop),
                5 => c
                    .runners
                    .heartbeat(with(
                        &value,
                        proto::HeartbeatRequest {
                            runner_id: runner.runner_id.clone(),
                            leases: vec![proto::LeaseRef {
                                run_id: run_id.clone(),
                                epoch,
                            }],
                        },
                    ))
                    .await
                    .map(drop),
                6 => c
                    .admin
                    .set_tenant_limit(with(
                        &value,
                        proto::SetTenantLimitRequest {
                            tenant_id: "other".into(),
                            max_active_runs: 3,
                        },
                    ))
                    .await
                    .map(drop),
                _ => c
                    .admin
                    .drain_runner(with(
                        &value,
                        proto::DrainRunnerRequest {
                            runner_id: runner.runner_id.clone(),
                        },
                    ))
                    .await
                    .map(drop),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------
// The run state machine, through the API
// ---------------------------------------------------------------------------------------

/// Which lease a runner write names.
#[derive(Debug, Clone, Copy)]
enum Lease {
    /// The epoch the runner was given (or 1 if the run was never claimed).
    Current,
    /// One below it.
    Stale,
    /// The right epoch, from another runner.
    Foreign,
}

#[derive(Debug, Clone)]
enum Op {
    Create,
    Cancel(usize),
    Send(usize, i32),
    Claim(i32),
    Append(usize, &'static str, Lease),
    Finish(usize, i32, Lease),
    Resolve(usize, &'static str),
    Heartbeat,
}

fn op() -> impl Strategy<Value = Op> {
    let event = select(vec![
        "content.delta",
        "turn.started",
        "turn.completed",
        "request.opened",
        "bogus",
    ]);
    let lease = || {
        select(vec![
            Lease::Current,
            Lease::Current,
            Lease::Current,
            Lease::Stale,
            Lease::Foreign,
        ])
    };
    let decision = select(vec!["accept", "decline", "cancel"]);
    prop_oneof![
        3 => Just(Op::Create),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (any::<usize>(), 1..=4i32).prop_map(|(r, k)| Op::Send(r, k)),
        3 => (1..=3i32).prop_map(Op::Claim),
        4 => (any::<usize>(), event, lease()).prop_map(|(r, e, l)| Op::Append(r, e, l)),
        3 => (
            any::<usize>(),
            // Mostly outcomes a runner may report; sometimes any status at all.
            prop_oneof![3 => 5..=8i32, 1 => 0..=9i32],
            lease(),
        )
            .prop_map(|(r, s, l)| Op::Finish(r, s, l)),
        1 => (any::<usize>(), decision).prop_map(|(r, d)| Op::Resolve(r, d)),
        1 => Just(Op::Heartbeat),
    ]
}

/// What one sequence knows about its runs: their ids, the epoch each was claimed at, the
/// next runner_seq of that epoch and the requests opened on it.
#[derive(Default)]
struct Model {
    runs: Vec<String>,
    /// Runs claimed in this sequence, in claim order.
    held: Vec<String>,
    epochs: HashMap<String, i64>,
    next_seq: HashMap<String, i64>,
    requests: HashMap<String, Vec<String>>,
}

impl Model {
    fn pick(&self, i: usize) -> Option<String> {
        (!self.runs.is_empty()).then(|| self.runs[i % self.runs.len()].clone())
    }

    /// Runner writes mostly aim at runs that were claimed (else they are all lease_lost).
    fn pick_held(&self, i: usize) -> Option<String> {
        if self.held.is_empty() || i.is_multiple_of(5) {
            self.pick(i / 5)
        } else {
            Some(self.held[i % self.held.len()].clone())
        }
    }
}

/// Status and full row text of every run in `queue`.
async fn runs_in(
    db: &tokio_postgres::Client,
    queue: &str,
) -> HashMap<String, (String, String, bool)> {
    db.query(
        "SELECT id::text, status, r::text, cancel_requested FROM runs r WHERE queue = $1",
        &[&queue],
    )
    .await
    .expect("read runs")
    .iter()
    .map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3))))
    .collect()
}

/// One operation; returns the call's outcome.
async fn apply(
    c: &mut Clients,
    model: &mut Model,
    queue: &str,
    me: &proto::RunnerIdentity,
    other: &proto::RunnerIdentity,
    op: &Op,
) -> Result<(), Status> {
    let missing = || Uuid::new_v4().to_string();
    match op {
        Op::Create => {
            let mut request = run_request("sequence");
            request.queue = queue.to_owned();
            let run = c
                .runs
                .create_run(request)
                .await?
                .into_inner()
                .run
                .expect("run");
            model.runs.push(run.run_id);
            Ok(())
        }
        Op::Cancel(i) => {
            let run_id = model.pick(*i).unwrap_or_else(missing);
            c.runs
                .cancel_run(proto::CancelRunRequest {
                    run_id,
                    reason: "because".into(),
                })
                .await
                .map(drop)
        }
        Op::Send(i, kind) => {
            let run_id = model.pick(*i).unwrap_or_else(missing);
            let payload = match *kind {
                1 => json!({"prompt": "more"}),
                2 => json!({"text": "also"}),
                _ => json!({}),
            };
            c.runs
                .send_command(proto::SendCommandRequest {
                    run_id,
                    kind: *kind,
                    payload_json: payload.to_string(),
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        Op::Claim(n) => {
            let claimed = c
                .runners
                .claim_runs(proto::ClaimRunsRequest {
                    runner: Some(me.clone()),
                    max_runs: *n,
                })
                .await?
                .into_inner();
            for a in claimed.assignments {
                let run_id = a.run.expect("run").run_id;
                model.epochs.insert(run_id.clone(), a.epoch);
                model.next_seq.insert(run_id.clone(), 1);
                model.held.push(run_id);
            }
            Ok(())
        }
        Op::Append(i, event_type, lease) => {
            let run_id = model.pick_held(*i).unwrap_or_else(missing);
            let (runner, epoch) = fenced(model, &run_id, me, other, *lease);
            let seq = model.next_seq.get(&run_id).copied().unwrap_or(1);
            let request_id = Uuid::new_v4().to_string();
            let payload = match *event_type {
                "content.delta" => json!({"kind": "assistant_text", "delta": "x"}),
                "turn.started" => json!({"turn_id": "turn"}),
                "turn.completed" => json!({"state": "completed"}),
                "request.opened" => json!({"request_id": request_id, "kind": "tool"}),
                _ => json!({}),
            };
            let result = c
                .runners
                .append_events(proto::AppendEventsRequest {
                    runner_id: runner,
                    run_id: run_id.clone(),
                    epoch,
                    events: vec![runner_event(seq, event_type, payload)],
                    command_updates: vec![],
                })
                .await
                .map(drop);
            if result.is_ok() {
                model.next_seq.insert(run_id.clone(), seq + 1);
                if *event_type == "request.opened" {
                    model.requests.entry(run_id).or_default().push(request_id);
                }
            }
            result
        }
        Op::Finish(i, status, lease) => {
            let run_id = model.pick_held(*i).unwrap_or_else(missing);
            let (runner, epoch) = fenced(model, &run_id, me, other, *lease);
            c.runners
                .finish_run(proto::FinishRunRequest {
                    runner_id: runner,
                    run_id,
                    epoch,
                    status: *status,
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        Op::Resolve(i, decision) => {
            let run_id = model.pick(*i).unwrap_or_else(missing);
            let request_id = model
                .requests
                .get(&run_id)
                .and_then(|r| r.last().cloned())
                .unwrap_or_else(missing);
            c.runs
                .resolve_request(proto::ResolveRequestRequest {
                    run_id,
                    request_id,
                    decision: (*decision).into(),
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        Op::Heartbeat => {
            let leases = model
                .epochs
                .iter()
                .map(|(run_id, epoch)| proto::LeaseRef {
                    run_id: run_id.clone(),
                    epoch: *epoch,
                })
                .collect();
            c.runners
                .heartbeat(proto::HeartbeatRequest {
                    runner_id: me.runner_id.clone(),
                    leases,
                })
                .await
                .map(drop)
        }
    }
}

/// The runner and epoch a write names.
fn fenced(
    model: &Model,
    run_id: &str,
    me: &proto::RunnerIdentity,
    other: &proto::RunnerIdentity,
    lease: Lease,
) -> (String, i64) {
    let epoch = model.epochs.get(run_id).copied().unwrap_or(1);
    match lease {
        Lease::Current => (me.runner_id.clone(), epoch),
        Lease::Stale => (me.runner_id.clone(), (epoch - 1).max(1)),
        Lease::Foreign => (other.runner_id.clone(), epoch),
    }
}

fn parse_status(text: &str) -> RunStatus {
    RunStatus::from_db(text).expect("a known status")
}

#[test]
fn random_operations_only_make_legal_transitions() {
    let h = Harness::start();
    let mut sequences = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let case = std::sync::atomic::AtomicUsize::new(0);
    let seen = std::sync::Mutex::new(BTreeSet::new());
    // A few runs first, then anything.
    let ops = (vec(Just(Op::Create), 1..=3), vec(op(), 1..20))
        .prop_map(|(creates, rest)| [creates, rest].concat());
    let result = sequences.run(&ops, |ops| {
        // Each sequence has its own queue, so its claims see only its own runs.
        let queue = format!(
            "seq-{}",
            case.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut me = runner("sequence");
        me.queues = vec![queue.clone()];
        let other = runner("stranger");
        let mut model = Model::default();
        let mut c = h.clients.clone();
        h.rt.block_on(async {
            for (step, op) in ops.iter().enumerate() {
                let before_db = h.digest().await;
                let before = runs_in(&h.db, &queue).await;
                let outcome = apply(&mut c, &mut model, &queue, &me, &other, op).await;
                let after = runs_in(&h.db, &queue).await;
                let context = || format!("step {step} {op:?} -> {outcome:?}");
                if let Err(status) = &outcome {
                    // Refused: for a reason a caller can act on, and with no effect at all.
                    prop_assert!(
                        matches!(
                            status.code(),
                            Code::InvalidArgument
                                | Code::FailedPrecondition
                                | Code::NotFound
                                | Code::AlreadyExists
                                | Code::ResourceExhausted
                        ),
                        "{}",
                        context()
                    );
                    check_unchanged(&before_db, &h.digest().await)
                        .map_err(|e| TestCaseError::fail(format!("{}: {e}", context())))?;
                }
                for (id, (was, was_row, _)) in &before {
                    let (now, now_row, _) = after.get(id).expect("runs are never deleted");
                    let (was, now) = (parse_status(was), parse_status(now));
                    if was != now {
                        seen.lock()
                            .expect("not poisoned")
                            .insert((was.as_str(), now.as_str()));
                        prop_assert!(
                            RunStatus::can_transition(was, now),
                            "{}: run {} went {:?} -> {:?}",
                            context(),
                            id,
                            was,
                            now
                        );
                    }
                    if was.is_terminal() {
                        prop_assert_eq!(was_row, now_row, "{}: a terminal run changed", context());
                    }
                }
                for (id, (status, _, _)) in &after {
                    if !before.contains_key(id) {
                        prop_assert_eq!(parse_status(status), RunStatus::Pending, "{}", context());
                    }
                }
                // A run whose cancellation was asked for never ends completed.
                if let Op::Finish(i, _, _) = op
                    && outcome.is_ok()
                    && let Some(run_id) = model.pick_held(*i)
                    && before.get(&run_id).is_some_and(|(_, _, cancel)| *cancel)
                {
                    prop_assert_eq!(&after[&run_id].0, "cancelled", "{}", context());
                }
            }
            Ok(())
        })
    });
    if let Err(err) = result {
        panic!("{err}");
    }
    h.rt.block_on(assert_event_log_consistent(&h.db));
    // The sequences did exercise the lifecycle (else the property above proves little).
    let seen = seen.into_inner().expect("not poisoned");
    for needed in [
        ("pending", "claimed"),
        ("claimed", "running"),
        ("pending", "cancelled"),
    ] {
        assert!(
            seen.contains(&needed),
            "no {needed:?} transition in {seen:?}"
        );
    }
    let by_runner = ["completed", "failed", "blocked"];
    assert!(
        seen.iter()
            .any(|(from, to)| *from != "pending" && by_runner.contains(to)),
        "no run finished by its runner in {seen:?}"
    );
}

#[test]
fn harness_digest_sees_every_change() {
    // The property above is only as good as the digest: a change to any table shows.
    let h = Harness::start();
    h.rt.block_on(async {
        let before = h.digest().await;
        assert_eq!(h.digest().await, before, "the digest is stable");
        h.db.execute("UPDATE runners SET version = version || 'x'", &[])
            .await
            .expect("touch runners");
        let after = h.digest().await;
        assert!(check_unchanged(&before, &after).is_err());
        let mut c = h.clients.clone();
        c.sessions
            .mark_session_read(proto::MarkSessionReadRequest {
                session_id: h.seed.session.clone(),
                ..Default::default()
            })
            .await
            .expect("mark read");
        assert!(check_unchanged(&after, &h.digest().await).is_err());
    });
}

// ---------------------------------------------------------------------------------------
// Secrets never reach the database
// ---------------------------------------------------------------------------------------

impl Harness {
    /// Tables whose rows' text holds `needle`.
    async fn tables_containing(&self, needle: &str) -> Vec<String> {
        let tables: Vec<String> = self
            .db
            .query(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
                &[],
            )
            .await
            .expect("list tables")
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut found = Vec::new();
        for t in tables {
            let hits: i64 = self
                .db
                .query_one(
                    &format!("SELECT count(*) FROM \"{t}\" x WHERE strpos(x::text, $1) > 0"),
                    &[&needle],
                )
                .await
                .expect("search a table")
                .get(0);
            if hits > 0 {
                found.push(t);
            }
        }
        found
    }
}

/// Where a runner event may carry a secret: under a secret-named key (any case, `-` for
/// `_`) at some depth, or as a credential token inside free text.
fn secret_payload(marker: String) -> impl Strategy<Value = serde_json::Value> {
    let key = select(vec![
        "api_key",
        "API_KEY",
        "Authorization",
        "x-api-key",
        "password",
        "client_secret",
        "access-token",
        "Cookie",
        "token",
        "private_key",
    ]);
    let under_key = (key, 0..4usize).prop_map({
        let marker = marker.clone();
        move |(key, depth)| {
            let mut v = json!({ key: marker.clone(), "note": "kept" });
            for _ in 0..depth {
                v = json!({ "nested": [v] });
            }
            v
        }
    });
    let prefix = select(vec![
        "sk-",
        "ghp_",
        "github_pat_",
        "xoxb-",
        "AKIA",
        "Bearer ",
    ]);
    let in_text = prefix.prop_map(move |p| json!({ "text": format!("use {p}{marker} now") }));
    prop_oneof![under_key, in_text]
}

/// Every runner event type a payload can hide a secret in, with its required fields.
fn with_required(event_type: &str, mut secret: serde_json::Value) -> serde_json::Value {
    let required = match event_type {
        "content.delta" => json!({"kind": "assistant_text", "delta": "x"}),
        "item.completed" => json!({"item_id": "i", "kind": "tool_call"}),
        "runtime.warning" => json!({"message": "m"}),
        "turn.completed" => json!({"state": "failed"}),
        _ => json!({}),
    };
    let object = secret.as_object_mut().expect("an object");
    for (k, v) in required.as_object().expect("an object") {
        object.insert(k.clone(), v.clone());
    }
    secret
}

/// Secrets a runner sends in event payloads are redacted before anything is stored: no
/// table of the database holds them afterwards.
#[test]
fn secrets_in_runner_events_never_reach_the_database() {
    let h = Harness::start();
    let next_seq = std::sync::atomic::AtomicI64::new(4);
    let strategy = (
        "[A-Za-z0-9]{20,28}".prop_flat_map(|marker| (Just(marker.clone()), secret_payload(marker))),
        select(vec![
            "content.delta",
            "item.completed",
            "runtime.warning",
            "usage.updated",
            "plan.updated",
            "turn.completed",
        ]),
    );
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |((marker, secret), event_type)| {
        h.rt.block_on(async {
            let mut c = h.clients.clone();
            let seq = next_seq.load(std::sync::atomic::Ordering::Relaxed);
            let payload = with_required(event_type, secret);
            let mut events = vec![runner_event(seq, event_type, payload.clone())];
            // A turn ends only while one is active: start the next one behind it.
            if event_type == "turn.completed" {
                events.push(runner_event(
                    seq + 1,
                    "turn.started",
                    json!({"turn_id": format!("turn-{seq}")}),
                ));
            }
            let sent = events.len() as i64;
            c.runners
                .append_events(proto::AppendEventsRequest {
                    runner_id: h.seed.runner.runner_id.clone(),
                    run_id: h.seed.runs[1].clone(),
                    epoch: h.seed.epoch,
                    events,
                    command_updates: vec![],
                })
                .await
                .map_err(|s| TestCaseError::fail(format!("append {payload}: {s:?}")))?;
            // Only a stored event takes its runner_seq (shrinking replays failed cases).
            next_seq.store(seq + sent, std::sync::atomic::Ordering::Relaxed);
            let leaked = h.tables_containing(&marker).await;
            prop_assert!(leaked.is_empty(), "{} stored in {:?}", payload, leaked);
            Ok(())
        })
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

/// A secret in an approval request's detail or options is stored nowhere either, and not
/// shown back to clients.
#[test]
fn secrets_in_approval_requests_never_reach_the_database() {
    let h = Harness::start();
    h.rt.block_on(async {
        let mut c = h.clients.clone();
        let request_id = Uuid::new_v4().to_string();
        let token = "abcdefghijklmnopqrstuvwxyz0123";
        let detail = json!({
            "command": format!("curl -H 'Authorization: Bearer {token}' https://example.test"),
            "api_key": "hunter2-hunter2-hunter2",
        });
        c.runners
            .append_events(proto::AppendEventsRequest {
                runner_id: h.seed.runner.runner_id.clone(),
                run_id: h.seed.runs[1].clone(),
                epoch: h.seed.epoch,
                events: vec![runner_event(
                    4,
                    "request.opened",
                    json!({"request_id": request_id, "kind": "command", "detail": detail,
                           "options": [format!("sk-{token}")]}),
                )],
                command_updates: vec![],
            })
            .await
            .expect("open a request");
        let mut leaks = Vec::new();
        for secret in [token, "hunter2-hunter2-hunter2"] {
            let tables = h.tables_containing(secret).await;
            if !tables.is_empty() {
                leaks.push(format!("{secret:?} in {tables:?}"));
            }
        }
        let resolved = c
            .runs
            .resolve_request(proto::ResolveRequestRequest {
                run_id: h.seed.runs[1].clone(),
                request_id,
                decision: "decline".into(),
                answers_json: String::new(),
                ..Default::default()
            })
            .await
            .expect("resolve")
            .into_inner();
        let shown = resolved.request.expect("request").detail_json;
        if shown.contains("hunter2") || shown.contains(token) {
            leaks.push(format!("shown to the client: {shown}"));
        }
        assert!(leaks.is_empty(), "secrets kept: {leaks:#?}");
    });
}

// ---------------------------------------------------------------------------------------
// Found by these properties; each was a bug and stays as a regression test
// ---------------------------------------------------------------------------------------

/// Accepted, or refused with INVALID_ARGUMENT naming `field` and no change; never an
/// internal error.
fn accepted_or_refused_by_field(
    outcome: &Result<(), Status>,
    field: &str,
    before: &Digest,
    after: &Digest,
) -> Result<(), String> {
    match outcome {
        Ok(()) => Ok(()),
        Err(status) => {
            let named = named_field(status.message()).is_some_and(|n| names(n, field));
            if status.code() != Code::InvalidArgument || !named {
                return Err(format!(
                    "{field}: expected success or INVALID_ARGUMENT naming {field}, got {:?} {:?}",
                    status.code(),
                    status.message()
                ));
            }
            check_unchanged(before, after).map_err(|e| format!("{field}: {e}"))
        }
    }
}

/// One call of a table-driven test.
type Call = Box<
    dyn Fn(
        Clients,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Status>> + Send>>,
>;

/// A NUL character is a valid protobuf string and a valid JSON string escape, but
/// PostgreSQL stores neither in `text` nor in `jsonb`: it must be refused by field (or
/// stored some other way), never fail the call as INTERNAL.
#[test]
fn nul_characters_are_refused_by_field() {
    let h = Harness::start();
    let seed = h.seed.clone();
    let nul = "before\u{0}after";
    let mut failures = Vec::new();
    h.rt.block_on(async {
        let mut c = h.clients.clone();
        // Deliver the held run's command, so an update may carry an error text.
        c.runners
            .heartbeat(proto::HeartbeatRequest {
                runner_id: seed.runner.runner_id.clone(),
                leases: vec![proto::LeaseRef {
                    run_id: seed.runs[1].clone(),
                    epoch: seed.epoch,
                }],
            })
            .await
            .expect("heartbeat");
        let fresh = c
            .runs
            .create_run(run_request("to cancel"))
            .await
            .expect("a run");
        let fresh = fresh.into_inner().run.expect("run").run_id;
        let cases: Vec<(&str, Call)> = vec![
            (
                "input_json",
                Box::new(move |mut c: Clients| {
                    Box::pin(async move { c.runs.create_run(run_request(nul)).await.map(drop) })
                }),
            ),
            (
                "metadata_json",
                Box::new(move |mut c: Clients| {
                    Box::pin(async move {
                        let mut r = run_request("x");
                        r.metadata_json = json!({ "note": nul }).to_string();
                        c.runs.create_run(r).await.map(drop)
                    })
                }),
            ),
            ("payload_json", {
                let run_id = seed.runs[0].clone();
                Box::new(move |mut c: Clients| {
                    let run_id = run_id.clone();
                    Box::pin(async move {
                        c.runs
                            .send_command(proto::SendCommandRequest {
                                run_id,
                                kind: CommandKind::Turn as i32,
                                payload_json: json!({ "prompt": nul }).to_string(),
                                ..Default::default()
                            })
                            .await
                            .map(drop)
                    })
                })
            }),
            (
                "reason",
                Box::new(move |mut c: Clients| {
                    let run_id = fresh.clone();
                    Box::pin(async move {
                        c.runs
                            .cancel_run(proto::CancelRunRequest {
                                run_id,
                                reason: nul.into(),
                            })
                            .await
                            .map(drop)
                    })
                }),
            ),
            (
                "runner.version",
                Box::new(move |mut c: Clients| {
                    Box::pin(async move {
                        let mut me = runner("nul");
                        me.version = nul.into();
                        me.queues = vec!["nowhere".into()];
                        c.runners
                            .claim_runs(proto::ClaimRunsRequest {
                                runner: Some(me),
                                max_runs: 1,
                            })
                            .await
                            .map(drop)
                    })
                }),
            ),
            ("events[0].payload_json", {
                let (runner_id, run_id, epoch) = (
                    seed.runner.runner_id.clone(),
                    seed.runs[1].clone(),
                    seed.epoch,
                );
                Box::new(move |mut c: Clients| {
                    let (runner_id, run_id) = (runner_id.clone(), run_id.clone());
                    Box::pin(async move {
                        c.runners
                            .append_events(proto::AppendEventsRequest {
                                runner_id,
                                run_id,
                                epoch,
                                events: vec![runner_event(
                                    4,
                                    "content.delta",
                                    json!({"kind": "assistant_text", "delta": nul}),
                                )],
                                command_updates: vec![],
                            })
                            .await
                            .map(drop)
                    })
                })
            }),
            ("command_updates[0].error", {
                let (runner_id, run_id, epoch, command_id) = (
                    seed.runner.runner_id.clone(),
                    seed.runs[1].clone(),
                    seed.epoch,
                    seed.commands[1].clone(),
                );
                Box::new(move |mut c: Clients| {
                    let (runner_id, run_id, command_id) =
                        (runner_id.clone(), run_id.clone(), command_id.clone());
                    Box::pin(async move {
                        c.runners
                            .append_events(proto::AppendEventsRequest {
                                runner_id,
                                run_id,
                                epoch,
                                events: vec![],
                                command_updates: vec![proto::CommandUpdate {
                                    command_id,
                                    status: proto::CommandStatus::Failed as i32,
                                    error: nul.into(),
                                }],
                            })
                            .await
                            .map(drop)
                    })
                })
            }),
            ("answers_json", {
                let (run_id, request_id) = (seed.runs[1].clone(), seed.request.clone());
                Box::new(move |mut c: Clients| {
                    let (run_id, request_id) = (run_id.clone(), request_id.clone());
                    Box::pin(async move {
                        c.runs
                            .resolve_request(proto::ResolveRequestRequest {
                                run_id,
                                request_id,
                                decision: "accept".into(),
                                answers_json: json!({ "answer": nul }).to_string(),
                                ..Default::default()
                            })
                            .await
                            .map(drop)
                    })
                })
            }),
            ("message", {
                let (runner_id, run_id, epoch) = (
                    seed.runner.runner_id.clone(),
                    seed.runs[1].clone(),
                    seed.epoch,
                );
                Box::new(move |mut c: Clients| {
                    let (runner_id, run_id) = (runner_id.clone(), run_id.clone());
                    Box::pin(async move {
                        c.runners
                            .finish_run(proto::FinishRunRequest {
                                runner_id,
                                run_id,
                                epoch,
                                status: proto::RunStatus::Failed as i32,
                                message: nul.into(),
                                ..Default::default()
                            })
                            .await
                            .map(drop)
                    })
                })
            }),
            (
                "name",
                Box::new(move |mut c: Clients| {
                    Box::pin(async move {
                        c.admin
                            .create_api_key(proto::CreateApiKeyRequest {
                                tenant_id: "default".into(),
                                role: proto::ApiKeyRole::Client as i32,
                                project_ids: vec![],
                                name: nul.into(),
                                expires_at: None,
                            })
                            .await
                            .map(drop)
                    })
                }),
            ),
        ];
        for (field, call) in cases {
            let before = h.digest().await;
            let outcome = call(c.clone()).await;
            let after = h.digest().await;
            if let Err(e) = accepted_or_refused_by_field(&outcome, field, &before, &after) {
                failures.push(e);
            }
        }
    });
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A timeout PostgreSQL cannot add to a timestamp (more than about 9.2e15 ms) must be
/// refused by field (or clamped), not fail the create as INTERNAL.
#[test]
fn huge_queue_timeouts_are_refused_by_field() {
    let h = Harness::start();
    let mut runner = TestRunner::new(Config {
        cases: 16,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(9_300_000_000_000_000..=i64::MAX), |timeout| {
        h.rt.block_on(async {
            let mut r = run_request("x");
            r.queue_timeout_ms = timeout;
            let before = h.digest().await;
            let outcome = h.clients.clone().runs.create_run(r).await.map(drop);
            let after = h.digest().await;
            accepted_or_refused_by_field(&outcome, "queue_timeout_ms", &before, &after)
                .map_err(TestCaseError::fail)
        })
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

/// A run whose run_timeout_ms is too large for PostgreSQL must be refused at CreateRun (or
/// clamped); once accepted it must not stop its queue's runs from being claimed.
#[test]
fn a_huge_run_timeout_does_not_poison_its_queue() {
    let h = Harness::start();
    h.rt.block_on(async {
        let mut c = h.clients.clone();
        let mut poison = run_request("poison");
        poison.queue = "poisoned".into();
        poison.priority = 10;
        poison.run_timeout_ms = i64::MAX;
        let before = h.digest().await;
        let outcome = c.runs.create_run(poison).await.map(drop);
        let after = h.digest().await;
        if let Err(e) = accepted_or_refused_by_field(&outcome, "run_timeout_ms", &before, &after) {
            panic!("{e}");
        }
        let mut normal = run_request("normal");
        normal.queue = "poisoned".into();
        c.runs.create_run(normal).await.expect("a normal run");
        let mut me = runner("claimer");
        me.queues = vec!["poisoned".into()];
        let claimed = c
            .runners
            .claim_runs(proto::ClaimRunsRequest {
                runner: Some(me),
                max_runs: 2,
            })
            .await
            .expect("claims on the queue still work");
        assert!(!claimed.into_inner().assignments.is_empty());
    });
}

/// `runner_seq` is the runner's; a batch starting at i64::MAX cannot continue, and must be
/// refused by field like any other gap.
#[test]
fn runner_seq_overflow_is_refused_by_field() {
    let h = Harness::start();
    h.rt.block_on(async {
        let before = h.digest().await;
        let outcome = h
            .clients
            .clone()
            .runners
            .append_events(proto::AppendEventsRequest {
                runner_id: h.seed.runner.runner_id.clone(),
                run_id: h.seed.runs[1].clone(),
                epoch: h.seed.epoch,
                events: vec![
                    runner_event(
                        i64::MAX,
                        "content.delta",
                        json!({"kind": "a", "delta": "b"}),
                    ),
                    runner_event(1, "content.delta", json!({"kind": "a", "delta": "b"})),
                ],
                command_updates: vec![],
            })
            .await
            .map(drop);
        let after = h.digest().await;
        check_refused(&outcome, &["events[1].runner_seq".to_owned()]).expect("refused by field");
        let message = outcome.expect_err("refused").message().to_owned();
        assert!(!message.contains("-9223372036854775808"), "{message}");
        check_unchanged(&before, &after).expect("nothing changed");
    });
}

/// Lists in requests (labels, profiles, queues, project ids, statuses) need a bound: an
/// enormous one must be refused promptly by field, not checked in quadratic time.
#[test]
fn oversized_lists_are_refused_by_field() {
    let h = Harness::start();
    h.rt.block_on(async {
        let mut r = run_request("x");
        r.labels = (0..20_000).map(|i| format!("label-{i}")).collect();
        let before = h.digest().await;
        let started = std::time::Instant::now();
        let outcome = h.clients.clone().runs.create_run(r).await.map(drop);
        let took = started.elapsed();
        let after = h.digest().await;
        let status = outcome.expect_err("20,000 labels are refused");
        assert!(
            matches!(
                status.code(),
                Code::InvalidArgument | Code::ResourceExhausted
            ),
            "{status:?}"
        );
        assert!(
            named_field(status.message()).is_some_and(|f| names(f, "labels")),
            "{status:?}"
        );
        assert!(took < std::time::Duration::from_secs(1), "took {took:?}");
        check_unchanged(&before, &after).expect("nothing changed");
    });
}
