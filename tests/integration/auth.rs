//! Authentication and authorisation: API keys bound to a tenant (and projects) and a role.
//! Each role's limits, tenant isolation by key, revoked keys refused, real runner
//! processes with and without a key (the keyless one provably refused, not merely slow to
//! start), `agentrun-manager keys`, and the refusal of development mode off loopback.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use agentrun_manager::config::AuthMode;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_manager::{Application, db};
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::{Code, Request};

const LONG: Duration = Duration::from_secs(30);

/// A manager that requires API keys.
async fn secured() -> TestApp {
    TestApp::spawn_with(|s| s.auth = AuthMode::Required).await
}

/// Creates a key straight in the database, as `agentrun-manager keys create` does.
async fn key(app: &TestApp, tenant: &str, role: Role, projects: &[&str]) -> String {
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let client = pool.get().await.expect("connection");
    let projects: Vec<String> = projects.iter().map(|p| p.to_string()).collect();
    api_keys::create(&client, tenant, role, &projects, "test", None)
        .await
        .expect("create key")
        .key
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

fn code<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(status) => status.code(),
    }
}

async fn create_run(app: &mut TestApp, key: &str) -> String {
    app.runs
        .create_run(with_key(key, run_request("hello")))
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

async fn claim_with(
    app: &mut TestApp,
    key: &str,
    runner: &proto::RunnerIdentity,
) -> Result<Vec<proto::Assignment>, tonic::Status> {
    Ok(app
        .runners
        .claim_runs(with_key(
            key,
            proto::ClaimRunsRequest {
                runner: Some(runner.clone()),
                max_runs: 10,
            },
        ))
        .await?
        .into_inner()
        .assignments)
}

fn hello(runner: &proto::RunnerIdentity) -> proto::RunnerMessage {
    proto::RunnerMessage {
        body: Some(proto::runner_message::Body::Hello(proto::Hello {
            runner: Some(runner.clone()),
            held_leases: vec![],
        })),
    }
}

#[tokio::test]
async fn missing_and_garbage_keys_are_unauthenticated() {
    let mut app = secured().await;
    let no_key = app.runs.create_run(run_request("hi")).await;
    assert_eq!(code(no_key), Code::Unauthenticated);
    let garbage = app
        .runs
        .create_run(with_key("nonsense", run_request("hi")))
        .await;
    assert_eq!(code(garbage), Code::Unauthenticated);
    // Well formed, but no such key.
    let forged = format!("ark_{}_{}", "0".repeat(32), "a".repeat(64));
    let forged = app
        .runs
        .create_run(with_key(&forged, run_request("hi")))
        .await;
    assert_eq!(code(forged), Code::Unauthenticated);
    // A real key's id with the wrong secret.
    let real = key(&app, "acme", Role::Client, &[]).await;
    let wrong = format!("{}{}", &real[..real.len() - 4], "ffff");
    let wrong = if wrong == real {
        format!("{}{}", &real[..real.len() - 4], "eeee")
    } else {
        wrong
    };
    let wrong = app
        .runs
        .create_run(with_key(&wrong, run_request("hi")))
        .await;
    assert_eq!(code(wrong), Code::Unauthenticated);
    let no_key = app
        .admin
        .get_queue_stats(proto::GetQueueStatsRequest {})
        .await;
    assert_eq!(code(no_key), Code::Unauthenticated);
    let no_key = app
        .runners
        .claim_runs(proto::ClaimRunsRequest {
            runner: Some(runner("r")),
            max_runs: 1,
        })
        .await;
    assert_eq!(code(no_key), Code::Unauthenticated);
}

#[tokio::test]
async fn client_keys_use_runs_and_sessions_but_not_the_runner_or_admin_services() {
    let mut app = secured().await;
    let client = key(&app, "acme", Role::Client, &[]).await;
    let run_id = create_run(&mut app, &client).await;
    let got = app
        .runs
        .get_run(with_key(
            &client,
            proto::GetRunRequest {
                run_id: run_id.clone(),
            },
        ))
        .await
        .expect("get run");
    assert_eq!(got.into_inner().run.unwrap().run_id, run_id);
    let listed = app
        .runs
        .list_runs(with_key(&client, proto::ListRunsRequest::default()))
        .await
        .expect("list runs")
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
    let mut watch = app
        .runs
        .watch_run(with_key(
            &client,
            proto::WatchRunRequest {
                run_id: run_id.clone(),
                after_seq: 0,
            },
        ))
        .await
        .expect("watch run")
        .into_inner();
    let first = watch.message().await.expect("event").expect("an event");
    assert_eq!(first.r#type, "run.created");

    let r = runner("r");
    assert_eq!(
        code(claim_with(&mut app, &client, &r).await),
        Code::PermissionDenied
    );
    let append_req = proto::AppendEventsRequest {
        runner_id: r.runner_id.clone(),
        run_id: run_id.clone(),
        epoch: 1,
        events: deltas(1, 1),
        command_updates: vec![],
    };
    let appended = app
        .runners
        .append_events(with_key(&client, append_req))
        .await;
    assert_eq!(code(appended), Code::PermissionDenied);
    let stream = tonic::codegen::tokio_stream::iter(vec![hello(&r)]);
    let connected = app.runners.connect(with_key(&client, stream)).await;
    assert_eq!(code(connected), Code::PermissionDenied);
    let stats = app
        .admin
        .get_queue_stats(with_key(&client, proto::GetQueueStatsRequest {}))
        .await;
    assert_eq!(code(stats), Code::PermissionDenied);
}

#[tokio::test]
async fn runner_keys_use_the_runner_service_only() {
    let mut app = secured().await;
    let client = key(&app, "acme", Role::Client, &[]).await;
    let runner_key = key(&app, "acme", Role::Runner, &[]).await;
    let run_id = create_run(&mut app, &client).await;
    let r = runner("r");
    let held = claim_with(&mut app, &runner_key, &r).await.expect("claim");
    assert_eq!(held.len(), 1);
    let a = &held[0];
    app.runners
        .heartbeat(with_key(
            &runner_key,
            proto::HeartbeatRequest {
                runner_id: r.runner_id.clone(),
                leases: vec![proto::LeaseRef {
                    run_id: run_id.clone(),
                    epoch: a.epoch,
                }],
            },
        ))
        .await
        .expect("heartbeat");
    app.runners
        .append_events(with_key(&runner_key, append(&r, a, deltas(1, 3))))
        .await
        .expect("append");
    let finished = app
        .runners
        .finish_run(with_key(&runner_key, finish(&r, a, RunStatus::Completed)))
        .await
        .expect("finish")
        .into_inner();
    assert_eq!(status_of(&finished.run.unwrap()), RunStatus::Completed);

    let created = app
        .runs
        .create_run(with_key(&runner_key, run_request("x")))
        .await;
    assert_eq!(code(created), Code::PermissionDenied);
    let got = app
        .runs
        .get_run(with_key(&runner_key, proto::GetRunRequest { run_id }))
        .await;
    assert_eq!(code(got), Code::PermissionDenied);
    let stats = app
        .admin
        .get_queue_stats(with_key(&runner_key, proto::GetQueueStatsRequest {}))
        .await;
    assert_eq!(code(stats), Code::PermissionDenied);
    let drained = app
        .admin
        .drain_runner(with_key(
            &runner_key,
            proto::DrainRunnerRequest {
                runner_id: r.runner_id.clone(),
            },
        ))
        .await;
    assert_eq!(code(drained), Code::PermissionDenied);
}

#[tokio::test]
async fn admin_keys_manage_keys_and_runners_and_revoked_keys_are_refused() {
    let mut app = secured().await;
    let admin = key(&app, "ops", Role::Admin, &[]).await;
    let created = app
        .admin
        .create_api_key(with_key(
            &admin,
            proto::CreateApiKeyRequest {
                tenant_id: "acme".into(),
                role: proto::ApiKeyRole::Client as i32,
                project_ids: vec![],
                name: "ci".into(),
                expires_at: None,
            },
        ))
        .await
        .expect("create api key")
        .into_inner();
    let new_key = created.key.clone();
    let info = created.api_key.expect("key info");
    assert!(new_key.starts_with("ark_"));
    assert_eq!(info.tenant_id, "acme");

    // The new key works, for its tenant.
    let run_id = create_run(&mut app, &new_key).await;

    let listed = app
        .admin
        .list_api_keys(with_key(
            &admin,
            proto::ListApiKeysRequest {
                tenant_id: "acme".into(),
            },
        ))
        .await
        .expect("list api keys")
        .into_inner();
    assert_eq!(listed.api_keys.len(), 1);
    assert_eq!(listed.api_keys[0].key_id, info.key_id);
    assert_eq!(listed.api_keys[0].name, "ci");
    assert!(listed.api_keys[0].revoked_at.is_none());
    let secret = new_key.rsplit('_').next().unwrap();
    assert!(
        !format!("{listed:?}").contains(secret),
        "ListApiKeys must not reveal secrets"
    );
    // Invalid input is refused.
    let bad_role = app
        .admin
        .create_api_key(with_key(
            &admin,
            proto::CreateApiKeyRequest {
                tenant_id: "acme".into(),
                ..Default::default()
            },
        ))
        .await;
    assert_eq!(code(bad_role), Code::InvalidArgument);

    // Cluster-wide operations.
    let stats = app
        .admin
        .get_queue_stats(with_key(&admin, proto::GetQueueStatsRequest {}))
        .await
        .expect("queue stats")
        .into_inner();
    assert!(stats.tenants.iter().any(|t| t.tenant_id == "acme"));
    let runner_key = key(&app, "acme", Role::Runner, &[]).await;
    let r = runner("to-drain");
    let held = claim_with(&mut app, &runner_key, &r).await.expect("claim");
    assert_eq!(held.len(), 1);
    let drained = app
        .admin
        .drain_runner(with_key(
            &admin,
            proto::DrainRunnerRequest {
                runner_id: r.runner_id.clone(),
            },
        ))
        .await
        .expect("drain")
        .into_inner();
    assert!(drained.found);
    // An admin key is not a client key.
    let as_client = app
        .runs
        .get_run(with_key(&admin, proto::GetRunRequest { run_id }))
        .await;
    assert_eq!(code(as_client), Code::PermissionDenied);

    // Revoked through this replica: refused at once; revoking again changes nothing.
    for _ in 0..2 {
        let revoked = app
            .admin
            .revoke_api_key(with_key(
                &admin,
                proto::RevokeApiKeyRequest {
                    key_id: info.key_id.clone(),
                },
            ))
            .await
            .expect("revoke")
            .into_inner();
        assert!(revoked.api_key.unwrap().revoked_at.is_some());
    }
    let refused = app
        .runs
        .create_run(with_key(&new_key, run_request("x")))
        .await;
    assert_eq!(code(refused), Code::Unauthenticated);
    let unknown = app
        .admin
        .revoke_api_key(with_key(
            &admin,
            proto::RevokeApiKeyRequest {
                key_id: uuid::Uuid::new_v4().simple().to_string(),
            },
        ))
        .await;
    assert_eq!(code(unknown), Code::NotFound);
}

#[tokio::test]
async fn a_key_revoked_elsewhere_is_refused_within_the_cache_window() {
    let mut app = secured().await;
    let client = key(&app, "acme", Role::Client, &[]).await;
    // Used once, so this replica has it cached.
    create_run(&mut app, &client).await;
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let (id, _) = api_keys::parse_key(&client).expect("a well-formed key");
    api_keys::revoke(&pool.get().await.unwrap(), id)
        .await
        .expect("revoke");
    let runs = app.runs.clone();
    let refused_after = Instant::now();
    wait_for(
        "the revoked key to be refused",
        Duration::from_secs(10),
        || {
            let mut runs = runs.clone();
            let client = client.clone();
            async move {
                let result = runs
                    .list_runs(with_key(&client, proto::ListRunsRequest::default()))
                    .await;
                match result {
                    Err(status) if status.code() == Code::Unauthenticated => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert!(
        refused_after.elapsed() <= Duration::from_secs(6),
        "refused only after {:?}",
        refused_after.elapsed()
    );
}

#[tokio::test]
async fn tenants_are_isolated_by_their_keys() {
    let mut app = secured().await;
    let client_a = key(&app, "tenant-a", Role::Client, &[]).await;
    let client_b = key(&app, "tenant-b", Role::Client, &[]).await;
    let run_id = create_run(&mut app, &client_a).await;

    let get = app
        .runs
        .get_run(with_key(
            &client_b,
            proto::GetRunRequest {
                run_id: run_id.clone(),
            },
        ))
        .await;
    assert_eq!(code(get), Code::NotFound);
    let cancel = app
        .runs
        .cancel_run(with_key(
            &client_b,
            proto::CancelRunRequest {
                run_id: run_id.clone(),
                reason: "not mine".into(),
            },
        ))
        .await;
    assert_eq!(code(cancel), Code::NotFound);
    let events = app
        .runs
        .list_events(with_key(
            &client_b,
            proto::ListEventsRequest {
                run_id: run_id.clone(),
                after_seq: 0,
                limit: 10,
            },
        ))
        .await;
    assert_eq!(code(events), Code::NotFound);
    let listed = app
        .runs
        .list_runs(with_key(&client_b, proto::ListRunsRequest::default()))
        .await
        .expect("list runs")
        .into_inner();
    assert!(listed.runs.is_empty());

    // The tenant header cannot override the key's tenant.
    let mut spoofed = with_key(
        &client_b,
        proto::GetRunRequest {
            run_id: run_id.clone(),
        },
    );
    spoofed
        .metadata_mut()
        .insert("agentrun-tenant", "tenant-a".parse().unwrap());
    assert_eq!(code(app.runs.get_run(spoofed).await), Code::NotFound);
    let mut spoofed = with_key(&client_b, run_request("spoof"));
    spoofed
        .metadata_mut()
        .insert("agentrun-tenant", "tenant-a".parse().unwrap());
    let made = app.runs.create_run(spoofed).await.unwrap().into_inner();
    let spoofed_id = made.run.unwrap().run_id;
    let owner: String = app
        .db()
        .await
        .query_one(
            "SELECT tenant_id FROM runs WHERE id = $1::text::uuid",
            &[&spoofed_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "tenant-b");

    // Runners: B's never gets A's run (B has its own pending run now), A's does.
    let runner_b = key(&app, "tenant-b", Role::Runner, &[]).await;
    let runner_a = key(&app, "tenant-a", Role::Runner, &[]).await;
    let rb = runner("rb");
    let got_b = claim_with(&mut app, &runner_b, &rb).await.expect("claim b");
    assert!(
        got_b
            .iter()
            .all(|a| a.run.as_ref().unwrap().run_id == spoofed_id),
        "a tenant-b runner claimed another tenant's run"
    );
    assert!(
        got_b
            .iter()
            .all(|a| a.run.as_ref().unwrap().run_id != run_id)
    );
    let ra = runner("ra");
    let got_a = claim_with(&mut app, &runner_a, &ra).await.expect("claim a");
    assert_eq!(got_a.len(), 1);
    assert_eq!(got_a[0].run.as_ref().unwrap().run_id, run_id);

    // A tenant-b runner naming A's runner and lease still cannot write A's run.
    let forged = app
        .runners
        .append_events(with_key(&runner_b, append(&ra, &got_a[0], deltas(1, 1))))
        .await;
    assert_eq!(code(forged), Code::NotFound);
    let forged = app
        .runners
        .finish_run(with_key(
            &runner_b,
            finish(&ra, &got_a[0], RunStatus::Completed),
        ))
        .await;
    assert_eq!(code(forged), Code::NotFound);
    // ... and A's own runner can.
    app.runners
        .append_events(with_key(&runner_a, append(&ra, &got_a[0], deltas(1, 1))))
        .await
        .expect("the holder appends");
}

#[tokio::test]
async fn a_key_bound_to_projects_creates_runs_only_there() {
    let mut app = secured().await;
    let limited = key(&app, "acme", Role::Client, &["alpha"]).await;
    let mut request = run_request("in alpha");
    request.project_id = "alpha".into();
    app.runs
        .create_run(with_key(&limited, request))
        .await
        .expect("its own project");
    let mut request = run_request("in beta");
    request.project_id = "beta".into();
    let refused = app.runs.create_run(with_key(&limited, request)).await;
    assert_eq!(code(refused), Code::PermissionDenied);
    // No project named means `default`, which is not this key's.
    let refused = app
        .runs
        .create_run(with_key(&limited, run_request("x")))
        .await;
    assert_eq!(code(refused), Code::PermissionDenied);
    let listed = app
        .runs
        .list_runs(with_key(&limited, proto::ListRunsRequest::default()))
        .await
        .expect("list runs")
        .into_inner();
    assert_eq!(listed.runs.len(), 1);
}

/// RunnerService calls the manager refused as UNAUTHENTICATED so far, read from its
/// `/metrics` (`grpc_server_handled_total`).
async fn runner_calls_refused(metrics: SocketAddr) -> f64 {
    let mut stream = TcpStream::connect(metrics)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the scrape");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read the scrape");
    response
        .lines()
        .filter(|line| line.starts_with("grpc_server_handled_total{"))
        .filter(|line| {
            line.contains("grpc_service=\"agentrun.v1.RunnerService\"")
                && line.contains("grpc_code=\"Unauthenticated\"")
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_runner_process_needs_a_runner_key() {
    let mut app = TestApp::spawn_with(|s| {
        s.auth = AuthMode::Required;
        s.metrics_listen = "127.0.0.1:0".into();
    })
    .await;
    let metrics = app.metrics_addr.expect("metrics are served");
    let client = key(&app, "acme", Role::Client, &[]).await;
    let runner_key = key(&app, "acme", Role::Runner, &[]).await;
    let admin = key(&app, "acme", Role::Admin, &[]).await;
    let get = |app: &TestApp, run_id: String| {
        let mut runs = app.runs.clone();
        let client = client.clone();
        async move {
            runs.get_run(with_key(&client, proto::GetRunRequest { run_id }))
                .await
                .expect("get run")
                .into_inner()
                .run
                .expect("run")
        }
    };
    let runner_names = |app: &TestApp| {
        let mut admin_client = app.admin.clone();
        let admin = admin.clone();
        async move {
            admin_client
                .list_runners(with_key(&admin, proto::ListRunnersRequest {}))
                .await
                .expect("list runners")
                .into_inner()
                .runners
                .into_iter()
                .map(|r| r.name)
                .collect::<Vec<_>>()
        }
    };

    let run_id = create_run(&mut app, &client).await;
    // The run stays pending while the keyless runner is provably up and knocking: the
    // manager refuses its calls again and again after the run was created (quick
    // retries), and never lists it as connected.
    let refused_before = runner_calls_refused(metrics).await;
    let keyless = RunnerProcess::start(app.addr, "keyless", &[("AGENTRUN_MAX_BACKOFF_MS", "200")]);
    let deadline = Instant::now() + LONG;
    loop {
        let run = get(&app, run_id.clone()).await;
        assert_eq!(
            status_of(&run),
            RunStatus::Pending,
            "a runner without a key got a run"
        );
        let refused = runner_calls_refused(metrics).await - refused_before;
        if refused >= 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the keyless runner was refused only {refused} times: is it running?"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!runner_names(&app).await.contains(&"keyless".to_owned()));
    let events = app
        .runs
        .list_events(with_key(
            &client,
            proto::ListEventsRequest {
                run_id: run_id.clone(),
                limit: 100,
                ..Default::default()
            },
        ))
        .await
        .expect("list events")
        .into_inner()
        .events;
    assert!(
        events.iter().all(|e| e.r#type != "run.claimed"),
        "the run was claimed at some point: {events:?}"
    );
    drop(keyless);

    // The same runner with a key connects (listed) and takes the run to the end.
    let _keyed = RunnerProcess::start(app.addr, "keyed", &[("AGENTRUN_API_KEY", &runner_key)]);
    wait_for("the keyed runner to be listed", LONG, || async {
        runner_names(&app)
            .await
            .contains(&"keyed".to_owned())
            .then_some(())
    })
    .await;
    let deadline = Instant::now() + LONG;
    loop {
        let run = get(&app, run_id.clone()).await;
        if status_of(&run) == RunStatus::Completed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run never completed: {:?}",
            status_of(&run)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn keys_command(database_url: &str, args: &[&str]) -> std::process::Output {
    Command::new(binary("agentrun-manager"))
        .env("DATABASE_URL", database_url)
        .env_remove("AGENTRUN_AUTH")
        .arg("keys")
        .args(args)
        .output()
        .expect("run agentrun-manager keys")
}

#[tokio::test]
async fn the_keys_command_creates_lists_and_revokes() {
    let mut app = secured().await;
    let url = app.database_url.clone();
    let created = keys_command(
        &url,
        &[
            "create", "--tenant", "acme", "--role", "client", "--name", "laptop",
        ],
    );
    assert!(created.status.success(), "{created:?}");
    let key_text = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(key_text.starts_with("ark_"), "{key_text}");
    let run_id = create_run(&mut app, &key_text).await;
    assert!(!run_id.is_empty());

    let (id, secret) = api_keys::parse_key(&key_text).expect("well formed");
    let listed = keys_command(&url, &["list", "--tenant", "acme"]);
    assert!(listed.status.success(), "{listed:?}");
    let listing = String::from_utf8(listed.stdout).unwrap();
    assert!(listing.contains(&id.simple().to_string()), "{listing}");
    assert!(
        listing.contains("laptop") && listing.contains("active"),
        "{listing}"
    );
    assert!(!listing.contains(secret), "the listing shows a secret");

    let revoked = keys_command(&url, &["revoke", &id.simple().to_string()]);
    assert!(revoked.status.success(), "{revoked:?}");
    let listing = String::from_utf8(keys_command(&url, &["list"]).stdout).unwrap();
    assert!(listing.contains("revoked"), "{listing}");
    let runs = app.runs.clone();
    wait_for(
        "the revoked key to be refused",
        Duration::from_secs(10),
        || {
            let mut runs = runs.clone();
            let key_text = key_text.clone();
            async move {
                match runs
                    .list_runs(with_key(&key_text, proto::ListRunsRequest::default()))
                    .await
                {
                    Err(status) if status.code() == Code::Unauthenticated => Some(()),
                    _ => None,
                }
            }
        },
    )
    .await;

    let bad = keys_command(&url, &["create", "--tenant", "acme", "--role", "root"]);
    assert!(!bad.status.success());
}

#[tokio::test]
async fn development_mode_is_refused_off_loopback() {
    let url = fresh_database().await;
    let mut settings = test_settings(&url);
    settings.listen = "0.0.0.0:0".parse().unwrap();
    settings.auth = AuthMode::Disabled;
    let err = match Application::build(settings).await {
        Ok(_) => panic!("a manager without authentication started on 0.0.0.0"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("loopback"), "{err}");
    // With authentication the same address is fine.
    let mut settings = test_settings(&url);
    settings.listen = "0.0.0.0:0".parse().unwrap();
    settings.auth = AuthMode::Required;
    Application::build(settings)
        .await
        .expect("a manager with authentication starts on any address");
}

/// Creates a client key for `acme` through AdminService, expiring at `expires_at`.
async fn create_expiring(
    app: &mut TestApp,
    admin: &str,
    expires_at: SystemTime,
) -> Result<proto::CreateApiKeyResponse, tonic::Status> {
    Ok(app
        .admin
        .create_api_key(with_key(
            admin,
            proto::CreateApiKeyRequest {
                tenant_id: "acme".into(),
                role: proto::ApiKeyRole::Client as i32,
                expires_at: Some(expires_at.into()),
                ..Default::default()
            },
        ))
        .await?
        .into_inner())
}

#[tokio::test]
async fn an_expired_key_is_refused_even_while_cached() {
    let mut app = secured().await;
    let admin = key(&app, "acme", Role::Admin, &[]).await;
    let past = create_expiring(
        &mut app,
        &admin,
        SystemTime::now() - Duration::from_secs(60),
    )
    .await
    .expect_err("a key that expired already was created");
    assert_eq!(past.code(), Code::InvalidArgument);
    assert!(past.message().contains("expires_at"), "{past:?}");

    let expires_at = SystemTime::now() + Duration::from_secs(2);
    let created = create_expiring(&mut app, &admin, expires_at)
        .await
        .expect("create an expiring key");
    let shown = created
        .api_key
        .expect("key info")
        .expires_at
        .expect("expiry");
    assert_eq!(
        shown.seconds,
        prost_types::Timestamp::from(expires_at).seconds
    );
    // Used before it expires: accepted, and now cached on this replica.
    create_run(&mut app, &created.key).await;
    let runs = app.runs.clone();
    let refused = wait_for("the expired key to be refused", LONG, || {
        let mut runs = runs.clone();
        let key = created.key.clone();
        async move {
            match runs
                .list_runs(with_key(&key, proto::ListRunsRequest::default()))
                .await
            {
                Err(status) if status.code() == Code::Unauthenticated => Some(status),
                Ok(_) => None,
                Err(status) => panic!("unexpected {status:?}"),
            }
        }
    })
    .await;
    assert!(refused.message().contains("expired"), "{refused:?}");
    // Refused at its expiry, not a cache lifetime later.
    let late = SystemTime::now()
        .duration_since(expires_at)
        .unwrap_or_default();
    assert!(late < Duration::from_millis(1500), "refused {late:?} late");

    // Expired before it was ever cached: refused by the database check too.
    let pool = db::pool(&app.database_url, 1).expect("pool");
    let stale = api_keys::create(
        &pool.get().await.unwrap(),
        "acme",
        Role::Client,
        &[],
        "stale",
        Some(SystemTime::now() - Duration::from_secs(1)),
    )
    .await
    .expect("create")
    .key;
    let status = app
        .runs
        .list_runs(with_key(&stale, proto::ListRunsRequest::default()))
        .await
        .expect_err("an expired key was accepted");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{status:?}");
}

/// The line of `listing` that shows key `id`.
fn key_line(listing: &str, id: uuid::Uuid) -> String {
    listing
        .lines()
        .find(|line| line.starts_with(&id.simple().to_string()))
        .unwrap_or_else(|| panic!("key {id} not listed:\n{listing}"))
        .to_owned()
}

#[tokio::test]
async fn keys_list_shows_expiry_and_last_use() {
    let mut app = secured().await;
    let url = app.database_url.clone();
    let created = keys_command(
        &url,
        &[
            "create",
            "--tenant",
            "acme",
            "--role",
            "client",
            "--expires-in",
            "30d",
        ],
    );
    assert!(created.status.success(), "{created:?}");
    let expiring = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let (expiring_id, _) = api_keys::parse_key(&expiring).expect("well formed");
    let forever = keys_command(&url, &["create", "--tenant", "acme", "--role", "client"]);
    assert!(forever.status.success(), "{forever:?}");
    let forever = String::from_utf8(forever.stdout).unwrap().trim().to_owned();
    let (forever_id, _) = api_keys::parse_key(&forever).expect("well formed");

    let listing = String::from_utf8(keys_command(&url, &["list"]).stdout).unwrap();
    let header = listing.lines().next().unwrap_or_default();
    assert!(
        header.contains("EXPIRES") && header.contains("LAST USED"),
        "{listing}"
    );
    // Never used yet; one expires in 30 days, the other never.
    let line = key_line(&listing, expiring_id);
    let in_30_days = prost_types::Timestamp {
        seconds: prost_types::Timestamp::from(SystemTime::now() + Duration::from_secs(30 * 86400))
            .seconds,
        nanos: 0,
    }
    .to_string();
    // The same day, at least (the command ran a moment ago).
    assert!(line.contains(&in_30_days[..10]), "{line}");
    assert!(line.contains("never"), "{line}");
    assert!(key_line(&listing, forever_id).matches("never").count() == 2);

    // Used: the listing shows when.
    create_run(&mut app, &expiring).await;
    let listing = String::from_utf8(keys_command(&url, &["list"]).stdout).unwrap();
    let line = key_line(&listing, expiring_id);
    assert!(!line.contains("never"), "{line}");
    let today = prost_types::Timestamp::from(SystemTime::now()).to_string();
    assert!(line.contains(&today[..10]), "{line}");
    let admin = key(&app, "acme", Role::Admin, &[]).await;
    let listed = app
        .admin
        .list_api_keys(with_key(&admin, proto::ListApiKeysRequest::default()))
        .await
        .expect("list keys")
        .into_inner()
        .api_keys;
    let shown = listed
        .iter()
        .find(|k| k.key_id == expiring_id.simple().to_string())
        .expect("listed");
    assert!(shown.last_used_at.is_some() && shown.expires_at.is_some());
    // Another use within the minute does not write it again.
    let pool = db::pool(&url, 1).expect("pool");
    let db = pool.get().await.unwrap();
    let stored = api_keys::get(&db, expiring_id).await.expect("get key");
    let first_use = stored.expect("key").last_used_at.expect("used");
    api_keys::touch(&db, expiring_id).await.expect("touch");
    let stored = api_keys::get(&db, expiring_id).await.expect("get key");
    assert_eq!(stored.expect("key").last_used_at, Some(first_use));
    let shown = listed
        .iter()
        .find(|k| k.key_id == forever_id.simple().to_string())
        .expect("listed");
    assert!(shown.last_used_at.is_none() && shown.expires_at.is_none());

    // Bad input names the flag.
    for (args, flag) in [
        (vec!["--expires-in", "30x"], "--expires-in"),
        (vec!["--expires-in", "0d"], "--expires-in"),
        (vec!["--expires-at", "tomorrow"], "--expires-at"),
        (vec!["--expires-at", "2001-01-01T00:00:00Z"], "--expires-at"),
    ] {
        let mut all = vec!["create", "--tenant", "acme", "--role", "client"];
        all.extend(args);
        let refused = keys_command(&url, &all);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{all:?} was accepted");
        assert!(stderr.contains(flag), "{all:?}: {stderr}");
    }
    let both = keys_command(
        &url,
        &[
            "create",
            "--tenant",
            "acme",
            "--role",
            "client",
            "--expires-in",
            "1d",
            "--expires-at",
            "2100-01-01T00:00:00Z",
        ],
    );
    assert!(!both.status.success(), "both expiry flags were accepted");
}
