//! `agentrun limits rate …` and `agentrun limits concurrency …`: the operator commands
//! of flow control over AdminService — rate limits (runs started per period, per
//! tenant, queue or concurrency key) and concurrency-key limits (runs of one key at
//! once).

use std::time::Duration;

use agentrun_shared::proto::{self, RateLimitScope};
use serde_json::{Value, json};

use crate::client::Manager;
use crate::commands::{write_list, write_one};
use crate::duration;
use crate::error::{CliError, EXIT_OK};
use crate::output::OutputFormat;

/// What `agentrun limits rate` does.
#[derive(Debug, clap::Subcommand)]
pub enum RateAction {
    /// Set (or with `--runs 0` remove) a rate limit: at most `--runs` runs started per
    /// `--period`, at most `--burst` at once.
    Set {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// What the limit counts.
        #[arg(long, value_enum, default_value_t = ScopeArg::Tenant)]
        scope: ScopeArg,
        /// The queue (`--scope queue`) or concurrency key (`--scope key`).
        #[arg(long, default_value = "")]
        key: String,
        /// Runs started per period, 1..=100000; 0 removes the limit.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
        runs: i32,
        /// The period: `1s` to `1h` (`1s`, `1m`, `1h`, or milliseconds).
        #[arg(long, value_name = "DURATION", value_parser = duration::parse, default_value = "1s")]
        period: Duration,
        /// Most runs started at once [default: `--runs`].
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
        burst: Option<i32>,
    },
    /// List rate limits, with their buckets' tokens and the runs waiting for one.
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// What `agentrun limits concurrency` does.
#[derive(Debug, clap::Subcommand)]
pub enum ConcurrencyAction {
    /// Set (or with `--max-active 0` remove) how many runs of a concurrency key may be
    /// claimed at once; without `--key`, the tenant's default for every key [default 1].
    Set {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// The concurrency key; empty: the tenant's default.
        #[arg(long, default_value = "")]
        key: String,
        /// 1..=10000; 0 removes the setting.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..))]
        max_active: i32,
    },
    /// List concurrency limits, with each key's active and waiting runs.
    List {
        /// Only this tenant's.
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// What a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScopeArg {
    Tenant,
    Queue,
    Key,
}

impl ScopeArg {
    fn to_proto(self) -> RateLimitScope {
        match self {
            ScopeArg::Tenant => RateLimitScope::Tenant,
            ScopeArg::Queue => RateLimitScope::Queue,
            ScopeArg::Key => RateLimitScope::ConcurrencyKey,
        }
    }
}

fn scope_name(scope: i32) -> &'static str {
    match RateLimitScope::try_from(scope) {
        Ok(RateLimitScope::Tenant) => "tenant",
        Ok(RateLimitScope::Queue) => "queue",
        Ok(RateLimitScope::ConcurrencyKey) => "concurrency_key",
        _ => "unspecified",
    }
}

/// A rate limit as `-o json` prints it.
pub fn rate_limit(l: &proto::RateLimit) -> Value {
    json!({
        "tenant_id": l.tenant_id,
        "scope": scope_name(l.scope),
        "key": l.key,
        "runs": l.runs,
        "period_ms": l.period_ms,
        "burst": l.burst,
        "tokens": l.tokens,
        "waiting_runs": l.waiting_runs,
    })
}

/// A concurrency limit as `-o json` prints it.
pub fn concurrency_limit(l: &proto::ConcurrencyLimit) -> Value {
    json!({
        "tenant_id": l.tenant_id,
        "concurrency_key": l.concurrency_key,
        "max_active": l.max_active,
        "active_runs": l.active_runs,
        "waiting_runs": l.waiting_runs,
    })
}

fn rate_line(l: &proto::RateLimit) -> String {
    let what = match scope_name(l.scope) {
        "tenant" => format!("tenant {}", l.tenant_id),
        scope => format!("tenant {} {scope} {}", l.tenant_id, l.key),
    };
    if l.runs == 0 {
        return format!("{what}: no rate limit\n");
    }
    format!(
        "{what}: {} runs per {}, burst {}, {:.1} tokens, {} waiting\n",
        l.runs,
        duration::format(Duration::from_millis(l.period_ms.max(0) as u64)),
        l.burst,
        l.tokens,
        l.waiting_runs
    )
}

/// `agentrun limits rate set|list`.
pub async fn rate(
    manager: &mut Manager,
    action: RateAction,
    out: OutputFormat,
    refused: fn(tonic::Status) -> CliError,
) -> Result<u8, CliError> {
    match action {
        RateAction::Set {
            tenant,
            scope,
            key,
            runs,
            period,
            burst,
        } => {
            let limit = proto::RateLimit {
                tenant_id: tenant,
                scope: scope.to_proto() as i32,
                key,
                runs,
                period_ms: duration::millis(period),
                burst: burst.unwrap_or(0),
                ..Default::default()
            };
            let stored = manager.set_rate_limit(limit).await.map_err(refused)?;
            write_one(out, &rate_limit(&stored), || rate_line(&stored))?;
        }
        RateAction::List { tenant } => {
            let limits = manager
                .list_rate_limits(tenant.unwrap_or_default())
                .await
                .map_err(refused)?;
            write_list(out, limits.iter().map(rate_limit).collect(), || {
                if limits.is_empty() {
                    "no rate limits\n".to_owned()
                } else {
                    limits.iter().map(rate_line).collect()
                }
            })?;
        }
    }
    Ok(EXIT_OK)
}

/// `agentrun limits concurrency set|list`.
pub async fn concurrency(
    manager: &mut Manager,
    action: ConcurrencyAction,
    out: OutputFormat,
    refused: fn(tonic::Status) -> CliError,
) -> Result<u8, CliError> {
    match action {
        ConcurrencyAction::Set {
            tenant,
            key,
            max_active,
        } => {
            manager
                .set_concurrency_limit(proto::SetConcurrencyLimitRequest {
                    tenant_id: tenant.clone(),
                    concurrency_key: key.clone(),
                    max_active,
                })
                .await
                .map_err(refused)?;
            let value = json!({
                "tenant_id": tenant,
                "concurrency_key": key,
                "max_active": max_active,
            });
            write_one(out, &value, || {
                let what = if key.is_empty() {
                    format!("tenant {tenant}: every key")
                } else {
                    format!("tenant {tenant} key {key}")
                };
                match max_active {
                    0 => format!("{what}: back to the default limit\n"),
                    n => format!("{what}: at most {n} runs at once\n"),
                }
            })?;
        }
        ConcurrencyAction::List { tenant } => {
            let limits = manager
                .list_concurrency_limits(tenant.unwrap_or_default())
                .await
                .map_err(refused)?;
            write_list(out, limits.iter().map(concurrency_limit).collect(), || {
                if limits.is_empty() {
                    return "no concurrency limits (every key: 1 run at once)\n".to_owned();
                }
                limits
                    .iter()
                    .map(|l| {
                        if l.concurrency_key.is_empty() {
                            format!(
                                "tenant {}: every key at most {} at once\n",
                                l.tenant_id, l.max_active
                            )
                        } else {
                            format!(
                                "tenant {} key {}: at most {} at once, {} active, {} waiting\n",
                                l.tenant_id,
                                l.concurrency_key,
                                l.max_active,
                                l.active_runs,
                                l.waiting_runs
                            )
                        }
                    })
                    .collect()
            })?;
        }
    }
    Ok(EXIT_OK)
}

/// Pending runs held back by a concurrency key or a rate limit, for `agentrun stats`.
pub fn waiting_table(stats: &proto::GetQueueStatsResponse) -> String {
    let rows = stats
        .waiting
        .iter()
        .map(|w| {
            vec![
                w.tenant_id.clone(),
                w.queue.clone(),
                w.reason.clone(),
                w.runs.to_string(),
            ]
        })
        .collect();
    crate::render::table(&["TENANT", "QUEUE", "WAITING FOR", "RUNS"], rows)
}
