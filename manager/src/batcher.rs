//! Requests of many callers settled together: each caller hands its request to one task,
//! which takes every request waiting (up to a batch), settles them in one go — one
//! database transaction — and answers each caller its own result. What heartbeats and
//! runner hellos cost then follows the database's batch rate, not one transaction each.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
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
    /// logs. `queue` requests may wait before callers wait too. A batch waits up to
    /// `linger` after its first request for more to join it (zero: none).
    pub fn start<S, F>(
        what: &'static str,
        max_batch: usize,
        queue: usize,
        linger: Duration,
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
                let until = Instant::now() + linger;
                while !linger.is_zero() && batch.len() < max_batch {
                    let room = max_batch - batch.len();
                    match tokio::time::timeout_at(until, incoming.recv_many(&mut batch, room)).await
                    {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::Batcher;

    /// Submits three requests 20 ms apart and returns the sizes of the batches they were
    /// settled in.
    async fn batch_sizes(linger: Duration) -> Vec<usize> {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let batcher = Batcher::start("test", 100, 100, linger, CancellationToken::new(), {
            move |requests: Vec<u32>| {
                seen.lock().unwrap().push(requests.len());
                async move { Ok(requests) }
            }
        });
        let mut calls = Vec::new();
        for n in 0..3 {
            let batcher = batcher.clone();
            calls.push(tokio::spawn(async move { batcher.submit(n).await }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (n, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), n as u32, "answered in order");
        }
        sizes.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn requests_arriving_within_the_linger_are_settled_together() {
        assert_eq!(batch_sizes(Duration::from_millis(500)).await, vec![3]);
    }

    #[tokio::test]
    async fn without_a_linger_each_batch_is_what_waits() {
        assert_eq!(batch_sizes(Duration::ZERO).await, vec![1, 1, 1]);
    }
}
