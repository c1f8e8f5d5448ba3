//! Scenario: thousands of idle `WatchRun` streams on one manager. Runs are created in a
//! queue nobody serves (they stay pending, their logs still), ten watchers each, spread
//! over tenants so that no tenant passes its watcher quota; each watcher reads its run's
//! replay. Once every one has, and PostgreSQL has published the statistics of that burst,
//! the database's commits per second and the manager's memory are measured over a
//! window: what idle watchers cost. The same window without watchers is the baseline.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{CreateRunRequest, CreateRunsRequest, WatchRunRequest};
use anyhow::{Context, bail};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::fleet::rss_mib;
use crate::report::Figure;
use crate::stack::Stack;

/// A queue no scenario serves.
const IDLE_QUEUE: &str = "bench-watchers-idle";
/// Watchers per run.
const PER_RUN: usize = 10;
/// Watchers per tenant, under the default quota (`--tenant-max-watchers`, 1,000).
const PER_TENANT: usize = 500;
/// Streams per HTTP/2 connection, under the manager's default stream limit (1,000).
const PER_CONNECTION: usize = 500;
/// How long PostgreSQL (15+) may hold an idle backend's statistics before publishing
/// them (`PGSTAT_IDLE_INTERVAL`, 10 s): a window opened sooner counts part of the burst
/// before it.
const STATS_SETTLE: Duration = Duration::from_secs(11);

fn as_tenant<T>(tenant: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = tenant.parse() {
        request.metadata_mut().insert("agentrun-tenant", value);
    }
    request
}

/// Commits per second in the bench database over `window`, after [`STATS_SETTLE`].
async fn commits_per_second(db: &tokio_postgres::Client, window: Duration) -> anyhow::Result<f64> {
    const COMMITS: &str = "SELECT sum(xact_commit)::bigint FROM pg_stat_database
                           WHERE datname = current_database()";
    tokio::time::sleep(STATS_SETTLE).await;
    let before: i64 = db.query_one(COMMITS, &[]).await?.get(0);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let after: i64 = db.query_one(COMMITS, &[]).await?.get(0);
    Ok((after - before) as f64 / start.elapsed().as_secs_f64())
}

/// Opens `watchers` idle watchers on the stack's manager and measures it over `window`.
pub async fn run(
    stack: &Stack,
    db: &tokio_postgres::Client,
    watchers: usize,
    window: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let pid = stack.manager_pid();
    let baseline = commits_per_second(db, window).await?;
    let rss_before = rss_mib(pid)?;

    // The runs, PER_RUN watchers each, PER_TENANT watchers per tenant.
    let mut targets: Vec<(String, String)> = Vec::new();
    let mut client = RunServiceClient::new(stack.channel().await?);
    let tenants = watchers.div_ceil(PER_TENANT);
    for tenant in 0..tenants {
        let tenant = format!("bench-watchers-{tenant}");
        let here = PER_TENANT.min(watchers - targets.len());
        let request = CreateRunRequest {
            backend_profile: "scripted".into(),
            queue: IDLE_QUEUE.into(),
            input_json: serde_json::json!({ "prompt": "watched, never run" }).to_string(),
            ..Default::default()
        };
        let created = client
            .create_runs(as_tenant(
                &tenant,
                CreateRunsRequest {
                    runs: vec![request; here.div_ceil(PER_RUN)],
                },
            ))
            .await
            .context("CreateRuns")?
            .into_inner();
        let ids: Vec<String> = created
            .runs
            .iter()
            .filter_map(|r| r.run.as_ref().map(|run| run.run_id.clone()))
            .collect();
        for i in 0..here {
            targets.push((tenant.clone(), ids[i / PER_RUN].clone()));
        }
    }

    let caught_up = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut streams = JoinSet::new();
    let start = Instant::now();
    let mut channel: Option<Channel> = None;
    for (index, (tenant, run_id)) in targets.into_iter().enumerate() {
        if index % PER_CONNECTION == 0 {
            channel = Some(stack.channel().await?);
        }
        let channel = channel.clone().context("a channel per connection")?;
        let (caught_up, failed) = (caught_up.clone(), failed.clone());
        streams.spawn(async move {
            let mut client = RunServiceClient::new(channel);
            let request = WatchRunRequest {
                run_id,
                after_seq: 0,
            };
            let Ok(response) = client.watch_run(as_tenant(&tenant, request)).await else {
                failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut stream = response.into_inner();
            let mut counted = false;
            // Reads whatever comes (the replay, then nothing) until the bench ends it.
            while let Ok(Some(_event)) = stream.message().await {
                if !counted {
                    counted = true;
                    caught_up.fetch_add(1, Ordering::Relaxed);
                }
            }
            failed.fetch_add(1, Ordering::Relaxed);
        });
    }
    let deadline = start + Duration::from_secs(30) + Duration::from_millis(10 * watchers as u64);
    loop {
        let (seen, lost) = (
            caught_up.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        );
        if lost > 0 {
            bail!("watchers: {lost} of {watchers} watch streams failed or ended");
        }
        if seen == watchers {
            break;
        }
        if Instant::now() > deadline {
            bail!("watchers: only {seen} of {watchers} watchers read their replay in time");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open_secs = start.elapsed().as_secs_f64();
    eprintln!(
        "watchers: {watchers} watchers caught up in {open_secs:.1} s; measuring for {window:?}"
    );
    let idle = commits_per_second(db, window).await?;
    let rss = rss_mib(pid)?;
    let lost = failed.load(Ordering::Relaxed);
    streams.abort_all();
    if lost > 0 {
        bail!("watchers: {lost} of {watchers} watch streams ended while idle");
    }
    Ok(vec![
        Figure::new("watchers", "watchers.count", watchers as f64, "streams"),
        Figure::new("watchers", "watchers.open_seconds", open_secs, "s"),
        Figure::new(
            "watchers",
            "watchers.baseline_commits_per_s",
            baseline,
            "commits/s",
        ),
        Figure::new("watchers", "watchers.idle_commits_per_s", idle, "commits/s"),
        // What the watchers add; one safety-net poll per second is 1.
        Figure::new(
            "watchers",
            "watchers.added_commits_per_s",
            idle - baseline,
            "commits/s",
        )
        .at_most(5.0),
        Figure::new("watchers", "watchers.manager_rss_mib", rss, "MiB"),
        Figure::new(
            "watchers",
            "watchers.rss_per_watcher_kib",
            (rss - rss_before).max(0.0) * 1024.0 / watchers.max(1) as f64,
            "KiB",
        ),
    ])
}
