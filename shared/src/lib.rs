//! `agentrun-shared`: what the manager, the runner and clients agree on.
//!
//! - [`proto`]: the `agentrun.v1` wire types and gRPC stubs, generated from `proto/`.
//! - [`codec`]: the stubs' codec: an undecodable message is INVALID_ARGUMENT.
//! - [`ids`]: validated id newtypes.
//! - [`state`]: run and command state machines and their legal transitions.
//! - [`events`]: the closed set of event types and per-type payload rules.
//! - [`payload`]: JSON payload validation, size limits and secret redaction.
//! - [`error`]: the field-naming validation error used at every edge.
//! - [`http`]: the tiny HTTP responder of the operational endpoints (metrics, health).
//! - `otel` (feature `otel`): OpenTelemetry export and trace context propagation.
//! - [`trace`]: the W3C trace context carried from a run's creation to its runner.
//! - [`tls`]: client-side TLS (trusted CA, client certificate) for runners and the CLI.

pub mod codec;
pub mod error;
pub mod events;
pub mod http;
pub mod ids;
#[cfg(feature = "otel")]
pub mod otel;
pub mod payload;
pub mod state;
pub mod tls;
pub mod trace;

/// Generated `agentrun.v1` types and tonic clients/servers.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("agentrun.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("agentrun_v1_descriptor");
}
