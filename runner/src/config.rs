//! Runner settings, from flags or environment variables (flags win).

use std::path::PathBuf;
use std::time::Duration;

use agentrun_shared::tls::ClientTls;

/// How a runner connects and what it serves.
#[derive(Debug, Clone, clap::Args)]
pub struct RunnerSettings {
    /// The manager's gRPC URL; several (comma-separated) are tried in turn, one per
    /// reconnection, so a runner moves to another replica when one goes away.
    #[arg(
        long,
        env = "AGENTRUN_MANAGER_URL",
        default_value = "http://127.0.0.1:7400",
        value_delimiter = ','
    )]
    pub manager_url: Vec<String>,
    /// A stable runner id (UUID). With one, a restarted runner gets its leases back at
    /// once instead of waiting for them to expire. Default: a new id per process.
    #[arg(long, env = "AGENTRUN_RUNNER_ID")]
    pub runner_id: Option<String>,
    /// API key of role `runner` (`agentrun-manager keys create --role runner`), sent as
    /// `authorization: Bearer`; the runner serves only its key's tenant. Not needed when
    /// the manager runs with `--auth disabled`.
    #[arg(long, env = "AGENTRUN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Display name.
    #[arg(long, env = "AGENTRUN_RUNNER_NAME", default_value = "runner")]
    pub name: String,
    /// Backend profiles served (comma-separated). Default: `scripted`, plus `openai` when
    /// an OpenAI key or base URL is set, plus `command` when a command is set.
    #[arg(long, env = "AGENTRUN_BACKEND_PROFILES", value_delimiter = ',')]
    pub backend_profiles: Vec<String>,
    /// Labels this runner has (comma-separated); it takes runs whose labels it all has.
    #[arg(long, env = "AGENTRUN_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Queues it takes runs from (comma-separated). Default: `default`.
    #[arg(long, env = "AGENTRUN_QUEUES", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Runs executed at once.
    #[arg(long, env = "AGENTRUN_MAX_CONCURRENCY", default_value_t = 4)]
    pub max_concurrency: u32,
    /// How long events wait to be batched before they are sent.
    #[arg(long, env = "AGENTRUN_LINGER_MS", default_value_t = 5)]
    pub linger_ms: u64,
    /// Unacknowledged events kept per run before its provider has to wait.
    #[arg(long, env = "AGENTRUN_MAX_BUFFERED_EVENTS", default_value_t = 10_000)]
    pub max_buffered_events: usize,
    /// On SIGTERM: how long running runs may take to finish before they are released.
    #[arg(long, env = "AGENTRUN_DRAIN_GRACE_MS", default_value_t = 30_000)]
    pub drain_grace_ms: u64,
    /// How long a run whose turn was interrupted waits for a next turn before completing.
    #[arg(long, env = "AGENTRUN_IDLE_TIMEOUT_MS", default_value_t = 600_000)]
    pub idle_timeout_ms: u64,
    /// Longest wait between reconnection attempts.
    #[arg(long, env = "AGENTRUN_MAX_BACKOFF_MS", default_value_t = 5_000)]
    pub max_backoff_ms: u64,
    /// PEM CA certificate trusted for `https://` manager URLs. Default: the system roots.
    #[arg(long, env = "AGENTRUN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate presented to the manager (needed when it verifies
    /// runners' certificates, `--tls-client-ca`); with `tls_key`.
    #[arg(long, env = "AGENTRUN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[arg(long, env = "AGENTRUN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Export spans by OTLP/gRPC to this collector, e.g. `http://127.0.0.1:4317`. Unset:
    /// the standard `OTEL_EXPORTER_OTLP_ENDPOINT`, else no export.
    #[arg(long, env = "AGENTRUN_OTEL_ENDPOINT")]
    pub otel_endpoint: Option<String>,
    /// Address serving `GET /metrics` (Prometheus) and `GET /healthz`; empty: off.
    #[arg(long, env = "AGENTRUN_HEALTH_LISTEN", default_value = "")]
    pub health_listen: String,
    /// `/healthz` fails after this long without a session with a manager, or with one
    /// that answers nothing (not even heartbeats).
    #[arg(long, env = "AGENTRUN_UNHEALTHY_AFTER_MS", default_value_t = 30_000)]
    pub unhealthy_after_ms: u64,
}

impl RunnerSettings {
    pub fn unhealthy_after(&self) -> Duration {
        Duration::from_millis(self.unhealthy_after_ms)
    }

    pub fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    pub fn drain_grace(&self) -> Duration {
        Duration::from_millis(self.drain_grace_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }

    /// The TLS settings used for `https://` manager URLs.
    pub fn tls(&self) -> ClientTls {
        ClientTls {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
        }
    }
}

/// Provider settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderSettings {
    /// Pause between tokens of the scripted provider.
    #[arg(long, env = "AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", default_value_t = 25)]
    pub scripted_token_delay_ms: u64,
    /// Base URL of an OpenAI-compatible API (OpenAI, vLLM, Ollama, llama.cpp server).
    #[arg(long, env = "OPENAI_BASE_URL")]
    pub openai_base_url: Option<String>,
    /// API key for it.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Model of the `openai` profile (`openai:<model>` names its own).
    #[arg(long, env = "AGENTRUN_OPENAI_MODEL", default_value = "gpt-4o-mini")]
    pub openai_model: String,
    /// Longest wait to connect, for a response to start, or between streamed chunks.
    #[arg(long, env = "AGENTRUN_OPENAI_TIMEOUT_MS", default_value_t = 60_000)]
    pub openai_timeout_ms: u64,
    /// How many times a turn sends a request again after a 429, a 5xx or a connection
    /// or stream that failed before any content (with back-off, honouring Retry-After).
    #[arg(long, env = "AGENTRUN_OPENAI_MAX_RETRIES", default_value_t = 3)]
    pub openai_max_retries: u32,
    /// The first back-off before such a retry, doubled for each further one.
    #[arg(long, env = "AGENTRUN_OPENAI_RETRY_BASE_MS", default_value_t = 500)]
    pub openai_retry_base_ms: u64,
    /// An agent CLI for the `command` profile, run with `sh -c` per turn.
    #[arg(long, env = "AGENTRUN_COMMAND")]
    pub command: Option<String>,
    /// How long the agent CLI has to exit after SIGTERM before SIGKILL.
    #[arg(long, env = "AGENTRUN_COMMAND_GRACE_MS", default_value_t = 2_000)]
    pub command_grace_ms: u64,
}
