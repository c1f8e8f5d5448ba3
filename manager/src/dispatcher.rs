//! The per-replica dispatcher: one claim serves the waiting credit of every runner
//! stream on this replica.
//!
//! Each runner stream takes a [`Seat`] and offers it the credit its runner gives. The
//! dispatcher task wakes when credit is offered or work may be claimable (a run created
//! here, a NOTIFY from another replica, the safety-net poll), groups the seats waiting
//! by what they can serve (tenant, queues, backend profiles, labels: a [`Shape`]) and
//! runs one claim per shape for all their credit ([`leases::claim_for`]); slots are
//! interleaved across the seats, so a small claim spreads over runners. Each claimed run
//! is put in its seat's inbox and that stream alone is woken. A new run therefore costs
//! one claim however many streams wait, and wakes only the stream that gets it.
//!
//! Credit is counted here, under one lock, so a runner is never given more than it
//! asked for: a seat's credit is what waits, plus what a claim in flight may fill, plus
//! what sits in its inbox. A seat whose runner has been silent for more than two
//! heartbeat intervals is passed over (its runner may be frozen or half-disconnected).
//!
//! Runs claimed for a stream that has gone meanwhile (its seat dropped) are released at
//! once, not left to their leases.
//!
//! Runs that wait for a rate limit's token are not announced by anyone when the token
//! comes: the claim says when that is, and the dispatcher sets itself a timer (one at a
//! time, the earliest) instead of waiting for the safety-net poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentrun_shared::ids::RunnerId;
use deadpool_postgres::Pool;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::store::leases::{self, Assignment, LeaseWrite, RunnerIdentity};

/// Most runs one claim statement asks for (as many as `ClaimRuns` allows): a fleet's
/// credit is claimed in rounds.
const MAX_SLOTS: usize = 1_000;

/// What a runner can serve: runners of one shape are served by one claim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Shape {
    tenant: Option<String>,
    queues: Vec<String>,
    backend_profiles: Vec<String>,
    labels: Vec<String>,
}

impl Shape {
    fn of(runner: &RunnerIdentity) -> Self {
        let sorted = |names: &[String]| {
            let mut names = names.to_vec();
            names.sort();
            names.dedup();
            names
        };
        Self {
            tenant: runner.tenant.as_ref().map(|t| t.as_str().to_owned()),
            queues: sorted(&runner.queues),
            backend_profiles: sorted(&runner.backend_profiles),
            labels: sorted(&runner.labels),
        }
    }
}

/// One stream's place at the dispatcher.
struct Place {
    runner: Arc<RunnerIdentity>,
    shape: Shape,
    /// Credit no claim is working on yet.
    waiting: i64,
    /// Credit the claim in flight may fill.
    claiming: i64,
    /// Runs claimed for the stream, not yet taken by it.
    inbox: Vec<Assignment>,
    /// Wakes the stream when its inbox fills.
    ready: Arc<Notify>,
    /// When its runner was last heard.
    heard: Instant,
    /// Passed over as silent with credit waiting: a wake-up is owed when it speaks.
    passed_over: bool,
}

#[derive(Default)]
struct Places {
    next_id: u64,
    by_id: HashMap<u64, Place>,
}

/// The seats of one shape's claim: who they are, and a runner per slot.
struct Claim {
    seats: Vec<u64>,
    runners: Vec<Arc<RunnerIdentity>>,
    slots: Vec<RunnerId>,
}

pub struct Dispatcher {
    places: Mutex<Places>,
    /// Credit was offered, or a silent runner spoke again.
    wake: Notify,
    /// When the pending rate-limit timer fires, if one is set ([`Dispatcher::wake_after`]).
    timer: Mutex<Option<Instant>>,
    pool: Pool,
    settings: Arc<Settings>,
    notifier: Arc<Notifier>,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    /// Starts the dispatcher task; it stops with `shutdown`.
    pub fn start(
        pool: Pool,
        settings: Arc<Settings>,
        notifier: Arc<Notifier>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let dispatcher = Arc::new(Self {
            places: Mutex::default(),
            wake: Notify::new(),
            timer: Mutex::new(None),
            pool,
            settings,
            notifier: notifier.clone(),
            metrics,
        });
        let work = notifier.subscribe_work();
        tokio::spawn(dispatcher.clone().run(work, shutdown));
        dispatcher
    }

