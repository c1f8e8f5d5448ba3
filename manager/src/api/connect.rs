//! `RunnerService.Connect`: one bidirectional stream per runner process.
//!
//! The runner opens with `hello`; the manager settles its leases and returns the stream
//! at once. One session task per stream (tracked, so shutdown waits for it) owns the
//! inbound side and writes into the bounded outbound channel tonic is already reading:
//! it first sends the `welcome` and whatever the runner is owed (commands of resumed
//! leases, adopted runs — any number of them), then reacts to four things: messages from
//! the runner (credit, heartbeats, event batches, command acks, finishes, releases —
//! each applied to the store in order and acknowledged only after commit), runs the
//! replica's [`Dispatcher`](crate::dispatcher) claimed for the runner's credit (they are
//! pushed), wake-ups saying a held run has new commands (they are delivered), and the
//! key re-check. Manager shutdown sends `drain` and ends the stream; the runner
//! reconnects elsewhere with its leases. An operator's drain (the runner's `draining`
//! flag, set through any replica) is read by its heartbeats: the session withdraws its
//! credit and sends `drain` with `reconnect: false`; the runner finishes its runs over
//! the still-open stream and exits.
//!
//! A refused write of a held run (anything but `lease_lost`) fails that run and releases
//! its lease, so the runner's slot and the manager's view of it stay in step.
//!
//! The runner's API key is re-checked at each heartbeat, before every assignment, at
//! least every [`super::auth::STREAM_RECHECK_INTERVAL`], and at once when a key is
//! revoked anywhere ([`StreamKey`]). A revoked or expired key ends the
//! stream UNAUTHENTICATED; the runs it held are left to their leases, as for any runner
//! that went away: they expire and the runs are requeued for another runner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentrun_shared::error::reason;
use agentrun_shared::ids::RunId;
use agentrun_shared::payload;
use agentrun_shared::proto::{self, manager_message::Body as Out, runner_message::Body as In};
use agentrun_shared::state::RunStatus;
use futures_util::FutureExt;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::auth::StreamKey;
use super::runner_messages::{
    append_write, delivered_to, finish_write, heartbeat_response, lease_refs, release_write,
    runner_identity,
};
use super::{AppState, convert};
use crate::dispatcher::Seat;
use crate::error::Error;
use crate::store::Tenant;
use crate::store::leases::{self, Heartbeat, Hello, LeaseWrite, RunnerIdentity, Welcome, Written};
use crate::store::runs::Finish;

/// How long a runner has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages buffered towards a runner before the session waits for it to read.
const OUTBOX: usize = 1024;
/// Most runner messages applied in one transaction.
const MAX_BATCH: usize = 1024;

pub type ManagerStream = ReceiverStream<Result<proto::ManagerMessage, Status>>;

/// Settles the runner's leases (its hello, batched with other runners' by
/// [`crate::hellos`]), then starts the session task and returns the
/// stream it writes to. Nothing is queued towards the runner before the stream is handed
/// to tonic: the session task sends the welcome and the backlog (command deliveries,
/// adopted runs — any number of them) while tonic is already reading, so a bounded
/// channel can never block the handler.
pub async fn open(
    state: AppState,
    tenant: Option<Tenant>,
    key: Option<uuid::Uuid>,
    mut inbound: Streaming<proto::RunnerMessage>,
) -> Result<ManagerStream, Status> {
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
    let Some(proto::RunnerMessage {
        body: Some(In::Hello(hello)),
    }) = first
    else {
        return Err(Error::invalid("body", "the first message must be hello").into());
    };
    let mut runner = runner_identity(hello.runner.as_ref()).map_err(Error::from)?;
    runner.tenant = tenant;
    let named = lease_refs("held_leases", &hello.held_leases).map_err(Error::from)?;
    let welcome = state
        .hellos
        .hello(Hello {
            runner: runner.clone(),
            named,
        })
        .await?;

    let (out, rx) = mpsc::channel(OUTBOX);
    let span = tracing::info_span!("runner_session", runner = %runner.id);
    let key = StreamKey::new(key, &state.notifier);
    let session = Session::new(state.clone(), runner, key, out);
    // Tracked: on shutdown the manager waits for every session to end.
    state.tasks.spawn(tracing::Instrument::instrument(
        session.run(welcome, inbound),
        span,
    ));
    Ok(ReceiverStream::new(rx))
}

