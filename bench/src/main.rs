//! `agentrun-bench`: measures the manager and runners as real processes on a real
//! PostgreSQL, next to the database limit measured by pgbench and the peers
//! (graphile-worker, pgqueuer) on the same server, and prints a Markdown table and writes JSON with every figure.
//!
//! ```text
//! cargo build --release -p agentrun-bench -p agentrun-runner -p agentrun-manager
//! cargo run --release -p agentrun-bench -- all [--runs N] [--json PATH]
//! cargo run --release -p agentrun-bench -- all --smoke     # every scenario, tiny (CI)
//! cargo run --release -p agentrun-bench -- fleet --fleet-runners 2000
//! cargo run --release -p agentrun-bench -- watchers --watchers 10000
//! cargo run --release -p agentrun-bench -- storm --storm-runners 10000
//! cargo run --release -p agentrun-bench -- retention --retention-runs 2000 --retention-deltas 200
//! ```
//!
//! A scenario that fails does not stop the others; the report shows what was measured
//! and the command exits non-zero.

mod cpu;
mod dblimit;
mod dispatch;
mod failover;
mod fleet;
mod leases;
mod peers;
mod report;
mod retention;
mod stack;
mod statements;
mod storm;
mod stream;
mod watchers;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::report::Figure;
use crate::stack::{Cluster, Stack, connect_db};

/// mimalloc, as the manager and the runners (see the workspace manifest): the bench
/// shares the machine with what it measures, so its own CPU is kept small.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "agentrun-bench",
    about = "Benchmarks agentrun against the database limit"
)]
struct Cli {
    /// Which scenario to run.
    #[arg(value_enum)]
    scenario: Scenario,
    #[command(flatten)]
    params: Params,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Every scenario, then the database limit.
    All,
    /// Runs/s at full load, then create-to-assigned latency at half that rate.
    Dispatch,
    /// Events/s of streaming runs and append-to-watcher latency.
    Stream,
    /// Thousands of idle runner streams on one manager: its memory and CPU.
    Fleet,
    /// Thousands of idle WatchRun streams on one manager: database commits/s and memory.
    Watchers,
    /// Thousands of runs held by runners that heartbeat them: what renewing a lease
    /// costs the database and the manager.
    Leases,
    /// Thousands of runners connecting at once (a lost replica's fleet): seconds until
    /// all are welcomed.
    Storm,
    /// SIGKILL a runner holding runs: seconds until another runner has them.
    Failover,
    /// Compacting ended runs' deltas (retention): runs/s and rows/s, and a concurrent
    /// writer's events/s with and without compaction running.
    Retention,
    /// The database limit (pgbench).
    Limit,
    /// The peers (graphile-worker, pgqueuer) draining pre-inserted jobs.
    Peers,
}

