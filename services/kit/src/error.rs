//! The domain error every service returns, and its one mapping to `tonic::Status`.
//!
//! Handlers return `Result<_, ServiceError>`; the conversion below is the only place a gRPC code
//! is chosen. Internal errors are logged with their cause and reach the client as a plain
//! "internal error", so storage details never leak.

use std::error::Error as StdError;

use tonic::{Code, Status};

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error while {doing}: {source}")]
    Internal {
        doing: &'static str,
        #[source]
        source: BoxError,
    },
}

impl ServiceError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn not_found(what: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound {
            what,
            id: id.into(),
        }
    }

    pub fn internal(doing: &'static str, source: impl Into<BoxError>) -> Self {
        Self::Internal {
            doing,
            source: source.into(),
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Aborted(_) => Code::Aborted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::Internal { .. } => Code::Internal,
        }
    }
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Status {
        match &err {
            ServiceError::Internal { .. } => {
                tracing::error!(error = %err, source = ?StdError::source(&err), "internal error");
                Status::internal("internal error")
            }
            ServiceError::InvalidArgument { field, .. } => {
                let mut status = Status::new(Code::InvalidArgument, err.to_string());
                // The gateway turns this into the `details` of its JSON error.
                if let Ok(v) = field.parse() {
                    status.metadata_mut().insert("x-shopverse-field", v);
                }
                status
            }
            _ => Status::new(err.code(), err.to_string()),
        }
    }
}

/// Storage errors are internal unless they say something the caller can act on.
impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        if shopverse_storage::is_busy(&e) {
            return ServiceError::Unavailable("the database is busy; try again".into());
        }
        if shopverse_storage::is_outage(&e) {
            tracing::error!(error = %e, "storage unavailable");
            return ServiceError::Unavailable("storage is unavailable; try again shortly".into());
        }
        ServiceError::internal("talking to the database", e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_codes_and_hides_internals() {
        let s: Status = ServiceError::invalid("email", "not a valid address").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "email: not a valid address");
        let s: Status =
            ServiceError::internal("reading", std::io::Error::other("disk on fire")).into();
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error");
        let full: Status =
            ServiceError::from(sqlx::Error::Io(std::io::Error::other("ENOSPC"))).into();
        assert_eq!(full.code(), Code::Unavailable);
        let missing: Status = ServiceError::from(sqlx::Error::RowNotFound).into();
        assert_eq!(missing.code(), Code::Internal, "a bug, not an outage");
        let s: Status = ServiceError::not_found("product", "p1").into();
        assert_eq!(
            (s.code(), s.message()),
            (Code::NotFound, "product p1 not found")
        );
    }
}
