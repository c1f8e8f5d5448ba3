//! `agentrun dev`: a whole local stack in one command, for development and demos.
//!
//! It owns three things and tears them down in reverse order on Ctrl-C or SIGTERM:
//! a throwaway PostgreSQL cluster (unless `DATABASE_URL` is set), the manager running
//! in this process, and `--runners` runner processes (the `agentrun-runner` binary next
//! to this one). Runners are stopped first, with SIGTERM and a grace period, while the
//! manager still serves them so they can finish or release their runs; then the
//! manager; then the cluster is removed. A runner that exits on its own is logged, not
//! restarted.
//!
//! Runners get their own process group, so the terminal's Ctrl-C reaches only this
//! process, which then drains them in order; on Linux they also get SIGTERM if this
//! process dies without the chance to stop them (parent-death signal).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agentrun_manager::config::AuthMode;
use agentrun_manager::local_postgres::LocalPostgres;
use agentrun_manager::{Application, Settings};
use anyhow::Context;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::DEFAULT_MANAGER_URL;
use crate::error::{CliError, EXIT_OK};

/// The runner binary `dev` starts, looked up next to the current executable.
pub const RUNNER_BINARY: &str = "agentrun-runner";
/// How long runners get to drain after SIGTERM before they are killed.
const RUNNER_GRACE: Duration = Duration::from_secs(10);
/// How long the manager gets to finish in-flight calls before it is abandoned.
const MANAGER_GRACE: Duration = Duration::from_secs(10);
/// How often runner processes are checked for unexpected exits.
const REAP_INTERVAL: Duration = Duration::from_millis(250);

/// Arguments of `agentrun dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Address the manager listens on. Loopback only: dev runs without authentication.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// How many runner processes to start.
    #[arg(long, default_value_t = 2)]
    pub runners: u32,
    /// Address of the web UI. Loopback only without `--auth`.
    #[arg(long, default_value = "127.0.0.1:7401")]
    pub ui_listen: SocketAddr,
    /// Do not serve the web UI.
    #[arg(long, conflicts_with_all = ["ui_listen", "ui_base_path"])]
    pub no_ui: bool,
    /// Path the web UI is served under.
    #[arg(long, default_value = "/")]
    pub ui_base_path: String,
    /// Require API keys, as a real deployment does: dev creates a client and an admin
    /// key for tenant `default` (printed in the banner) and a runner key for its runners.
    #[arg(long)]
    pub auth: bool,
}

/// The API keys `dev --auth` creates.
struct DevKeys {
    client: String,
    admin: String,
    runner: String,
}

impl DevKeys {
    /// Creates the keys in the (migrated) database at `url`.
    async fn create(url: &str) -> anyhow::Result<Self> {
        use agentrun_manager::store::api_keys::{Role, create};
        let pool = agentrun_manager::db::pool(url, 1)?;
        let client = pool.get().await?;
        let key = |role, name| create(&client, "default", role, &[], name, None);
        let keys = Self {
            client: key(Role::Client, "dev client").await?.key,
            admin: key(Role::Admin, "dev admin").await?.key,
            runner: key(Role::Runner, "dev runners").await?.key,
        };
        pool.close();
        Ok(keys)
    }
}

