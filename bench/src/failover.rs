//! Scenario 4, failover: a runner holding runs is killed with SIGKILL (no drain, no
//! goodbye); how long until each of its runs is claimed by another runner? With default
//! manager settings that is the rest of the lease TTL after the last heartbeat, plus the
//! sweep interval, plus the claim.
//!
//! Runner A starts alone with room for half the runs and takes them; runner B then
//! starts with room for all of them and takes the rest, so it has room for A's runs once
//! they are requeued. The runs stream one token a second for a day, so none ends on its
//! own. Times are the database's: from the kill to the `run.requeued` and to the new
//! `run.claimed` event of each of A's runs (the same machine's clock).

use std::time::{Duration, Instant, SystemTime};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{CreateRunRequest, CreateRunsRequest};
use anyhow::{Context, bail};
use uuid::Uuid;

use crate::report::{Figure, percentile};
use crate::stack::Stack;

/// A queue only this scenario's runners serve.
const QUEUE: &str = "bench-failover";
const POLL: Duration = Duration::from_millis(100);

/// Runs `runs` long runs on two runners, kills the one holding half of them, and times
/// their move to the other; gives up on any step after `timeout`.
pub async fn run(
    database_url: &str,
    db: &tokio_postgres::Client,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    anyhow::ensure!(runs >= 2, "failover needs at least 2 runs, got {runs}");
    let mut stack = Stack::start(database_url, 0).await?;
    let (a_id, b_id) = (Uuid::new_v4(), Uuid::new_v4());
    let a_slots = runs.div_ceil(2);
    let a = spawn_runner(&mut stack, "failover-a", a_id, a_slots)?;

    let mut client = RunServiceClient::new(stack.channel().await?);
    let request = CreateRunRequest {
        backend_profile: "scripted".into(),
        queue: QUEUE.into(),
        input_json: serde_json::json!({ "prompt": "[tokens:86400] failover" }).to_string(),
        ..Default::default()
    };
    let created = client
        .create_runs(CreateRunsRequest {
            runs: vec![request; runs],
        })
        .await
        .context("CreateRuns")?
        .into_inner();
    let ids: Vec<Uuid> = created
        .runs
        .iter()
        .filter_map(|r| r.run.as_ref())
        .map(|run| run.run_id.parse())
        .collect::<Result<_, _>>()?;

    let start = Instant::now();
    let ids = &ids[..];
    wait_for(timeout, "runner A to fill its slots", move || async move {
        let (on_a, _) = leased(db, ids, a_id).await?;
        Ok((on_a >= a_slots).then_some(()))
    })
    .await?;
    spawn_runner(&mut stack, "failover-b", b_id, runs)?;
    wait_for(timeout, "runner B to take the rest", move || async move {
        let (_, all) = leased(db, ids, a_id).await?;
        Ok((all >= runs).then_some(()))
    })
    .await?;
    let a_runs: Vec<Uuid> = db
        .query(
            "SELECT id FROM runs WHERE id = ANY($1) AND lease_runner_id = $2",
            &[&ids, &a_id],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    eprintln!(
        "failover: runner A holds {} runs, B {}; killing A (set-up took {:.1} s)",
        a_runs.len(),
        runs - a_runs.len(),
        start.elapsed().as_secs_f64()
    );

    let killed_at = SystemTime::now();
    stack.kill_runner(a)?;
    let (a_runs, a_text) = (&a_runs[..], &a_id.to_string());
    let claimed: Vec<SystemTime> = wait_for(
        timeout,
        "runner A's runs to be claimed elsewhere",
        move || async move {
            let rows = db
                .query(
                    "SELECT min(created_at) FROM events
                     WHERE run_id = ANY($1) AND type = 'run.claimed'
                       AND payload->>'runner_id' <> $2
                     GROUP BY run_id",
                    &[&a_runs, a_text],
                )
                .await?;
            Ok((rows.len() >= a_runs.len()).then(|| rows.iter().map(|r| r.get(0)).collect()))
        },
    )
    .await?;
    let requeued: Vec<SystemTime> = db
        .query(
            "SELECT min(created_at) FROM events
             WHERE run_id = ANY($1) AND type = 'run.requeued' GROUP BY run_id",
            &[&a_runs],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (on_b, _) = leased(db, a_runs, b_id).await?;
    if on_b != a_runs.len() {
        bail!(
            "failover: {on_b} of runner A's {} runs are held by runner B",
            a_runs.len()
        );
    }

    let since_kill = |at: &SystemTime| {
        at.duration_since(killed_at)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let mut to_claimed: Vec<f64> = claimed.iter().map(since_kill).collect();
    let mut to_requeued: Vec<f64> = requeued.iter().map(since_kill).collect();
    to_claimed.sort_by(f64::total_cmp);
    to_requeued.sort_by(f64::total_cmp);
    Ok(vec![
        Figure::new(
            "failover",
            "failover.runs_moved",
            to_claimed.len() as f64,
            "runs",
        ),
        Figure::new(
            "failover",
            "failover.seconds_p50",
            percentile(&to_claimed, 50.0),
            "s",
        )
        .at_most(10.0),
        Figure::new(
            "failover",
            "failover.seconds_max",
            percentile(&to_claimed, 100.0),
            "s",
        )
        .at_most(10.0),
        Figure::new(
            "failover",
            "failover.seconds_to_requeue_max",
            percentile(&to_requeued, 100.0),
            "s",
        ),
    ])
}

/// Starts a runner serving only [`QUEUE`] with `slots` slots, whose scripted runs
/// stream one token a second.
fn spawn_runner(stack: &mut Stack, name: &str, id: Uuid, slots: usize) -> anyhow::Result<usize> {
    let (id, slots) = (id.to_string(), slots.to_string());
    stack.spawn_runner(
        name,
        &[
            ("AGENTRUN_RUNNER_ID", &id),
            ("AGENTRUN_QUEUES", QUEUE),
            ("AGENTRUN_MAX_CONCURRENCY", &slots),
            ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", "1000"),
        ],
    )
}

/// Of `ids`, how many have a live lease held by `runner`, and how many have one at all.
async fn leased(
    db: &tokio_postgres::Client,
    ids: &[Uuid],
    runner: Uuid,
) -> anyhow::Result<(usize, usize)> {
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE lease_runner_id = $2), count(*) FROM runs
             WHERE id = ANY($1) AND status IN ('claimed', 'running', 'waiting')
               AND lease_runner_id IS NOT NULL",
            &[&ids, &runner],
        )
        .await?;
    Ok((
        usize::try_from(row.get::<_, i64>(0))?,
        usize::try_from(row.get::<_, i64>(1))?,
    ))
}

/// Polls `check` every [`POLL`] until it returns something; fails after `timeout`.
async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, check: F) -> anyhow::Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("failover: timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}
