//! The abuse section: a hostile or careless caller, against real manager and runner
//! processes with authentication on, must not exhaust the manager, starve another
//! tenant, stop the service or learn what another tenant has. Sizes are cut so CI stays
//! fast; the README's "Limits and quotas" section gives the full-size run.
//!
//! | test | abuse |
//! |---|---|

use std::collections::BTreeMap;

use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use tonic::Request;

use super::*;

/// Creates a key straight in the database, as `agentrun-manager keys create` does.
pub(crate) async fn key(database_url: &str, tenant: &str, role: Role) -> String {
    let pool = db::pool(database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    api_keys::create(&client, tenant, role, &[], "abuse")
        .await
        .expect("create key")
        .key
}

/// `message` carrying `key` as a bearer token.
pub(crate) fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ASCII key"),
    );
    request
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

/// Tenant B floods unary `Heartbeat` with made-up leases: half the calls name 10,000
/// (more than the runner can hold), the others 1,000, as fast as they are answered.
/// Tenant A's real runner must keep its run's lease (a 1.5 s TTL) all along.
#[tokio::test]
async fn a_heartbeat_flood_from_one_tenant_leaves_another_tenants_lease_alone() {
    const FLOODERS: usize = 48;
    let database_url = fresh_database().await;
    let manager = secured_manager(
        &database_url,
        &[
            ("AGENTRUN_LEASE_TTL_MS", "1500"),
            ("AGENTRUN_HEARTBEAT_INTERVAL_MS", "300"),
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
    for i in 0..FLOODERS {
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
            while Instant::now() < flood_until {
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
