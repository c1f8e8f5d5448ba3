//! `agentrun-runner`: parse settings, build providers, run until SIGTERM and drained.

use agentrun_runner::config::{ProviderSettings, RunnerSettings};
use agentrun_runner::setup;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "agentrun-runner", version, about = "An agentrun runner")]
struct Cli {
    #[command(flatten)]
    runner: RunnerSettings,
    #[command(flatten)]
    providers: ProviderSettings,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let (providers, default_profiles) = setup::providers(&cli.providers)?;
    let profiles = if cli.runner.backend_profiles.is_empty() {
        default_profiles
    } else {
        cli.runner.backend_profiles.clone()
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining");
        signal.cancel();
        // A second signal exits at once.
        wait_for_signal().await;
        std::process::exit(130);
    });
    agentrun_runner::run(cli.runner, profiles, providers, shutdown).await
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds at start-up");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
