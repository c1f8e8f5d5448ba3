//! Scenario 2, stream: a few runs that each emit many `content.delta` events, one
//! WatchRun client per run. Measures events stored per second and append-to-watcher
//! latency (the event's `created_at`, stamped by the database, against the time the
//! watcher received it; everything runs on one machine, so one clock).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{CreateRunRequest, CreateRunsRequest, WatchRunRequest};
use anyhow::Context;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::report::{Figure, percentile};

/// Streams `runs` runs of `tokens` tokens each, watched live; gives up after `timeout`.
pub async fn run(
    channel: Channel,
    db: &tokio_postgres::Client,
    runs: usize,
    tokens: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let mut client = RunServiceClient::new(channel.clone());
    let request = CreateRunRequest {
        backend_profile: "scripted".into(),
        input_json: serde_json::json!({ "prompt": format!("[tokens:{tokens}] stream") })
            .to_string(),
        ..Default::default()
    };
    let start = Instant::now();
    let created = client
        .create_runs(CreateRunsRequest {
            runs: vec![request; runs],
        })
        .await
        .context("CreateRuns")?
        .into_inner();
    let ids: Vec<String> = created
        .runs
        .iter()
        .filter_map(|r| r.run.as_ref().map(|run| run.run_id.clone()))
        .collect();

    let watchers: Vec<_> = ids
        .iter()
        .map(|id| tokio::spawn(watch(channel.clone(), id.clone())))
        .collect();
    let mut latencies_ms = Vec::new();
    for watcher in watchers {
        let run_latencies = tokio::time::timeout(timeout, watcher)
            .await
            .context("stream: a watcher did not see its run end in time")???;
        latencies_ms.extend(run_latencies);
    }
    let wall_secs = start.elapsed().as_secs_f64();

    let uuids: Vec<Uuid> = ids.iter().map(|id| id.parse()).collect::<Result<_, _>>()?;
    let row = db
        .query_one(
            "SELECT count(*), extract(epoch FROM max(created_at) - min(created_at))::float8
             FROM events WHERE run_id = ANY($1)",
            &[&uuids],
        )
        .await?;
    let events: i64 = row.get(0);
    let span_secs: f64 = row.get(1);

    latencies_ms.sort_by(f64::total_cmp);
    Ok(vec![
        Figure::new(
            "stream",
            "stream.events_per_s",
            events as f64 / wall_secs,
            "events/s",
        )
        .against("limit.rows_per_s"),
        Figure::new(
            "stream",
            "stream.events_per_s_db_span",
            events as f64 / span_secs.max(1e-3),
            "events/s",
        )
        .against("limit.rows_per_s"),
        Figure::new(
            "stream",
            "stream.watch_latency_p50",
            percentile(&latencies_ms, 50.0),
            "ms",
        ),
        Figure::new(
            "stream",
            "stream.watch_latency_p99",
            percentile(&latencies_ms, 99.0),
            "ms",
        ),
        Figure::new("stream", "stream.events", events as f64, "events"),
        Figure::new(
            "stream",
            "stream.deltas_watched",
            latencies_ms.len() as f64,
            "events",
        ),
    ])
}

/// Follows one run to its end; returns the latency in ms of every `content.delta`.
async fn watch(channel: Channel, run_id: String) -> anyhow::Result<Vec<f64>> {
    let mut client = RunServiceClient::new(channel);
    let mut stream = client
        .watch_run(WatchRunRequest {
            run_id,
            after_seq: 0,
        })
        .await
        .context("WatchRun")?
        .into_inner();
    let mut latencies = Vec::new();
    while let Some(event) = stream.message().await.context("WatchRun stream")? {
        let received = SystemTime::now();
        if event.r#type == "content.delta"
            && let Some(at) = event.created_at
        {
            let created =
                UNIX_EPOCH + Duration::new(u64::try_from(at.seconds)?, u32::try_from(at.nanos)?);
            let ms = received
                .duration_since(created)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3);
            latencies.push(ms);
        }
        if event.r#type == "run.terminal" {
            break;
        }
    }
    Ok(latencies)
}
