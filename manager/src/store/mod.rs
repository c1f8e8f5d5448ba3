//! The Postgres store, one module per aggregate: its types, its invariants and the SQL
//! that reads and writes it. Nothing here knows about gRPC.
//!
//! Hot paths are batched (one statement for many rows via `unnest`) and statements are
//! prepared once per connection (`prepare_cached`). No NOTIFY is sent inside claim,
//! heartbeat, append or finish transactions: it would serialise commits server-wide.

pub mod api_keys;
pub mod commands;
pub mod context;
pub mod events;
pub mod firing;
pub mod flow;
pub mod leases;
pub mod lifecycle;
pub mod requests;
pub mod runners;
pub mod runs;
pub mod schedules;
pub mod sessions;
pub mod webhooks;

use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What [`plan_generically`] sets. Public for the tests of the hot paths' plans.
///
/// - JIT would compile these short statements for longer than they run (their estimates
///   are poor: per-tenant LIMITs, array filters).
/// - No sequential scans: a connection's plan may be made while the tables are nearly
///   empty (a new install, a benchmark's first second), where a scan looks cheapest, and
///   is kept until the tables are next analyzed. These statements read by key; planned on
///   empty tables, the log insert joined every run to find the webhooks of its runs.
pub const HOT_PATH_SETTINGS: &str = "SET LOCAL plan_cache_mode = force_generic_plan; \
     SET LOCAL jit = off; SET LOCAL enable_seqscan = off";

/// Makes the rest of a hot-path transaction (a claim, a runner's writes) run its
/// statements on one generic plan per connection. Their plans do not depend on the
/// parameters (keys and arrays; the statuses that select partial indexes are literals),
/// but PostgreSQL keeps planning them afresh when a custom plan looks cheaper: up to half
/// as much again as running them (the claim). Sent pipelined ahead of the first statement.
pub(crate) async fn plan_generically(tx: &impl GenericClient) -> Result<()> {
    tx.batch_execute(HOT_PATH_SETTINGS).await?;
    Ok(())
}

/// The tenant a request acts for; every query is scoped by it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tenant(pub String);

impl Tenant {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A row written by an idempotent call: `created` is false when a retry found it.
#[derive(Debug, Clone)]
pub struct Created<T> {
    pub value: T,
    pub created: bool,
}

/// sha256 of a canonical JSON rendering (serde_json maps keep keys sorted), used to tell
/// an idempotent retry from a conflicting reuse of the same key.
pub(crate) fn fingerprint(value: &serde_json::Value) -> Vec<u8> {
    Sha256::digest(value.to_string().as_bytes()).to_vec()
}

/// Reads a text column holding one of a state enum's spellings.
pub(crate) fn parse_state<T>(column: &str, text: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    parse(text).ok_or_else(|| Error::Internal(format!("unknown {column} {text:?} in database")))
}
