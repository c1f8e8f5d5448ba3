//! One task per leased run: carries out its commands in order and runs its turns with a
//! provider.
//!
//! - `turn` starts a turn, or, while one is active, follows its delivery policy: `queue`
//!   (run it next), `interrupt` (stop the active turn, then run it), `steer` (feed it to
//!   the active turn).
//! - `steer` feeds text into the active turn; it is never taken as the answer to a
//!   request.
//! - `resolve` hands the answer to an open request to the turn waiting for it, on the
//!   turn's resolution channel (never as steer text). An answer to a request this
//!   runner never saw opened was asked by an earlier attempt of the run (before a requeue)
//!   for the turn now re-executed: it answers the next request that turn opens.
//! - `interrupt` stops the active turn and keeps the run for the next turn. It also
//!   pauses the queue: turns queued before it wait (acknowledged, with a
//!   `runtime.warning {queue_paused: true}` once the run is idle) until the next `turn`
//!   or a `resume` command. With payload `{"resume_queue": true}` the queue goes on at
//!   once instead.
//! - `resume` lets a paused queue go on.
//! - `cancel` stops everything and the run ends `cancelled`.
//!
//! The run ends `completed` when a turn completes and none is queued, `failed` when a
//! turn fails, `blocked` when a turn is blocked (a person declined its gate). After an
//! interrupted turn it waits for the next turn up to an idle timeout. Before finishing it waits until every event is acknowledged, so the finish
//! never overtakes its own events. If the lease is lost the task stops at once and
//! writes nothing more.
//!
//! Every wait here also watches the run's abort token: a push into a full outbox (no
//! acknowledgement comes once the lease is gone), a steer into a provider that is not
//! reading, the end of a provider's task. A step that sees the abort returns
//! [`Aborted`] and the task ends with it, so an aborted run never leaks its task.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use agentrun_shared::proto::{self, CommandKind, CommandStatus, RunStatus, TurnDeliveryPolicy};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::observe::Observer;
use crate::outbox::{Aborted, Outbox};
use crate::provider::{
    self, Exchange, ProviderError, Providers, Resolution, TurnContext, TurnOutcome, TurnRequest,
};

/// What a run task asks of the connection.
#[derive(Debug)]
pub enum Upward {
    CommandAck(proto::CommandAck),
    Finish(proto::FinishRunRequest),
}

/// Everything a run task needs.
pub struct RunContext {
    pub run: proto::Run,
    pub epoch: i64,
    pub runner_id: String,
    pub providers: Arc<Providers>,
    pub outbox: Arc<Outbox>,
    pub upward: mpsc::UnboundedSender<Upward>,
    /// Fires when the lease is lost or revoked: stop, write nothing. The outbox holds
    /// the same token, so its pushes fail once it fires.
    pub abort: CancellationToken,
    pub idle_timeout: Duration,
    /// The conversation so far, from the assignment: the turns the run's first turn
    /// starts with.
    pub context: Vec<Exchange>,
    /// The provider's thread id from the assignment.
    pub provider_thread_id: Option<String>,
    /// Turn metrics go here.
    pub observer: Arc<Observer>,
    /// The W3C `traceparent` of the run's creation: the run's span continues it.
    pub trace_parent: Option<String>,
    /// How the run's last turn ended under an earlier lease, from the assignment: the
    /// run goes on from there (with no turn left to run, it ends as that turn left it).
    pub last_turn: Option<proto::TurnEnding>,
}

/// Provider events buffered between a provider and its run task.
const PROVIDER_EVENTS: usize = 64;
/// Steers and resolutions buffered for a provider that is not reading them yet.
const PROVIDER_INPUTS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Interrupted,
    Cancelled,
}

struct ActiveTurn {
    command: proto::Command,
    turn_id: String,
    prompt: String,
    stop: CancellationToken,
    stop_reason: Option<StopReason>,
    steer: mpsc::Sender<String>,
    resolutions: mpsc::Sender<Resolution>,
    events: mpsc::Receiver<provider::ProviderEvent>,
    task: JoinHandle<TurnOutcome>,
    started: tokio::time::Instant,
    /// Whether its first `content.delta` was seen (time to first token).
    first_token: bool,
    /// The turn's GenAI span: it ends when the turn does.
    span: tracing::Span,
}

