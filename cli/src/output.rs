//! The machine-readable output (`-o json`, `-o jsonl`): the one place that says what a
//! run, event, command, request, session, runner or API key looks like as JSON, and how
//! a result is written in each format.
//!
//! The shape is stable: field names are the proto field names (snake_case); enums are
//! their lowercase names without the prefix (`RUN_STATUS_RUNNING` → `running`);
//! timestamps are RFC 3339 strings, `null` when unset; ids are strings. A field that
//! holds JSON text in the proto (`input_json`, `payload_json`, …) is parsed and named
//! without its `_json` suffix (`input`, `payload`, …); text that does not parse stays a
//! string. `json` writes one document (an array for a list), `jsonl` one object per line.

use std::borrow::Cow;
use std::io::Write;

use agentrun_shared::proto::{
    self, ApiKeyRole, CommandKind, CommandStatus, Producer, RunStatus, SessionAttention,
    StreamMode, TurnDeliveryPolicy,
};
use serde_json::{Value, json};

/// How a command writes its result on stdout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// For people: tables, `key value` lines, the reply as text.
    #[default]
    Text,
    /// One JSON document (an array for a list, or for a followed event stream).
    Json,
    /// One JSON object per line (per item of a list, per event of a stream).
    Jsonl,
}

impl OutputFormat {
    /// True for `json` and `jsonl`.
    pub fn is_json(self) -> bool {
        self != OutputFormat::Text
    }
}

/// `text` as a terminal may show it: control characters (other than newline and tab) in
/// caret notation (`^[` for ESC, `^M` for a carriage return not ending a line, `^?` for
/// DEL) and C1 controls as `\x9b`. What runs print — a model's reply, an agent's output,
/// an error message — is untrusted, and raw it could drive the terminal (set the
/// clipboard, clear the screen, overwrite a line). Human output only; JSON escapes them.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    let is_control = |c: char| c.is_control() && c != '\n' && c != '\t';
    if !text.contains(is_control) {
        return Cow::Borrowed(text);
    }
    let mut safe = String::with_capacity(text.len() + 8);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' if chars.peek() == Some(&'\n') => {}
            c if !is_control(c) => safe.push(c),
            '\u{7f}' => safe.push_str("^?"),
            c if (c as u32) < 0x20 => {
                safe.push('^');
                safe.push(char::from(c as u8 + 0x40));
            }
            c => safe.push_str(&format!("\\x{:02x}", c as u32)),
        }
    }
    Cow::Owned(safe)
}

/// Writes one result: `text` as it is, or `value` as one JSON document or line.
pub fn write_one(
    out: &mut impl Write,
    format: OutputFormat,
    value: &Value,
    text: impl FnOnce() -> String,
) -> std::io::Result<()> {
    match format {
        OutputFormat::Text => out.write_all(terminal_safe(&text()).as_bytes())?,
        OutputFormat::Json => writeln!(out, "{}", pretty(value))?,
        OutputFormat::Jsonl => writeln!(out, "{value}")?,
    }
    out.flush()
}

/// Writes a list: `text` as it is, a JSON array, or one JSON object per line.
pub fn write_list(
    out: &mut impl Write,
    format: OutputFormat,
    values: Vec<Value>,
    text: impl FnOnce() -> String,
) -> std::io::Result<()> {
    match format {
        OutputFormat::Text => out.write_all(terminal_safe(&text()).as_bytes())?,
        OutputFormat::Json => writeln!(out, "{}", pretty(&Value::Array(values)))?,
        OutputFormat::Jsonl => {
            for value in values {
                writeln!(out, "{value}")?;
            }
        }
    }
    out.flush()
}

