//! Runner messages to store writes: validation and conversion of what runners send
//! (identities, lease references, event batches, command reports, finishes, releases)
//! and of what they are answered, shared by the unary RPCs (`runner_service`) and the
//! Connect stream (`connect`).

use agentrun_shared::error::FieldError;
use agentrun_shared::events::{EventType, PlainDeltas};
use agentrun_shared::ids::{CommandId, RunId, RunnerId};
use agentrun_shared::payload::parse_object;
use agentrun_shared::proto;
use agentrun_shared::state::{CommandStatus, RunStatus};
use serde_json::Value;

use super::{convert, validate};
use crate::config::Settings;
use crate::store::commands::CommandUpdate;
use crate::store::leases::{self, LeaseWrite, RunnerEvent, RunnerIdentity};
use crate::store::runs::Finish;

/// Most leases renewed by one heartbeat.
const MAX_HEARTBEAT_LEASES: usize = 10_000;
/// Longest failure message kept.
const MAX_MESSAGE_BYTES: usize = 4096;
/// Failure kinds only the manager's sweeper decides: a runner reporting them would
/// blur what happened (and the attempt accounting behind `runner_lost`).
const MANAGER_FAILURE_KINDS: [&str; 3] = ["runner_lost", "run_timeout", "queue_timeout"];
/// Most command updates in one append.
const MAX_COMMAND_UPDATES: usize = 1_000;

pub(super) fn heartbeat_response(
    states: &[leases::LeaseState],
    lease_ttl_ms: u64,
) -> proto::HeartbeatResponse {
    proto::HeartbeatResponse {
        leases: states
            .iter()
            .map(|s| proto::LeaseStatus {
                run_id: s.run_id.to_string(),
                epoch: s.epoch,
                held: s.expires_at.is_some(),
                expires_at: convert::timestamp(s.expires_at),
                commands: s.commands.iter().map(convert::command).collect(),
                cancel_requested: s.cancel_requested,
            })
            .collect(),
        lease_ttl_ms: lease_ttl_ms as i64,
    }
}

/// Validates a runner's event batch against the settings' limits.
fn events(
    settings: &Settings,
    events: Vec<proto::RunnerEvent>,
) -> Result<Vec<RunnerEvent>, FieldError> {
    let max = settings.max_batch_events;
    if events.len() > max {
        return Err(FieldError::new(
            "events",
            format!("holds {}, more than the limit of {max}", events.len()),
        ));
    }
    let mut out: Vec<RunnerEvent> = Vec::with_capacity(events.len());
    let mut plain_deltas = PlainDeltas::default();
    for (i, e) in events.into_iter().enumerate() {
        let field = |name: &str| format!("events[{i}].{name}");
        match out.last() {
            None if e.runner_seq < 1 => {
                return Err(FieldError::new(field("runner_seq"), "must be at least 1"));
            }
            None => {}
            Some(prev) => match prev.runner_seq.checked_add(1) {
                Some(next) if next == e.runner_seq => {}
                Some(next) => {
                    return Err(FieldError::new(
                        field("runner_seq"),
                        format!("must be {next} (contiguous)"),
                    ));
                }
                None => {
                    return Err(FieldError::new(
                        field("runner_seq"),
                        "cannot follow the largest runner_seq (contiguous)",
                    ));
                }
            },
        }
        let event = checked_event(settings, &mut plain_deltas, e)
            .map_err(|err| err.within(&format!("events[{i}]")))?;
        out.push(event);
    }
    Ok(out)
}

/// One event of a runner's batch, checked; errors name its fields from the event down.
/// `plain_deltas` checks the batch's deltas, in order.
fn checked_event(
    settings: &Settings,
    plain_deltas: &mut PlainDeltas,
    e: proto::RunnerEvent,
) -> Result<RunnerEvent, FieldError> {
    let event_type = EventType::parse("type", &e.r#type)?;
    if !event_type.runner_may_write() {
        return Err(FieldError::new(
            "type",
            format!("{} is written by the manager only", e.r#type),
        ));
    }
    if event_type == EventType::ContentDelta
        && plain_deltas.check(&e.payload_json, settings.max_payload_bytes)
    {
        return Ok(RunnerEvent::as_sent(
            e.runner_seq,
            event_type,
            e.payload_json,
        ));
    }
    let payload = parse_object("payload_json", &e.payload_json, settings.max_payload_bytes)?;
    event_type.validate_payload("payload_json", &payload)?;
    Ok(RunnerEvent::new(
        e.runner_seq,
        event_type,
        Value::Object(payload),
        &e.payload_json,
    ))
}

pub(super) fn runner_identity(
    r: Option<&proto::RunnerIdentity>,
) -> Result<RunnerIdentity, FieldError> {
    let r = r.ok_or_else(|| FieldError::new("runner", "is required"))?;
    let id = RunnerId::parse("runner.runner_id", &r.runner_id)?;
    let backend_profiles = validate::names("runner.backend_profiles", &r.backend_profiles)?;
    if backend_profiles.is_empty() {
        return Err(FieldError::new(
            "runner.backend_profiles",
            "must name at least one profile",
        ));
    }
    let mut queues = validate::names("runner.queues", &r.queues)?;
    if queues.is_empty() {
        queues.push("default".into());
    }
    Ok(RunnerIdentity {
        id,
        name: validate::name_or("runner.name", &r.name, &r.runner_id)?.to_owned(),
        labels: validate::names("runner.labels", &r.labels)?,
        backend_profiles,
        queues,
        max_concurrency: validate::bounded(
            "runner.max_concurrency",
            r.max_concurrency.into(),
            1,
            1,
            100_000,
        )? as i32,
        version: validate::text("runner.version", &r.version)?
            .chars()
            .take(validate::MAX_NAME_LEN)
            .collect(),
        // Set from the caller's key, never from the request.
        tenant: None,
    })
}

pub(super) fn epoch(value: i64) -> Result<i64, FieldError> {
    if value < 1 {
        Err(FieldError::new("epoch", "must be at least 1"))
    } else {
        Ok(value)
    }
}

/// Runs that got commands (and so `command.delivered` events) with these lease states.
pub(super) fn delivered_to(states: &[leases::LeaseState]) -> impl Iterator<Item = uuid::Uuid> + '_ {
    states
        .iter()
        .filter(|s| !s.commands.is_empty())
        .map(|s| s.run_id.0)
}

/// INVALID_ARGUMENT when a heartbeat names more leases than its runner can hold.
pub(super) fn within_capacity(
    leases: &[(RunId, i64)],
    max_concurrency: i32,
) -> Result<(), FieldError> {
    if leases.len() > max_concurrency.max(0) as usize {
        return Err(FieldError::new(
            "leases",
            format!(
                "names {} leases, more than the runner can hold (max_concurrency {max_concurrency})",
                leases.len()
            ),
        ));
    }
    Ok(())
}

/// Validated `(run, epoch)` pairs; `field` names the list in errors.
pub(super) fn lease_refs(
    field: &str,
    leases: &[proto::LeaseRef],
) -> Result<Vec<(RunId, i64)>, FieldError> {
    if leases.len() > MAX_HEARTBEAT_LEASES {
        return Err(FieldError::new(
            field,
            format!("holds more than {MAX_HEARTBEAT_LEASES}"),
        ));
    }
    leases
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let run_id = RunId::parse(&format!("{field}[{i}].run_id"), &l.run_id)?;
            let e = epoch(l.epoch)
                .map_err(|e| FieldError::new(format!("{field}[{i}].epoch"), e.reason))?;
            Ok((run_id, e))
        })
        .collect()
}

