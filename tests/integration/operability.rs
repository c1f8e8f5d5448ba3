//! Operability: health that waits for migrations, Prometheus metrics that move, the
//! manager's `health` command, and a runner's metrics and health endpoint.
//! (Health while the database is down and back: `faults::postgres_stopped_and_restarted_under_load`.)

use std::net::SocketAddr;
use std::time::Duration;

use agentrun_manager::db;
use agentrun_manager::store::runs::{self, RunFilter};
use agentrun_manager::store::{Tenant, flow};
use agentrun_shared::proto::{self, RunStatus};
use agentrun_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const FLIP: Duration = Duration::from_secs(20);
const LONG: Duration = Duration::from_secs(30);

async fn status_of_service(health: &HealthClient<Channel>, service: &str) -> Option<i32> {
    let mut health = health.clone();
    let response = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

async fn wait_for_health(health: &HealthClient<Channel>, service: &str, want: ServingStatus) {
    wait_for(&format!("{service:?} to be {want:?}"), FLIP, || async {
        (status_of_service(health, service).await == Some(want as i32)).then_some(())
    })
    .await
}

#[tokio::test]
async fn not_serving_until_migrations_are_applied() {
    let url = fresh_database().await;
    let app = TestApp::spawn_on(&url, |s| s.migrate = false).await;
    let health = HealthClient::new(connect(app.addr).await);
    for service in ["", "agentrun.v1.RunService"] {
        assert_eq!(
            status_of_service(&health, service).await,
            Some(ServingStatus::NotServing as i32),
            "{service} with migrations pending"
        );
    }
    // The schema really is behind: nothing has been migrated.
    let pool = db::pool(&url, 1).unwrap();
    {
        let mut client = pool.get().await.unwrap();
        let client: &mut tokio_postgres::Client = &mut client;
        assert!(!db::schema_current(client).await.unwrap());
    }

    // Another process (`agentrun-manager migrate`) brings the schema up to date.
    db::migrate(&pool).await.unwrap();
    for service in ["", "agentrun.v1.RunService", "agentrun.v1.RunnerService"] {
        wait_for_health(&health, service, ServingStatus::Serving).await;
    }
}

/// A manager started while its database does not answer (a deploy racing the database,
/// a managed PostgreSQL failing over) does not exit into the orchestrator's growing
/// restart back-off: it listens, says NOT_SERVING and keeps trying, then applies its
/// migrations and serves as soon as the database answers.
#[tokio::test]
async fn a_manager_started_before_its_database_answers_migrates_and_serves_once_it_does() {
    let url = fresh_database().await;
    let (authority, database) = url
        .trim_start_matches("postgres://postgres@")
        .split_once('/')
        .expect("a cluster URL");
    let proxy = agentrun_tests::proxy::Proxy::start(authority.parse().expect("host:port")).await;
    proxy.refuse(true);
    let via_proxy = format!("postgres://postgres@{}/{database}", proxy.addr());
    let manager = ManagerProcess::start(&via_proxy, &[]).await;
    let health = HealthClient::new(manager.channel().await);
    assert_eq!(
        status_of_service(&health, "").await,
        Some(ServingStatus::NotServing as i32)
    );
    wait_for("the manager to try the database again", LONG, || async {
        (proxy.refused() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        status_of_service(&health, "agentrun.v1.RunService").await,
        Some(ServingStatus::NotServing as i32)
    );

    proxy.refuse(false);
    for service in ["", "agentrun.v1.RunService", "agentrun.v1.RunnerService"] {
        wait_for_health(&health, service, ServingStatus::Serving).await;
    }
    let mut client = db_client(&url).await;
    let client: &mut tokio_postgres::Client = &mut client;
    assert!(db::schema_current(client).await.unwrap());
    let mut runs = proto::run_service_client::RunServiceClient::new(manager.channel().await);
    runs.create_run(run_request("after the outage"))
        .await
        .expect("the manager serves");
}

#[tokio::test]
async fn a_replica_older_than_the_schema_allows_stops_serving_and_exits() {
    let url = fresh_database().await;
    let mut manager = ManagerProcess::start(&url, &[]).await;
    let health = HealthClient::new(manager.channel().await);
    wait_for_health(&health, "", ServingStatus::Serving).await;
    // A newer replica migrated the schema past what this build reads correctly.
    let db = db_client(&url).await;
    db.execute(
        "UPDATE schema_compatibility SET oldest_reader = $1",
        &[&(db::newest_migration() + 1)],
    )
    .await
    .unwrap();
    let status = manager.wait_exit(LONG).await;
    assert!(
        !status.success(),
        "a manager too old for the schema exits with an error: {status:?}"
    );
}

/// `GET /metrics` over a plain TCP connection; returns the body.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the sample `name` whose labels include all of `labels`, or 0 if absent.
pub(crate) fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' '))
        .filter(|(series, _)| {
            let (series_name, series_labels) = series.split_once('{').unwrap_or((series, ""));
            series_name == name
                && labels
                    .iter()
                    .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().expect("a numeric sample"))
        .sum()
}

#[tokio::test]
async fn metrics_are_served_and_move() {
    let mut app = TestApp::spawn_with(|s| s.metrics_listen = "127.0.0.1:0".into()).await;
    let addr = app.metrics_addr.expect("metrics enabled");
    let before = scrape(addr).await;
    assert_eq!(
        sample(&before, "agentrun_db_pool_connections", &[("state", "max")]),
        8.0
    );
    assert_eq!(sample(&before, "agentrun_database_up", &[]), 1.0);

    let mut run_ids = Vec::new();
    for i in 0..3 {
        let run = app
            .runs
            .create_run(run_request(&format!("metrics {i}")))
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        run_ids.push(run.run_id);
    }
    let bad = app
        .runs
        .get_run(proto::GetRunRequest {
            run_id: "not-a-run-id".into(),
        })
        .await
        .expect_err("an invalid id");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let runner = runner("metrics");
    let held = claim(&mut app, &runner, 2).await;
    let mut watch = app
        .runs
        .watch_run(proto::WatchRunRequest {
            run_id: run_ids[2].clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    watch.message().await.unwrap().expect("run.created");

    let during = scrape(addr).await;
    let pending = [("queue", "default"), ("status", "pending")];
    assert_eq!(sample(&during, "agentrun_queue_depth", &pending), 1.0);
    assert_eq!(sample(&during, "agentrun_active_leases", &[]), 2.0);
    assert_eq!(sample(&during, "agentrun_watchers", &[]), 1.0);
    assert!(
        sample(
            &during,
            "agentrun_queue_oldest_pending_seconds",
            &[("queue", "default")]
        ) > 0.0
    );

    for a in &held {
        app.runners
            .append_events(append(&runner, a, deltas(1, 5)))
            .await
            .unwrap();
        app.runners
            .finish_run(finish(&runner, a, RunStatus::Completed))
            .await
            .unwrap();
    }
    drop(watch);

    let after = scrape(addr).await;
    for family in [
        "agentrun_create_to_claim_seconds",
        "agentrun_events_appended",
        "grpc_server_started",
        "grpc_server_handled",
        "grpc_server_handling_seconds",
        "agentrun_open_requests",
        "agentrun_build_info",
        "agentrun_lease_expiries",
        "agentrun_requeues",
        "agentrun_connected_runners",
        "agentrun_watchers",
        "agentrun_db_pool_connections",
        "agentrun_queue_depth",
        "agentrun_active_leases",
    ] {
        assert!(
            after.contains(&format!("# TYPE {family} ")),
            "{family} missing from:\n{after}"
        );
    }
    let create = [
        ("grpc_service", "agentrun.v1.RunService"),
        ("grpc_method", "CreateRun"),
        ("grpc_type", "unary"),
    ];
    let ok_creates = [create.as_slice(), &[("grpc_code", "OK")]].concat();
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(delta("grpc_server_started_total", &create), 3.0);
    assert_eq!(delta("grpc_server_handled_total", &ok_creates), 3.0);
    assert_eq!(
        delta(
            "grpc_server_handled_total",
            &[
                ("grpc_service", "agentrun.v1.RunService"),
                ("grpc_method", "GetRun"),
                ("grpc_type", "unary"),
                ("grpc_code", "InvalidArgument")
            ]
        ),
        1.0
    );
    assert_eq!(delta("grpc_server_handling_seconds_count", &create), 3.0);
    assert_eq!(delta("agentrun_events_appended_total", &[]), 10.0);
    assert_eq!(delta("agentrun_event_batch_size_count", &[]), 2.0);
    assert_eq!(delta("agentrun_create_to_claim_seconds_count", &[]), 2.0);
    assert!(delta("agentrun_create_to_claim_seconds_sum", &[]) > 0.0);
    assert_eq!(sample(&after, "agentrun_active_leases", &[]), 0.0);
    assert_eq!(sample(&after, "agentrun_build_info", &[]), 1.0);
    assert_eq!(sample(&after, "agentrun_open_requests", &[]), 0.0);
    assert_eq!(sample(&after, "agentrun_queue_depth", &pending), 1.0);

    wait_for("the watcher gauge to drop", FLIP, || async {
        (sample(&scrape(addr).await, "agentrun_watchers", &[]) == 0.0).then_some(())
    })
    .await;
}

/// `agentrun-manager health` (the image's HEALTHCHECK) exits 0 against a serving
/// manager and 1, saying why, against an address nobody serves.
#[tokio::test]
async fn the_health_command_tells_a_serving_manager_from_a_missing_one() {
    let app = TestApp::spawn().await;
    // Blocking, off the runtime: the manager under test runs on it.
    let probe = |url: String| {
        tokio::task::spawn_blocking(move || {
            let output = std::process::Command::new(binary("agentrun-manager"))
                .args(["health", "--url", &url, "--timeout-ms", "10000"])
                .env_remove("DATABASE_URL")
                .output()
                .expect("agentrun-manager runs");
            let said = String::from_utf8_lossy(&output.stdout).into_owned();
            (output.status.code(), said)
        })
    };
    let (code, said) = probe(format!("http://{}", app.addr)).await.unwrap();
    assert_eq!(code, Some(0), "{said}");
    assert!(said.trim_end().ends_with(": SERVING"), "{said}");

    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = nobody.local_addr().unwrap();
    drop(nobody);
    let (code, said) = probe(format!("http://{gone}")).await.unwrap();
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("not reachable"), "{said}");
}

/// `GET path` on `addr` (the runner's health endpoint): status code and body.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.ok()?;
    let status = answer.get(9..12)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_owned();
    Some((status, body))
}

/// `agentrun-runner health --url URL`: its exit code and what it printed.
async fn runner_health(url: String) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let output = std::process::Command::new(binary("agentrun-runner"))
            .args(["health", "--url", &url])
            .output()
            .expect("agentrun-runner runs");
        let said = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.code(), said)
    })
    .await
    .unwrap()
}

