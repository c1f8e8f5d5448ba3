//! The `scripted` provider: deterministic, built in, needs nothing outside the process.
//! Tests, benchmarks and the demo use it to exercise every path a real provider can take
//! (streaming, steering, approvals, failures, stalls, long runs) without a model.
//!
//! By default it streams a friendly reply that echoes the prompt, one word per
//! `content.delta`, pausing `token_delay` between words. Cues in the prompt change that:
//!
//! | cue          | behaviour                                                              |
//! |--------------|------------------------------------------------------------------------|
//! | `[stall]`    | opens the reply item, then emits nothing until stopped                 |
//! | `[fail]`     | streams a few words, emits `runtime.error`, fails (`scripted_failure`) |
//! | `[approval]` | opens a `command` request, waits for its decision, replies with it     |
//! | `[input]`    | opens a `user_input` request, waits, replies with the answers (JSON)   |
//! | `[gate] WHY` | opens a `user_input` request with `detail.gate` = WHY (the rest of the |
//! |              | prompt); accepted: the turn completes, else the run ends `blocked`     |
//! | `[tokens:N]` | streams exactly N tokens, `token1 token2 ...`                          |
//! | `[big:N]`    | streams a reply of N bytes in 16 KiB deltas                            |
//! | `[slow]`     | streams a long reply of 200 tokens                                     |
//!
//! The first cue in that order wins. Two more combine with any of them:
//!
//! | cue          | behaviour                                                              |
//! |--------------|------------------------------------------------------------------------|
//! | `[recall]`   | the reply starts with what the turn was given of the conversation:    |
//! |              | `[recall: N turns; last prompt: P; last reply: R; thread: T]` (P and R |
//! |              | of the newest earlier turn, `-` when none; T the provider thread id)   |
//! | `[thread:X]` | the completed turn reports X as its provider thread id                 |
//!
//! Steering text received while streaming is echoed at
//! once as a `[steer: TEXT]` delta and becomes part of the reply, so a caller can see
//! that a steer reached the active turn. A request waits for the resolution with its own
//! request id, never for steer text: steers received meanwhile are echoed once the reply
//! streams. Stopping is checked between tokens and while waiting, so `stop` ends the
//! turn within one scheduling tick.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{
    ItemId, Provider, ProviderError, ProviderEvent, ReplyText, Resolution, TurnContext,
    TurnOutcome, TurnRequest, Usage, send_event,
};

/// Tokens of the long reply the `[slow]` cue streams.
const SLOW_TOKENS: usize = 200;
/// Words streamed before the `[fail]` cue fails.
const FAIL_AFTER_TOKENS: usize = 3;
/// Bytes per delta of the `[big:N]` cue.
const BIG_DELTA_BYTES: usize = 16 * 1024;
/// The text the `[big:N]` cue repeats (ASCII, so any cut is a char boundary).
const BIG_TEXT: &str = "0123456789abcdefghijklmnopqrstuvwxyz ";
/// The text the `[slow]` cue cycles through.
const SLOW_TEXT: &str = "This is a long scripted reply that streams slowly, so that you can \
     watch it arrive, steer it, interrupt it or cancel the run while it is still going.";

/// Settings of the scripted provider.
#[derive(Debug, Clone)]
pub struct ScriptedConfig {
    /// Pause between two streamed tokens. Zero streams as fast as the event channel
    /// accepts (benchmarks).
    pub token_delay: Duration,
}

impl Default for ScriptedConfig {
    fn default() -> Self {
        Self {
            token_delay: Duration::from_millis(25),
        }
    }
}

/// The deterministic built-in provider; see the module documentation for its cues.
#[derive(Debug, Clone, Default)]
pub struct ScriptedProvider {
    config: ScriptedConfig,
}

impl ScriptedProvider {
    /// A scripted provider pacing its tokens by `config.token_delay`.
    pub fn new(config: ScriptedConfig) -> Self {
        Self { config }
    }
}

/// What the prompt asks the scripted provider to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cue {
    Stall,
    Fail,
    Approval,
    Input,
    Gate,
    Tokens(u64),
    Big(u64),
    Slow,
    Echo,
}

