//! The abuse section: a hostile or careless caller, against real manager and runner
//! processes with authentication on, must not exhaust the manager, starve another
//! tenant, stop the service or learn what another tenant has. Sizes are cut so CI stays
//! fast; the README's "Limits and quotas" section gives the full-size run.
//!
//! | test | abuse |
//! |---|---|
//! | `a_runner_whose_key_is_revoked_is_cut_off_and_gets_no_new_run` | runner key revoked while its Connect stream is open |
//! | `watchers_whose_key_is_revoked_are_ended` | client key revoked during WatchRun and WatchSession |
//! | `a_key_revoked_on_one_replica_ends_a_watch_on_another` | revocation reaching another replica (NOTIFY) |
//! | `a_key_revoked_by_the_cli_ends_a_watch_at_once` | revocation from `agentrun-manager keys revoke` (NOTIFY) |
//! | `a_watch_ends_when_its_key_expires` | client key expiring during WatchRun |

use agentrun_manager::api::auth::{
    REVOCATION_NOTICE_BOUND, STREAM_RECHECK_BOUND, STREAM_RECHECK_INTERVAL,
};
use agentrun_manager::db;
use agentrun_manager::store::api_keys::{self, Role};
use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::session_service_client::SessionServiceClient;
use tonic::Request;

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

/// A manager process that requires API keys, serving metrics on `metrics`.
async fn secured_manager(url: &str, metrics: SocketAddr) -> ManagerProcess {
    let metrics = metrics.to_string();
    ManagerProcess::start(
        url,
        &[
            ("AGENTRUN_AUTH", "required"),
            ("AGENTRUN_METRICS_LISTEN", metrics.as_str()),
        ],
    )
    .await
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

#[tokio::test]
async fn a_runner_whose_key_is_revoked_is_cut_off_and_gets_no_new_run() {
    let url = fresh_database().await;
    let metrics = free_addr();
    let manager = secured_manager(&url, metrics).await;
    let admin = key(&url, "acme", Role::Admin).await;
    let client_key = key(&url, "acme", Role::Client).await;
    let revoked_key = key(&url, "acme", Role::Runner).await;
    let good_key = key(&url, "acme", Role::Runner).await;
    let mut client = RunServiceClient::new(manager.channel().await);
    let connect_refused = |text: &str| {
        sample(
            text,
            "agentrun_rpc_requests_total",
            &[
                ("method", "/agentrun.v1.RunnerService/Connect"),
                ("code", "Unauthenticated"),
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
    let manager = secured_manager(&url, free_addr()).await;
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
    let (one, two) = tokio::join!(
        secured_manager(&url, free_addr()),
        secured_manager(&url, free_addr())
    );
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
    let manager = secured_manager(&url, free_addr()).await;
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
    let manager = secured_manager(&url, free_addr()).await;
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
