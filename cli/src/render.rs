//! How runs, commands and events are printed.
//!
//! Human output keeps stdout for the reply alone: the text of streamed content deltas
//! (`assistant_text`, `command_output`) goes to stdout as it arrives, everything else
//! is a dim line on stderr. `--json` prints one JSON object per event on stdout instead.

use std::io::{self, IsTerminal, Write};

use agentrun_shared::proto::{self, CommandKind, CommandStatus, Producer, RunStatus};
use serde_json::{Value, json};

/// Content-delta kinds whose text is the reply, streamed inline to stdout.
const STREAMED_KINDS: &[&str] = &["assistant_text", "command_output"];

/// The event type that ends a run's log.
pub const RUN_TERMINAL: &str = "run.terminal";

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Reply text on stdout, one dim line per other event on stderr.
    Human,
    /// One JSON object per event on stdout.
    Json,
}

/// Prints events as they arrive, remembering whether stdout is in the middle of a line.
pub struct Printer<O: Write, E: Write> {
    format: Format,
    out: O,
    err: E,
    /// Dim lines and the status line use ANSI styles.
    color: bool,
    /// stdout and stderr end up on the same terminal, so a stderr line written while
    /// the reply is mid-line must start on a new line.
    shared_terminal: bool,
    /// The reply on stdout does not end with a newline.
    out_mid_line: bool,
    /// The kind of the last non-streamed content delta shown; consecutive ones are
    /// shown once, or a reasoning stream would print a line per token.
    hidden_delta_kind: Option<String>,
}

impl Printer<io::Stdout, io::Stderr> {
    /// A printer on the process's stdout and stderr.
    pub fn stdio(format: Format) -> Self {
        let (out, err) = (io::stdout(), io::stderr());
        let color = err.is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let shared_terminal = out.is_terminal() && err.is_terminal();
        Self::new(format, out, err, color, shared_terminal)
    }
}

impl<O: Write, E: Write> Printer<O, E> {
    /// A printer on the given streams.
    pub fn new(format: Format, out: O, err: E, color: bool, shared_terminal: bool) -> Self {
        Self {
            format,
            out,
            err,
            color,
            shared_terminal,
            out_mid_line: false,
            hidden_delta_kind: None,
        }
    }

    /// Prints one event.
    pub fn event(&mut self, event: &proto::Event) -> io::Result<()> {
        let payload: Value = serde_json::from_str(&event.payload_json)
            .unwrap_or_else(|_| Value::String(event.payload_json.clone()));
        if self.format == Format::Json {
            writeln!(self.out, "{}", event_json(event, payload))?;
            return self.out.flush();
        }
        if event.r#type == "content.delta" {
            let kind = text_field(&payload, "kind").unwrap_or_default();
            if STREAMED_KINDS.contains(&kind.as_str()) {
                let delta = text_field(&payload, "delta").unwrap_or_default();
                if !delta.is_empty() {
                    self.out.write_all(delta.as_bytes())?;
                    self.out.flush()?;
                    self.out_mid_line = !delta.ends_with('\n');
                }
                self.hidden_delta_kind = None;
                return Ok(());
            }
            if self.hidden_delta_kind.as_deref() == Some(kind.as_str()) {
                return Ok(());
            }
            self.hidden_delta_kind = Some(kind.clone());
            return self.dim(&format!("· [{}] content.delta {kind} …", event.seq));
        }
        self.hidden_delta_kind = None;
        let summary = summary(&event.r#type, &payload);
        let line = if summary.is_empty() {
            format!("· [{}] {}", event.seq, event.r#type)
        } else {
            format!("· [{}] {} {summary}", event.seq, event.r#type)
        };
        self.dim(&line)
    }

    /// Prints a dim note on stderr (progress, retries).
    pub fn dim(&mut self, line: &str) -> io::Result<()> {
        self.break_reply_line()?;
        if self.color {
            writeln!(self.err, "\x1b[2m{line}\x1b[0m")
        } else {
            writeln!(self.err, "{line}")
        }
    }

    /// Prints the final status line on stderr, after ending the reply's line.
    pub fn status(&mut self, terminal: &Terminal) -> io::Result<()> {
        if self.format == Format::Json {
            return Ok(());
        }
        self.break_reply_line()?;
        let style = match (self.color, terminal.status.as_str()) {
            (false, _) => "",
            (true, "completed") => "\x1b[32m",
            (true, _) => "\x1b[31m",
        };
        let reset = if self.color { "\x1b[0m" } else { "" };
        writeln!(self.err, "{style}{}{reset}", terminal.describe())
    }

    /// Ends the reply's line on the terminal (only there: a redirected stdout keeps
    /// exactly the reply text).
    pub fn finish(&mut self) -> io::Result<()> {
        self.break_reply_line()?;
        self.err.flush()
    }

    fn break_reply_line(&mut self) -> io::Result<()> {
        if self.out_mid_line {
            self.out_mid_line = false;
            if self.shared_terminal {
                writeln!(self.err)?;
            }
        }
        Ok(())
    }
}

/// How a run ended, from its `run.terminal` event or the run itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terminal {
    pub run_id: String,
    /// completed, failed, cancelled, blocked or expired.
    pub status: String,
    pub failure_kind: String,
    pub message: String,
}

impl Terminal {
    /// From a `run.terminal` event.
    pub fn from_event(event: &proto::Event) -> Self {
        let payload: Value = serde_json::from_str(&event.payload_json).unwrap_or(Value::Null);
        Self {
            run_id: event.run_id.clone(),
            status: text_field(&payload, "status").unwrap_or_else(|| "unknown".into()),
            failure_kind: text_field(&payload, "failure_kind").unwrap_or_default(),
            message: text_field(&payload, "message").unwrap_or_default(),
        }
    }

