//! `agentrun-runner`: parse settings, build providers, run until SIGTERM and drained;
//! or `agentrun-runner health`, asking a running runner's `/healthz`.

use agentrun_runner::config::{ProviderSettings, RunnerSettings};
use agentrun_runner::setup;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc, not glibc's malloc (see the workspace manifest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "agentrun-runner", version, about = "An agentrun runner")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    runner: RunnerSettings,
    #[command(flatten)]
    providers: ProviderSettings,
}

#[derive(Subcommand)]
enum Command {
    /// Ask a runner's `/healthz` (exit 0 healthy, 1 not): a container health check. By
    /// default this runner's `--health-listen` address on loopback.
    Health {
        /// The URL to ask, e.g. `http://10.0.0.7:9401/healthz`.
        #[arg(long)]
        url: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Health { url }) = cli.command {
        let url = match url {
            Some(url) => url,
            None => default_health_url(&cli.runner.health_listen)?,
        };
        let healthy = health(&url).await;
        std::process::exit(if healthy { 0 } else { 1 });
    }
    // Flushes exported spans when main returns.
    let _telemetry = agentrun_runner::telemetry::init(cli.runner.otel_endpoint.as_deref())?;

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

/// `/healthz` on loopback at the port of `listen` (`--health-listen`).
fn default_health_url(listen: &str) -> anyhow::Result<String> {
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        anyhow::anyhow!(
            "no runner health endpoint to ask: set --health-listen (AGENTRUN_HEALTH_LISTEN) \
             as the runner has it, or give --url"
        )
    })?;
    Ok(format!("http://127.0.0.1:{}/healthz", addr.port()))
}

/// Asks `url` and prints the answer; true when it is 200.
async fn health(url: &str) -> bool {
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .expect("a default HTTP client builds");
    match client.get(url).send().await {
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            println!("{url}: {status} {}", body.trim());
            status.is_success()
        }
        Err(err) => {
            println!("{url}: not reachable: {err}");
            false
        }
    }
}
