//! Manager settings, from flags or environment variables (flags win).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use agentrun_shared::payload::DEFAULT_MAX_PAYLOAD_BYTES;

pub use crate::telemetry::LogFormat;

/// Everything the manager needs to run. Durations are in milliseconds on the command line.
/// The largest `max_payload_bytes`: 1 MiB.
pub const MAX_PAYLOAD_LIMIT: usize = 1024 * 1024;
/// The largest gRPC message the manager receives or sends: 4 MiB, what gRPC clients
/// accept by default. Pages and batches are sized to stay well under it.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

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
    /// How long an ended run keeps every `content.delta` event, in milliseconds, before
    /// the deltas of each item are compacted into one (the text is kept, other events are
    /// untouched); 0 keeps them forever. A tenant's own setting
    /// (AdminService.SetTenantRetention) overrides it.
    #[arg(long, env = "AGENTRUN_EVENT_RETENTION_MS", default_value_t = 0,
          value_parser = clap::value_parser!(i64).range(0..=crate::retention::MAX_RETENTION_MS))]
    pub event_retention_ms: i64,
    /// How often each replica looks for ended runs due for compaction (then works in
    /// small batches until none is left).
    #[arg(long, env = "AGENTRUN_EVENT_COMPACTION_INTERVAL_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub event_compaction_interval_ms: u64,
    /// How late a schedule's due time may be fired and still count as on time, in
    /// milliseconds. An older due time was missed (every manager was down): the
    /// schedule's catch-up policy decides whether it still gets a run.
    #[arg(long, env = "AGENTRUN_SCHEDULE_CATCH_UP_GRACE_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub schedule_catch_up_grace_ms: u64,
    /// Safety-net poll for schedules, in milliseconds: each replica sleeps until the
    /// next due time it knows of, at most this long (schedules created or resumed on
    /// another replica are seen within it; that replica fires them on time itself).
    #[arg(long, env = "AGENTRUN_SCHEDULE_POLL_INTERVAL_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(20..))]
    pub schedule_poll_interval_ms: u64,
    /// Safety-net poll for claimable runs (one query per replica), in case a wake-up was
    /// lost or a scheduled run came due. Held runs' commands are also delivered with
    /// every heartbeat.
    #[arg(
        long,
        env = "AGENTRUN_RUNNER_POLL_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub runner_poll_interval_ms: u64,
    /// Safety-net poll for watchers, in case a wake-up was lost: one query per replica for
    /// all watched runs (WatchRun) and one for all watched sessions (WatchSession);
    /// appends on this replica and other replicas' NOTIFY wake watchers at once.
    #[arg(long, env = "AGENTRUN_WATCH_POLL_INTERVAL_MS", default_value_t = 1_000)]
    pub watch_poll_interval_ms: u64,
    /// On shutdown: how long in-flight calls may take before the manager stops anyway.
    #[arg(long, env = "AGENTRUN_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// Largest accepted JSON payload (run input, command, event), in bytes; at most
    /// [`MAX_PAYLOAD_LIMIT`], so a batch of them stays under the gRPC message limit.
    #[arg(long, env = "AGENTRUN_MAX_PAYLOAD_BYTES", default_value_t = DEFAULT_MAX_PAYLOAD_BYTES)]
    pub max_payload_bytes: usize,
    /// Most events in one appended batch. A runner streaming faster than its appends are
    /// stored fills its batches; each costs a transaction, so larger ones store more
    /// events per second (2,000 against 1,000: +15 % in `agentrun-bench stream`), at
    /// more latency under that load (full-load append-to-watcher p99 about 11 → 20 ms).
    #[arg(long, env = "AGENTRUN_MAX_BATCH_EVENTS", default_value_t = 2_000)]
    pub max_batch_events: usize,
    /// Active (claimed, running, waiting) runs a tenant may have when it has no limit of
    /// its own (AdminService.SetTenantLimit); 0 means unlimited.
    #[arg(long, env = "AGENTRUN_TENANT_MAX_ACTIVE_RUNS", default_value_t = 0,
          value_parser = clap::value_parser!(i32).range(0..))]
    pub tenant_max_active_runs: i32,
    // ---- Quotas (RESOURCE_EXHAUSTED past them; 0 means unlimited) ----------------------
    /// Pending (queued) runs a tenant may have; creating more is refused until some are
    /// claimed or end.
    #[arg(long, env = "AGENTRUN_TENANT_MAX_PENDING_RUNS", default_value_t = 100_000,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub tenant_max_pending_runs: i64,
    /// Open watchers (WatchRun, WatchSession) a tenant may have on one replica.
    #[arg(long, env = "AGENTRUN_TENANT_MAX_WATCHERS", default_value_t = 1_000)]
    pub tenant_max_watchers: usize,
    /// Commands a run may have (turns, steers, answers…) over its life.
    #[arg(long, env = "AGENTRUN_MAX_COMMANDS_PER_RUN", default_value_t = 10_000,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub max_commands_per_run: i64,
    /// Event payload bytes a run's runners may append over its life; past it the append
    /// is refused and the run fails with `quota_exceeded`.
    #[arg(long, env = "AGENTRUN_MAX_RUN_EVENT_BYTES", default_value_t = 1024 * 1024 * 1024,
          value_parser = clap::value_parser!(i64).range(0..))]
    pub max_run_event_bytes: i64,
    /// Let webhooks send to loopback, private, link-local and other non-public
    /// addresses. Off by default: a tenant names the URL and the manager sends from
    /// inside your network, so it could otherwise reach the manager's own ports, other
    /// services or a cloud metadata endpoint, and read their answers back in a
    /// delivery's `last_error`. `agentrun dev` turns it on (receivers on a laptop are
    /// local).
    #[arg(long, env = "AGENTRUN_WEBHOOK_PRIVATE_TARGETS", default_value_t = false,
          action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true",
          value_name = "BOOL")]
    pub webhook_private_targets: bool,
    /// Apply pending database migrations at start-up. When false the manager serves
    /// NOT_SERVING health until the schema is current (`agentrun-manager migrate`).
    #[arg(long, env = "AGENTRUN_MIGRATE", default_value_t = true,
          action = clap::ArgAction::Set, value_name = "BOOL")]
    pub migrate: bool,
    /// Shorthand for `--migrate false`.
    #[arg(long)]
    pub no_migrate: bool,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); empty disables it.
    #[arg(
        long,
        env = "AGENTRUN_METRICS_LISTEN",
        default_value = "127.0.0.1:9400"
    )]
    pub metrics_listen: String,
    /// Address of the operator web UI (HTTP/1.1: the app and gRPC-Web to the API, with
    /// the same API keys); empty disables it.
    #[arg(long, env = "AGENTRUN_UI_LISTEN", default_value = "")]
    pub ui_listen: String,
    /// Path the UI is served under, e.g. `/agentrun/` behind an ingress.
    #[arg(long, env = "AGENTRUN_UI_BASE_PATH", default_value = "/")]
    pub ui_base_path: String,
    /// Log output: `pretty` for people, `json` (one object per line) for collectors.
    #[arg(long, env = "AGENTRUN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    /// Export traces (a span per RPC) by OTLP/gRPC to this collector, e.g.
    /// `http://127.0.0.1:4317`. Unset: no export.
    #[arg(long, env = "AGENTRUN_OTEL_ENDPOINT")]
    pub otel_endpoint: Option<String>,
    /// `required`: every call carries an API key (`authorization: Bearer ark_...`) that
    /// names its tenant and role. `disabled`: no authentication, the tenant comes from
    /// the `agentrun-tenant` header — for development only, refused unless `listen` is a
    /// loopback address.
    #[arg(long, env = "AGENTRUN_AUTH", value_enum, default_value_t = AuthMode::Required)]
    pub auth: AuthMode,
    /// PEM certificate (chain) served for TLS; with `tls_key`. Neither: plaintext.
    #[arg(long, env = "AGENTRUN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[arg(long, env = "AGENTRUN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA whose client certificates are verified. Runners (RunnerService) must then
    /// present one; other clients may connect without. Needs `tls_cert`.
    #[arg(long, env = "AGENTRUN_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    // TLS to PostgreSQL: whether and how is DATABASE_URL's `sslmode`, as in libpq:
    // disable, prefer (the default), require, verify-ca or verify-full; see `db::tls`.
    /// PEM root certificate(s) the database server's certificate must chain to, like
    /// libpq's `sslrootcert` URL parameter (set one or the other). With it, `require` and
    /// `prefer` verify the chain too; without it, `verify-ca` and `verify-full` trust the
    /// system roots.
    #[arg(long, env = "AGENTRUN_DATABASE_CA_FILE")]
    pub database_ca_file: Option<PathBuf>,

    // ---- Connection limits (see `listener`) -------------------------------------------
    // What one replica holds open, and for how long. Each runner holds one connection,
    // each watching client one; the process also needs `db_pool_size` + 64 descriptors
    // of its own. At start the soft RLIMIT_NOFILE is raised toward the hard limit to fit
    // `max_connections` plus that reserve; when it cannot be, the cap is lowered to fit
    // (with a warning), so accepting never runs the process out of descriptors.
    /// Most open gRPC connections; past it the manager stops accepting (new clients wait
    /// in the listen backlog) until one closes.
    #[arg(long, env = "AGENTRUN_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// A connection that has not completed the TLS handshake (with TLS) or sent the
    /// HTTP/2 preface (plaintext) this long after it was accepted is closed.
    #[arg(long, env = "AGENTRUN_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// The server pings a connection (HTTP/2 PING) after this long without a frame from
    /// it; 0 disables keepalive pings.
    #[arg(long, env = "AGENTRUN_KEEPALIVE_INTERVAL_MS", default_value_t = 30_000)]
    pub keepalive_interval_ms: u64,
    /// A keepalive ping unanswered this long closes the connection.
    #[arg(long, env = "AGENTRUN_KEEPALIVE_TIMEOUT_MS", default_value_t = 20_000)]
    pub keepalive_timeout_ms: u64,
    /// A connection from which nothing at all arrived this long is closed: a live peer
    /// answers keepalive pings, so this reaps silent ones (gone, stalled, or through TLS
    /// but never speaking HTTP/2). More than the keepalive interval plus timeout, and
    /// only with keepalive pings on (or quiet watchers would be cut); 0 disables it.
    #[arg(long, env = "AGENTRUN_IDLE_TIMEOUT_MS", default_value_t = 120_000)]
    pub idle_timeout_ms: u64,
    /// Most concurrent calls (HTTP/2 streams) on one connection, advertised to clients in
    /// SETTINGS_MAX_CONCURRENT_STREAMS; a client's further calls wait for a free stream.
    #[arg(long, env = "AGENTRUN_MAX_CONCURRENT_STREAMS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
}

