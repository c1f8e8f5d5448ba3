//! Scenario, retention: what compacting ended runs' deltas costs. Two tenants' N runs
//! each, every run with M `content.delta` events of one item, are completed by the bench
//! playing a runner (unary RPCs). The first tenant gets a 1 ms retention and is
//! compacted on an idle manager. Then a writer appends deltas to runs of a third tenant
//! as fast as it can, alone for a window (the baseline), and again while the second
//! tenant, given the same retention, is compacted. Measured: runs compacted and delta
//! rows removed per second, idle and under the writer, and the writer's events/s
//! without and with compaction running.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentrun_shared::proto::admin_service_client::AdminServiceClient;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::runner_service_client::RunnerServiceClient;
use agentrun_shared::proto::{
    self, AppendEventsRequest, ClaimRunsRequest, CreateRunRequest, CreateRunsRequest,
    FinishRunRequest, RunnerEvent, RunnerIdentity, SetTenantRetentionRequest,
};
use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::report::Figure;
use crate::stack::Stack;

/// The tenants whose runs are compacted: on an idle manager, and under the writer.
const IDLE_TENANT: &str = "bench-retention-idle";
const LOADED_TENANT: &str = "bench-retention-loaded";
/// The tenant of the concurrent writer's runs (never due: they stay active).
const WRITER_TENANT: &str = "bench-retention-writer";
/// A queue only this scenario uses, so no runner process takes its runs.
const QUEUE: &str = "bench-retention";
/// Runs the writer appends to at once, and the events of each of its appends.
const WRITERS: usize = 4;
const WRITER_BATCH: usize = 100;
/// Tasks completing the runs to compact.
const SETUP_TASKS: usize = 8;
/// Most events in one append (the manager's default `--max-batch-events`).
const MAX_BATCH: usize = 1_000;

/// The manager's settings for this scenario: leases that outlive the setup (the bench's
/// runner does not heartbeat) and a compactor that looks every 100 ms.
pub const MANAGER_ENV: &[(&str, &str)] = &[
    ("AGENTRUN_LEASE_TTL_MS", "600000"),
    ("AGENTRUN_EVENT_COMPACTION_INTERVAL_MS", "100"),
];

fn as_tenant<T>(tenant: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = tenant.parse() {
        request.metadata_mut().insert("agentrun-tenant", value);
    }
    request
}

fn identity(slots: usize) -> RunnerIdentity {
    RunnerIdentity {
        runner_id: uuid::Uuid::new_v4().to_string(),
        name: "bench-retention".into(),
        backend_profiles: vec!["scripted".into()],
        queues: vec![QUEUE.into()],
        max_concurrency: slots as i32,
        ..Default::default()
    }
}

fn deltas(item: &str, first_runner_seq: usize, n: usize) -> Vec<RunnerEvent> {
    (first_runner_seq..first_runner_seq + n)
        .map(|seq| RunnerEvent {
            runner_seq: seq as i64,
            r#type: "content.delta".into(),
            payload_json: serde_json::json!({
                "item_id": item, "kind": "assistant_text", "delta": format!("token {seq} ")
            })
            .to_string(),
        })
        .collect()
}

/// Creates `n` runs of `tenant` in [`QUEUE`] and claims them all for `me`; returns
/// `(run id, epoch)` of each.
async fn create_and_claim(
    channel: &Channel,
    tenant: &str,
    me: &RunnerIdentity,
    n: usize,
) -> anyhow::Result<Vec<(String, i64)>> {
    let mut runs = RunServiceClient::new(channel.clone());
    let request = CreateRunRequest {
        backend_profile: "scripted".into(),
        queue: QUEUE.into(),
        input_json: serde_json::json!({ "prompt": "retention" }).to_string(),
        ..Default::default()
    };
    let mut left = n;
    while left > 0 {
        let here = left.min(1_000);
        runs.create_runs(as_tenant(
            tenant,
            CreateRunsRequest {
                runs: vec![request.clone(); here],
            },
        ))
        .await
        .context("CreateRuns")?;
        left -= here;
    }
    let mut runner = RunnerServiceClient::new(channel.clone());
    let mut held = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.len() < n {
        let assignments = runner
            .claim_runs(ClaimRunsRequest {
                runner: Some(me.clone()),
                max_runs: (n - held.len()).min(500) as i32,
            })
            .await
            .context("ClaimRuns")?
            .into_inner()
            .assignments;
        if assignments.is_empty() && Instant::now() > deadline {
            bail!("only {} of {n} runs claimed", held.len());
        }
        held.extend(assignments.into_iter().filter_map(|a| {
            let run = a.run?;
            Some((run.run_id, a.epoch))
        }));
    }
    Ok(held)
}

