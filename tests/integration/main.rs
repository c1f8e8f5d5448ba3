//! Integration tests against a real PostgreSQL: one binary, one module per area.

mod auth;
mod cli;
mod cli_sessions;
mod commands;
mod context;
mod conversation_rules;
mod double_texting;
mod e2e;
mod faults;
mod leases;
mod operability;
mod properties;
mod replicas;
mod requests;
mod runner_slots;
mod runs;
mod scheduling;
mod sessions;
mod soak;
mod stream_correctness;
mod surface;
mod sweeper;
mod tls;
mod turn_rules;
mod validation;
mod watch;
