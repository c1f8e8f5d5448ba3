//! The peers: other PostgreSQL job queues doing the dispatch scenario's job, side by side
//! on the same server, so each agentrun figure can be read as a ratio to them.
//!
//! - graphile-worker (Node 22): `peers/graphile-worker/drain.mjs`.
//! - pgqueuer (Python, asyncpg): `peers/pgqueuer/drain.py`.
//!
//! Each program gets a fresh database, installs its queue's schema, inserts the jobs
//! (no-op tasks) before its clock starts, times its workers draining them, checks that
//! every job ran, and prints `{"jobs":N,"seconds":S}`. The settings each uses, and why,
//! are in the program's header. `peers/install.sh` installs both under
//! `<target>/tools` once, pinned, and is a no-op when they are already there.

// Until main.rs runs the peers scenario, only the tests below call into this module.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::report::Figure;
use crate::stack::Cluster;

/// How long one peer may take, schema and inserts included, before it is killed.
const PEER_DEADLINE: Duration = Duration::from_secs(600);
/// How long the install may take (a first install downloads Node and two packages).
const INSTALL_DEADLINE: Duration = Duration::from_secs(900);
/// How much of a failed program's stderr goes into the error.
const STDERR_TAIL_LINES: usize = 20;

/// One peer: how to start its drain program.
struct Peer {
    /// Used in messages.
    label: &'static str,
    figure: &'static str,
    /// The program and its leading arguments, before `DATABASE_URL JOBS`.
    command: fn(&Paths) -> Command,
}

const PEERS: [Peer; 2] = [
    Peer {
        label: "graphile-worker",
        figure: "peer.graphile_worker.jobs_per_s",
        command: |paths| {
            let home = paths.tools.join("graphile-worker");
            let mut cmd = Command::new(home.join("node_modules/.bin/node"));
            cmd.arg(paths.peers.join("graphile-worker/drain.mjs"))
                .env("GRAPHILE_WORKER_HOME", home);
            cmd
        },
    },
    Peer {
        label: "pgqueuer",
        figure: "peer.pgqueuer.jobs_per_s",
        command: |paths| {
            let mut cmd = Command::new(paths.tools.join("pgqueuer-venv/bin/python"));
            cmd.arg(paths.peers.join("pgqueuer/drain.py"));
            cmd
        },
    },
];

/// Where the peer programs are and where their tools get installed.
struct Paths {
    /// `bench/peers` in the checkout this binary was built from.
    peers: PathBuf,
    /// `$CARGO_TARGET_DIR/tools`, or `target/tools` in the checkout.
    tools: PathBuf,
}

impl Paths {
    fn locate() -> Self {
        let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| bench.join("../target"));
        Self {
            peers: bench.join("peers"),
            tools: target.join("tools"),
        }
    }
}

/// Installs (once, cached under target/tools) and runs each peer against a fresh
/// database on `cluster`, draining `jobs` pre-inserted no-op jobs; returns one
/// `peer.<name>.jobs_per_s` figure per peer.
pub async fn run(cluster: &Cluster, jobs: usize) -> anyhow::Result<Vec<Figure>> {
    if jobs == 0 {
        bail!("the peers need at least one job to drain");
    }
    let paths = Paths::locate();
    install(&paths).await?;
    let mut figures = Vec::with_capacity(PEERS.len());
    for peer in &PEERS {
        let url = cluster
            .create_database()
            .await
            .with_context(|| format!("create the {} database", peer.label))?;
        let mut cmd = (peer.command)(&paths);
        cmd.arg(&url).arg(jobs.to_string());
        let out = run_blocking(cmd, PEER_DEADLINE)
            .await
            .with_context(|| format!("run the {} peer", peer.label))?;
        if !out.status.success() {
            bail!(
                "peer {} failed ({}); stderr ends:\n{}",
                peer.label,
                out.status,
                tail(&out.stderr)
            );
        }
        let (drained, seconds) = parse_result(&out.stdout).with_context(|| {
            format!(
                "peer {} printed no result; stderr ends:\n{}",
                peer.label,
                tail(&out.stderr)
            )
        })?;
        if drained != jobs as u64 {
            bail!(
                "peer {} reported {drained} jobs, {jobs} were asked for",
                peer.label
            );
        }
        figures.push(Figure::new(
            "peers",
            peer.figure,
            drained as f64 / seconds,
            "jobs/s",
        ));
    }
    Ok(figures)
}

