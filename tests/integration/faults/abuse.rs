//! The abuse section: a hostile or careless caller, against real manager and runner
//! processes with authentication on, must not exhaust the manager, starve another
//! tenant, stop the service or learn what another tenant has. Sizes are cut so CI stays
//! fast; the README's "Limits and quotas" section gives the full-size run.
//!
//! | test | abuse |
//! |---|---|
//! | `a_heartbeat_flood_from_one_tenant_leaves_another_tenants_lease_alone` | 10,000-lease heartbeats from another tenant |
//! | `another_tenants_ids_answer_exactly_like_unknown_ids` | another tenant's runner, session, run and request ids |
//! | `stalled_watchers_and_huge_pages_keep_the_manager_small` | watchers that never read, 1,000-event pages of 200 KiB events |
//! | `message_limits_and_quotas_refuse_with_resource_exhausted` | a 5 MiB request; pending runs, watchers, commands, event bytes past their quotas |
//! | `a_runner_whose_key_is_revoked_is_cut_off_and_gets_no_new_run` | runner key revoked while its Connect stream is open |
//! | `watchers_whose_key_is_revoked_are_ended` | client key revoked during WatchRun and WatchSession |
//! | `a_key_revoked_on_one_replica_ends_a_watch_on_another` | revocation reaching another replica (NOTIFY) |
//! | `a_key_revoked_by_the_cli_ends_a_watch_at_once` | revocation from `agentrun-manager keys revoke` (NOTIFY) |
//! | `a_watch_ends_when_its_key_expires` | client key expiring during WatchRun |
//! | `idle_sockets_past_the_connection_cap_are_closed_and_keyed_calls_get_through` | 60 idle sockets (no HTTP/2 preface) against a cap of 50 |
//! | `out_of_descriptors_the_manager_backs_off_and_recovers` | idle sockets past `RLIMIT_NOFILE` (EMFILE on accept) |
//! | `the_manager_advertises_its_concurrent_stream_limit` | unbounded streams on one connection |
//! | `undecodable_requests_are_invalid_arguments_and_create_nothing` | garbage bytes, invalid UTF-8 in a string field |
//! | `an_undecodable_first_message_on_the_runner_stream_is_an_invalid_argument` | the same as the runner stream's first message |
//! | `an_undecodable_message_mid_stream_ends_the_runner_stream_with_invalid_argument` | the same after a hello |

use std::collections::BTreeMap;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use agentrun_manager::api::auth::{
    REVOCATION_NOTICE_BOUND, STREAM_RECHECK_BOUND, STREAM_RECHECK_INTERVAL,
};
use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::session_service_client::SessionServiceClient;
use bytes::{Buf, BufMut};
use prost::Message;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic::Request;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;

use super::*;
use crate::operability::{sample, scrape};

/// Creates a key straight in the database, as `agentrun-manager keys create` does.
async fn key(database_url: &str, tenant: &str, role: Role) -> String {
    expiring_key(database_url, tenant, role, None).await
}

async fn expiring_key(
    database_url: &str,
    tenant: &str,
    role: Role,
    expires_at: Option<std::time::SystemTime>,
) -> String {
    let pool = db::pool(database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    api_keys::create(&client, tenant, role, &[], "abuse", expires_at)
        .await
        .expect("create key")
        .key
}

/// Opens a WatchRun of a new (pending, never claimed) run with `key`, and reads its
/// first event so the stream is known to be open.
async fn open_watch(channel: Channel, key: &str) -> tonic::Streaming<proto::Event> {
    let mut client = RunServiceClient::new(channel);
    let run_id = create_keyed(&mut client, key, "watched").await;
    let mut watch = client
        .watch_run(with_key(
            key,
            proto::WatchRunRequest {
                run_id,
                after_seq: 0,
            },
        ))
        .await
        .expect("watch run")
        .into_inner();
    watch.message().await.expect("watch").expect("an event");
    watch
}

/// `message` carrying `key` as a bearer token.
fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ASCII key"),
    );
    request
}

/// Revokes `key` through AdminService on `channel`.
async fn revoke(channel: Channel, admin: &str, key: &str) {
    let (id, _) = api_keys::parse_key(key).expect("a well-formed key");
    AdminServiceClient::new(channel)
        .revoke_api_key(with_key(
            admin,
            proto::RevokeApiKeyRequest {
                key_id: id.simple().to_string(),
            },
        ))
        .await
        .expect("revoke the key");
}

/// `ABUSE_FULL=1` runs the probes at the size the issue found them (slow; see the README).
fn full_size() -> bool {
    std::env::var_os("ABUSE_FULL").is_some()
}

/// A manager process that requires API keys.
async fn secured_manager(database_url: &str, extra_env: &[(&str, &str)]) -> ManagerProcess {
    let mut env = vec![("AGENTRUN_AUTH", "required")];
    env.extend_from_slice(extra_env);
    ManagerProcess::start(database_url, &env).await
}

/// `(lease epoch, attempt, status)` of a run, read from the database.
async fn lease_of(db: &tokio_postgres::Client, run_id: &str) -> (i64, i32, String) {
    let row = db
        .query_one(
            "SELECT lease_epoch, attempt, status FROM runs WHERE id = $1",
            &[&Uuid::parse_str(run_id).expect("run id")],
        )
        .await
        .expect("run row");
    (row.get(0), row.get(1), row.get(2))
}

async fn status(client: &mut RunServiceClient<Channel>, key: &str, run_id: &str) -> RunStatus {
    let run = client
        .get_run(with_key(
            key,
            proto::GetRunRequest {
                run_id: run_id.into(),
            },
        ))
        .await
        .expect("get run")
        .into_inner()
        .run
        .expect("run");
    status_of(&run)
}