/// Sizes default to the full benchmark, or to a tiny run with `--smoke`; a size given
/// explicitly wins over both.
#[derive(clap::Args, Clone)]
struct Params {
    /// Every scenario at a tiny size (CI): fails if any scenario fails.
    #[arg(long)]
    smoke: bool,
    /// Runs created in the dispatch scenario [default: 10000; smoke 300].
    #[arg(long)]
    runs: Option<usize>,
    /// Runner processes serving dispatch and stream.
    #[arg(long, default_value_t = 2)]
    runners: usize,
    /// Seconds of paced creation at half the measured dispatch rate [default: 5; smoke 2].
    #[arg(long)]
    paced_seconds: Option<f64>,
    /// Runs in the stream scenario, each with its own watcher [default: 8; smoke 2].
    #[arg(long)]
    stream_runs: Option<usize>,
    /// Tokens (content.delta events) per stream run [default: 100000; smoke 200]: enough
    /// for over a second of streaming, so the figure is the throughput rather than the
    /// start-up of eight runs (at 20,000 they streamed for a third of a second).
    #[arg(long)]
    stream_tokens: Option<usize>,
    /// Bytes of context added to each stream run's input (a long prompt or a
    /// conversation's history), which the runner gets at the claim.
    #[arg(long, default_value_t = 0)]
    stream_input_bytes: usize,
    /// Simulated runners connected in the fleet scenario [default: 10000; smoke 200].
    #[arg(long)]
    fleet_runners: Option<usize>,
    /// Simulated runners sharing one HTTP/2 connection to the manager.
    #[arg(long, default_value_t = 10)]
    fleet_runners_per_connection: usize,
    /// Simulated runners connecting at once in the storm scenario [default: 10000; smoke
    /// 200]. They share HTTP/2 connections as the fleet's do.
    #[arg(long)]
    storm_runners: Option<usize>,
    /// Seconds the fleet's cost is measured over [default: 15; smoke 3].
    #[arg(long)]
    fleet_seconds: Option<u64>,
    /// Idle WatchRun streams in the watchers scenario [default: 10000; smoke 200].
    #[arg(long)]
    watchers: Option<usize>,
    /// Seconds the idle watchers' cost is measured over [default: 10; smoke 3].
    #[arg(long)]
    watchers_seconds: Option<u64>,
    /// Runs held (one per simulated runner) in the leases scenario [default: 5000; smoke
    /// 100]. The runners share HTTP/2 connections as the fleet's do.
    #[arg(long)]
    leased_runs: Option<usize>,
    /// Seconds the held leases' cost is measured over [default: 10; smoke 3].
    #[arg(long)]
    leases_seconds: Option<u64>,
    /// Long runs held by the two runners of the failover scenario [default: 20; smoke 4].
    #[arg(long)]
    failover_runs: Option<usize>,
    /// Completed runs compacted in the retention scenario [default: 2000; smoke 100].
    #[arg(long)]
    retention_runs: Option<usize>,
    /// content.delta events of each of those runs [default: 200; smoke 50].
    #[arg(long)]
    retention_deltas: Option<usize>,
    /// Seconds the writer is measured alone in the retention scenario [default: 5;
    /// smoke 1].
    #[arg(long)]
    retention_seconds: Option<u64>,
    /// Jobs each peer drains, and runs the dispatch scenario's drain creates before its
    /// clock starts [default: 50000; smoke 2000].
    #[arg(long)]
    peer_jobs: Option<usize>,
    /// Seconds each pgbench script runs [default: 10; smoke 2].
    #[arg(long)]
    pgbench_seconds: Option<u32>,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/latest.json")]
    json: PathBuf,
}

/// Every size, resolved.
struct Sizes {
    runs: usize,
    runners: usize,
    paced_seconds: f64,
    stream_runs: usize,
    stream_tokens: usize,
    stream_input_bytes: usize,
    fleet_runners: usize,
    fleet_runners_per_connection: usize,
    fleet_seconds: u64,
    watchers: usize,
    watchers_seconds: u64,
    leased_runs: usize,
    leases_seconds: u64,
    storm_runners: usize,
    failover_runs: usize,
    retention_runs: usize,
    retention_deltas: usize,
    retention_seconds: u64,
    peer_jobs: usize,
    pgbench_seconds: u32,
}

