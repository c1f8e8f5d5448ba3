//! Scenario, leases: what held runs cost while they run. Every heartbeat renews the
//! lease of each run its runner holds, so a fleet busy with long agent runs writes to
//! the database in proportion to its active runs and the time they run, not to its work.
//!
//! The bench plays the runners, as in the fleet scenario: each simulated runner takes
//! one run (a queue only they serve), never finishes it while measured, and heartbeats
//! its lease at the interval the welcome names. Over a window, per lease renewed: the
//! CPU of PostgreSQL and of the manager, and the write-ahead log written (an index
//! entry written per renewal shows there first). Then every runner finishes its run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{
    self, CreateRunRequest, FinishRunRequest, RunStatus, manager_message::Body as In,
    runner_message::Body as Out,
};
use anyhow::{Context, bail};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cpu::StackCpu;
use crate::dispatch;
use crate::fleet;
use crate::report::Figure;
use crate::stack::Stack;
use crate::statements;

/// The held runs' queue, which only the simulated runners serve.
const QUEUE: &str = "bench-leases";

#[derive(Default)]
struct Tally {
    /// Runners holding their run.
    holding: AtomicUsize,
    /// Leases the manager answered as held, and as lost.
    renewed: AtomicU64,
    lost: AtomicU64,
    /// The interval welcomes name, in milliseconds.
    interval_ms: AtomicU64,
}