async fn create_keyed(client: &mut RunServiceClient<Channel>, key: &str, prompt: &str) -> String {
    client
        .create_run(with_key(key, run_request(prompt)))
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

/// The status `stream` ends with, within `bound` (messages before it are skipped).
async fn ended_with<T: std::fmt::Debug>(
    stream: &mut tonic::Streaming<T>,
    bound: Duration,
) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => panic!("the stream was still open {bound:?} after the revocation"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the stream ended without an error"),
            Ok(Err(status)) => return status,
        }
    }
}

/// Tenant B floods unary `Heartbeat` with made-up leases: half the calls name 10,000
/// (more than the runner can hold), the others 1,000, as fast as they are answered.
/// Tenant A's real runner must keep its run's lease (a 2 s TTL) all along.
#[tokio::test]
async fn a_heartbeat_flood_from_one_tenant_leaves_another_tenants_lease_alone() {
    let flooder_count = if full_size() { 300 } else { 48 };
    let database_url = fresh_database().await;
    let manager = secured_manager(
        &database_url,
        &[
            ("AGENTRUN_LEASE_TTL_MS", "2000"),
            ("AGENTRUN_HEARTBEAT_INTERVAL_MS", "400"),
        ],
    )
    .await;
    let (a_runner, a_client, b_runner) = (
        key(&database_url, "tenant-a", Role::Runner).await,
        key(&database_url, "tenant-a", Role::Client).await,
        key(&database_url, "tenant-b", Role::Runner).await,
    );
    let _runner =
        RunnerProcess::start(manager.addr, "tenant-a", &[("AGENTRUN_API_KEY", &a_runner)]);
    let db = db_client(&database_url).await;
    let mut runs = RunServiceClient::new(manager.channel().await);
    let run_id = runs
        .create_run(with_key(&a_client, run_request("hold the lease [stall]")))
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id;
    wait_for("tenant A's run to be running", LONG, || async {
        (lease_of(&db, &run_id).await.2 == "running").then_some(())
    })
    .await;

    let flood_until = Instant::now() + Duration::from_secs(6);
    let outcomes = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));
    let mut flooders = Vec::new();
    for i in 0..flooder_count {
        let mut runners =
            RunnerServiceClient::new(manager.channel().await).max_encoding_message_size(usize::MAX);
        let (key, outcomes) = (b_runner.clone(), outcomes.clone());
        flooders.push(tokio::spawn(async move {
            // Half the flood names 10,000 leases; the other half as many as the runner
            // can hold (1,000), as fast as it is answered.
            let named = if i % 2 == 0 { 10_000 } else { 1_000 };
            let leases: Vec<proto::LeaseRef> = (0..named)
                .map(|_| proto::LeaseRef {
                    run_id: Uuid::new_v4().to_string(),
                    epoch: 1,
                })
                .collect();
            let identity = proto::RunnerIdentity {
                max_concurrency: 1_000,
                ..runner(&format!("flood-{i}"))
            };
            let runner_id = identity.runner_id.clone();
            runners
                .claim_runs(with_key(
                    &key,
                    proto::ClaimRunsRequest {
                        runner: Some(identity),
                        max_runs: 1,
                    },
                ))
                .await
                .expect("register the flooding runner");
            // Paced, so the flood costs the manager about as much CPU answered at once
            // as it did when each call waited on the shared batch.
            let mut pace = tokio::time::interval(Duration::from_millis(500));
            while Instant::now() < flood_until {
                pace.tick().await;
                let runner_id = runner_id.clone();
                let answer = runners
                    .heartbeat(with_key(
                        &key,
                        proto::HeartbeatRequest {
                            runner_id,
                            leases: leases.clone(),
                        },
                    ))
                    .await;
                let outcome = match answer {
                    Ok(renewed) => {
                        let renewed = renewed.into_inner();
                        assert!(
                            renewed.leases.iter().all(|l| !l.held),
                            "a made-up lease was renewed"
                        );
                        "OK".to_owned()
                    }
                    Err(status) => format!("{:?}", status.code()),
                };
                *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
            }
        }));
    }
    // All through the flood, tenant A's run keeps its first lease.
    while Instant::now() < flood_until {
        let (epoch, attempt, status) = lease_of(&db, &run_id).await;
        assert_eq!(
            (epoch, attempt, status.as_str()),
            (1, 1, "running"),
            "tenant A's run lost its lease during tenant B's heartbeat flood"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for flooder in flooders {
        flooder.await.expect("flooder");
    }
    let outcomes = outcomes.lock().unwrap().clone();
    eprintln!("heartbeat flood answers: {outcomes:?}");
    assert!(
        outcomes.contains_key("InvalidArgument"),
        "heartbeats naming more leases than a runner can hold are refused: {outcomes:?}"
    );
    // One runner beating in a loop, far faster than it is asked to, is rate limited.
    let mut runners = RunnerServiceClient::new(manager.channel().await);
    let identity = runner("eager");
    runners
        .claim_runs(with_key(
            &b_runner,
            proto::ClaimRunsRequest {
                runner: Some(identity.clone()),
                max_runs: 1,
            },
        ))
        .await
        .expect("register the eager runner");
    let mut refused = None;
    for _ in 0..100 {
        let beat = proto::HeartbeatRequest {
            runner_id: identity.runner_id.clone(),
            leases: vec![],
        };
        if let Err(status) = runners.heartbeat(with_key(&b_runner, beat)).await {
            refused = Some(status);
            break;
        }
    }
    let refused = refused.expect("100 heartbeats in a row are refused at some point");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("heartbeat rate limit"),
        "{refused:?}"
    );
    let (epoch, attempt, status) = lease_of(&db, &run_id).await;
    assert_eq!((epoch, attempt, status.as_str()), (1, 1, "running"));
    assert_invariants(&db, Settled::InFlight, &[]).await;
}

/// `(code, message, details)` of a refusal: what a caller learns from it, byte for byte.
fn answer<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, String, Vec<u8>) {
    let status = result.expect_err("a refusal");
    (
        status.code(),
        status.message().to_owned(),
        status.details().to_vec(),
    )
}

