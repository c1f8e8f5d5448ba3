//! The `openai` provider: a turn is a streamed Chat Completions request (and one more
//! per steer, see below) to any OpenAI-compatible endpoint (OpenAI, vLLM, Ollama,
//! llama.cpp server).
//!
//! It owns the HTTP side of a turn: building the request from the run's history, parsing
//! the server-sent events of the reply into provider events, and classifying failures so
//! the runner knows whether another attempt may help (429, 5xx, refused connections and
//! broken streams are retryable; other 4xx and errors the API reports are not).
//!
//! Mapping: `choices[0].delta.content` becomes `content.delta` inside an
//! `assistant_message` item; `choices[0].delta.tool_calls[]` fragments become one
//! `tool_call` item each (`item.started` with the name, `item.updated` per arguments
//! fragment, `item.completed` with the assembled arguments); the `usage` chunk becomes
//! `usage.updated` (totals for the turn so far).
//!
//! Steering: a steer that arrives while a reply streams is kept; when the stream ends, a
//! follow-up request carries the reply so far and the steer as a new user message, and
//! its reply streams into the same turn. The turn's reply is the replies of all its
//! requests, separated by a blank line.
//!
//! Retrying: a request that fails retryably before anything of its reply was emitted (a
//! 429 or 5xx, a refused connection, a timeout, a stream that broke before any content)
//! is sent again within the turn, up to `max_retries` times, after an exponential
//! back-off (`retry_base_delay` doubled per attempt, capped at [`MAX_RETRY_WAIT`]) or the
//! server's `Retry-After` (seconds, capped the same). Each retry is announced with a
//! `runtime.warning {attempt, max_retries, status, kind, wait_ms}`; only when the budget
//! is spent does the turn fail, with the last error. A reply that already streamed
//! content is not retried (its deltas cannot be taken back). Stop ends a back-off at once.
//!
//! Stopping drops the response, which closes the HTTP connection, so the server stops
//! generating.

use std::time::Duration;

use eventsource_stream::{EventStreamError, Eventsource};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{
    ItemId, Provider, ProviderError, ProviderEvent, ReplyText, TurnContext, TurnOutcome,
    TurnRequest, Usage, send_event,
};

/// How much of an error body goes into a failure message.
const ERROR_MESSAGE_CHARS: usize = 300;
/// How much of an error body is read at most.
const ERROR_BODY_BYTES: usize = 64 * 1024;
/// The most bytes one server-sent event may hold (a chunk of a reply is well under a
/// kilobyte): past it the reply is not valid output. Events are buffered whole until the
/// blank line that ends them, so without a bound a server that never ends one would
/// grow the runner's memory (and its parse time) without limit.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// The longest wait before a retry, whatever the back-off or `Retry-After` says.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// Why reading a reply's bytes failed.
#[derive(Debug)]
enum ReplyError {
    Http(reqwest::Error),
    /// An event passed [`MAX_EVENT_BYTES`].
    EventTooLarge,
}

impl std::fmt::Display for ReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Http(error) => error.fmt(f),
            Self::EventTooLarge => write!(f, "an event of over {MAX_EVENT_BYTES} bytes"),
        }
    }
}

/// Counts the bytes of the server-sent event being received, across chunks. An event
/// ends at a blank line: a line end (`\n`, `\r` or `\r\n`) right after another.
#[derive(Debug, Default)]
struct EventBound {
    event_bytes: usize,
    line_bytes: usize,
    after_cr: bool,
}

