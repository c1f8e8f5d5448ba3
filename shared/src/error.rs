//! The validation error every edge returns: which field, and what is wrong with it.

/// Bad input in one field. Maps to gRPC INVALID_ARGUMENT with the field named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error about a field of `parent` (`events[3]` + `type`: `events[3].type`),
    /// so hot paths name the parent only when something is wrong.
    pub fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            ..self
        }
    }
}

/// Machine-readable reasons sent in the `agentrun-error` response metadata, next to the
/// gRPC status code, so callers can branch without parsing messages.
pub mod reason {
    /// The write named a lease epoch that is no longer current.
    pub const LEASE_LOST: &str = "lease_lost";
    /// The run is terminal and cannot change.
    pub const RUN_TERMINAL: &str = "run_terminal";
    /// The requested state change is not allowed from the current state.
    pub const ILLEGAL_TRANSITION: &str = "illegal_transition";
    /// A steer or interrupt named a turn that is no longer the active one.
    pub const TURN_NOT_ACTIVE: &str = "turn_not_active";
    /// ForkRun named a turn that has not started, so there is nothing to fork from yet.
    pub const TURN_NOT_STARTED: &str = "turn_not_started";
    /// An idempotency key was reused with a different request.
    pub const IDEMPOTENCY_CONFLICT: &str = "idempotency_conflict";
    /// A finish arrived before the run's events it names were stored.
    pub const EVENTS_MISSING: &str = "events_missing";
    /// A run failed because the manager refused its runner's event payload as larger
    /// than `max_payload_bytes` (a run's `failure_kind`).
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// A run failed because the manager refused another of its runner's writes as
    /// invalid (a run's `failure_kind`).
    pub const WRITE_REFUSED: &str = "write_refused";
    /// A run failed because its runner's writes went over a quota of the run (its event
    /// payload bytes; a run's `failure_kind`).
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
}

/// Response metadata key carrying one of the [`reason`] codes.
pub const REASON_METADATA_KEY: &str = "agentrun-error";