/// A validated event batch (with command reports) as a lease write.
pub(super) fn append_write(
    settings: &Settings,
    r: proto::AppendEventsRequest,
) -> Result<LeaseWrite, FieldError> {
    let run_id = RunId::parse("run_id", &r.run_id)?;
    let epoch = epoch(r.epoch)?;
    let events = events(settings, r.events)?;
    let updates = command_updates(&r.command_updates)?;
    if events.is_empty() && updates.is_empty() {
        return Err(FieldError::new(
            "events",
            "is empty and so is command_updates",
        ));
    }
    Ok(LeaseWrite::Append {
        run_id,
        epoch,
        events,
        updates,
    })
}

/// A validated FinishRun as a lease write.
pub(super) fn finish_write(r: &proto::FinishRunRequest) -> Result<LeaseWrite, FieldError> {
    let run_id = RunId::parse("run_id", &r.run_id)?;
    let epoch = epoch(r.epoch)?;
    if r.last_runner_seq < 0 {
        return Err(FieldError::new("last_runner_seq", "must not be negative"));
    }
    let status = RunStatus::from_proto("status", r.status)?;
    if !status.is_runner_outcome() {
        return Err(FieldError::new(
            "status",
            "must be completed, failed, cancelled or blocked",
        ));
    }
    let failure_kind = validate::optional_name("failure_kind", &r.failure_kind)?;
    if let Some(kind) = failure_kind.as_deref()
        && MANAGER_FAILURE_KINDS.contains(&kind)
    {
        return Err(FieldError::new(
            "failure_kind",
            format!("{kind} is decided by the manager only"),
        ));
    }
    let message = validate::text("message", &r.message)?;
    Ok(LeaseWrite::Finish {
        epoch,
        outcome: Finish {
            run_id,
            status,
            failure_kind: failure_kind
                .or_else(|| (status != RunStatus::Completed).then(|| status.as_str().to_owned())),
            message: (!message.is_empty()).then(|| truncate(message)),
        },
        last_runner_seq: r.last_runner_seq,
    })
}

/// A validated Release (graceful drain) as a lease write.
pub(super) fn release_write(r: &proto::Release) -> Result<LeaseWrite, FieldError> {
    Ok(LeaseWrite::Release {
        run_id: RunId::parse("run_id", &r.run_id)?,
        epoch: epoch(r.epoch)?,
    })
}

pub(super) fn command_updates(
    updates: &[proto::CommandUpdate],
) -> Result<Vec<CommandUpdate>, FieldError> {
    if updates.len() > MAX_COMMAND_UPDATES {
        return Err(FieldError::new(
            "command_updates",
            format!(
                "holds {}, more than the limit of {MAX_COMMAND_UPDATES}",
                updates.len()
            ),
        ));
    }
    updates
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let status =
                CommandStatus::from_proto(&format!("command_updates[{i}].status"), u.status)?;
            if matches!(status, CommandStatus::Pending | CommandStatus::Delivered) {
                return Err(FieldError::new(
                    format!("command_updates[{i}].status"),
                    "must be acknowledged, completed, failed or cancelled",
                ));
            }
            let command_id =
                CommandId::parse(&format!("command_updates[{i}].command_id"), &u.command_id)?;
            let error = validate::text(&format!("command_updates[{i}].error"), &u.error)?;
            Ok(CommandUpdate {
                command_id,
                status,
                error: (!error.is_empty()).then(|| truncate(error)),
            })
        })
        .collect()
}

fn truncate(text: &str) -> String {
    let mut end = text.len().min(MAX_MESSAGE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
