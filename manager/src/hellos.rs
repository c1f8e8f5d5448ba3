//! Hellos of every runner connecting to this replica, settled together: a new runner
//! stream hands its (validated) hello to one task, which registers every runner waiting
//! and gives back their runs in one transaction ([`leases::hello`]), then answers each
//! stream its own welcome. When a replica is lost and its fleet reconnects at once, ten
//! thousand hellos cost a few dozen transactions, not ten thousand: the storm is bounded
//! by the database's batch rate, not its transaction rate.
//!
//! The task has a database connection of its own
//! ([`HELLO_POOL_SIZE`](crate::startup::HELLO_POOL_SIZE)): the claims of runners already
//! welcomed must not queue ahead of the welcomes still owed.
//!
//! A batch that fails for a transient reason is retried inside [`leases::hello`]; if it
//! still fails, every stream in it is answered UNAVAILABLE and its runner reconnects.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::store::leases::{self, Hello, Welcome};

/// Most hellos settled in one transaction.
const MAX_BATCH: usize = 1_000;
/// Hellos waiting for the batching task before new streams wait too.
const QUEUE: usize = 10_000;

type Reply = oneshot::Sender<Result<Welcome>>;

/// The handle new runner streams say hello through.
#[derive(Clone)]
pub struct Hellos {
    queue: mpsc::Sender<(Hello, Reply)>,
}

impl Hellos {
    /// Starts the batching task on `pool` (its own: see the module documentation); it stops with `shutdown`. Runners are
    /// recorded as connected to replica `manager_id`, their leases renewed for `ttl`.
    pub fn start(pool: Pool, ttl: Duration, manager_id: Uuid, shutdown: CancellationToken) -> Self {
        let (queue, incoming) = mpsc::channel(QUEUE);
        tokio::spawn(settle_batches(pool, ttl, manager_id, incoming, shutdown));
        Self { queue }
    }

    /// Registers the runner and settles its leases together with whatever other hellos
    /// are waiting.
    pub async fn hello(&self, hello: Hello) -> Result<Welcome> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Error::Unavailable("the manager is shutting down".into());
        self.queue
            .send((hello, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn settle_batches(
    pool: Pool,
    ttl: Duration,
    manager_id: Uuid,
    mut incoming: mpsc::Receiver<(Hello, Reply)>,
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
        let (hellos, replies): (Vec<Hello>, Vec<Reply>) = batch.drain(..).unzip();
        let started = std::time::Instant::now();
        let settled = leases::hello(&pool, &hellos, ttl, manager_id).await;
        tracing::debug!(took = ?started.elapsed(), hellos = hellos.len(), "hello batch");
        match settled {
            Ok(welcomes) => {
                for (reply, welcome) in replies.into_iter().zip(welcomes) {
                    // A runner that went away meanwhile keeps its leases until they expire
                    // or it comes back; nothing to undo.
                    let _ = reply.send(Ok(welcome));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, hellos = replies.len(), "hello batch failed");
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
