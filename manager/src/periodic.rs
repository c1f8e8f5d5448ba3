//! Background work done on a fixed interval until shutdown: the sweeper, the compactor
//! and the safety-net polls for work and for watchers.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Runs `tick` every `interval`, the first at once, until `shutdown` is cancelled. A tick
/// is never cut short by shutdown, and one that overruns delays the next rather than
/// bunching them up. `tick` logs its own errors: the next tick is the retry.
pub async fn every<F, Fut>(interval: Duration, shutdown: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        tick().await;
    }
}
