//! `agentrun-manager`: serve, migrate, or run against a throwaway local PostgreSQL.

use agentrun_manager::local_postgres::LocalPostgres;
use agentrun_manager::{Application, Settings, db, telemetry};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc, not glibc's malloc (see the workspace manifest).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "agentrun-manager", version, about = "The agentrun manager")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Serve against DATABASE_URL, or a throwaway local PostgreSQL started (and removed)
    /// for the purpose; webhooks may reach local receivers (`--webhook-private-targets`).
    Dev,
    /// Create, list or revoke API keys, straight in the database (DATABASE_URL).
    #[command(subcommand)]
    Keys(agentrun_manager::keys::KeysCommand),
    /// Ask a manager's grpc.health.v1 service whether it serves (exit 0) or not (exit
    /// 1): a container health check. Probes this manager's `--listen` address on
    /// loopback unless `--url` is given.
    Health(agentrun_manager::health::ProbeArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `keys` prints a key on stdout for scripts to capture: no log lines there.
    // Flushes exported traces when main returns.
    let _telemetry = if matches!(cli.command, Some(Command::Keys(_) | Command::Health(_))) {
        None
    } else {
        Some(telemetry::init_with(
            cli.settings.log_format,
            cli.settings.otel_endpoint.as_deref(),
        )?)
    };
    let mut settings = cli.settings;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            db::migrate(&db::Database::from_settings(&settings)?.pool(1)?).await?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::Serve => serve(settings).await,
        Command::Health(probe) => {
            let serving = agentrun_manager::health::check_serving(&settings, &probe).await?;
            std::process::exit(if serving { 0 } else { 1 })
        }
        Command::Keys(command) => {
            let database = db::Database::from_settings(&settings)?;
            agentrun_manager::keys::run(&database, settings.migrate_on_start(), command).await
        }
        Command::Dev => {
            // Development on one machine: webhook receivers are local.
            settings.webhook_private_targets = true;
            // Kept alive until serve returns; dropping it stops and removes the cluster.
            let _local = match settings.database_url {
                Some(_) => None,
                None => {
                    let pg = tokio::task::spawn_blocking(LocalPostgres::start).await??;
                    tracing::info!(url = %pg.url("postgres"), "started a throwaway PostgreSQL");
                    settings.database_url = Some(pg.url("postgres"));
                    Some(pg)
                }
            };
            serve(settings).await
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    println!("agentrun manager listening on http://{}", app.local_addr());
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
        // A second signal exits at once.
        wait_for_signal().await;
        std::process::exit(130);
    });
    app.run(shutdown).await
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler succeeds at start-up");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
