//! The `command` provider: each turn runs an agent CLI as a child process.
//!
//! It owns the child's life for one turn: spawning it in its own process group, feeding
//! it the prompt and steers, turning its output into events, and ending it on stop
//! (SIGTERM to the group, SIGKILL after the grace period, always reaped) so that no
//! process outlives the turn.
//!
//! # Protocol
//!
//! The runner writes JSON lines to the child's stdin:
//!
//! - first `{"type":"prompt","text":...,"history":[{"prompt":...,"reply":...},...],
//!   "run_id":...,"turn_id":...,"provider_thread_id":...}` (history oldest first: the
//!   session's earlier turns and the run's own; `provider_thread_id` is the thread the
//!   agent reported last for this run or its session, or null);
//! - then `{"type":"steer","text":...}` for each steer received during the turn;
//! - and `{"type":"resolution","request_id":...,"decision":...,"answers":...,"value":...,
//!   "error":...}` for each answer to a request the child opened (`request.opened`).
//!
//! Stdin is closed when the turn ends; the child must not wait for end of input to
//! finish its turn.
//!
//! The child writes to stdout, one item per line:
//!
//! - a JSON object whose `"type"` is an event type the runner may write (not `turn.*`):
//!   that event, with the object's other fields as its payload (for example
//!   `{"type":"content.delta","item_id":"a","kind":"assistant_text","delta":"Hi"}`).
//!   An event that fails validation is replaced by a `runtime.warning` saying why;
//! - `{"type":"result","text":...,"usage":{"input_tokens":N,"output_tokens":N},
//!   "thread_id":...}`: the turn's reply and usage (usage optional; reported as
//!   `usage.updated`) and the agent's own thread id (optional, a string: an agent CLI
//!   that keeps its conversations reports the id it resumes them by; the next turn, and
//!   the session's next run, get it back as `provider_thread_id`);
//! - any other line: output, sent as `content.delta {kind:"command_output"}` with the
//!   line and its newline.
//!
//! Exit status 0 completes the turn; its reply is the `result` text, else the
//! `assistant_text` deltas joined, else empty. A `result` text with no assistant text
//! streamed and no `assistant_message` item completed is recorded as one (`item.started`
//! and `item.completed` with the text), so the log holds every turn's reply. Any other exit (or death by signal) fails
//! it with kind `process_exit`, the status and the tail of stderr; not retryable.

use std::ffi::OsString;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use agentrun_shared::events::EventType;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{
    ItemId, Provider, ProviderError, ProviderEvent, ReplyText, Resolution, TurnContext,
    TurnOutcome, TurnRequest, Usage, send_event,
};

/// What the runner feeds a child during its turn.
struct Inputs<'a> {
    steer: &'a mut mpsc::Receiver<String>,
    resolutions: &'a mut mpsc::Receiver<Resolution>,
}

/// The longest stdout line taken as one line; longer ones are split.
const MAX_LINE_BYTES: usize = 1024 * 1024;
/// How much of stderr a failure message quotes (its end).
const STDERR_TAIL_BYTES: usize = 2048;
/// After the child exits, how long to wait for more output before deciding that a
/// leftover process of its group holds the pipe.
const DRAIN_IDLE: Duration = Duration::from_millis(500);
/// How long to wait for stderr to close once the child is gone.
const STDERR_WAIT: Duration = Duration::from_millis(500);
/// Longest thread id an agent may report.
const MAX_THREAD_ID_BYTES: usize = 1024;
/// Lines queued for the child's stdin beyond which steers are dropped (with a warning)
/// rather than letting a child that does not read stall the turn.
const STDIN_QUEUE: usize = 64;

/// The runner's own settings in its environment (its API key among them): not passed on
/// to the child.
const RUNNER_SETTINGS_PREFIX: &str = "AGENTRUN_";

/// Settings of the command provider.
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// The agent CLI to run, looked up in `PATH` if it has no slash.
    pub program: String,
    /// Its arguments, passed as they are (no shell involved unless `program` is one).
    pub args: Vec<String>,
    /// How long the child's process group has to exit after SIGTERM before SIGKILL.
    pub grace: Duration,
}

/// Runs an agent CLI per turn; see the module documentation for the protocol.
#[derive(Debug, Clone)]
pub struct CommandProvider {
    config: CommandConfig,
}

impl CommandProvider {
    /// A provider running `config.program` with `config.args` for every turn.
    pub fn new(config: CommandConfig) -> Self {
        Self { config }
    }

