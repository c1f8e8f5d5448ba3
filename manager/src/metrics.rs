//! Prometheus metrics: one [`Metrics`] registry shared by the handlers, the sweeper and
//! the RPC layer, and the `/metrics` endpoint on its own port.
//!
//! Counters, histograms and connection gauges are updated where things happen. What the
//! database knows (queue depth, oldest pending run, active leases) and the pool's usage
//! are read at scrape time, so they are never stale and cost nothing between scrapes.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use agentrun_shared::http::{self, Reply};
use agentrun_shared::state::RunStatus;
use deadpool_postgres::Pool;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::store::leases::Assignment;
use crate::store::{requests, runs};

/// How long a scrape may spend on the database before it reports without it.
const SCRAPE_DB_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueStatusLabels {
    pub queue: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

/// A served gRPC method, labelled as go-grpc-prometheus does (dashboards built for it
/// work): `unknown` for every path this server does not serve.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcMethod {
    /// e.g. `agentrun.v1.RunService`.
    pub grpc_service: String,
    /// e.g. `CreateRun`.
    pub grpc_method: String,
    /// `unary`, `client_stream`, `server_stream` or `bidi_stream`.
    pub grpc_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcMethodCode {
    #[prometheus(flatten)]
    method: GrpcMethod,
    /// The status code's name as gRPC's Go implementation spells it: `OK`,
    /// `InvalidArgument`, `Unavailable`, ...
    grpc_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `size` (open), `available` (idle), `max`, or `waiting` (callers queued).
    pub state: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the manager exports, and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    // Read from the database at scrape time.
    queue_depth: Family<QueueStatusLabels, Gauge>,
    oldest_pending: Family<QueueLabels, Gauge<f64, AtomicU64>>,
    active_leases: Gauge,
    database_up: Gauge,
    pool: Family<PoolLabels, Gauge>,
    // Updated where things happen.
    create_to_claim: Histogram,
    lease_expiries: Counter,
    requeues: Counter,
    runs_compacted: Counter,
    deltas_compacted: Counter,
    events_appended: Counter,
    webhook_delivered: Counter,
    webhook_attempts_failed: Counter,
    webhook_failed: Counter,
    event_batch_size: Histogram,
    connected_runners: Gauge,
    watchers: Gauge,
    open_requests: Gauge,
    grpc_started: Family<GrpcMethod, Counter>,
    grpc_handled: Family<GrpcMethodCode, Counter>,
    grpc_handling: HistogramFamily<GrpcMethod>,
    /// Serialises scrapes: each clears and refills the scrape-time families.
    scrape: tokio::sync::Mutex<()>,
}

fn rpc_duration_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("agentrun");
        let m = Self {
            queue_depth: Family::default(),
            oldest_pending: Family::default(),
            active_leases: Gauge::default(),
            database_up: Gauge::default(),
            pool: Family::default(),
            // 5 ms .. ~82 min
            create_to_claim: Histogram::new(exponential_buckets(0.005, 2.0, 20)),
            lease_expiries: Counter::default(),
            requeues: Counter::default(),
            runs_compacted: Counter::default(),
            deltas_compacted: Counter::default(),
            events_appended: Counter::default(),
            webhook_delivered: Counter::default(),
            webhook_attempts_failed: Counter::default(),
            webhook_failed: Counter::default(),
            // 1 .. 1024 events
            event_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            connected_runners: Gauge::default(),
            watchers: Gauge::default(),
            open_requests: Gauge::default(),
            grpc_started: Family::default(),
            grpc_handled: Family::default(),
            grpc_handling: Family::new_with_constructor(rpc_duration_histogram),
            scrape: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "queue_depth",
            "Non-terminal runs by queue and status",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_oldest_pending_seconds",
            "Age of the oldest pending run, by queue",
            m.oldest_pending.clone(),
        );
        registry.register(
            "active_leases",
            "Runs held by a runner (claimed, running or waiting)",
            m.active_leases.clone(),
        );
        registry.register(
            "database_up",
            "1 if the scrape-time queries reached the database",
            m.database_up.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Database pool connections by state (size, available, max, waiting)",
            m.pool.clone(),
        );
        registry.register(
            "create_to_claim_seconds",
            "Time from a run's creation to its claim by a runner",
            m.create_to_claim.clone(),
        );
        registry.register(
            "lease_expiries",
            "Leases the sweeper found expired",
            m.lease_expiries.clone(),
        );
        registry.register(
            "requeues",
            "Runs put back in the queue after their lease expired",
            m.requeues.clone(),
        );
        registry.register(
            "runs_compacted",
            "Ended runs whose deltas retention compacted",
            m.runs_compacted.clone(),
        );
        registry.register(
            "deltas_compacted",
            "content.delta events retention merged into their item's first delta",
            m.deltas_compacted.clone(),
        );
        registry.register(
            "events_appended",
            "Runner events appended to run logs",
            m.events_appended.clone(),
        );
        registry.register(
            "webhook_deliveries_delivered",
            "Webhook deliveries a receiver took (answered 2xx), by this replica",
            m.webhook_delivered.clone(),
        );
        registry.register(
            "webhook_attempts_failed",
            "Webhook attempts that got no 2xx answer, by this replica",
            m.webhook_attempts_failed.clone(),
        );
        registry.register(
            "webhook_deliveries_failed",
            "Webhook deliveries given up after their last attempt, by this replica",
            m.webhook_failed.clone(),
        );
        registry.register(
            "event_batch_size",
            "Events per appended batch",
            m.event_batch_size.clone(),
        );
        registry.register(
            "connected_runners",
            "Runner streams (RunnerService.Connect) open on this replica",
            m.connected_runners.clone(),
        );
        registry.register(
            "watchers",
            "WatchRun and WatchSession streams open on this replica",
            m.watchers.clone(),
        );
        registry.register(
            "open_requests",
            "Requests (approvals, user input) open across all runs",
            m.open_requests.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register("build_info", "The running build: 1, by version", build);
        root.register(
            "grpc_server_started",
            "gRPC calls started, by method",
            m.grpc_started.clone(),
        );
        root.register(
            "grpc_server_handled",
            "gRPC calls answered, by method and status code (streams when they start)",
            m.grpc_handled.clone(),
        );
        root.register(
            "grpc_server_handling_seconds",
            "gRPC call latency to the response headers, by method",
            m.grpc_handling.clone(),
        );
        Self {
            registry: root,
            ..m
        }
    }

    /// Observes the create-to-claim latency of freshly claimed runs.
    pub fn claimed(&self, assignments: &[Assignment]) {
        for a in assignments {
            if let Some(claimed_at) = a.run.claimed_at {
                let waited = claimed_at
                    .duration_since(a.run.created_at)
                    .unwrap_or_default();
                self.create_to_claim.observe(waited.as_secs_f64());
            }
        }
    }

    /// Counts one appended batch of `batch` runner events, `duplicates` of them resends
    /// that were skipped.
    pub fn appended(&self, batch: usize, duplicates: i32) {
        if batch > 0 {
            let fresh = batch.saturating_sub(duplicates.max(0) as usize);
            self.events_appended.inc_by(fresh as u64);
            self.event_batch_size.observe(batch as f64);
        }
    }

    /// Counts what a sweep did.
    pub fn swept(&self, lease_expiries: usize, requeues: usize) {
        self.lease_expiries.inc_by(lease_expiries as u64);
        self.requeues.inc_by(requeues as u64);
    }

    /// Counts how a webhook attempt ended: delivered, or failed (for good when
    /// `last` is true).
    pub fn webhook_attempt(&self, delivered: bool, last: bool) {
        if delivered {
            self.webhook_delivered.inc();
            return;
        }
        self.webhook_attempts_failed.inc();
        if last {
            self.webhook_failed.inc();
        }
    }

    /// Counts what a compaction pass did.
    pub fn compacted(&self, runs: u64, deltas_removed: u64) {
        self.runs_compacted.inc_by(runs);
        self.deltas_compacted.inc_by(deltas_removed);
    }

    /// Counts a gRPC call as it starts.
    pub fn rpc_started(&self, method: &GrpcMethod) {
        self.grpc_started.get_or_create(method).inc();
    }

    /// Counts a gRPC call's answer.
    pub fn rpc(&self, method: &GrpcMethod, code: tonic::Code, elapsed: Duration) {
        self.grpc_handled
            .get_or_create(&GrpcMethodCode {
                method: method.clone(),
                grpc_code: go_code_name(code).to_owned(),
            })
            .inc();
        self.grpc_handling
            .get_or_create(method)
            .observe(elapsed.as_secs_f64());
    }

    /// A runner stream opened; the gauge goes down when the guard drops.
    pub fn runner_connected(self: &Arc<Self>) -> GaugeGuard {
        GaugeGuard::new(self.connected_runners.clone())
    }

    /// A watcher started; the gauge goes down when the guard drops.
    pub fn watching(self: &Arc<Self>) -> GaugeGuard {
        GaugeGuard::new(self.watchers.clone())
    }

    /// Refreshes the scrape-time metrics from `pool` and encodes everything.
    pub async fn render(&self, pool: &Pool) -> String {
        let _one_at_a_time = self.scrape.lock().await;
        let status = pool.status();
        for (state, value) in [
            ("size", status.size),
            ("available", status.available),
            ("max", status.max_size),
            ("waiting", status.waiting),
        ] {
            self.pool
                .get_or_create(&PoolLabels {
                    state: state.into(),
                })
                .set(value as i64);
        }
        self.queue_depth.clear();
        self.oldest_pending.clear();
        let stats = tokio::time::timeout(SCRAPE_DB_TIMEOUT, async {
            let client = pool.get().await?;
            let stats = runs::queue_stats(&client, 0, 0).await?;
            let open = requests::count_open(&client).await?;
            Ok::<_, crate::error::Error>((stats, open))
        })
        .await;
        match stats {
            Ok(Ok((stats, open_requests))) => {
                self.database_up.set(1);
                self.open_requests.set(open_requests);
                let mut active = 0;
                for depth in &stats.depths {
                    if RunStatus::ACTIVE.contains(&depth.status) {
                        active += depth.runs;
                    }
                    self.queue_depth
                        .get_or_create(&QueueStatusLabels {
                            queue: depth.queue.clone(),
                            status: depth.status.as_str().to_owned(),
                        })
                        .set(depth.runs);
                }
                self.active_leases.set(active);
                for (queue, ms) in &stats.oldest_pending_ms {
                    self.oldest_pending
                        .get_or_create(&QueueLabels {
                            queue: queue.clone(),
                        })
                        .set(*ms as f64 / 1000.0);
                }
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "metrics scrape could not read queue stats");
                self.database_up.set(0);
            }
            Err(_) => {
                tracing::debug!("metrics scrape timed out reading queue stats");
                self.database_up.set(0);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A status code's name as gRPC's Go implementation (and so go-grpc-prometheus) spells
/// it.
fn go_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Decrements its gauge when dropped, so a stream's end is counted however it ends.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Binds the metrics listener; `None` when `addr` is empty (metrics disabled).
pub async fn bind(addr: &str) -> anyhow::Result<Option<TcpListener>> {
    http::bind("--metrics-listen", addr)
        .await
        .map_err(anyhow::Error::msg)
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    pool: Pool,
    shutdown: CancellationToken,
) {
    let handle = move |path: String| {
        let (metrics, pool) = (metrics.clone(), pool.clone());
        async move {
            match path.as_str() {
                "/metrics" => Reply::new("200 OK", http::OPENMETRICS, metrics.render(&pool).await),
                _ => Reply::not_found(),
            }
        }
    };
    http::serve(listener, handle, shutdown).await
}
