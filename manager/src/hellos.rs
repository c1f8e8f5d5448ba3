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
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::batcher::Batcher;
use crate::error::Result;
use crate::store::leases::{self, Hello, Welcome};

/// Most hellos settled in one transaction.
const MAX_BATCH: usize = 1_000;
/// Hellos waiting for the batching task before new streams wait too.
const QUEUE: usize = 10_000;

/// The handle new runner streams say hello through.
#[derive(Clone)]
pub struct Hellos {
    batcher: Batcher<Hello, Welcome>,
}

impl Hellos {
    /// Starts the batching task on `pool` (its own: see the module documentation); it
    /// stops with `shutdown`. Runners are recorded as connected to replica `manager_id`,
    /// their leases renewed for `ttl`.
    pub fn start(pool: Pool, ttl: Duration, manager_id: Uuid, shutdown: CancellationToken) -> Self {
        let batcher = Batcher::start(
            "hello",
            MAX_BATCH,
            QUEUE,
            Duration::ZERO,
            shutdown,
            move |hellos| {
                let pool = pool.clone();
                async move {
                    let started = std::time::Instant::now();
                    let settled = leases::hello(&pool, &hellos, ttl, manager_id).await;
                    tracing::debug!(took = ?started.elapsed(), hellos = hellos.len(), "hello batch");
                    settled
                }
            },
        );
        Self { batcher }
    }

    /// Registers the runner and settles its leases together with whatever other hellos
    /// are waiting.
    pub async fn hello(&self, hello: Hello) -> Result<Welcome> {
        self.batcher.submit(hello).await
    }
}