    /// A seat for a runner stream; dropping it gives back what was claimed for it.
    pub fn seat(self: &Arc<Self>, runner: RunnerIdentity) -> Seat {
        let ready = Arc::new(Notify::new());
        let mut places = self.lock();
        places.next_id += 1;
        let id = places.next_id;
        places.by_id.insert(
            id,
            Place {
                shape: Shape::of(&runner),
                runner: Arc::new(runner),
                waiting: 0,
                claiming: 0,
                inbox: Vec::new(),
                ready: ready.clone(),
                heard: Instant::now(),
                passed_over: false,
            },
        );
        Seat {
            id,
            dispatcher: self.clone(),
            ready,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Places> {
        self.places.lock().expect("dispatcher lock")
    }

    fn silence(&self) -> Duration {
        2 * self.settings.heartbeat_interval()
    }

    async fn run(self: Arc<Self>, mut work: watch::Receiver<u64>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                changed = work.changed() => if changed.is_err() { return },
            }
            let claims = self.take_claims();
            futures_util::future::join_all(claims.into_iter().map(|c| self.claim(c))).await;
        }
    }

    /// Moves the waiting credit of every seat heard lately into claims, one per shape:
    /// slots taken round-robin across the shape's seats, at most [`MAX_SLOTS`] (what a
    /// claim that fills them all leaves waiting goes in the next round).
    fn take_claims(&self) -> Vec<Claim> {
        let silence = self.silence();
        let mut places = self.lock();
        let mut by_shape: HashMap<Shape, Vec<u64>> = HashMap::new();
        for (&id, place) in places.by_id.iter_mut() {
            if place.waiting <= 0 {
                continue;
            }
            if place.heard.elapsed() > silence {
                place.passed_over = true;
                continue;
            }
            by_shape.entry(place.shape.clone()).or_default().push(id);
        }
        let mut claims = Vec::with_capacity(by_shape.len());
        for mut seats in by_shape.into_values() {
            seats.sort_unstable();
            let mut slots = Vec::new();
            let mut taken: HashMap<u64, i64> = HashMap::new();
            'rounds: for round in 0.. {
                let mut any = false;
                for id in &seats {
                    let place = &places.by_id[id];
                    if place.waiting > round {
                        if slots.len() == MAX_SLOTS {
                            break 'rounds;
                        }
                        slots.push(place.runner.id);
                        *taken.entry(*id).or_default() += 1;
                        any = true;
                    }
                }
                if !any {
                    break;
                }
            }
            let mut runners = Vec::with_capacity(seats.len());
            for id in &seats {
                let place = places.by_id.get_mut(id).expect("a seat just seen");
                let n = taken.get(id).copied().unwrap_or(0);
                place.waiting -= n;
                place.claiming += n;
                runners.push(place.runner.clone());
            }
            claims.push(Claim {
                seats,
                runners,
                slots,
            });
        }
        claims
    }

    /// Runs one shape's claim and hands the runs to their seats.
    async fn claim(self: &Arc<Self>, claim: Claim) {
        let runners: Vec<&RunnerIdentity> = claim.runners.iter().map(|r| r.as_ref()).collect();
        let claimed = leases::claim_for(
            &self.pool,
            &runners,
            &claim.slots,
            None,
            self.settings.lease_ttl(),
            self.settings.tenant_max_active_runs,
        )
        .await;
        let claimed = match claimed {
            Ok(claimed) => {
                if let Some(after) = claimed.retry_in {
                    self.wake_after(after);
                }
                claimed.assignments
            }
            Err(err) => {
                // Nothing was taken: the credit waits for the next wake-up (the
                // safety-net poll comes while work is claimable).
                tracing::warn!(error = %err, "claim failed; retried on the next wake-up");
                Vec::new()
            }
        };
        self.metrics.claimed(&claimed);
        self.notifier
            .events_appended(claimed.iter().map(|a| a.run.id.0));
        let filled_all = claimed.len() == claim.slots.len();
        let mut orphans = Vec::new();
        {
            let mut places = self.lock();
            let by_runner: HashMap<RunnerId, u64> = claim
                .seats
                .iter()
                .filter_map(|id| Some((places.by_id.get(id)?.runner.id, *id)))
                .collect();
            for assignment in claimed {
                let seat = assignment
                    .run
                    .lease_runner_id
                    .and_then(|runner| by_runner.get(&runner))
                    .and_then(|id| places.by_id.get_mut(id));
                match seat {
                    Some(place) => {
                        place.claiming -= 1;
                        place.inbox.push(assignment);
                    }
                    None => {
                        let runner = claim
                            .runners
                            .iter()
                            .find(|r| Some(r.id) == assignment.run.lease_runner_id);
                        if let Some(runner) = runner {
                            orphans.push((assignment, runner.clone()));
                        }
                    }
                }
            }
            for id in &claim.seats {
                if let Some(place) = places.by_id.get_mut(id) {
                    // Unfilled: nothing more to claim now; it waits for a wake-up.
                    place.waiting += std::mem::take(&mut place.claiming);
                    if !place.inbox.is_empty() {
                        place.ready.notify_one();
                    }
                }
            }
        }
        if filled_all {
            // There may be more, and more credit may have come meanwhile.
            self.wake.notify_one();
        }
        self.give_back(orphans).await;
    }

    /// Wakes the dispatcher after `after` (runs wait for a rate limit's token), unless a
    /// timer set earlier fires sooner: at most one timer is pending.
    fn wake_after(self: &Arc<Self>, after: Duration) {
        let due = Instant::now() + after;
        {
            let mut timer = self.timer.lock().expect("dispatcher timer lock");
            if timer.is_some_and(|at| at <= due && at > Instant::now()) {
                return;
            }
            *timer = Some(due);
        }
        let dispatcher = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            if let Some(dispatcher) = dispatcher.upgrade() {
                let mut timer = dispatcher.timer.lock().expect("dispatcher timer lock");
                if *timer == Some(due) {
                    *timer = None;
                }
                drop(timer);
                dispatcher.wake.notify_one();
            }
        });
    }

    /// Releases runs claimed for streams that have gone (each with its runner), so
    /// another runner takes them now rather than after their leases expire.
    async fn give_back(&self, runs: Vec<(Assignment, Arc<RunnerIdentity>)>) {
        if runs.is_empty() {
            return;
        }
        for (assignment, runner) in runs {
            let release = LeaseWrite::Release {
                run_id: assignment.run.id,
                epoch: assignment.run.lease_epoch,
            };
            let released = leases::write_one(
                &self.pool,
                runner.id,
                runner.tenant.as_ref(),
                release,
                &self.settings.quotas(),
            )
            .await;
            if let Err(err) = released {
                tracing::warn!(run = %assignment.run.id, error = %err, "could not release a run claimed for a stream that left; its lease will expire");
            }
        }
        self.notifier.work_available();
    }
}

