//! Test harness: a real PostgreSQL, a fresh database per test, and managers spawned
//! in-process ([`TestApp`]) or as real processes ([`ManagerProcess`]).
//!
//! PostgreSQL comes from `DATABASE_URL` when it is set (a superuser URL; each test
//! creates its own database there), otherwise from a throwaway cluster started once per
//! test process from the local server binaries and removed when the process exits.
//! Set `TEST_LOG=1` to see the managers' logs.

pub mod cli;
pub mod fake_openai;
pub mod invariants;
pub mod proxy;
pub mod tamper;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use agentrun_manager::config::AuthMode;
use agentrun_manager::local_postgres::LocalPostgres;
use agentrun_manager::{Application, Settings};
use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::runner_service_client::RunnerServiceClient;
use agentrun_shared::proto::{self, RunStatus};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig};
use uuid::Uuid;

/// Where test databases are created.
enum Cluster {
    External(String),
    Local(LocalPostgres),
}

impl Cluster {
    fn url(&self, database: &str) -> String {
        match self {
            Cluster::External(url) => with_database(url, database),
            Cluster::Local(pg) => pg.url(database),
        }
    }
}

/// `url` with its database name replaced (query parameters kept).
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let prefix = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{prefix}/{database}?{q}"),
        None => format!("{prefix}/{database}"),
    }
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => Cluster::External(url),
        _ => match LocalPostgres::start() {
            Ok(pg) => Cluster::Local(pg),
            Err(err) => panic!(
                "tests need PostgreSQL: set DATABASE_URL to a superuser URL, or install the \
                 PostgreSQL server binaries (Debian: apt-get install postgresql) so a throwaway \
                 cluster can be started. Starting one failed: {err}"
            ),
        },
    })
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database() -> String {
    let cluster = cluster();
    let (admin, connection) = tokio_postgres::connect(&cluster.url("postgres"), NoTls)
        .await
        .expect("connect to the test cluster");
    tokio::spawn(connection);
    let name = format!("agentrun_test_{}", Uuid::new_v4().simple());
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a test database");
    cluster.url(&name)
}

/// A connection to the test cluster's `postgres` database: watches a test database from
/// outside, so the watching is not counted in that database's statistics.
pub async fn cluster_client() -> tokio_postgres::Client {
    db_client(&cluster().url("postgres")).await
}

/// Settings for tests: a free port, short leases and a fast sweeper.
pub fn test_settings(database_url: &str) -> Settings {
    let mut settings = Settings::for_database(database_url);
    settings.listen = "127.0.0.1:0".parse().expect("valid address");
    settings.db_pool_size = 8;
    settings.lease_ttl_ms = 2_000;
    settings.heartbeat_interval_ms = 500;
    settings.sweep_interval_ms = 100;
    // Many managers run at once: metrics only where a test asks for them (`127.0.0.1:0`).
    settings.metrics_listen = String::new();
    // Most tests are not about authentication; those that are turn it on.
    settings.auth = AuthMode::Disabled;
    // The tests' webhook receivers listen on loopback.
    settings.webhook_private_targets = true;
    settings
}

fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        agentrun_manager::telemetry::init();
    }
}

/// A manager running in this process on a free port, with typed clients.
pub struct TestApp {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when the test enabled it.
    pub metrics_addr: Option<SocketAddr>,
    /// The web UI's address, when the test enabled it (`ui_listen`).
    pub ui_url: Option<String>,
    pub database_url: String,
    pub runs: RunServiceClient<Channel>,
    pub runners: RunnerServiceClient<Channel>,
    pub admin: AdminServiceClient<Channel>,
    shutdown: CancellationToken,
}