/// Ids are per tenant: tenant B naming tenant A's runner, session, run or request learns
/// exactly what naming an id nobody uses would tell it, and changes nothing of A's.
#[tokio::test]
async fn another_tenants_ids_answer_exactly_like_unknown_ids() {
    let database_url = fresh_database().await;
    let manager = secured_manager(&database_url, &[]).await;
    let channel = manager.channel().await;
    let mut runs = RunServiceClient::new(channel.clone());
    let mut runners = RunnerServiceClient::new(channel.clone());
    let mut sessions = proto::session_service_client::SessionServiceClient::new(channel.clone());
    let mut admin = proto::admin_service_client::AdminServiceClient::new(channel);
    let (a_client, a_runner) = (
        key(&database_url, "tenant-a", Role::Client).await,
        key(&database_url, "tenant-a", Role::Runner).await,
    );
    let (b_client, b_runner) = (
        key(&database_url, "tenant-b", Role::Client).await,
        key(&database_url, "tenant-b", Role::Runner).await,
    );
    let operator = key(&database_url, "ops", Role::Admin).await;

    // Tenant A: a run in a session, claimed by A's runner, waiting on a request.
    let session_id = Uuid::now_v7().to_string();
    let a_run = runs
        .create_run(with_key(
            &a_client,
            proto::CreateRunRequest {
                session_id: session_id.clone(),
                ..run_request("tenant A's secret plan")
            },
        ))
        .await
        .expect("A creates a run")
        .into_inner()
        .run
        .expect("run");
    let a_identity = runner("a-runner");
    let claimed = |key: &str, identity: &proto::RunnerIdentity| {
        with_key(
            key,
            proto::ClaimRunsRequest {
                runner: Some(identity.clone()),
                max_runs: 1,
            },
        )
    };
    let a_assignment = runners
        .claim_runs(claimed(&a_runner, &a_identity))
        .await
        .expect("A claims")
        .into_inner()
        .assignments
        .pop()
        .expect("A's run is assigned to A's runner");
    let request_id = Uuid::new_v4().to_string();
    let opened = |seq: i64| proto::RunnerEvent {
        runner_seq: seq,
        r#type: "request.opened".into(),
        payload_json: serde_json::json!({"request_id": request_id, "kind": "tool"}).to_string(),
    };
    runners
        .append_events(with_key(
            &a_runner,
            append(&a_identity, &a_assignment, vec![opened(1)]),
        ))
        .await
        .expect("A's runner opens a request");

    // Tenant B reuses A's session id and A's runner id, and opens a request with A's
    // request id: each is accepted as B's own, exactly as a fresh id would be.
    let b_run = runs
        .create_run(with_key(
            &b_client,
            proto::CreateRunRequest {
                session_id: session_id.clone(),
                ..run_request("tenant B")
            },
        ))
        .await
        .expect("B may use any session id of its own, even one tenant A uses")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(b_run.session_id, session_id);
    let b_identity = proto::RunnerIdentity {
        runner_id: a_identity.runner_id.clone(),
        ..runner("b-runner")
    };
    let b_assignment = runners
        .claim_runs(claimed(&b_runner, &b_identity))
        .await
        .expect("B claims with A's runner id")
        .into_inner()
        .assignments
        .pop()
        .expect("B's run is assigned to B's runner");
    assert_eq!(b_assignment.run.as_ref().expect("run").run_id, b_run.run_id);
    assert!(
        b_assignment
            .context
            .iter()
            .all(|c| !format!("{c:?}").contains("secret plan")),
        "B's run got context from A's session: {:?}",
        b_assignment.context
    );
    runners
        .append_events(with_key(
            &b_runner,
            append(&b_identity, &b_assignment, vec![opened(1)]),
        ))
        .await
        .expect("B's runner may open a request with an id tenant A uses");

    // A's runner row, session and request are untouched.
    let listed = admin
        .list_runners(with_key(&operator, proto::ListRunnersRequest {}))
        .await
        .expect("list runners")
        .into_inner()
        .runners;
    let named: Vec<(&str, &str)> = listed
        .iter()
        .filter(|r| r.runner_id == a_identity.runner_id)
        .map(|r| (r.tenant_id.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(named.len(), 2, "one runner row per tenant: {named:?}");
    assert!(named.contains(&("tenant-a", "a-runner")), "{named:?}");
    assert!(named.contains(&("tenant-b", "b-runner")), "{named:?}");
    let a_session = sessions
        .get_session(with_key(
            &a_client,
            proto::GetSessionRequest {
                session_id: session_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .expect("A's session")
        .into_inner()
        .session
        .and_then(|view| view.session)
        .expect("session");
    assert_eq!(
        a_session.last_run_id, a_run.run_id,
        "B's run joined A's session"
    );

    // Everything else B might name of A's answers like an id nobody uses.
    let private_session = Uuid::now_v7().to_string();
    runs.create_run(with_key(
        &a_client,
        proto::CreateRunRequest {
            session_id: private_session.clone(),
            ..run_request("tenant A, alone")
        },
    ))
    .await
    .expect("A creates a run in a session B never named");
    let unknown_run = Uuid::now_v7().to_string();
    for (what, theirs, unknown) in [
        ("run", a_run.run_id.as_str(), unknown_run.as_str()),
        ("session", private_session.as_str(), unknown_run.as_str()),
    ] {
        let mut probes = Vec::new();
        for id in [theirs, unknown] {
            let id = id.to_owned();
            let probe = match what {
                "run" => vec![
                    answer(
                        runs.get_run(with_key(
                            &b_client,
                            proto::GetRunRequest { run_id: id.clone() },
                        ))
                        .await,
                    ),
                    answer(
                        runs.cancel_run(with_key(
                            &b_client,
                            proto::CancelRunRequest {
                                run_id: id.clone(),
                                ..Default::default()
                            },
                        ))
                        .await,
                    ),
                    answer(
                        runs.list_events(with_key(
                            &b_client,
                            proto::ListEventsRequest {
                                run_id: id.clone(),
                                ..Default::default()
                            },
                        ))
                        .await,
                    ),
                    answer(
                        runs.resolve_request(with_key(
                            &b_client,
                            proto::ResolveRequestRequest {
                                run_id: id.clone(),
                                request_id: request_id.clone(),
                                ..Default::default()
                            },
                        ))
                        .await,
                    ),
                    answer(
                        runs.watch_run(with_key(
                            &b_client,
                            proto::WatchRunRequest {
                                run_id: id.clone(),
                                ..Default::default()
                            },
                        ))
                        .await,
                    ),
                ],
                _ => vec![answer(
                    sessions
                        .get_session(with_key(
                            &b_client,
                            proto::GetSessionRequest {
                                session_id: id.clone(),
                                ..Default::default()
                            },
                        ))
                        .await,
                )],
            };
            probes.push(probe);
        }
        assert_eq!(
            probes[0], probes[1],
            "tenant A's {what} vs an unknown {what}"
        );
    }
    let (_, _, status) = lease_of(&db_client(&database_url).await, &a_run.run_id).await;
    assert_eq!(status, "waiting", "A's run is untouched");
}

#[tokio::test]
async fn a_runner_whose_key_is_revoked_is_cut_off_and_gets_no_new_run() {
    let url = fresh_database().await;
    let metrics = free_addr();
    let manager = secured_manager(&url, &[("AGENTRUN_METRICS_LISTEN", &metrics.to_string())]).await;
    let admin = key(&url, "acme", Role::Admin).await;
    let client_key = key(&url, "acme", Role::Client).await;
    let revoked_key = key(&url, "acme", Role::Runner).await;
    let good_key = key(&url, "acme", Role::Runner).await;
    let mut client = RunServiceClient::new(manager.channel().await);
    let connect_refused = |text: &str| {
        sample(
            text,
            "grpc_server_handled_total",
            &[
                ("grpc_service", "agentrun.v1.RunnerService"),
                ("grpc_method", "Connect"),
                ("grpc_code", "Unauthenticated"),
            ],
        )
    };

    // Proven connected: it takes a run to the end. Slow tokens, so the next run is
    // still held when the key is revoked.
    let _revoked_runner = RunnerProcess::start(
        manager.addr,
        "revoked",
        &[
            ("AGENTRUN_API_KEY", revoked_key.as_str()),
            ("AGENTRUN_MAX_BACKOFF_MS", "200"),
            ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "100"),
        ],
    );
    let before = create_keyed(&mut client, &client_key, "before the revocation").await;
    wait_for("the first run to complete", LONG, || {
        let mut client = client.clone();
        let (client_key, before) = (client_key.clone(), before.clone());
        async move {
            (status(&mut client, &client_key, &before).await == RunStatus::Completed).then_some(())
        }
    })
    .await;
    let held = create_keyed(&mut client, &client_key, "[tokens:300] held").await;
    wait_for("the revoked runner to be running a run", LONG, || {
        let mut client = client.clone();
        let (client_key, held) = (client_key.clone(), held.clone());
        async move {
            (status(&mut client, &client_key, &held).await == RunStatus::Running).then_some(())
        }
    })
    .await;
    let refused_before = connect_refused(&scrape(metrics).await);

    revoke(manager.channel().await, &admin, &revoked_key).await;
    let revoked_at = Instant::now();
    let after = create_keyed(&mut client, &client_key, "after the revocation").await;
    // The stream is gone (no runner connected) and the runner's reconnections are
    // refused UNAUTHENTICATED, within the bound.
    wait_for(
        "the revoked runner's stream to end and its reconnections to be refused",
        LONG,
        || async {
            let text = scrape(metrics).await;
            (sample(&text, "agentrun_connected_runners", &[]) == 0.0
                && connect_refused(&text) >= refused_before + 2.0)
                .then_some(())
        },
    )
    .await;
    assert!(
        revoked_at.elapsed() <= STREAM_RECHECK_BOUND,
        "the runner was cut off only after {:?}",
        revoked_at.elapsed()
    );
    // It keeps knocking and is refused again and again; the run created after the
    // revocation stays queued all the while.
    let knocking_from = connect_refused(&scrape(metrics).await);
    wait_for("more refused reconnections", LONG, || {
        let mut client = client.clone();
        let (client_key, after) = (client_key.clone(), after.clone());
        async move {
            assert_eq!(
                status(&mut client, &client_key, &after).await,
                RunStatus::Pending,
                "a runner whose key was revoked got a run"
            );
            (connect_refused(&scrape(metrics).await) >= knocking_from + 3.0).then_some(())
        }
    })
    .await;

    // A runner with a valid key takes it, and the run the revoked runner held (its
    // lease expired, as for any runner gone away): nothing is lost.
    let _good_runner = RunnerProcess::start(
        manager.addr,
        "good",
        &[("AGENTRUN_API_KEY", good_key.as_str())],
    );
    for run in [&after, &held] {
        wait_for("the queued runs to complete", LONG, || {
            let mut client = client.clone();
            let (client_key, run) = (client_key.clone(), run.clone());
            async move {
                (status(&mut client, &client_key, &run).await == RunStatus::Completed).then_some(())
            }
        })
        .await;
    }
    assert_invariants(&db_client(&url).await, Settled::AllTerminal, &[]).await;
}

#[tokio::test]
async fn watchers_whose_key_is_revoked_are_ended() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[]).await;
    let admin = key(&url, "acme", Role::Admin).await;
    let watcher = key(&url, "acme", Role::Client).await;
    let channel = manager.channel().await;
    let mut client = RunServiceClient::new(channel.clone());
    let mut sessions = SessionServiceClient::new(channel.clone());

    // No runner: the run stays pending and both watches stay open, waiting.
    let session_id = Uuid::new_v4().to_string();
    let mut request = run_request("watched");
    request.session_id = session_id.clone();
    let run_id = client
        .create_run(with_key(&watcher, request))
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id;
    let mut run_watch = client
        .watch_run(with_key(
            &watcher,
            proto::WatchRunRequest {
                run_id: run_id.clone(),
                after_seq: 0,
            },
        ))
        .await
        .expect("watch run")
        .into_inner();
    let mut session_watch = sessions
        .watch_session(with_key(
            &watcher,
            proto::WatchSessionRequest {
                session_id,
                ..Default::default()
            },
        ))
        .await
        .expect("watch session")
        .into_inner();
    // Both are open and delivering (the run's first event).
    run_watch
        .message()
        .await
        .expect("watch run")
        .expect("an event");
    session_watch
        .message()
        .await
        .expect("watch session")
        .expect("an event");

    revoke(channel, &admin, &watcher).await;
    for status in [
        ended_with(&mut run_watch, STREAM_RECHECK_BOUND).await,
        ended_with(&mut session_watch, STREAM_RECHECK_BOUND).await,
    ] {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("revoked"), "{status:?}");
    }
}

#[tokio::test]
async fn a_key_revoked_on_one_replica_ends_a_watch_on_another() {
    let url = fresh_database().await;
    let (one, two) = tokio::join!(secured_manager(&url, &[]), secured_manager(&url, &[]));
    let admin = key(&url, "acme", Role::Admin).await;
    let watcher = key(&url, "acme", Role::Client).await;
    let mut watch = open_watch(two.channel().await, &watcher).await;

    // Replica two has the key cached; replica one revokes it. Within the NOTIFY bound
    // (well under the cache's lifetime and the recheck period) the watch on two ends.
    revoke(one.channel().await, &admin, &watcher).await;
    let status = ended_with(&mut watch, REVOCATION_NOTICE_BOUND).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
}

#[tokio::test]
async fn a_key_revoked_by_the_cli_ends_a_watch_at_once() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[]).await;
    let watcher = key(&url, "acme", Role::Client).await;
    let mut watch = open_watch(manager.channel().await, &watcher).await;
    let (id, _) = api_keys::parse_key(&watcher).expect("a well-formed key");
    let revoked = std::process::Command::new(binary("agentrun-manager"))
        .env("DATABASE_URL", &url)
        .args(["keys", "revoke", &id.simple().to_string()])
        .output()
        .expect("run agentrun-manager keys revoke");
    assert!(revoked.status.success(), "{revoked:?}");
    let status = ended_with(&mut watch, REVOCATION_NOTICE_BOUND).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
}

