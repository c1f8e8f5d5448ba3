//! Logging set-up: `RUST_LOG` filters (default `info`; `tokio_postgres` is held at `info`
//! unless `RUST_LOG` names it, since at `debug` it logs every SQL parameter, API key
//! hashes and raw inputs included); human-readable (`pretty`) or
//! one JSON object per line (`json`, for production log collectors). Every gRPC call
//! runs in an `rpc` span (see [`crate::observe`]) whose fields appear on its events.
//! With an OTLP endpoint (`--otel-endpoint`, or the standard `OTEL_EXPORTER_OTLP_*`
//! variables), the same spans are exported to an OpenTelemetry collector, continuing the
//! caller's W3C trace context (see `agentrun_shared::otel`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The subscriber the output and export layers sit on: the registry behind the filter.
type Base = tracing_subscriber::layer::Layered<EnvFilter, Registry>;
type BoxedLayer = Box<dyn Layer<Base> + Send + Sync>;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// Keeps the trace exporter alive; dropping it flushes what is buffered.
#[derive(Default)]
pub struct Telemetry {
    /// Flushes exported spans when dropped.
    #[cfg(feature = "otel")]
    _exporter: Option<agentrun_shared::otel::Exporter>,
}

/// Installs a global pretty subscriber; later calls are no-ops (tests call it many times).
pub fn init() {
    let _ = init_with(LogFormat::Pretty, None);
}

/// Installs a global subscriber writing `format`, exporting spans to `otel_endpoint`
/// when given; later calls change nothing.
pub fn init_with(format: LogFormat, otel_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let filter = EnvFilter::try_new(log_directives(rust_log.as_deref()))
        .unwrap_or_else(|_| EnvFilter::new(log_directives(None)));
    let output: BoxedLayer = match format {
        LogFormat::Pretty => Box::new(tracing_subscriber::fmt::layer()),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false),
        ),
    };
    let (export, telemetry) = exporter(otel_endpoint)?;
    let layers: Vec<BoxedLayer> = std::iter::once(output).chain(export).collect();
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init();
    Ok(telemetry)
}

/// The filter directives for `rust_log` (the `RUST_LOG` value, default `info`), with
/// `tokio_postgres` held at `info` when `rust_log` asks for `debug` or `trace` without
/// naming it: at those levels it logs every statement's parameters (secrets included).
fn log_directives(rust_log: Option<&str>) -> String {
    let base = rust_log
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("info");
    let verbose = ["debug", "trace"]
        .iter()
        .any(|level| base.to_ascii_lowercase().contains(level));
    if base.contains("tokio_postgres") || !verbose {
        base.to_owned()
    } else {
        format!("{base},tokio_postgres=info")
    }
}

#[cfg(feature = "otel")]
fn exporter(endpoint: Option<&str>) -> anyhow::Result<(Option<BoxedLayer>, Telemetry)> {
    let Some(endpoint) = agentrun_shared::otel::endpoint(endpoint) else {
        return Ok((None, Telemetry::default()));
    };
    let (layer, exporter) = agentrun_shared::otel::layer("agentrun-manager", &endpoint)?;
    Ok((
        Some(Box::new(layer)),
        Telemetry {
            _exporter: Some(exporter),
        },
    ))
}

#[cfg(not(feature = "otel"))]
fn exporter(endpoint: Option<&str>) -> anyhow::Result<(Option<BoxedLayer>, Telemetry)> {
    anyhow::ensure!(
        endpoint.is_none_or(str::is_empty),
        "this agentrun-manager was built without the `otel` feature: --otel-endpoint is not available"
    );
    Ok((None, Telemetry::default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_parameters_stay_out_of_debug_logs_unless_asked_for() {
        for (rust_log, want) in [
            (None, "info"),
            (Some(""), "info"),
            (Some("warn"), "warn"),
            (Some("debug"), "debug,tokio_postgres=info"),
            (
                Some("agentrun_manager=trace,warn"),
                "agentrun_manager=trace,warn,tokio_postgres=info",
            ),
            (
                Some("debug,tokio_postgres=debug"),
                "debug,tokio_postgres=debug",
            ),
            (Some("tokio_postgres=trace"), "tokio_postgres=trace"),
        ] {
            let directives = log_directives(rust_log);
            assert_eq!(directives, want, "{rust_log:?}");
            assert!(EnvFilter::try_new(&directives).is_ok(), "{directives}");
        }
    }
}
