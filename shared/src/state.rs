//! Run and command state machines. Each enum has one function that says which
//! transitions are legal ([`RunStatus::sources`], [`CommandStatus::sources`]); the SQL
//! uses the same list in `WHERE status = ANY(...)` so a race cannot slip past it.

use crate::error::FieldError;
use crate::proto;

/// Declares a text-backed enum: its database spelling, parsing and proto mapping.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident : $proto:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling stored in the database and used in event payloads.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// Parses the database spelling.
            pub fn from_db(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }

            /// Converts from the wire; `field` names the request field in the error.
            pub fn from_proto(field: &str, value: i32) -> Result<Self, FieldError> {
                match proto::$proto::try_from(value) {
                    $(Ok(proto::$proto::$variant) => Ok($name::$variant),)+
                    _ => Err(FieldError::new(field, format!("unknown value {value}"))),
                }
            }

            pub fn to_proto(self) -> proto::$proto {
                match self { $($name::$variant => proto::$proto::$variant),+ }
            }
        }
    };
}

text_enum!(
    /// Lifecycle of a run.
    RunStatus: RunStatus {
        Pending = "pending",
        Claimed = "claimed",
        Running = "running",
        Waiting = "waiting",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
        Blocked = "blocked",
        Expired = "expired",
    }
);

impl RunStatus {
    /// Held under a lease by a runner.
    pub const ACTIVE: &'static [RunStatus] =
        &[RunStatus::Claimed, RunStatus::Running, RunStatus::Waiting];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed
                | RunStatus::Failed
                | RunStatus::Cancelled
                | RunStatus::Blocked
                | RunStatus::Expired
        )
    }

    /// The states from which a run may move to `self`. The single source of truth for
    /// run transitions.
    pub fn sources(self) -> &'static [RunStatus] {
        use RunStatus::*;
        match self {
            // A lease lost or released puts an active run back in the queue.
            Pending => &[Claimed, Running, Waiting],
            Claimed => &[Pending],
            Running => &[Claimed, Waiting],
            Waiting => &[Claimed, Running],
            Completed | Failed | Blocked => &[Claimed, Running, Waiting],
            Cancelled => &[Pending, Claimed, Running, Waiting],
            // Only a run that was never claimed can expire in the queue.
            Expired => &[Pending],
        }
    }

    pub fn can_transition(from: RunStatus, to: RunStatus) -> bool {
        to.sources().contains(&from)
    }

    /// Outcomes a runner may report with FinishRun.
    pub fn is_runner_outcome(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled | RunStatus::Blocked
        )
    }
}

text_enum!(
    /// Lifecycle of a command.
    CommandStatus: CommandStatus {
        Pending = "pending",
        Delivered = "delivered",
        Acknowledged = "acknowledged",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
    }
);

impl CommandStatus {
    /// Not yet finished: still owed to, or held by, a runner.
    pub const OPEN: &'static [CommandStatus] = &[
        CommandStatus::Pending,
        CommandStatus::Delivered,
        CommandStatus::Acknowledged,
    ];

    pub fn is_final(self) -> bool {
        !Self::OPEN.contains(&self)
    }

    /// The states from which a command may move to `self`.
    pub fn sources(self) -> &'static [CommandStatus] {
        use CommandStatus::*;
        match self {
            // Redelivery: a command held by a runner that lost its lease goes back.
            Pending => &[Delivered, Acknowledged],
            Delivered => &[Pending],
            Acknowledged => &[Delivered],
            Completed | Failed => &[Delivered, Acknowledged],
            Cancelled => &[Pending, Delivered, Acknowledged],
        }
    }

    pub fn can_transition(from: CommandStatus, to: CommandStatus) -> bool {
        to.sources().contains(&from)
    }
}

text_enum!(
    /// What a command asks of the runner.
    CommandKind: CommandKind {
        Turn = "turn",
        Steer = "steer",
        Interrupt = "interrupt",
        Cancel = "cancel",
        Resolve = "resolve",
        Resume = "resume",
    }
);

text_enum!(
    /// What a `turn` command does while another turn is active.
    TurnDeliveryPolicy: TurnDeliveryPolicy {
        Queue = "queue",
        Interrupt = "interrupt",
        Steer = "steer",
        Reject = "reject",
    }
);

impl TurnDeliveryPolicy {
    /// Unspecified on the wire means `queue`.
    pub fn from_proto_or_default(field: &str, value: i32) -> Result<Self, FieldError> {
        if value == proto::TurnDeliveryPolicy::Unspecified as i32 {
            Ok(TurnDeliveryPolicy::Queue)
        } else {
            Self::from_proto(field, value)
        }
    }
}

text_enum!(
    /// How a run's streamed output (`content.delta`) is kept in its log.
    StreamMode: StreamMode {
        Deltas = "deltas",
        Coalesced = "coalesced",
        Final = "final",
    }
);

impl StreamMode {
    /// Unspecified on the wire means `deltas` (every delta stored).
    pub fn from_proto_or_default(field: &str, value: i32) -> Result<Self, FieldError> {
        if value == proto::StreamMode::Unspecified as i32 {
            Ok(StreamMode::Deltas)
        } else {
            Self::from_proto(field, value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_never_change() {
        for from in RunStatus::ALL.iter().filter(|s| s.is_terminal()) {
            for to in RunStatus::ALL {
                assert!(!RunStatus::can_transition(*from, *to), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn only_pending_runs_are_claimed_or_expire() {
        assert!(RunStatus::can_transition(
            RunStatus::Pending,
            RunStatus::Claimed
        ));
        assert!(!RunStatus::can_transition(
            RunStatus::Running,
            RunStatus::Claimed
        ));
        assert!(!RunStatus::can_transition(
            RunStatus::Running,
            RunStatus::Expired
        ));
        assert!(!RunStatus::can_transition(
            RunStatus::Pending,
            RunStatus::Completed
        ));
    }

    #[test]
    fn text_round_trips_and_unknown_proto_values_name_the_field() {
        for s in RunStatus::ALL {
            assert_eq!(RunStatus::from_db(s.as_str()), Some(*s));
            assert_eq!(
                RunStatus::from_proto("status", s.to_proto() as i32).unwrap(),
                *s
            );
        }
        let err = RunStatus::from_proto("status", 0).unwrap_err();
        assert_eq!(err.field, "status");
        assert!(CommandKind::from_proto("kind", 99).is_err());
        assert_eq!(
            TurnDeliveryPolicy::from_proto_or_default("delivery_policy", 0).unwrap(),
            TurnDeliveryPolicy::Queue
        );
    }

    #[test]
    fn final_commands_never_change() {
        for from in CommandStatus::ALL.iter().filter(|s| s.is_final()) {
            for to in CommandStatus::ALL {
                assert!(!CommandStatus::can_transition(*from, *to));
            }
        }
    }
}