#[tokio::test]
async fn a_watch_ends_when_its_key_expires() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[]).await;
    let expires_at = std::time::SystemTime::now() + Duration::from_secs(3);
    let watcher = expiring_key(&url, "acme", Role::Client, Some(expires_at)).await;
    let mut watch = open_watch(manager.channel().await, &watcher).await;
    let until_expiry = expires_at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    let status = ended_with(&mut watch, until_expiry + STREAM_RECHECK_INTERVAL).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{status:?}");
    assert!(
        std::time::SystemTime::now() >= expires_at,
        "ended before its key expired"
    );
}

/// The CPU time (user + system) the process has used so far, from `/proc/<pid>/stat`.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    // The command name may hold spaces: count fields after its closing parenthesis,
    // where field 3 (state) starts; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("a command name") + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Opens `n` TCP connections that never send a byte (not even the HTTP/2 preface).
async fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        // The kernel completes the TCP handshake from the listen backlog, so this
        // succeeds whether or not the manager has accepted the connection yet.
        sockets.push(TcpStream::connect(addr).await.expect("connect"));
    }
    sockets
}

/// Whether the peer closes `socket` (EOF or reset) before `deadline`; what it sent
/// first (its SETTINGS, a GOAWAY) is read and discarded.
async fn closed_by_peer(socket: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout_at(deadline.into(), closed)
        .await
        .is_ok()
}