/// `first` and every further message already received, without waiting, up to
/// [`MAX_BATCH`] messages or `max_events` events (a transaction stays short, so events
/// reach watchers soon); and whether the stream ended behind them.
fn read_ready(
    inbound: &mut Streaming<proto::RunnerMessage>,
    first: proto::RunnerMessage,
    max_events: usize,
) -> (Vec<proto::RunnerMessage>, bool) {
    let events = |message: &proto::RunnerMessage| match &message.body {
        Some(In::Events(batch)) => batch.events.len(),
        _ => 0,
    };
    let mut total = events(&first);
    let mut messages = vec![first];
    while messages.len() < MAX_BATCH && total < max_events {
        match inbound.message().now_or_never() {
            Some(Ok(Some(message))) => {
                total += events(&message);
                messages.push(message);
            }
            None => return (messages, false),
            Some(Ok(None) | Err(_)) => return (messages, true),
        }
    }
    (messages, false)
}

fn command_delivery(
    run_id: RunId,
    epoch: i64,
    command: &crate::store::commands::CommandRecord,
) -> Out {
    Out::Command(proto::CommandDelivery {
        run_id: run_id.to_string(),
        epoch,
        command: Some(convert::command(command)),
    })
}

/// How a runner's write is answered once stored.
enum Reply {
    EventAck {
        events: usize,
    },
    /// Command acknowledgements are not answered.
    None,
    FinishAck,
    Released,
}

struct Session {
    state: AppState,
    runner: RunnerIdentity,
    out: mpsc::Sender<Result<proto::ManagerMessage, Status>>,
    /// Where the runner's credit waits for the replica's claims, and its runs arrive.
    seat: Seat,
    /// Leases held through this stream: run -> epoch.
    held: HashMap<RunId, i64>,
    /// Woken when a held run gets commands.
    commands_woken: Arc<Notify>,
    /// Nothing more is assigned: the manager is shutting down or an operator drained
    /// the runner.
    draining: bool,
    /// Finishes failing the held runs whose writes were refused, stored after the batch
    /// that refused them (see [`Session::refuse`]).
    refused: Vec<LeaseWrite>,
    /// The API key the stream was opened with, re-checked while it lasts.
    key: StreamKey,
}

impl Session {
    fn new(
        state: AppState,
        runner: RunnerIdentity,
        key: StreamKey,
        out: mpsc::Sender<Result<proto::ManagerMessage, Status>>,
    ) -> Self {
        Self {
            seat: state.dispatcher.seat(runner.clone()),
            state,
            runner,
            out,
            held: HashMap::new(),
            commands_woken: Arc::new(Notify::new()),
            draining: false,
            refused: Vec::new(),
            key,
        }
    }

    /// Sends the welcome and what the runner is owed: commands of the leases it still
    /// holds and the runs it gets back (adopted after a restart).
    async fn greet(&mut self, welcome: Welcome) {
        let (resumed, lost): (Vec<_>, Vec<_>) =
            welcome.named.iter().partition(|l| l.expires_at.is_some());
        self.send(Out::Welcome(proto::Welcome {
            runner_id: self.runner.id.to_string(),
            manager_id: self.state.notifier.replica_id().to_string(),
            heartbeat_interval_ms: self.state.settings.heartbeat_interval_ms as i64,
            lease_ttl_ms: self.state.settings.lease_ttl_ms as i64,
            max_batch_events: self.state.settings.max_batch_events as i32,
            max_batch_bytes: self.state.settings.max_batch_bytes() as i32,
            max_payload_bytes: self.state.settings.max_payload_bytes as i32,
            resumed: resumed
                .iter()
                .map(|l| proto::ResumedLease {
                    run_id: l.run_id.to_string(),
                    epoch: l.epoch,
                    acked_runner_seq: l.acked_runner_seq,
                })
                .collect(),
            lost: lost
                .iter()
                .map(|l| proto::LeaseRef {
                    run_id: l.run_id.to_string(),
                    epoch: l.epoch,
                })
                .collect(),
        }))
        .await;
        for lease in resumed {
            self.hold(lease.run_id, lease.epoch);
            for command in &lease.commands {
                self.send(command_delivery(lease.run_id, lease.epoch, command))
                    .await;
            }
        }
        for assignment in &welcome.adopted {
            self.hold(assignment.run.id, assignment.run.lease_epoch);
            self.send(Out::Assignment(Box::new(convert::assignment(assignment))))
                .await;
        }
        if welcome.draining {
            // Drained by an operator before this connection: it is told again.
            self.draining = true;
            self.send(Out::Drain(proto::Drain {
                deadline_ms: 0,
                reconnect: false,
            }))
            .await;
        }
        tracing::info!(runner = %self.runner.id, name = %self.runner.name, adopted = welcome.adopted.len(), "runner connected");
    }