/// Creates `runs` runs, lets as many simulated runners (`per_connection` streams on each
/// HTTP/2 connection) take one each, and measures their heartbeats over `window`.
pub async fn run(
    stack: &Stack,
    db: &tokio_postgres::Client,
    runs: usize,
    per_connection: usize,
    window: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let mut client = RunServiceClient::new(stack.channel().await?);
    let request = CreateRunRequest {
        backend_profile: "scripted".into(),
        queue: QUEUE.into(),
        input_json: r#"{"prompt": "held"}"#.into(),
        ..Default::default()
    };
    dispatch::create(&mut client, &request, runs).await?;

    let tally = Arc::new(Tally::default());
    let (finish, finishing) = watch::channel(false);
    let mut runners = JoinSet::new();
    let mut channel = None;
    for index in 0..runs {
        if index % per_connection.max(1) == 0 {
            channel = Some(stack.channel().await?);
        }
        let channel = channel.clone().context("a channel per connection")?;
        let (tally, finishing) = (tally.clone(), finishing.clone());
        runners.spawn(async move { holder(channel, index, &tally, finishing).await });
    }
    let start = Instant::now();
    while tally.holding.load(Ordering::Relaxed) < runs {
        if let Some(ended) = runners.try_join_next() {
            ended?.context("a simulated runner failed")?;
            bail!("a simulated runner ended before the window");
        }
        if start.elapsed() > timeout {
            bail!(
                "leases: {} of {runs} runs held after {timeout:?}",
                tally.holding.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let interval = Duration::from_millis(tally.interval_ms.load(Ordering::Relaxed));
    eprintln!(
        "leases: {runs} runs held in {:.1} s; heartbeat every {interval:?}; measuring for {window:?}",
        start.elapsed().as_secs_f64()
    );
    // Every runner heartbeats with its lease within one interval of taking its run.
    tokio::time::sleep(interval).await;

    let counting = statements::reset(db).await;
    let cpu = StackCpu::start(stack, db).await?;
    let (renewed_before, wal_before) =
        (tally.renewed.load(Ordering::Relaxed), wal_bytes(db).await?);
    let window_start = Instant::now();
    tokio::time::sleep(window).await;
    let (renewed, wal) = (
        tally.renewed.load(Ordering::Relaxed) - renewed_before,
        wal_bytes(db).await? - wal_before,
    );
    let window_secs = window_start.elapsed().as_secs_f64();
    let used = cpu.used();
    let lost = tally.lost.load(Ordering::Relaxed);
    if counting {
        statements::report(db, "leases", renewed as f64, "renewal").await?;
    }

    finish.send_replace(true);
    while let Some(ended) = runners.join_next().await {
        ended?.context("a simulated runner failed")?;
    }
    let unfinished: i64 = db
        .query_one(
            "SELECT count(*) FROM runs WHERE queue = $1 AND status <> 'completed'",
            &[&QUEUE],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        unfinished == 0,
        "leases: {unfinished} held runs did not complete"
    );

    let per_renewal = |value: f64| value / (renewed as f64).max(1.0);
    let mut figures = vec![
        Figure::new("leases", "leases.held_runs", runs as f64, "runs"),
        Figure::new(
            "leases",
            "leases.renewals_per_s",
            renewed as f64 / window_secs,
            "renewals/s",
        ),
        Figure::new("leases", "leases.lost", lost as f64, "leases").at_most(0.0),
        Figure::new(
            "leases",
            "leases.wal_bytes_per_renewal",
            per_renewal(wal),
            "bytes",
        ),
        Figure::new(
            "leases",
            "leases.manager_cpu_us_per_renewal",
            per_renewal(used.manager * 1e6),
            "µs",
        ),
    ];
    if let Some(postgres) = used.postgres {
        figures.push(Figure::new(
            "leases",
            "leases.postgres_cpu_us_per_renewal",
            per_renewal(postgres * 1e6),
            "µs",
        ));
    }
    Ok(figures)
}

/// Bytes of write-ahead log the server has written so far.
async fn wal_bytes(db: &tokio_postgres::Client) -> anyhow::Result<f64> {
    Ok(db
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::float8", &[])
        .await
        .context("read the WAL position")?
        .get(0))
}

/// One simulated runner: takes one run, heartbeats its lease until `finish` says so, then
/// finishes the run and waits for the manager to acknowledge it.
async fn holder(
    channel: tonic::transport::Channel,
    index: usize,
    tally: &Tally,
    mut finish: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (runner_id, tx, mut inbound, welcome) =
        fleet::hello(channel, format!("leases-{index}"), QUEUE, 1).await?;
    let every = Duration::from_millis(welcome.heartbeat_interval_ms.max(100) as u64);
    tally
        .interval_ms
        .store(every.as_millis() as u64, Ordering::Relaxed);
    let lease = loop {
        match inbound.message().await.context("read from the manager")? {
            Some(proto::ManagerMessage {
                body: Some(In::Assignment(assignment)),
            }) => {
                let run = assignment.run.context("an assignment without its run")?;
                break proto::LeaseRef {
                    run_id: run.run_id,
                    epoch: assignment.epoch,
                };
            }
            Some(_) => {}
            None => bail!("the manager ended the stream before an assignment"),
        }
    };
    tally.holding.fetch_add(1, Ordering::Relaxed);
    // Spread over the interval, so the heartbeats arrive evenly, not in waves.
    let first = every.mul_f64((index % 997) as f64 / 997.0);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    loop {
        tokio::select! {
            // The only change there is: the window is over.
            _ = finish.changed() => break,
            message = inbound.message() => match message.context("read from the manager")? {
                Some(proto::ManagerMessage { body: Some(In::Heartbeat(beat)) }) => {
                    for held in beat.leases {
                        let counter = if held.held { &tally.renewed } else { &tally.lost };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(_) => {}
                None => bail!("the manager ended the stream"),
            },
            _ = ticker.tick() => {
                tx.send(fleet::message(Out::Heartbeat(proto::HeartbeatRequest {
                    runner_id: runner_id.clone(),
                    leases: vec![lease.clone()],
                })))
                .await?;
            }
        }
    }
    tx.send(fleet::message(Out::Finish(FinishRunRequest {
        runner_id: runner_id.clone(),
        run_id: lease.run_id,
        epoch: lease.epoch,
        status: RunStatus::Completed as i32,
        ..Default::default()
    })))
    .await?;
    loop {
        match inbound.message().await.context("read from the manager")? {
            Some(proto::ManagerMessage {
                body: Some(In::FinishAck(_)),
            }) => return Ok(()),
            Some(proto::ManagerMessage {
                body: Some(In::Error(error)),
            }) => bail!(
                "the manager refused the finish: {} {}",
                error.code,
                error.message
            ),
            Some(_) => {}
            None => bail!("the manager ended the stream before acknowledging the finish"),
        }
    }
}