impl EventBound {
    /// Counts `chunk` in; false once the current event is over [`MAX_EVENT_BYTES`].
    fn admit(&mut self, chunk: &[u8]) -> bool {
        for &byte in chunk {
            let after_cr = std::mem::replace(&mut self.after_cr, byte == b'\r');
            match byte {
                // The `\n` of a `\r\n`: the line already ended.
                b'\n' if after_cr => {}
                b'\n' | b'\r' if self.line_bytes == 0 => self.event_bytes = 0,
                b'\n' | b'\r' => self.line_bytes = 0,
                _ => {
                    self.line_bytes += 1;
                    self.event_bytes += 1;
                    if self.event_bytes > MAX_EVENT_BYTES {
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// Settings of the OpenAI-compatible provider.
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// The API root, e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8080/v1`;
    /// `/chat/completions` is appended. A trailing slash is tolerated.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
    /// The model for the backend profile `openai`; `openai:<model>` names its own.
    pub default_model: String,
    /// The longest wait to connect, for the response to start, and between two chunks
    /// of a streaming reply. Not a cap on the whole reply, which may stream for long.
    pub request_timeout: Duration,
    /// How many times a request that failed retryably is sent again within a turn.
    pub max_retries: u32,
    /// The first back-off before a retry (doubled for each further one) when the server
    /// gives no `Retry-After`.
    pub retry_base_delay: Duration,
}

/// Why an [`OpenAiProvider`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OpenAiSetupError {
    /// The base URL does not parse or is not http(s).
    #[error("invalid base_url {base_url:?}: {reason}")]
    InvalidBaseUrl { base_url: String, reason: String },
    /// The TLS or HTTP stack could not be set up.
    #[error("cannot build the http client")]
    Client(#[source] reqwest::Error),
}

/// Streams turns from an OpenAI-compatible Chat Completions endpoint.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    api_key: Option<String>,
    default_model: String,
    request_timeout: Duration,
    max_retries: u32,
    retry_base_delay: Duration,
}

impl OpenAiProvider {
    /// Checks the base URL and builds the HTTP client (HTTP/1.1, rustls with the webpki
    /// roots). Connections are pooled across turns.
    pub fn new(config: OpenAiConfig) -> Result<Self, OpenAiSetupError> {
        let invalid = |reason: String| OpenAiSetupError::InvalidBaseUrl {
            base_url: config.base_url.clone(),
            reason,
        };
        let joined = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        let endpoint = reqwest::Url::parse(&joined).map_err(|e| invalid(e.to_string()))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https".into()));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(config.request_timeout)
            .user_agent(concat!("agentrun-runner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(OpenAiSetupError::Client)?;
        Ok(Self {
            client,
            endpoint,
            api_key: config.api_key,
            default_model: config.default_model,
            request_timeout: config.request_timeout,
            max_retries: config.max_retries,
            retry_base_delay: config.retry_base_delay,
        })
    }

    /// The model a backend profile asks for: `openai:<model>`, else the default.
    fn model_for<'a>(&'a self, backend_profile: &'a str) -> &'a str {
        match backend_profile.split_once(':') {
            Some((_, model)) if !model.trim().is_empty() => model.trim(),
            _ => &self.default_model,
        }
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiProvider {
    fn model(&self, backend_profile: &str) -> String {
        self.model_for(backend_profile).to_owned()
    }

    async fn run_turn(&self, turn: TurnRequest, ctx: TurnContext) -> TurnOutcome {
        // This provider opens no requests, so no resolution is ever for it; the receiver
        // lives as long as the turn so that one sent anyway is simply not read.
        let TurnContext {
            events,
            steer,
            resolutions: _resolutions,
            stop,
        } = ctx;
        let mut messages = Vec::with_capacity(turn.history.len() * 2 + 1);
        for exchange in &turn.history {
            messages.push(json!({"role": "user", "content": exchange.prompt}));
            messages.push(json!({"role": "assistant", "content": exchange.reply}));
        }
        messages.push(json!({"role": "user", "content": turn.prompt}));
        let mut state = Turn {
            provider: self,
            model: self.model_for(&turn.backend_profile).to_owned(),
            turn_id: turn.turn_id,
            events,
            steer,
            steer_open: true,
            pending_steer: Vec::new(),
            stop,
            next_item: 0,
            usage_before: Usage::default(),
            usage: None,
            emitted: 0,
            failed_status: None,
            retry_after: None,
        };
        match state.run(messages).await {
            Ok(outcome) => outcome,
            Err(Halt::Stopped) => TurnOutcome::Stopped,
            Err(Halt::Failed(error)) => {
                tracing::debug!(kind = %error.kind, retryable = error.retryable, message = %error.message, "openai turn failed");
                // Best effort: if the turn was abandoned meanwhile, nobody reads it anyway.
                let _ = state
                    .emit(
                        "runtime.error",
                        json!({"message": error.message, "kind": error.kind, "retryable": error.retryable}),
                    )
                    .await;
                TurnOutcome::Failed(error)
            }
        }
    }
}

/// Why a request ended early.
enum Halt {
    /// `stop` fired, or the executor dropped the event channel (the turn was abandoned).
    Stopped,
    Failed(ProviderError),
}

fn failure(kind: &str, message: impl Into<String>, retryable: bool) -> Halt {
    Halt::Failed(ProviderError {
        kind: kind.into(),
        message: message.into(),
        retryable,
    })
}

/// A tool call being assembled from its fragments.
struct ToolCall {
    index: u64,
    item_id: String,
    call_id: Option<String>,
    name: String,
    arguments: ReplyText,
    completed: bool,
}

/// What one request of the turn produced.
#[derive(Default)]
struct Round {
    message_item: Option<ItemId>,
    text: ReplyText,
    tool_calls: Vec<ToolCall>,
    finish_reason: Option<String>,
}

/// The state of one turn, across the requests steering adds to it.
struct Turn<'a> {
    provider: &'a OpenAiProvider,
    model: String,
    turn_id: String,
    events: mpsc::Sender<ProviderEvent>,
    steer: mpsc::Receiver<String>,
    steer_open: bool,
    pending_steer: Vec<String>,
    stop: CancellationToken,
    next_item: u64,
    /// Usage of the turn's finished requests.
    usage_before: Usage,
    /// Usage of the turn so far, once any request reported some.
    usage: Option<Usage>,
    /// Events emitted so far (a request that emitted none may be sent again).
    emitted: u64,
    /// The HTTP status of the last request that failed with one.
    failed_status: Option<u16>,
    /// The `Retry-After` of the last request that failed with an HTTP status.
    retry_after: Option<Duration>,
}

impl Turn<'_> {
    async fn run(&mut self, mut messages: Vec<Value>) -> Result<TurnOutcome, Halt> {
        // The replies of the turn's requests, separated by a blank line.
        let mut replies = ReplyText::default();
        loop {
            let text = self.request_with_retries(&messages).await?;
            if let Some(usage) = self.usage {
                self.usage_before = usage;
            }
            if !text.is_empty() {
                if !replies.is_empty() {
                    replies.push_str("\n\n");
                }
                replies.push_str(&text);
            }
            self.take_pending_steers();
            if self.pending_steer.is_empty() {
                break;
            }
            messages.push(json!({"role": "assistant", "content": text}));
            let steer = std::mem::take(&mut self.pending_steer).join("\n");
            messages.push(json!({"role": "user", "content": steer}));
            tracing::debug!(turn_id = %self.turn_id, "following up on a steer");
        }
        Ok(TurnOutcome::Completed {
            reply: replies.into_string(),
            usage: self.usage,
            // Chat Completions keeps no thread: the history is resent every turn.
            provider_thread_id: None,
        })
    }

    fn new_item_id(&mut self) -> String {
        self.next_item += 1;
        format!("{}:{}", self.turn_id, self.next_item)
    }

    async fn emit(&mut self, event_type: &'static str, payload: Value) -> Result<(), Halt> {
        self.send(ProviderEvent::new(event_type, payload)).await
    }

    async fn send(&mut self, event: ProviderEvent) -> Result<(), Halt> {
        self.emitted += 1;
        send_event(&self.events, &self.stop, event)
            .await
            .map_err(|_| Halt::Stopped)
    }

    /// [`Self::request`], sent again after a back-off while it fails retryably before
    /// emitting anything and the retry budget lasts.
    async fn request_with_retries(&mut self, messages: &[Value]) -> Result<String, Halt> {
        let max_retries = self.provider.max_retries;
        let mut attempt = 0;
        loop {
            let emitted_before = self.emitted;
            self.failed_status = None;
            self.retry_after = None;
            let error = match self.request(messages).await {
                Err(Halt::Failed(error)) => error,
                done => return done,
            };
            if !error.retryable || attempt >= max_retries || self.emitted != emitted_before {
                return Err(Halt::Failed(error));
            }
            attempt += 1;
            let backoff = self
                .provider
                .retry_base_delay
                .saturating_mul(1 << (attempt - 1).min(16));
            let wait = self.retry_after.unwrap_or(backoff).min(MAX_RETRY_WAIT);
            tracing::debug!(attempt, kind = %error.kind, ?wait, "retrying an openai request");
            self.emit(
                "runtime.warning",
                json!({
                    "message": format!("retrying after {}: {}", error.kind, error.message),
                    "retry": true,
                    "attempt": attempt,
                    "max_retries": max_retries,
                    "status": self.failed_status,
                    "kind": error.kind,
                    "wait_ms": u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                }),
            )
            .await?;
            self.interruptible(tokio::time::sleep(wait)).await?;
        }
    }

    fn take_pending_steers(&mut self) {
        while self.steer_open {
            match self.steer.try_recv() {
                Ok(text) => self.pending_steer.push(text),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => self.steer_open = false,
            }
        }
    }

    /// Awaits `work`, keeping steers that arrive meanwhile; ends at once on stop, which
    /// drops `work` (and with it the request or the response stream).
    async fn interruptible<T>(&mut self, work: impl Future<Output = T>) -> Result<T, Halt> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Err(Halt::Stopped),
                steer = self.steer.recv(), if self.steer_open => match steer {
                    Some(text) => self.pending_steer.push(text),
                    None => self.steer_open = false,
                },
                done = &mut work => return Ok(done),
            }
        }
    }

    /// Sends one streaming request and streams its reply into events. Returns the text.
    async fn request(&mut self, messages: &[Value]) -> Result<String, Halt> {
        let provider = self.provider;
        let body = json!({
            "model": self.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let mut request = provider
            .client
            .post(provider.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "text/event-stream")
            .body(body.to_string());
        if let Some(key) = &provider.api_key {
            request = request.bearer_auth(key);
        }
        let timeout = provider.request_timeout;
        let response = match self
            .interruptible(tokio::time::timeout(timeout, request.send()))
            .await?
        {
            Err(_) => {
                return Err(failure(
                    "timeout",
                    format!("no response within {timeout:?}"),
                    true,
                ));
            }
            Ok(Err(error)) => return Err(send_failure(&error)),
            Ok(Ok(response)) => response,
        };

        let status = response.status();
        if !status.is_success() {
            self.failed_status = Some(status.as_u16());
            self.retry_after = retry_after(response.headers());
            let body = self
                .interruptible(tokio::time::timeout(timeout, read_error_body(response)))
                .await?
                .unwrap_or_default();
            return Err(status_failure(status, &body));
        }
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase();
        if content_type.starts_with("application/json") {
            // The server ignored `stream: true` or answered with an error document.
            let body = self
                .interruptible(tokio::time::timeout(timeout, read_error_body(response)))
                .await?
                .unwrap_or_default();
            return Err(match error_message(&body) {
                Some(message) => failure("api_error", message, false),
                None => failure(
                    "bad_output",
                    format!(
                        "expected an event stream, got {content_type}: {}",
                        truncate(&body, ERROR_MESSAGE_CHARS)
                    ),
                    false,
                ),
            });
        }

        let mut bound = EventBound::default();
        let bounded = response.bytes_stream().map(move |chunk| match chunk {
            Ok(bytes) if !bound.admit(&bytes) => Err(ReplyError::EventTooLarge),
            Ok(bytes) => Ok(bytes),
            Err(error) => Err(ReplyError::Http(error)),
        });
        let mut stream = std::pin::pin!(bounded.eventsource());
        let mut round = Round::default();
        loop {
            let next = self
                .interruptible(tokio::time::timeout(timeout, stream.next()))
                .await?;
            let event = match next {
                Err(_) => {
                    return Err(failure(
                        "timeout",
                        format!("the stream sent nothing for {timeout:?}"),
                        true,
                    ));
                }
                Ok(None) if round.finish_reason.is_some() => {
                    // Some servers end the stream without `[DONE]`; the reply was
                    // complete (a finish reason came), so take it rather than retry.
                    tracing::debug!("stream ended after its finish reason without [DONE]");
                    break;
                }
                Ok(None) => {
                    return Err(failure("stream", "the stream ended before [DONE]", true));
                }
                Ok(Some(Err(EventStreamError::Transport(ReplyError::EventTooLarge)))) => {
                    return Err(failure(
                        "bad_output",
                        format!(
                            "the stream sent an event of over {} MiB",
                            MAX_EVENT_BYTES / (1024 * 1024)
                        ),
                        false,
                    ));
                }
                Ok(Some(Err(EventStreamError::Transport(ReplyError::Http(error))))) => {
                    return Err(failure(
                        "stream",
                        format!("the stream broke: {}", error_chain(&error)),
                        true,
                    ));
                }
                Ok(Some(Err(error))) => {
                    return Err(failure(
                        "bad_output",
                        format!("the stream is not valid server-sent events: {error}"),
                        false,
                    ));
                }
                Ok(Some(Ok(event))) => event,
            };
            let data = event.data.trim();
            if data == "[DONE]" {
                break;
            }
            if data.is_empty() {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).map_err(|e| {
                failure(
                    "bad_output",
                    format!(
                        "a stream chunk is not JSON ({e}): {}",
                        truncate(data, ERROR_MESSAGE_CHARS)
                    ),
                    false,
                )
            })?;
            self.on_chunk(&mut round, &chunk).await?;
        }
        self.close_items(&mut round).await?;
        Ok(round.text.into_string())
    }

    /// Turns one `chat.completion.chunk` into events.
    async fn on_chunk(&mut self, round: &mut Round, chunk: &Value) -> Result<(), Halt> {
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(stream_error(error));
        }
        if let Some(choice) = chunk.pointer("/choices/0") {
            self.on_choice(round, choice).await?;
        }
        // Last, as some servers put the usage into the chunk with the final delta.
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let field = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
            let total = Usage {
                input_tokens: self.usage_before.input_tokens + field("prompt_tokens"),
                output_tokens: self.usage_before.output_tokens + field("completion_tokens"),
            };
            self.usage = Some(total);
            self.emit(
                "usage.updated",
                json!({"input_tokens": total.input_tokens, "output_tokens": total.output_tokens}),
            )
            .await?;
        }
        Ok(())
    }

    async fn on_choice(&mut self, round: &mut Round, choice: &Value) -> Result<(), Halt> {
        if let Some(delta) = choice.get("delta") {
            if let Some(text) = delta.get("content").and_then(Value::as_str)
                && !text.is_empty()
            {
                self.on_text(round, text).await?;
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                for (position, call) in calls.iter().enumerate() {
                    self.on_tool_call(round, position as u64, call).await?;
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            round.finish_reason = Some(reason.to_owned());
            self.close_items(round).await?;
            if !matches!(reason, "stop" | "tool_calls" | "function_call") {
                self.emit(
                    "runtime.warning",
                    json!({
                        "message": format!("the model stopped early (finish_reason {reason})"),
                        "finish_reason": reason,
                    }),
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn on_text(&mut self, round: &mut Round, text: &str) -> Result<(), Halt> {
        let item_id = match &round.message_item {
            Some(id) => id.clone(),
            None => {
                let id: ItemId = self.new_item_id().into();
                self.emit(
                    "item.started",
                    json!({"item_id": &*id, "kind": "assistant_message"}),
                )
                .await?;
                round.message_item = Some(id.clone());
                id
            }
        };
        round.text.push_str(text);
        self.send(ProviderEvent::delta(
            item_id,
            "assistant_text",
            text.to_owned(),
        ))
        .await
    }

    async fn on_tool_call(
        &mut self,
        round: &mut Round,
        position: u64,
        fragment: &Value,
    ) -> Result<(), Halt> {
        let index = fragment
            .get("index")
            .and_then(Value::as_u64)
            .unwrap_or(position);
        let call_id = fragment.get("id").and_then(Value::as_str);
        let name = fragment.pointer("/function/name").and_then(Value::as_str);
        let arguments = fragment
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let slot = match round.tool_calls.iter().position(|c| c.index == index) {
            Some(slot) => {
                let call = &mut round.tool_calls[slot];
                if let Some(name) = name {
                    call.name.push_str(name);
                }
                if call.call_id.is_none() {
                    call.call_id = call_id.map(str::to_owned);
                }
                slot
            }
            None => {
                let call = ToolCall {
                    index,
                    item_id: self.new_item_id(),
                    call_id: call_id.map(str::to_owned),
                    name: name.unwrap_or_default().to_owned(),
                    arguments: ReplyText::default(),
                    completed: false,
                };
                let mut payload =
                    json!({"item_id": call.item_id, "kind": "tool_call", "name": call.name});
                if let Some(id) = &call.call_id {
                    payload["call_id"] = json!(id);
                }
                self.emit("item.started", payload).await?;
                round.tool_calls.push(call);
                round.tool_calls.len() - 1
            }
        };
        if !arguments.is_empty() {
            let call = &mut round.tool_calls[slot];
            call.arguments.push_str(arguments);
            let payload = json!({
                "item_id": call.item_id,
                "kind": "tool_call",
                "arguments_delta": arguments,
            });
            self.emit("item.updated", payload).await?;
        }
        Ok(())
    }

    /// Completes the round's open items; repeated calls complete nothing twice.
    async fn close_items(&mut self, round: &mut Round) -> Result<(), Halt> {
        if let Some(item_id) = round.message_item.take() {
            self.emit(
                "item.completed",
                json!({"item_id": &*item_id, "kind": "assistant_message", "text": round.text.as_str()}),
            )
            .await?;
        }
        for call in round.tool_calls.iter_mut().filter(|c| !c.completed) {
            call.completed = true;
            let mut payload = json!({
                "item_id": call.item_id,
                "kind": "tool_call",
                "name": call.name,
                "arguments": call.arguments.as_str(),
            });
            if let Some(id) = &call.call_id {
                payload["call_id"] = json!(id);
            }
            self.emit("item.completed", payload).await?;
        }
        Ok(())
    }
}

/// The wait a `Retry-After` header asks for, in seconds (an HTTP date is not honoured:
/// the back-off applies then).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| Duration::from_secs_f64(seconds.min(MAX_RETRY_WAIT.as_secs_f64())))
}

/// Classifies a failure to get a response at all.
fn send_failure(error: &reqwest::Error) -> Halt {
    let detail = error_chain(error);
    if error.is_builder() {
        failure(
            "request",
            format!("cannot build the request: {detail}"),
            false,
        )
    } else if error.is_timeout() {
        failure("timeout", format!("the request timed out: {detail}"), true)
    } else {
        failure(
            "connect",
            format!("cannot reach the server: {detail}"),
            true,
        )
    }
}

/// Classifies an HTTP error status: rate limits and server errors may pass, the rest
/// (bad request, auth, unknown model) will not.
fn status_failure(status: reqwest::StatusCode, body: &str) -> Halt {
    let retryable = status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error();
    let detail = error_message(body).unwrap_or_else(|| body.trim().to_owned());
    let message = if detail.is_empty() {
        format!("the server answered {status}")
    } else {
        format!(
            "the server answered {status}: {}",
            truncate(&detail, ERROR_MESSAGE_CHARS)
        )
    };
    failure("http_status", message, retryable)
}

/// Classifies an `{"error": ...}` object sent inside the stream. Not retryable unless it
/// says so: an explicit `retryable`, a rate-limit or server-error type or code.
fn stream_error(error: &Value) -> Halt {
    let message = match error {
        Value::String(text) => text.clone(),
        _ => error
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| error.to_string()),
    };
    let says = |key: &str| -> bool {
        match error.get(key) {
            Some(Value::String(s)) => matches!(
                s.as_str(),
                "server_error"
                    | "rate_limit_exceeded"
                    | "rate_limit_error"
                    | "overloaded_error"
                    | "overloaded"
                    | "timeout"
                    | "429"
                    | "500"
                    | "502"
                    | "503"
                    | "504"
            ),
            Some(Value::Number(n)) => n
                .as_u64()
                .is_some_and(|code| code == 429 || (500..600).contains(&code)),
            _ => false,
        }
    };
    let retryable = error
        .get("retryable")
        .and_then(Value::as_bool)
        .unwrap_or_else(|| says("type") || says("code"));
    failure(
        "api_error",
        format!(
            "the server reported an error: {}",
            truncate(&message, ERROR_MESSAGE_CHARS)
        ),
        retryable,
    )
}

/// The message of an OpenAI-style error document (`{"error": {"message": ...}}`,
/// `{"error": "..."}`, `{"message": ...}` or `{"detail": ...}`).
fn error_message(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    let text = value
        .pointer("/error/message")
        .or_else(|| value.get("error").filter(|e| e.is_string()))
        .or_else(|| value.get("message"))
        .or_else(|| value.get("detail"))?;
    Some(match text {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// Reads at most [`ERROR_BODY_BYTES`] of a response body, lossily as text.
async fn read_error_body(mut response: reqwest::Response) -> String {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    body.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&body).into_owned()
}

/// `text` cut to at most `max` characters, marked when cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// An error and its sources, which is where reqwest keeps the useful part.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each event of a stream is bounded on its own, whatever its line ends and however
    /// the stream is cut into chunks.
    #[test]
    fn the_event_bound_restarts_at_each_blank_line() {
        let line = format!("data: {}", "x".repeat(MAX_EVENT_BYTES / 2));
        for end in ["\n\n", "\r\r", "\r\n\r\n"] {
            let mut bound = EventBound::default();
            for _ in 0..10 {
                let event = format!("{line}{end}");
                let (a, b) = event.as_bytes().split_at(1000);
                assert!(bound.admit(a) && bound.admit(b), "{end:?}");
            }
        }
        // Three such lines in one event (no blank line between them) are over it.
        let mut bound = EventBound::default();
        let event = format!("{line}\r\n{line}\n{line}");
        assert!(!bound.admit(event.as_bytes()));
    }

    fn provider(base_url: &str) -> OpenAiProvider {
        OpenAiProvider::new(OpenAiConfig {
            base_url: base_url.into(),
            api_key: None,
            default_model: "default-model".into(),
            request_timeout: Duration::from_secs(5),
            max_retries: 0,
            retry_base_delay: Duration::ZERO,
        })
        .unwrap()
    }

    fn failed(halt: Halt) -> ProviderError {
        match halt {
            Halt::Failed(error) => error,
            Halt::Stopped => panic!("expected a failure"),
        }
    }

    #[test]
    fn the_endpoint_and_model_come_from_config_and_profile() {
        let p = provider("http://127.0.0.1:8080/v1/");
        assert_eq!(
            p.endpoint.as_str(),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        assert_eq!(p.model_for("openai"), "default-model");
        assert_eq!(p.model_for("openai:"), "default-model");
        assert_eq!(p.model_for("openai:gpt-4o-mini"), "gpt-4o-mini");
        assert_eq!(p.model_for("openai:org/model:q4"), "org/model:q4");
        let err = OpenAiProvider::new(OpenAiConfig {
            base_url: "ftp://example.com".into(),
            api_key: None,
            default_model: "m".into(),
            request_timeout: Duration::from_secs(1),
            max_retries: 0,
            retry_base_delay: Duration::ZERO,
        })
        .unwrap_err();
        assert!(err.to_string().contains("http or https"), "{err}");
    }

    #[test]
    fn http_statuses_are_classified() {
        let body = r#"{"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}"#;
        let err = failed(status_failure(reqwest::StatusCode::UNAUTHORIZED, body));
        assert_eq!(err.kind, "http_status");
        assert!(!err.retryable);
        assert!(err.message.contains("401"), "{}", err.message);
        assert!(err.message.contains("Incorrect API key"), "{}", err.message);
        assert!(failed(status_failure(reqwest::StatusCode::TOO_MANY_REQUESTS, "")).retryable);
        assert!(failed(status_failure(reqwest::StatusCode::BAD_GATEWAY, "<html>")).retryable);
        assert!(!failed(status_failure(reqwest::StatusCode::NOT_FOUND, "")).retryable);
        let long = "x".repeat(5000);
        let err = failed(status_failure(reqwest::StatusCode::BAD_REQUEST, &long));
        assert!(err.message.len() < 400, "{}", err.message.len());
    }

    #[test]
    fn errors_in_the_stream_are_final_unless_they_say_otherwise() {
        let err = failed(stream_error(
            &json!({"message": "context too long", "type": "invalid_request_error"}),
        ));
        assert_eq!(err.kind, "api_error");
        assert!(!err.retryable);
        assert!(err.message.contains("context too long"));
        assert!(
            failed(stream_error(
                &json!({"message": "busy", "type": "server_error"})
            ))
            .retryable
        );
        assert!(failed(stream_error(&json!({"message": "slow down", "code": 429}))).retryable);
        assert!(failed(stream_error(&json!({"message": "x", "retryable": true}))).retryable);
        assert!(!failed(stream_error(&json!("plain text"))).retryable);
    }

    #[test]
    fn truncation_respects_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé...");
        assert_eq!(truncate("hé", 2), "hé");
        assert_eq!(
            error_message(r#"{"detail": "Not Found"}"#).as_deref(),
            Some("Not Found")
        );
        assert_eq!(error_message("not json"), None);
    }
}
