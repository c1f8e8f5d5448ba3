//! The operator commands over AdminService: list and drain runners, set tenants'
//! limits, create, list and revoke API keys. A manager that requires API keys answers
//! them only for an admin key; a refusal says so.

use std::time::{Duration, SystemTime};

use agentrun_shared::proto::{self, ApiKeyRole};
use serde_json::json;

use crate::ClientFlags;
use crate::client::Manager;
use crate::commands::{write_list, write_one};
use crate::duration;
use crate::error::{CliError, EXIT_FAILURE, EXIT_OK};
use crate::flow_limits;
use crate::output::{self, OutputFormat};
use crate::render;

/// The client options an operator command accepts after it: those of every client
/// command but `--tenant`, which operator commands take as an argument of their own.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Client options")]
pub struct AdminFlags {
    /// The manager's gRPC URL [env: AGENTRUN_MANAGER_URL] [default: http://127.0.0.1:7400].
    #[arg(long = "manager", value_name = "URL", global = true)]
    pub manager_url: Option<String>,
    /// An admin API key, sent as `authorization: Bearer` [env: AGENTRUN_API_KEY].
    #[arg(long, global = true)]
    pub api_key: Option<String>,
    /// PEM CA certificate to trust for an `https://` manager URL [env: AGENTRUN_TLS_CA].
    #[arg(long, global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate to present over TLS; with `--tls-key` [env:
    /// AGENTRUN_TLS_CERT].
    #[arg(long, global = true)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of `--tls-cert` [env: AGENTRUN_TLS_KEY].
    #[arg(long, global = true)]
    pub tls_key: Option<std::path::PathBuf>,
    /// Output format: `text`, `json` (one document) or `jsonl` (one object per line).
    #[arg(short = 'o', long, value_enum, global = true)]
    pub output: Option<OutputFormat>,
}

impl From<AdminFlags> for ClientFlags {
    fn from(flags: AdminFlags) -> Self {
        ClientFlags {
            manager_url: flags.manager_url,
            tenant: None,
            api_key: flags.api_key,
            tls_ca: flags.tls_ca,
            tls_cert: flags.tls_cert,
            tls_key: flags.tls_key,
            output: flags.output,
        }
    }
}

/// Arguments of `agentrun runners`.
#[derive(Debug, clap::Args)]
pub struct RunnersArgs {
    #[command(subcommand)]
    pub action: Option<RunnersAction>,
    #[command(flatten)]
    pub flags: AdminFlags,
}

/// What `agentrun runners` does [default: list].
#[derive(Debug, clap::Subcommand)]
pub enum RunnersAction {
    /// List the runners seen recently, with their leases.
    List,
    /// Ask a runner to stop taking work and finish or release its runs.
    Drain {
        /// The runner's id (from `agentrun runners`).
        #[arg(value_name = "RUNNER_ID")]
        runner_id: String,
    },
}

/// Arguments of `agentrun limits`.
#[derive(Debug, clap::Args)]
pub struct LimitsArgs {
    #[command(subcommand)]
    pub action: LimitsAction,
    #[command(flatten)]
    pub flags: AdminFlags,
}

/// What `agentrun limits` does.
#[derive(Debug, clap::Subcommand)]
pub enum LimitsAction {
    /// Set a tenant's limit on active runs, or its retention of ended runs' deltas.
    #[command(group = clap::ArgGroup::new("limit").required(true).multiple(true))]
    Set {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// Most claimed, running or waiting runs at once; 0 removes the limit. Runs past
        /// it are not refused: they wait to be claimed.
        #[arg(long, group = "limit", value_parser = clap::value_parser!(i32).range(0..))]
        max_active_runs: Option<i32>,
        /// How long after a run ends its `content.delta` events are kept before they
        /// are compacted (`7d`, `12h`, or milliseconds; `0` keeps them forever), or
        /// `default` for the manager's setting.
        #[arg(long, group = "limit", value_name = "DURATION|default", value_parser = parse_retention)]
        event_retention: Option<Retention>,
    },
    /// Rate limits: runs started per period, per tenant, queue or concurrency key.
    #[command(subcommand)]
    Rate(flow_limits::RateAction),
    /// Concurrency-key limits: runs of one key claimed at once.
    #[command(subcommand)]
    Concurrency(flow_limits::ConcurrencyAction),
}

