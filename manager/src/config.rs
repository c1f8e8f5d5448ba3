//! Manager settings, from flags or environment variables (flags win).

use std::net::SocketAddr;
use std::time::Duration;

use agentrun_shared::payload::DEFAULT_MAX_PAYLOAD_BYTES;

/// Everything the manager needs to run. Durations are in milliseconds on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Address the gRPC server listens on.
    #[arg(long, env = "AGENTRUN_LISTEN", default_value = "127.0.0.1:7400")]
    pub listen: SocketAddr,
    /// PostgreSQL connection URL. Required except for `dev`, which starts a local cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Maximum database connections held by this replica.
    #[arg(long, env = "AGENTRUN_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// How long a lease lasts without a heartbeat.
    #[arg(long, env = "AGENTRUN_LEASE_TTL_MS", default_value_t = 6_000)]
    pub lease_ttl_ms: u64,
    /// How often runners should heartbeat (told to them; a third of the lease TTL or less).
    #[arg(long, env = "AGENTRUN_HEARTBEAT_INTERVAL_MS", default_value_t = 2_000)]
    pub heartbeat_interval_ms: u64,
    /// How often the sweeper looks for expired leases and timed-out runs.
    #[arg(long, env = "AGENTRUN_SWEEP_INTERVAL_MS", default_value_t = 500)]
    pub sweep_interval_ms: u64,
    /// Safety-net poll of runner streams for work and commands, in case a wake-up was lost.
    #[arg(
        long,
        env = "AGENTRUN_RUNNER_POLL_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub runner_poll_interval_ms: u64,
    /// Largest accepted JSON payload (run input, command, event), in bytes.
    #[arg(long, env = "AGENTRUN_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,
    /// Most events in one appended batch.
    #[arg(long, env = "AGENTRUN_MAX_BATCH_EVENTS", default_value_t = 1_000)]
    pub max_batch_events: usize,
    /// Active (claimed, running, waiting) runs a tenant may have when it has no limit of
    /// its own (AdminService.SetTenantLimit); 0 means unlimited.
    #[arg(long, env = "AGENTRUN_TENANT_MAX_ACTIVE_RUNS", default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..))]
    pub tenant_max_active_runs: i32,
}

impl Settings {
    /// Defaults for everything, against `database_url`; what tests start from.
    pub fn for_database(database_url: impl Into<String>) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            settings: Settings,
        }
        // Parsing an empty command line cannot fail: every field has a default or is optional.
        let mut settings = Defaults::try_parse_from(["agentrun-manager"])
            .expect("all settings have defaults")
            .settings;
        settings.database_url = Some(database_url.into());
        settings
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }
}