enum Ending {
    Finish(RunStatus, Option<(String, String)>),
    Aborted,
}

/// Executes a run until it ends or its lease is lost, in a `run` span that continues
/// the trace of the run's creation.
pub async fn execute(ctx: RunContext, mut commands: mpsc::UnboundedReceiver<proto::Command>) {
    let run_id = ctx.run.run_id.clone();
    let span = tracing::info_span!(
        "run",
        otel.name = "agentrun.run",
        agentrun.run_id = %run_id,
        agentrun.epoch = ctx.epoch,
        agentrun.backend_profile = %ctx.run.backend_profile,
    );
    if let Some(parent) = &ctx.trace_parent {
        agentrun_shared::otel::continue_trace(&span, |key| {
            (key == "traceparent").then(|| parent.clone())
        });
    }
    let ending = Executor::new(&ctx)
        .drive(&mut commands)
        .instrument(span)
        .await;
    if let Ending::Finish(status, failure) = ending {
        if ctx.abort.is_cancelled() {
            return;
        }
        let (failure_kind, message) = failure.unwrap_or_default();
        let finish = proto::FinishRunRequest {
            runner_id: ctx.runner_id.clone(),
            run_id: run_id.clone(),
            epoch: ctx.epoch,
            status: status as i32,
            failure_kind,
            message,
            // The manager refuses the finish until these events are stored, so it is sent
            // right behind them, without waiting for their ack.
            last_runner_seq: ctx.outbox.last_pushed(),
        };
        let _ = ctx.upward.send(Upward::Finish(finish));
    }
    tracing::debug!(run = %run_id, "run task ended");
}

/// A turn's span, following the OpenTelemetry GenAI conventions: `chat {model}`, with the
/// provider, the model, and (recorded as they become known) the time to first token and
/// the tokens in and out.
fn turn_span(
    provider: &Arc<dyn provider::Provider>,
    backend_profile: &str,
    turn_id: &str,
) -> tracing::Span {
    let model = provider.model(backend_profile);
    let family = backend_profile.split(':').next().unwrap_or(backend_profile);
    tracing::info_span!(
        "chat",
        otel.name = %format!("chat {model}"),
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = %family,
        gen_ai.system = %family,
        gen_ai.request.model = %model,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.server.time_to_first_token = tracing::field::Empty,
        agentrun.turn_id = %turn_id,
    )
}

/// The conversation an assignment carries, as provider history.
pub fn context_of(turns: &[proto::ContextTurn]) -> Vec<Exchange> {
    turns
        .iter()
        .map(|t| Exchange {
            prompt: t.prompt.clone(),
            reply: t.reply.clone(),
        })
        .collect()
}

/// The state and error an executor resumes with after a turn that ended under an earlier
/// lease, as [`Executor::record_turn_end`] would have left them.
fn resumed(ending: &proto::TurnEnding) -> (Option<&'static str>, Option<ProviderError>) {
    let state = ["completed", "failed", "blocked", "interrupted", "cancelled"]
        .into_iter()
        .find(|known| *known == ending.state);
    let error = (!ending.error_kind.is_empty()).then(|| ProviderError {
        kind: ending.error_kind.clone(),
        message: ending.error_message.clone(),
        retryable: ending.error_retryable,
    });
    (state, error)
}

struct Executor<'a> {
    ctx: &'a RunContext,
    queue: VecDeque<proto::Command>,
    active: Option<ActiveTurn>,
    history: Vec<Exchange>,
    provider_thread_id: Option<String>,
    last_seq: i64,
    cancelled: bool,
    /// An `interrupt` paused the queue: queued turns wait for a `turn` or `resume`.
    paused: bool,
    /// The pause has been reported (`runtime.warning`) since it began.
    pause_reported: bool,
    /// Requests opened by the turns of this execution (this lease) of the run.
    opened_here: HashSet<String>,
    /// Answers to requests opened before this execution, with their `resolve` commands,
    /// waiting for the re-executed turn to ask again.
    carried: VecDeque<(proto::Command, Resolution)>,
    /// How the last turn ended.
    last_state: Option<&'static str>,
    last_error: Option<ProviderError>,
}