    fn spawn(&self) -> std::io::Result<Child> {
        self.command(std::env::vars_os()).spawn()
    }

    /// The child's command, its environment the runner's (`runner_env`) without the
    /// runner's own settings (`AGENTRUN_*`): the agent does what a tenant's prompt asks,
    /// tools included, and must not find the runner's API key to the manager there.
    fn command(&self, runner_env: impl IntoIterator<Item = (OsString, OsString)>) -> Command {
        let mut command = Command::new(&self.config.program);
        command
            .args(&self.config.args)
            .env_clear()
            .envs(runner_env.into_iter().filter(|(name, _)| {
                !name
                    .as_encoded_bytes()
                    .starts_with(RUNNER_SETTINGS_PREFIX.as_bytes())
            }))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so stop reaches whatever the CLI started too.
            .process_group(0)
            // A backstop if the turn's future is dropped mid-way.
            .kill_on_drop(true);
        command
    }
}

#[async_trait::async_trait]
impl Provider for CommandProvider {
    async fn run_turn(&self, turn: TurnRequest, ctx: TurnContext) -> TurnOutcome {
        let TurnContext {
            events,
            mut steer,
            mut resolutions,
            stop,
        } = ctx;
        let mut session = Session {
            turn_id: turn.turn_id.clone(),
            events,
            stop,
            output_item: None,
            result: None,
            usage: None,
            assistant_text: ReplyText::default(),
            thread_id: None,
            assistant_message_completed: false,
        };
        let mut child = match self.spawn() {
            Ok(child) => child,
            Err(error) => {
                let error = ProviderError {
                    kind: "spawn".into(),
                    message: format!("cannot start {}: {error}", self.config.program),
                    retryable: false,
                };
                return session.fail(error).await;
            }
        };
        // Invariants: a child not yet waited for has a pid, and all three pipes were
        // requested above.
        let pgid = child.id().expect("a running child has a pid") as libc::pid_t;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        tracing::debug!(pid = pgid, program = %self.config.program, "agent started");

        let stderr_tail = tokio::spawn(tail_of(stderr));
        let (stdin_lines, stdin_rx) = mpsc::channel(STDIN_QUEUE);
        let writer = tokio::spawn(write_lines(stdin, stdin_rx));
        let history: Vec<Value> = turn
            .history
            .iter()
            .map(|e| json!({"prompt": e.prompt, "reply": e.reply}))
            .collect();
        let prompt = json!({
            "type": "prompt",
            "text": turn.prompt,
            "history": history,
            "run_id": turn.run_id,
            "turn_id": turn.turn_id,
            "provider_thread_id": turn.provider_thread_id,
        });
        // The queue is empty, so this cannot fail for lack of room; if the writer is
        // already gone the child has closed its stdin, which is its business.
        let _ = stdin_lines.try_send(prompt.to_string());

        let ended = session
            .pump(
                &mut child,
                stdout,
                Inputs {
                    steer: &mut steer,
                    resolutions: &mut resolutions,
                },
                &stdin_lines,
            )
            .await;
        // The turn is over for the child's stdin whatever happens next.
        drop(stdin_lines);
        writer.abort();

        let status = match ended {
            Ended::Exited(status) => status,
            Ended::Stopped => {
                terminate(&mut child, pgid, self.config.grace).await;
                stderr_tail.abort();
                return TurnOutcome::Stopped;
            }
            Ended::Lost(error) => {
                terminate(&mut child, pgid, Duration::ZERO).await;
                stderr_tail.abort();
                let error = ProviderError {
                    kind: "process_exit".into(),
                    message: format!("cannot wait for {}: {error}", self.config.program),
                    retryable: false,
                };
                return session.fail(error).await;
            }
        };
        // The turn is over, and so is whatever the child left running in its group.
        // Its id stays reserved while any member lives, so this reaches only them.
        signal_group(pgid, libc::SIGKILL);
        if status.success() {
            stderr_tail.abort();
            return session.complete().await;
        }
        let tail = match tokio::time::timeout(STDERR_WAIT, stderr_tail).await {
            Ok(Ok(tail)) => tail,
            _ => String::new(),
        };
        let mut message = format!("{} exited with {status}", self.config.program);
        if !tail.trim().is_empty() {
            message.push_str("; stderr: ");
            message.push_str(tail.trim_end());
        }
        session
            .fail(ProviderError {
                kind: "process_exit".into(),
                message,
                retryable: false,
            })
            .await
    }
}

