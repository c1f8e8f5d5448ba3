//! The command line's one error type and its exit codes.
//!
//! Every error is printed once, by `main`, as `error: <message>`. gRPC errors keep the
//! manager's message, which already names the offending field.

use tonic::Code;

/// Success.
pub const EXIT_OK: u8 = 0;
/// An error, or a followed run that did not complete.
pub const EXIT_FAILURE: u8 = 1;
/// The command line itself was wrong (as clap's own usage errors).
pub const EXIT_USAGE: u8 = 2;
/// Stopped by Ctrl-C (128 + SIGINT).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// No connection to the manager could be made.
    #[error("cannot reach the manager at {url}: {reason} — is `agentrun dev` running?")]
    Unreachable { url: String, reason: String },
    /// The manager refused or failed a call.
    #[error("{}", rpc_message(.0))]
    Rpc(#[from] tonic::Status),
    /// An argument the parser could not check (e.g. a URL or an argument combination).
    #[error("{0}")]
    Usage(String),
    /// Writing output failed.
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else (start-up of the local stack).
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            _ => EXIT_FAILURE,
        }
    }

    /// True when the error is stdout being closed by its reader (`agentrun … | head`),
    /// which is not worth reporting.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Io(err) if err.kind() == std::io::ErrorKind::BrokenPipe)
    }
}

/// The manager's message, or the code's description when it sent none.
fn rpc_message(status: &tonic::Status) -> String {
    match (status.code(), status.message()) {
        (code, "") => code.description().to_owned(),
        (Code::Unavailable, message) => format!("manager unavailable: {message}"),
        (_, message) => message.to_owned(),
    }
}

/// `err` and its sources joined with `: `; transport errors hide the useful part
/// ("Connection refused") in their sources.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
