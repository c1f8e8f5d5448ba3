//! `agentrun-runner`: connects to a manager, claims runs under fenced leases, executes
//! their turns with a provider and streams events back.
//!
//! - [`connection`]: the `Connect` stream, reconnects, heartbeats, batching, drain.
//! - [`executor`]: one task per run — commands in order, turns through a provider.
//! - [`outbox`]: a run's unacknowledged events, numbered, bounded, resent after reconnects.
//! - [`fit`]: events made to fit the manager's payload limit (deltas split, others
//!   truncated with a marker) before they enter an outbox.
//! - [`provider`]: the provider trait and the scripted, openai and command providers.
//! - [`observe`]: metrics and the health verdict, served on `--health-listen`.
//! - [`telemetry`]: logs, and span export continuing each run's trace.
//! - [`config`] and [`setup`]: settings, and the providers built from them.

pub mod config;
pub mod connection;
pub mod executor;
pub mod fit;
pub mod observe;
pub mod outbox;
pub mod provider;
pub mod setup;
pub mod telemetry;
pub mod wire;

use agentrun_shared::proto;
use tokio_util::sync::CancellationToken;

pub use config::RunnerSettings;
pub use connection::Runner;

/// Runs a runner with these providers and advertised backend profiles until `shutdown`
/// and the drain that follows are done.
pub async fn run(
    settings: RunnerSettings,
    backend_profiles: Vec<String>,
    providers: provider::Providers,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Bad TLS settings (an unreadable file, a CA for an http:// URL) fail at start-up
    // instead of in every reconnection attempt.
    let tls = settings.tls();
    for url in &settings.manager_url {
        tls.endpoint(url)?;
    }
    let runner_id = match &settings.runner_id {
        Some(id) => uuid::Uuid::try_parse(id)
            .map_err(|_| anyhow::anyhow!("AGENTRUN_RUNNER_ID must be a UUID"))?,
        None => uuid::Uuid::new_v4(),
    };
    let identity = proto::RunnerIdentity {
        runner_id: runner_id.to_string(),
        name: settings.name.clone(),
        labels: settings.labels.clone(),
        backend_profiles,
        queues: settings.queues.clone(),
        max_concurrency: settings.max_concurrency as i32,
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let health_listener = agentrun_shared::http::bind("--health-listen", &settings.health_listen)
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(runner = %runner_id, name = %settings.name, profiles = ?identity.backend_profiles, "runner starting");
    let runner = Runner::new(settings, identity, providers);
    let stop_serving = CancellationToken::new();
    if let Some(listener) = health_listener {
        tracing::info!(addr = %listener.local_addr()?, "metrics and health listening");
        let observer = runner.observer();
        let handle = move |path: String| {
            let reply = observer.reply(&path);
            async move { reply }
        };
        tokio::spawn(agentrun_shared::http::serve(
            listener,
            handle,
            stop_serving.clone(),
        ));
    }
    let ran = runner.run(shutdown).await;
    stop_serving.cancel();
    ran
}