impl TestApp {
    /// A manager on a fresh database with [`test_settings`].
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Like [`Self::spawn`], with settings adjusted by `tweak`.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Settings)) -> Self {
        let url = fresh_database().await;
        Self::spawn_on(&url, tweak).await
    }

    /// A manager serving TLS (`tweak` sets `tls_cert`, `tls_key`, maybe `tls_client_ca`)
    /// whose typed clients connect with `tls` (the CA they trust, maybe an identity).
    pub async fn spawn_tls(tls: ClientTlsConfig, tweak: impl FnOnce(&mut Settings)) -> Self {
        let url = fresh_database().await;
        Self::spawn_on_with(&url, Some(tls), tweak).await
    }

    /// Another manager replica on an existing database.
    pub async fn spawn_on(database_url: &str, tweak: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_on_with(database_url, None, tweak).await
    }

    async fn spawn_on_with(
        database_url: &str,
        tls: Option<ClientTlsConfig>,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        init_logs();
        let mut settings = test_settings(database_url);
        tweak(&mut settings);
        let app = Application::build(settings).await.expect("manager starts");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let ui_url = app.ui_url();
        let shutdown = CancellationToken::new();
        tokio::spawn(app.run(shutdown.clone()));
        let channel = match tls {
            Some(tls) => tls_channel(addr, tls)
                .await
                .expect("a TLS client connects to the manager"),
            None => connect(addr).await,
        };
        Self {
            addr,
            metrics_addr,
            ui_url,
            database_url: database_url.to_owned(),
            runs: RunServiceClient::new(channel.clone()),
            runners: RunnerServiceClient::new(channel.clone()),
            admin: AdminServiceClient::new(channel),
            shutdown,
        }
    }

    /// A direct database connection, for invariant checks.
    pub async fn db(&self) -> tokio_postgres::Client {
        db_client(&self.database_url).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A connection to `url`, with TLS as its `sslmode` and `sslrootcert` say (as the
/// manager's own connections).
pub async fn db_client(url: &str) -> tokio_postgres::Client {
    let database = agentrun_manager::db::Database::new(url, None).expect("a valid database URL");
    let (client, connection) = database
        .connect()
        .await
        .expect("connect to the test database");
    tokio::spawn(connection);
    client
}

/// A channel to a manager, retried until it accepts connections.
pub async fn connect(addr: SocketAddr) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{addr}")).expect("valid URI");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return channel,
            Err(err) if Instant::now() > deadline => {
                panic!("manager at {addr} never accepted: {err}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A TLS channel to the manager at `addr` (`https://`, verified against `tls`); the
/// listener is already bound, so an error is the handshake's, not a race.
pub async fn tls_channel(
    addr: SocketAddr,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    Channel::from_shared(format!("https://{addr}"))
        .expect("valid URI")
        .tls_config(tls)?
        .connect()
        .await
}

/// Path of a workspace binary, built on first use so tests never run a stale one.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "agentrun-manager",
                "-p",
                "agentrun-runner",
                "-p",
                "agentrun-cli",
                "--bins",
            ])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building the workspace binaries failed");
    });
    // tests run from target/<profile>/deps/<test-binary>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target profile dir");
    dir.join(name)
}

/// A manager started as a real process; killed when dropped.
pub struct ManagerProcess {
    pub addr: SocketAddr,
    child: Child,
}

impl ManagerProcess {
    pub async fn start(database_url: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::start_at(database_url, free_addr(), extra_env).await
    }

    /// Like [`Self::start`], listening on `addr` (a restart after a crash keeps its
    /// address, as a Kubernetes service would).
    pub async fn start_at(
        database_url: &str,
        addr: SocketAddr,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let mut command = Command::new(binary("agentrun-manager"));
        command
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("AGENTRUN_LISTEN", addr.to_string())
            // Many managers run at once: no fixed metrics port (tests that scrape set one).
            .env("AGENTRUN_METRICS_LISTEN", "")
            .env("AGENTRUN_LEASE_TTL_MS", "2000")
            .env("AGENTRUN_HEARTBEAT_INTERVAL_MS", "500")
            .env("AGENTRUN_SWEEP_INTERVAL_MS", "100")
            .env("AGENTRUN_AUTH", "disabled")
            // The tests' webhook receivers listen on loopback.
            .env("AGENTRUN_WEBHOOK_PRIVATE_TARGETS", "true")
            .stdin(Stdio::null());
        for (k, v) in extra_env {
            command.env(k, v);
        }
        if std::env::var_os("TEST_LOG").is_none() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = command.spawn().expect("start agentrun-manager");
        let process = Self { addr, child };
        connect(addr).await;
        process
    }