/// Runs the stack until `shutdown` is cancelled, then stops it. Returns 0 after a
/// graceful stop (a signal asked for it); an error if the manager failed on its own.
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> Result<u8, CliError> {
    let ui_listen = (!args.no_ui).then_some(args.ui_listen);
    for (flag, addr) in [("--listen", Some(args.listen)), ("--ui-listen", ui_listen)] {
        if let Some(addr) = addr
            && !args.auth
            && !addr.ip().is_loopback()
        {
            return Err(CliError::Usage(format!(
                "{flag} {addr} is not a loopback address: `agentrun dev` runs without \
                 authentication unless --auth is given, so it listens on loopback only \
                 (127.0.0.1 or [::1])"
            )));
        }
    }
    // Checked before anything is started, so a missing build fails fast.
    let runner_binary = match args.runners {
        0 => None,
        _ => Some(runner_binary()?),
    };

    let database = Database::open().await?;
    if shutdown.is_cancelled() {
        database.remove().await;
        return Ok(EXIT_OK);
    }
    let mut settings = Settings::for_database(database.url());
    settings.listen = args.listen;
    settings.ui_listen = ui_listen.map(|addr| addr.to_string()).unwrap_or_default();
    settings.ui_base_path = args.ui_base_path.clone();
    // Webhook receivers on a laptop are local.
    settings.webhook_private_targets = true;
    // Development mode: no API keys unless asked. The manager refuses this off
    // loopback, and so did the check above.
    settings.auth = if args.auth {
        AuthMode::Required
    } else {
        AuthMode::Disabled
    };
    // Plaintext on loopback: TLS settings meant for a real manager (in the environment)
    // do not apply to the local stack, nor to its runners below.
    settings.tls_cert = None;
    settings.tls_key = None;
    settings.tls_client_ca = None;
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(err) => {
            database.remove().await;
            let context = format!("cannot start the manager on {}", args.listen);
            return Err(CliError::Other(err.context(context)));
        }
    };
    let addr = app.local_addr();
    let ui_url = app.ui_url();
    let manager_url = format!("http://{addr}");
    let keys = if args.auth {
        match DevKeys::create(&database.url()).await {
            Ok(keys) => Some(keys),
            Err(err) => {
                database.remove().await;
                return Err(CliError::Other(
                    err.context("cannot create the dev API keys"),
                ));
            }
        }
    } else {
        None
    };
    let manager_stop = CancellationToken::new();
    let mut manager = tokio::spawn(app.run(manager_stop.clone()));

    let mut runners = Vec::new();
    let mut failure: Option<CliError> = None;
    if let Some(binary) = &runner_binary {
        for index in 1..=args.runners {
            let key = keys.as_ref().map(|keys| keys.runner.as_str());
            match RunnerProcess::spawn(binary, &manager_url, key, index) {
                Ok(runner) => runners.push(runner),
                Err(err) => {
                    let message = format!("cannot start {}", binary.display());
                    failure = Some(CliError::Other(anyhow::Error::new(err).context(message)));
                    break;
                }
            }
        }
    }

    let mut manager_ended = None;
    if failure.is_none() {
        println!(
            "{}",
            banner(&database, addr, ui_url.as_deref(), keys.as_ref(), &runners)
        );
        let mut reap = tokio::time::interval(REAP_INTERVAL);
        manager_ended = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                ended = &mut manager => break Some(ended),
                _ = reap.tick() => runners.iter_mut().for_each(RunnerProcess::check),
            }
        };
        tracing::info!("shutting down");
    }

    stop_runners(&mut runners).await;
    let manager_result = match manager_ended {
        // The manager only returns once told to stop: anything else is a failure.
        Some(Ok(Ok(()))) => Err(anyhow::anyhow!("the manager stopped unexpectedly")),
        Some(Ok(Err(err))) => Err(err.context("the manager failed")),
        Some(Err(join)) => Err(anyhow::anyhow!("the manager task failed: {join}")),
        None => {
            manager_stop.cancel();
            match tokio::time::timeout(MANAGER_GRACE, &mut manager).await {
                Ok(Ok(result)) => result.context("the manager failed while stopping"),
                Ok(Err(join)) => Err(anyhow::anyhow!("the manager task failed: {join}")),
                Err(_) => {
                    tracing::warn!("the manager did not stop within {MANAGER_GRACE:?}");
                    manager.abort();
                    Ok(())
                }
            }
        }
    };
    let removed = database.remove().await;
    if let Some(note) = removed {
        println!("{note}");
    }
    match (failure, manager_result) {
        (Some(err), _) => Err(err),
        (None, Err(err)) => Err(CliError::Other(err)),
        (None, Ok(())) => {
            println!("agentrun dev stopped");
            Ok(EXIT_OK)
        }
    }
}

/// Where the manager's data lives.
enum Database {
    /// `DATABASE_URL`, used as it is and left alone.
    External(String),
    /// A throwaway cluster, removed by [`Database::remove`] (or its own drop/watchdog).
    Local(LocalPostgres),
}

