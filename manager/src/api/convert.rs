//! Store records to wire messages.

use std::time::SystemTime;

use agentrun_shared::ids::{RunId, RunnerId};
use agentrun_shared::proto;
use prost_types::Timestamp;

use crate::store::commands::CommandRecord;
use crate::store::events::{EventRecord, Producer};
use crate::store::leases::Assignment;
use crate::store::runs::{NewRun, RunRecord};
use crate::store::schedules::{CatchUp, Overlap, ScheduleRecord};

fn ts(t: SystemTime) -> Option<Timestamp> {
    Some(Timestamp::from(t))
}

pub fn run(r: &RunRecord) -> proto::Run {
    let lease = r.lease_holder();
    proto::Run {
        run_id: r.id.to_string(),
        project_id: r.project_id.clone(),
        session_id: r.session_id.map(|s| s.to_string()).unwrap_or_default(),
        backend_profile: r.backend_profile.clone(),
        queue: r.queue.clone(),
        priority: r.priority,
        labels: r.labels.clone(),
        status: r.status.to_proto() as i32,
        attempt: r.attempt,
        max_attempts: r.max_attempts,
        input_json: r.input.to_string(),
        metadata_json: r.metadata.to_string(),
        queue_timeout_ms: r.queue_timeout_ms.unwrap_or_default(),
        run_timeout_ms: r.run_timeout_ms.unwrap_or_default(),
        idempotency_key: r.idempotency_key.clone().unwrap_or_default(),
        lease_runner_id: lease
            .map(|(runner, _)| runner.to_string())
            .unwrap_or_default(),
        lease_epoch: r.lease_epoch,
        lease_expires_at: lease.and_then(|(_, expires)| expires).and_then(ts),
        failure_kind: r.failure_kind.clone().unwrap_or_default(),
        failure_message: r.failure_message.clone().unwrap_or_default(),
        last_event_seq: r.last_event_seq,
        cancel_requested: r.cancel_requested,
        created_at: ts(r.created_at),
        updated_at: ts(r.updated_at),
        claimed_at: r.claimed_at.and_then(ts),
        finished_at: r.finished_at.and_then(ts),
        scheduled_at: r.scheduled_at.and_then(ts),
        active_turn_id: r.active_turn_id.clone().unwrap_or_default(),
        stream_mode: r.stream_mode.to_proto() as i32,
        events_compacted_at: r.events_compacted_at.and_then(ts),
        rerun_of_run_id: r
            .lineage
            .rerun_of
            .map(|run| run.to_string())
            .unwrap_or_default(),
        forked_from_run_id: r
            .lineage
            .forked_from
            .map(|(run, _)| run.to_string())
            .unwrap_or_default(),
        forked_from_turn_id: r
            .lineage
            .forked_from
            .map(|(_, turn)| turn.to_string())
            .unwrap_or_default(),
        schedule_id: r.schedule_id.map(|s| s.to_string()).unwrap_or_default(),
        concurrency_key: r.concurrency_key.clone().unwrap_or_default(),
        waiting_reason: waiting_reason(r),
    }
}

/// Why a pending run waits: as the query computed it (`run_waiting_reason`), else what
/// the record itself says (a run just created and held by its key).
fn waiting_reason(r: &RunRecord) -> String {
    if !r.waiting_reason.is_empty() {
        return r.waiting_reason.clone();
    }
    match (&r.held, r.status) {
        (Some(held), agentrun_shared::state::RunStatus::Pending) => held.clone(),
        _ => String::new(),
    }
}

pub fn command(c: &CommandRecord) -> proto::Command {
    proto::Command {
        command_id: c.id.to_string(),
        run_id: c.run_id.to_string(),
        seq: c.seq,
        kind: c.kind.to_proto() as i32,
        payload_json: c.payload.to_string(),
        status: c.status.to_proto() as i32,
        delivery_policy: c.delivery_policy.map_or(0, |p| p.to_proto() as i32),
        idempotency_key: c.idempotency_key.clone().unwrap_or_default(),
        error: c.error.clone().unwrap_or_default(),
        created_at: ts(c.created_at),
        updated_at: ts(c.updated_at),
    }
}

/// The event on the wire; its strings move, not copied.
pub fn event(e: EventRecord) -> proto::Event {
    WireIds::default().event(e)
}

/// Events on the wire, in order (see [`WireIds`]).
pub fn events(records: Vec<EventRecord>) -> Vec<proto::Event> {
    let mut ids = WireIds::default();
    records.into_iter().map(|e| ids.event(e)).collect()
}

/// Converts events, formatting each run and runner id once for the events in a row that
/// share it: a page of a streamed reply is one run's, from one runner, and formatting
/// two UUIDs per delta was a visible share of fanning it out.
#[derive(Default)]
pub struct WireIds {
    run: Option<(RunId, String)>,
    runner: Option<(RunnerId, String)>,
}