/// Whether callers must present an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Every call needs a valid, unrevoked API key.
    Required,
    /// No authentication (development on loopback only).
    Disabled,
}

impl Settings {
    /// Defaults for everything (metrics off), against `database_url`; what tests and
    /// embedded managers start from.
    /// Refuses limits the wire cannot carry.
    pub fn check_limits(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1024..=MAX_PAYLOAD_LIMIT).contains(&self.max_payload_bytes),
            "--max-payload-bytes (AGENTRUN_MAX_PAYLOAD_BYTES) must be between 1024 and \
             {MAX_PAYLOAD_LIMIT}, not {}",
            self.max_payload_bytes
        );
        anyhow::ensure!(
            self.handshake_timeout_ms > 0,
            "--handshake-timeout-ms (AGENTRUN_HANDSHAKE_TIMEOUT_MS) must be positive"
        );
        if self.keepalive_interval_ms > 0 {
            anyhow::ensure!(
                self.keepalive_timeout_ms > 0,
                "--keepalive-timeout-ms (AGENTRUN_KEEPALIVE_TIMEOUT_MS) must be positive \
                 while keepalive pings are on"
            );
            // Watchers may wait long without a message either way: only the pings'
            // answers keep their connections from looking idle.
            anyhow::ensure!(
                self.idle_timeout_ms == 0
                    || self.idle_timeout_ms
                        > self.keepalive_interval_ms + self.keepalive_timeout_ms,
                "--idle-timeout-ms (AGENTRUN_IDLE_TIMEOUT_MS) must exceed the keepalive \
                 interval plus timeout ({} ms), or be 0",
                self.keepalive_interval_ms + self.keepalive_timeout_ms
            );
        } else {
            anyhow::ensure!(
                self.idle_timeout_ms == 0,
                "--idle-timeout-ms (AGENTRUN_IDLE_TIMEOUT_MS) needs keepalive pings \
                 (--keepalive-interval-ms): without them a quiet watcher looks idle"
            );
        }
        Ok(())
    }

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
        // An embedded manager (tests, `agentrun dev`) must not grab the fixed metrics
        // port: several run at once. Set `metrics_listen` to serve metrics.
        settings.metrics_listen = String::new();
        settings
    }

    /// Payload bytes a runner may put in one event batch: a few payloads, and always well
    /// under the 4 MiB gRPC message limit.
    pub fn max_batch_bytes(&self) -> usize {
        (self.max_payload_bytes * 4)
            .min(2 * MAX_PAYLOAD_LIMIT)
            .max(self.max_payload_bytes)
    }

    pub fn watch_poll_interval(&self) -> Duration {
        Duration::from_millis(self.watch_poll_interval_ms.max(10))
    }

    pub fn quotas(&self) -> crate::limits::Quotas {
        crate::limits::Quotas {
            commands_per_run: self.max_commands_per_run,
            event_bytes_per_run: self.max_run_event_bytes,
            tenant_pending_runs: self.tenant_max_pending_runs,
            tenant_watchers: self.tenant_max_watchers,
            payload_bytes: self.max_payload_bytes,
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    /// Whether start-up applies pending migrations.
    pub fn migrate_on_start(&self) -> bool {
        self.migrate && !self.no_migrate
    }

    pub fn sweep_interval(&self) -> Duration {
        Duration::from_millis(self.sweep_interval_ms)
    }

    pub fn event_compaction_interval(&self) -> Duration {
        Duration::from_millis(self.event_compaction_interval_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// The HTTP/2 keepalive ping interval; `None` when pings are off.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        (self.keepalive_interval_ms > 0).then(|| Duration::from_millis(self.keepalive_interval_ms))
    }

    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.keepalive_timeout_ms)
    }

    /// How long a connection may send nothing; `None`: forever.
    pub fn idle_timeout(&self) -> Option<Duration> {
        (self.idle_timeout_ms > 0).then(|| Duration::from_millis(self.idle_timeout_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_retention_is_forever_by_default_and_refused_out_of_range() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: Settings,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("agentrun-manager").chain(args.iter().copied()))
                .map(|cli| cli.settings)
        };
        let defaults = parse(&[]).expect("the defaults parse");
        assert_eq!(defaults.event_retention_ms, 0, "kept forever");
        assert_eq!(
            defaults.event_compaction_interval(),
            Duration::from_secs(60)
        );
        let day = parse(&["--event-retention-ms", "86400000"]).expect("a day");
        assert_eq!(day.event_retention_ms, 86_400_000);
        let too_long = (crate::retention::MAX_RETENTION_MS + 1).to_string();
        for bad in ["-1", too_long.as_str(), "soon"] {
            let err = parse(&[&format!("--event-retention-ms={bad}")])
                .err()
                .unwrap_or_else(|| panic!("{bad} is refused"));
            assert!(err.to_string().contains("--event-retention-ms"), "{err}");
        }
        assert!(parse(&["--event-compaction-interval-ms", "0"]).is_err());
    }

    #[test]
    fn the_connection_defaults_pass_and_an_idle_timeout_needs_keepalive_pings() {
        let mut settings = Settings::for_database("postgres://unused");
        settings
            .check_limits()
            .expect("the defaults are consistent");
        assert_eq!(settings.keepalive_interval(), Some(Duration::from_secs(30)));

        settings.idle_timeout_ms = settings.keepalive_interval_ms + settings.keepalive_timeout_ms;
        assert!(
            settings.check_limits().is_err(),
            "idle must outlast a ping's answer"
        );
        settings.idle_timeout_ms = 0;
        settings.check_limits().expect("no idle timeout");
        assert_eq!(settings.idle_timeout(), None);

        settings.keepalive_interval_ms = 0;
        settings
            .check_limits()
            .expect("neither pings nor idle timeout");
        settings.idle_timeout_ms = 120_000;
        assert!(
            settings.check_limits().is_err(),
            "idle timeout without pings"
        );
    }
}
