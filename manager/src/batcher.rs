//! Requests of many callers settled together: each caller hands its request to one task,
//! which takes every request waiting (up to a batch), settles them in one go — one
//! database transaction — and answers each caller its own result. What heartbeats and
//! runner hellos cost then follows the database's batch rate, not one transaction each.

use std::future::Future;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

type Reply<T> = oneshot::Sender<Result<T>>;

/// The handle callers submit requests through; cloned freely.
pub struct Batcher<R, T> {
    queue: mpsc::Sender<(R, Reply<T>)>,
}

impl<R, T> Clone for Batcher<R, T> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

impl<R: Send + 'static, T: Send + 'static> Batcher<R, T> {
    /// Starts the task, which stops with `shutdown`. `settle` answers a batch of at most
    /// `max_batch` requests in order, or fails it whole; `what` names the requests in
    /// logs. `queue` requests may wait before callers wait too.
    pub fn start<S, F>(
        what: &'static str,
        max_batch: usize,
        queue: usize,
        shutdown: CancellationToken,
        mut settle: S,
    ) -> Self
    where
        S: FnMut(Vec<R>) -> F + Send + 'static,
        F: Future<Output = Result<Vec<T>>> + Send,
    {
        let (queue, mut incoming) = mpsc::channel::<(R, Reply<T>)>(queue);
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = incoming.recv_many(&mut batch, max_batch) => received,
                };
                if received == 0 {
                    return;
                }
                let (requests, replies): (Vec<R>, Vec<Reply<T>>) = batch.drain(..).unzip();
                match settle(requests).await {
                    Ok(answers) => {
                        for (reply, answer) in replies.into_iter().zip(answers) {
                            // A caller that went away meanwhile has nothing to undo.
                            let _ = reply.send(Ok(answer));
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, count = replies.len(), "{what} batch failed");
                        for reply in replies {
                            let _ = reply.send(Err(match &err {
                                Error::Internal(message) => Error::Internal(message.clone()),
                                other => Error::Unavailable(other.to_string()),
                            }));
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// Settles `request` together with whatever others are waiting.
    pub async fn submit(&self, request: R) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Unavailable("the manager is shutting down".into());
        self.queue
            .send((request, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}