impl Database {
    /// `DATABASE_URL` when set, else a freshly started throwaway cluster.
    async fn open() -> Result<Self, CliError> {
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.is_empty()
        {
            return Ok(Database::External(url));
        }
        let started = tokio::task::spawn_blocking(LocalPostgres::start)
            .await
            .context("starting PostgreSQL panicked")?;
        let pg = started.context("cannot start a throwaway PostgreSQL")?;
        tracing::info!(port = pg.port(), dir = %pg.data_dir().display(), "started a throwaway PostgreSQL");
        Ok(Database::Local(pg))
    }

    fn url(&self) -> String {
        match self {
            Database::External(url) => url.clone(),
            Database::Local(pg) => pg.url("postgres"),
        }
    }

    /// The banner's description.
    fn describe(&self) -> String {
        match self {
            Database::External(url) => format!("{} (DATABASE_URL)", redact_password(url)),
            Database::Local(pg) => format!(
                "127.0.0.1:{}, throwaway cluster in {} (removed on exit)",
                pg.port(),
                cluster_dir(pg).display()
            ),
        }
    }

    /// Stops and deletes a throwaway cluster (blocking work, off the runtime); returns
    /// a note saying so.
    async fn remove(self) -> Option<String> {
        let Database::Local(pg) = self else {
            return None;
        };
        let dir = cluster_dir(&pg);
        match tokio::task::spawn_blocking(move || drop(pg)).await {
            Ok(()) => Some(format!(
                "removed the throwaway PostgreSQL in {}",
                dir.display()
            )),
            Err(err) => {
                tracing::error!(%err, "removing the throwaway PostgreSQL failed");
                None
            }
        }
    }
}

/// The temp dir holding the cluster (its data dir's parent); all of it is removed.
fn cluster_dir(pg: &LocalPostgres) -> PathBuf {
    let data = pg.data_dir();
    data.parent().map(Path::to_path_buf).unwrap_or(data)
}

/// `postgres://user:***@host/db` for `postgres://user:secret@host/db`.
fn redact_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// The runner binary next to the current executable.
fn runner_binary() -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe().context("cannot locate the agentrun executable")?;
    let dir = exe
        .parent()
        .context("the agentrun executable has no parent directory")?;
    let path = dir.join(RUNNER_BINARY);
    if path.is_file() {
        Ok(path)
    } else {
        Err(CliError::Other(anyhow::anyhow!(
            "{RUNNER_BINARY} not found at {}: run `cargo build --workspace` first \
             (or start without runners: --runners 0)",
            path.display()
        )))
    }
}

/// One runner child process.
struct RunnerProcess {
    name: String,
    child: Child,
    /// Exited and reaped; never signalled again (its pid may be reused).
    exited: bool,
}

