//! `agentrun-runner`: connects to a manager, claims runs under fenced leases, executes
//! their turns with a provider and streams events back.

pub mod provider;
