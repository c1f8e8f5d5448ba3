//! `agentrun`: the command line for agentrun.
//!
//! `agentrun dev` runs a whole local stack (a throwaway PostgreSQL, the manager
//! in-process, runner processes); the other commands are a thin gRPC client of a
//! manager: create runs and follow their replies, read events, send commands, answer
//! approvals (and list the open ones), cancel (one run or by filter), re-run and fork,
//! inspect; read and follow sessions; schedules and webhooks; show queue statistics; and
//! the operator commands (runners, tenant, rate and concurrency limits, API keys) over
//! AdminService.
//! Client options (`--manager`, `--api-key`, `-o`, …) are accepted before or after a
//! client command, and not by `dev` or `completion`.
//!
//! - [`client`]: the connection to the manager and the tenant header.
//! - [`commands`]: one function per client command (runs, re-runs and forks, approvals,
//!   stats).
//! - [`admin`]: the operator commands (runners, limits, keys).
//! - [`flow_limits`]: the flow-control operator commands (rate and concurrency limits).
//! - [`output`]: the JSON shape of everything printed with `-o json|jsonl`.
//! - [`duration`]: durations as flags take them (`500ms`, `6s`, `10m`, `2h`, `1d`).
//! - [`sessions`]: the session commands.
//! - [`schedules`]: the schedule commands (ScheduleService).
//! - [`webhooks`]: the webhook commands.
//! - [`follow`]: following a run's event log to its end (WatchRun, or ListEvents
//!   polling), or a session's across runs (WatchSession, or ListSessionEvents polling).
//! - [`progress`]: what a followed run waits for, shown as a status line.
//! - [`render`]: how runs, commands, events, sessions and statistics are printed.
//! - [`dev`]: the local development stack.
//! - [`error`]: the error type and exit codes.
//! - [`telemetry`]: logging to stderr.

pub mod admin;
pub mod client;
pub mod commands;
pub mod dev;
pub mod duration;
pub mod error;
pub mod flow_limits;
pub mod follow;
pub mod output;
pub mod progress;
pub mod render;
pub mod schedules;
pub mod sessions;
pub mod telemetry;
pub mod webhooks;

use std::path::PathBuf;

use agentrun_shared::tls::ClientTls;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, error::ErrorKind};
use tokio_util::sync::CancellationToken;

pub use error::{CliError, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE};
pub use output::OutputFormat;

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
    /// Connection and output flags given before the command (`agentrun --manager URL
    /// list`); the same flags after a client command take precedence.
    #[command(flatten)]
    pub options: ClientOptions,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the manager is, how to authenticate, and how to print results: what every
/// client command needs. Given before the command, and read from the environment.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Client options (also accepted after a client command)")]
pub struct ClientOptions {
    /// The manager's gRPC URL.
    #[arg(
        long = "manager",
        value_name = "URL",
        env = "AGENTRUN_MANAGER_URL",
        default_value = DEFAULT_MANAGER_URL
    )]
    pub manager_url: String,
    /// Tenant to act for, sent as the `agentrun-tenant` request header. Only a manager
    /// running without authentication (`agentrun dev`) reads it (default `default`);
    /// otherwise the tenant is the API key's.
    #[arg(long, env = "AGENTRUN_TENANT")]
    pub tenant: Option<String>,
    /// API key (`agentrun keys create`), sent as `authorization: Bearer` on every call.
    /// Not needed against `agentrun dev`; operator commands need an admin key.
    #[arg(long, env = "AGENTRUN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate to trust for an `https://` manager URL (default: the system
    /// roots).
    #[arg(long, env = "AGENTRUN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate to present over TLS; with `--tls-key`.
    #[arg(long, env = "AGENTRUN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "AGENTRUN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Output format: `text` for people, `json` (one document) or `jsonl` (one object
    /// per line) for programs.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// The client options as accepted after a client command (`agentrun list --manager
