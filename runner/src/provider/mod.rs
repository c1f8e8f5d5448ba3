//! Providers: what executes one turn of a run. One trait, three implementations:
//! `scripted` (deterministic, built in), `openai` (any OpenAI-compatible Chat Completions
//! endpoint, streaming), `command` (an agent CLI as a child process).
//!
//! A provider turns a [`TurnRequest`] into [`ProviderEvent`]s sent on the turn's event
//! channel, takes steering input while it runs, and stops promptly when its cancellation
//! token fires (dropping the HTTP request, terminating the child). The executor around it
//! writes `turn.started` / `turn.completed`; providers write everything in between.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub mod command;
pub mod openai;
pub mod scripted;

/// The most of a turn's reply a provider keeps (see [`ReplyText`]).
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// Text a provider assembles from the pieces it streams (a reply, a tool call's
/// arguments), kept up to [`MAX_REPLY_BYTES`] and cut there on a char boundary. The
/// pieces reach the log whole, as deltas; what is kept is for the completed item and
/// the turn's outcome, which the manager's payload limit (1 MiB at most) cuts anyway.
/// Unbounded, a reply that never ends would hold the runner's memory until the run's
/// event quota (1 GiB by default) stopped it.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReplyText(String);

impl ReplyText {
    /// Appends what of `piece` fits.
    pub fn push_str(&mut self, piece: &str) {
        let room = MAX_REPLY_BYTES.saturating_sub(self.0.len());
        let mut end = piece.len().min(room);
        while !piece.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push_str(&piece[..end]);
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// One turn to execute.
#[derive(Debug, Clone)]
pub struct TurnRequest {
    pub run_id: String,
    /// Unique per turn (the id of the `turn` command that started it).
    pub turn_id: String,
    /// The backend profile of the run, e.g. "scripted", "openai:gpt-4o-mini".
    pub backend_profile: String,
    pub prompt: String,
    /// The conversation so far, oldest first, for providers that resend context: the
    /// session's earlier turns and this run's completed turns (also those completed
    /// under an earlier lease of the run).
    pub history: Vec<Exchange>,
    /// The provider's own thread id last reported for this run or its session, for
    /// providers that keep their threads and resume them by id.
    pub provider_thread_id: Option<String>,
}

/// A completed earlier turn: what was asked and what the assistant answered.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub prompt: String,
    pub reply: String,
}

/// An event a provider emits. `event_type` is one of the runner-writable types of
/// `agentrun_shared::events::EventType` (e.g. "item.started", "content.delta",
/// "item.completed", "usage.updated", "request.opened", "runtime.warning",
/// "runtime.error"); `payload` must satisfy that type's rules (see
/// `EventType::validate_payload`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderEvent {
    pub event_type: &'static str,
    pub payload: EventPayload,
}

/// What a provider event carries.
#[derive(Debug, Clone, PartialEq)]
pub enum EventPayload {
    /// A JSON object.
    Json(Value),
    /// A `content.delta`'s fields: the event a provider sends most, written as the log's
    /// JSON text directly rather than built as a `Value` first.
    Delta {
        item_id: ItemId,
        kind: &'static str,
        delta: String,
    },
}

/// An item's id, shared by the item's events: a streamed reply names its item in every
/// delta, so each names it by a reference count rather than by a copy of its text.
pub type ItemId = Arc<str>;

impl ProviderEvent {
    pub fn new(event_type: &'static str, payload: Value) -> Self {
        Self {
            event_type,
            payload: EventPayload::Json(payload),
        }
    }

    /// A `content.delta` of `kind` text streamed into the item `item_id`.
    pub fn delta(item_id: impl Into<ItemId>, kind: &'static str, delta: String) -> Self {
        Self {
            event_type: "content.delta",
            payload: EventPayload::Delta {
                item_id: item_id.into(),
                kind,
                delta,
            },
        }
    }

    /// The payload as a JSON value.
    pub fn payload_value(self) -> Value {
        match self.payload {
            EventPayload::Json(payload) => payload,
            EventPayload::Delta {
                item_id,
                kind,
                delta,
            } => serde_json::json!({"item_id": &*item_id, "kind": kind, "delta": delta}),
        }
    }

    /// The id of the request a `request.opened` opens.
    pub fn request_id(&self) -> Option<&str> {
        match &self.payload {
            EventPayload::Json(payload) if self.event_type == "request.opened" => {
                payload.get("request_id")?.as_str()
            }
            _ => None,
        }
    }
}

/// Sends `event` on a turn's event channel, waiting while it is full; `Err` once `stop`
/// fires or the turn was abandoned. One with room takes the event at once: a streaming
/// provider sends an event per token.
pub async fn send_event(
    events: &mpsc::Sender<ProviderEvent>,
    stop: &CancellationToken,
    event: ProviderEvent,
) -> Result<(), Stopped> {
    if stop.is_cancelled() {
        return Err(Stopped);
    }
    let event = match events.try_send(event) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => return Err(Stopped),
        Err(mpsc::error::TrySendError::Full(event)) => event,
    };
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(Stopped),
        sent = events.send(event) => sent.map_err(|_| Stopped),
    }
}

