//! `agentrun`: the command line for agentrun.
//!
//! `agentrun dev` runs a whole local stack (a throwaway PostgreSQL, the manager
//! in-process, runner processes); the other commands are a thin gRPC client of a
//! manager: create runs and follow their replies, read events, send commands, answer
//! approvals (and list the open ones), cancel, inspect; read and follow sessions; show queue statistics.
//!
//! - [`client`]: the connection to the manager and the tenant header.
//! - [`commands`]: one function per client command (runs, approvals, stats).
//! - [`sessions`]: the session commands.
//! - [`follow`]: following a run's event log to its end (WatchRun, or ListEvents
//!   polling), or a session's across runs (WatchSession, or ListSessionEvents polling).
//! - [`progress`]: what a followed run waits for, shown as a status line.
//! - [`render`]: how runs, commands, events, sessions and statistics are printed.
//! - [`dev`]: the local development stack.
//! - [`error`]: the error type and exit codes.
//! - [`telemetry`]: logging to stderr.

pub mod client;
pub mod commands;
pub mod dev;
pub mod error;
pub mod follow;
pub mod progress;
pub mod render;
pub mod sessions;
pub mod telemetry;

use std::path::PathBuf;

use agentrun_shared::tls::ClientTls;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

pub use error::{CliError, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE};

/// Manager URL used when neither `--manager` nor `AGENTRUN_MANAGER_URL` is given.
pub const DEFAULT_MANAGER_URL: &str = "http://127.0.0.1:7400";

/// The `agentrun` command line.
#[derive(Debug, Parser)]
#[command(
    name = "agentrun",
    version,
    about = "Run, follow and steer AI-agent runs on an agentrun manager",
    after_help = "Start a local stack with `agentrun dev`, then try `agentrun run \"hello\" --follow`."
)]
pub struct Cli {
    /// The manager's gRPC URL.
    #[arg(
        long = "manager",
        env = "AGENTRUN_MANAGER_URL",
        default_value = DEFAULT_MANAGER_URL,
        global = true
    )]
    pub manager_url: String,
    /// Tenant to act for, sent as the `agentrun-tenant` request header. Only a manager
    /// running without authentication (`agentrun dev`) reads it (default `default`);
    /// otherwise the tenant is the API key's.
    #[arg(long, env = "AGENTRUN_TENANT", global = true)]
    pub tenant: Option<String>,
    /// API key (`agentrun-manager keys create`), sent as `authorization: Bearer` on
    /// every call. Not needed against `agentrun dev`.
    #[arg(long, env = "AGENTRUN_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate to trust for an `https://` manager URL (default: the system
    /// roots).
    #[arg(long, env = "AGENTRUN_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate to present over TLS; with `--tls-key`.
    #[arg(long, env = "AGENTRUN_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "AGENTRUN_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local stack: PostgreSQL, the manager and runners.
    ///
    /// Starts a throwaway PostgreSQL (unless DATABASE_URL is set), the manager in this
    /// process and `--runners` runner processes, and keeps them running until Ctrl-C or
    /// SIGTERM. Then it stops the runners (SIGTERM, 10 s grace), the manager and the
    /// database, removing the throwaway cluster, and exits 0; a second signal exits at
    /// once with 130.
    Dev(dev::DevArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

/// The commands that talk to a running manager.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create a run with a prompt, and optionally follow its reply.
    ///
    /// Prints the run id; with --follow streams the reply to stdout (the id goes to
    /// stderr) and exits 0 when the run completed, 1 otherwise.
    Run(commands::RunArgs),
    /// Print a run's events; with --follow keep going until the run ends.
    Events(commands::EventsArgs),
    /// Cancel a run and print its resulting status.
    Cancel(commands::CancelArgs),
    /// Send a command (turn, steer, interrupt) to a run.
    Send(commands::SendArgs),
    /// Print a run.
    Get(commands::GetArgs),
    /// List runs, newest first.
    List(commands::ListArgs),
    /// List sessions: active first, then unread, then read; newest first within each.
    ///
    /// The first column marks attention for the reader: `>` a run is active, `*`
    /// unread (changed since the reader marked it read).
    Sessions(sessions::SessionsArgs),
    /// Print a session and the events of its runs; with --follow keep going until
    /// Ctrl-C.
    Session(sessions::SessionArgs),
    /// List requests (approvals, user input) the runs wait for, newest first.
    ///
    /// Open requests of every run by default; name a run, or --status, to narrow or
    /// widen the list. Answer one with `agentrun approve RUN REQUEST`.
    Requests(commands::RequestsArgs),
    /// Accept a run's open request (an approval the run waits for).
    ///
    /// Prints the stored resolution; when the request had been answered before, that
    /// first answer stays and is printed (exit 0 either way).
    Approve(commands::ApproveArgs),
    /// Decline a run's open request.
    ///
    /// Prints the stored resolution; when the request had been answered before, that
    /// first answer stays and is printed (exit 0 either way).
    Decline(commands::ResolveArgs),
    /// Show queue depth and age, per-tenant load and the runners.
    Stats,
}

