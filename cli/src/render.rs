//! How runs, commands and events are printed.
//!
//! Human output keeps stdout for the reply alone: the text of streamed content deltas
//! (`assistant_text`, `command_output`) goes to stdout as it arrives, everything else
//! is a dim line on stderr, and the reply ends with a newline. `-o jsonl` prints one JSON
//! object per event on stdout instead, `-o json` one array of them (see `output`).
//! While a followed run waits, a transient status line on stderr says for what (only on
//! a terminal; see `progress`). Sessions, queue statistics and runners print as tables.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, SystemTime};

use agentrun_shared::proto::{self, CommandKind, CommandStatus, RunStatus, SessionAttention};
use serde_json::Value;

use crate::output::{self, OutputFormat};

/// Content-delta kinds whose text is the reply, streamed inline to stdout.
const STREAMED_KINDS: &[&str] = &["assistant_text", "command_output"];

/// The event type that ends a run's log.
pub const RUN_TERMINAL: &str = "run.terminal";

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Reply text on stdout, one dim line per other event on stderr.
    Human,
    /// One JSON object per event on stdout (`-o jsonl`).
    Json,
    /// One JSON array of the events on stdout, written as they arrive and closed by
    /// [`Printer::finish`] (`-o json`).
    JsonArray,
}

impl Format {
    /// The event format of an output format.
    pub fn of(output: OutputFormat) -> Self {
        match output {
            OutputFormat::Text => Format::Human,
            OutputFormat::Json => Format::JsonArray,
            OutputFormat::Jsonl => Format::Json,
        }
    }

    fn is_json(self) -> bool {
        self != Format::Human
    }
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
    /// The reply on stdout does not end with a newline, and the terminal's line has not
    /// been broken on stderr since.
    out_mid_line: bool,
    /// The reply on stdout does not end with a newline (whatever stderr did since).
    reply_unterminated: bool,
    /// The kind of the last non-streamed content delta shown; consecutive ones are
    /// shown once, or a reasoning stream would print a line per token.
    hidden_delta_kind: Option<String>,
    /// Assistant text printed so far per open item, to print what its `item.completed`
    /// holds beyond it (a `final` run stores no deltas, and a watcher may miss live ones).
    printed_replies: std::collections::HashMap<String, String>,
    /// The whole text of large replies re-sent as stored deltas, per item, so far.
    replayed_replies: std::collections::HashMap<String, String>,
    /// The transient status line may be drawn (stderr is a terminal).
    progress_enabled: bool,
    /// The status line is on the screen: anything else written clears it first.
    progress_shown: bool,
    /// The status line is cut to the width of the terminal on stderr (a line that
    /// wraps could not be redrawn in place).
    fit_to_terminal: bool,
    /// Events written into the JSON array so far (`None`: the array is not open).
    array_items: Option<usize>,
}

