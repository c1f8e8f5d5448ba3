//! Scenario 3, fleet: thousands of connected runners on one manager. The bench process
//! itself plays them: each simulated runner opens a `RunnerService.Connect` stream, says
//! hello (a queue nobody creates runs in, so it never gets work), gives one slot of
//! credit, then heartbeats at the interval the welcome names and reads whatever the
//! manager sends. Streams share HTTP/2 connections, a few runners each (a real runner
//! process has its own): not too many, because h2 on the manager's side counts the small
//! DATA frames it has buffered per connection and not yet handed to the stream's reader,
//! and a manager that falls behind reading 100 heartbeating streams on one connection
//! gets that connection closed as a flood (GOAWAY `too_many_data_frames`).
//!
//! Once every runner is welcomed (and a heartbeat interval has passed, so all are in
//! their steady rhythm), the manager process's memory and CPU are read from `/proc` over
//! a window: what an idle fleet costs it, in total and per heartbeat.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentrun_shared::proto::{
    self, manager_message::Body as In, runner_message::Body as Out,
    runner_service_client::RunnerServiceClient,
};
use anyhow::{Context, bail};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::cpu::{CpuUsed, StackCpu};
use crate::report::Figure;
use crate::stack::Stack;

/// Hellos awaiting their welcome at once: the fleet ramps up instead of arriving as
/// one wave of hello transactions.
const HELLOS_IN_FLIGHT: usize = 100;
/// A queue no scenario creates runs in.
const IDLE_QUEUE: &str = "bench-fleet-idle";

/// What the simulated runners have seen, summed over all of them.
#[derive(Default)]
struct Tally {
    welcomed: AtomicUsize,
    /// Hellos that failed (no welcome).
    refused: AtomicUsize,
    /// Welcomed streams that ended.
    dropped: AtomicUsize,
    heartbeats_answered: AtomicU64,
    /// The interval welcomes name, in milliseconds.
    heartbeat_interval_ms: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn count_failure(&self, counter: &AtomicUsize, err: &anyhow::Error) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .expect("tally lock")
            .get_or_insert_with(|| format!("{err:#}"));
    }

    fn load(&self) -> (usize, usize, usize) {
        (
            self.welcomed.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }

    fn first_error(&self) -> String {
        let error = self.first_error.lock().expect("tally lock");
        error.clone().unwrap_or_else(|| "none".into())
    }
}