/// Asserts every socket is closed by the manager before `deadline`.
async fn assert_all_closed(sockets: &mut [TcpStream], deadline: Instant) {
    for (i, socket) in sockets.iter_mut().enumerate() {
        assert!(
            closed_by_peer(socket, deadline).await,
            "idle socket {i} of {} still open: a connection that never sent the HTTP/2 \
             preface must be closed after the handshake timeout",
            sockets.len()
        );
    }
}

/// A client key's CreateRun on a new connection, which must be served within `within`.
async fn keyed_call_served(addr: SocketAddr, key: &str, within: Duration) -> proto::Run {
    let mut client = RunServiceClient::new(lazy_channel(addr));
    tokio::time::timeout(
        within,
        client.create_run(with_key(key, run_request("still served"))),
    )
    .await
    .unwrap_or_else(|_| panic!("a keyed call on a new connection was not served within {within:?}"))
    .expect("create run")
    .into_inner()
    .run
    .expect("a created run")
}

/// CPU used by the manager while the test held its sockets: a spinning accept loop
/// takes a whole core, so anything near the wall time fails.
fn assert_not_spinning(pid: i32, cpu_before: Duration, started: Instant) {
    let (cpu, wall) = (cpu_time(pid) - cpu_before, started.elapsed());
    assert!(
        cpu < wall / 2,
        "the manager used {cpu:?} of CPU in {wall:?} while idle sockets were held"
    );
}

#[tokio::test]
async fn idle_sockets_past_the_connection_cap_are_closed_and_keyed_calls_get_through() {
    let url = fresh_database().await;
    let timeout = Duration::from_millis(1_000);
    let manager = secured_manager(
        &url,
        &[
            ("AGENTRUN_MAX_CONNECTIONS", "50"),
            ("AGENTRUN_HANDSHAKE_TIMEOUT_MS", "1000"),
        ],
    )
    .await;
    let key = key(&url, "acme", Role::Client).await;

    let (cpu_before, started) = (cpu_time(manager.pid()), Instant::now());
    // 50 are accepted and hold the cap; 10 wait in the listen backlog, as does the
    // keyed call's connection behind them.
    let mut sockets = idle_sockets(manager.addr, 60).await;
    let run = keyed_call_served(manager.addr, &key, Duration::from_secs(20)).await;
    assert_eq!(status_of(&run), RunStatus::Pending);
    // The first 50 go after one timeout, the 10 behind them after a second one; slack
    // for a small shared machine.
    assert_all_closed(&mut sockets, started + 2 * timeout + Duration::from_secs(8)).await;
    assert_not_spinning(manager.pid(), cpu_before, started);
}

