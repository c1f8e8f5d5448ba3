//! Logging set-up: `RUST_LOG` filters (default `info`).

/// Installs a global fmt subscriber; later calls are no-ops (tests call it many times).
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}
