//! Integration tests against a real PostgreSQL: one binary, one module per area.

mod commands;
mod leases;
mod replicas;
mod runs;
mod sweeper;
mod validation;
