//! The runner's one `Connect` stream to the manager, and what it survives.
//!
//! A session: send `hello` naming the leases still held, apply the `welcome` (rewind each
//! run's outbox to what the manager acknowledged, drop lost runs, resend unacknowledged
//! finishes), give credit for the free slots, then until the stream ends: start assigned
//! runs, route commands to them, heartbeat all leases in one message, flush event
//! batches (on size, or after a few milliseconds of linger), and acknowledge finishes.
//! When the stream breaks the runs keep executing (their outboxes fill, then providers
//! wait) while the runner reconnects with capped, jittered exponential backoff.
//!
//! Slots: credit is given once per connection for the free slots, then one slot each
//! time a run leaves this runner — finished, released, lost on a heartbeat, revoked, or
//! refused by the manager (a `StreamError` naming it: the manager ends that run itself).
//! All of these go through [`Runner::end_run`], which gives the slot only if the run was
//! still held, so a run the manager reports gone twice (a refusal, then a revocation)
//! frees one slot, and only while not draining. Once a run has left, nothing more is
//! written for it: its task is aborted, its queued events and command acks are dropped.
//!
//! Limits: the welcome names the manager's `max_payload_bytes`, kept in a shared
//! [`PayloadLimit`] that every run's outbox fits events to (256 KiB until the first
//! welcome), and its `max_batch_events` / `max_batch_bytes`, which cut every event batch
//! ([`BatchLimits`]).
//!
//! On shutdown (SIGTERM) it drains: no more credit, running runs get the grace period to
//! finish, then the rest are released back to the queue, and it returns.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentrun_shared::proto::{self, manager_message::Body as In, runner_message::Body as Out};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::config::RunnerSettings;
use crate::executor::{self, RunContext, Upward};
use crate::fit::PayloadLimit;
use crate::observe::Observer;
use crate::outbox::{BatchLimits, Outbox};
use crate::provider::Providers;
use crate::wire::{self, EncodedAppend, Outgoing};

/// Messages queued towards the manager before the connection waits.
const OUTGOING: usize = 1024;
/// After the drain grace: how long released runs wait for the manager's acknowledgement.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// A run this process is executing.
struct RunHandle {
    epoch: i64,
    outbox: Arc<Outbox>,
    commands: mpsc::UnboundedSender<proto::Command>,
    abort: CancellationToken,
    /// Sent, not yet acknowledged: resent after a reconnect.
    finish: Option<proto::FinishRunRequest>,
}

/// Runs whose outbox has events to send.
#[derive(Default)]
struct Dirty {
    runs: Mutex<HashSet<String>>,
    notify: Notify,
}

impl Dirty {
    /// Marks a run as having events to send. Only the first mark since the last
    /// [`Dirty::take`] wakes the connection (it then lingers and takes them all): a
    /// streaming run marks itself for every token.
    fn mark(&self, run_id: &str) {
        let mut runs = self.runs.lock().expect("dirty lock");
        if runs.contains(run_id) {
            return;
        }
        let first = runs.is_empty();
        runs.insert(run_id.to_owned());
        drop(runs);
        if first {
            self.notify.notify_one();
        }
    }

    fn is_empty(&self) -> bool {
        self.runs.lock().expect("dirty lock").is_empty()
    }

    fn take(&self) -> HashSet<String> {
        std::mem::take(&mut *self.runs.lock().expect("dirty lock"))
    }
}

/// How a session ended.
enum SessionEnd {
    /// The stream broke or the manager went away: reconnect.
    Disconnected,
    /// Drained after shutdown: exit.
    Drained,
}

/// The runner: its identity, its runs, and the connection loop.
pub struct Runner {
    settings: RunnerSettings,
    identity: proto::RunnerIdentity,
    providers: Arc<Providers>,
    runs: HashMap<String, RunHandle>,
    upward_tx: mpsc::UnboundedSender<Upward>,
    upward_rx: mpsc::UnboundedReceiver<Upward>,
    dirty: Arc<Dirty>,
    draining: Option<Instant>,
    /// Connection attempts so far; picks the manager URL to try next.
    connections: usize,
    /// The manager's payload limit, updated by each welcome; every outbox obeys it.
    payload_limit: PayloadLimit,
    observer: Arc<Observer>,
    /// Sessions opened so far.
    sessions: usize,
}