#[tokio::test]
async fn out_of_descriptors_the_manager_backs_off_and_recovers() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[("AGENTRUN_HANDSHAKE_TIMEOUT_MS", "1000")]).await;
    let key = key(&url, "acme", Role::Client).await;
    // Warm the manager's database pool while descriptors are plentiful.
    keyed_call_served(manager.addr, &key, LONG).await;

    // Leave the manager 16 descriptors: 60 idle sockets exhaust them (EMFILE on accept).
    let pid = manager.pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the manager's descriptors")
        .count() as u64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with no new limit only writes the current one into `limit`.
    let read = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut limit) };
    assert_eq!(read, 0, "prlimit: {}", std::io::Error::last_os_error());
    limit.rlim_cur = open + 16;
    // SAFETY: prlimit reads `limit` and writes nothing (no old-limit pointer).
    let lowered = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(lowered, 0, "prlimit: {}", std::io::Error::last_os_error());

    let (cpu_before, started) = (cpu_time(pid), Instant::now());
    let mut sockets = idle_sockets(manager.addr, 60).await;
    // Served once the idle sockets' descriptors come back (16 per handshake timeout).
    keyed_call_served(manager.addr, &key, LONG).await;
    assert_all_closed(&mut sockets, Instant::now() + LONG).await;
    assert_not_spinning(pid, cpu_before, started);
}

#[tokio::test]
async fn the_manager_advertises_its_concurrent_stream_limit() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[("AGENTRUN_MAX_CONCURRENT_STREAMS", "7")]).await;
    let tcp = TcpStream::connect(manager.addr).await.expect("connect");
    let (_requests, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    // The limit arrives in the server's SETTINGS; driving the connection reads them.
    let advertised = tokio::time::timeout(
        Duration::from_secs(10),
        poll_fn(|cx| {
            if let Poll::Ready(ended) = Pin::new(&mut connection).poll(cx) {
                panic!("the connection ended: {ended:?}");
            }
            match connection.max_concurrent_send_streams() {
                7 => Poll::Ready(()),
                _ => Poll::Pending,
            }
        }),
    )
    .await;
    assert!(
        advertised.is_ok(),
        "SETTINGS_MAX_CONCURRENT_STREAMS 7 not advertised (the client may open {})",
        connection.max_concurrent_send_streams()
    );
}

/// Sends the request's bytes as they are, and takes the response's as they come.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// `message` encoded, with `marker` (which must occur once) replaced by as many bytes
/// that are not UTF-8: still well-formed protobuf, but a string field is not a string.
fn with_invalid_utf8(message: &impl Message, marker: &str) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker.as_bytes())
        .expect("the marker is in the encoding");
    bytes[at..at + marker.len()].fill(0xff);
    bytes
}

/// Protobuf that does not decode: a varint that never ends.
const GARBAGE: [u8; 12] = [0xff; 12];

#[tokio::test]
async fn undecodable_requests_are_invalid_arguments_and_create_nothing() {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[]).await;
    let key = key(&url, "acme", Role::Client).await;
    let mut grpc = tonic::client::Grpc::new(lazy_channel(manager.addr));
    let path = PathAndQuery::from_static("/agentrun.v1.RunService/CreateRun");

    let not_utf8 = with_invalid_utf8(&run_request("MARKER"), "MARKER");
    for (what, body, names) in [
        ("garbage", GARBAGE.to_vec(), "varint"),
        ("invalid UTF-8", not_utf8, "UTF-8"),
    ] {
        grpc.ready().await.expect("channel ready");
        let status = grpc
            .unary(with_key(&key, body), path.clone(), RawCodec)
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(names),
            "{what}: the message should name the problem: {status:?}"
        );
    }
    let db = db_client(&url).await;
    let runs: i64 = db
        .query_one("SELECT count(*) FROM runs", &[])
        .await
        .expect("count runs")
        .get(0);
    assert_eq!(runs, 0, "an undecodable request created a run");
}

/// Opens the runner stream with a runner key, sends `messages` (raw), and returns the
/// status the stream ends with, or `None` when it ends without an error.
async fn connect_status(messages: Vec<Vec<u8>>) -> Option<tonic::Status> {
    let url = fresh_database().await;
    let manager = secured_manager(&url, &[]).await;
    let key = key(&url, "acme", Role::Runner).await;
    let mut grpc = tonic::client::Grpc::new(lazy_channel(manager.addr));
    let path = PathAndQuery::from_static("/agentrun.v1.RunnerService/Connect");
    grpc.ready().await.expect("channel ready");
    let call = grpc.streaming(with_key(&key, tokio_stream_of(messages)), path, RawCodec);
    let ended = async {
        let mut stream = match call.await {
            Err(status) => return Some(status),
            Ok(response) => response.into_inner(),
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    };
    tokio::time::timeout(LONG, ended)
        .await
        .expect("the runner stream ended")
}

/// A runner's hello, encoded.
fn hello_bytes() -> Vec<u8> {
    proto::RunnerMessage {
        body: Some(ToManager::Hello(proto::Hello {
            runner: Some(runner("abuse")),
            held_leases: vec![],
        })),
    }
    .encode_to_vec()
}

#[tokio::test]
async fn an_undecodable_first_message_on_the_runner_stream_is_an_invalid_argument() {
    let status = connect_status(vec![GARBAGE.to_vec()])
        .await
        .expect("an error status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("varint"), "{status:?}");
}

#[tokio::test]
async fn an_undecodable_message_mid_stream_ends_the_runner_stream_with_invalid_argument() {
    let status = connect_status(vec![hello_bytes(), GARBAGE.to_vec()])
        .await
        .expect("an error status, not a clean end");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("varint"), "{status:?}");
}

/// The items, then a stream that stays open (as a runner's would).
fn tokio_stream_of(
    items: Vec<Vec<u8>>,
) -> impl tonic::codegen::tokio_stream::Stream<Item = Vec<u8>> + Send + 'static {
    let (tx, rx) = mpsc::channel(items.len().max(1));
    for item in items {
        tx.try_send(item).expect("room for every item");
    }
    // Keep the sender alive with the stream so the request does not end.
    tokio::spawn(async move {
        tx.closed().await;
    });
    ReceiverStream::new(rx)
}