impl Cue {
    fn of(prompt: &str) -> Self {
        if prompt.contains("[stall]") {
            Cue::Stall
        } else if prompt.contains("[fail]") {
            Cue::Fail
        } else if prompt.contains("[approval]") {
            Cue::Approval
        } else if prompt.contains("[input]") {
            Cue::Input
        } else if prompt.contains("[gate]") {
            Cue::Gate
        } else if let Some(n) = number_cue(prompt, "[tokens:") {
            Cue::Tokens(n)
        } else if let Some(n) = number_cue(prompt, "[big:") {
            Cue::Big(n)
        } else if prompt.contains("[slow]") {
            Cue::Slow
        } else {
            Cue::Echo
        }
    }
}

/// The N of the first well-formed `{opening}N]` (e.g. `[tokens:N]`) in `prompt`.
fn number_cue(prompt: &str, opening: &str) -> Option<u64> {
    let mut rest = prompt;
    while let Some(start) = rest.find(opening) {
        rest = &rest[start + opening.len()..];
        if let Some(end) = rest.find(']')
            && let Ok(n) = rest[..end].trim().parse::<u64>()
        {
            return Some(n);
        }
    }
    None
}

/// Why a `[gate]` cue stops: the rest of the prompt, or a default.
fn gate_reason(prompt: &str) -> String {
    let reason = prompt.replacen("[gate]", " ", 1);
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    if reason.is_empty() {
        "a human gate".into()
    } else {
        reason
    }
}

/// The X of the first `[thread:X]` in `prompt` (X non-empty, without spaces).
fn thread_cue(prompt: &str) -> Option<String> {
    let rest = &prompt[prompt.find("[thread:")? + "[thread:".len()..];
    let id = rest[..rest.find(']')?].trim();
    (!id.is_empty() && !id.contains(char::is_whitespace)).then(|| id.to_owned())
}

/// What the `[recall]` cue replies with: how much of the conversation the turn got.
fn recall_text(turn: &TurnRequest) -> String {
    let last = turn.history.last();
    format!(
        "[recall: {} turns; last prompt: {}; last reply: {}; thread: {}]",
        turn.history.len(),
        last.map_or("-", |e| e.prompt.as_str()),
        last.map_or("-", |e| e.reply.as_str()),
        turn.provider_thread_id.as_deref().unwrap_or("-"),
    )
}

/// The `[tokens:N]` cue's i-th token, `token{i}`, written straight into its delta.
struct NumberedToken(u64);

impl std::fmt::Display for NumberedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "token{}", self.0)
    }
}

fn echo_reply(prompt: &str) -> String {
    format!(
        "Hello! You said: {}. This reply comes from the scripted provider.",
        prompt.trim()
    )
}

/// Why a turn ended early: `stop` fired, or the executor dropped the event channel
/// (the turn was abandoned, so nobody waits for an outcome other than "stopped").
struct Halted;

/// The state of one scripted turn.
struct Turn {
    turn_id: String,
    /// What `[recall]` says at the start of the reply.
    recall: Option<String>,
    /// What `[thread:X]` reports.
    thread_id: Option<String>,
    events: mpsc::Sender<ProviderEvent>,
    steer: mpsc::Receiver<String>,
    steer_open: bool,
    resolutions: mpsc::Receiver<Resolution>,
    /// Steers that arrived while waiting for a resolution, echoed once the reply streams.
    held_steers: Vec<String>,
    stop: CancellationToken,
    token_delay: Duration,
    next_item: u64,
    reply: ReplyText,
    tokens: u64,
}

impl Turn {
    fn new_item_id(&mut self) -> ItemId {
        self.next_item += 1;
        format!("{}:{}", self.turn_id, self.next_item).into()
    }

    async fn emit(
        &self,
        event_type: &'static str,
        payload: serde_json::Value,
    ) -> Result<(), Halted> {
        self.send(ProviderEvent::new(event_type, payload)).await
    }

    async fn send(&self, event: ProviderEvent) -> Result<(), Halted> {
        send_event(&self.events, &self.stop, event)
            .await
            .map_err(|_| Halted)
    }

