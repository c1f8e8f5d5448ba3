//! Logging set-up: `RUST_LOG` filters (default `info`); human-readable (`pretty`) or
//! one JSON object per line (`json`, for production log collectors). Every gRPC call
//! runs in an `rpc` span (see [`crate::observe`]) whose fields appear on its events.

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, with the current span's fields.
    Json,
}

/// Installs a global pretty subscriber; later calls are no-ops (tests call it many times).
pub fn init() {
    init_with(LogFormat::Pretty);
}

/// Installs a global subscriber writing `format`; later calls are no-ops.
pub fn init_with(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