/// URL`); each one given overrides the same option before the command or in the
/// environment.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Client options")]
pub struct ClientFlags {
    /// The manager's gRPC URL [env: AGENTRUN_MANAGER_URL] [default: http://127.0.0.1:7400].
    #[arg(long = "manager", value_name = "URL", global = true)]
    pub manager_url: Option<String>,
    /// Tenant to act for without authentication (`agentrun dev`) [env: AGENTRUN_TENANT].
    #[arg(long, global = true)]
    pub tenant: Option<String>,
    /// API key, sent as `authorization: Bearer`; operator commands need an admin key
    /// [env: AGENTRUN_API_KEY].
    #[arg(long, global = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate to trust for an `https://` manager URL [env: AGENTRUN_TLS_CA].
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate to present over TLS; with `--tls-key` [env:
    /// AGENTRUN_TLS_CERT].
    #[arg(long, global = true)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert` [env: AGENTRUN_TLS_KEY].
    #[arg(long, global = true)]
    pub tls_key: Option<PathBuf>,
    /// Output format: `text`, `json` (one document) or `jsonl` (one object per line).
    #[arg(short = 'o', long, value_enum, global = true)]
    pub output: Option<OutputFormat>,
}

impl ClientOptions {
    /// These options with those given after the command taking precedence.
    pub fn merge(self, flags: ClientFlags) -> Self {
        Self {
            manager_url: flags.manager_url.unwrap_or(self.manager_url),
            tenant: flags.tenant.or(self.tenant),
            api_key: flags.api_key.or(self.api_key),
            tls_ca: flags.tls_ca.or(self.tls_ca),
            tls_cert: flags.tls_cert.or(self.tls_cert),
            tls_key: flags.tls_key.or(self.tls_key),
            output: flags.output.unwrap_or(self.output),
        }
    }
}

/// A client command's own arguments and the client options.
#[derive(Debug, clap::Args)]
pub struct Client<T: clap::Args> {
    #[command(flatten)]
    pub args: T,
    #[command(flatten)]
    pub flags: ClientFlags,
}

/// A command without arguments of its own.
#[derive(Debug, clap::Args)]
pub struct NoArgs {}

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
    /// Print a shell completion script.
    ///
    /// Bash: `agentrun completion bash > ~/.local/share/bash-completion/completions/agentrun`;
    /// zsh: `agentrun completion zsh > "${fpath[1]}/_agentrun"`; fish: `agentrun
    /// completion fish > ~/.config/fish/completions/agentrun.fish`.
    Completion(CompletionArgs),
    #[command(flatten)]
    Client(Box<ClientCommand>),
}