    /// Echoes a steer into the reply being streamed.
    async fn steered(&mut self, item_id: &ItemId, text: String) -> Result<(), Halted> {
        let delta = if self.reply.is_empty() {
            format!("[steer: {text}]")
        } else {
            format!(" [steer: {text}]")
        };
        self.reply.push_str(&delta);
        self.send(ProviderEvent::delta(
            item_id.clone(),
            "assistant_text",
            delta,
        ))
        .await
    }

    /// Takes the steers that already arrived, without waiting.
    async fn take_pending_steers(&mut self, item_id: &ItemId) -> Result<(), Halted> {
        while self.steer_open {
            match self.steer.try_recv() {
                Ok(text) => self.steered(item_id, text).await?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.steer_open = false,
            }
        }
        Ok(())
    }

    /// Waits `token_delay`, echoing steers as they arrive and ending early on stop.
    async fn pause(&mut self, item_id: &ItemId) -> Result<(), Halted> {
        if self.token_delay.is_zero() {
            return if self.stop.is_cancelled() {
                Err(Halted)
            } else {
                self.take_pending_steers(item_id).await
            };
        }
        let until = Instant::now() + self.token_delay;
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Err(Halted),
                steer = self.steer.recv(), if self.steer_open => match steer {
                    Some(text) => self.steered(item_id, text).await?,
                    None => self.steer_open = false,
                },
                _ = tokio::time::sleep_until(until) => return Ok(()),
            }
        }
    }

    /// Opens the assistant message item (starting it with the recall, on that cue) and
    /// returns its id.
    async fn open_message(&mut self) -> Result<ItemId, Halted> {
        let item_id = self.new_item_id();
        self.emit(
            "item.started",
            json!({"item_id": &*item_id, "kind": "assistant_message"}),
        )
        .await?;
        if let Some(recall) = self.recall.take() {
            self.reply.push_str(&recall);
            self.send(ProviderEvent::delta(
                item_id.clone(),
                "assistant_text",
                recall,
            ))
            .await?;
        }
        Ok(item_id)
    }

    /// Streams `tokens` into the open message item, one delta each (a space before all
    /// but the reply's first), paced and steerable.
    async fn stream(
        &mut self,
        item_id: &ItemId,
        tokens: impl Iterator<Item = impl std::fmt::Display>,
    ) -> Result<(), Halted> {
        for token in tokens {
            if self.tokens > 0 {
                self.pause(item_id).await?;
            }
            let mut delta = String::new();
            if !self.reply.is_empty() {
                delta.push(' ');
            }
            write!(delta, "{token}").expect("writing to a String cannot fail");
            self.reply.push_str(&delta);
            self.tokens += 1;
            self.send(ProviderEvent::delta(
                item_id.clone(),
                "assistant_text",
                delta,
            ))
            .await?;
        }
        // A steer that raced the last token still belongs to this reply.
        self.take_pending_steers(item_id).await
    }

    /// Closes the message item, reports usage and completes the turn.
    async fn complete(&mut self, item_id: &ItemId, prompt: &str) -> Result<TurnOutcome, Halted> {
        self.emit(
            "item.completed",
            json!({"item_id": &**item_id, "kind": "assistant_message", "text": self.reply.as_str()}),
        )
        .await?;
        let usage = Usage {
            input_tokens: prompt.split_whitespace().count() as u64,
            output_tokens: self.tokens,
        };
        self.emit(
            "usage.updated",
            json!({"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}),
        )
        .await?;
        Ok(TurnOutcome::Completed {
            reply: std::mem::take(&mut self.reply).into_string(),
            usage: Some(usage),
            provider_thread_id: self.thread_id.take(),
        })
    }

    async fn run(&mut self, prompt: &str) -> Result<TurnOutcome, Halted> {
        match Cue::of(prompt) {
            Cue::Stall => {
                self.open_message().await?;
                self.stop.cancelled().await;
                Err(Halted)
            }
            Cue::Fail => {
                let item_id = self.open_message().await?;
                let words: Vec<String> = echo_reply(prompt)
                    .split_whitespace()
                    .take(FAIL_AFTER_TOKENS)
                    .map(str::to_owned)
                    .collect();
                self.stream(&item_id, words.into_iter()).await?;
                let error = ProviderError {
                    kind: "scripted_failure".into(),
                    message: "the prompt asked the scripted provider to fail".into(),
                    retryable: false,
                };
                self.emit(
                    "runtime.error",
                    json!({"message": error.message, "kind": error.kind, "retryable": error.retryable}),
                )
                .await?;
                Ok(TurnOutcome::Failed(error))
            }
            Cue::Approval => {
                let request_id = uuid::Uuid::new_v4().to_string();
                self.emit(
                    "request.opened",
                    json!({
                        "kind": "command",
                        "request_id": request_id,
                        "detail": {"command": "rm -rf build"},
                        "options": ["accept", "decline"],
                    }),
                )
                .await?;
                // The manager records request.resolved (ResolveRequest, or the deadline
                // passing) and hands the resolution to the turn as a `resolve` command.
                let resolution = self.await_resolution(&request_id).await?;
                let reply = format!("Approval: {}", resolution.decision);
                self.reply_words(&reply, prompt).await
            }
            Cue::Input => {
                let request_id = uuid::Uuid::new_v4().to_string();
                self.emit(
                    "request.opened",
                    json!({
                        "kind": "user_input",
                        "request_id": request_id,
                        "detail": {"question": "What should I do next?"},
                    }),
                )
                .await?;
                let resolution = self.await_resolution(&request_id).await?;
                let reply = format!(
                    "Input: {} answers {}",
                    resolution.decision,
                    serde_json::to_string(&resolution.answers).unwrap_or_default()
                );
                self.reply_words(&reply, prompt).await
            }
            Cue::Gate => {
                let reason = gate_reason(prompt);
                let request_id = uuid::Uuid::new_v4().to_string();
                self.emit(
                    "request.opened",
                    json!({
                        "kind": "user_input",
                        "request_id": request_id,
                        "detail": {
                            "gate": reason,
                            "question": format!("May the run go on past the gate: {reason}?"),
                        },
                        "options": ["accept", "decline"],
                    }),
                )
                .await?;
                let resolution = self.await_resolution(&request_id).await?;
                if !resolution.accepted() {
                    return Ok(TurnOutcome::Blocked { reason });
                }
                let reply = format!("Gate passed: {reason}");
                self.reply_words(&reply, prompt).await
            }
            Cue::Tokens(n) => {
                let item_id = self.open_message().await?;
                self.stream(&item_id, (1..=n).map(NumberedToken)).await?;
                self.complete(&item_id, prompt).await
            }
            Cue::Big(n) => {
                let item_id = self.open_message().await?;
                let mut left = usize::try_from(n).unwrap_or(usize::MAX);
                let pieces = std::iter::from_fn(|| {
                    if left == 0 {
                        return None;
                    }
                    let len = left.min(BIG_DELTA_BYTES);
                    left -= len;
                    Some(BIG_TEXT.chars().cycle().take(len).collect::<String>())
                });
                self.stream_pieces(&item_id, pieces).await?;
                self.complete(&item_id, prompt).await
            }
            Cue::Slow => {
                let item_id = self.open_message().await?;
                let words = SLOW_TEXT.split_whitespace().cycle().take(SLOW_TOKENS);
                self.stream(&item_id, words).await?;
                self.complete(&item_id, prompt).await
            }
            Cue::Echo => {
                let item_id = self.open_message().await?;
                let reply = echo_reply(prompt);
                self.stream(&item_id, reply.split_whitespace()).await?;
                self.complete(&item_id, prompt).await
            }
        }
    }

    /// Streams `reply` word by word into a new message item and completes the turn.
    async fn reply_words(&mut self, reply: &str, prompt: &str) -> Result<TurnOutcome, Halted> {
        let item_id = self.open_message().await?;
        for text in std::mem::take(&mut self.held_steers) {
            self.steered(&item_id, text).await?;
        }
        self.stream(&item_id, reply.split_whitespace()).await?;
        self.complete(&item_id, prompt).await
    }

    /// Streams `pieces` as they are, one delta each, unpaced (bulk text).
    async fn stream_pieces(
        &mut self,
        item_id: &ItemId,
        pieces: impl Iterator<Item = String>,
    ) -> Result<(), Halted> {
        for piece in pieces {
            if self.stop.is_cancelled() {
                return Err(Halted);
            }
            self.reply.push_str(&piece);
            self.tokens += 1;
            self.send(ProviderEvent::delta(
                item_id.clone(),
                "assistant_text",
                piece,
            ))
            .await?;
        }
        self.take_pending_steers(item_id).await
    }

    /// Waits for the resolution of the request `request_id`: only a `resolve` command
    /// answers it, never steer text (steers stay queued and are echoed once the reply
    /// streams). Resolutions of other requests are ignored. If no resolution can come
    /// any more, the turn waits for stop like a person who never answers.
    async fn await_resolution(&mut self, request_id: &str) -> Result<Resolution, Halted> {
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Err(Halted),
                // Read so the executor never waits on a full steer buffer meanwhile.
                steer = self.steer.recv(), if self.steer_open => match steer {
                    Some(text) => self.held_steers.push(text),
                    None => self.steer_open = false,
                },
                resolution = self.resolutions.recv() => match resolution {
                    Some(resolution) if resolution.request_id == request_id => {
                        return Ok(resolution);
                    }
                    Some(other) => {
                        tracing::debug!(request_id = %other.request_id, "a resolution for another request");
                    }
                    None => {
                        self.stop.cancelled().await;
                        return Err(Halted);
                    }
                },
            }
        }
    }
}

