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