/// Connects `runners` simulated runners to the stack's manager, `per_connection` streams
/// on each HTTP/2 connection, waits until all are welcomed, and measures the manager over
/// `window`.
///
/// `strict` (smoke runs): a hello that fails, a stream that drops, a ramp that does
/// not finish in time or no heartbeat answered is an error. Otherwise the ramp stops at its deadline, the runners
/// connected by then are measured, and the figures say how many were.
pub async fn run(
    stack: &Stack,
    db: &tokio_postgres::Client,
    runners: usize,
    per_connection: usize,
    window: Duration,
    strict: bool,
) -> anyhow::Result<Vec<Figure>> {
    let pid = stack.manager_pid();
    let rss_idle = rss_mib(pid)?;
    let tally = Arc::new(Tally::default());
    let hellos = Arc::new(Semaphore::new(HELLOS_IN_FLIGHT));
    let mut fleet = JoinSet::new();
    let start = Instant::now();
    let mut channel = None;
    for index in 0..runners {
        if index % per_connection.max(1) == 0 {
            channel = Some(stack.channel().await?);
        }
        let channel = channel.clone().context("a channel per connection")?;
        let (tally, hellos) = (tally.clone(), hellos.clone());
        fleet.spawn(async move { simulated_runner(channel, index, &hellos, &tally).await });
    }

    // Generous, since hellos queue behind the sessions already connected on a busy
    // machine, but bounded: a manager that cannot take the fleet is measured as it is.
    let deadline = start + Duration::from_secs(30) + Duration::from_millis(10 * runners as u64);
    let failure = |what: &str| {
        let (welcomed, refused, dropped) = tally.load();
        let manager = if alive(pid) { "running" } else { "gone" };
        anyhow::anyhow!(
            "fleet: {what}: {welcomed} of {runners} runners welcomed, {refused} hellos failed, {dropped} streams dropped after {:.0?} (manager process {manager}); first error: {}",
            start.elapsed(),
            tally.first_error()
        )
    };
    loop {
        let (welcomed, refused, dropped) = tally.load();
        if welcomed + refused >= runners {
            break;
        }
        if strict && refused + dropped > 0 {
            return Err(failure("streams failed"));
        }
        if Instant::now() > deadline {
            if strict {
                return Err(failure("the ramp did not finish"));
            }
            eprintln!(
                "fleet: ramp stopped at its deadline with {welcomed} of {runners} runners welcomed"
            );
            // Runners still waiting for their turn give up; hellos in flight finish.
            hellos.close();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = start.elapsed().as_secs_f64();
    let (welcomed, _, _) = tally.load();
    if welcomed == 0 {
        return Err(failure("no runner connected"));
    }
    let interval_ms = tally.heartbeat_interval_ms.load(Ordering::Relaxed);
    eprintln!(
        "fleet: {welcomed} runners connected in {connect_secs:.1} s; heartbeat every {interval_ms} ms; measuring for {window:?}"
    );
    // Every runner sends its first heartbeat within one interval of its welcome.
    tokio::time::sleep(Duration::from_millis(interval_ms)).await;

    let cpu = StackCpu::start(stack, db).await?;
    let answered_before = tally.heartbeats_answered.load(Ordering::Relaxed);
    let window_start = Instant::now();
    tokio::time::sleep(window).await;
    let window_secs = window_start.elapsed().as_secs_f64();
    let answered = tally.heartbeats_answered.load(Ordering::Relaxed) - answered_before;
    let CpuUsed {
        manager: cpu_secs,
        bench: own_cpu_secs,
        postgres: postgres_cpu_secs,
        ..
    } = cpu.used();
    let rss = rss_mib(pid)?;
    let (welcomed, refused, dropped) = tally.load();
    if strict && refused + dropped > 0 {
        return Err(failure("streams failed"));
    }
    if strict && answered == 0 {
        return Err(failure("no heartbeat was answered"));
    }
    fleet.shutdown().await;
    if refused + dropped > 0 {
        eprintln!("fleet: first stream error: {}", tally.first_error());
    }

    let connected = welcomed - dropped;
    Ok(vec![
        Figure::new(
            "fleet",
            "fleet.runners_connected",
            connected as f64,
            "runners",
        )
        .at_least(runners as f64),
        Figure::new(
            "fleet",
            "fleet.streams_failed",
            (refused + dropped) as f64,
            "streams",
        )
        .at_most(0.0),
        Figure::new("fleet", "fleet.connect_seconds", connect_secs, "s"),
        Figure::new("fleet", "fleet.manager_rss_mib", rss, "MiB").at_most(1024.0),
        Figure::new(
            "fleet",
            "fleet.manager_rss_mib (before the fleet)",
            rss_idle,
            "MiB",
        ),
        Figure::new(
            "fleet",
            "fleet.manager_cpu_percent",
            100.0 * cpu_secs / window_secs,
            "% of a core",
        ),
        Figure::new(
            "fleet",
            "fleet.heartbeats_per_s",
            answered as f64 / window_secs,
            "heartbeats/s",
        ),
        Figure::new(
            "fleet",
            "fleet.heartbeats_per_s (sent on schedule)",
            connected as f64 * 1000.0 / interval_ms.max(1) as f64,
            "heartbeats/s",
        ),
        Figure::new(
            "fleet",
            "fleet.cpu_us_per_heartbeat",
            if answered > 0 {
                cpu_secs * 1e6 / answered as f64
            } else {
                f64::NAN
            },
            "µs",
        ),
        Figure::new(
            "fleet",
            "fleet.postgres_cpu_percent",
            // NaN (no figure) when the server is not on this machine.
            postgres_cpu_secs.map_or(f64::NAN, |secs| 100.0 * secs / window_secs),
            "% of a core",
        ),
        Figure::new(
            "fleet",
            "fleet.simulator_cpu_percent",
            100.0 * own_cpu_secs / window_secs,
            "% of a core",
        ),
    ])
}

/// The stream of a welcomed runner: its id, its outgoing queue, what the manager sends,
/// and the welcome.
pub type Connected = (
    String,
    mpsc::Sender<proto::RunnerMessage>,
    tonic::Streaming<proto::ManagerMessage>,
    proto::Welcome,
);

/// One simulated runner: waits for its turn to say hello, then heartbeats until the
/// task is aborted or the stream fails; counts what happened in `tally`.
async fn simulated_runner(channel: Channel, index: usize, hellos: &Semaphore, tally: &Tally) {
    let Ok(permit) = hellos.acquire().await else {
        // The ramp is over: this runner never connects.
        return;
    };
    let connected = hello(channel, format!("fleet-{index}"), IDLE_QUEUE, 1).await;
    drop(permit);
    let (runner_id, tx, inbound, welcome) = match connected {
        Ok(connected) => connected,
        Err(err) => return tally.count_failure(&tally.refused, &err),
    };
    tally.welcomed.fetch_add(1, Ordering::Relaxed);
    let every = Duration::from_millis(welcome.heartbeat_interval_ms.max(100) as u64);
    tally
        .heartbeat_interval_ms
        .store(every.as_millis() as u64, Ordering::Relaxed);
    // Spread over the interval, so the fleet's heartbeats arrive evenly, not in waves.
    let first = every.mul_f64((index % 997) as f64 / 997.0);
    let err = heartbeat(runner_id, tx, inbound, first, every, tally).await;
    tally.count_failure(&tally.dropped, &err);
}

/// A runner message with `body`.
pub fn message(body: Out) -> proto::RunnerMessage {
    proto::RunnerMessage { body: Some(body) }
}

/// Opens a stream as a runner named `name` serving only `queue` (scripted runs) with
/// `slots` slots, says hello, reads the welcome and gives credit for every slot.
pub async fn hello(
    channel: Channel,
    name: String,
    queue: &str,
    slots: i32,
) -> anyhow::Result<Connected> {
    let (runner_id, tx, inbound, welcome) = welcomed(channel, name, queue, slots).await?;
    tx.send(message(Out::Credit(proto::Credit { slots })))
        .await?;
    Ok((runner_id, tx, inbound, welcome))
}

/// [`hello`] without the credit: the runner is registered and welcomed, and asks for
/// nothing yet.
pub async fn welcomed(
    channel: Channel,
    name: String,
    queue: &str,
    slots: i32,
) -> anyhow::Result<Connected> {
    let runner_id = Uuid::new_v4().to_string();
    let (tx, rx) = mpsc::channel(64);
    tx.send(message(Out::Hello(proto::Hello {
        runner: Some(proto::RunnerIdentity {
            runner_id: runner_id.clone(),
            name,
            labels: vec![],
            backend_profiles: vec!["scripted".into()],
            queues: vec![queue.into()],
            max_concurrency: slots,
            version: "bench".into(),
        }),
        held_leases: vec![],
    })))
    .await?;
    let mut client = RunnerServiceClient::new(channel);
    let mut inbound = client
        .connect(ReceiverStream::new(rx))
        .await
        .context("Connect")?
        .into_inner();
    let welcome = match inbound.message().await.context("read the welcome")? {
        Some(proto::ManagerMessage {
            body: Some(In::Welcome(welcome)),
        }) => welcome,
        other => bail!("expected welcome, got {other:?}"),
    };
    Ok((runner_id, tx, inbound, welcome))
}

/// Heartbeats every `every` (the first after `first`) and reads what the manager sends,
/// counting heartbeat responses, until the stream fails; returns why.
async fn heartbeat(
    runner_id: String,
    tx: mpsc::Sender<proto::RunnerMessage>,
    mut inbound: tonic::Streaming<proto::ManagerMessage>,
    first: Duration,
    every: Duration,
    tally: &Tally,
) -> anyhow::Error {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(proto::ManagerMessage { body: Some(In::Heartbeat(_)) })) => {
                    tally.heartbeats_answered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) => return anyhow::anyhow!("the manager ended the stream"),
                Err(status) => return anyhow::Error::new(status).context("read from the manager"),
            },
            _ = ticker.tick() => {
                let beat = message(Out::Heartbeat(proto::HeartbeatRequest {
                    runner_id: runner_id.clone(),
                    leases: vec![],
                }));
                if tx.send(beat).await.is_err() {
                    return anyhow::anyhow!("the request stream closed");
                }
            }
        }
    }
}

/// Process `pid` exists and has not exited (an unreaped child that exited is a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// Resident memory of process `pid` (VmRSS), in MiB.
pub(crate) fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")?;
    Ok(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::rss_mib;

    #[test]
    fn reads_its_own_memory() {
        assert!(rss_mib(std::process::id()).unwrap() > 0.0);
    }
}