/// A line of `/proc/<pid>/status` in kB (`VmRSS`, `VmHWM`), as MiB.
fn memory_mib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a memory line");
    kb / 1024
}

/// Claims a fresh run of `key`'s tenant with a new runner; returns the runner and lease.
async fn claim_one(
    runners: &mut RunnerServiceClient<Channel>,
    key: &str,
) -> (proto::RunnerIdentity, proto::Assignment) {
    let identity = runner("abuse");
    let request = || {
        with_key(
            key,
            proto::ClaimRunsRequest {
                runner: Some(identity.clone()),
                max_runs: 1,
            },
        )
    };
    let assignment = wait_for("a run to claim", LONG, || {
        let mut runners = runners.clone();
        let request = request();
        async move {
            runners
                .claim_runs(request)
                .await
                .ok()?
                .into_inner()
                .assignments
                .pop()
        }
    })
    .await;
    (identity, assignment)
}

/// `n` content deltas of `bytes` each, from runner_seq `from`.
fn big_deltas(from: i64, n: usize, bytes: usize) -> Vec<proto::RunnerEvent> {
    (0..n as i64)
        .map(|i| proto::RunnerEvent {
            runner_seq: from + i,
            r#type: "content.delta".into(),
            payload_json: serde_json::json!({"kind": "assistant_text", "delta": "x".repeat(bytes)})
                .to_string(),
        })
        .collect()
}

/// The manager's peak memory stays bounded while clients hold stalled watches of a
/// large log and ask for 1,000-event pages of it: pages and buffers are cut by bytes.
/// (The issue's probe: ~180 MB per stalled watcher, ~200 MB per page, 2.4 GiB for six.)
#[tokio::test]
async fn stalled_watchers_and_huge_pages_keep_the_manager_small() {
    // Of 200 KiB each: a 30 MiB log (200 MiB at full size).
    let events: usize = if full_size() { 1_000 } else { 150 };
    const PEAK_MIB: u64 = 200;
    let url = fresh_database().await;
    // The test appends without heartbeats: a lease that outlasts it.
    let manager = secured_manager(&url, &[("AGENTRUN_LEASE_TTL_MS", "300000")]).await;
    let (client_key, runner_key) = (
        key(&url, "acme", Role::Client).await,
        key(&url, "acme", Role::Runner).await,
    );
    let channel = manager.channel().await;
    let mut runs = RunServiceClient::new(channel.clone());
    let mut runners = RunnerServiceClient::new(channel.clone());
    let run_id = create_keyed(&mut runs, &client_key, "a long answer").await;
    let (identity, lease) = claim_one(&mut runners, &runner_key).await;
    for chunk in 0..events / 3 {
        let events = big_deltas(1 + 3 * chunk as i64, 3, 200 * 1024);
        runners
            .append_events(with_key(&runner_key, append(&identity, &lease, events)))
            .await
            .expect("append 600 KiB");
    }

    // Six watchers that never read, from the start of the log.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut client = RunServiceClient::new(lazy_channel(manager.addr));
        let watch = client
            .watch_run(with_key(
                &client_key,
                proto::WatchRunRequest {
                    run_id: run_id.clone(),
                    after_seq: 0,
                },
            ))
            .await
            .expect("watch");
        stalled.push((client, watch));
    }
    // Six readers asking for 1,000 events a page, all at once, paging to the end.
    let readers = (0..6).map(|_| {
        let mut client = RunServiceClient::new(lazy_channel(manager.addr));
        let (key, run_id) = (client_key.clone(), run_id.clone());
        async move {
            let (mut after_seq, mut seen, mut largest) = (0, 0, 0);
            loop {
                let page = client
                    .list_events(with_key(
                        &key,
                        proto::ListEventsRequest {
                            run_id: run_id.clone(),
                            after_seq,
                            limit: 1000,
                        },
                    ))
                    .await
                    .expect("a page of events")
                    .into_inner();
                largest = largest.max(page.encoded_len());
                let Some(last) = page.events.last() else {
                    break;
                };
                assert_eq!(page.events[0].seq, after_seq + 1, "pages have no gap");
                after_seq = last.seq;
                seen += page.events.len();
                if after_seq >= page.last_seq {
                    break;
                }
            }
            (seen, largest)
        }
    });
    let readers: Vec<_> = readers.map(tokio::spawn).collect();
    for reader in readers {
        let (seen, largest) = reader.await.expect("reader");
        assert!(seen > events, "every event was paged through: {seen}");
        assert!(largest < 4 * 1024 * 1024, "a page of {largest} bytes");
    }
    let peak = memory_mib(manager.pid(), "VmHWM");
    eprintln!(
        "manager peak RSS {peak} MiB, now {} MiB",
        memory_mib(manager.pid(), "VmRSS")
    );
    assert!(
        peak < PEAK_MIB,
        "the manager peaked at {peak} MiB (bound {PEAK_MIB} MiB)"
    );
    drop(stalled);
}