    /// From a run (when its terminal event was not among those followed).
    pub fn from_run(run: &proto::Run) -> Self {
        Self {
            run_id: run.run_id.clone(),
            status: run_status(run.status),
            failure_kind: run.failure_kind.clone(),
            message: run.failure_message.clone(),
        }
    }

    /// True when the run completed.
    pub fn completed(&self) -> bool {
        self.status == "completed"
    }

    /// `run <id> failed: provider_error: boom`.
    pub fn describe(&self) -> String {
        let reason = [self.failure_kind.as_str(), self.message.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        if reason.is_empty() {
            format!("run {} {}", self.run_id, self.status)
        } else {
            format!("run {} {}: {reason}", self.run_id, self.status)
        }
    }
}

/// An event as the JSON object `--json` prints.
pub fn event_json(event: &proto::Event, payload: Value) -> Value {
    json!({
        "run_id": event.run_id,
        "seq": event.seq,
        "type": event.r#type,
        "payload": payload,
        "producer": Producer::try_from(event.producer)
            .map(|p| enum_name(p.as_str_name(), "PRODUCER_"))
            .unwrap_or_else(|_| event.producer.to_string()),
        "runner_id": event.runner_id,
        "epoch": event.epoch,
        "created_at": event.created_at.as_ref().map(ToString::to_string),
    })
}

/// A short description of an event's payload, for its one-line form.
fn summary(event_type: &str, payload: &Value) -> String {
    let field = |key: &str| text_field(payload, key).unwrap_or_default();
    let join = |parts: &[String]| {
        parts
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    };
    match event_type {
        "run.created" => join(&[field("backend_profile"), labelled("queue", &field("queue"))]),
        "run.claimed" => {
            let runner = text_field(payload, "runner_name")
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| field("runner_id"));
            join(&[
                labelled("by", &runner),
                labelled("attempt", &field("attempt")),
            ])
        }
        "run.started" => labelled("attempt", &field("attempt")),
        "run.requeued" => join(&[field("reason"), labelled("attempt", &field("attempt"))]),
        RUN_TERMINAL => {
            let reason = [field("failure_kind"), field("message")]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            if reason.is_empty() {
                field("status")
            } else {
                format!("{} ({reason})", field("status"))
            }
        }
        "command.created" | "command.delivered" => {
            let seq = field("seq");
            let seq = if seq.is_empty() {
                seq
            } else {
                format!("#{seq}")
            };
            join(&[seq, field("kind")])
        }
        "command.completed" => join(&[field("status"), field("error")]),
        "turn.completed" => join(&[field("state"), field("error")]),
        "item.started" | "item.updated" | "item.completed" => field("kind"),
        "request.opened" => join(&[field("kind"), labelled("request_id", &field("request_id"))]),
        "request.resolved" => join(&[
            labelled("request_id", &field("request_id")),
            field("decision"),
        ]),
        "runtime.warning" | "runtime.error" => field("message"),
        _ => String::new(),
    }
}

/// `label value`, or nothing when there is no value.
fn labelled(label: &str, value: &str) -> String {
    match (label, value) {
        (_, "") => String::new(),
        ("request_id", v) => format!("request_id={v}"),
        (l, v) => format!("{l} {v}"),
    }
}

/// A payload field as text: strings as they are, numbers and booleans printed,
/// anything else (absent, null, objects) as `None`.
fn text_field(payload: &Value, key: &str) -> Option<String> {
    match payload.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// `RUN_STATUS_PENDING` → `pending`.
fn enum_name(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_ascii_lowercase()
}

/// A run status as the lowercase word the manager uses (`running`).
pub fn run_status(value: i32) -> String {
    RunStatus::try_from(value)
        .map(|s| enum_name(s.as_str_name(), "RUN_STATUS_"))
        .unwrap_or_else(|_| format!("unknown({value})"))
}

/// A command status as a lowercase word (`pending`).
pub fn command_status(value: i32) -> String {
    CommandStatus::try_from(value)
        .map(|s| enum_name(s.as_str_name(), "COMMAND_STATUS_"))
        .unwrap_or_else(|_| format!("unknown({value})"))
}

/// A command kind as a lowercase word (`steer`).
pub fn command_kind(value: i32) -> String {
    CommandKind::try_from(value)
        .map(|k| enum_name(k.as_str_name(), "COMMAND_KIND_"))
        .unwrap_or_else(|_| format!("unknown({value})"))
}

/// A timestamp to the second (`2025-01-31 12:00:05Z`), or `-` when unset.
pub fn time(ts: Option<&prost_types::Timestamp>) -> String {
    let Some(ts) = ts else {
        return "-".into();
    };
    let text = ts.to_string();
    // RFC 3339 from prost: `YYYY-MM-DDTHH:MM:SS[.fraction]Z`.
    match text.get(..19) {
        Some(seconds) if text.len() >= 20 => format!("{}Z", seconds.replacen('T', " ", 1)),
        _ => text,
    }
}

/// A run as `key  value` lines, for `agentrun get`.
pub fn run_details(run: &proto::Run) -> String {
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut status = run_status(run.status);
    if run.cancel_requested && !matches!(status.as_str(), "cancelled") {
        status.push_str(" (cancel requested)");
    }
    let lease = match (run.lease_runner_id.as_str(), run.lease_expires_at.as_ref()) {
        ("", _) => "-".to_owned(),
        (runner, Some(expires)) => format!(
            "runner {runner} epoch {} until {}",
            run.lease_epoch,
            time(Some(expires))
        ),
        (runner, None) => format!("runner {runner} epoch {} (released)", run.lease_epoch),
    };
    let failure = Terminal::from_run(run);
    let failure = [failure.failure_kind, failure.message]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(": ");
    let labels = run.labels.join(", ");
    let rows: Vec<(&str, String)> = vec![
        ("run", run.run_id.clone()),
        ("status", status),
        ("profile", run.backend_profile.clone()),
        (
            "queue",
            format!("{} (priority {})", run.queue, run.priority),
        ),
        ("labels", or_dash(&labels)),
        ("project", run.project_id.clone()),
        ("session", or_dash(&run.session_id)),
        (
            "attempt",
            format!("{} of {}", run.attempt, run.max_attempts),
        ),
        ("lease", lease),
        ("failure", or_dash(&failure)),
        ("events", run.last_event_seq.to_string()),
        ("created", time(run.created_at.as_ref())),
        ("claimed", time(run.claimed_at.as_ref())),
        ("finished", time(run.finished_at.as_ref())),
        ("input", or_dash(&run.input_json)),
        ("metadata", or_dash(&run.metadata_json)),
        ("idempotency", or_dash(&run.idempotency_key)),
    ];
    let mut text = String::new();
    for (key, value) in rows {
        text.push_str(&format!("{key:<12}{value}\n"));
    }
    text
}

/// Runs as an aligned table, for `agentrun list`.
pub fn runs_table(runs: &[proto::Run]) -> String {
    let header = ["ID", "STATUS", "PROFILE", "ATTEMPT", "CREATED"].map(str::to_owned);
    let rows: Vec<[String; 5]> = std::iter::once(header)
        .chain(runs.iter().map(|run| {
            [
                run.run_id.clone(),
                run_status(run.status),
                run.backend_profile.clone(),
                format!("{}/{}", run.attempt, run.max_attempts),
                time(run.created_at.as_ref()),
            ]
        }))
        .collect();
    let mut widths = [0usize; 5];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  "));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, event_type: &str, payload: Value) -> proto::Event {
        proto::Event {
            run_id: "r1".into(),
            seq,
            r#type: event_type.into(),
            payload_json: payload.to_string(),
            producer: Producer::Runner as i32,
            ..Default::default()
        }
    }

    fn printed(format: Format, shared_terminal: bool, events: &[proto::Event]) -> (String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut printer = Printer::new(format, &mut out, &mut err, false, shared_terminal);
        for e in events {
            printer.event(e).unwrap();
        }
        printer.finish().unwrap();
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn delta(seq: i64, kind: &str, text: &str) -> proto::Event {
        event(seq, "content.delta", json!({"kind": kind, "delta": text}))
    }

    #[test]
    fn reply_text_goes_to_stdout_and_the_rest_to_stderr() {
        let events = [
            event(1, "turn.started", json!({})),
            delta(2, "assistant_text", "Hel"),
            delta(3, "reasoning_text", "hmm"),
            delta(4, "reasoning_text", "hmm more"),
            delta(5, "assistant_text", "lo"),
            event(
                6,
                "run.terminal",
                json!({"status": "failed", "failure_kind": "provider_error", "message": "boom"}),
            ),
        ];
        let (out, err) = printed(Format::Human, false, &events);
        assert_eq!(out, "Hello");
        assert_eq!(
            err,
            "· [1] turn.started\n· [3] content.delta reasoning_text …\n\
             · [6] run.terminal failed (provider_error: boom)\n"
        );
        // On a shared terminal, stderr lines start on a fresh line.
        let (_, err) = printed(Format::Human, true, &events[1..]);
        assert!(err.starts_with("\n· [3]"), "{err:?}");
        assert!(err.contains("\n\n· [6]"), "{err:?}");
    }

    #[test]
    fn json_lines_carry_the_parsed_payload() {
        let (out, err) = printed(Format::Json, false, &[delta(7, "assistant_text", "hi")]);
        assert!(err.is_empty());
        let line: Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(line["seq"], 7);
        assert_eq!(line["type"], "content.delta");
        assert_eq!(line["payload"]["delta"], "hi");
        assert_eq!(line["producer"], "runner");
    }

    #[test]
    fn summaries_name_what_matters() {
        let opened = summary(
            "request.opened",
            &json!({"kind": "command", "request_id": "q1"}),
        );
        assert_eq!(opened, "command request_id=q1");
        assert_eq!(
            summary("runtime.error", &json!({"message": "rate limited"})),
            "rate limited"
        );
        assert_eq!(
            summary("command.created", &json!({"seq": 2, "kind": "steer"})),
            "#2 steer"
        );
        assert_eq!(
            summary("run.terminal", &json!({"status": "completed"})),
            "completed"
        );
    }

    #[test]
    fn names_times_and_tables() {
        assert_eq!(run_status(RunStatus::Waiting as i32), "waiting");
        assert_eq!(run_status(99), "unknown(99)");
        assert_eq!(command_kind(CommandKind::Steer as i32), "steer");
        let ts = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_000_000,
        };
        assert_eq!(time(Some(&ts)), "2023-11-14 22:13:20Z");
        assert_eq!(time(None), "-");
        let run = proto::Run {
            run_id: "abc".into(),
            status: RunStatus::Running as i32,
            backend_profile: "scripted".into(),
            attempt: 1,
            max_attempts: 3,
            ..Default::default()
        };
        let table = runs_table(&[run]);
        assert_eq!(
            table,
            "ID   STATUS   PROFILE   ATTEMPT  CREATED\nabc  running  scripted  1/3      -\n"
        );
    }
}