impl WireIds {
    pub fn event(&mut self, e: EventRecord) -> proto::Event {
        let (producer, runner_id, epoch) = match e.producer {
            Producer::Manager => (proto::Producer::Manager, String::new(), 0),
            Producer::Runner {
                runner_id, epoch, ..
            } => (
                proto::Producer::Runner,
                formatted(&mut self.runner, runner_id),
                epoch,
            ),
        };
        proto::Event {
            run_id: formatted(&mut self.run, e.run_id),
            seq: e.seq,
            r#type: e.event_type,
            payload_json: e.payload,
            producer: producer as i32,
            runner_id,
            epoch,
            created_at: ts(e.created_at),
            ephemeral: e.ephemeral,
        }
    }
}

/// `id` as text, from `last` when it was the last one formatted.
fn formatted<Id: Copy + PartialEq + std::fmt::Display>(
    last: &mut Option<(Id, String)>,
    id: Id,
) -> String {
    match last {
        Some((last_id, text)) if *last_id == id => text.clone(),
        _ => last.insert((id, id.to_string())).1.clone(),
    }
}

pub fn assignment(a: &Assignment) -> proto::Assignment {
    proto::Assignment {
        run: Some(run(&a.run)),
        epoch: a.run.lease_epoch,
        lease_expires_at: a.run.lease_expires_at.and_then(ts),
        commands: a.commands.iter().map(command).collect(),
        context: a
            .context
            .turns
            .iter()
            .map(|t| proto::ContextTurn {
                prompt: t.prompt.clone(),
                reply: t.reply.clone(),
            })
            .collect(),
        provider_thread_id: a.context.provider_thread_id.clone().unwrap_or_default(),
        trace_parent: a.run.trace_parent.clone().unwrap_or_default(),
        last_turn: a.context.last_turn.as_ref().map(|ending| {
            let (kind, message, retryable) = ending.error.clone().unwrap_or_default();
            proto::TurnEnding {
                state: ending.state.clone(),
                error_kind: kind,
                error_message: message,
                error_retryable: retryable,
            }
        }),
    }
}

pub fn timestamp(t: Option<SystemTime>) -> Option<Timestamp> {
    t.and_then(ts)
}

pub fn request(r: &crate::store::requests::RequestRecord) -> proto::Request {
    proto::Request {
        request_id: r.id.to_string(),
        run_id: r.run_id.to_string(),
        turn_id: r.turn_id.clone().unwrap_or_default(),
        kind: r.kind.clone(),
        detail_json: r.detail.to_string(),
        options: r.options.clone(),
        status: r.status.as_str().to_owned(),
        resolution_json: r
            .resolution
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        deadline: r.deadline.and_then(ts),
        created_at: ts(r.created_at),
        resolved_at: r.resolved_at.and_then(ts),
    }
}

/// A run template back to the request it was validated from.
fn run_template(r: &NewRun) -> proto::CreateRunRequest {
    proto::CreateRunRequest {
        project_id: r.project_id.clone(),
        session_id: r.session_id.map(|s| s.to_string()).unwrap_or_default(),
        backend_profile: r.backend_profile.clone(),
        input_json: serde_json::Value::Object(r.input.clone()).to_string(),
        queue: r.queue.clone(),
        priority: r.priority,
        labels: r.labels.clone(),
        max_attempts: r.max_attempts,
        queue_timeout_ms: r.queue_timeout_ms.unwrap_or_default(),
        run_timeout_ms: r.run_timeout_ms.unwrap_or_default(),
        metadata_json: serde_json::Value::Object(r.metadata.clone()).to_string(),
        stream_mode: r.stream_mode.to_proto() as i32,
        ..Default::default()
    }
}

pub fn schedule(s: &ScheduleRecord) -> proto::Schedule {
    let (cron, time_zone, interval_ms) = s.timing.parts();
    proto::Schedule {
        schedule_id: s.id.to_string(),
        project_id: s.project_id.clone(),
        name: s.name.clone(),
        cron: cron.unwrap_or_default().to_owned(),
        time_zone: time_zone.to_owned(),
        interval_ms: interval_ms.unwrap_or_default(),
        run_template: Some(run_template(&s.template)),
        overlap_policy: match s.overlap {
            Overlap::Skip => proto::OverlapPolicy::Skip,
            Overlap::Queue => proto::OverlapPolicy::Queue,
            Overlap::CancelPrevious => proto::OverlapPolicy::CancelPrevious,
        } as i32,
        catch_up_policy: match s.catch_up {
            CatchUp::One => proto::CatchUpPolicy::One,
            CatchUp::None => proto::CatchUpPolicy::None,
        } as i32,
        paused: s.paused,
        next_run_at: s.next_run_at.and_then(ts),
        last_run_at: s.last_run_at.and_then(ts),
        last_run_id: s.last_run_id.map(|r| r.to_string()).unwrap_or_default(),
        created_at: ts(s.created_at),
    }
}
