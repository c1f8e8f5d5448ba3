//! The manager's one error type, and the one place that maps it to `tonic::Status` and
//! Postgres failures to it. Internal details are logged here, never sent to the caller.

use agentrun_shared::error::{FieldError, REASON_METADATA_KEY};
use tokio_postgres::error::SqlState;
use tonic::{Code, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    InvalidArgument(#[from] FieldError),
    /// `what` is a noun like "run"; other tenants' objects are reported the same way.
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("{message}")]
    AlreadyExists {
        reason: &'static str,
        message: String,
    },
    /// `reason` is a machine-readable code from `agentrun_shared::error::reason`.
    #[error("{reason}: {message}")]
    FailedPrecondition {
        reason: &'static str,
        message: String,
    },
    #[error("{0}")]
    ResourceExhausted(String),
    /// The database cannot be reached or asked us to retry; the call may be retried.
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
    /// No credential, or not a valid one.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid credential whose role or scope does not allow the call.
    #[error("{0}")]
    PermissionDenied(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError::new(field, reason).into()
    }

    pub fn precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Error::FailedPrecondition {
            reason,
            message: message.into(),
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(err: tokio_postgres::Error) -> Self {
        let code = err.code();
        let io_failure = std::error::Error::source(&err).is_some_and(|s| s.is::<std::io::Error>());
        if err.is_closed() || io_failure || code.is_some_and(|c| c.code().starts_with("08")) {
            tracing::warn!(error = %err, "database connection failed");
            return Error::Unavailable("database unavailable, retry later".into());
        }
        match code {
            Some(c)
                if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::ADMIN_SHUTDOWN
                    || *c == SqlState::CANNOT_CONNECT_NOW
                    || *c == SqlState::TOO_MANY_CONNECTIONS =>
            {
                tracing::warn!(error = %err, "database asked to retry");
                Error::Unavailable("database busy, retry later".into())
            }
            _ => Error::Internal(format!("database error: {err}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        tracing::warn!(error = %err, "no database connection available");
        Error::Unavailable("database unavailable, retry later".into())
    }
}

/// The canonical name of a gRPC code (`INVALID_ARGUMENT`), as `StreamError.code` carries
/// it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let (code, reason) = match &err {
            Error::InvalidArgument(_) => (Code::InvalidArgument, None),
            Error::NotFound { .. } => (Code::NotFound, None),
            Error::AlreadyExists { reason, .. } => (Code::AlreadyExists, Some(*reason)),
            Error::FailedPrecondition { reason, .. } => (Code::FailedPrecondition, Some(*reason)),
            Error::ResourceExhausted(_) => (Code::ResourceExhausted, None),
            Error::Unavailable(_) => (Code::Unavailable, None),
            Error::Unauthenticated(_) => (Code::Unauthenticated, None),
            Error::PermissionDenied(_) => (Code::PermissionDenied, None),
            Error::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                (Code::Internal, None)
            }
        };
        let mut status = Status::new(code, err.to_string());
        if let Some(reason) = reason {
            status.metadata_mut().insert(
                REASON_METADATA_KEY,
                reason.parse().expect("reason codes are ASCII constants"),
            );
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use agentrun_shared::error::reason;

    use super::*;

    #[test]
    fn lease_lost_carries_its_reason() {
        let status = Status::from(Error::precondition(
            reason::LEASE_LOST,
            "epoch 3 is not current",
        ));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "lease_lost: epoch 3 is not current");
        assert_eq!(
            status.metadata().get(REASON_METADATA_KEY).unwrap(),
            "lease_lost"
        );
    }

    #[test]
    fn internal_details_stay_inside() {
        let status = Status::from(Error::Internal("relation runs is on fire".into()));
        assert_eq!(status.message(), "internal error");
        let status = Status::from(Error::invalid("run_id", "is not a valid UUID"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid run_id: is not a valid UUID");
    }
}
