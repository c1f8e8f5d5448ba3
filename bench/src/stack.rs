//! The system under test as real processes: a PostgreSQL (throwaway, or `DATABASE_URL`),
//! one manager and a set of runners, all killed when the [`Stack`] is dropped.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentrun_manager::local_postgres::LocalPostgres;
use anyhow::{Context, bail};
use tokio_postgres::NoTls;
use tonic::transport::Channel;

/// The throwaway cluster records statement statistics, to show where a scenario's
/// database time goes ([`crate::statements`]).
const STATEMENT_STATISTICS: &str = "shared_preload_libraries = 'pg_stat_statements'";

/// Where the benchmark database lives.
pub enum Cluster {
    /// A server given by `DATABASE_URL` (a superuser URL).
    External(String),
    /// A throwaway cluster, stopped and deleted on drop.
    Local(LocalPostgres),
}

impl Cluster {
    /// `DATABASE_URL` when set, otherwise a fresh local cluster.
    pub fn start() -> anyhow::Result<Self> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Ok(Cluster::External(url)),
            _ => Ok(Cluster::Local(
                LocalPostgres::start_configured(STATEMENT_STATISTICS)
                    .context("start a throwaway PostgreSQL")?,
            )),
        }
    }

    /// The URL of `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        match self {
            Cluster::Local(pg) => pg.url(database),
            Cluster::External(url) => with_database(url, database),
        }
    }

    /// Creates an empty database named `agentrun_bench_<uuid>` and returns its URL.
    pub async fn create_database(&self) -> anyhow::Result<String> {
        let admin = connect_db(&self.url("postgres")).await?;
        let name = format!("agentrun_bench_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .context("create the benchmark database")?;
        Ok(self.url(&name))
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

/// A direct database connection (its driver task runs in the background).
pub async fn connect_db(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// One manager process and its runners (and maybe more manager replicas on the same
/// database); every process is killed on drop.
pub struct Stack {
    pub addr: SocketAddr,
    database_url: String,
    manager: Child,
    replicas: Vec<Child>,
    runners: Vec<Child>,
}

/// Starts a manager on `database_url`, listening on `addr`, with settings overridden by
/// `manager_env`.
fn spawn_manager(
    database_url: &str,
    addr: SocketAddr,
    manager_env: &[(&str, &str)],
) -> anyhow::Result<Child> {
    Command::new(bin_dir()?.join("agentrun-manager"))
        .arg("serve")
        .envs(manager_env.iter().copied())
        .env("DATABASE_URL", database_url)
        .env("AGENTRUN_AUTH", "disabled")
        .env("AGENTRUN_LISTEN", addr.to_string())
        .env("AGENTRUN_METRICS_LISTEN", "")
        .env("RUST_LOG", manager_log().unwrap_or_else(|| "warn".into()))
        .stdin(Stdio::null())
        .stdout(manager_output()?)
        .spawn()
        .context("start agentrun-manager")
}

/// A channel to the manager at `addr`, retried for up to 20 s while it starts.
async fn channel_to(addr: SocketAddr) -> anyhow::Result<Channel> {
    let endpoint = Channel::from_shared(format!("http://{addr}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(err) if Instant::now() > deadline => {
                bail!("manager at {addr} never accepted connections: {err}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

impl Stack {
    /// Starts the manager on `database_url` and `runners` runner processes, and returns
    /// once the manager accepts gRPC connections.
    pub async fn start(database_url: &str, runners: usize) -> anyhow::Result<Self> {
        Self::start_with(database_url, runners, &[]).await
    }

    /// Like [`Stack::start`], with manager settings overridden by `manager_env`.
    pub async fn start_with(
        database_url: &str,
        runners: usize,
        manager_env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let manager = spawn_manager(database_url, addr, manager_env)?;
        let mut stack = Stack {
            addr,
            database_url: database_url.to_owned(),
            manager,
            replicas: Vec::new(),
            runners: Vec::new(),
        };
        stack.channel().await?;
        let names: Vec<String> = (0..runners).map(|i| format!("bench-{i}")).collect();
        for name in &names {
            stack.spawn_runner(name, &[])?;
        }
        stack.wait_for_runners(&names).await?;
        Ok(stack)
    }

    /// Starts one more runner process named `name`, with the benchmark's settings
    /// (scripted tokens without delay, 256 slots) overridden by `env`; returns its index
    /// for [`Stack::kill_runner`].
    pub fn spawn_runner(&mut self, name: &str, env: &[(&str, &str)]) -> anyhow::Result<usize> {
        let mut command = Command::new(bin_dir()?.join("agentrun-runner"));
        command
            .env("AGENTRUN_MANAGER_URL", format!("http://{}", self.addr))
            .env("AGENTRUN_RUNNER_NAME", name)
            .env("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "0")
            .env("AGENTRUN_MAX_CONCURRENCY", "256")
            .env("AGENTRUN_LINGER_MS", "5")
            .env("RUST_LOG", "warn");
        for (key, value) in env {
            command.env(key, value);
        }
        let runner = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start agentrun-runner")?;
        self.runners.push(runner);
        Ok(self.runners.len() - 1)
    }

    /// Waits until a runner of each name has said hello to the manager (it is in the
    /// `runners` table), so a scenario's first runs are shared among all of them rather
    /// than taken by whichever connected first; gives up after 20 s.
    async fn wait_for_runners(&self, names: &[String]) -> anyhow::Result<()> {
        let db = connect_db(&self.database_url).await?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let registered: i64 = db
                .query_one(
                    "SELECT count(DISTINCT name) FROM runners WHERE name = ANY($1)",
                    &[&names],
                )
                .await
                .context("count the registered runners")?
                .get(0);
            if registered >= names.len() as i64 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "only {registered} of {} runners connected within 20 s",
                    names.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills runner `index` with SIGKILL (no drain, no goodbye) and reaps it.
    pub fn kill_runner(&mut self, index: usize) -> anyhow::Result<()> {
        let runner = self
            .runners
            .get_mut(index)
            .with_context(|| format!("no runner {index}"))?;
        runner.kill().context("kill the runner")?;
        runner.wait().context("reap the runner")?;
        Ok(())
    }

    /// The manager's process id, to read its memory and CPU from `/proc`.
    pub fn manager_pid(&self) -> u32 {
        self.manager.id()
    }

    /// The runner processes' ids (those killed too), to read their CPU from `/proc`.
    pub fn runner_pids(&self) -> Vec<u32> {
        self.runners.iter().map(Child::id).collect()
    }

    /// A channel to the manager, retried for up to 20 s while it starts.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        channel_to(self.addr).await
    }

    /// Starts another manager replica on the same database (no runner connects to it)
    /// and returns a channel to it.
    pub async fn spawn_replica(&mut self) -> anyhow::Result<Channel> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        self.replicas
            .push(spawn_manager(&self.database_url, addr, &[])?);
        channel_to(addr).await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in self
            .runners
            .iter_mut()
            .chain(self.replicas.iter_mut())
            .chain(std::iter::once(&mut self.manager))
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The manager's log filter when it is asked for: `AGENTRUN_BENCH_MANAGER_LOG` (e.g.
/// `warn,h2=debug` to see why a connection closed).
fn manager_log() -> Option<String> {
    std::env::var("AGENTRUN_BENCH_MANAGER_LOG").ok()
}

/// The manager logs to stdout, which would mix with the report: dropped, unless a log
/// filter was asked for, then sent to this process's stderr.
fn manager_output() -> anyhow::Result<Stdio> {
    if manager_log().is_none() {
        return Ok(Stdio::null());
    }
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    Ok(Stdio::from(stderr))
}

/// The directory of this executable, where cargo also puts the manager and runner
/// binaries of the same profile.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the bench binary")?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    for name in ["agentrun-manager", "agentrun-runner"] {
        if !dir.join(name).is_file() {
            bail!(
                "{name} not found in {}: build it first (cargo build --release -p agentrun-manager -p agentrun-runner)",
                dir.display()
            );
        }
    }
    Ok(dir)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
