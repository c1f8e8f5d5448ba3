//! Scenario, storm: a replica was lost and its whole fleet reconnects at once. The bench
//! process plays the runners (as in [`crate::fleet`]): every one opens its
//! `RunnerService.Connect` stream at the same moment, says hello, and waits for its
//! welcome. Measured: seconds from the first hello until every runner is welcomed
//! (registered in the database, its runs settled), and the hello rate that makes. The
//! runners give no credit, so the figure is the hellos' alone, not the claims that
//! follow them (one per runner, measured by `dispatch`).

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;

use crate::fleet;
use crate::report::Figure;
use crate::stack::Stack;

/// A queue no scenario creates runs in.
const IDLE_QUEUE: &str = "bench-storm-idle";

/// Connects `runners` simulated runners at once, `per_connection` streams on each HTTP/2
/// connection, and measures how long until all are welcomed. Any hello that fails, or a
/// storm not settled within `timeout`, is an error.
pub async fn run(
    stack: &Stack,
    runners: usize,
    per_connection: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Figure>> {
    // The connections first, so the storm measures hellos, not TCP handshakes.
    let mut channels = Vec::new();
    for _ in 0..runners.div_ceil(per_connection.max(1)) {
        channels.push(stack.channel().await?);
    }
    let mut storm = JoinSet::new();
    let start = Instant::now();
    for index in 0..runners {
        let channel = channels[index / per_connection.max(1)].clone();
        storm.spawn(fleet::welcomed(
            channel,
            format!("storm-{index}"),
            IDLE_QUEUE,
            1,
        ));
    }
    // The streams stay open until every runner is welcomed: a runner that went away
    // would not count.
    let mut connected = Vec::with_capacity(runners);
    let settled = tokio::time::timeout(timeout, async {
        while let Some(welcomed) = storm.join_next().await {
            connected.push(welcomed.context("a simulated runner")?.context("hello")?);
        }
        anyhow::Ok(())
    })
    .await;
    let seconds = start.elapsed().as_secs_f64();
    match settled {
        Ok(result) => result?,
        Err(_) => anyhow::bail!(
            "storm: {} of {runners} runners welcomed within {timeout:?}",
            connected.len()
        ),
    }
    eprintln!("storm: {runners} runners welcomed in {seconds:.1} s");
    drop(connected);
    Ok(vec![
        Figure::new("storm", "storm.runners_welcomed", runners as f64, "runners"),
        Figure::new("storm", "storm.connect_seconds", seconds, "s"),
        Figure::new(
            "storm",
            "storm.hellos_per_s",
            runners as f64 / seconds,
            "hellos/s",
        ),
    ])
}