/// Runs `peers/install.sh`, which returns at once when everything is installed.
async fn install(paths: &Paths) -> anyhow::Result<()> {
    let installed = ["graphile-worker", "pgqueuer-venv"]
        .iter()
        .all(|tool| paths.tools.join(tool).join(".stamp").is_file());
    if !installed {
        eprintln!(
            "peers: installing graphile-worker, Node 22 and pgqueuer into {} (a few minutes the first time)",
            paths.tools.display()
        );
    }
    let mut cmd = Command::new("bash");
    cmd.arg(paths.peers.join("install.sh")).arg(&paths.tools);
    let out = run_blocking(cmd, INSTALL_DEADLINE)
        .await
        .context("run bench/peers/install.sh")?;
    if !out.status.success() {
        bail!(
            "installing the peers (bench/peers/install.sh) failed ({}); stderr ends:\n{}",
            out.status,
            tail(&out.stderr)
        );
    }
    Ok(())
}

/// The `{"jobs":N,"seconds":S}` line a peer program prints last.
fn parse_result(stdout: &str) -> anyhow::Result<(u64, f64)> {
    let line = stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .context("empty stdout")?;
    let value: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
    let jobs = value["jobs"]
        .as_u64()
        .with_context(|| format!("no jobs count in {line}"))?;
    let seconds = value["seconds"]
        .as_f64()
        .filter(|s| s.is_finite() && *s > 0.0)
        .with_context(|| format!("no positive seconds in {line}"))?;
    Ok((jobs, seconds))
}

#[derive(Debug)]
struct Output {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` on the blocking pool with its output captured, killing it past
/// `deadline`.
async fn run_blocking(cmd: Command, deadline: Duration) -> anyhow::Result<Output> {
    tokio::task::spawn_blocking(move || run_with_deadline(cmd, deadline))
        .await
        .context("the blocking task running a peer panicked")?
}

fn run_with_deadline(mut cmd: Command, deadline: Duration) -> anyhow::Result<Output> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    // Its own process group, so a deadline kills the worker processes it started too.
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {program}"))?;
    // Both pipes are drained concurrently, so a chatty child never blocks on a full one.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            bail!(
                "{program} still running after {} s, killed; stderr ends:\n{}",
                deadline.as_secs(),
                tail(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The last lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_last_line() {
        let (jobs, seconds) =
            parse_result("installing\n{\"jobs\": 20000, \"seconds\": 1.25}\n\n").unwrap();
        assert_eq!(jobs, 20_000);
        assert_eq!(seconds, 1.25);
        assert!(parse_result("{\"jobs\": 1, \"seconds\": 0}").is_err());
        assert!(parse_result("").is_err());
    }

    #[test]
    fn tails_long_output() {
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = tail(&text);
        assert!(tail.starts_with("line 80\n") && tail.ends_with("line 99"));
    }

    #[test]
    fn captures_output_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let out = run_with_deadline(cmd, Duration::from_secs(10)).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );
    }

    #[test]
    fn kills_the_whole_group_past_the_deadline() {
        let mut cmd = Command::new("sh");
        // The grandchild holds the pipes open: only a group kill ends the read.
        cmd.args(["-c", "echo starting >&2; sleep 30 & wait"]);
        let started = Instant::now();
        let err = run_with_deadline(cmd, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10));
        let text = format!("{err:#}");
        assert!(
            text.contains("killed") && text.contains("starting"),
            "{text}"
        );
    }

    /// Installs and runs both peers on a throwaway cluster:
    /// `cargo test --release -p agentrun-bench peers -- --ignored --nocapture`
    /// (`PEER_JOBS` sets the job count, 20,000 by default).
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "installs Node, graphile-worker and pgqueuer; takes a minute"]
    async fn both_peers_drain_their_jobs() {
        let jobs = std::env::var("PEER_JOBS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(20_000);
        let cluster = Cluster::start().unwrap();
        let figures = run(&cluster, jobs).await.unwrap();
        for figure in &figures {
            println!("{} = {:.0} {}", figure.name, figure.value, figure.unit);
        }
        let names: Vec<_> = figures.iter().map(|f| f.name).collect();
        assert_eq!(
            names,
            [
                "peer.graphile_worker.jobs_per_s",
                "peer.pgqueuer.jobs_per_s"
            ]
        );
        assert!(figures.iter().all(|f| f.value > 0.0));
    }
}