/// A request over the message size limit is RESOURCE_EXHAUSTED naming the limit, and
/// the quotas refuse the call that would pass them, RESOURCE_EXHAUSTED naming the
/// setting, while other tenants carry on.
#[tokio::test]
async fn message_limits_and_quotas_refuse_with_resource_exhausted() {
    let url = fresh_database().await;
    let manager = secured_manager(
        &url,
        &[
            ("AGENTRUN_TENANT_MAX_PENDING_RUNS", "3"),
            ("AGENTRUN_TENANT_MAX_WATCHERS", "2"),
            ("AGENTRUN_MAX_COMMANDS_PER_RUN", "3"),
            ("AGENTRUN_MAX_RUN_EVENT_BYTES", "100000"),
            ("AGENTRUN_LEASE_TTL_MS", "300000"),
        ],
    )
    .await;
    let (a, b, a_runner) = (
        key(&url, "tenant-a", Role::Client).await,
        key(&url, "tenant-b", Role::Client).await,
        key(&url, "tenant-a", Role::Runner).await,
    );
    let channel = manager.channel().await;
    let mut runs = RunServiceClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
    let mut runners = RunnerServiceClient::new(channel.clone());
    let refused = |result: Result<_, tonic::Status>, names: &str| {
        let (code, message, _) = answer(result);
        assert_eq!(code, Code::ResourceExhausted, "{message}");
        assert!(message.contains(names), "{message:?} should name {names}");
    };

    // A 5 MiB request: over the 4 MiB message limit.
    let huge = proto::CreateRunRequest {
        input_json: serde_json::json!({"prompt": "x".repeat(5 << 20)}).to_string(),
        ..run_request("")
    };
    refused(
        runs.create_run(with_key(&a, huge)).await.map(|_| ()),
        "over the limit of 4194304 bytes",
    );

    // Pending runs per tenant.
    let mut pending = Vec::new();
    for i in 0..3 {
        pending.push(create_keyed(&mut runs, &a, &format!("queued {i}")).await);
    }
    refused(
        runs.create_run(with_key(&a, run_request("one too many")))
            .await
            .map(|_| ()),
        "--tenant-max-pending-runs",
    );
    create_keyed(&mut runs, &b, "tenant B is not held back").await;

    // Open watchers per tenant (on this replica), given back when a watch ends.
    let watch = |key: &str, run_id: &str| {
        with_key(
            key,
            proto::WatchRunRequest {
                run_id: run_id.to_owned(),
                after_seq: 0,
            },
        )
    };
    let first = runs
        .watch_run(watch(&a, &pending[0]))
        .await
        .expect("watch 1");
    let _second = runs
        .watch_run(watch(&a, &pending[1]))
        .await
        .expect("watch 2");
    refused(
        runs.watch_run(watch(&a, &pending[2])).await.map(|_| ()),
        "--tenant-max-watchers",
    );
    drop(first);
    wait_for("a watcher's place to be given back", LONG, || {
        let mut runs = runs.clone();
        let request = watch(&a, &pending[2]);
        async move { runs.watch_run(request).await.ok() }
    })
    .await;

    // Commands per run: the first turn and two steers, then no more.
    for text in ["one", "two"] {
        runs.send_command(with_key(
            &a,
            proto::SendCommandRequest {
                run_id: pending[0].clone(),
                kind: proto::CommandKind::Steer as i32,
                payload_json: serde_json::json!({ "text": text }).to_string(),
                ..Default::default()
            },
        ))
        .await
        .expect("a command within the quota");
    }
    refused(
        runs.send_command(with_key(
            &a,
            proto::SendCommandRequest {
                run_id: pending[0].clone(),
                kind: proto::CommandKind::Steer as i32,
                payload_json: r#"{"text": "three"}"#.into(),
                ..Default::default()
            },
        ))
        .await
        .map(|_| ()),
        "--max-commands-per-run",
    );

    // Event payload bytes per run: 30 KB appends until the 100 kB quota.
    let (identity, lease) = claim_one(&mut runners, &a_runner).await;
    for i in 0..3 {
        runners
            .append_events(with_key(
                &a_runner,
                append(&identity, &lease, big_deltas(1 + i, 1, 30_000)),
            ))
            .await
            .expect("an append within the quota");
    }
    refused(
        runners
            .append_events(with_key(
                &a_runner,
                append(&identity, &lease, big_deltas(4, 1, 30_000)),
            ))
            .await
            .map(|_| ()),
        "--max-run-event-bytes",
    );
}

/// 20,000 calls to made-up methods, without a key, leave `/metrics` small: only methods
/// the server serves get a label of their own, the rest count as `other`.
#[tokio::test]
async fn calls_to_unknown_methods_do_not_grow_the_metrics() {
    const CALLS: usize = 20_000;
    const METRICS_BYTES: usize = 64 * 1024;
    let url = fresh_database().await;
    let metrics = free_addr();
    let manager = secured_manager(&url, &[("AGENTRUN_METRICS_LISTEN", &metrics.to_string())]).await;
    let before = scrape(metrics).await.len();
    let callers = (0..16).map(|caller| {
        let channel = lazy_channel(manager.addr);
        tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            for i in (caller..CALLS).step_by(16) {
                let path = format!(
                    "/agentrun.v1.RunService/Probe{i}x{}",
                    Uuid::new_v4().simple()
                );
                grpc.ready().await.expect("channel ready");
                let status = grpc
                    .unary(
                        Request::new(Vec::new()),
                        PathAndQuery::try_from(path).expect("a path"),
                        RawCodec,
                    )
                    .await
                    .expect_err("no such method");
                assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
            }
        })
    });
    for caller in callers.collect::<Vec<_>>() {
        caller.await.expect("caller");
    }
    let text = scrape(metrics).await;
    eprintln!(
        "/metrics: {before} bytes before, {} after {CALLS} unknown methods",
        text.len()
    );
    assert!(
        text.len() < METRICS_BYTES,
        "/metrics grew to {} bytes (bound {METRICS_BYTES})",
        text.len()
    );
    let counted = sample(
        &text,
        "grpc_server_handled_total",
        &[("grpc_method", "unknown"), ("grpc_code", "Unimplemented")],
    );
    assert!(
        counted >= CALLS as f64,
        "unknown calls are still counted: {counted}"
    );
}