/// Appends `per_run` deltas to each run and completes it, `SETUP_TASKS` at a time.
async fn complete_with_deltas(
    channel: &Channel,
    me: &RunnerIdentity,
    held: Vec<(String, i64)>,
    per_run: usize,
) -> anyhow::Result<()> {
    let mut tasks = JoinSet::new();
    let share = held.len().div_ceil(SETUP_TASKS);
    for chunk in held.chunks(share.max(1)) {
        let chunk = chunk.to_vec();
        let mut runner = RunnerServiceClient::new(channel.clone());
        let runner_id = me.runner_id.clone();
        tasks.spawn(async move {
            for (run_id, epoch) in chunk {
                let mut sent = 0;
                while sent < per_run {
                    let here = (per_run - sent).min(MAX_BATCH);
                    runner
                        .append_events(AppendEventsRequest {
                            runner_id: runner_id.clone(),
                            run_id: run_id.clone(),
                            epoch,
                            events: deltas("msg-1", sent + 1, here),
                            command_updates: vec![],
                        })
                        .await
                        .context("AppendEvents")?;
                    sent += here;
                }
                runner
                    .finish_run(FinishRunRequest {
                        runner_id: runner_id.clone(),
                        run_id,
                        epoch,
                        status: proto::RunStatus::Completed as i32,
                        ..Default::default()
                    })
                    .await
                    .context("FinishRun")?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Appends to `runs` ([`WRITERS`] tasks, one run each) until `stop`; returns the
/// events appended.
fn writer(
    channel: &Channel,
    me: &RunnerIdentity,
    runs: &[(String, i64)],
    next_seq: &[Arc<AtomicU64>],
    stop: Arc<AtomicBool>,
) -> JoinSet<anyhow::Result<u64>> {
    let mut tasks = JoinSet::new();
    for ((run_id, epoch), next) in runs.iter().cloned().zip(next_seq.iter().cloned()) {
        let mut runner = RunnerServiceClient::new(channel.clone());
        let runner_id = me.runner_id.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let mut appended = 0;
            while !stop.load(Ordering::Relaxed) {
                let first = next.fetch_add(WRITER_BATCH as u64, Ordering::Relaxed) as usize;
                runner
                    .append_events(AppendEventsRequest {
                        runner_id: runner_id.clone(),
                        run_id: run_id.clone(),
                        epoch,
                        events: deltas("live", first, WRITER_BATCH),
                        command_updates: vec![],
                    })
                    .await
                    .context("the writer's AppendEvents")?;
                appended += WRITER_BATCH as u64;
            }
            anyhow::Ok(appended)
        });
    }
    tasks
}

async fn stop_writer(
    stop: &AtomicBool,
    mut tasks: JoinSet<anyhow::Result<u64>>,
) -> anyhow::Result<u64> {
    stop.store(true, Ordering::Relaxed);
    let mut appended = 0;
    while let Some(done) = tasks.join_next().await {
        appended += done??;
    }
    Ok(appended)
}

async fn compacted_runs(db: &tokio_postgres::Client, tenant: &str) -> anyhow::Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM runs WHERE tenant_id = $1 AND events_compacted_at IS NOT NULL",
            &[&tenant],
        )
        .await?
        .get(0))
}