/// A runner stream's place at the [`Dispatcher`].
pub struct Seat {
    id: u64,
    dispatcher: Arc<Dispatcher>,
    ready: Arc<Notify>,
}

impl Seat {
    /// The runner gave `slots` more credit; it has `room` for runs beyond those it holds
    /// (taken from the inbox already). Never more is outstanding than the room.
    pub fn offer(&self, slots: i64, room: i64) {
        let mut places = self.dispatcher.lock();
        let Some(place) = places.by_id.get_mut(&self.id) else {
            return;
        };
        let outstanding = place.waiting + place.claiming + place.inbox.len() as i64;
        let wanted = (outstanding + slots).min(room);
        place.waiting = (wanted - place.claiming - place.inbox.len() as i64).max(0);
        if place.waiting > 0 {
            self.dispatcher.wake.notify_one();
        }
    }

    /// No more runs for this stream (draining): credit not being claimed is dropped.
    pub fn withdraw(&self) {
        if let Some(place) = self.dispatcher.lock().by_id.get_mut(&self.id) {
            place.waiting = 0;
        }
    }

    /// The runner spoke: it is trusted with work again.
    pub fn heard(&self) {
        let mut places = self.dispatcher.lock();
        if let Some(place) = places.by_id.get_mut(&self.id) {
            place.heard = Instant::now();
            if std::mem::take(&mut place.passed_over) && place.waiting > 0 {
                self.dispatcher.wake.notify_one();
            }
        }
    }

    /// Waits until runs are in the inbox.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// The runs claimed for this stream.
    pub fn take(&self) -> Vec<Assignment> {
        self.dispatcher
            .lock()
            .by_id
            .get_mut(&self.id)
            .map(|place| std::mem::take(&mut place.inbox))
            .unwrap_or_default()
    }

    /// Gives back runs this stream took but will not deliver (its key was revoked).
    pub async fn give_back(&self, runs: Vec<Assignment>) {
        let runner = self
            .dispatcher
            .lock()
            .by_id
            .get(&self.id)
            .map(|p| p.runner.clone());
        if let Some(runner) = runner {
            let runs = runs.into_iter().map(|a| (a, runner.clone())).collect();
            self.dispatcher.give_back(runs).await
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let left = self.dispatcher.lock().by_id.remove(&self.id);
        // A claim in flight finds the seat gone and releases what it took for it.
        if let Some(place) = left
            && !place.inbox.is_empty()
        {
            let dispatcher = self.dispatcher.clone();
            let runs = place
                .inbox
                .into_iter()
                .map(|a| (a, place.runner.clone()))
                .collect();
            tokio::spawn(async move { dispatcher.give_back(runs).await });
        }
    }
}