impl<'a> Executor<'a> {
    fn new(ctx: &'a RunContext) -> Self {
        let (last_state, last_error) = ctx.last_turn.as_ref().map_or((None, None), resumed);
        Self {
            ctx,
            queue: VecDeque::new(),
            active: None,
            history: ctx.context.clone(),
            provider_thread_id: ctx.provider_thread_id.clone(),
            last_seq: 0,
            paused: false,
            pause_reported: false,
            opened_here: HashSet::new(),
            carried: VecDeque::new(),
            // A turn stopped by a cancel ended the run's work: the run ends cancelled.
            cancelled: last_state == Some("cancelled"),
            last_state,
            last_error,
        }
    }

    async fn drive(&mut self, commands: &mut mpsc::UnboundedReceiver<proto::Command>) -> Ending {
        match self.steps(commands).await {
            Ok(ending) => ending,
            Err(Aborted) => {
                // The provider's stop token is a child of the abort token, so it is
                // stopping already; this only makes that explicit.
                if let Some(active) = self.active.take() {
                    active.stop.cancel();
                }
                Ending::Aborted
            }
        }
    }

    async fn steps(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<proto::Command>,
    ) -> Result<Ending, Aborted> {
        // A run resumed after an ended turn ends as that turn left it only once it has
        // taken the assignment's commands (in the channel before the task starts): a
        // turn still queued behind them runs first. Each is taken as it would be on a
        // first lease, a turn started before the commands behind it.
        let mut resuming = self.last_state.is_some();
        let idle = tokio::time::sleep(self.ctx.idle_timeout);
        tokio::pin!(idle);
        loop {
            if self.active.is_none() {
                resuming &= !commands.is_empty();
                if let Some(ending) = self.next_step(!resuming).await? {
                    return Ok(ending);
                }
                if self.active.is_none() {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + self.ctx.idle_timeout);
                }
            }
            tokio::select! {
                _ = self.ctx.abort.cancelled() => return Err(Aborted),
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command).await?,
                    None => return Err(Aborted),
                },
                event = async { self.active.as_mut().expect("guarded").events.recv().await }, if self.active.is_some() => {
                    match event {
                        Some(event) => {
                            self.on_provider_event(event).await?;
                            // The events already waiting go out without another round of
                            // this select (a streaming provider sends one per token); a
                            // channel's worth at most, so commands wait little.
                            for _ in 1..PROVIDER_EVENTS {
                                let Some(Ok(event)) =
                                    self.active.as_mut().map(|a| a.events.try_recv())
                                else {
                                    break;
                                };
                                self.on_provider_event(event).await?;
                            }
                        }
                        None => self.end_turn().await?,
                    }
                }
                _ = &mut idle, if self.active.is_none() => {
                    tracing::info!(run = %self.ctx.run.run_id, "idle timeout: completing the run");
                    return Ok(Ending::Finish(RunStatus::Completed, None));
                }
            }
        }
    }

    /// With no active turn: start the next queued one, or decide how the run ends (when
    /// `may_end` after its last turn).
    async fn next_step(&mut self, may_end: bool) -> Result<Option<Ending>, Aborted> {
        if self.cancelled {
            return Ok(Some(Ending::Finish(
                RunStatus::Cancelled,
                Some(("cancelled".into(), "cancellation was requested".into())),
            )));
        }
        if self.last_state == Some("blocked") {
            // A gate a person closed blocks the run, whatever was queued behind it.
            for queued in std::mem::take(&mut self.queue) {
                self.ack(&queued, CommandStatus::Cancelled, "the run is blocked")
                    .await;
            }
            let reason = self
                .last_error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default();
            return Ok(Some(Ending::Finish(
                RunStatus::Blocked,
                Some(("blocked".into(), reason)),
            )));
        }
        if self.paused && !self.queue.is_empty() {
            if !self.pause_reported {
                self.pause_reported = true;
                let queued: Vec<&str> = self.queue.iter().map(|c| c.command_id.as_str()).collect();
                self.ctx
                    .outbox
                    .push(
                        "runtime.warning",
                        json!({
                            "message": "the queue is paused after an interrupt: queued turns wait for a new turn or a resume command",
                            "queue_paused": true,
                            "queued_command_ids": queued,
                        }),
                    )
                    .await?;
            }
            return Ok(None);
        }
        if let Some(next) = self.queue.pop_front() {
            self.start_turn(next).await?;
            return Ok(None);
        }
        if !may_end {
            return Ok(None);
        }
        Ok(match self.last_state {
            Some("completed") => Some(Ending::Finish(RunStatus::Completed, None)),
            Some("failed") => {
                let error = self.last_error.clone().unwrap_or_else(|| ProviderError {
                    kind: "provider_error".into(),
                    message: "the turn failed".into(),
                    retryable: false,
                });
                let kind = if error.retryable {
                    "provider_retryable"
                } else {
                    "provider_error"
                };
                Some(Ending::Finish(
                    RunStatus::Failed,
                    Some((kind.into(), error.to_string())),
                ))
            }
            // Interrupted, or no turn yet: wait for the next turn command.
            _ => None,
        })
    }

    /// Hands steering input to the active turn; false if no turn is active or it has
    /// stopped reading. Waits while the provider's steer buffer is full, unless aborted.
    async fn steer_active(&self, input: String) -> Result<bool, Aborted> {
        let Some(active) = &self.active else {
            return Ok(false);
        };
        tokio::select! {
            _ = self.ctx.abort.cancelled() => Err(Aborted),
            sent = active.steer.send(input) => Ok(sent.is_ok()),
        }
    }

    /// Hands a resolution to the active turn; false if no turn is active or it has
    /// stopped reading. Waits while the provider's buffer is full, unless aborted.
    async fn resolve_active(&self, resolution: Resolution) -> Result<bool, Aborted> {
        let Some(active) = &self.active else {
            return Ok(false);
        };
        tokio::select! {
            _ = self.ctx.abort.cancelled() => Err(Aborted),
            sent = active.resolutions.send(resolution) => Ok(sent.is_ok()),
        }
    }

    /// The active turn opened a request: an answer carried over from an earlier attempt
    /// of the run answers it.
    async fn on_request_opened(&mut self, request_id: String) -> Result<(), Aborted> {
        self.opened_here.insert(request_id.clone());
        let Some((command, mut resolution)) = self.carried.pop_front() else {
            return Ok(());
        };
        tracing::debug!(run = %self.ctx.run.run_id, from = %resolution.request_id, to = %request_id, "an earlier attempt's answer answers the request asked again");
        resolution.request_id = request_id;
        let delivered = self.resolve_active(resolution).await?;
        let (status, error) = if delivered {
            (CommandStatus::Completed, "")
        } else {
            (CommandStatus::Failed, "no turn is active")
        };
        self.ack(&command, status, error).await;
        Ok(())
    }

    /// An explicit turn or a `resume`: a paused queue goes on.
    fn unpause(&mut self) {
        self.paused = false;
        self.pause_reported = false;
    }

    async fn ack(&self, command: &proto::Command, status: CommandStatus, error: &str) {
        let _ = self.ctx.upward.send(Upward::CommandAck(proto::CommandAck {
            run_id: self.ctx.run.run_id.clone(),
            epoch: self.ctx.epoch,
            update: Some(proto::CommandUpdate {
                command_id: command.command_id.clone(),
                status: status as i32,
                error: error.to_owned(),
            }),
        }));
    }

    fn payload(command: &proto::Command) -> Value {
        serde_json::from_str(&command.payload_json).unwrap_or(Value::Null)
    }

    async fn on_command(&mut self, command: proto::Command) -> Result<(), Aborted> {
        // Commands come in seq order; a redelivered one was handled already.
        if command.seq <= self.last_seq {
            return Ok(());
        }
        self.last_seq = command.seq;
        let payload = Self::payload(&command);
        let text = |key: &str| payload[key].as_str().unwrap_or_default().to_owned();
        // A command aimed at a turn that has ended must not reach the next one.
        if let Some(expected) = payload["expected_turn_id"].as_str()
            && self.active.as_ref().map(|a| a.turn_id.as_str()) != Some(expected)
        {
            self.ack(
                &command,
                CommandStatus::Failed,
                "the turn it was aimed at is no longer active",
            )
            .await;
            return Ok(());
        }
        match CommandKind::try_from(command.kind).unwrap_or(CommandKind::Unspecified) {
            CommandKind::Turn => {
                self.ack(&command, CommandStatus::Acknowledged, "").await;
                let policy = TurnDeliveryPolicy::try_from(command.delivery_policy)
                    .unwrap_or(TurnDeliveryPolicy::Queue);
                match (&self.active, policy) {
                    (Some(_), TurnDeliveryPolicy::Steer) => {
                        let delivered = self.steer_active(text("prompt")).await?;
                        let (status, error) = if delivered {
                            (CommandStatus::Completed, "")
                        } else {
                            (CommandStatus::Failed, "the active turn had ended")
                        };
                        self.ack(&command, status, error).await;
                    }
                    (Some(_), TurnDeliveryPolicy::Interrupt) => {
                        self.stop_active(StopReason::Interrupted);
                        self.unpause();
                        self.queue.push_front(command);
                    }
                    _ => {
                        self.unpause();
                        self.queue.push_back(command);
                    }
                }
            }
            CommandKind::Steer => {
                let delivered = self.steer_active(text("text")).await?;
                let (status, error) = if delivered {
                    (CommandStatus::Completed, "")
                } else {
                    (CommandStatus::Failed, "no turn is active")
                };
                self.ack(&command, status, error).await;
            }
            CommandKind::Resolve => {
                let resolution = Resolution::from_payload(&payload);
                if !self.opened_here.contains(&resolution.request_id) {
                    // Asked before this execution: kept for the turn's next request.
                    self.ack(&command, CommandStatus::Acknowledged, "").await;
                    self.carried.push_back((command, resolution));
                    return Ok(());
                }
                let delivered = self.resolve_active(resolution).await?;
                let (status, error) = if delivered {
                    (CommandStatus::Completed, "")
                } else {
                    (CommandStatus::Failed, "no turn is active")
                };
                self.ack(&command, status, error).await;
            }
            CommandKind::Interrupt => {
                self.stop_active(StopReason::Interrupted);
                // A person halting the agent halts what was queued too, unless asked not to.
                if payload["resume_queue"] != Value::Bool(true) {
                    self.paused = true;
                    self.pause_reported = false;
                }
                self.ack(&command, CommandStatus::Completed, "").await;
            }
            CommandKind::Resume => {
                self.unpause();
                self.ack(&command, CommandStatus::Completed, "").await;
            }
            CommandKind::Cancel => {
                self.cancelled = true;
                self.stop_active(StopReason::Cancelled);
                for queued in std::mem::take(&mut self.queue) {
                    self.ack(&queued, CommandStatus::Cancelled, "the run was cancelled")
                        .await;
                }
                self.ack(&command, CommandStatus::Completed, "").await;
            }
            CommandKind::Unspecified => {
                self.ack(&command, CommandStatus::Failed, "unknown command kind")
                    .await;
            }
        }
        Ok(())
    }

    fn stop_active(&mut self, reason: StopReason) {
        if let Some(active) = &mut self.active {
            active.stop_reason.get_or_insert(reason);
            active.stop.cancel();
        }
    }

    async fn start_turn(&mut self, command: proto::Command) -> Result<(), Aborted> {
        let prompt = Self::payload(&command)["prompt"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let turn_id = command.command_id.clone();
        self.ctx
            .outbox
            .push(
                "turn.started",
                json!({"turn_id": turn_id, "command_id": command.command_id, "seq": command.seq}),
            )
            .await?;
        let Some(provider) =
            provider::for_profile(&self.ctx.providers, &self.ctx.run.backend_profile).cloned()
        else {
            let error = ProviderError {
                kind: "no_provider".into(),
                message: format!(
                    "this runner has no provider for {:?}",
                    self.ctx.run.backend_profile
                ),
                retryable: false,
            };
            self.ctx
                .outbox
                .push(
                    "runtime.error",
                    json!({"message": error.message, "kind": error.kind, "retryable": false}),
                )
                .await?;
            return self
                .record_turn_end(
                    &command,
                    &turn_id,
                    &prompt,
                    TurnOutcome::Failed(error),
                    None,
                )
                .await;
        };
        let (events_tx, events) = mpsc::channel(PROVIDER_EVENTS);
        let (steer, steer_rx) = mpsc::channel(PROVIDER_INPUTS);
        let (resolutions, resolutions_rx) = mpsc::channel(PROVIDER_INPUTS);
        let stop = self.ctx.abort.child_token();
        let request = TurnRequest {
            run_id: self.ctx.run.run_id.clone(),
            turn_id: turn_id.clone(),
            backend_profile: self.ctx.run.backend_profile.clone(),
            prompt: prompt.clone(),
            history: self.history.clone(),
            provider_thread_id: self.provider_thread_id.clone(),
        };
        let turn_ctx = TurnContext {
            events: events_tx,
            steer: steer_rx,
            resolutions: resolutions_rx,
            stop: stop.clone(),
        };
        let span = turn_span(&provider, &self.ctx.run.backend_profile, &turn_id);
        let task = tokio::spawn(
            async move { provider.run_turn(request, turn_ctx).await }.instrument(span.clone()),
        );
        self.active = Some(ActiveTurn {
            command,
            turn_id,
            prompt,
            stop,
            stop_reason: None,
            steer,
            resolutions,
            events,
            task,
            started: tokio::time::Instant::now(),
            first_token: false,
            span,
        });
        Ok(())
    }

    /// Sends an event of the active turn's provider.
    async fn on_provider_event(&mut self, event: provider::ProviderEvent) -> Result<(), Aborted> {
        self.note_first_token(&event);
        let opened = event.request_id().map(str::to_owned);
        self.ctx.outbox.push_event(event).await?;
        if let Some(request_id) = opened {
            self.on_request_opened(request_id).await?;
        }
        Ok(())
    }

    /// Records the active turn's time to first token at its first `content.delta`.
    fn note_first_token(&mut self, event: &provider::ProviderEvent) {
        if let Some(active) = self.active.as_mut()
            && !active.first_token
            && event.event_type == "content.delta"
        {
            active.first_token = true;
            let after = active.started.elapsed();
            self.ctx.observer.first_token(after);
            active
                .span
                .record("gen_ai.server.time_to_first_token", after.as_secs_f64());
        }
    }

    /// The provider closed its event channel: collect its outcome and record the end.
    async fn end_turn(&mut self) -> Result<(), Aborted> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        // The provider has dropped its event sender, so it is returning; should it hang
        // anyway, the abort still ends the wait (its stop token fired with the abort).
        let joined = tokio::select! {
            _ = self.ctx.abort.cancelled() => return Err(Aborted),
            joined = active.task => joined,
        };
        let outcome = match joined {
            Ok(outcome) => outcome,
            Err(err) => TurnOutcome::Failed(ProviderError {
                kind: "provider_panic".into(),
                message: err.to_string(),
                retryable: false,
            }),
        };
        let tokens = match &outcome {
            TurnOutcome::Completed {
                usage: Some(usage), ..
            } => Some((usage.input_tokens, usage.output_tokens)),
            _ => None,
        };
        self.ctx
            .observer
            .turn_ended(active.started.elapsed(), tokens);
        if let Some((input, output)) = tokens {
            active.span.record("gen_ai.usage.input_tokens", input);
            active.span.record("gen_ai.usage.output_tokens", output);
        }
        self.record_turn_end(
            &active.command,
            &active.turn_id,
            &active.prompt,
            outcome,
            active.stop_reason,
        )
        .await
    }

    async fn record_turn_end(
        &mut self,
        command: &proto::Command,
        turn_id: &str,
        prompt: &str,
        outcome: TurnOutcome,
        stop_reason: Option<StopReason>,
    ) -> Result<(), Aborted> {
        let (state, usage, error) = match &outcome {
            TurnOutcome::Completed { usage, .. } => ("completed", *usage, None),
            TurnOutcome::Failed(error) => ("failed", None, Some(error.clone())),
            TurnOutcome::Blocked { reason } => (
                "blocked",
                None,
                Some(ProviderError {
                    kind: "blocked".into(),
                    message: reason.clone(),
                    retryable: false,
                }),
            ),
            TurnOutcome::Stopped => match stop_reason {
                Some(StopReason::Cancelled) => ("cancelled", None, None),
                _ => ("interrupted", None, None),
            },
        };
        let mut payload = json!({"turn_id": turn_id, "state": state});
        if let Some(usage) = usage {
            payload["usage"] =
                json!({"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens});
        }
        if let Some(error) = &error {
            payload["error"] =
                json!({"kind": error.kind, "message": error.message, "retryable": error.retryable});
        }
        if let TurnOutcome::Completed {
            provider_thread_id: Some(thread),
            ..
        } = &outcome
        {
            payload["provider_thread_id"] = json!(thread);
            self.provider_thread_id = Some(thread.clone());
        }
        self.ctx.outbox.push("turn.completed", payload).await?;
        match &outcome {
            TurnOutcome::Completed { reply, .. } => {
                self.history.push(Exchange {
                    prompt: prompt.to_owned(),
                    reply: reply.clone(),
                });
                self.ack(command, CommandStatus::Completed, "").await;
            }
            TurnOutcome::Failed(error) => {
                self.ack(command, CommandStatus::Failed, &error.to_string())
                    .await
            }
            TurnOutcome::Blocked { reason } => {
                self.ack(
                    command,
                    CommandStatus::Failed,
                    &format!("blocked: {reason}"),
                )
                .await
            }
            TurnOutcome::Stopped => self.ack(command, CommandStatus::Cancelled, state).await,
        }
        self.last_state = Some(state);
        self.last_error = error;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fit::PayloadLimit;
    use crate::provider::scripted::{ScriptedConfig, ScriptedProvider};

    fn turn(prompt: &str) -> proto::Command {
        proto::Command {
            command_id: "turn-1".into(),
            seq: 1,
            kind: CommandKind::Turn as i32,
            payload_json: json!({ "prompt": prompt }).to_string(),
            ..Default::default()
        }
    }

    /// A test run task's context: a scripted provider pausing `token_delay` per token, an
    /// outbox of `capacity` events that is never acknowledged, and the run's
    /// `last_turn`; returned with its outbox and upward messages.
    fn test_run(
        token_delay: Duration,
        capacity: usize,
        last_turn: Option<&str>,
    ) -> (RunContext, Arc<Outbox>, mpsc::UnboundedReceiver<Upward>) {
        let providers: Providers = vec![(
            "scripted".into(),
            Arc::new(ScriptedProvider::new(ScriptedConfig { token_delay })),
        )];
        let abort = CancellationToken::new();
        let outbox = Arc::new(Outbox::new(
            capacity,
            PayloadLimit::default(),
            abort.clone(),
            || {},
        ));
        let (upward, upward_rx) = mpsc::unbounded_channel();
        let ctx = RunContext {
            run: proto::Run {
                run_id: "run-1".into(),
                backend_profile: "scripted".into(),
                ..Default::default()
            },
            epoch: 1,
            runner_id: "runner-1".into(),
            providers: Arc::new(providers),
            outbox: outbox.clone(),
            upward,
            abort,
            idle_timeout: Duration::from_secs(600),
            context: Vec::new(),
            provider_thread_id: None,
            observer: Arc::new(crate::observe::Observer::new(Duration::from_secs(30))),
            trace_parent: None,
            last_turn: last_turn.map(|state| proto::TurnEnding {
                state: state.into(),
                ..Default::default()
            }),
        };
        (ctx, outbox, upward_rx)
    }

    #[tokio::test]
    async fn abort_ends_the_task_while_its_outbox_is_full() {
        // Two events fit and nothing is ever acknowledged: the lease is gone.
        let (ctx, outbox, _upward) = test_run(Duration::ZERO, 2, None);
        let abort = ctx.abort.clone();
        let (commands_tx, commands) = mpsc::unbounded_channel();
        commands_tx.send(turn("[tokens:100000]")).unwrap();
        let task = tokio::spawn(execute(ctx, commands));

        tokio::time::timeout(Duration::from_secs(10), async {
            while outbox.last_pushed() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the outbox fills up");
        abort.cancel();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the run task ends once aborted, though its outbox is full")
            .unwrap();
        assert_eq!(outbox.last_pushed(), 2, "nothing is pushed after the abort");
    }

    /// A run resumed after its last turn ended as `state`, its turns 5 ms per token.
    fn resumed(state: &str) -> (RunContext, Arc<Outbox>, mpsc::UnboundedReceiver<Upward>) {
        test_run(Duration::from_millis(5), 10_000, Some(state))
    }

    /// The run's finish, and the command acks sent before it.
    async fn finished(
        upward: &mut mpsc::UnboundedReceiver<Upward>,
    ) -> (proto::FinishRunRequest, Vec<proto::CommandAck>) {
        let mut acks = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match upward.recv().await.expect("the run task sends its finish") {
                    Upward::CommandAck(ack) => acks.push(ack),
                    Upward::Finish(finish) => return (finish, acks),
                }
            }
        })
        .await
        .expect("the run ends without waiting for its idle timeout")
    }

    #[tokio::test]
    async fn a_resumed_run_with_nothing_queued_ends_as_its_last_turn_left_it() {
        let (ctx, outbox, mut upward) = resumed("completed");
        let (_commands_tx, commands) = mpsc::unbounded_channel();
        tokio::spawn(execute(ctx, commands));
        let (finish, acks) = finished(&mut upward).await;
        assert_eq!(finish.status, RunStatus::Completed as i32);
        assert!(acks.is_empty());
        assert_eq!(outbox.last_pushed(), 0, "no turn runs again");
    }

    #[tokio::test]
    async fn a_resumed_run_runs_the_turn_still_queued_and_steers_it_before_it_ends() {
        let (ctx, outbox, mut upward) = resumed("completed");
        let (commands_tx, commands) = mpsc::unbounded_channel();
        commands_tx.send(turn("[tokens:40] again")).unwrap();
        commands_tx
            .send(proto::Command {
                command_id: "steer-1".into(),
                seq: 2,
                kind: CommandKind::Steer as i32,
                payload_json: json!({ "text": "faster" }).to_string(),
                ..Default::default()
            })
            .unwrap();
        tokio::spawn(execute(ctx, commands));
        let (finish, acks) = finished(&mut upward).await;
        assert_eq!(finish.status, RunStatus::Completed as i32);
        let status_of = |id: &str| {
            acks.iter()
                .filter_map(|a| a.update.as_ref())
                .filter(|u| u.command_id == id)
                .map(|u| u.status)
                .next_back()
        };
        assert_eq!(status_of("turn-1"), Some(CommandStatus::Completed as i32));
        assert_eq!(
            status_of("steer-1"),
            Some(CommandStatus::Completed as i32),
            "the steer reached the turn queued before it"
        );
        assert!(outbox.last_pushed() > 40, "the queued turn streamed");
    }
}