/// The turn was stopped or abandoned: its provider sends nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// The channels of a running turn.
pub struct TurnContext {
    /// Where the provider sends its events, in order. Sending awaits when the runner's
    /// event buffer is full (backpressure); an error means the turn was abandoned.
    pub events: mpsc::Sender<ProviderEvent>,
    /// Steering input (text) for the active turn, in order. Never an answer to a
    /// request: those come on `resolutions`.
    pub steer: mpsc::Receiver<String>,
    /// Answers to the requests this turn opened (`request.opened`), in the order they
    /// were resolved. A provider waiting for one takes the one with its `request_id`.
    pub resolutions: mpsc::Receiver<Resolution>,
    /// Fires on interrupt or cancel: stop promptly and return [`TurnOutcome::Stopped`].
    pub stop: CancellationToken,
}

/// The answer to an open request, as the manager's `resolve` command carries it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resolution {
    pub request_id: String,
    /// `accept`, `accept_for_session`, `decline`, `cancel`, or `expired` (the deadline
    /// passed).
    pub decision: String,
    /// For user-input requests: the answers (a JSON object); `Null` when none.
    pub answers: Value,
    /// A value the client returned with its answer; `Null` when none.
    pub value: Value,
    /// An error the client reported instead of an answer.
    pub error: Option<String>,
}

impl Resolution {
    /// The resolution a `resolve` command's payload describes; absent fields are empty.
    pub fn from_payload(payload: &Value) -> Self {
        let text = |key: &str| payload[key].as_str().unwrap_or_default().to_owned();
        let error = match &payload["error"] {
            Value::Null => None,
            Value::String(message) => Some(message.clone()),
            other => Some(
                other["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| other.to_string()),
            ),
        };
        Self {
            request_id: text("request_id"),
            decision: text("decision"),
            answers: payload["answers"].clone(),
            value: payload["value"].clone(),
            error,
        }
    }

    /// Whether the decision lets the work go on.
    pub fn accepted(&self) -> bool {
        self.error.is_none() && matches!(self.decision.as_str(), "accept" | "accept_for_session")
    }
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnOutcome {
    /// The reply is complete. `reply` is the assistant's full text (kept as history);
    /// `provider_thread_id` is the provider's own thread id, when it keeps one (recorded
    /// in `turn.completed` and remembered by the run's session).
    Completed {
        reply: String,
        usage: Option<Usage>,
        provider_thread_id: Option<String>,
    },
    /// The provider failed.
    Failed(ProviderError),
    /// `stop` fired and the work was stopped.
    Stopped,
    /// The work cannot go on without a person, who declined to let it (a human gate):
    /// the run ends `blocked` with `reason` as its failure message.
    Blocked { reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// A provider failure, classified so the runner knows whether trying again may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ProviderError {
    /// Short machine-readable class: "http_status", "stream", "connect", "timeout",
    /// "process_exit", "bad_output", "scripted_failure", ...
    pub kind: String,
    pub message: String,
    /// True for rate limits, 5xx, dropped connections; false for bad requests, auth.
    pub retryable: bool,
}

/// Executes turns for one family of backend profiles.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// Runs one turn to its end. Must return promptly after `ctx.stop` fires.
    async fn run_turn(&self, turn: TurnRequest, ctx: TurnContext) -> TurnOutcome;

    /// The model a turn of `backend_profile` asks for (a turn span's
    /// `gen_ai.request.model`); by default the profile itself.
    fn model(&self, backend_profile: &str) -> String {
        backend_profile.to_owned()
    }
}

/// The providers a runner has, keyed by the part of the backend profile before ':'.
pub type Providers = Vec<(String, Arc<dyn Provider>)>;

/// The provider serving `backend_profile` ("openai:gpt-4o" is served by "openai").
pub fn for_profile<'a>(
    providers: &'a Providers,
    backend_profile: &str,
) -> Option<&'a Arc<dyn Provider>> {
    let family = backend_profile.split(':').next().unwrap_or_default();
    providers
        .iter()
        .find(|(name, _)| name == family)
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_resolution_is_read_from_the_resolve_payload_with_or_without_value_and_error() {
        let today = Resolution::from_payload(&json!({
            "request_id": "r1", "decision": "accept", "answers": {"a": 1},
        }));
        assert_eq!(today.request_id, "r1");
        assert_eq!(today.answers, json!({"a": 1}));
        assert_eq!(today.value, Value::Null);
        assert_eq!(today.error, None);
        assert!(today.accepted());

        let full = Resolution::from_payload(&json!({
            "request_id": "r2", "decision": "accept", "answers": null,
            "value": {"x": [1, 2]}, "error": {"message": "tool crashed"},
        }));
        assert_eq!(full.value, json!({"x": [1, 2]}));
        assert_eq!(full.error.as_deref(), Some("tool crashed"));
        assert!(!full.accepted(), "an error is no acceptance");
        let declined =
            Resolution::from_payload(&json!({"request_id": "r3", "decision": "decline"}));
        assert!(!declined.accepted());
        assert_eq!(
            Resolution::from_payload(&json!({"error": "boom"}))
                .error
                .as_deref(),
            Some("boom")
        );
    }
}