fn pretty(value: &Value) -> String {
    // Serializing a `Value` cannot fail (its map keys are strings).
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// `RUN_STATUS_PENDING` → `pending`.
pub fn enum_name(proto_name: &str, prefix: &str) -> String {
    proto_name
        .strip_prefix(prefix)
        .unwrap_or(proto_name)
        .to_ascii_lowercase()
}

/// An enum value as its lowercase name, or its number when this build does not know it.
fn enum_value<E>(value: i32, name: impl Fn(&E) -> &'static str, prefix: &str) -> Value
where
    E: TryFrom<i32>,
{
    match E::try_from(value) {
        Ok(known) => Value::String(enum_name(name(&known), prefix)),
        Err(_) => Value::from(value),
    }
}

/// A timestamp as RFC 3339, or `null` when unset.
pub fn timestamp(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.map_or(Value::Null, |ts| Value::String(ts.to_string()))
}

/// JSON text parsed; empty text is `null`, text that does not parse stays a string.
pub fn parsed(text: &str) -> Value {
    if text.is_empty() {
        return Value::Null;
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

/// A run.
pub fn run(run: &proto::Run) -> Value {
    json!({
        "run_id": run.run_id,
        "project_id": run.project_id,
        "session_id": run.session_id,
        "backend_profile": run.backend_profile,
        "queue": run.queue,
        "priority": run.priority,
        "labels": run.labels,
        "status": enum_value(run.status, RunStatus::as_str_name, "RUN_STATUS_"),
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        "input": parsed(&run.input_json),
        "metadata": parsed(&run.metadata_json),
        "queue_timeout_ms": run.queue_timeout_ms,
        "run_timeout_ms": run.run_timeout_ms,
        "idempotency_key": run.idempotency_key,
        "lease_runner_id": run.lease_runner_id,
        "lease_epoch": run.lease_epoch,
        "lease_expires_at": timestamp(run.lease_expires_at.as_ref()),
        "failure_kind": run.failure_kind,
        "failure_message": run.failure_message,
        "last_event_seq": run.last_event_seq,
        "cancel_requested": run.cancel_requested,
        "created_at": timestamp(run.created_at.as_ref()),
        "updated_at": timestamp(run.updated_at.as_ref()),
        "claimed_at": timestamp(run.claimed_at.as_ref()),
        "finished_at": timestamp(run.finished_at.as_ref()),
        "scheduled_at": timestamp(run.scheduled_at.as_ref()),
        "active_turn_id": run.active_turn_id,
        "stream_mode": enum_value(run.stream_mode, StreamMode::as_str_name, "STREAM_MODE_"),
        "events_compacted_at": timestamp(run.events_compacted_at.as_ref()),
        "concurrency_key": run.concurrency_key,
        "waiting_reason": run.waiting_reason,
        "rerun_of_run_id": run.rerun_of_run_id,
        "forked_from_run_id": run.forked_from_run_id,
        "forked_from_turn_id": run.forked_from_turn_id,
        "schedule_id": run.schedule_id,
    })
}

/// An event.
pub fn event(event: &proto::Event) -> Value {
    json!({
        "run_id": event.run_id,
        "seq": event.seq,
        "type": event.r#type,
        "payload": parsed(&event.payload_json),
        "producer": enum_value(event.producer, Producer::as_str_name, "PRODUCER_"),
        "runner_id": event.runner_id,
        "epoch": event.epoch,
        "created_at": timestamp(event.created_at.as_ref()),
        "ephemeral": event.ephemeral,
    })
}

/// A command.
pub fn command(command: &proto::Command) -> Value {
    json!({
        "command_id": command.command_id,
        "run_id": command.run_id,
        "seq": command.seq,
        "kind": enum_value(command.kind, CommandKind::as_str_name, "COMMAND_KIND_"),
        "payload": parsed(&command.payload_json),
        "status": enum_value(command.status, CommandStatus::as_str_name, "COMMAND_STATUS_"),
        "delivery_policy": enum_value(
            command.delivery_policy,
            TurnDeliveryPolicy::as_str_name,
            "TURN_DELIVERY_POLICY_",
        ),
        "idempotency_key": command.idempotency_key,
        "error": command.error,
        "created_at": timestamp(command.created_at.as_ref()),
        "updated_at": timestamp(command.updated_at.as_ref()),
    })
}

/// A request (an approval or a question a run waits for).
pub fn request(request: &proto::Request) -> Value {
    json!({
        "request_id": request.request_id,
        "run_id": request.run_id,
        "turn_id": request.turn_id,
        "kind": request.kind,
        "detail": parsed(&request.detail_json),
        "options": request.options,
        "status": request.status,
        "resolution": parsed(&request.resolution_json),
        "deadline": timestamp(request.deadline.as_ref()),
        "created_at": timestamp(request.created_at.as_ref()),
        "resolved_at": timestamp(request.resolved_at.as_ref()),
    })
}

/// The answer to `approve` or `decline`.
pub fn resolution(response: &proto::ResolveRequestResponse) -> Value {
    json!({
        "resolution": parsed(&response.resolution_json),
        "resolved_now": response.resolved_now,
        "request": response.request.as_ref().map(request),
    })
}

/// A session.
pub fn session(session: &proto::Session) -> Value {
    json!({
        "session_id": session.session_id,
        "project_id": session.project_id,
        "backend_profile": session.backend_profile,
        "title": session.title,
        "provider_thread_id": session.provider_thread_id,
        "last_run_id": session.last_run_id,
        "version": session.version,
        "created_at": timestamp(session.created_at.as_ref()),
        "updated_at": timestamp(session.updated_at.as_ref()),
    })
}

/// A session as a reader sees it.
pub fn session_view(view: &proto::SessionView) -> Value {
    json!({
        "session": view.session.as_ref().map(session),
        "attention": enum_value(
            view.attention,
            SessionAttention::as_str_name,
            "SESSION_ATTENTION_",
        ),
        "last_run_status": enum_value(view.last_run_status, RunStatus::as_str_name, "RUN_STATUS_"),
    })
}

/// Queue statistics, with the runners when the manager listed them.
pub fn stats(stats: &proto::GetQueueStatsResponse, runners: Option<&[proto::RunnerInfo]>) -> Value {
    let depths: Vec<Value> = stats
        .depths
        .iter()
        .map(|d| {
            json!({
                "queue": d.queue,
                "status": enum_value(d.status, RunStatus::as_str_name, "RUN_STATUS_"),
                "runs": d.runs,
            })
        })
        .collect();
    let ages: Vec<Value> = stats
        .ages
        .iter()
        .map(|a| json!({ "queue": a.queue, "oldest_pending_age_ms": a.oldest_pending_age_ms }))
        .collect();
    let tenants: Vec<Value> = stats
        .tenants
        .iter()
        .map(|t| {
            json!({
                "tenant_id": t.tenant_id,
                "pending_runs": t.pending_runs,
                "active_runs": t.active_runs,
                "max_active_runs": t.max_active_runs,
                "event_retention_ms": t.event_retention_ms,
            })
        })
        .collect();
    let waiting: Vec<Value> = stats
        .waiting
        .iter()
        .map(|w| {
            json!({
                "tenant_id": w.tenant_id,
                "queue": w.queue,
                "reason": w.reason,
                "runs": w.runs,
            })
        })
        .collect();
    json!({
        "depths": depths,
        "ages": ages,
        "tenants": tenants,
        "waiting": waiting,
        "runners": runners.map(|r| r.iter().map(runner).collect::<Vec<_>>()),
    })
}

/// A runner.
pub fn runner(runner: &proto::RunnerInfo) -> Value {
    let leases: Vec<Value> = runner
        .leases
        .iter()
        .map(|l| json!({ "run_id": l.run_id, "epoch": l.epoch }))
        .collect();
    json!({
        "runner_id": runner.runner_id,
        "name": runner.name,
        "labels": runner.labels,
        "backend_profiles": runner.backend_profiles,
        "max_concurrency": runner.max_concurrency,
        "version": runner.version,
        "last_heartbeat_at": timestamp(runner.last_heartbeat_at.as_ref()),
        "draining": runner.draining,
        "leases": leases,
        "tenant_id": runner.tenant_id,
        "replica_id": runner.replica_id,
    })
}

/// An API key (never its secret).
pub fn api_key(key: &proto::ApiKey) -> Value {
    json!({
        "key_id": key.key_id,
        "tenant_id": key.tenant_id,
        "project_ids": key.project_ids,
        "role": enum_value(key.role, ApiKeyRole::as_str_name, "API_KEY_ROLE_"),
        "name": key.name,
        "created_at": timestamp(key.created_at.as_ref()),
        "revoked_at": timestamp(key.revoked_at.as_ref()),
        "expires_at": timestamp(key.expires_at.as_ref()),
        "last_used_at": timestamp(key.last_used_at.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_times_and_json_text_have_one_shape() {
        let value = run(&proto::Run {
            run_id: "r1".into(),
            status: RunStatus::Running as i32,
            input_json: r#"{"prompt":"hi"}"#.into(),
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            ..Default::default()
        });
        assert_eq!(value["run_id"], "r1");
        assert_eq!(value["status"], "running");
        assert_eq!(value["input"]["prompt"], "hi");
        assert_eq!(value["metadata"], Value::Null);
        assert_eq!(value["created_at"], "2023-11-14T22:13:20Z");
        assert_eq!(value["finished_at"], Value::Null);
        assert_eq!(enum_value(99, RunStatus::as_str_name, "RUN_STATUS_"), 99);
        assert_eq!(parsed("not json"), "not json");
    }

    #[test]
    fn json_is_one_document_and_jsonl_one_line_per_item() {
        let values = vec![json!({"a": 1}), json!({"a": 2})];
        let mut out = Vec::new();
        write_list(&mut out, OutputFormat::Jsonl, values.clone(), String::new).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "{\"a\":1}\n{\"a\":2}\n");
        let mut out = Vec::new();
        write_list(&mut out, OutputFormat::Json, values, String::new).unwrap();
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed.as_array().map(Vec::len), Some(2));
        let mut out = Vec::new();
        write_one(&mut out, OutputFormat::Text, &json!({}), || "text\n".into()).unwrap();
        assert_eq!(out, b"text\n");
    }
}