impl Printer<io::Stdout, io::Stderr> {
    /// A printer on the process's stdout and stderr.
    pub fn stdio(format: Format) -> Self {
        let (out, err) = (io::stdout(), io::stderr());
        let color = err.is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let shared_terminal = out.is_terminal() && err.is_terminal();
        let progress = err.is_terminal();
        let mut printer =
            Self::new(format, out, err, color, shared_terminal).with_progress(progress);
        printer.fit_to_terminal = progress;
        printer
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
            reply_unterminated: false,
            hidden_delta_kind: None,
            printed_replies: Default::default(),
            replayed_replies: Default::default(),
            progress_enabled: false,
            progress_shown: false,
            fit_to_terminal: false,
            array_items: None,
        }
    }

    /// Allows the transient status line; only for a terminal, which can erase it.
    pub fn with_progress(mut self, enabled: bool) -> Self {
        self.progress_enabled = enabled;
        self
    }

    /// True when [`Self::progress`] draws anything.
    pub fn shows_progress(&self) -> bool {
        self.progress_enabled
    }

    /// Draws the status line on stderr (replacing the one shown), or clears it with
    /// `None`. Never written to stdout, and not at all unless enabled.
    pub fn progress(&mut self, line: Option<&str>) -> io::Result<()> {
        if !self.progress_enabled {
            return Ok(());
        }
        let Some(line) = line else {
            return self.clear_progress();
        };
        // The line is redrawn in place with `\r`: it needs a line of its own, and must
        // not wrap.
        self.break_reply_line()?;
        let line = output::terminal_safe(line);
        let line = match self.fit_to_terminal.then(stderr_columns).flatten() {
            Some(columns) => fit(&line, columns.saturating_sub(1)),
            None => line.into_owned(),
        };
        if self.color {
            write!(self.err, "\r\x1b[2K\x1b[2m{line}\x1b[0m")?;
        } else {
            write!(self.err, "\r\x1b[2K{line}")?;
        }
        self.progress_shown = true;
        self.err.flush()
    }

    fn clear_progress(&mut self) -> io::Result<()> {
        if self.progress_shown {
            self.progress_shown = false;
            write!(self.err, "\r\x1b[2K")?;
            self.err.flush()?;
        }
        Ok(())
    }

    /// Marks where the events of another run begin (following a session): the reply
    /// so far ends its line on stdout, and a dim line names the run.
    pub fn run_header(&mut self, run_id: &str) -> io::Result<()> {
        if self.format.is_json() {
            return Ok(());
        }
        self.clear_progress()?;
        if self.reply_unterminated {
            self.out_mid_line = false;
            self.reply_unterminated = false;
            self.out.write_all(b"\n")?;
            self.out.flush()?;
        }
        self.dim(&format!("── run {run_id}"))
    }

    /// Prints one event.
    pub fn event(&mut self, event: &proto::Event) -> io::Result<()> {
        self.clear_progress()?;
        let payload: Value = serde_json::from_str(&event.payload_json)
            .unwrap_or_else(|_| Value::String(event.payload_json.clone()));
        match self.format {
            Format::Json => {
                writeln!(self.out, "{}", output::event(event))?;
                return self.out.flush();
            }
            Format::JsonArray => {
                let items = self.array_items.get_or_insert(0);
                let separator = if *items == 0 { "[\n" } else { ",\n" };
                *items += 1;
                write!(self.out, "{separator}{}", output::event(event))?;
                return self.out.flush();
            }
            Format::Human => {}
        }
        if event.r#type == "content.delta" {
            let kind = text_field(&payload, "kind").unwrap_or_default();
            if STREAMED_KINDS.contains(&kind.as_str()) {
                let delta = text_field(&payload, "delta").unwrap_or_default();
                self.hidden_delta_kind = None;
                if kind != "assistant_text" {
                    return self.reply(&delta);
                }
                // Deltas without an item belong to whatever message completes next.
                let item = text_field(&payload, "item_id").unwrap_or_default();
                if payload["text_in_deltas"] == Value::Bool(true) {
                    return self.replayed_reply(item, &delta);
                }
                self.printed_replies
                    .entry(item)
                    .or_default()
                    .push_str(&delta);
                return self.reply(&delta);
            }
            if self.hidden_delta_kind.as_deref() == Some(kind.as_str()) {
                return Ok(());
            }
            self.hidden_delta_kind = Some(kind.clone());
            return self.dim(&format!("· [{}] content.delta {kind} …", event.seq));
        }
        self.hidden_delta_kind = None;
        if event.r#type == "item.completed" && payload["kind"] == "assistant_message" {
            self.complete_reply(&payload)?;
        }
        let summary = summary(&event.r#type, &payload);
        let line = if summary.is_empty() {
            format!("· [{}] {}", event.seq, event.r#type)
        } else {
            format!("· [{}] {} {summary}", event.seq, event.r#type)
        };
        self.dim(&line)
    }

    /// Prints reply text on stdout as it comes.
    fn reply(&mut self, text: &str) -> io::Result<()> {
        if !text.is_empty() {
            self.out.write_all(output::terminal_safe(text).as_bytes())?;
            self.out.flush()?;
            self.out_mid_line = !text.ends_with('\n');
            self.reply_unterminated = self.out_mid_line;
        }
        Ok(())
    }

    /// A piece of a large reply's whole text, stored again after its live deltas (a
    /// `final` run): prints only what the live ones did not.
    fn replayed_reply(&mut self, item: String, piece: &str) -> io::Result<()> {
        let replayed = self.replayed_replies.entry(item.clone()).or_default();
        replayed.push_str(piece);
        let printed = self.printed_replies.entry(item).or_default();
        let Some(rest) = replayed.strip_prefix(printed.as_str()) else {
            return Ok(());
        };
        let rest = rest.to_owned();
        printed.push_str(&rest);
        self.reply(&rest)
    }

    /// Prints what a completed assistant message holds beyond the text its deltas
    /// printed: all of it when none were (a `final` run), the rest when live ones stopped
    /// short, and the whole text again on a fresh line when live ones missed a piece.
    fn complete_reply(&mut self, payload: &Value) -> io::Result<()> {
        let item = text_field(payload, "item_id").unwrap_or_default();
        self.replayed_replies.remove(&item);
        let printed = self
            .printed_replies
            .remove(&item)
            .or_else(|| self.printed_replies.remove(""))
            .unwrap_or_default();
        let text = text_field(payload, "text").unwrap_or_default();
        // A truncated text whose whole is in the deltas (already printed).
        if payload["text_in_deltas"] == Value::Bool(true) || printed.starts_with(&text) {
            return Ok(());
        }
        match text.strip_prefix(printed.as_str()) {
            Some(rest) => self.reply(rest),
            None => {
                let fresh_line = if self.reply_unterminated { "\n" } else { "" };
                self.reply(&format!("{fresh_line}{text}"))
            }
        }
    }

    /// Prints a dim note on stderr (progress, retries).
    pub fn dim(&mut self, line: &str) -> io::Result<()> {
        self.clear_progress()?;
        self.break_reply_line()?;
        let line = output::terminal_safe(line);
        if self.color {
            writeln!(self.err, "\x1b[2m{line}\x1b[0m")
        } else {
            writeln!(self.err, "{line}")
        }
    }

    /// Prints the final status line on stderr, after ending the reply's line.
    pub fn status(&mut self, terminal: &Terminal) -> io::Result<()> {
        if self.format.is_json() {
            return self.finish();
        }
        self.clear_progress()?;
        self.end_reply()?;
        let style = match (self.color, terminal.status.as_str()) {
            (false, _) => "",
            (true, "completed") => "\x1b[32m",
            (true, _) => "\x1b[31m",
        };
        let reset = if self.color { "\x1b[0m" } else { "" };
        let described = terminal.describe();
        writeln!(
            self.err,
            "{style}{}{reset}",
            output::terminal_safe(&described)
        )
    }

    /// Ends the output: closes the JSON array, or ends the reply with a newline when it
    /// does not end with one, so the shell prompt starts on a line of its own.
    pub fn finish(&mut self) -> io::Result<()> {
        self.clear_progress()?;
        if self.format == Format::JsonArray {
            match self.array_items {
                Some(0) => return Ok(()),
                Some(_) => self.out.write_all(b"\n]\n")?,
                None => self.out.write_all(b"[]\n")?,
            }
            self.array_items = Some(0);
            return self.out.flush();
        }
        self.end_reply()?;
        self.err.flush()
    }

    /// Ends the reply with a newline on stdout when it does not end with one.
    fn end_reply(&mut self) -> io::Result<()> {
        if self.reply_unterminated {
            self.out_mid_line = false;
            self.reply_unterminated = false;
            self.out.write_all(b"\n")?;
            self.out.flush()?;
        }
        Ok(())
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

impl<O: Write, E: Write> Drop for Printer<O, E> {
    /// An error ends the command with a message on stderr: not after a status line.
    fn drop(&mut self) {
        let _ = self.clear_progress();
        // A JSON array stays parseable when following stopped early.
        if self.format == Format::JsonArray {
            let _ = self.finish();
        }
    }
}

/// The width of the terminal on stderr, when it is one.
fn stderr_columns() -> Option<usize> {
    // SAFETY: an all-zero `winsize` is a valid value of this plain C struct.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to one.
    let found = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (found && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// `line` cut to at most `columns` characters, ending with `…` when cut.
fn fit(line: &str, columns: usize) -> String {
    if line.chars().count() <= columns {
        return line.to_owned();
    }
    let mut cut: String = line.chars().take(columns.saturating_sub(1)).collect();
    cut.push('…');
    cut
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
        "request.opened" => {
            let detail = match payload.get("detail") {
                Some(detail @ Value::Object(map)) if !map.is_empty() => detail.to_string(),
                _ => String::new(),
            };
            join(&[
                field("kind"),
                labelled("request_id", &field("request_id")),
                detail,
            ])
        }
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

use output::enum_name;

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
    let rows = runs
        .iter()
        .map(|run| {
            vec![
                run.run_id.clone(),
                run_status(run.status),
                run.backend_profile.clone(),
                format!("{}/{}", run.attempt, run.max_attempts),
                time(run.created_at.as_ref()),
            ]
        })
        .collect();
    table(&["ID", "STATUS", "PROFILE", "ATTEMPT", "CREATED"], rows)
}

/// Longest request detail in `agentrun requests`, in characters.
const DETAIL_CHARS: usize = 60;

/// Requests as an aligned table, for `agentrun requests`.
pub fn requests_table(requests: &[proto::Request]) -> String {
    let rows = requests
        .iter()
        .map(|request| {
            vec![
                request.request_id.clone(),
                request.run_id.clone(),
                request.kind.clone(),
                request.status.clone(),
                time(request.created_at.as_ref()),
                time(request.deadline.as_ref()),
                request_detail(&request.detail_json),
            ]
        })
        .collect();
    table(
        &[
            "ID", "RUN", "KIND", "STATUS", "CREATED", "DEADLINE", "DETAIL",
        ],
        rows,
    )
}

/// What a request asks, on one line: the text a provider usually puts in its detail
/// (`command`, `question`, `path`, `tool`), else the detail as JSON; at most
/// [`DETAIL_CHARS`] characters.
pub fn request_detail(detail_json: &str) -> String {
    let detail: Value = serde_json::from_str(detail_json).unwrap_or(Value::Null);
    let text = ["command", "question", "path", "tool", "message"]
        .iter()
        .find_map(|key| text_field(&detail, key))
        .unwrap_or_else(|| match &detail {
            Value::Null => String::new(),
            Value::Object(fields) if fields.is_empty() => String::new(),
            other => other.to_string(),
        });
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > DETAIL_CHARS {
        let cut: String = line.chars().take(DETAIL_CHARS - 1).collect();
        format!("{cut}…")
    } else if line.is_empty() {
        "-".into()
    } else {
        line
    }
}

/// Rows under a header, each column as wide as its widest cell, two spaces apart.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    // Cells made safe before they are measured: the columns stay aligned.
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| (*h).to_owned()).collect())
        .chain(rows.into_iter().map(|row| {
            row.into_iter()
                .map(|cell| output::terminal_safe(&cell).into_owned())
                .collect()
        }))
        .collect();
    let mut widths = vec![0usize; header.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
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

/// A duration in its two largest units: `850ms`, `3s`, `2m05s`, `4h10m`, `3d02h`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 if d.as_millis() > 0 => format!("{}ms", d.as_millis()),
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{:02}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// How long before `now` a timestamp was (`3s ago`), or `-` when unset.
pub fn ago(ts: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    let Some(at) = ts.and_then(|ts| SystemTime::try_from(*ts).ok()) else {
        return "-".into();
    };
    match now.duration_since(at) {
        Ok(elapsed) => format!("{} ago", duration(Duration::from_secs(elapsed.as_secs()))),
        // The manager's clock is ahead of ours.
        Err(_) => "just now".into(),
    }
}

/// A session's attention for its reader as a word (`unread`).
pub fn attention(value: i32) -> String {
    SessionAttention::try_from(value)
        .map(|a| enum_name(a.as_str_name(), "SESSION_ATTENTION_"))
        .unwrap_or_else(|_| format!("unknown({value})"))
}

/// The marker of a session's attention in `agentrun sessions`: `>` a run is active,
/// `*` unread, nothing when read.
fn attention_marker(value: i32) -> &'static str {
    match SessionAttention::try_from(value) {
        Ok(SessionAttention::Active) => ">",
        Ok(SessionAttention::Unread) => "*",
        _ => "",
    }
}

/// Sessions as a table, for `agentrun sessions`.
pub fn sessions_table(views: &[proto::SessionView], now: SystemTime) -> String {
    let rows = views
        .iter()
        .map(|view| {
            let session = view.session.clone().unwrap_or_default();
            let title = if session.title.is_empty() {
                match view.last_run_status {
                    0 => "-".to_owned(),
                    status => run_status(status),
                }
            } else {
                session.title.clone()
            };
            vec![
                attention_marker(view.attention).to_owned(),
                session.session_id.clone(),
                title,
                session.version.to_string(),
                ago(session.updated_at.as_ref(), now),
            ]
        })
        .collect();
    table(&["", "ID", "TITLE/STATUS", "VERSION", "UPDATED"], rows)
}

/// A session as `key  value` lines, for `agentrun session`.
pub fn session_details(view: &proto::SessionView, now: SystemTime) -> Vec<String> {
    let session = view.session.clone().unwrap_or_default();
    let or_dash = |s: &str| {
        if s.is_empty() {
            "-".to_owned()
        } else {
            s.to_owned()
        }
    };
    let mut state = attention(view.attention);
    if view.last_run_status != 0 {
        state.push_str(&format!(" (last run {})", run_status(view.last_run_status)));
    }
    let updated = format!(
        "{} ({})",
        time(session.updated_at.as_ref()),
        ago(session.updated_at.as_ref(), now)
    );
    [
        ("session", session.session_id.clone()),
        ("title", or_dash(&session.title)),
        ("state", state),
        ("profile", session.backend_profile.clone()),
        ("project", session.project_id.clone()),
        ("version", session.version.to_string()),
        ("last run", or_dash(&session.last_run_id)),
        ("created", time(session.created_at.as_ref())),
        ("updated", updated),
    ]
    .into_iter()
    .map(|(key, value)| format!("{key:<12}{value}"))
    .collect()
}

/// Queue depth by queue and status, with the oldest pending run's age on the pending
/// row, for `agentrun stats`.
pub fn queue_table(stats: &proto::GetQueueStatsResponse) -> String {
    let mut depths = stats.depths.clone();
    depths.sort_by(|a, b| (&a.queue, a.status).cmp(&(&b.queue, b.status)));
    let rows = depths
        .iter()
        .map(|depth| {
            let oldest = stats
                .ages
                .iter()
                .find(|age| age.queue == depth.queue)
                .filter(|_| depth.status == RunStatus::Pending as i32)
                .map(|age| {
                    let age_ms = u64::try_from(age.oldest_pending_age_ms).unwrap_or(0);
                    duration(Duration::from_secs(age_ms / 1000))
                })
                .unwrap_or_default();
            vec![
                depth.queue.clone(),
                run_status(depth.status),
                depth.runs.to_string(),
                oldest,
            ]
        })
        .collect();
    table(&["QUEUE", "STATUS", "RUNS", "OLDEST PENDING"], rows)
}

/// Pending and active runs per tenant against its limit, for `agentrun stats`.
pub fn tenants_table(stats: &proto::GetQueueStatsResponse) -> String {
    let mut tenants = stats.tenants.clone();
    tenants.sort_by(|a, b| a.tenant_id.cmp(&b.tenant_id));
    let rows = tenants
        .iter()
        .map(|tenant| {
            vec![
                tenant.tenant_id.clone(),
                tenant.pending_runs.to_string(),
                tenant.active_runs.to_string(),
                match tenant.max_active_runs {
                    0 => "none".to_owned(),
                    limit => limit.to_string(),
                },
            ]
        })
        .collect();
    table(&["TENANT", "PENDING", "ACTIVE", "LIMIT"], rows)
}

/// Runners with their leases and last heartbeat, for `agentrun stats`.
pub fn runners_table(runners: &[proto::RunnerInfo], now: SystemTime) -> String {
    let mut runners = runners.to_vec();
    runners.sort_by(|a, b| (&a.name, &a.runner_id).cmp(&(&b.name, &b.runner_id)));
    let rows = runners
        .iter()
        .map(|runner| {
            vec![
                runner.name.clone(),
                runner.runner_id.clone(),
                runner.backend_profiles.join(","),
                format!("{}/{}", runner.leases.len(), runner.max_concurrency),
                ago(runner.last_heartbeat_at.as_ref(), now),
                if runner.draining { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    table(
        &["NAME", "ID", "PROFILES", "LEASES", "HEARTBEAT", "DRAINING"],
        rows,
    )
}

/// A stored resolution (`{"decision": "accept", ...}`) as its decision, followed by
/// anything else it holds as JSON.
pub fn resolution(resolution_json: &str) -> String {
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(resolution_json) else {
        return resolution_json.to_owned();
    };
    let decision = match fields.remove("decision") {
        Some(Value::String(decision)) => decision,
        Some(other) => other.to_string(),
        None => "-".to_owned(),
    };
    fields.retain(|_, value| !value.is_null());
    if fields.is_empty() {
        decision
    } else {
        format!("{decision} {}", Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentrun_shared::proto::Producer;
    use serde_json::json;

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
        drop(printer);
        (
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    fn delta(seq: i64, kind: &str, text: &str) -> proto::Event {
        event(seq, "content.delta", json!({"kind": kind, "delta": text}))
    }

    /// A reply is written by a model or an agent, and may carry what a prompt injected:
    /// human output never lets it drive the terminal (set the clipboard through OSC 52,
    /// clear the screen, retitle the window, overwrite a line with a carriage return).
    /// Control characters show in caret notation; JSON keeps the text exact.
    #[test]
    fn human_output_shows_control_characters_instead_of_sending_them() {
        let hostile = "ok\x1b]52;c;ZXZpbA==\x07 \x1b[2Jdone\rsudo\u{9b}31m\r\nnext\tline\n";
        let events = [
            delta(1, "assistant_text", hostile),
            event(2, "runtime.error", json!({"message": "bad\x1b[8mhidden"})),
        ];
        let (out, err) = printed(Format::Human, false, &events);
        assert_eq!(
            out,
            "ok^[]52;c;ZXZpbA==^G ^[[2Jdone^Msudo\\x9b31m\nnext\tline\n"
        );
        assert!(err.contains("bad^[[8mhidden"), "{err}");
        assert!(
            !out.contains('\x1b') && !err.contains('\x1b'),
            "{out:?} {err:?}"
        );
        let (json, _) = printed(Format::Json, false, &events);
        let first: Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
        assert_eq!(first["payload"]["delta"], hostile);
        // Tables and details too.
        let table = table(&["NAME"], vec![vec!["a\x1b[31mb".into()]]);
        assert!(table.contains("a^[[31mb"), "{table}");
    }

    #[test]
    fn a_completed_message_prints_what_its_deltas_did_not() {
        let done = |seq: i64, text: &str| {
            event(
                seq,
                "item.completed",
                json!({"item_id": "m", "kind": "assistant_message", "text": text}),
            )
        };
        let live = |text: &str| proto::Event {
            ephemeral: true,
            ..event(
                1,
                "content.delta",
                json!({"item_id": "m", "kind": "assistant_text", "delta": text}),
            )
        };
        // Every delta printed (deltas mode): nothing more.
        let (out, _) = printed(
            Format::Human,
            false,
            &[live("Hel"), live("lo"), done(2, "Hello")],
        );
        assert_eq!(out, "Hello\n");
        // No delta (a final run followed after the fact): the whole text.
        let (out, _) = printed(Format::Human, false, &[done(2, "Hello")]);
        assert_eq!(out, "Hello\n");
        // Live deltas stopped short: the rest. One went missing: the text again.
        let (out, _) = printed(Format::Human, false, &[live("He"), done(2, "Hello")]);
        assert_eq!(out, "Hello\n");
        let (out, _) = printed(
            Format::Human,
            false,
            &[live("H"), live("o"), done(2, "Hello")],
        );
        assert_eq!(out, "Ho\nHello\n");
        // A large reply's whole text stored again as deltas: only what was not shown live.
        let replay = |seq: i64, text: &str| {
            event(
                seq,
                "content.delta",
                json!({"item_id": "m", "kind": "assistant_text", "delta": text, "text_in_deltas": true}),
            )
        };
        let truncated = event(
            4,
            "item.completed",
            json!({"item_id": "m", "kind": "assistant_message", "text": "He", "text_in_deltas": true}),
        );
        let events = [live("Hel"), replay(2, "He"), replay(3, "llo"), truncated];
        assert_eq!(printed(Format::Human, false, &events).0, "Hello\n");
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
        // The reply ends with a newline, so the shell prompt gets a line of its own.
        let (out, err) = printed(Format::Human, false, &events);
        assert_eq!(out, "Hello\n");
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
    fn json_array_is_one_document_however_following_ends() {
        let events = [
            delta(1, "assistant_text", "a"),
            delta(2, "assistant_text", "b"),
        ];
        let (out, err) = printed(Format::JsonArray, false, &events);
        assert!(err.is_empty());
        let array: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(array.as_array().map(Vec::len), Some(2), "{out}");
        assert_eq!(array[1]["seq"], 2);
        // Nothing printed: an empty array. Dropped without finishing: still closed.
        assert_eq!(printed(Format::JsonArray, false, &[]).0, "[]\n");
        let mut out = Vec::new();
        let mut printer = Printer::new(Format::JsonArray, &mut out, Vec::new(), false, false);
        printer.event(&events[0]).unwrap();
        drop(printer);
        let array: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(array.as_array().map(Vec::len), Some(1));
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

    #[test]
    fn requests_are_one_line_each() {
        assert_eq!(
            request_detail(r#"{"command": "make\n  deploy"}"#),
            "make deploy"
        );
        assert_eq!(
            request_detail(r#"{"question": "What next?", "command": 3}"#),
            "3"
        );
        assert_eq!(request_detail(r#"{"files": ["a"]}"#), r#"{"files":["a"]}"#);
        assert_eq!(request_detail("{}"), "-");
        assert_eq!(request_detail(""), "-");
        let long = request_detail(&json!({ "command": "x".repeat(100) }).to_string());
        assert_eq!(long.chars().count(), DETAIL_CHARS);
        assert!(long.ends_with('…'));
        let request = proto::Request {
            request_id: "r1".into(),
            run_id: "run1".into(),
            kind: "command".into(),
            status: "open".into(),
            detail_json: r#"{"command": "ls"}"#.into(),
            ..Default::default()
        };
        assert_eq!(
            requests_table(&[request]),
            "ID  RUN   KIND     STATUS  CREATED  DEADLINE  DETAIL
\
             r1  run1  command  open    -        -         ls\n"
        );
    }

    #[test]
    fn the_status_line_is_drawn_on_stderr_and_cleared_before_output() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut printer =
            Printer::new(Format::Human, &mut out, &mut err, false, true).with_progress(true);
        printer.event(&delta(1, "assistant_text", "Hel")).unwrap();
        printer.progress(Some("waiting")).unwrap();
        printer.event(&delta(2, "assistant_text", "lo")).unwrap();
        printer.progress(Some("again")).unwrap();
        drop(printer);
        assert_eq!(String::from_utf8(out).unwrap(), "Hello", "never on stdout");
        assert_eq!(
            String::from_utf8(err).unwrap(),
            "\n\r\x1b[2Kwaiting\r\x1b[2K\n\r\x1b[2Kagain\r\x1b[2K",
            "own line, redrawn in place, cleared before the reply goes on and at the end"
        );
        // Not a terminal: nothing at all.
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut printer = Printer::new(Format::Human, &mut out, &mut err, false, false);
        printer.progress(Some("waiting")).unwrap();
        drop(printer);
        assert!(err.is_empty());
    }

    #[test]
    fn a_status_line_is_cut_to_fit() {
        assert_eq!(fit("waiting", 10), "waiting");
        assert_eq!(fit("waiting for a runner", 10), "waiting f…");
        assert_eq!(fit("waiting", 0), "…");
    }

    #[test]
    fn a_new_run_of_a_session_starts_a_new_line() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut printer = Printer::new(Format::Human, &mut out, &mut err, false, false);
        printer.run_header("a").unwrap();
        printer.event(&delta(1, "assistant_text", "one")).unwrap();
        printer
            .event(&event(2, "run.terminal", json!({"status": "completed"})))
            .unwrap();
        printer.run_header("b").unwrap();
        printer.event(&delta(1, "assistant_text", "two")).unwrap();
        drop(printer);
        assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo");
        let err = String::from_utf8(err).unwrap();
        assert!(err.starts_with("── run a\n"), "{err}");
        assert!(err.ends_with("── run b\n"), "{err}");
    }

    #[test]
    fn durations_ages_and_resolutions() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::ZERO), "0s");
        assert_eq!(duration(Duration::from_secs(3)), "3s");
        assert_eq!(duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(duration(Duration::from_secs(4 * 3600 + 600)), "4h10m");
        assert_eq!(duration(Duration::from_secs(3 * 86400 + 7200)), "3d02h");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |secs| prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        };
        assert_eq!(ago(Some(&at(997)), now), "3s ago");
        assert_eq!(ago(Some(&at(1_005)), now), "just now");
        assert_eq!(ago(None, now), "-");
        assert_eq!(resolution(r#"{"decision": "accept"}"#), "accept");
        assert_eq!(
            resolution(r#"{"decision": "decline", "answers": {"a": 1}, "x": null}"#),
            r#"decline {"answers":{"a":1}}"#
        );
    }

    #[test]
    fn sessions_stats_and_runners_tables() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let view = |id: &str, title: &str, attention: SessionAttention, status: RunStatus| {
            proto::SessionView {
                session: Some(proto::Session {
                    session_id: id.into(),
                    title: title.into(),
                    version: 3,
                    updated_at: Some(prost_types::Timestamp {
                        seconds: 990,
                        nanos: 0,
                    }),
                    ..Default::default()
                }),
                attention: attention as i32,
                last_run_status: status as i32,
            }
        };
        let table = sessions_table(
            &[
                view("s1", "", SessionAttention::Active, RunStatus::Running),
                view(
                    "s2",
                    "deploy",
                    SessionAttention::Unread,
                    RunStatus::Completed,
                ),
                view("s3", "", SessionAttention::Read, RunStatus::Failed),
            ],
            now,
        );
        assert_eq!(
            table,
            "   ID  TITLE/STATUS  VERSION  UPDATED\n\
             >  s1  running       3        10s ago\n\
             *  s2  deploy        3        10s ago\n\
             \x20  s3  failed        3        10s ago\n"
        );

        let stats = proto::GetQueueStatsResponse {
            waiting: Vec::new(),
            depths: vec![
                proto::QueueDepth {
                    queue: "default".into(),
                    status: RunStatus::Running as i32,
                    runs: 2,
                },
                proto::QueueDepth {
                    queue: "default".into(),
                    status: RunStatus::Pending as i32,
                    runs: 1,
                },
            ],
            ages: vec![proto::QueueAge {
                queue: "default".into(),
                oldest_pending_age_ms: 3_500,
            }],
            tenants: vec![proto::TenantStats {
                tenant_id: "acme".into(),
                pending_runs: 1,
                active_runs: 2,
                max_active_runs: 0,
                event_retention_ms: 0,
            }],
        };
        assert_eq!(
            queue_table(&stats),
            "QUEUE    STATUS   RUNS  OLDEST PENDING\n\
             default  pending  1     3s\n\
             default  running  2\n"
        );
        assert_eq!(
            tenants_table(&stats),
            "TENANT  PENDING  ACTIVE  LIMIT\nacme    1        2       none\n"
        );
        let runner = proto::RunnerInfo {
            runner_id: "r-1".into(),
            name: "runner-1".into(),
            backend_profiles: vec!["scripted".into(), "openai".into()],
            max_concurrency: 4,
            last_heartbeat_at: Some(prost_types::Timestamp {
                seconds: 999,
                nanos: 0,
            }),
            leases: vec![proto::LeaseRef::default()],
            ..Default::default()
        };
        assert_eq!(
            runners_table(&[runner], now),
            "NAME      ID   PROFILES         LEASES  HEARTBEAT  DRAINING\n\
             runner-1  r-1  scripted,openai  1/4     1s ago     no\n"
        );
    }
}
