//! Heartbeats of every runner on this replica, renewed together: a runner stream (or a
//! unary `Heartbeat` call) hands its heartbeat to a task, which renews everything that
//! arrived meanwhile in one transaction. A stream's heartbeat waits up to [`LINGER`] for
//! others to join its batch; a unary one, which holds one of its tenant's few turns
//! until answered, goes to a task of its own that does not wait. Ten thousand runners
//! beating every two seconds cost under a hundred transactions a second, not five
//! thousand.
//!
//! One runner's heartbeat must never delay another's renewal past the lease TTL, so
//! what reaches the shared batches is bounded: callers pass only the leases the runner
//! really holds ([`Heartbeats::beat`] answers the others lost without the database);
//! unary heartbeats, which must ask the database which leases those are, name no more
//! than the runner can hold, are rate limited per runner and are taken a few at a time
//! per tenant ([`Heartbeats::admit_unary`]); and the batches have connections of their
//! own, so no other work can hold them up.

use std::sync::Arc;
use std::time::Duration;

use agentrun_shared::ids::{RunId, RunnerId};
use deadpool_postgres::Pool;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::batcher::Batcher;
use crate::error::{Error, Result};
use crate::limits::{InFlight, RateLimit};
use crate::store::Tenant;
use crate::store::leases::{self, Heartbeat, LeaseState, Renewed};

/// Most heartbeats renewed in one transaction.
const MAX_BATCH: usize = 2_000;
/// How long a batch waits for more heartbeats to join it: nothing next to a lease TTL of
/// seconds, and a fleet's heartbeats arrive spread over the interval, so without it a
/// batch held the few that came during the last transaction (5,000 runners: about three).
const LINGER: Duration = Duration::from_millis(10);
/// Heartbeats waiting for the batching task before senders wait too.
const QUEUE: usize = 10_000;
/// Heartbeats a runner may send per heartbeat interval, sustained; it is asked for one.
pub const BEATS_PER_INTERVAL: u32 = 4;
/// Heartbeats a runner may send at once before the sustained rate applies.
const BURST: u32 = 8;
/// Unary heartbeats of one tenant checked against the database at once.
pub const UNARY_IN_FLIGHT: usize = 2;

/// The handle runner streams and unary calls send their heartbeats through.
#[derive(Clone)]
pub struct Heartbeats {
    /// Runner streams' heartbeats: a batch waits [`LINGER`] for more to join it.
    streams: Batcher<Heartbeat, Renewed>,
    /// Unary heartbeats: each holds one of its tenant's few turns ([`UNARY_IN_FLIGHT`])
    /// until it is answered, so their batches do not wait.
    unary: Batcher<Heartbeat, Renewed>,
    rate: Arc<RateLimit<(Option<Tenant>, RunnerId)>>,
    interval: Duration,
    unary_in_flight: Arc<InFlight<Option<Tenant>>>,
}

impl Heartbeats {
    /// Starts the batching tasks on `pool` (its own: see the module documentation); they
    /// stop with `shutdown`. Runners are asked to beat every `interval`.
    pub fn start(
        pool: Pool,
        ttl: Duration,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let batcher = |linger| {
            let pool = pool.clone();
            Batcher::start(
                "heartbeat",
                MAX_BATCH,
                QUEUE,
                linger,
                shutdown.clone(),
                move |beats| {
                    let pool = pool.clone();
                    async move {
                        let started = std::time::Instant::now();
                        let renewed = leases::heartbeat(&pool, &beats, ttl).await;
                        if started.elapsed() > ttl / 4 {
                            tracing::warn!(took = ?started.elapsed(), beats = beats.len(), "slow heartbeat batch");
                        }
                        renewed
                    }
                },
            )
        };
        Self {
            streams: batcher(LINGER),
            unary: batcher(Duration::ZERO),
            rate: Arc::new(RateLimit::new(interval / BEATS_PER_INTERVAL, BURST)),
            interval,
            unary_in_flight: Arc::new(InFlight::new(UNARY_IN_FLIGHT)),
        }
    }

    /// Admits a unary `Heartbeat` (a stream beats one at a time and needs no limit):
    /// RESOURCE_EXHAUSTED when the runner beats faster than [`BEATS_PER_INTERVAL`] per
    /// heartbeat interval; otherwise waits until fewer than [`UNARY_IN_FLIGHT`] of its
    /// tenant's unary heartbeats are in flight. The call holds its turn until the permit
    /// is dropped.
    pub async fn admit_unary(
        &self,
        tenant: Option<&Tenant>,
        runner: RunnerId,
    ) -> Result<OwnedSemaphorePermit> {
        if self.rate.admit((tenant.cloned(), runner)) {
            return Ok(self.unary_in_flight.enter(tenant.cloned()).await);
        }
        Err(Error::ResourceExhausted(format!(
            "heartbeat rate limit: at most {BEATS_PER_INTERVAL} heartbeats per {} ms \
             (--heartbeat-interval-ms) per runner",
            self.interval.as_millis()
        )))
    }

    /// Renews the leases of a runner stream's `beat` for which `held` is true together
    /// with whatever other heartbeats are waiting; the rest are answered lost at once.
    /// Answers in order.
    pub async fn beat(
        &self,
        beat: Heartbeat,
        held: impl Fn(RunId, i64) -> bool,
    ) -> Result<Renewed> {
        renew(&self.streams, beat, held).await
    }

    /// [`Heartbeats::beat`] for a unary `Heartbeat` admitted by
    /// [`Heartbeats::admit_unary`].
    pub async fn beat_unary(
        &self,
        beat: Heartbeat,
        held: impl Fn(RunId, i64) -> bool,
    ) -> Result<Renewed> {
        renew(&self.unary, beat, held).await
    }
}

/// Renews the leases of `beat` for which `held` is true through `batcher`.
async fn renew(
    batcher: &Batcher<Heartbeat, Renewed>,
    beat: Heartbeat,
    held: impl Fn(RunId, i64) -> bool,
) -> Result<Renewed> {
    let named = beat.leases;
    let mask: Vec<bool> = named.iter().map(|&(run, epoch)| held(run, epoch)).collect();
    let beat = Heartbeat {
        leases: named
            .iter()
            .zip(&mask)
            .filter(|(_, held)| **held)
            .map(|(l, _)| *l)
            .collect(),
        ..beat
    };
    let renewed = batcher.submit(beat).await?;
    let mut states = renewed.leases.into_iter();
    let leases = named
        .into_iter()
        .zip(mask)
        .map(|((run_id, epoch), held)| match held {
            true => states.next().expect("one state per lease renewed"),
            false => LeaseState::lost(run_id, epoch),
        })
        .collect();
    Ok(Renewed { leases, ..renewed })
}