impl Runner {
    pub fn new(
        settings: RunnerSettings,
        identity: proto::RunnerIdentity,
        providers: Providers,
    ) -> Self {
        let (upward_tx, upward_rx) = mpsc::unbounded_channel();
        let observer = Arc::new(Observer::new(settings.unhealthy_after()));
        Self {
            settings,
            identity,
            providers: Arc::new(providers),
            runs: HashMap::new(),
            upward_tx,
            upward_rx,
            dirty: Arc::new(Dirty::default()),
            draining: None,
            connections: 0,
            payload_limit: PayloadLimit::default(),
            observer,
            sessions: 0,
        }
    }

    /// The runner's metrics and health, for its endpoint.
    pub fn observer(&self) -> Arc<Observer> {
        self.observer.clone()
    }

    /// Connects, works, reconnects, until `shutdown` and the drain are done.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected_at = Instant::now();
            let ended = self.session(&shutdown).await;
            self.observer.disconnected();
            match ended {
                Ok(SessionEnd::Drained) => return Ok(()),
                Ok(SessionEnd::Disconnected) => {
                    tracing::warn!("disconnected from the manager; reconnecting")
                }
                // `:#` shows the cause chain: a TLS failure says why (e.g. an unknown issuer).
                Err(err) => {
                    tracing::warn!(
                        error = format!("{err:#}"),
                        "cannot reach the manager; retrying"
                    )
                }
            }
            if connected_at.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            // Full jitter: a fleet that lost its manager does not come back in lockstep.
            let wait = backoff.mul_f64(fastrand::f64());
            backoff = (backoff * 2).min(self.settings.max_backoff());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled(), if self.draining.is_none() => self.start_drain(),
            }
            if self
                .draining
                .is_some_and(|deadline| Instant::now() >= deadline)
                || (self.draining.is_some() && self.runs.is_empty())
            {
                // The manager cannot be reached to release runs; their leases expire.
                self.abort_all();
                return Ok(());
            }
        }
    }

    fn start_drain(&mut self) {
        tracing::info!(
            runs = self.runs.len(),
            "draining: no new work, finishing running runs"
        );
        self.draining = Some(Instant::now() + self.settings.drain_grace());
    }

    fn abort_all(&mut self) {
        for (_, run) in self.runs.drain() {
            run.abort.cancel();
        }
    }

    /// Connects to the next manager URL in turn.
    async fn connect(&mut self) -> anyhow::Result<Channel> {
        let urls = &self.settings.manager_url;
        anyhow::ensure!(!urls.is_empty(), "no manager URL configured");
        let url = urls[self.connections % urls.len()].clone();
        self.connections += 1;
        let channel = self
            .settings
            .tls()
            .endpoint(&url)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await?;
        Ok(channel)
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> anyhow::Result<SessionEnd> {
        let channel = self.connect().await?;
        let (tx, rx) = mpsc::channel::<Outgoing>(OUTGOING);
        let held: Vec<proto::LeaseRef> = self
            .runs
            .iter()
            .map(|(run_id, run)| proto::LeaseRef {
                run_id: run_id.clone(),
                epoch: run.epoch,
            })
            .collect();
        send(
            &tx,
            Out::Hello(proto::Hello {
                runner: Some(self.identity.clone()),
                held_leases: held,
            }),
        )
        .await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(key) = self.settings.api_key.as_deref().filter(|k| !k.is_empty()) {
            let value = format!("Bearer {key}")
                .parse()
                .map_err(|_| anyhow::anyhow!("AGENTRUN_API_KEY is not a valid header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut inbound = wire::connect(channel, request).await?;
        let Some(proto::ManagerMessage {
            body: Some(In::Welcome(welcome)),
        }) = inbound.message().await?
        else {
            anyhow::bail!("the manager did not answer hello with welcome");
        };
        // Before anything is resent: what is pushed from now on fits this manager.
        self.payload_limit
            .set_from_welcome(welcome.max_payload_bytes);
        let batch = BatchLimits::from_welcome(&welcome);
        self.apply_welcome(&welcome, batch, &tx).await;
        tracing::info!(manager = %welcome.manager_id, runs = self.runs.len(), "connected");
        self.observer.connected(self.sessions == 0);
        self.sessions += 1;
        if self.draining.is_none() {
            let free = self.free_slots();
            if free > 0 {
                send(&tx, Out::Credit(proto::Credit { slots: free })).await;
            }
        }

        let heartbeat_every = Duration::from_millis(welcome.heartbeat_interval_ms.max(100) as u64);
        let mut heartbeat =
            tokio::time::interval_at(Instant::now() + heartbeat_every, heartbeat_every);
        // Runs marked before this session (its wake-up may have gone to the last one)
        // are sent after the usual linger.
        let mut linger: Option<Instant> =
            (!self.dirty.is_empty()).then(|| Instant::now() + self.settings.linger());
        loop {
            if let Some(deadline) = self.draining {
                if self.runs.is_empty() {
                    return Ok(SessionEnd::Drained);
                }
                if Instant::now() >= deadline {
                    self.release_all(&tx).await;
                }
                if Instant::now() >= deadline + RELEASE_WAIT {
                    // Releases not acknowledged in time: their leases simply expire.
                    self.abort_all();
                    return Ok(SessionEnd::Drained);
                }
            }
            let drain_wake = match self.draining {
                Some(deadline) if Instant::now() < deadline => deadline,
                Some(deadline) => deadline + RELEASE_WAIT,
                None => Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                message = inbound.message() => match message? {
                    Some(proto::ManagerMessage { body: Some(body) }) => {
                        self.observer.heard_from_manager();
                        self.on_message(body, &tx).await
                    }
                    Some(_) => {}
                    None => return Ok(SessionEnd::Disconnected),
                },
                Some(upward) = self.upward_rx.recv() => self.on_upward(upward, batch, &tx).await,
                _ = self.dirty.notify.notified() => {
                    linger.get_or_insert_with(|| Instant::now() + self.settings.linger());
                }
                _ = sleep_until(linger), if linger.is_some() => {
                    linger = None;
                    for run_id in self.dirty.take() {
                        self.flush_run(&run_id, batch, &tx).await;
                    }
                }
                _ = heartbeat.tick() => {
                    let leases = self
                        .runs
                        .iter()
                        .map(|(run_id, run)| proto::LeaseRef { run_id: run_id.clone(), epoch: run.epoch })
                        .collect();
                    send(&tx, Out::Heartbeat(proto::HeartbeatRequest { runner_id: self.identity.runner_id.clone(), leases })).await;
                }
                _ = shutdown.cancelled(), if self.draining.is_none() => self.start_drain(),
                _ = tokio::time::sleep_until(drain_wake), if self.draining.is_some() => {}
            }
        }
    }

    fn free_slots(&self) -> i32 {
        (self.settings.max_concurrency as i32 - self.runs.len() as i32).max(0)
    }

    async fn apply_welcome(
        &mut self,
        welcome: &proto::Welcome,
        batch: BatchLimits,
        tx: &mpsc::Sender<Outgoing>,
    ) {
        for lost in &welcome.lost {
            // No credit here: the credit for every free slot follows the welcome. (A
            // finish sent before the break may be why the lease is gone.)
            self.remove_run(&lost.run_id, Some("lease lost while disconnected"));
        }
        for resumed in &welcome.resumed {
            let Some(run) = self.runs.get(&resumed.run_id) else {
                continue;
            };
            run.outbox.rewind(resumed.acked_runner_seq);
            match run.finish.clone() {
                // The unacknowledged events go again, the finish right behind them.
                Some(finish) => {
                    self.flush_run(&resumed.run_id, batch, tx).await;
                    send(tx, Out::Finish(finish)).await;
                }
                None => self.dirty.mark(&resumed.run_id),
            }
        }
    }

    async fn on_message(&mut self, body: In, tx: &mpsc::Sender<Outgoing>) {
        match body {
            In::Assignment(assignment) => self.start_run(*assignment, tx).await,
            In::Heartbeat(response) => {
                for lease in response.leases {
                    if !lease.held {
                        self.end_run(&lease.run_id, Some("lease lost"), tx).await;
                        continue;
                    }
                    for command in lease.commands {
                        self.route(&lease.run_id, lease.epoch, command);
                    }
                }
            }
            In::EventAck(ack) => {
                if let (Some(run), Some(result)) = (self.runs.get(&ack.run_id), ack.result)
                    && run.epoch == ack.epoch
                {
                    run.outbox.ack(result.acked_runner_seq);
                }
            }
            In::Command(delivery) => {
                if let Some(command) = delivery.command {
                    self.route(&delivery.run_id, delivery.epoch, command);
                }
            }
            In::LeaseRevoked(revoked) => {
                self.end_run(&revoked.run_id, Some(&revoked.reason), tx)
                    .await
            }
            In::Drain(drain) if drain.reconnect => {
                // Only this connection goes away (its manager replica is shutting down).
                tracing::info!("the manager asked us to drain this connection; reconnecting")
            }
            In::Drain(_) => {
                // An operator drained this runner: exactly as on SIGTERM — no more credit,
                // finish the running runs within the grace, release the rest, exit.
                tracing::info!("the manager asked this runner to drain and exit");
                if self.draining.is_none() {
                    self.start_drain();
                }
            }
            In::Error(error) => {
                tracing::warn!(run = %error.run_id, code = %error.code, message = %error.message, "the manager refused a message");
                // A refused run cannot make progress here: the manager ends it (failed
                // with the refusal's reason) and drops its lease; stop it and write
                // nothing more. A refusal of a write still in flight for a run that has
                // left already frees nothing.
                if !error.run_id.is_empty() {
                    self.end_run(&error.run_id, Some(&error.message), tx).await;
                }
            }
            In::FinishAck(ack) => self.end_run(&ack.run_id, None, tx).await,
            In::Welcome(_) => tracing::warn!("unexpected second welcome ignored"),
        }
    }

    /// What a run's task asks for, unless the run has left meanwhile (then nothing more
    /// is written for it).
    async fn on_upward(&mut self, upward: Upward, batch: BatchLimits, tx: &mpsc::Sender<Outgoing>) {
        match upward {
            Upward::CommandAck(ack) => {
                if !self.holds(&ack.run_id, ack.epoch) {
                    return;
                }
                // The ack must not overtake events the run pushed before it.
                self.flush_run(&ack.run_id, batch, tx).await;
                send(tx, Out::CommandAck(ack)).await;
            }
            Upward::Finish(finish) => {
                if !self.holds(&finish.run_id, finish.epoch) {
                    return;
                }
                // Behind the run's last events, on the same ordered stream.
                self.flush_run(&finish.run_id, batch, tx).await;
                if let Some(run) = self.runs.get_mut(&finish.run_id) {
                    run.finish = Some(finish.clone());
                    send(tx, Out::Finish(finish)).await;
                }
            }
        }
    }

    /// This runner still works on the run under `epoch` (not released, not aborted).
    fn holds(&self, run_id: &str, epoch: i64) -> bool {
        self.runs
            .get(run_id)
            .is_some_and(|run| run.epoch == epoch && !run.abort.is_cancelled())
    }

    async fn start_run(&mut self, assignment: proto::Assignment, tx: &mpsc::Sender<Outgoing>) {
        let Some(run) = assignment.run else { return };
        if self.runs.contains_key(&run.run_id) {
            return;
        }
        if self.draining.is_some() {
            // Credit given before the drain began: give the run straight back.
            send(
                tx,
                Out::Release(proto::Release {
                    run_id: run.run_id.clone(),
                    epoch: assignment.epoch,
                    reason: "draining".into(),
                }),
            )
            .await;
            return;
        }
        let dirty = self.dirty.clone();
        let run_id = run.run_id.clone();
        let abort = CancellationToken::new();
        let outbox = Outbox::new(
            self.settings.max_buffered_events,
            self.payload_limit.clone(),
            abort.clone(),
            move || dirty.mark(&run_id),
        );
        let outbox = Arc::new(
            outbox.replaying_large_replies(run.stream_mode == proto::StreamMode::Final as i32),
        );
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        for command in assignment.commands {
            let _ = commands_tx.send(command);
        }
        let ctx = RunContext {
            run: run.clone(),
            epoch: assignment.epoch,
            runner_id: self.identity.runner_id.clone(),
            providers: self.providers.clone(),
            outbox: outbox.clone(),
            upward: self.upward_tx.clone(),
            abort: abort.clone(),
            idle_timeout: self.settings.idle_timeout(),
            context: executor::context_of(&assignment.context),
            provider_thread_id: Some(assignment.provider_thread_id).filter(|t| !t.is_empty()),
            observer: self.observer.clone(),
            trace_parent: Some(assignment.trace_parent).filter(|t| !t.is_empty()),
            last_turn: assignment.last_turn,
        };
        tracing::info!(run = %run.run_id, epoch = assignment.epoch, profile = %run.backend_profile, "run assigned");
        self.observer.run_started();
        tokio::spawn(executor::execute(ctx, commands_rx));
        self.runs.insert(
            run.run_id,
            RunHandle {
                epoch: assignment.epoch,
                outbox,
                commands: commands_tx,
                abort,
                finish: None,
            },
        );
    }

    fn route(&self, run_id: &str, epoch: i64, command: proto::Command) {
        if let Some(run) = self.runs.get(run_id)
            && run.epoch == epoch
        {
            let _ = run.commands.send(command);
        }
    }

    /// A run has left this runner (finished, released, lost, revoked or refused): stops
    /// it and gives its slot back. The one place slots are returned after the welcome;
    /// a run already gone gives nothing, so each run frees its slot exactly once.
    async fn end_run(&mut self, run_id: &str, why: Option<&str>, tx: &mpsc::Sender<Outgoing>) {
        if self.remove_run(run_id, why) && self.draining.is_none() {
            send(tx, Out::Credit(proto::Credit { slots: 1 })).await;
        }
    }

    /// Takes the run out and aborts its task; `why` is set when the lease ended under
    /// it rather than by its own finish or release. Returns whether it was held.
    fn remove_run(&mut self, run_id: &str, why: Option<&str>) -> bool {
        let Some(run) = self.runs.remove(run_id) else {
            return false;
        };
        let outcome = match &run.finish {
            Some(finish) => {
                let status = finish.status().as_str_name();
                status
                    .trim_start_matches("RUN_STATUS_")
                    .to_ascii_lowercase()
            }
            None if run.abort.is_cancelled() => "released".into(),
            None => "lost".into(),
        };
        if let Some(why) = why
            && run.finish.is_none()
        {
            tracing::warn!(run = %run_id, reason = %why, "stopping a run whose lease is gone");
        }
        run.abort.cancel();
        self.observer.run_ended(&outcome);
        true
    }

    async fn flush_run(&self, run_id: &str, batch: BatchLimits, tx: &mpsc::Sender<Outgoing>) {
        // An aborted run (released) writes nothing more.
        let Some(run) = self.runs.get(run_id).filter(|r| !r.abort.is_cancelled()) else {
            return;
        };
        loop {
            let events = run.outbox.take_unsent(batch);
            if events.is_empty() {
                return;
            }
            self.observer.batch_sent(events.len());
            let append = EncodedAppend {
                runner_id: self.identity.runner_id.clone(),
                run_id: run_id.to_owned(),
                epoch: run.epoch,
                events,
            };
            send(tx, append).await;
        }
    }

    /// Past the drain deadline: give every unfinished run back to the queue.
    async fn release_all(&mut self, tx: &mpsc::Sender<Outgoing>) {
        for (run_id, run) in &mut self.runs {
            if run.finish.is_some() || run.abort.is_cancelled() {
                continue;
            }
            tracing::info!(run = %run_id, "drain grace over: releasing the run");
            run.abort.cancel();
            send(
                tx,
                Out::Release(proto::Release {
                    run_id: run_id.clone(),
                    epoch: run.epoch,
                    reason: "runner draining".into(),
                }),
            )
            .await;
        }
    }
}

async fn send(tx: &mpsc::Sender<Outgoing>, message: impl Into<Outgoing>) {
    // A failed send means the stream is gone; the session loop notices and reconnects.
    let _ = tx.send(message.into()).await;
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: RunnerSettings,
    }

    fn runner() -> Runner {
        let settings = Cli::try_parse_from(["agentrun-runner"])
            .expect("defaults parse")
            .settings;
        Runner::new(settings, proto::RunnerIdentity::default(), Vec::new())
    }

    /// Whether `dirty` has woken the connection: a permit is waiting (polled once).
    fn woken(dirty: &Dirty) -> bool {
        use std::future::Future;
        use std::task::{Context, Waker};
        let notified = std::pin::pin!(dirty.notify.notified());
        notified
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    #[test]
    fn only_the_first_mark_since_a_take_wakes_the_connection() {
        let dirty = Dirty {
            runs: Mutex::new(HashSet::new()),
            notify: Notify::new(),
        };
        dirty.mark("run-a");
        dirty.mark("run-a");
        dirty.mark("run-b");
        assert!(woken(&dirty), "the first mark wakes");
        assert!(!woken(&dirty), "the others do not");
        assert_eq!(dirty.take().len(), 2, "every marked run is taken");
        assert!(dirty.is_empty());
        dirty.mark("run-a");
        assert!(woken(&dirty), "a mark after a take wakes again");
    }

    /// Puts a run into the runner as if it had been assigned; returns its abort token.
    fn hold(runner: &mut Runner, run_id: &str) -> CancellationToken {
        let abort = CancellationToken::new();
        let (commands, _) = mpsc::unbounded_channel();
        let outbox = Outbox::new(10, PayloadLimit::default(), abort.clone(), || {});
        runner.runs.insert(
            run_id.to_owned(),
            RunHandle {
                epoch: 1,
                outbox: Arc::new(outbox),
                commands,
                abort: abort.clone(),
                finish: None,
            },
        );
        abort
    }

    /// The slots of credit sent since the last call.
    fn credit(rx: &mut mpsc::Receiver<Outgoing>) -> i32 {
        let mut slots = 0;
        while let Ok(message) = rx.try_recv() {
            if let Outgoing::Message(proto::RunnerMessage {
                body: Some(Out::Credit(credit)),
            }) = message
            {
                slots += credit.slots;
            }
        }
        slots
    }

    fn lost_on_heartbeat(run_id: &str) -> In {
        In::Heartbeat(proto::HeartbeatResponse {
            leases: vec![proto::LeaseStatus {
                run_id: run_id.into(),
                epoch: 1,
                held: false,
                ..Default::default()
            }],
            lease_ttl_ms: 2_000,
        })
    }

    fn revoked(run_id: &str) -> In {
        In::LeaseRevoked(proto::LeaseRevoked {
            run_id: run_id.into(),
            epoch: 1,
            reason: "run_timeout".into(),
        })
    }

    fn refused(run_id: &str) -> In {
        In::Error(proto::StreamError {
            run_id: run_id.into(),
            code: "INVALID_ARGUMENT".into(),
            message: "invalid events[0].payload_json: too large".into(),
        })
    }

    fn finished(run_id: &str) -> In {
        In::FinishAck(proto::FinishAck {
            run_id: run_id.into(),
            epoch: 1,
            status: proto::RunStatus::Completed as i32,
        })
    }

    #[tokio::test]
    async fn a_lease_lost_on_heartbeat_gives_its_slot_back_once() {
        let mut runner = runner();
        let (tx, mut rx) = mpsc::channel(16);
        let abort = hold(&mut runner, "r1");
        runner.on_message(lost_on_heartbeat("r1"), &tx).await;
        assert!(abort.is_cancelled() && runner.runs.is_empty());
        assert_eq!(credit(&mut rx), 1);
        // The manager may say so twice; the slot was returned already.
        runner.on_message(revoked("r1"), &tx).await;
        runner.on_message(lost_on_heartbeat("r1"), &tx).await;
        assert_eq!(credit(&mut rx), 0);
    }

    #[tokio::test]
    async fn a_revoked_lease_gives_its_slot_back_once() {
        let mut runner = runner();
        let (tx, mut rx) = mpsc::channel(16);
        let abort = hold(&mut runner, "r1");
        runner.on_message(revoked("r1"), &tx).await;
        assert!(abort.is_cancelled() && runner.runs.is_empty());
        assert_eq!(credit(&mut rx), 1);
        runner.on_message(lost_on_heartbeat("r1"), &tx).await;
        runner.on_message(refused("r1"), &tx).await;
        assert_eq!(credit(&mut rx), 0);
    }

    #[tokio::test]
    async fn a_refused_run_gives_its_slot_back_once() {
        let mut runner = runner();
        let (tx, mut rx) = mpsc::channel(16);
        let abort = hold(&mut runner, "r1");
        runner.on_message(refused("r1"), &tx).await;
        assert!(abort.is_cancelled() && runner.runs.is_empty());
        assert_eq!(credit(&mut rx), 1);
        // The manager ends the refused run itself, and may refuse writes still in
        // flight: neither frees another slot.
        runner.on_message(refused("r1"), &tx).await;
        runner.on_message(revoked("r1"), &tx).await;
        runner.on_message(lost_on_heartbeat("r1"), &tx).await;
        assert_eq!(credit(&mut rx), 0);
    }

    #[tokio::test]
    async fn a_refusal_for_a_run_not_held_gives_no_slot() {
        let mut runner = runner();
        let (tx, mut rx) = mpsc::channel(16);
        hold(&mut runner, "r1");
        runner.on_message(refused("r2"), &tx).await;
        assert_eq!(credit(&mut rx), 0);
        assert!(runner.runs.contains_key("r1"));
    }

    #[tokio::test]
    async fn a_finished_run_gives_its_slot_back_once() {
        let mut runner = runner();
        let (tx, mut rx) = mpsc::channel(16);
        hold(&mut runner, "r1");
        runner.on_message(finished("r1"), &tx).await;
        runner.on_message(finished("r1"), &tx).await;
        runner.on_message(revoked("r1"), &tx).await;
        assert_eq!(credit(&mut rx), 1);
    }

    #[tokio::test]
    async fn a_draining_runner_gives_no_slot_back() {
        let mut runner = runner();
        let (tx, mut rx) = mpsc::channel(16);
        for run in ["r1", "r2", "r3", "r4"] {
            hold(&mut runner, run);
        }
        runner.start_drain();
        runner.on_message(lost_on_heartbeat("r1"), &tx).await;
        runner.on_message(revoked("r2"), &tx).await;
        runner.on_message(refused("r3"), &tx).await;
        runner.on_message(finished("r4"), &tx).await;
        assert!(runner.runs.is_empty());
        assert_eq!(credit(&mut rx), 0);
    }

    fn command_ack(run_id: &str) -> Upward {
        Upward::CommandAck(proto::CommandAck {
            run_id: run_id.into(),
            epoch: 1,
            update: Some(proto::CommandUpdate {
                command_id: "c1".into(),
                status: proto::CommandStatus::Completed as i32,
                error: String::new(),
            }),
        })
    }

    #[tokio::test]
    async fn nothing_more_is_written_for_a_run_that_has_left() {
        let mut runner = runner();
        let (tx, mut rx) = mpsc::channel(16);
        let batch = BatchLimits {
            max_events: 100,
            max_bytes: 1 << 20,
        };
        hold(&mut runner, "r1");
        runner.on_upward(command_ack("r1"), batch, &tx).await;
        assert!(matches!(
            rx.try_recv(),
            Ok(Outgoing::Message(proto::RunnerMessage {
                body: Some(Out::CommandAck(_))
            }))
        ));
        runner.on_message(refused("r1"), &tx).await;
        assert_eq!(credit(&mut rx), 1);
        // The run's task acked a command before it saw the abort: that stays here.
        runner.on_upward(command_ack("r1"), batch, &tx).await;
        assert!(rx.try_recv().is_err(), "nothing is sent for a refused run");
    }
}