async fn stored_events(db: &tokio_postgres::Client, tenant: &str) -> anyhow::Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM events e JOIN runs r ON r.id = e.run_id WHERE r.tenant_id = $1",
            &[&tenant],
        )
        .await?
        .get(0))
}

/// How fast `tenant`'s `runs` runs were compacted once it got a 1 ms retention.
struct Compaction {
    runs_per_s: f64,
    rows_per_s: f64,
    seconds: f64,
}

/// Gives `tenant` a 1 ms retention and waits (up to `timeout`) until all its `runs` runs
/// are compacted.
async fn compact_tenant(
    channel: &Channel,
    db: &tokio_postgres::Client,
    tenant: &str,
    runs: usize,
    timeout: Duration,
) -> anyhow::Result<Compaction> {
    let events_before = stored_events(db, tenant).await?;
    let start = Instant::now();
    AdminServiceClient::new(channel.clone())
        .set_tenant_retention(SetTenantRetentionRequest {
            tenant_id: tenant.into(),
            event_retention_ms: Some(1),
        })
        .await
        .context("SetTenantRetention")?;
    while compacted_runs(db, tenant).await? < runs as i64 {
        if start.elapsed() > timeout {
            bail!("{tenant}: not every run was compacted within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let removed = (events_before - stored_events(db, tenant).await?) as f64;
    Ok(Compaction {
        runs_per_s: runs as f64 / seconds,
        rows_per_s: removed / seconds,
        seconds,
    })
}

/// Completes `runs` runs of `deltas` deltas each for two tenants; compacts one on the
/// idle manager; then measures the writer for `window` alone, and again while the other
/// is compacted (each compaction within `timeout`).
pub async fn run(
    stack: &Stack,
    db: &tokio_postgres::Client,
    runs: usize,
    deltas_per_run: usize,
    window: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let channel = stack.channel().await?;
    let me = identity(2 * runs + WRITERS);
    for tenant in [IDLE_TENANT, LOADED_TENANT] {
        let held = create_and_claim(&channel, tenant, &me, runs).await?;
        complete_with_deltas(&channel, &me, held, deltas_per_run).await?;
    }
    let writer_runs = create_and_claim(&channel, WRITER_TENANT, &me, WRITERS).await?;
    let next_seq: Vec<Arc<AtomicU64>> = (0..WRITERS).map(|_| Arc::new(AtomicU64::new(1))).collect();

    let idle = compact_tenant(&channel, db, IDLE_TENANT, runs, timeout).await?;

    // The writer alone.
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks = writer(&channel, &me, &writer_runs, &next_seq, stop.clone());
    tokio::time::sleep(window).await;
    let alone = stop_writer(&stop, tasks).await? as f64 / start.elapsed().as_secs_f64();

    // The writer while the other tenant's runs are compacted.
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks = writer(&channel, &me, &writer_runs, &next_seq, stop.clone());
    let loaded = compact_tenant(&channel, db, LOADED_TENANT, runs, timeout).await;
    let appended = stop_writer(&stop, tasks).await?;
    let loaded = loaded?;
    let during = appended as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "retention: {runs} runs x {deltas_per_run} deltas compacted in {:.2} s idle, \
         {:.2} s under the writer; writer {alone:.0} events/s alone, {during:.0} during",
        idle.seconds, loaded.seconds
    );
    let figure = |name, value, unit| Figure::new("retention", name, value, unit);
    Ok(vec![
        figure("retention.runs_compacted_per_s", idle.runs_per_s, "runs/s"),
        figure("retention.deltas_removed_per_s", idle.rows_per_s, "rows/s"),
        figure(
            "retention.runs_compacted_per_s_under_writer",
            loaded.runs_per_s,
            "runs/s",
        ),
        figure(
            "retention.deltas_removed_per_s_under_writer",
            loaded.rows_per_s,
            "rows/s",
        ),
        figure("retention.writer_events_per_s_alone", alone, "events/s"),
        figure(
            "retention.writer_events_per_s_during_compaction",
            during,
            "events/s",
        ),
    ])
}