/// How the child's part of the turn ended.
enum Ended {
    Exited(ExitStatus),
    /// Waiting for the child failed, so its status is unknown.
    Lost(std::io::Error),
    /// `stop` fired, or the executor dropped the event channel.
    Stopped,
}

/// Stop fired or the turn was abandoned while sending an event.
struct Halted;

/// The turn's side of the conversation with the child.
struct Session {
    turn_id: String,
    events: mpsc::Sender<ProviderEvent>,
    stop: CancellationToken,
    /// The item plain output lines belong to, once there was one.
    output_item: Option<ItemId>,
    result: Option<String>,
    usage: Option<Usage>,
    assistant_text: ReplyText,
    /// The agent's thread id, from its result line.
    thread_id: Option<String>,
    /// The agent completed an `assistant_message` item itself.
    assistant_message_completed: bool,
}

impl Session {
    async fn emit(&self, event_type: &'static str, payload: Value) -> Result<(), Halted> {
        self.send(ProviderEvent::new(event_type, payload)).await
    }

    async fn send(&self, event: ProviderEvent) -> Result<(), Halted> {
        send_event(&self.events, &self.stop, event)
            .await
            .map_err(|_| Halted)
    }

    async fn warn(&self, message: String) -> Result<(), Halted> {
        tracing::debug!(turn_id = %self.turn_id, warning = %message, "agent output ignored");
        self.emit("runtime.warning", json!({"message": message}))
            .await
    }

    async fn fail(&self, error: ProviderError) -> TurnOutcome {
        // Best effort: if the turn was abandoned meanwhile, nobody reads it anyway.
        let _ = self
            .emit(
                "runtime.error",
                json!({"message": error.message, "kind": error.kind, "retryable": error.retryable}),
            )
            .await;
        TurnOutcome::Failed(error)
    }

    /// A reply given only as the result text (no assistant text or message streamed)
    /// becomes an `assistant_message` item, so the log holds the reply: it is what the
    /// session's later runs are given as this turn's answer.
    async fn record_result(&mut self) -> Result<(), Halted> {
        let Some(text) = self.result.as_ref().filter(|t| !t.is_empty()) else {
            return Ok(());
        };
        if !self.assistant_text.is_empty() || self.assistant_message_completed {
            return Ok(());
        }
        let item_id = format!("{}:result", self.turn_id);
        let completed = json!({"item_id": item_id, "kind": "assistant_message", "text": text});
        self.emit(
            "item.started",
            json!({"item_id": item_id, "kind": "assistant_message"}),
        )
        .await?;
        self.emit("item.completed", completed).await
    }

    async fn complete(&mut self) -> TurnOutcome {
        if self.close_output().await.is_err() || self.record_result().await.is_err() {
            return TurnOutcome::Stopped;
        }
        let reply = self
            .result
            .take()
            .unwrap_or_else(|| std::mem::take(&mut self.assistant_text).into_string());
        TurnOutcome::Completed {
            reply,
            usage: self.usage,
            provider_thread_id: self.thread_id.take(),
        }
    }

