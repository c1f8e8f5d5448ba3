//! Heartbeats of every runner on this replica, renewed together: a runner stream (or a
//! unary `Heartbeat` call) hands its heartbeat to one task, which renews everything that
//! arrived meanwhile in one transaction. Ten thousand runners beating every two seconds
//! cost a few transactions a second, not five thousand.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::store::leases::{self, Heartbeat, Renewed};

/// Most heartbeats renewed in one transaction.
const MAX_BATCH: usize = 2_000;
/// Heartbeats waiting for the batching task before senders wait too.
const QUEUE: usize = 10_000;

type Reply = oneshot::Sender<Result<Renewed>>;

/// The handle runner streams send their heartbeats through.
#[derive(Clone)]
pub struct Heartbeats {
    queue: mpsc::Sender<(Heartbeat, Reply)>,
}

impl Heartbeats {
    /// Starts the batching task; it stops with `shutdown`.
    pub fn start(pool: Pool, ttl: Duration, shutdown: CancellationToken) -> Self {
        let (queue, incoming) = mpsc::channel(QUEUE);
        tokio::spawn(renew_batches(pool, ttl, incoming, shutdown));
        Self { queue }
    }

    /// Renews `beat`'s leases together with whatever other heartbeats are waiting.
    pub async fn beat(&self, beat: Heartbeat) -> Result<Renewed> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Unavailable("the manager is shutting down".into());
        self.queue
            .send((beat, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn renew_batches(
    pool: Pool,
    ttl: Duration,
    mut incoming: mpsc::Receiver<(Heartbeat, Reply)>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = incoming.recv_many(&mut batch, MAX_BATCH) => received,
        };
        if received == 0 {
            return;
        }
        let (beats, replies): (Vec<Heartbeat>, Vec<Reply>) = batch.drain(..).unzip();
        match leases::heartbeat(&pool, &beats, ttl).await {
            Ok(renewed) => {
                for (reply, renewed) in replies.into_iter().zip(renewed) {
                    let _ = reply.send(Ok(renewed));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, beats = replies.len(), "heartbeat batch failed");
                for reply in replies {
                    let _ = reply.send(Err(match &err {
                        Error::Internal(message) => Error::Internal(message.clone()),
                        other => Error::Unavailable(other.to_string()),
                    }));
                }
            }
        }
    }
}