    async fn run(mut self, welcome: Welcome, mut inbound: Streaming<proto::RunnerMessage>) {
        let _connected = self.state.metrics.runner_connected();
        self.greet(welcome).await;
        let shutdown = self.state.shutdown.clone();
        loop {
            let result = tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(first)) => {
                        let (messages, ended) =
                            read_ready(&mut inbound, first, self.state.settings.max_batch_events);
                        let handled = self.handle(messages).await;
                        if ended && handled.is_ok() {
                            break;
                        }
                        handled
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(runner = %self.runner.id, %status, "runner stream failed");
                        break;
                    }
                },
                _ = self.seat.ready() => self.deliver_assigned().await.or_else(retried_later),
                _ = self.commands_woken.notified() => self.deliver_commands().await.or_else(retried_later),
                _ = self.key.due() => self.check_key().await.or_else(retried_later),
                _ = shutdown.cancelled() => {
                    self.draining = true;
                    self.send(Out::Drain(proto::Drain { deadline_ms: 0, reconnect: true })).await;
                    // End the stream: the runner reconnects (to another replica) with its leases.
                    break;
                }
            };
            if let Err(err) = result {
                // The runner's writes could not be stored (retried already; see
                // `leases::write`): end the stream; the runner reconnects with its leases
                // and resends what was not acknowledged.
                tracing::warn!(runner = %self.runner.id, error = %err, "runner session ended");
                let _ = self.out.send(Err(err.into())).await;
                break;
            }
            if self.out.is_closed() {
                break;
            }
        }
        for run in self.held.keys() {
            self.state.notifier.release(*run, &self.commands_woken);
        }
        tracing::info!(runner = %self.runner.id, "runner disconnected");
    }

    /// Re-checks the runner's API key: UNAUTHENTICATED ends the stream.
    async fn check_key(&mut self) -> Result<(), Error> {
        let checked = self.key.check(&self.state.auth, &self.state.notifier).await;
        if let Err(Error::Unauthenticated(why)) = &checked {
            tracing::info!(runner = %self.runner.id, held = self.held.len(), %why, "ending the runner's stream: its API key is no longer valid");
        }
        checked
    }

    async fn send(&self, body: Out) {
        // A failed send means the runner is gone; the loop notices `is_closed`.
        let _ = self
            .out
            .send(Ok(proto::ManagerMessage { body: Some(body) }))
            .await;
    }

    fn hold(&mut self, run: RunId, epoch: i64) {
        self.held.insert(run, epoch);
        self.state.notifier.hold(run, self.commands_woken.clone());
    }

    fn drop_lease(&mut self, run: RunId) {
        if self.held.remove(&run).is_some() {
            self.state.notifier.release(run, &self.commands_woken);
        }
    }

    /// Refuses one message without ending the stream. A refused write of a held run ends
    /// that run on both sides: the runner stops it and frees its slot on the error; the
    /// manager lets go of the lease (`lease_lost`: it is gone already) or fails the run
    /// with the refusal as its reason (anything else: the runner cannot make the write
    /// acceptable by sending it again, so waiting out the lease would only burn attempts).
    async fn refuse(&mut self, run_id: &str, err: Error) -> Result<(), Error> {
        if let Error::Unavailable(_) | Error::Internal(_) = err {
            return Err(err);
        }
        if let Ok(run) = RunId::parse("run_id", run_id)
            && let Some(&epoch) = self.held.get(&run)
        {
            self.drop_lease(run);
            if let Some(failure_kind) = refusal_kind(&err) {
                self.refused.push(LeaseWrite::Finish {
                    epoch,
                    outcome: Finish {
                        run_id: run,
                        status: RunStatus::Failed,
                        failure_kind: Some(failure_kind.to_owned()),
                        message: Some(err.to_string()),
                    },
                    last_runner_seq: 0,
                });
            }
        }
        let status = Status::from(err);
        self.send(Out::Error(proto::StreamError {
            run_id: run_id.to_owned(),
            code: crate::error::code_name(status.code()).to_owned(),
            message: status.message().to_owned(),
        }))
        .await;
        Ok(())
    }

    /// Applies messages the runner sent, in order: every write they carry (event
    /// batches, command acknowledgements, finishes, releases, of any number of runs) in
    /// one transaction, each answered after the commit; then the credit they gave.
    async fn handle(&mut self, messages: Vec<proto::RunnerMessage>) -> Result<(), Error> {
        // A runner that has gone quiet (frozen, or its network half-dead) is given no
        // new work, even if its stream looks open: the dispatcher passes it over.
        self.seat.heard();
        let mut writes: Vec<(LeaseWrite, Reply)> = Vec::new();
        let mut credit: Option<i64> = None;
        for message in messages {
            let Some(body) = message.body else {
                self.refuse("", Error::invalid("body", "is required"))
                    .await?;
                continue;
            };
            let (run_id, write) = match body {
                In::Hello(_) => {
                    self.refuse(
                        "",
                        Error::invalid("body", "hello is only the first message"),
                    )
                    .await?;
                    continue;
                }
                In::Credit(given) if given.slots < 0 => {
                    self.refuse("", Error::invalid("credit.slots", "must not be negative"))
                        .await?;
                    continue;
                }
                In::Credit(given) => {
                    *credit.get_or_insert(0) += i64::from(given.slots);
                    continue;
                }
                In::Heartbeat(beat) => {
                    self.heartbeat(beat).await?;
                    continue;
                }
                In::Events(batch) => {
                    let events = batch.events.len();
                    (
                        batch.run_id.clone(),
                        append_write(&self.state.settings, batch)
                            .map(|w| (w, Reply::EventAck { events })),
                    )
                }
                In::CommandAck(ack) => {
                    let batch = proto::AppendEventsRequest {
                        run_id: ack.run_id.clone(),
                        epoch: ack.epoch,
                        command_updates: ack.update.into_iter().collect(),
                        ..Default::default()
                    };
                    (
                        ack.run_id,
                        append_write(&self.state.settings, batch).map(|w| (w, Reply::None)),
                    )
                }
                In::Finish(finish) => (
                    finish.run_id.clone(),
                    finish_write(&finish).map(|w| (w, Reply::FinishAck)),
                ),
                In::Release(release) => (
                    release.run_id.clone(),
                    release_write(&release).map(|w| (w, Reply::Released)),
                ),
            };
            match write {
                Ok(write) => writes.push(write),
                Err(err) => self.refuse(&run_id, err.into()).await?,
            }
        }
        self.write(writes).await?;
        self.fail_refused().await?;
        if let Some(slots) = credit
            && !self.draining
        {
            // Never more runs in flight than the runner said it can execute.
            let room = i64::from(self.runner.max_concurrency) - self.held.len() as i64;
            self.seat.offer(slots, room.max(0));
        }
        Ok(())
    }

    /// Stores the runner's writes in one transaction and answers each.
    async fn write(&mut self, writes: Vec<(LeaseWrite, Reply)>) -> Result<(), Error> {
        if writes.is_empty() {
            return Ok(());
        }
        let (writes, replies): (Vec<LeaseWrite>, Vec<Reply>) = writes.into_iter().unzip();
        let runs: Vec<(RunId, i64)> = writes.iter().map(|w| (w.run_id(), w.epoch())).collect();
        let results = leases::write(
            &self.state.pool,
            self.runner.id,
            self.runner.tenant.as_ref(),
            writes,
            &self.state.settings.quotas(),
        )
        .await?;
        let mut written = Vec::with_capacity(runs.len());
        let mut released = false;
        // A `final` run's deltas: not stored, sent to its watchers live.
        let mut live = Vec::new();
        let mut stored = Vec::new();
        for (((run_id, epoch), reply), result) in runs.into_iter().zip(replies).zip(results) {
            let written_now = match result {
                Ok(written_now) => written_now,
                Err(err) => {
                    self.refuse(&run_id.to_string(), err).await?;
                    continue;
                }
            };
            written.push(run_id.0);
            let answer = match (reply, written_now) {
                (Reply::EventAck { events }, Written::Appended(outcome)) => {
                    self.state.metrics.appended(events, outcome.duplicates);
                    live.extend(outcome.live);
                    stored.extend(outcome.stored);
                    Out::EventAck(proto::EventAck {
                        run_id: run_id.to_string(),
                        epoch,
                        result: Some(proto::AppendEventsResponse {
                            first_seq: outcome.first_seq,
                            last_seq: outcome.last_seq,
                            acked_runner_seq: outcome.acked_runner_seq,
                            duplicates: outcome.duplicates,
                        }),
                    })
                }
                // Not answered, but its events (a `command.completed`) are news for
                // watchers like any append's.
                (Reply::None, Written::Appended(outcome)) => {
                    stored.extend(outcome.stored);
                    continue;
                }
                (Reply::FinishAck, Written::Finished(run, events)) => {
                    // After its appends' events, in order: a run's end reaches its
                    // watchers here from memory too.
                    stored.extend(events);
                    self.drop_lease(run_id);
                    // Its concurrency key's next run was let in, or the run itself went
                    // back to the queue for a turn queued meanwhile: wake claimers.
                    released |= run.concurrency_key.is_some() || run.status == RunStatus::Pending;
                    Out::FinishAck(proto::FinishAck {
                        run_id: run_id.to_string(),
                        epoch,
                        status: run.status.to_proto() as i32,
                    })
                }
                (Reply::Released, _) => {
                    self.drop_lease(run_id);
                    released = true;
                    Out::FinishAck(proto::FinishAck {
                        run_id: run_id.to_string(),
                        epoch,
                        status: RunStatus::Pending.to_proto() as i32,
                    })
                }
                _ => continue,
            };
            self.send(answer).await;
        }
        // Ephemeral deltas first: one may come before a stored event of the same append.
        self.state.watch_hub.publish_live(&live);
        // Watchers here get the stored events in memory; their runs' readers are not
        // roused to read them back.
        let fanned_out = self.state.watch_hub.publish_stored(stored);
        written.retain(|run| !fanned_out.contains(run));
        self.state.notifier.events_appended(written);
        self.state
            .notifier
            .events_appended_and_fanned_out(fanned_out);
        if released {
            self.state.notifier.work_available();
        }
        Ok(())
    }

    /// Fails the runs whose writes were refused (fenced like any finish: a run that
    /// ended meanwhile stays as it ended).
    async fn fail_refused(&mut self) -> Result<(), Error> {
        if self.refused.is_empty() {
            return Ok(());
        }
        let finishes = std::mem::take(&mut self.refused);
        let runs: Vec<uuid::Uuid> = finishes.iter().map(|f| f.run_id().0).collect();
        let results = leases::write(
            &self.state.pool,
            self.runner.id,
            self.runner.tenant.as_ref(),
            finishes,
            &self.state.settings.quotas(),
        )
        .await?;
        for (run, result) in runs.iter().zip(&results) {
            if let Err(err) = result {
                tracing::debug!(%run, error = %err, "a refused run had ended already");
            }
        }
        self.state.notifier.events_appended(runs);
        Ok(())
    }

    /// An operator drained this runner (`AdminService.DrainRunner`, through any replica),
    /// as its heartbeat found: assign nothing more and tell it to finish its runs and exit.
    /// Claims refuse a draining runner meanwhile.
    async fn drain_runner(&mut self) {
        if self.draining {
            return;
        }
        tracing::info!(runner = %self.runner.id, held = self.held.len(), "draining the runner at an operator's request");
        self.draining = true;
        self.seat.withdraw();
        self.send(Out::Drain(proto::Drain {
            deadline_ms: 0,
            reconnect: false,
        }))
        .await;
    }

    /// Pushes the runs the dispatcher claimed for this runner.
    async fn deliver_assigned(&mut self) -> Result<(), Error> {
        let assigned = self.seat.take();
        if assigned.is_empty() {
            return Ok(());
        }
        // Cheap (the key cache), and a revoked runner gets no prompt: its runs go back.
        if let Err(err) = self.check_key().await {
            self.seat.give_back(assigned).await;
            return Err(err);
        }
        for assignment in &assigned {
            self.hold(assignment.run.id, assignment.run.lease_epoch);
            self.send(Out::Assignment(Box::new(convert::assignment(assignment))))
                .await;
        }
        Ok(())
    }

    /// Delivers pending commands of every held run; reports leases found lost.
    async fn deliver_commands(&mut self) -> Result<(), Error> {
        if self.held.is_empty() {
            return Ok(());
        }
        let held: Vec<(RunId, i64)> = self.held.iter().map(|(r, e)| (*r, *e)).collect();
        let states = leases::deliver_commands(
            &self.state.pool,
            self.runner.id,
            self.runner.tenant.as_ref(),
            &held,
        )
        .await?;
        self.state.notifier.events_appended(delivered_to(&states));
        for lease in states {
            if lease.expires_at.is_none() {
                self.drop_lease(lease.run_id);
                self.send(Out::LeaseRevoked(proto::LeaseRevoked {
                    run_id: lease.run_id.to_string(),
                    epoch: lease.epoch,
                    reason: reason::LEASE_LOST.into(),
                }))
                .await;
                continue;
            }
            for command in &lease.commands {
                self.send(command_delivery(lease.run_id, lease.epoch, command))
                    .await;
            }
        }
        Ok(())
    }

    async fn heartbeat(&mut self, beat: proto::HeartbeatRequest) -> Result<(), Error> {
        self.check_key().await?;
        // No capacity check here, unlike the unary call: a heartbeat crossing a finish's
        // acknowledgement may name one lease more than the runner's slots, and refusing it
        // would leave the runner never told which of its leases are gone.
        let leases = match lease_refs("leases", &beat.leases) {
            Ok(leases) => leases,
            Err(err) => return self.refuse("", err.into()).await,
        };
        // Leases this stream does not hold are lost without asking the database.
        let held = &self.held;
        let renewed = self
            .state
            .heartbeats
            .beat(
                Heartbeat {
                    runner_id: self.runner.id,
                    tenant: self.runner.tenant.clone(),
                    leases,
                },
                |run, epoch| held.get(&run) == Some(&epoch),
            )
            .await?;
        self.state
            .notifier
            .events_appended(delivered_to(&renewed.leases));
        for lease in renewed.leases.iter().filter(|l| l.expires_at.is_none()) {
            self.drop_lease(lease.run_id);
        }
        self.send(Out::Heartbeat(heartbeat_response(
            &renewed.leases,
            self.state.settings.lease_ttl_ms,
        )))
        .await;
        if renewed.draining {
            self.drain_runner().await;
        }
        Ok(())
    }
}

/// The failure kind of a held run whose write was refused with `err`; `None` when the
/// refusal does not end the run here (`lease_lost`: it is no longer this runner's).
fn refusal_kind(err: &Error) -> Option<&'static str> {
    match err {
        Error::FailedPrecondition {
            reason: reason::LEASE_LOST,
            ..
        } => None,
        Error::FailedPrecondition { reason, .. } => Some(reason),
        Error::InvalidArgument(field) if payload::is_too_large(field) => {
            Some(reason::PAYLOAD_TOO_LARGE)
        }
        Error::ResourceExhausted(_) => Some(reason::QUOTA_EXCEEDED),
        _ => Some(reason::WRITE_REFUSED),
    }
}

/// A delivery of claimed runs, a command delivery or a key re-check that failed for a
/// transient reason is not worth ending the stream over: claimed runs were given back,
/// and the next wake-up, safety-net poll, re-check or heartbeat tries again.
fn retried_later(err: Error) -> Result<(), Error> {
    match err {
        Error::Unavailable(why) => {
            tracing::warn!(%why, "claim, command delivery or key check failed; retried on the next wake-up");
            Ok(())
        }
        err => Err(err),
    }
}
