//! Scenario 1, dispatch: bulk-create N runs that the scripted provider finishes at once,
//! and measure runs per second from the first create to the last run terminal. Then, at
//! about half that rate, create runs at a steady pace (open loop: the schedule does not
//! wait for slow calls) and measure how long a run waits to be assigned when the system
//! is not saturated, as the bench's own light runners see it. Last, the peers' own
//! measure: runs created before the clock starts, drained by runners started after.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{
    CreateRunRequest, CreateRunsRequest, Credit, FinishRunRequest, HeartbeatRequest,
    ManagerMessage, RunStatus, manager_message::Body as In, runner_message::Body as Out,
};
use anyhow::{Context, bail};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::cpu::StackCpu;
use crate::fleet;
use crate::report::{Figure, percentile};
use crate::stack::Stack;
use crate::statements;

/// CreateRuns accepts at most this many runs per call.
const BATCH: usize = 1_000;
/// How often the terminal count is polled.
const POLL: Duration = Duration::from_millis(50);
const TERMINAL: &str = "SELECT count(*) FROM runs
    WHERE status IN ('completed', 'failed', 'cancelled', 'blocked', 'expired')";
/// Whether any run is not terminal yet: probes of the partial indexes of pending
/// (claimable, held) and active runs, so polling costs the database next to nothing
/// (counting the terminal runs scans the table, a tenth of the database time of a
/// full-load run).
const UNFINISHED: &str =
    "SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'pending' AND held IS NULL)
    OR EXISTS (SELECT 1 FROM runs WHERE status = 'pending' AND held IS NOT NULL)
    OR EXISTS (SELECT 1 FROM runs WHERE status IN ('claimed', 'running', 'waiting'))";

/// How often the paced scenario creates its next small batch.
const PACE: Duration = Duration::from_millis(20);
/// The paced runs' queue, which only the light runners serve.
const PACED_QUEUE: &str = "bench-paced";
/// Light runners serving the paced runs, as many as runner processes by default.
const PACED_RUNNERS: usize = 2;
const PACED_SLOTS: i32 = 64;
/// The drained runs' queue, which only the runners started for the drain serve.
const DRAIN_QUEUE: &str = "bench-drain";

fn one_token_run() -> CreateRunRequest {
    CreateRunRequest {
        backend_profile: "scripted".into(),
        input_json: serde_json::json!({ "prompt": "[tokens:1] x" }).to_string(),
        ..Default::default()
    }
}

/// Creates `runs` runs in batches of [`BATCH`], each a copy of `request`.
pub async fn create(
    client: &mut RunServiceClient<Channel>,
    request: &CreateRunRequest,
    runs: usize,
) -> anyhow::Result<()> {
    let mut created = 0;
    while created < runs {
        let n = BATCH.min(runs - created);
        client
            .create_runs(CreateRunsRequest {
                runs: vec![request.clone(); n],
            })
            .await
            .context("CreateRuns")?;
        created += n;
    }
    Ok(())
}

