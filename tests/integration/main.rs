//! Integration tests against a real PostgreSQL: one binary, one module per area.

mod cli;
mod commands;
mod e2e;
mod leases;
mod replicas;
mod runs;
mod surface;
mod sweeper;
mod validation;