    /// Reads the child's output and forwards steers until it exits (or stop fires).
    async fn pump(
        &mut self,
        child: &mut Child,
        stdout: impl AsyncRead + Unpin,
        inputs: Inputs<'_>,
        stdin_lines: &mpsc::Sender<String>,
    ) -> Ended {
        let Inputs { steer, resolutions } = inputs;
        let mut resolutions_open = true;
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        let mut stdout_open = true;
        let mut steer_open = true;
        let status = loop {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ended::Stopped,
                read = read_line(&mut reader, &mut line), if stdout_open => {
                    match read {
                        Ok(0) => {
                            stdout_open = false;
                            // A last line without a newline, read in earlier calls.
                            if !line.is_empty() && self.on_line(&mut line).await.is_err() {
                                return Ended::Stopped;
                            }
                        }
                        Ok(_) => {
                            if self.on_line(&mut line).await.is_err() {
                                return Ended::Stopped;
                            }
                        }
                        Err(error) => {
                            tracing::debug!(%error, "reading the agent's stdout failed");
                            stdout_open = false;
                        }
                    }
                }
                text = steer.recv(), if steer_open => match text {
                    Some(text) => {
                        let line = json!({"type": "steer", "text": text}).to_string();
                        if stdin_lines.try_send(line).is_err()
                            && self
                                .warn("a steer was dropped: the agent is not reading its stdin".into())
                                .await
                                .is_err()
                        {
                            return Ended::Stopped;
                        }
                    }
                    None => steer_open = false,
                },
                resolution = resolutions.recv(), if resolutions_open => match resolution {
                    Some(r) => {
                        let line = json!({
                            "type": "resolution",
                            "request_id": r.request_id,
                            "decision": r.decision,
                            "answers": r.answers,
                            "value": r.value,
                            "error": r.error,
                        })
                        .to_string();
                        if stdin_lines.try_send(line).is_err()
                            && self
                                .warn("a resolution was dropped: the agent is not reading its stdin".into())
                                .await
                                .is_err()
                        {
                            return Ended::Stopped;
                        }
                    }
                    None => resolutions_open = false,
                },
                status = child.wait() => match status {
                    Ok(status) => break status,
                    Err(error) => return Ended::Lost(error),
                },
            }
        };
        // What the child wrote before exiting is still in the pipe: take it.
        while stdout_open {
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ended::Stopped,
                read = tokio::time::timeout(DRAIN_IDLE, read_line(&mut reader, &mut line)) => {
                    match read {
                        Ok(Ok(n)) if n > 0 || !line.is_empty() => {
                            if self.on_line(&mut line).await.is_err() {
                                return Ended::Stopped;
                            }
                        }
                        Ok(_) => stdout_open = false,
                        Err(_) => {
                            // A process the child left behind holds its stdout; it is
                            // killed with the group once this returns.
                            tracing::debug!("the agent left processes behind");
                            stdout_open = false;
                        }
                    }
                }
            }
        }
        Ended::Exited(status)
    }

    /// Turns one stdout line (taken out of `line`) into events.
    async fn on_line(&mut self, line: &mut Vec<u8>) -> Result<(), Halted> {
        let raw = std::mem::take(line);
        let text = String::from_utf8_lossy(&raw);
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(text)
            && let Some(Value::String(kind)) = object.remove("type")
        {
            return self.on_message(&kind, object).await;
        }
        self.on_output(text).await
    }

    async fn on_output(&mut self, text: &str) -> Result<(), Halted> {
        let item_id = match &self.output_item {
            Some(id) => id.clone(),
            None => {
                let id: ItemId = format!("{}:output", self.turn_id).into();
                self.emit(
                    "item.started",
                    json!({"item_id": &*id, "kind": "command_output"}),
                )
                .await?;
                self.output_item = Some(id.clone());
                id
            }
        };
        self.send(ProviderEvent::delta(
            item_id,
            "command_output",
            format!("{text}\n"),
        ))
        .await
    }

    async fn close_output(&mut self) -> Result<(), Halted> {
        match self.output_item.take() {
            Some(item_id) => {
                self.emit(
                    "item.completed",
                    json!({"item_id": &*item_id, "kind": "command_output"}),
                )
                .await
            }
            None => Ok(()),
        }
    }

    /// A JSON line with a `type`: an event, or the result.
    async fn on_message(&mut self, kind: &str, object: Map<String, Value>) -> Result<(), Halted> {
        if kind == "result" {
            return self.on_result(&object).await;
        }
        let event_type = match EventType::parse("type", kind) {
            Ok(event_type) => event_type,
            Err(error) => {
                return self
                    .warn(format!("ignored a line from the agent: {error}"))
                    .await;
            }
        };
        if !event_type.runner_may_write()
            || matches!(
                event_type,
                EventType::TurnStarted | EventType::TurnCompleted
            )
        {
            return self
                .warn(format!(
                    "ignored a line from the agent: the runner does not write {kind} events"
                ))
                .await;
        }
        if let Err(error) = event_type.validate_payload("payload", &object) {
            return self
                .warn(format!("ignored a {kind} event from the agent: {error}"))
                .await;
        }
        if event_type == EventType::ContentDelta
            && object.get("kind").and_then(Value::as_str) == Some("assistant_text")
            && let Some(delta) = object.get("delta").and_then(Value::as_str)
        {
            self.assistant_text.push_str(delta);
        }
        if event_type == EventType::ItemCompleted
            && object.get("kind").and_then(Value::as_str) == Some("assistant_message")
        {
            self.assistant_message_completed = true;
        }
        self.emit(event_type.as_str(), Value::Object(object)).await
    }

    async fn on_result(&mut self, object: &Map<String, Value>) -> Result<(), Halted> {
        match object.get("text") {
            Some(Value::String(text)) => self.result = Some(text.clone()),
            None | Some(Value::Null) => {}
            Some(_) => {
                self.warn("ignored the agent's result text: it must be a string".into())
                    .await?
            }
        }
        match object.get("thread_id") {
            Some(Value::String(thread))
                if !thread.is_empty() && thread.len() <= MAX_THREAD_ID_BYTES =>
            {
                self.thread_id = Some(thread.clone())
            }
            None | Some(Value::Null) => {}
            Some(_) => {
                self.warn(format!(
                    "ignored the agent's thread_id: it must be a string of 1 to {MAX_THREAD_ID_BYTES} bytes"
                ))
                .await?
            }
        }
        if let Some(usage) = object.get("usage").filter(|u| u.is_object()) {
            let field = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
            let usage = Usage {
                input_tokens: field("input_tokens"),
                output_tokens: field("output_tokens"),
            };
            self.usage = Some(usage);
            self.emit(
                "usage.updated",
                json!({"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}),
            )
            .await?;
        }
        Ok(())
    }
}

/// Reads up to and including the next newline into `line`, at most [`MAX_LINE_BYTES`]
/// in all. Cancel-safe: bytes read before a cancellation stay in `line`.
async fn read_line(
    reader: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let room = MAX_LINE_BYTES.saturating_sub(line.len()).max(1) as u64;
    reader.take(room).read_until(b'\n', line).await
}

/// Writes each line (plus a newline) to the child's stdin; dropping `stdin` at the end
/// closes it. A write error means the child closed its stdin: nothing more to say.
async fn write_lines(mut stdin: ChildStdin, mut lines: mpsc::Receiver<String>) {
    while let Some(mut line) = lines.recv().await {
        line.push('\n');
        if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
            break;
        }
    }
}

