//! What a followed run is waiting for, as the one-line status shown on stderr.
//!
//! A follower that sees no events cannot tell a stalled run from one that waits for
//! something: a runner to claim it, or a person to answer a request. [`Waiting`] reads
//! that from the events already printed (the log says it: `run.created` and
//! `run.requeued` leave a run pending until `run.claimed`; `request.opened` makes it
//! waiting until `request.resolved`), so no extra call is needed. The line is transient
//! — the printer shows it only on a terminal and clears it as soon as events flow again
//! (`render::Printer::progress`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentrun_shared::proto;
use serde_json::Value;

use crate::render;

/// How often the status line is redrawn (spinner frame, elapsed seconds).
pub const TICK: Duration = Duration::from_millis(100);

const SPINNER: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// What the followed run is waiting for, judged from the events seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waiting {
    state: Option<Wait>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Wait {
    /// Pending: no runner has claimed the run since `since`.
    Runner { since: SystemTime },
    /// An open request stops the run until someone answers it.
    Approval { run_id: String, request_id: String },
}

impl Waiting {
    /// Updates the state with the next event of the log.
    pub fn observe(&mut self, event: &proto::Event) {
        match event.r#type.as_str() {
            "run.created" | "run.requeued" => {
                let since = event
                    .created_at
                    .and_then(|ts| SystemTime::try_from(ts).ok())
                    .unwrap_or_else(SystemTime::now);
                self.state = Some(Wait::Runner { since });
            }
            "request.opened" => {
                self.state = request_id(event).map(|request_id| Wait::Approval {
                    run_id: event.run_id.clone(),
                    request_id,
                });
            }
            // The manager's bookkeeping of commands sent meanwhile: the run still waits.
            "command.created" | "command.delivered" => {}
            _ => self.state = None,
        }
    }

    /// True while the run waits for a runner or an answer.
    pub fn is_waiting(&self) -> bool {
        self.state.is_some()
    }

    /// The status line at `now`, or `None` when the run is not known to wait.
    pub fn line(&self, now: SystemTime) -> Option<String> {
        let frame = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() / TICK.as_millis());
        let spinner = SPINNER[(frame % SPINNER.len() as u128) as usize];
        match self.state.as_ref()? {
            Wait::Runner { since } => {
                // Whole seconds: the line changes once a second, not on every tick.
                let waited = now.duration_since(*since).unwrap_or_default().as_secs();
                Some(format!(
                    "{spinner} waiting for a runner… {}",
                    render::duration(Duration::from_secs(waited))
                ))
            }
            Wait::Approval { run_id, request_id } => Some(format!(
                "{spinner} waiting for approval (request {request_id}): {}",
                approve_command(run_id, request_id)
            )),
        }
    }
}

/// The request id of a `request.opened` event.
pub fn request_id(event: &proto::Event) -> Option<String> {
    let payload: Value = serde_json::from_str(&event.payload_json).ok()?;
    payload
        .get("request_id")?
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
}

/// The command that approves a request.
pub fn approve_command(run_id: &str, request_id: &str) -> String {
    format!("agentrun approve {run_id} {request_id}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn event(event_type: &str, payload: Value, at: SystemTime) -> proto::Event {
        proto::Event {
            run_id: "r1".into(),
            seq: 1,
            r#type: event_type.into(),
            payload_json: payload.to_string(),
            created_at: Some(at.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_pending_run_waits_for_a_runner_until_claimed() {
        let created = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut waiting = Waiting::default();
        assert_eq!(waiting.line(created), None);
        waiting.observe(&event("run.created", json!({}), created));
        waiting.observe(&event("command.created", json!({"seq": 1}), created));
        let line = waiting.line(created + Duration::from_secs(3)).unwrap();
        assert!(line.ends_with("waiting for a runner… 3s"), "{line}");
        waiting.observe(&event("run.claimed", json!({}), created));
        assert!(!waiting.is_waiting());
        assert_eq!(waiting.line(created), None);
    }

    #[test]
    fn an_open_request_waits_for_approval_until_resolved() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut waiting = Waiting::default();
        waiting.observe(&event("request.opened", json!({"request_id": "q1"}), now));
        let line = waiting.line(now).unwrap();
        assert!(
            line.ends_with("waiting for approval (request q1): agentrun approve r1 q1"),
            "{line}"
        );
        waiting.observe(&event("request.resolved", json!({"request_id": "q1"}), now));
        assert_eq!(waiting.line(now), None);
        // A requeue after a lost runner is pending again.
        waiting.observe(&event("run.requeued", json!({}), now));
        assert!(waiting.is_waiting());
    }
}