/// A runner's `/metrics` counts its runs, turns and batches; its `/healthz` (and
/// `agentrun-runner health`) is healthy while it has a session with a manager and
/// turns unhealthy once the manager is gone for longer than the window.
#[tokio::test]
async fn a_runner_reports_its_work_and_turns_unhealthy_without_a_manager() {
    let mut app = TestApp::spawn().await;
    let health = free_addr();
    let _runner = RunnerProcess::start(
        app.addr,
        "observed",
        &[
            ("AGENTRUN_HEALTH_LISTEN", &health.to_string()),
            ("AGENTRUN_UNHEALTHY_AFTER_MS", "1500"),
        ],
    );
    let url = format!("http://{health}/healthz");
    wait_for("the runner to be healthy", LONG, || async {
        get(health, "/healthz").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let run = app
        .runs
        .create_run(run_request("[tokens:5] hi"))
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    wait_for_run(&app, &run.run_id, RunStatus::Completed, LONG).await;
    let metrics = wait_for("the run counted", LONG, || async {
        get(health, "/metrics")
            .await
            .map(|(_, body)| body)
            .filter(|body| body.contains(r#"agentrun_runner_runs_total{outcome="completed"} 1"#))
    })
    .await;
    for line in [
        "agentrun_runner_time_to_first_token_seconds_count 1",
        "agentrun_runner_turn_duration_seconds_count 1",
        "agentrun_runner_active_runs 0",
        "agentrun_runner_reconnects_total 0",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    let (code, said) = runner_health(url.clone()).await;
    assert_eq!(code, Some(0), "{said}");

    drop(app);
    let why = wait_for("the runner to turn unhealthy", LONG, || async {
        get(health, "/healthz").await.filter(|(s, _)| *s == 503)
    })
    .await
    .1;
    assert!(why.contains("no session with a manager"), "{why}");
    let (code, said) = runner_health(url).await;
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("503"), "{said}");
}

/// Rows of `runs` the current transaction has read so far: sequentially, and fetched
/// through indexes (`pg_stat_xact_user_tables`, not yet flushed to the shared statistics).
async fn runs_rows_read(tx: &tokio_postgres::Transaction<'_>) -> i64 {
    tx.query_one(
        "SELECT seq_tup_read + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables
         WHERE relname = 'runs'",
        &[],
    )
    .await
    .expect("read the transaction's table statistics")
    .get(0)
}

/// 3,000 ended runs over tenants t0..t2 and queues q0, q1; then open ones: two pending
/// in t1's q1 (one held by its concurrency key) and one running in t2's q0.
async fn seed_history(app: &TestApp) {
    app.db()
        .await
        .batch_execute(
            "INSERT INTO runs (id, tenant_id, project_id, backend_profile, queue, status,
                               max_attempts, finished_at)
             SELECT gen_random_uuid(), 't' || (g % 3), 'default', 'scripted', 'q' || (g % 2),
                    'completed', 1, now()
             FROM generate_series(1, 3000) g;
             INSERT INTO runs (id, tenant_id, project_id, backend_profile, queue, status,
                               max_attempts, held, concurrency_key)
             VALUES (gen_random_uuid(), 't1', 'default', 'scripted', 'q1', 'pending', 1,
                     NULL, NULL),
                    (gen_random_uuid(), 't1', 'default', 'scripted', 'q1', 'pending', 1,
                     'concurrency_key', 'k'),
                    (gen_random_uuid(), 't2', 'default', 'scripted', 'q0', 'running', 1,
                     NULL, NULL);
             ANALYZE runs;",
        )
        .await
        .expect("seed the run history");
}

/// A scrape (`/metrics`, GetQueueStats) reads the runs that have not ended, not the
/// history: with 3,000 ended runs and three open ones it reads a handful of rows. Before,
/// each scrape read every run twice, which at a million runs took a third of a second of
/// database time per scrape and replica. The pending runs are read through the indexes
/// of claimable and of held runs (there is no index of all pending runs).
#[tokio::test]
async fn queue_stats_read_the_open_runs_not_the_history() {
    let app = TestApp::spawn().await;
    seed_history(&app).await;

    let pool = db::pool(&app.database_url, 1).expect("a pool");
    let mut client = pool.get().await.expect("a connection");
    let tx = client.transaction().await.expect("a transaction");
    let stats = runs::queue_stats(&tx, 0, 0).await.expect("queue stats");
    let waiting = flow::waiting(&tx).await.expect("the waiting runs");
    let read = runs_rows_read(&tx).await;

    let waiting: Vec<(&str, &str, &str, i64)> = waiting
        .iter()
        .map(|w| {
            (
                w.tenant_id.as_str(),
                w.queue.as_str(),
                w.reason.as_str(),
                w.runs,
            )
        })
        .collect();
    assert_eq!(waiting, [("t1", "q1", "concurrency_key", 1)]);

    let depths: Vec<(&str, &str, i64)> = stats
        .depths
        .iter()
        .map(|d| (d.queue.as_str(), d.status.as_str(), d.runs))
        .collect();
    assert_eq!(depths, [("q0", "running", 1), ("q1", "pending", 2)]);
    let tenants: Vec<(&str, i64, i64)> = stats
        .tenants
        .iter()
        .map(|t| (t.tenant_id.as_str(), t.pending_runs, t.active_runs))
        .collect();
    assert_eq!(tenants, [("t1", 2, 0), ("t2", 0, 1)]);
    assert!(
        read <= 12,
        "a scrape read {read} rows of runs: it should read the 3 open runs (each a few \
         times), not the 3,000 ended ones"
    );
}

/// CancelRuns by filter looks only at the tenant's runs that have not ended: with 1,000
/// ended runs of the tenant and none open in the queue named, it reads next to nothing.
#[tokio::test]
async fn a_bulk_cancel_reads_the_open_runs_not_the_history() {
    let app = TestApp::spawn().await;
    seed_history(&app).await;

    let pool = db::pool(&app.database_url, 1).expect("a pool");
    let mut client = pool.get().await.expect("a connection");
    let tx = client.transaction().await.expect("a transaction");
    let tenant = Tenant("t1".into());
    let locked = |queue: &str| RunFilter {
        queue: Some(queue.into()),
        limit: 100,
        ..Default::default()
    };
    let none = runs::lock_uncancelled(&tx, &tenant, &locked("q0"))
        .await
        .expect("lock the matching runs");
    assert!(none.is_empty(), "t1 has no open run in q0: {none:?}");
    let both = runs::lock_uncancelled(&tx, &tenant, &locked("q1"))
        .await
        .expect("lock the matching runs");
    assert_eq!(
        both.len(),
        2,
        "t1's two pending runs in q1, the held one too"
    );
    let read = runs_rows_read(&tx).await;
    assert!(
        read <= 12,
        "two bulk cancels read {read} rows of runs: they should read the tenant's open \
         runs, not its 1,000 ended ones"
    );
}

/// ListRuns filtered by status reads the runs of those statuses, not the tenant's whole
/// history, also when PostgreSQL plans it generically (as it may after a few calls on a
/// connection): open statuses through the indexes of open runs, the unsuccessful ends
/// through theirs. The list is newest first and complete.
#[tokio::test]
async fn listing_runs_by_status_reads_those_runs_not_the_history() {
    use agentrun_shared::state::RunStatus;
    let app = TestApp::spawn().await;
    seed_history(&app).await;
    app.db()
        .await
        .batch_execute(
            "INSERT INTO runs (id, tenant_id, project_id, backend_profile, queue, status,
                               max_attempts, finished_at)
             VALUES ('00000000-0000-7000-8000-000000000001', 't1', 'default', 'scripted', 'q0',
                     'failed', 1, now()),
                    ('00000000-0000-7000-8000-000000000002', 't1', 'default', 'scripted', 'q0',
                     'cancelled', 1, now());
             ANALYZE runs;",
        )
        .await
        .expect("seed two unsuccessful runs");

    let pool = db::pool(&app.database_url, 1).expect("a pool");
    let mut client = pool.get().await.expect("a connection");
    let tx = client.transaction().await.expect("a transaction");
    tx.batch_execute("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .expect("plan generically");
    let tenant = Tenant("t1".into());
    let listed = async |statuses: &[RunStatus]| -> Vec<(String, String)> {
        let filter = RunFilter {
            statuses: statuses.to_vec(),
            limit: 50,
            ..Default::default()
        };
        let runs = runs::list(&tx, &tenant, &filter).await.expect("list runs");
        assert!(
            runs.windows(2).all(|w| w[0].id.0 > w[1].id.0),
            "newest first"
        );
        runs.iter()
            .map(|r| (r.status.as_str().to_owned(), r.queue.clone()))
            .collect()
    };
    let open = listed(&[RunStatus::Pending, RunStatus::Running]).await;
    assert_eq!(
        open,
        [("pending", "q1"), ("pending", "q1")].map(|(s, q)| (s.into(), q.into()))
    );
    let failed = listed(&[RunStatus::Failed]).await;
    assert_eq!(failed, [("failed".to_owned(), "q0".to_owned())]);
    let unsuccessful = listed(&[RunStatus::Cancelled, RunStatus::Failed]).await;
    assert_eq!(unsuccessful.len(), 2);
    let read = runs_rows_read(&tx).await;
    assert!(
        read <= 20,
        "three lists by status read {read} rows of runs: they should read the few runs of \
         those statuses, not t1's 1,000 completed ones"
    );
}
