//! Validated id newtypes: parse once at the edge, trust inside.

use std::fmt;

use uuid::Uuid;

use crate::error::FieldError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $new:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh id.
            pub fn new() -> Self {
                Self(Uuid::$new())
            }

            /// Parses a canonical UUID; `field` names the request field in the error.
            pub fn parse(field: &str, text: &str) -> Result<Self, FieldError> {
                if text.is_empty() {
                    return Err(FieldError::new(field, "is required"));
                }
                Uuid::try_parse(text)
                    .map(Self)
                    .map_err(|_| FieldError::new(field, "is not a valid UUID"))
            }

            /// Like [`Self::parse`], but an empty string means "not given".
            pub fn parse_optional(field: &str, text: &str) -> Result<Option<Self>, FieldError> {
                if text.is_empty() { Ok(None) } else { Self::parse(field, text).map(Some) }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A run. Time-ordered (v7) so new runs land at the end of the primary-key index.
    RunId, now_v7
);
uuid_id!(
    /// A command of a run.
    CommandId, now_v7
);
uuid_id!(
    /// A session (conversation spanning runs).
    SessionId, new_v4
);
uuid_id!(
    /// A runner process; chosen by the runner itself.
    RunnerId, new_v4
);
uuid_id!(
    /// An open question to a person. Random (v4): knowing one id must not help guess another.
    RequestId, new_v4
);
uuid_id!(
    /// A schedule (ScheduleService). Time-ordered (v7): lists page by id, oldest first.
    ScheduleId, now_v7
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_the_field() {
        let err = RunId::parse("run_id", "nope").unwrap_err();
        assert_eq!(err.field, "run_id");
        assert_eq!(err.to_string(), "invalid run_id: is not a valid UUID");
        assert_eq!(
            RunId::parse("run_id", "").unwrap_err().reason,
            "is required"
        );
        assert_eq!(SessionId::parse_optional("session_id", "").unwrap(), None);
        let id = RunId::new();
        assert_eq!(RunId::parse("run_id", &id.to_string()).unwrap(), id);
    }
}
