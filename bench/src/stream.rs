//! Scenario 2, stream: a few runs that each emit many `content.delta` events, one
//! WatchRun client per run. Measures events stored per second at full speed, and
//! append-to-watcher latency both then and at a model's streaming pace, with the
//! watchers on the replica the runners stream to and on another replica (the event's `created_at`, stamped by the database, against the time the
//! watcher received it; everything runs on one machine, so one clock).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentrun_shared::codec::ProtoCodec;
use agentrun_shared::proto::run_service_client::RunServiceClient;
use agentrun_shared::proto::{CreateRunRequest, CreateRunsRequest, WatchRunRequest};
use anyhow::{Context, bail};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::cpu::StackCpu;
use crate::report::{Figure, percentile};
use crate::stack::Stack;
use crate::statements;

/// The queue of the paced phase, served by its own runner.
const PACED_QUEUE: &str = "bench-stream-paced";
/// Tokens per second of each paced run: a fast model's streaming speed.
const PACED_TOKEN_DELAY_MS: &str = "10";
/// Tokens of each paced run.
const PACED_TOKENS: usize = 300;

/// Streams `runs` runs of `tokens` tokens each as fast as the runners go, watched live
/// (throughput, and latency under that load); then as many runs streaming at a model's
/// pace (100 tokens/s each) from a runner of their own (the latency target's load).
/// Gives up after `timeout`.
pub async fn run(
    stack: &mut Stack,
    db: &tokio_postgres::Client,
    runs: usize,
    tokens: usize,
    input_bytes: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    let channel = stack.channel().await?;
    let counting = statements::reset(db).await;
    let cpu = StackCpu::start(stack, db).await?;
    let start = Instant::now();
    let (ids, mut full_load_ms) = stream(
        &channel,
        &channel,
        runs,
        tokens,
        input_bytes,
        "default",
        timeout,
    )
    .await?;
    let wall_secs = start.elapsed().as_secs_f64();
    let cpu_used = cpu.used();

    let uuids: Vec<Uuid> = ids.iter().map(|id| id.parse()).collect::<Result<_, _>>()?;
    // Where the full-speed phase's database time went, per 1,000 stored events (so per
    // event in µs): the watchers' reads among the writes show if appends were read back.
    let db_us_per_event = match counting {
        true => {
            let stored: i64 = db
                .query_one(
                    "SELECT sum(last_event_seq)::bigint FROM runs WHERE id = ANY($1)",
                    &[&uuids],
                )
                .await?
                .get(0);
            statements::report(db, "stream", stored as f64 / 1000.0, "1000 events").await?
        }
        false => None,
    };
    let row = db
        .query_one(
            "SELECT count(*), extract(epoch FROM max(created_at) - min(created_at))::float8
             FROM events WHERE run_id = ANY($1)",
            &[&uuids],
        )
        .await?;
    let events: i64 = row.get(0);
    let span_secs: f64 = row.get(1);

    stack.spawn_runner(
        "bench-stream-paced",
        &[
            ("AGENTRUN_QUEUES", PACED_QUEUE),
            ("AGENTRUN_SCRIPTED_TOKEN_DELAY_MS", PACED_TOKEN_DELAY_MS),
        ],
    )?;
    let (_, mut paced_ms) = stream(
        &channel,
        &channel,
        runs,
        PACED_TOKENS,
        input_bytes,
        PACED_QUEUE,
        timeout,
    )
    .await?;
    // The same, watched on a replica no runner is connected to: each append reaches it
    // by NOTIFY.
    let replica = stack.spawn_replica().await?;
    let (_, mut across_ms) = stream(
        &channel,
        &replica,
        runs,
        PACED_TOKENS,
        input_bytes,
        PACED_QUEUE,
        timeout,
    )
    .await?;

    full_load_ms.sort_by(f64::total_cmp);
    paced_ms.sort_by(f64::total_cmp);
    across_ms.sort_by(f64::total_cmp);
    let mut figures = vec![
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
            "stream.append_to_watcher_p50 (100 tokens/s per run)",
            percentile(&paced_ms, 50.0),
            "ms",
        )
        .at_most(5.0),
        Figure::new(
            "stream",
            "stream.append_to_watcher_p99 (100 tokens/s per run)",
            percentile(&paced_ms, 99.0),
            "ms",
        )
        .at_most(25.0),
        Figure::new(
            "stream",
            "stream.append_to_watcher_p50 (100 tokens/s per run, across replicas)",
            percentile(&across_ms, 50.0),
            "ms",
        ),
        Figure::new(
            "stream",
            "stream.append_to_watcher_p99 (100 tokens/s per run, across replicas)",
            percentile(&across_ms, 99.0),
            "ms",
        )
        .at_most(25.0),
        Figure::new(
            "stream",
            "stream.append_to_watcher_p50 (full load)",
            percentile(&full_load_ms, 50.0),
            "ms",
        ),
        Figure::new(
            "stream",
            "stream.append_to_watcher_p99 (full load)",
            percentile(&full_load_ms, 99.0),
            "ms",
        ),
        Figure::new("stream", "stream.events", events as f64, "events"),
        Figure::new(
            "stream",
            "stream.deltas_watched",
            (full_load_ms.len() + paced_ms.len() + across_ms.len()) as f64,
            "events",
        ),
    ];
    // Where the full-speed phase's time went, per stored event.
    figures.extend(cpu_used.per_unit(
        "stream",
        [
            "stream.cpu_us_per_event.manager",
            "stream.cpu_us_per_event.runners",
            "stream.cpu_us_per_event.bench (watchers)",
            "stream.cpu_us_per_event.postgres",
            "stream.cpu_us_per_event (all)",
        ],
        events as f64,
    ));
    figures.push(Figure::new(
        "stream",
        "stream.machine_busy_percent",
        cpu_used.machine_busy_percent,
        "%",
    ));
    if let Some(us) = db_us_per_event {
        figures.push(Figure::new(
            "stream",
            "stream.db_exec_us_per_event",
            us,
            "µs",
        ));
    }
    Ok(figures)
}