/// A tenant's retention setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// The manager's default.
    Default,
    /// Its own.
    Keep(Duration),
}

fn parse_retention(text: &str) -> Result<Retention, String> {
    if text == "default" {
        return Ok(Retention::Default);
    }
    duration::parse(text).map(Retention::Keep)
}

/// Arguments of `agentrun keys`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    pub action: KeysAction,
    #[command(flatten)]
    pub flags: AdminFlags,
}

/// What `agentrun keys` does.
#[derive(Debug, clap::Subcommand)]
pub enum KeysAction {
    /// Create an API key and print it (the only time it is shown).
    Create {
        /// The tenant the key acts for.
        #[arg(long)]
        tenant: String,
        /// What the key may do: `client` (runs and sessions), `runner`, or `admin`
        /// (these operator commands).
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Limit a client key to this project (repeat for several) [default: all of the
        /// tenant's].
        #[arg(long = "project", value_name = "PROJECT")]
        projects: Vec<String>,
        /// A label for people (where the key is used); not secret.
        #[arg(long, default_value = "")]
        name: String,
        /// Make the key stop working after this long (`30d`, `12h`, `10m`, or
        /// milliseconds) [default: never].
        #[arg(long, value_name = "DURATION", value_parser = duration::parse)]
        expires_in: Option<Duration>,
    },
    /// List API keys, newest first, without their secrets.
    List {
        /// Only this tenant's keys [default: all].
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke an API key; revoking a revoked key changes nothing.
    Revoke {
        /// The key's id (from `agentrun keys list`).
        #[arg(value_name = "KEY_ID")]
        key_id: String,
    },
}

/// An API key role, as `--role` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleArg {
    Client,
    Runner,
    Admin,
}

impl RoleArg {
    fn to_proto(self) -> ApiKeyRole {
        match self {
            RoleArg::Client => ApiKeyRole::Client,
            RoleArg::Runner => ApiKeyRole::Runner,
            RoleArg::Admin => ApiKeyRole::Admin,
        }
    }
}

/// A refusal of an operator call, saying that it needs an admin key.
fn admin_error(status: tonic::Status) -> CliError {
    let hint = match status.code() {
        tonic::Code::PermissionDenied => {
            "operator commands need an admin API key (`--api-key` or AGENTRUN_API_KEY with \
             role admin)"
        }
        tonic::Code::Unauthenticated => {
            "operator commands need an admin API key: pass one with `--api-key` or \
             AGENTRUN_API_KEY"
        }
        _ => return status.into(),
    };
    let message = match status.message() {
        "" => hint.to_owned(),
        message => format!("{message}: {hint}"),
    };
    CliError::Rpc(tonic::Status::new(status.code(), message))
}

/// `agentrun runners [list]` and `agentrun runners drain RUNNER_ID`.
pub async fn runners(
    manager: &mut Manager,
    args: RunnersArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    match args.action.unwrap_or(RunnersAction::List) {
        RunnersAction::List => {
            let runners = manager.list_runners().await.map_err(admin_error)?;
            let values = runners.iter().map(output::runner).collect();
            write_list(out, values, || {
                render::runners_table(&runners, SystemTime::now())
            })?;
            Ok(EXIT_OK)
        }
        RunnersAction::Drain { runner_id } => {
            let found = manager
                .drain_runner(&runner_id)
                .await
                .map_err(admin_error)?;
            let value = json!({ "runner_id": runner_id, "found": found });
            write_one(out, &value, || {
                if found {
                    format!("runner {runner_id} draining\n")
                } else {
                    String::new()
                }
            })?;
            if found {
                Ok(EXIT_OK)
            } else {
                if !out.is_json() {
                    eprintln!("error: no connected runner has id {runner_id}");
                }
                Ok(EXIT_FAILURE)
            }
        }
    }
}

/// `agentrun limits set`.
pub async fn limits(
    manager: &mut Manager,
    args: LimitsArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    let (tenant, max_active_runs, event_retention) = match args.action {
        LimitsAction::Set {
            tenant,
            max_active_runs,
            event_retention,
        } => (tenant, max_active_runs, event_retention),
        LimitsAction::Rate(action) => {
            return flow_limits::rate(manager, action, out, admin_error).await;
        }
        LimitsAction::Concurrency(action) => {
            return flow_limits::concurrency(manager, action, out, admin_error).await;
        }
    };
    let mut value = json!({ "tenant_id": tenant });
    let mut text = String::new();
    if let Some(max) = max_active_runs {
        manager
            .set_tenant_limit(&tenant, max)
            .await
            .map_err(admin_error)?;
        value["max_active_runs"] = json!(max);
        text.push_str(&match max {
            0 => format!("tenant {tenant}: no limit on active runs\n"),
            max => format!("tenant {tenant}: at most {max} active runs\n"),
        });
    }
    if let Some(retention) = event_retention {
        let millis = match retention {
            Retention::Default => None,
            Retention::Keep(d) => Some(duration::millis(d)),
        };
        manager
            .set_tenant_retention(&tenant, millis)
            .await
            .map_err(admin_error)?;
        value["event_retention_ms"] = json!(millis);
        text.push_str(&match retention {
            Retention::Default => format!("tenant {tenant}: the manager's event retention\n"),
            Retention::Keep(Duration::ZERO) => {
                format!("tenant {tenant}: deltas of ended runs kept forever\n")
            }
            Retention::Keep(d) => format!(
                "tenant {tenant}: deltas of ended runs compacted after {}\n",
                duration::format(d)
            ),
        });
    }
    write_one(out, &value, || text)?;
    Ok(EXIT_OK)
}

/// `agentrun keys create|list|revoke`.
pub async fn keys(
    manager: &mut Manager,
    args: KeysArgs,
    out: OutputFormat,
) -> Result<u8, CliError> {
    match args.action {
        KeysAction::Create {
            tenant,
            role,
            projects,
            name,
            expires_in,
        } => {
            let expires_at =
                expires_in.map(|d| prost_types::Timestamp::from(SystemTime::now() + d));
            let created = manager
                .create_api_key(proto::CreateApiKeyRequest {
                    tenant_id: tenant,
                    role: role.to_proto() as i32,
                    project_ids: projects,
                    name,
                    expires_at,
                })
                .await
                .map_err(admin_error)?;
            let key = created.api_key.as_ref();
            let value = json!({
                "api_key": key.map(output::api_key),
                "key": created.key,
            });
            write_one(out, &value, || format!("{}\n", created.key))?;
            if !out.is_json()
                && let Some(key) = key
            {
                eprintln!(
                    "(key {} for tenant {}: it is shown only now)",
                    key.key_id, key.tenant_id
                );
            }
            Ok(EXIT_OK)
        }
        KeysAction::List { tenant } => {
            let keys = manager
                .list_api_keys(tenant.as_deref().unwrap_or_default())
                .await
                .map_err(admin_error)?;
            let values = keys.iter().map(output::api_key).collect();
            write_list(out, values, || keys_table(&keys))?;
            Ok(EXIT_OK)
        }
        KeysAction::Revoke { key_id } => {
            let key = manager.revoke_api_key(&key_id).await.map_err(admin_error)?;
            write_one(out, &output::api_key(&key), || {
                format!(
                    "key {} revoked at {}\n",
                    key.key_id,
                    render::time(key.revoked_at.as_ref())
                )
            })?;
            Ok(EXIT_OK)
        }
    }
}

/// API keys as a table, for `agentrun keys list`.
fn keys_table(keys: &[proto::ApiKey]) -> String {
    let or_dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    let rows = keys
        .iter()
        .map(|key| {
            vec![
                key.key_id.clone(),
                key.tenant_id.clone(),
                output::enum_name(
                    ApiKeyRole::try_from(key.role).map_or("unknown", |r| r.as_str_name()),
                    "API_KEY_ROLE_",
                ),
                or_dash(key.project_ids.join(",")),
                or_dash(key.name.clone()),
                render::time(key.created_at.as_ref()),
                render::time(key.expires_at.as_ref()),
                render::time(key.revoked_at.as_ref()),
            ]
        })
        .collect();
    render::table(
        &[
            "ID", "TENANT", "ROLE", "PROJECTS", "NAME", "CREATED", "EXPIRES", "REVOKED",
        ],
        rows,
    )
}