    pub async fn channel(&self) -> Channel {
        connect(self.addr).await
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (SIGTERM for a graceful stop).
    pub fn signal(&self, signal: i32) {
        signal_child(&self.child, signal);
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_child(&mut self.child, "agentrun-manager", timeout).await
    }
}

impl Drop for ManagerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port for a process a test starts to listen on. A port picked by `bind(0)` and
/// released can be picked again before its process binds it: two managers of concurrent
/// tests given one port, the later one failing to bind while its test talks to the
/// other's. So each port is handed out once per test process, in turn, from just below
/// the kernel's ephemeral range (which `bind(0)` and outgoing connections draw from), and
/// was free when checked.
fn free_port() -> u16 {
    const SPAN: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static FIRST: LazyLock<u32> = LazyLock::new(|| {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768u32);
        ephemeral_low.saturating_sub(SPAN).max(1_024)
    });
    // Test processes side by side start at different places.
    let start = std::process::id().wrapping_mul(7_919);
    for _ in 0..SPAN {
        let port = *FIRST + start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN;
        let port = u16::try_from(port).expect("ports are below 65536");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {}..{}", *FIRST, *FIRST + SPAN);
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The plan PostgreSQL keeps for `sql` on a connection that plans generically, as the
/// manager's hot paths do (a claim, a runner's writes: `store::HOT_PATH_SETTINGS`): the
/// plan used whatever the parameters are, made once and kept as the tables grow. The
/// parameters (if any) must be `$1` to `$n`, each typed in `sql`.
pub async fn generic_plan(db: &tokio_postgres::Client, sql: &str) -> String {
    let params = (1..).take_while(|n| sql.contains(&format!("${n}"))).count();
    db.batch_execute(&format!(
        "BEGIN; {}; PREPARE generic_plan AS {sql}",
        agentrun_manager::store::HOT_PATH_SETTINGS
    ))
    .await
    .unwrap();
    let arguments = match params {
        0 => String::new(),
        n => format!("({})", vec!["NULL"; n].join(", ")),
    };
    let plan = db
        .simple_query(&format!("EXPLAIN EXECUTE generic_plan{arguments}"))
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n");
    db.batch_execute("DEALLOCATE generic_plan; ROLLBACK")
        .await
        .unwrap();
    plan
}

/// Has the backend of `client` publish its statistics (PostgreSQL 15 holds them up to a
/// second): at once, so the next statement on it reads what it did.
pub async fn flush_statistics(client: &tokio_postgres::Client) {
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .expect("flush the statistics");
}

/// A request acting for `tenant`.
pub fn as_tenant<T>(tenant: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("agentrun-tenant", tenant.parse().expect("ASCII tenant"));
    request
}

/// A run request for the scripted profile with a prompt.
pub fn run_request(prompt: &str) -> proto::CreateRunRequest {
    proto::CreateRunRequest {
        backend_profile: "scripted".into(),
        input_json: serde_json::json!({ "prompt": prompt }).to_string(),
        ..Default::default()
    }
}

/// A runner identity serving the scripted profile on the default queue.
pub fn runner(name: &str) -> proto::RunnerIdentity {
    proto::RunnerIdentity {
        runner_id: Uuid::new_v4().to_string(),
        name: name.into(),
        backend_profiles: vec!["scripted".into()],
        max_concurrency: 10,
        ..Default::default()
    }
}

pub fn status_of(run: &proto::Run) -> RunStatus {
    RunStatus::try_from(run.status).expect("a known status")
}

/// Checks the event log over the whole database: per run, seq runs 1..=last_event_seq
/// without gap or duplicate, no runner event is stored twice, and every other invariant
/// that holds whatever state the runs are in ([`invariants::assert_invariants`] with
/// [`invariants::Settled::Any`]).
pub async fn assert_event_log_consistent(db: &tokio_postgres::Client) {
    invariants::assert_invariants(db, invariants::Settled::Any, &[]).await;
}

/// Claims runs for `runner` until `n` are held (or panics after a deadline).
pub async fn claim(
    app: &mut TestApp,
    runner: &proto::RunnerIdentity,
    n: i32,
) -> Vec<proto::Assignment> {
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < n as usize {
        let response = app
            .runners
            .claim_runs(proto::ClaimRunsRequest {
                runner: Some(runner.clone()),
                max_runs: n - held.len() as i32,
            })
            .await
            .expect("claim runs")
            .into_inner();
        if response.assignments.is_empty() {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} runs could be claimed",
                held.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        held.extend(response.assignments);
    }
    held
}

/// Runner events with runner_seq `from..=to`, all content deltas.
pub fn deltas(from: i64, to: i64) -> Vec<proto::RunnerEvent> {
    (from..=to)
        .map(|runner_seq| proto::RunnerEvent {
            runner_seq,
            r#type: "content.delta".into(),
            payload_json: serde_json::json!({"kind": "assistant_text", "delta": format!("token {runner_seq} ")}).to_string(),
        })
        .collect()
}

/// An AppendEvents request for a held assignment.
pub fn append(
    runner: &proto::RunnerIdentity,
    a: &proto::Assignment,
    events: Vec<proto::RunnerEvent>,
) -> proto::AppendEventsRequest {
    proto::AppendEventsRequest {
        runner_id: runner.runner_id.clone(),
        run_id: a.run.as_ref().expect("assignment has a run").run_id.clone(),
        epoch: a.epoch,
        events,
        command_updates: vec![],
    }
}

/// A FinishRun request for a held assignment.
pub fn finish(
    runner: &proto::RunnerIdentity,
    a: &proto::Assignment,
    status: RunStatus,
) -> proto::FinishRunRequest {
    proto::FinishRunRequest {
        runner_id: runner.runner_id.clone(),
        run_id: a.run.as_ref().expect("assignment has a run").run_id.clone(),
        epoch: a.epoch,
        status: status as i32,
        ..Default::default()
    }
}

/// The JSON payload of a stored event.
pub fn payload(event: &proto::Event) -> serde_json::Value {
    serde_json::from_str(&event.payload_json).expect("payload is JSON")
}

/// Creates a scripted run with `prompt`; returns its id.
pub async fn create(app: &mut TestApp, prompt: &str) -> String {
    app.runs
        .create_run(run_request(prompt))
        .await
        .expect("create run")
        .into_inner()
        .run
        .expect("run")
        .run_id
}

/// Event types of a run, in seq order.
pub async fn event_types(app: &mut TestApp, run_id: &str) -> Vec<String> {
    app.runs
        .list_events(proto::ListEventsRequest {
            run_id: run_id.into(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list events")
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.r#type)
        .collect()
}

pub async fn get_run(app: &mut TestApp, run_id: &str) -> proto::Run {
    app.runs
        .get_run(proto::GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .expect("get run")
        .into_inner()
        .run
        .expect("run")
}

/// A runner started as a real process against a manager.
pub struct RunnerProcess {
    pub name: String,
    child: Child,
}

impl RunnerProcess {
    /// Starts `agentrun-runner` named `name`; `env` adds or overrides settings
    /// (e.g. `AGENTRUN_SCRIPTED_TOKEN_DELAY_MS`, `AGENTRUN_RUNNER_ID`).
    pub fn start(manager: SocketAddr, name: &str, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(binary("agentrun-runner"));
        command
            .env("AGENTRUN_MANAGER_URL", format!("http://{manager}"))
            .env("AGENTRUN_RUNNER_NAME", name)
            .env("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "5")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL")
            .env_remove("AGENTRUN_COMMAND")
            .env_remove("AGENTRUN_RUNNER_ID")
            .env_remove("AGENTRUN_API_KEY")
            .stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        if std::env::var_os("TEST_LOG").is_none() {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let child = command.spawn().expect("start agentrun-runner");
        Self {
            name: name.to_owned(),
            child,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (SIGKILL for a crash, SIGSTOP/SIGCONT for a zombie, SIGTERM to drain).
    pub fn signal(&self, signal: i32) {
        signal_child(&self.child, signal);
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        wait_child(&mut self.child, &self.name, timeout).await
    }
}

fn signal_child(child: &Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

async fn wait_child(child: &mut Child, name: &str, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("poll the child process") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// All events of a run, in seq order.
pub async fn events_of(app: &mut TestApp, run_id: &str) -> Vec<proto::Event> {
    events_after(app, run_id, 0, 1000).await
}

/// The events of a run after `after_seq`, in seq order, read in pages of `limit` until
/// one comes back empty.
pub async fn events_after(
    app: &mut TestApp,
    run_id: &str,
    mut after_seq: i64,
    limit: i32,
) -> Vec<proto::Event> {
    let mut all = Vec::new();
    loop {
        let page = app
            .runs
            .list_events(proto::ListEventsRequest {
                run_id: run_id.into(),
                after_seq,
                limit,
            })
            .await
            .expect("list events")
            .into_inner()
            .events;
        let Some(last) = page.last() else {
            return all;
        };
        after_seq = last.seq;
        all.extend(page);
    }
}

/// Waits until the run reaches `want` (or any terminal state, which fails the wait).
pub async fn wait_for_run(
    app: &TestApp,
    run_id: &str,
    want: RunStatus,
    timeout: Duration,
) -> proto::Run {
    let client = app.runs.clone();
    wait_for(&format!("run {run_id} to become {want:?}"), timeout, || {
        let mut client = client.clone();
        let run_id = run_id.to_owned();
        async move {
            let run = client
                .get_run(proto::GetRunRequest { run_id })
                .await
                .ok()?
                .into_inner()
                .run?;
            let status = status_of(&run);
            if status != want
                && matches!(
                    status,
                    RunStatus::Completed
                        | RunStatus::Failed
                        | RunStatus::Cancelled
                        | RunStatus::Expired
                        | RunStatus::Blocked
                )
            {
                panic!(
                    "run ended {status:?} ({}: {}) while waiting for {want:?}",
                    run.failure_kind, run.failure_message
                );
            }
            (status == want).then_some(run)
        }
    })
    .await
}

/// Waits until the run has an event of `event_type` (optionally matching `check`).
pub async fn wait_for_event(
    app: &mut TestApp,
    run_id: &str,
    event_type: &str,
    timeout: Duration,
) -> proto::Event {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(event) = events_of(app, run_id)
            .await
            .into_iter()
            .find(|e| e.r#type == event_type)
        {
            return event;
        }
        assert!(
            Instant::now() < deadline,
            "no {event_type} event for run {run_id} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The assistant text a run streamed, in order.
pub fn assistant_text(events: &[proto::Event]) -> String {
    events
        .iter()
        .filter(|e| e.r#type == "content.delta")
        .filter_map(|e| {
            let payload: serde_json::Value = serde_json::from_str(&e.payload_json).ok()?;
            (payload["kind"] == "assistant_text")
                .then(|| payload["delta"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// A local address with a port that was free a moment ago (for a manager that must come
/// back on the same address after a crash).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl ManagerProcess {
    /// The process id (to signal it from elsewhere).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}