/// Creates `runs` runs of `tokens` tokens in `queue` through `channel` and watches each
/// to its end through `watching`; returns their ids and the latency in ms of every
/// `content.delta` seen.
async fn stream(
    channel: &Channel,
    watching: &Channel,
    runs: usize,
    tokens: usize,
    input_bytes: usize,
    queue: &str,
    timeout: Duration,
) -> anyhow::Result<(Vec<String>, Vec<f64>)> {
    let mut client = RunServiceClient::new(channel.clone());
    let request = CreateRunRequest {
        backend_profile: "scripted".into(),
        queue: queue.into(),
        input_json: serde_json::json!({
            "prompt": format!("[tokens:{tokens}] stream"),
            "context": filler(input_bytes),
        })
        .to_string(),
        ..Default::default()
    };
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
        .map(|id| tokio::spawn(watch(watching.clone(), id.clone())))
        .collect();
    let mut latencies_ms = Vec::new();
    for watcher in watchers {
        let run_latencies = tokio::time::timeout(timeout, watcher)
            .await
            .context("stream: a watcher did not see its run end in time")???;
        latencies_ms.extend(run_latencies);
    }
    Ok((ids, latencies_ms))
}

/// The fields of an `Event` a watcher checks. The others (run and runner ids, the
/// payload) are skipped as it decodes, not copied out: decoding whole events was half
/// of the bench's own CPU, taken from the two cores the stack under test shares with it.
#[derive(Clone, PartialEq, prost::Message)]
struct WatchedEvent {
    #[prost(int64, tag = "2")]
    seq: i64,
    #[prost(string, tag = "3")]
    r#type: String,
    #[prost(message, optional, tag = "8")]
    created_at: Option<Timestamp>,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct Timestamp {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// Follows one run to its end, checking that its events come gapless and in order;
/// returns the latency in ms of every `content.delta`.
async fn watch(channel: Channel, run_id: String) -> anyhow::Result<Vec<f64>> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.context("WatchRun")?;
    let request = tonic::Request::new(WatchRunRequest {
        run_id: run_id.clone(),
        after_seq: 0,
    });
    let path = PathAndQuery::from_static("/agentrun.v1.RunService/WatchRun");
    let mut stream = grpc
        .server_streaming(request, path, ProtoCodec::<_, WatchedEvent>::default())
        .await
        .context("WatchRun")?
        .into_inner();
    let mut latencies = Vec::new();
    let mut last_seq = 0;
    while let Some(event) = stream.message().await.context("WatchRun stream")? {
        let received = SystemTime::now();
        if event.seq != last_seq + 1 {
            bail!("run {run_id}: event {} followed {last_seq}", event.seq);
        }
        last_seq = event.seq;
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

/// `bytes` of letters that do not compress (PostgreSQL stores a long input out of line,
/// as it would a long conversation's history).
fn filler(bytes: usize) -> String {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}