/// Creates `runs` runs and waits until all are terminal; gives up after `timeout`.
pub async fn run(
    stack: &Stack,
    db: &tokio_postgres::Client,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let channel = stack.channel().await?;
    let baseline: i64 = db.query_one(TERMINAL, &[]).await?.get(0);
    let idle_before = !db.query_one(UNFINISHED, &[]).await?.get::<_, bool>(0);
    let mut client = RunServiceClient::new(channel);
    let request = one_token_run();
    let counting = statements::reset(db).await;
    let cpu = StackCpu::start(stack, db).await?;

    let start = Instant::now();
    create(&mut client, &request, runs).await?;
    let create_secs = start.elapsed().as_secs_f64();

    let target = baseline + i64::try_from(runs)?;
    loop {
        // With the stack idle before, the cheap probe says when counting is worth it.
        let may_be_done = !idle_before || !db.query_one(UNFINISHED, &[]).await?.get::<_, bool>(0);
        if may_be_done || start.elapsed() > timeout {
            let done: i64 = db.query_one(TERMINAL, &[]).await?.get(0);
            if done >= target {
                break;
            }
            if start.elapsed() > timeout {
                bail!(
                    "dispatch: only {} of {runs} runs terminal after {timeout:?}",
                    done - baseline
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
    let total_secs = start.elapsed().as_secs_f64();
    let cpu_used = cpu.used();
    let db_ms_per_run = match counting {
        true => statements::report(db, "dispatch", runs as f64, "run").await?,
        false => None,
    };
    let failed: i64 = db
        .query_one("SELECT count(*) FROM runs WHERE status <> 'completed'", &[])
        .await?
        .get(0);
    let mut to_claimed = phase_ms(db, "run.created", "run.claimed").await?;
    let mut to_terminal = phase_ms(db, "run.claimed", "run.terminal").await?;
    to_claimed.sort_by(f64::total_cmp);
    to_terminal.sort_by(f64::total_cmp);

    let mut figures = vec![
        Figure::new(
            "dispatch",
            "dispatch.runs_per_s",
            runs as f64 / total_secs,
            "runs/s",
        )
        .against("limit.model_dispatches_per_s")
        .against("limit.batched_dispatches_per_s")
        .against("limit.dispatches_per_s")
        .peers(&[
            "peer.graphile_worker.jobs_per_s",
            "peer.pgqueuer.jobs_per_s",
        ]),
        Figure::new(
            "dispatch",
            "dispatch.create_runs_per_s",
            runs as f64 / create_secs,
            "runs/s",
        ),
        Figure::new("dispatch", "dispatch.runs", runs as f64, "runs"),
        Figure::new("dispatch", "dispatch.not_completed", failed as f64, "runs"),
        Figure::new("dispatch", "dispatch.seconds", total_secs, "s"),
        Figure::new(
            "dispatch",
            "dispatch.created_to_claimed_p50 (full load)",
            percentile(&to_claimed, 50.0),
            "ms",
        ),
        Figure::new(
            "dispatch",
            "dispatch.created_to_claimed_p99 (full load)",
            percentile(&to_claimed, 99.0),
            "ms",
        ),
        Figure::new(
            "dispatch",
            "dispatch.claimed_to_terminal_p50 (full load)",
            percentile(&to_terminal, 50.0),
            "ms",
        ),
        Figure::new(
            "dispatch",
            "dispatch.claimed_to_terminal_p99 (full load)",
            percentile(&to_terminal, 99.0),
            "ms",
        ),
    ];
    // Where the machine's time went, per run.
    figures.extend(cpu_used.per_unit(
        "dispatch",
        [
            "dispatch.cpu_us_per_run.manager",
            "dispatch.cpu_us_per_run.runners",
            "dispatch.cpu_us_per_run.bench",
            "dispatch.cpu_us_per_run.postgres",
            "dispatch.cpu_us_per_run (all)",
        ],
        runs as f64,
    ));
    figures.push(Figure::new(
        "dispatch",
        "dispatch.machine_busy_percent",
        cpu_used.machine_busy_percent,
        "%",
    ));
    if let Some(ms) = db_ms_per_run {
        // Summed over every backend: more than the wall time per run when they overlap.
        figures.push(Figure::new(
            "dispatch",
            "dispatch.db_exec_ms_per_run",
            ms,
            "ms",
        ));
    }
    Ok(figures)
}

/// The peers' measure, for a like-for-like ratio: they insert their jobs before their
/// clock starts and time only the draining. So here: `runs` runs are created in a queue
/// no runner serves, then `runners` runner processes serving only it are started, and
/// the rate is the runs over the span from the first claim to the last run ended, on
/// the database's clock (`runs.claimed_at`, `runs.finished_at`). The CPU figures count
/// from the runners' start (their start-up included) to the last run ended. The drain
/// runners are killed afterwards; they hold nothing by then.
pub async fn drain(
    stack: &mut Stack,
    db: &tokio_postgres::Client,
    runs: usize,
    runners: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let request = CreateRunRequest {
        queue: DRAIN_QUEUE.into(),
        ..one_token_run()
    };
    create(
        &mut RunServiceClient::new(stack.channel().await?),
        &request,
        runs,
    )
    .await?;

    let spawned: Vec<usize> = (0..runners)
        .map(|i| stack.spawn_runner(&format!("drain-{i}"), &[("AGENTRUN_QUEUES", DRAIN_QUEUE)]))
        .collect::<anyhow::Result<_>>()?;
    let counting = statements::reset(db).await;
    let cpu = StackCpu::start(stack, db).await?;
    let start = Instant::now();
    // The caller runs it when nothing else is open (the phases before it ended all their
    // runs), so the cheap probe of the open runs' indexes says when the drain is over.
    loop {
        let open: bool = db.query_one(UNFINISHED, &[]).await?.get(0);
        if !open {
            break;
        }
        if start.elapsed() > timeout {
            bail!("drain: runs still open after {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
    let cpu_used = cpu.used();
    if counting {
        statements::report(db, "dispatch (drain)", runs as f64, "run").await?;
    }
    for index in spawned {
        stack.kill_runner(index)?;
    }
    let span = db
        .query_one(
            "SELECT count(*) FILTER (WHERE status <> 'completed'),
                    extract(epoch FROM max(finished_at) - min(claimed_at))::float8
             FROM runs WHERE queue = $1",
            &[&DRAIN_QUEUE],
        )
        .await
        .context("read the drain's span")?;
    let (not_completed, secs): (i64, f64) = (span.get(0), span.get(1));

    let mut figures = vec![
        Figure::new(
            "dispatch",
            "dispatch.drain_runs_per_s (created before the clock, as the peers)",
            runs as f64 / secs,
            "runs/s",
        )
        .against("limit.model_dispatches_per_s")
        .peers(&[
            "peer.graphile_worker.jobs_per_s",
            "peer.pgqueuer.jobs_per_s",
        ]),
        Figure::new(
            "dispatch",
            "dispatch.drain_not_completed",
            not_completed as f64,
            "runs",
        ),
    ];
    figures.extend(cpu_used.per_unit(
        "dispatch",
        [
            "dispatch.drain_cpu_us_per_run.manager",
            "dispatch.drain_cpu_us_per_run.runners",
            "dispatch.drain_cpu_us_per_run.bench",
            "dispatch.drain_cpu_us_per_run.postgres",
            "dispatch.drain_cpu_us_per_run (all)",
        ],
        runs as f64,
    ));
    Ok(figures)
}

/// Per run, milliseconds between its first `from` event and its last `to` event.
async fn phase_ms(db: &tokio_postgres::Client, from: &str, to: &str) -> anyhow::Result<Vec<f64>> {
    let rows = db
        .query(
            "SELECT (extract(epoch FROM max(e.created_at) FILTER (WHERE e.type = $2)
                                    - min(e.created_at) FILTER (WHERE e.type = $1)) * 1000)::float8
             FROM events e WHERE e.type IN ($1, $2)
             GROUP BY e.run_id
             HAVING count(*) FILTER (WHERE e.type = $1) > 0 AND count(*) FILTER (WHERE e.type = $2) > 0",
            &[&from, &to],
        )
        .await
        .context("read run phase times")?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Creates runs at `rate` per second for `seconds` (a small batch every [`PACE`], each
/// call on its own task so a slow call does not hold back the schedule) in a queue that
/// only [`PACED_RUNNERS`] light runners in this process serve: they note when each
/// assignment arrives and finish the run at once. Reports create-to-assigned latency
/// on one clock, from the CreateRuns response to the assignment (zero when the
/// assignment came first), and the same span as the database saw it: the run's
/// `run.created` to its first `run.claimed` (the start of the creating and of the
/// claiming transaction).
pub async fn paced(
    channel: Channel,
    db: &tokio_postgres::Client,
    rate: f64,
    seconds: f64,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    anyhow::ensure!(
        rate > 0.0,
        "paced dispatch needs a positive rate, got {rate}"
    );
    let total = ((rate * seconds).round() as usize).max(1);
    let (assigned_tx, mut assigned_rx) = mpsc::unbounded_channel();
    let mut runners = JoinSet::new();
    for i in 0..PACED_RUNNERS {
        let connected = fleet::hello(
            channel.clone(),
            format!("paced-{i}"),
            PACED_QUEUE,
            PACED_SLOTS,
        )
        .await?;
        runners.spawn(light_runner(connected, assigned_tx.clone()));
    }
    drop(assigned_tx);

    let client = RunServiceClient::new(channel);
    let request = CreateRunRequest {
        queue: PACED_QUEUE.into(),
        ..one_token_run()
    };
    let mut calls = JoinSet::new();
    let mut ticker = tokio::time::interval(PACE);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        ticker.tick().await;
        // What the schedule owes by now, so a late tick catches up instead of slipping.
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(total);
        if due > sent {
            let mut client = client.clone();
            let batch = CreateRunsRequest {
                runs: vec![request.clone(); due - sent],
            };
            calls.spawn(async move {
                let created = client.create_runs(batch).await;
                (Instant::now(), created)
            });
            sent = due;
        }
    }
    let offered_secs = start.elapsed().as_secs_f64();
    let mut returned = HashMap::with_capacity(total);
    while let Some(call) = calls.join_next().await {
        let (at, created) = call?;
        for run in created.context("CreateRuns")?.into_inner().runs {
            if let Some(run) = run.run {
                returned.insert(run.run_id, at);
            }
        }
    }

    let deadline = tokio::time::Instant::from_std(start + timeout);
    let mut assigned = HashMap::with_capacity(total);
    while returned.keys().any(|id| !assigned.contains_key(id)) {
        tokio::select! {
            Some((run_id, at)) = assigned_rx.recv() => {
                assigned.insert(run_id, at);
            }
            Some(ended) = runners.join_next() => {
                ended?.context("a light runner failed")?;
            }
            _ = tokio::time::sleep_until(deadline) => bail!(
                "paced dispatch: {} of {} runs assigned after {timeout:?}",
                assigned.len(),
                returned.len()
            ),
        }
    }
    let mut client_ms: Vec<f64> = returned
        .iter()
        .filter_map(|(id, created)| {
            let at: &Instant = assigned.get(id)?;
            Some(at.saturating_duration_since(*created).as_secs_f64() * 1e3)
        })
        .collect();
    client_ms.sort_by(f64::total_cmp);

    let ids: Vec<Uuid> = returned
        .keys()
        .map(|id| id.parse())
        .collect::<Result<_, _>>()?;
    loop {
        let done: i64 = db
            .query_one(
                "SELECT count(*) FROM runs WHERE id = ANY($1)
                 AND status IN ('completed', 'failed', 'cancelled', 'blocked', 'expired')",
                &[&ids],
            )
            .await?
            .get(0);
        if done as usize >= ids.len() {
            break;
        }
        if start.elapsed() > timeout {
            bail!(
                "paced dispatch: only {done} of {} runs terminal after {timeout:?}",
                ids.len()
            );
        }
        tokio::time::sleep(POLL).await;
    }
    runners.shutdown().await;
    let rows = db
        .query(
            "SELECT (extract(epoch FROM min(created_at) FILTER (WHERE type = 'run.claimed')
                                    - min(created_at) FILTER (WHERE type = 'run.created')) * 1000)::float8
             FROM events WHERE run_id = ANY($1) AND type IN ('run.created', 'run.claimed')
             GROUP BY run_id
             HAVING count(*) FILTER (WHERE type = 'run.claimed') > 0",
            &[&ids],
        )
        .await
        .context("read create-to-claim times")?;
    let mut db_ms: Vec<f64> = rows.iter().map(|r| r.get(0)).collect();
    db_ms.sort_by(f64::total_cmp);

    Ok(vec![
        Figure::new(
            "dispatch",
            "dispatch.paced_runs_per_s (offered, half rate)",
            ids.len() as f64 / offered_secs,
            "runs/s",
        ),
        Figure::new(
            "dispatch",
            "dispatch.create_to_assigned_p50",
            percentile(&client_ms, 50.0),
            "ms",
        )
        .at_most(5.0),
        Figure::new(
            "dispatch",
            "dispatch.create_to_assigned_p99",
            percentile(&client_ms, 99.0),
            "ms",
        )
        .at_most(20.0),
        Figure::new(
            "dispatch",
            "dispatch.created_to_claimed_p50 (half rate, database clock)",
            percentile(&db_ms, 50.0),
            "ms",
        ),
        Figure::new(
            "dispatch",
            "dispatch.created_to_claimed_p99 (half rate, database clock)",
            percentile(&db_ms, 99.0),
            "ms",
        ),
    ])
}

/// A runner that does no work: notes when each assignment arrives (in `assigned`),
/// finishes the run at once, and gives the slot back when the finish is acknowledged.
async fn light_runner(
    (runner_id, tx, mut inbound, welcome): fleet::Connected,
    assigned: mpsc::UnboundedSender<(String, Instant)>,
) -> anyhow::Result<()> {
    let every = Duration::from_millis(welcome.heartbeat_interval_ms.max(100) as u64);
    let mut heartbeat = tokio::time::interval(every);
    loop {
        tokio::select! {
            received = inbound.message() => match received.context("read from the manager")? {
                Some(ManagerMessage { body: Some(In::Assignment(assignment)) }) => {
                    let at = Instant::now();
                    let run = assignment.run.context("an assignment without its run")?;
                    // The receiver is gone once every run is accounted for.
                    let _ = assigned.send((run.run_id.clone(), at));
                    let finish = FinishRunRequest {
                        runner_id: runner_id.clone(),
                        run_id: run.run_id,
                        epoch: assignment.epoch,
                        status: RunStatus::Completed as i32,
                        ..Default::default()
                    };
                    tx.send(fleet::message(Out::Finish(finish))).await?;
                }
                Some(ManagerMessage { body: Some(In::FinishAck(_)) }) => {
                    tx.send(fleet::message(Out::Credit(Credit { slots: 1 }))).await?;
                }
                Some(ManagerMessage { body: Some(In::Error(error)) }) => {
                    bail!("the manager refused a message: {} {}", error.code, error.message)
                }
                Some(_) => {}
                None => bail!("the manager ended the stream"),
            },
            _ = heartbeat.tick() => {
                let beat = HeartbeatRequest { runner_id: runner_id.clone(), leases: vec![] };
                tx.send(fleet::message(Out::Heartbeat(beat))).await?;
            }
        }
    }
}