impl RunnerProcess {
    /// Starts runner number `index` against `manager_url`, with this process's
    /// environment (provider keys and settings) plus its URL and name.
    fn spawn(
        binary: &Path,
        manager_url: &str,
        api_key: Option<&str>,
        index: u32,
    ) -> io::Result<Self> {
        let name = format!("runner-{index}");
        let mut command = Command::new(binary);
        match api_key {
            Some(key) => command.env("AGENTRUN_API_KEY", key),
            None => command.env_remove("AGENTRUN_API_KEY"),
        };
        if !crate::telemetry::color() {
            command.env("NO_COLOR", "1");
        }
        command
            .env("AGENTRUN_MANAGER_URL", manager_url)
            .env("AGENTRUN_RUNNER_NAME", &name)
            .env_remove("AGENTRUN_TLS_CA")
            .env_remove("AGENTRUN_TLS_CERT")
            .env_remove("AGENTRUN_TLS_KEY")
            .stdin(Stdio::null())
            // Runners log to stdout: into this process's stderr, beside the manager's
            // log lines, in the same format (colour only when that is a terminal).
            .stdout(Stdio::from(io::stderr()))
            .kill_on_drop(true)
            // Keep the terminal's Ctrl-C away from runners: dev drains them itself.
            .process_group(0);
        #[cfg(target_os = "linux")]
        {
            // SAFETY: getpid has no preconditions and cannot fail.
            let parent = unsafe { libc::getpid() };
            // SAFETY: only async-signal-safe calls (prctl, getppid) run between fork
            // and exec, and the closure touches no memory shared with the parent.
            unsafe {
                command.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                    // The parent died before the signal was armed: do not run orphaned.
                    if libc::getppid() != parent {
                        return Err(io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn()?;
        tracing::info!(runner = %name, pid = child.id(), "started runner");
        Ok(Self {
            name,
            child,
            exited: false,
        })
    }

    /// Logs the runner's exit if it has exited; it is not restarted.
    fn check(&mut self) {
        if self.exited {
            return;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exited = true;
                tracing::warn!(runner = %self.name, %status, "runner exited; it is not restarted");
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(runner = %self.name, %err, "cannot check runner"),
        }
    }
}

/// SIGTERMs every live runner, waits for them together up to [`RUNNER_GRACE`], then
/// SIGKILLs the stragglers.
async fn stop_runners(runners: &mut [RunnerProcess]) {
    for runner in runners.iter_mut() {
        runner.check();
        if runner.exited {
            continue;
        }
        // `id()` is `None` once the child has been reaped; until then its pid cannot be
        // reused, so the signal reaches our runner.
        if let Some(pid) = runner.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + RUNNER_GRACE;
    for runner in runners.iter_mut().filter(|r| !r.exited) {
        match tokio::time::timeout_at(deadline, runner.child.wait()).await {
            Ok(Ok(status)) => tracing::info!(runner = %runner.name, %status, "runner stopped"),
            Ok(Err(err)) => tracing::warn!(runner = %runner.name, %err, "cannot wait for runner"),
            Err(_) => {
                tracing::warn!(runner = %runner.name, "runner did not stop in {RUNNER_GRACE:?}; killing it");
                if let Err(err) = runner.child.kill().await {
                    tracing::warn!(runner = %runner.name, %err, "cannot kill runner");
                }
            }
        }
        runner.exited = true;
    }
}

/// What is running and how to use it.
fn banner(
    database: &Database,
    addr: SocketAddr,
    ui_url: Option<&str>,
    keys: Option<&DevKeys>,
    runners: &[RunnerProcess],
) -> String {
    let url = format!("http://{addr}");
    let ui_line = match ui_url {
        Some(ui) => format!("  ui        {ui}\n"),
        None => String::new(),
    };
    let auth_lines = match keys {
        Some(keys) => format!(
            "  auth      API keys required (tenant `default`)\n  \
             api key   {}\n  \
             admin key {}\n",
            keys.client, keys.admin
        ),
        None => {
            "  auth      off: development mode without authentication, loopback only\n".to_owned()
        }
    };
    let key_flag = match keys {
        Some(keys) => format!("--api-key {} ", keys.client),
        None => String::new(),
    };
    let runner_line = match runners.len() {
        0 => "none (--runners 0)".to_owned(),
        n => format!(
            "{n} ({}), {RUNNER_BINARY} processes",
            runners
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let manager_flag = if url == DEFAULT_MANAGER_URL {
        String::new()
    } else {
        format!("--manager {url} ")
    };
    format!(
        "agentrun dev\n  \
         postgres  {}\n  \
         manager   {url} (in this process)\n\
         {ui_line}  \
         runners   {runner_line}\n\
         {auth_lines}\
         try:  agentrun {manager_flag}{key_flag}run \"hello\" --follow\n\
         stop: Ctrl-C",
        database.describe()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_password("postgres://app:s3cret@db:5432/agentrun"),
            "postgres://app:***@db:5432/agentrun"
        );
        assert_eq!(
            redact_password("postgres://app@db/agentrun"),
            "postgres://app@db/agentrun"
        );
        assert_eq!(redact_password("not a url"), "not a url");
    }

    #[test]
    fn banner_names_the_manager_flag_when_not_default() {
        let db = Database::External("postgres://u:p@h/d".into());
        let text = banner(&db, "127.0.0.1:7400".parse().unwrap(), None, None, &[]);
        assert!(
            text.contains("try:  agentrun run \"hello\" --follow"),
            "{text}"
        );
        assert!(text.contains("postgres://u:***@h/d"), "{text}");
        let text = banner(&db, "127.0.0.1:9999".parse().unwrap(), None, None, &[]);
        assert!(
            text.contains("agentrun --manager http://127.0.0.1:9999 run"),
            "{text}"
        );
    }
}