impl Params {
    fn sizes(&self) -> Sizes {
        let smoke = self.smoke;
        let pick = |given: Option<usize>, full: usize, tiny: usize| {
            given.unwrap_or(if smoke { tiny } else { full })
        };
        Sizes {
            runs: pick(self.runs, 10_000, 300),
            runners: self.runners,
            paced_seconds: self.paced_seconds.unwrap_or(if smoke { 2.0 } else { 5.0 }),
            stream_runs: pick(self.stream_runs, 8, 2),
            stream_tokens: pick(self.stream_tokens, 100_000, 200),
            stream_input_bytes: self.stream_input_bytes,
            fleet_runners: pick(self.fleet_runners, 10_000, 200),
            fleet_runners_per_connection: self.fleet_runners_per_connection,
            fleet_seconds: self.fleet_seconds.unwrap_or(if smoke { 3 } else { 15 }),
            watchers: pick(self.watchers, 10_000, 200),
            watchers_seconds: self.watchers_seconds.unwrap_or(if smoke { 3 } else { 10 }),
            leased_runs: pick(self.leased_runs, 5_000, 100),
            leases_seconds: self.leases_seconds.unwrap_or(if smoke { 3 } else { 10 }),
            storm_runners: pick(self.storm_runners, 10_000, 200),
            failover_runs: pick(self.failover_runs, 20, 4),
            retention_runs: pick(self.retention_runs, 2_000, 100),
            retention_deltas: pick(self.retention_deltas, 200, 50),
            retention_seconds: self.retention_seconds.unwrap_or(if smoke { 1 } else { 5 }),
            peer_jobs: pick(self.peer_jobs, 50_000, 2_000),
            pgbench_seconds: self.pgbench_seconds.unwrap_or(if smoke { 2 } else { 10 }),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { scenario, params } = Cli::parse();
    let sizes = params.sizes();
    let wants = |s: Scenario| scenario == Scenario::All || scenario == s;
    // Declared first so it is dropped last: the processes go before their database.
    let cluster = Cluster::start()?;
    let url = cluster.create_database().await?;
    let db = connect_db(&url).await?;
    let timeout = Duration::from_secs(300);

    let mut figures = Vec::new();
    let mut failed = Vec::new();
    let mut record = |name: &'static str, result: anyhow::Result<Vec<Figure>>| match result {
        Ok(measured) => figures.extend(measured),
        Err(err) => {
            eprintln!("{name}: FAILED: {err:#}");
            failed.push(name);
        }
    };

    if wants(Scenario::Dispatch) || wants(Scenario::Stream) {
        let mut stack = Stack::start(&url, sizes.runners).await?;
        let channel = stack.channel().await?;
        if wants(Scenario::Dispatch) {
            eprintln!("dispatch: {} runs, {} runners", sizes.runs, sizes.runners);
            let full = dispatch::run(&stack, &db, sizes.runs, timeout).await;
            let rate = full.as_ref().ok().and_then(|figures| {
                figures
                    .iter()
                    .find(|f| f.name == "dispatch.runs_per_s")
                    .map(|f| f.value)
            });
            record("dispatch", full);
            if let Some(rate) = rate {
                eprintln!(
                    "dispatch: paced at {:.0} runs/s (half of {rate:.0}) for {} s",
                    rate / 2.0,
                    sizes.paced_seconds
                );
                let paced = dispatch::paced(
                    channel.clone(),
                    &db,
                    rate / 2.0,
                    sizes.paced_seconds,
                    timeout,
                )
                .await;
                // The drain tells its end by no run being open: only after the phases
                // before it ended all theirs.
                let drain = paced.is_ok();
                record("dispatch (paced)", paced);
                if drain {
                    eprintln!(
                        "dispatch: {} runs created, then drained by {} new runners",
                        sizes.peer_jobs, sizes.runners
                    );
                    record(
                        "dispatch (drain)",
                        dispatch::drain(&mut stack, &db, sizes.peer_jobs, sizes.runners, timeout)
                            .await,
                    );
                }
            }
        }
        if wants(Scenario::Stream) {
            eprintln!(
                "stream: {} runs x {} tokens",
                sizes.stream_runs, sizes.stream_tokens
            );
            record(
                "stream",
                stream::run(
                    &mut stack,
                    &db,
                    sizes.stream_runs,
                    sizes.stream_tokens,
                    sizes.stream_input_bytes,
                    timeout,
                )
                .await,
            );
        }
        // The stack stops here; each later scenario gets a fresh manager.
    }
    if wants(Scenario::Fleet) {
        eprintln!("fleet: {} simulated runners", sizes.fleet_runners);
        let result = async {
            let stack = Stack::start(&url, 0).await?;
            fleet::run(
                &stack,
                &db,
                sizes.fleet_runners,
                sizes.fleet_runners_per_connection,
                Duration::from_secs(sizes.fleet_seconds),
                params.smoke,
            )
            .await
        };
        record("fleet", result.await);
    }
    if wants(Scenario::Watchers) {
        eprintln!("watchers: {} idle watch streams", sizes.watchers);
        let result = async {
            // A database of its own: in the shared one, the earlier scenarios' aftermath
            // (autovacuum working through their writes, among others) commits in one
            // window and not in the other (5.1 added commits/s in one full run, where
            // this scenario alone measures 1.4-1.7).
            let url = cluster.create_database().await?;
            let db = connect_db(&url).await?;
            let stack = Stack::start(&url, 0).await?;
            watchers::run(
                &stack,
                &db,
                sizes.watchers,
                Duration::from_secs(sizes.watchers_seconds),
            )
            .await
        };
        record("watchers", result.await);
    }
    if wants(Scenario::Leases) {
        eprintln!("leases: {} held runs", sizes.leased_runs);
        let result = async {
            let stack = Stack::start(&url, 0).await?;
            leases::run(
                &stack,
                &db,
                sizes.leased_runs,
                sizes.fleet_runners_per_connection,
                Duration::from_secs(sizes.leases_seconds),
                timeout,
            )
            .await
        };
        record("leases", result.await);
    }
    if wants(Scenario::Storm) {
        eprintln!("storm: {} simulated runners at once", sizes.storm_runners);
        let result = async {
            let stack = Stack::start(&url, 0).await?;
            storm::run(
                &stack,
                sizes.storm_runners,
                sizes.fleet_runners_per_connection,
                timeout,
            )
            .await
        };
        record("storm", result.await);
    }
    if wants(Scenario::Failover) {
        eprintln!("failover: {} runs on two runners", sizes.failover_runs);
        record(
            "failover",
            failover::run(&url, &db, sizes.failover_runs, timeout).await,
        );
    }
    if wants(Scenario::Retention) {
        eprintln!(
            "retention: {} runs x {} deltas",
            sizes.retention_runs, sizes.retention_deltas
        );
        let result = async {
            let stack = Stack::start_with(&url, 0, retention::MANAGER_ENV).await?;
            retention::run(
                &stack,
                &db,
                sizes.retention_runs,
                sizes.retention_deltas,
                Duration::from_secs(sizes.retention_seconds),
                timeout,
            )
            .await
        };
        record("retention", result.await);
    }
    if wants(Scenario::Limit) {
        eprintln!(
            "database limit: pgbench, {} s per script",
            sizes.pgbench_seconds
        );
        let result = async {
            let model_url = cluster.create_database().await?;
            dblimit::run(&db, &url, &model_url, sizes.pgbench_seconds).await
        };
        record("limit", result.await);
    }
    // The peers, on the same cluster, next to the database limit.
    if wants(Scenario::Peers) {
        eprintln!("peers: {} jobs each", sizes.peer_jobs);
        record("peers", peers::run(&cluster, sizes.peer_jobs).await);
    }

    print!("{}", report::markdown(&figures));
    let run_params = json!({
        "smoke": params.smoke,
        "runs": sizes.runs,
        "runners": sizes.runners,
        "paced_seconds": sizes.paced_seconds,
        "stream_runs": sizes.stream_runs,
        "stream_tokens": sizes.stream_tokens,
        "stream_input_bytes": sizes.stream_input_bytes,
        "fleet_runners": sizes.fleet_runners,
        "fleet_runners_per_connection": sizes.fleet_runners_per_connection,
        "fleet_seconds": sizes.fleet_seconds,
        "watchers": sizes.watchers,
        "watchers_seconds": sizes.watchers_seconds,
        "leased_runs": sizes.leased_runs,
        "leases_seconds": sizes.leases_seconds,
        "storm_runners": sizes.storm_runners,
        "failover_runs": sizes.failover_runs,
        "retention_runs": sizes.retention_runs,
        "retention_deltas": sizes.retention_deltas,
        "retention_seconds": sizes.retention_seconds,
        "peer_jobs": sizes.peer_jobs,
        "pgbench_seconds": sizes.pgbench_seconds,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "failed": failed,
    });
    report::write_json(&params.json, &figures, run_params)?;
    eprintln!("wrote {}", params.json.display());
    if !failed.is_empty() {
        anyhow::bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}
