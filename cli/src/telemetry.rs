//! Logging set-up: `RUST_LOG` filters; logs go to stderr so stdout stays the output.

use std::io::IsTerminal;

/// Installs a global fmt subscriber writing to stderr, filtered by `RUST_LOG` or else
/// `default_filter`; later calls are no-ops.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(color())
        .with_writer(std::io::stderr)
        .try_init();
}

/// True when logs are coloured: stderr is a terminal and NO_COLOR is not set. `agentrun
/// dev` passes the same decision to its runners, whose lines share stderr.
pub fn color() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}
