//! Logging to stderr (`RUST_LOG`, default `info`) and, with an OTLP endpoint
//! (`--otel-endpoint` or the standard `OTEL_EXPORTER_OTLP_*` variables), span export: a
//! run's spans continue the trace of the call that created it, and each turn is a
//! GenAI `chat` span (see `executor`).

use agentrun_shared::otel;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber; the returned exporter (if any) must live until exit.
pub fn init(otel_endpoint: Option<&str>) -> anyhow::Result<Option<otel::Exporter>> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal (and not with NO_COLOR): `agentrun dev` passes its
    // stderr, so runner and manager lines share one format.
    let color = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_ansi(color));
    match otel::endpoint(otel_endpoint) {
        Some(endpoint) => {
            let (spans, exporter) = otel::layer("agentrun-runner", &endpoint)?;
            logs.with(spans).init();
            Ok(Some(exporter))
        }
        None => {
            logs.init();
            Ok(None)
        }
    }
}