/// Arguments of `agentrun completion`.
#[derive(Debug, clap::Args)]
pub struct CompletionArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// A shell `agentrun completion` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The commands that talk to a running manager.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Create a run with a prompt, and optionally follow its reply.
    ///
    /// Prints the run id (with -o json, the run); with --follow streams the reply to
    /// stdout (the id goes to stderr) and exits 0 when the run completed, 1 otherwise.
    Run(Client<commands::RunArgs>),
    /// Print a run's events; with --follow keep going until the run ends.
    Events(Client<commands::EventsArgs>),
    /// Cancel a run and print its resulting status; or, with filters instead of a run,
    /// every run not ended that matches them.
    Cancel(Client<commands::CancelArgs>),
    /// Run a run again: a new run with its input and settings, linked to it.
    ///
    /// Prints the new run's id (with -o json, the run); with --follow streams its reply.
    Rerun(Client<commands::RerunArgs>),
    /// Start a new run from a turn of an earlier run, with everything before that turn
    /// as its conversation.
    ///
    /// Prints the new run's id (with -o json, the run); with --follow streams its reply.
    Fork(Client<commands::ForkArgs>),
    /// Send a command (turn, steer, interrupt) to a run.
    Send(Client<commands::SendArgs>),
    /// Print a run.
    Get(Client<commands::GetArgs>),
    /// List runs, newest first.
    List(Client<commands::ListArgs>),
    /// List sessions: active first, then unread, then read; newest first within each.
    ///
    /// The first column marks attention for the reader: `>` a run is active, `*`
    /// unread (changed since the reader marked it read).
    Sessions(Client<sessions::SessionsArgs>),
    /// Print a session and the events of its runs; with --follow keep going until
    /// Ctrl-C.
    Session(Client<sessions::SessionArgs>),
    /// List requests (approvals, user input) the runs wait for, newest first.
    ///
    /// Open requests of every run by default; name a run, or --status, to narrow or
    /// widen the list. Answer one with `agentrun approve RUN [REQUEST]`.
    Requests(Client<commands::RequestsArgs>),
    /// Accept a run's open request (an approval the run waits for).
    ///
    /// Without REQUEST, answers the run's only open request (refused, listing them,
    /// when it has several or none). Prints the stored resolution; when the request had
    /// been answered before, that first answer stays and is printed (exit 0 either way).
    Approve(Client<commands::ApproveArgs>),
    /// Decline a run's open request.
    ///
    /// Without REQUEST, declines the run's only open request (refused, listing them,
    /// when it has several or none). Prints the stored resolution; when the request had
    /// been answered before, that first answer stays and is printed (exit 0 either way).
    Decline(Client<commands::ResolveArgs>),
    /// Show queue depth and age, per-tenant load and the runners.
    Stats(Client<NoArgs>),
    /// Runs on a schedule: create, list, get, pause, resume, delete, trigger.
    ///
    /// `agentrun schedules create nightly "summarize the day" --cron "0 18 * * *"
    /// --time-zone Europe/Berlin`, or `--every 10m` for a fixed interval.
    Schedules(Box<schedules::SchedulesArgs>),
    /// List the runners (operator; needs an admin key), or drain one.
    Runners(admin::RunnersArgs),
    /// Set tenants' limits (operator; needs an admin key).
    Limits(admin::LimitsArgs),
    /// Create, list and revoke API keys (operator; needs an admin key).
    Keys(admin::KeysArgs),
    /// Create, list and delete webhooks, and list their deliveries [default: list].
    Webhooks(webhooks::WebhooksArgs),
}

impl ClientCommand {
    /// True for commands that stop on Ctrl-C themselves because they still have
    /// something to do then (marking a followed session read).
    fn handles_interrupt(&self) -> bool {
        matches!(self, ClientCommand::Session(c) if c.args.follow)
    }

    /// The client options given after the command.
    fn flags(&self) -> ClientFlags {
        match self {
            ClientCommand::Run(c) => c.flags.clone(),
            ClientCommand::Events(c) => c.flags.clone(),
            ClientCommand::Cancel(c) => c.flags.clone(),
            ClientCommand::Rerun(c) => c.flags.clone(),
            ClientCommand::Fork(c) => c.flags.clone(),
            ClientCommand::Send(c) => c.flags.clone(),
            ClientCommand::Get(c) => c.flags.clone(),
            ClientCommand::List(c) => c.flags.clone(),
            ClientCommand::Sessions(c) => c.flags.clone(),
            ClientCommand::Session(c) => c.flags.clone(),
            ClientCommand::Requests(c) => c.flags.clone(),
            ClientCommand::Approve(c) => c.flags.clone(),
            ClientCommand::Decline(c) => c.flags.clone(),
            ClientCommand::Stats(c) => c.flags.clone(),
            ClientCommand::Schedules(c) => c.flags.clone(),
            ClientCommand::Runners(c) => c.flags.clone().into(),
            ClientCommand::Limits(c) => c.flags.clone().into(),
            ClientCommand::Keys(c) => c.flags.clone().into(),
            ClientCommand::Webhooks(c) => c.flags.clone(),
        }
    }
}

impl Command {
    /// True for the long-running local stack, which logs at `info` by default.
    pub fn is_dev(&self) -> bool {
        matches!(self, Command::Dev(_))
    }
}