#[async_trait::async_trait]
impl Provider for ScriptedProvider {
    async fn run_turn(&self, turn: TurnRequest, ctx: TurnContext) -> TurnOutcome {
        let TurnContext {
            events,
            steer,
            resolutions,
            stop,
        } = ctx;
        let recall = turn.prompt.contains("[recall]").then(|| recall_text(&turn));
        let mut state = Turn {
            turn_id: turn.turn_id,
            recall,
            thread_id: thread_cue(&turn.prompt),
            events,
            steer,
            steer_open: true,
            resolutions,
            held_steers: Vec::new(),
            stop,
            token_delay: self.config.token_delay,
            next_item: 0,
            reply: ReplyText::default(),
            tokens: 0,
        };
        state
            .run(&turn.prompt)
            .await
            .unwrap_or(TurnOutcome::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cues_are_found_in_priority_order() {
        assert_eq!(Cue::of("hello"), Cue::Echo);
        assert_eq!(Cue::of("go [slow] please"), Cue::Slow);
        assert_eq!(Cue::of("[tokens:12]"), Cue::Tokens(12));
        assert_eq!(Cue::of("[tokens:x] then [tokens: 7 ]"), Cue::Tokens(7));
        assert_eq!(Cue::of("[tokens:oops]"), Cue::Echo);
        assert_eq!(Cue::of("[slow] [approval]"), Cue::Approval);
        assert_eq!(Cue::of("[approval] [fail]"), Cue::Fail);
        assert_eq!(Cue::of("[fail] [stall]"), Cue::Stall);
        assert_eq!(Cue::of("[gate] deploy"), Cue::Gate);
        assert_eq!(Cue::of("[big:300000]"), Cue::Big(300_000));
        assert_eq!(gate_reason("[gate]  deploy to prod "), "deploy to prod");
        assert_eq!(gate_reason("[gate]"), "a human gate");
    }

    #[test]
    fn thread_cue_takes_a_word() {
        assert_eq!(thread_cue("hi [thread:t-1] there"), Some("t-1".into()));
        assert_eq!(thread_cue("[thread: t2 ]"), Some("t2".into()));
        assert_eq!(thread_cue("[thread:]"), None);
        assert_eq!(thread_cue("[thread:a b]"), None);
        assert_eq!(thread_cue("[thread:open"), None);
        assert_eq!(thread_cue("hello"), None);
    }
}
