//! `agentrun-bench`: measures the manager and runners as real processes on a real
//! PostgreSQL, next to the database limit measured by pgbench on the same server, and
//! prints a Markdown table and writes JSON with every figure.
//!
//! ```text
//! cargo build --release -p agentrun-bench -p agentrun-runner -p agentrun-manager
//! cargo run --release -p agentrun-bench -- all [--runs N] [--json PATH]
//! ```

mod dblimit;
mod dispatch;
mod report;
mod stack;
mod stream;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

use crate::stack::{Cluster, Stack, connect_db};

#[derive(Parser)]
#[command(
    name = "agentrun-bench",
    about = "Benchmarks agentrun against the database limit"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every scenario, then the database limit.
    All(Params),
}

#[derive(clap::Args, Clone)]
struct Params {
    /// Runs created in the dispatch scenario.
    #[arg(long, default_value_t = 10_000)]
    runs: usize,
    /// Runner processes serving the scenarios.
    #[arg(long, default_value_t = 2)]
    runners: usize,
    /// Runs in the stream scenario, each with its own watcher.
    #[arg(long, default_value_t = 8)]
    stream_runs: usize,
    /// Tokens (content.delta events) per stream run.
    #[arg(long, default_value_t = 2_000)]
    stream_tokens: usize,
    /// Seconds each pgbench script runs.
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u32,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench/latest.json")]
    json: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli {
        command: Cmd::All(params),
    } = Cli::parse();
    // Declared first so it is dropped last: the processes go before their database.
    let cluster = Cluster::start()?;
    let url = cluster.create_database().await?;
    let db = connect_db(&url).await?;
    let timeout = Duration::from_secs(300);

    let mut figures = Vec::new();
    {
        let stack = Stack::start(&url, params.runners).await?;
        let channel = stack.channel().await?;
        eprintln!("dispatch: {} runs, {} runners", params.runs, params.runners);
        figures.extend(dispatch::run(channel.clone(), &db, params.runs, timeout).await?);
        eprintln!(
            "stream: {} runs x {} tokens",
            params.stream_runs, params.stream_tokens
        );
        figures.extend(
            stream::run(
                channel,
                &db,
                params.stream_runs,
                params.stream_tokens,
                timeout,
            )
            .await?,
        );
        // The stack stops here, so pgbench has the machine to itself.
    }
    eprintln!(
        "database limit: pgbench, {} s per script",
        params.pgbench_seconds
    );
    figures.extend(dblimit::run(&db, &url, params.pgbench_seconds).await?);

    print!("{}", report::markdown(&figures));
    let run_params = json!({
        "runs": params.runs,
        "runners": params.runners,
        "stream_runs": params.stream_runs,
        "stream_tokens": params.stream_tokens,
        "pgbench_seconds": params.pgbench_seconds,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
    });
    report::write_json(&params.json, &figures, run_params)?;
    eprintln!("wrote {}", params.json.display());
    Ok(())
}