/// Parses the process's arguments (exiting with a usage error as clap does), refusing
/// client options before a command they do nothing for (`agentrun --manager URL dev`).
pub fn parse() -> Cli {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    let command = match &cli.command {
        Command::Dev(_) => "dev",
        Command::Completion(_) => "completion",
        Command::Client(_) => return cli,
    };
    let ids = [
        ("manager_url", "--manager"),
        ("tenant", "--tenant"),
        ("api_key", "--api-key"),
        ("tls_ca", "--tls-ca"),
        ("tls_cert", "--tls-cert"),
        ("tls_key", "--tls-key"),
        ("output", "--output"),
    ];
    for (id, flag) in ids {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            Cli::command()
                .error(
                    ErrorKind::ArgumentConflict,
                    format!("{flag} does nothing for `agentrun {command}`"),
                )
                .exit();
        }
    }
    cli
}

/// Writes the completion script for `shell` to `out`.
pub fn completion(shell: CompletionShell, out: &mut dyn std::io::Write) {
    use clap_complete::Shell;
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    clap_complete::generate(shell, &mut Cli::command(), "agentrun", out);
}

/// Runs the command line until it is done or `shutdown` is cancelled (Ctrl-C), and
/// returns the process exit code.
pub async fn run(cli: Cli, shutdown: CancellationToken) -> Result<u8, CliError> {
    let command = match cli.command {
        Command::Dev(args) => return dev::run(args, shutdown).await,
        Command::Completion(args) => {
            let mut out = Vec::new();
            completion(args.shell, &mut out);
            commands::write_out(&String::from_utf8_lossy(&out))?;
            return Ok(EXIT_OK);
        }
        Command::Client(command) => *command,
    };
    let handles_interrupt = command.handles_interrupt();
    let options = cli.options.merge(command.flags());
    let out = options.output;
    let tls = ClientTls {
        ca: options.tls_ca,
        cert: options.tls_cert,
        key: options.tls_key,
    };
    let work = async {
        let mut manager = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(EXIT_INTERRUPTED),
            manager = client::Manager::connect_with_tls(&options.manager_url, options.tenant.as_deref(), &tls) => {
                manager?.with_api_key(options.api_key.as_deref())?
            }
        };
        let manager = &mut manager;
        match command {
            ClientCommand::Run(c) => commands::run(manager, c.args, out, &shutdown).await,
            ClientCommand::Events(c) => commands::events(manager, c.args, out, &shutdown).await,
            ClientCommand::Cancel(c) => commands::cancel(manager, c.args, out).await,
            ClientCommand::Rerun(c) => commands::rerun(manager, c.args, out, &shutdown).await,
            ClientCommand::Fork(c) => commands::fork(manager, c.args, out, &shutdown).await,
            ClientCommand::Send(c) => commands::send(manager, c.args, out).await,
            ClientCommand::Get(c) => commands::get(manager, c.args, out).await,
            ClientCommand::List(c) => commands::list(manager, c.args, out).await,
            ClientCommand::Requests(c) => commands::requests(manager, c.args, out).await,
            ClientCommand::Sessions(c) => sessions::sessions(manager, c.args, out).await,
            ClientCommand::Session(c) => sessions::session(manager, c.args, out, &shutdown).await,
            ClientCommand::Approve(c) => {
                let decision = if c.args.for_session {
                    commands::Decision::AcceptForSession
                } else {
                    commands::Decision::Accept
                };
                commands::resolve(manager, c.args.request, decision, out).await
            }
            ClientCommand::Decline(c) => {
                commands::resolve(manager, c.args, commands::Decision::Decline, out).await
            }
            ClientCommand::Stats(_) => commands::stats(manager, out).await,
            ClientCommand::Schedules(c) => schedules::schedules(manager, *c, out).await,
            ClientCommand::Runners(c) => admin::runners(manager, c, out).await,
            ClientCommand::Limits(c) => admin::limits(manager, c, out).await,
            ClientCommand::Keys(c) => admin::keys(manager, c, out).await,
            ClientCommand::Webhooks(c) => webhooks::webhooks(manager, c, out).await,
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
