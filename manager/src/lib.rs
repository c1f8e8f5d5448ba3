//! `agentrun-manager`: owns runs, commands, sessions and every run's event log in
//! PostgreSQL, and serves them over gRPC to clients (RunService, SessionService,
//! AdminService) and runners (RunnerService).
//!
//! - [`api`]: gRPC handlers — validate, convert, call the store, map errors.
//! - [`store`]: one module per aggregate with its SQL.
//! - [`heartbeats`], [`hellos`]: runner heartbeats and hellos, settled in batches by a
//!   [`batcher`].
//! - [`sweeper`]: moves on runs whose lease expired or whose timeouts passed.
//! - [`retention`]: compacts the deltas of runs ended longer than their retention.
//! - [`notify`]: wake-ups for waiting runner streams, across replicas (LISTEN/NOTIFY).
//! - [`keys`]: `agentrun-manager keys`, API key management against the database.
//! - [`limits`]: per-caller rate limits (heartbeats).
//! - [`listener`]: the accept loop — connection cap, handshake and idle timeouts.
//! - [`startup`]: wires it together; [`config`]: settings; [`error`]: the error type.
//! - [`health`]: grpc.health.v1 status following the database; [`metrics`]: Prometheus
//!   metrics and their HTTP endpoint; [`observe`]: the per-RPC span and metrics layer;
//!   [`wire_errors`]: a request that did not decode is INVALID_ARGUMENT, a message over
//!   the size limit RESOURCE_EXHAUSTED.
//! - [`ui`]: the web UI's port — the embedded app and gRPC-Web to the same services.
//! - [`local_postgres`]: a throwaway PostgreSQL for `dev` and tests.

pub mod api;
pub mod batcher;
pub mod config;
pub mod db;
pub mod dispatcher;
pub mod error;
pub mod health;
pub mod heartbeats;
pub mod hellos;
pub mod keys;
pub mod limits;
pub mod listener;
pub mod local_postgres;
pub mod metrics;
pub mod notify;
pub mod observe;
pub mod periodic;
pub mod retention;
pub mod schedules;
pub mod startup;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod ui;
pub mod webhooks;
pub mod wire_errors;

pub use config::Settings;
pub use startup::Application;