/// Reads a stream to its end, keeping the last [`STDERR_TAIL_BYTES`] as text.
async fn tail_of(mut stream: impl AsyncRead + Unpin) -> String {
    let mut tail = Vec::with_capacity(STDERR_TAIL_BYTES * 2);
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > STDERR_TAIL_BYTES {
                    tail.drain(..tail.len() - STDERR_TAIL_BYTES);
                }
            }
        }
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// Sends `signal` to the process group `pgid`. ESRCH (nobody left) is fine.
fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: killpg has no memory-safety preconditions.
    let rc = unsafe { libc::killpg(pgid, signal) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, %error, "signalling the agent's process group failed");
        }
    }
}

/// Ends the child's process group: SIGTERM, up to `grace` for the child to exit, then
/// SIGKILL; the child is always reaped.
async fn terminate(child: &mut Child, pgid: libc::pid_t, grace: Duration) {
    signal_group(pgid, libc::SIGTERM);
    let exited = tokio::time::timeout(grace, child.wait()).await.is_ok();
    // Also when the child exited within the grace period: members of its group that
    // ignored SIGTERM must not outlive the turn. While any member lives the group id
    // cannot be reused; once none does, this is ESRCH (a reuse of the id in between
    // would need the pid space to wrap around within microseconds).
    signal_group(pgid, libc::SIGKILL);
    if !exited && let Err(error) = child.wait().await {
        tracing::warn!(%error, "reaping the agent failed");
    }
    tracing::debug!(pid = pgid, exited_on_term = exited, "agent stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The child sees the runner's environment but for the runner's own settings.
    #[tokio::test]
    async fn the_child_gets_the_runners_environment_without_its_settings() {
        let provider = CommandProvider::new(CommandConfig {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "env".into()],
            grace: Duration::from_secs(1),
        });
        let runner_env = [
            ("AGENTRUN_API_KEY", "ar_runner_secret"),
            ("AGENTRUN_TLS_KEY", "/etc/agentrun/runner.key"),
            ("OPENAI_API_KEY", "sk-for-the-agent"),
            ("PATH", "/usr/bin:/bin"),
        ]
        .map(|(name, value)| (OsString::from(name), OsString::from(value)));
        let output = provider
            .command(runner_env)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run env");
        let seen = String::from_utf8(output.stdout).unwrap();
        assert!(seen.contains("OPENAI_API_KEY=sk-for-the-agent"), "{seen}");
        assert!(seen.contains("PATH=/usr/bin:/bin"), "{seen}");
        assert!(!seen.contains("AGENTRUN_"), "{seen}");
    }
}
