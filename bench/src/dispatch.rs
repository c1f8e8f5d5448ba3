//! Scenario 1, dispatch: bulk-create N runs that the scripted provider finishes at once,
//! and measure runs per second from the first create to the last run terminal.

use std::time::{Duration, Instant};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{CreateRunRequest, CreateRunsRequest};
use anyhow::{Context, bail};
use tonic::transport::Channel;

use crate::report::{Figure, percentile};

/// CreateRuns accepts at most this many runs per call.
const BATCH: usize = 1_000;
/// How often the terminal count is polled.
const POLL: Duration = Duration::from_millis(50);
const TERMINAL: &str = "SELECT count(*) FROM runs
    WHERE status IN ('completed', 'failed', 'cancelled', 'blocked', 'expired')";

/// Creates `runs` runs and waits until all are terminal; gives up after `timeout`.
pub async fn run(
    channel: Channel,
    db: &tokio_postgres::Client,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let baseline: i64 = db.query_one(TERMINAL, &[]).await?.get(0);
    let mut client = RunServiceClient::new(channel);
    let request = CreateRunRequest {
        backend_profile: "scripted".into(),
        input_json: serde_json::json!({ "prompt": "[tokens:1] x" }).to_string(),
        ..Default::default()
    };

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
        .against("limit.dispatches_per_s"),
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