impl ClientCommand {
    /// True for commands that stop on Ctrl-C themselves because they still have
    /// something to do then (marking a followed session read).
    fn handles_interrupt(&self) -> bool {
        matches!(self, ClientCommand::Session(args) if args.follow)
    }
}

impl Command {
    /// True for the long-running local stack, which logs at `info` by default.
    pub fn is_dev(&self) -> bool {
        matches!(self, Command::Dev(_))
    }
}

/// Runs the command line until it is done or `shutdown` is cancelled (Ctrl-C), and
/// returns the process exit code.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<u8, CliError> {
    let command = match cli.command {
        Command::Dev(args) => return dev::run(args, shutdown).await,
        Command::Client(command) => command,
    };
    let handles_interrupt = command.handles_interrupt();
    let tls = ClientTls {
        ca: cli.tls_ca,
        cert: cli.tls_cert,
        key: cli.tls_key,
    };
    let work = async {
        let mut manager = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(EXIT_INTERRUPTED),
            manager = client::Manager::connect_with_tls(&cli.manager_url, cli.tenant.as_deref(), &tls) => {
                manager?.with_api_key(cli.api_key.as_deref())?
            }
        };
        let manager = &mut manager;
        match command {
            ClientCommand::Run(args) => commands::run(manager, args, &shutdown).await,
            ClientCommand::Events(args) => commands::events(manager, args, &shutdown).await,
            ClientCommand::Cancel(args) => commands::cancel(manager, args).await,
            ClientCommand::Send(args) => commands::send(manager, args).await,
            ClientCommand::Get(args) => commands::get(manager, args).await,
            ClientCommand::List(args) => commands::list(manager, args).await,
            ClientCommand::Requests(args) => commands::requests(manager, args).await,
            ClientCommand::Sessions(args) => sessions::sessions(manager, args).await,
            ClientCommand::Session(args) => sessions::session(manager, args, &shutdown).await,
            ClientCommand::Approve(args) => {
                let decision = if args.for_session {
                    commands::Decision::AcceptForSession
                } else {
                    commands::Decision::Accept
                };
                commands::resolve(manager, args.request, decision).await
            }
            ClientCommand::Decline(args) => {
                commands::resolve(manager, args, commands::Decision::Decline).await
            }
            ClientCommand::Stats => commands::stats(manager).await,
        }
    };
    // Following handles Ctrl-C itself (it ends the reply line first), so `work` is
    // polled first; anything else is simply abandoned — except a command that still
    // has work to do after Ctrl-C, which is left to finish.
    tokio::select! {
        biased;
        result = work => result,
        _ = shutdown.cancelled(), if !handles_interrupt => Ok(EXIT_INTERRUPTED),
    }
}
