//! Integration tests against a real PostgreSQL: one binary, one module per area.

mod commands;
mod leases;
mod replicas;
mod runs;
mod surface;
mod sweeper;
mod validation;
