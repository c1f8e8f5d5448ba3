//! Scenario 1, dispatch: bulk-create N runs that the scripted provider finishes at once,
//! and measure runs per second from the first create to the last run terminal. Then, at
//! about half that rate, create runs at a steady pace (open loop: the schedule does not
//! wait for slow calls) and measure how long a run waits to be assigned when the system
//! is not saturated.

use std::time::{Duration, Instant};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{CreateRunRequest, CreateRunsRequest};
use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::report::{Figure, percentile};

/// CreateRuns accepts at most this many runs per call.
const BATCH: usize = 1_000;
/// How often the terminal count is polled.
const POLL: Duration = Duration::from_millis(50);
const TERMINAL: &str = "SELECT count(*) FROM runs
    WHERE status IN ('completed', 'failed', 'cancelled', 'blocked', 'expired')";

/// How often the paced scenario creates its next small batch.
const PACE: Duration = Duration::from_millis(20);

fn one_token_run() -> CreateRunRequest {
    CreateRunRequest {
        backend_profile: "scripted".into(),
        input_json: serde_json::json!({ "prompt": "[tokens:1] x" }).to_string(),
        ..Default::default()
    }
}

/// Creates `runs` runs and waits until all are terminal; gives up after `timeout`.
pub async fn run(
    channel: Channel,
    db: &tokio_postgres::Client,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let baseline: i64 = db.query_one(TERMINAL, &[]).await?.get(0);
    let mut client = RunServiceClient::new(channel);
    let request = one_token_run();

    let start = Instant::now();
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
    let create_secs = start.elapsed().as_secs_f64();

    let target = baseline + i64::try_from(runs)?;
    loop {
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
        tokio::time::sleep(POLL).await;
    }
    let total_secs = start.elapsed().as_secs_f64();
    let failed: i64 = db
        .query_one("SELECT count(*) FROM runs WHERE status <> 'completed'", &[])
        .await?
        .get(0);
    let mut to_claimed = phase_ms(db, "run.created", "run.claimed").await?;
    let mut to_terminal = phase_ms(db, "run.claimed", "run.terminal").await?;
    to_claimed.sort_by(f64::total_cmp);
    to_terminal.sort_by(f64::total_cmp);

    Ok(vec![
        Figure::new(
            "dispatch",
            "dispatch.runs_per_s",
            runs as f64 / total_secs,
            "runs/s",
        )
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
    ])
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
/// call on its own task so a slow call does not hold back the schedule), waits until
/// they are terminal, and reports create-to-assigned latency: the run's `run.created`
/// to its first `run.claimed`, both stamped by the database (the start of the creating
/// and of the claiming transaction).
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
    let client = RunServiceClient::new(channel);
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
            let request = CreateRunsRequest {
                runs: vec![one_token_run(); due - sent],
            };
            calls.spawn(async move { client.create_runs(request).await });
            sent = due;
        }
    }
    let offered_secs = start.elapsed().as_secs_f64();
    let mut ids = Vec::with_capacity(total);
    while let Some(call) = calls.join_next().await {
        let created = call?.context("CreateRuns")?.into_inner();
        for run in created.runs.iter().filter_map(|r| r.run.as_ref()) {
            ids.push(run.run_id.parse::<Uuid>()?);
        }
    }

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
    let mut latencies: Vec<f64> = rows.iter().map(|r| r.get(0)).collect();
    latencies.sort_by(f64::total_cmp);

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
            percentile(&latencies, 50.0),
            "ms",
        )
        .at_most(5.0),
        Figure::new(
            "dispatch",
            "dispatch.create_to_assigned_p99",
            percentile(&latencies, 99.0),
            "ms",
        )
        .at_most(20.0),
    ])
}
