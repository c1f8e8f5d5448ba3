//! `agentrun`: parse the command line, set up logging and signals, run the command.

use std::process::ExitCode;

use agentrun_cli::{EXIT_FAILURE, EXIT_INTERRUPTED};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// mimalloc, not glibc's malloc (see the workspace manifest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// `run` is awaited here, on the main thread (not spawned onto a worker), so `dev`'s
// runner processes are forked by a thread that lives as long as the process: their
// parent-death signal is tied to the thread that forked them.
#[tokio::main]
async fn main() -> ExitCode {
    let cli = agentrun_cli::parse();
    agentrun_cli::telemetry::init(if cli.command.is_dev() { "info" } else { "warn" });
    let shutdown = CancellationToken::new();
    if let Err(err) = watch_signals(shutdown.clone()) {
        eprintln!("error: cannot install signal handlers: {err}");
        return ExitCode::from(EXIT_FAILURE);
    }
    match agentrun_cli::run(cli, shutdown).await {
        Ok(code) => ExitCode::from(code),
        // `agentrun … | head`: the reader has what it wanted.
        Err(err) if err.is_broken_pipe() => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; a second one exits at once.
fn watch_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        shutdown.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        std::process::exit(EXIT_INTERRUPTED.into());
    });
    Ok(())
}
