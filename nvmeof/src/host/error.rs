//! Host errors, classified so that the engine can act on them without
//! matching on strings: retry elsewhere on a path failure, reconstruct on a
//! media error, give up on an invalid request.

use std::time::Duration;

use crate::nvme::{Status, StatusCode, StatusCodeType};
use crate::tcp::PduError;

/// What kind of failure an error is, for the caller's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The connection to the controller failed or is being re-established;
    /// the command may or may not have been executed. Retryable.
    Path,
    /// The controller reported a media or data integrity error for the data.
    Media,
    /// The request itself is wrong (bad LBA range, size, namespace, opcode).
    InvalidRequest,
    /// The command did not complete in time; the connection was reset.
    Timeout,
    /// The controller failed the command for another reason.
    Controller,
    /// The controller handle was shut down or gave up reconnecting.
    Closed,
}

/// A host-side failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HostError {
    /// The path to the controller is down (connection closed, reset,
    /// reconnecting, or refused).
    #[error("path failure: {0}")]
    Path(String),
    /// A command timed out.
    #[error("{command} timed out after {after:?}")]
    Timeout {
        /// The command.
        command: &'static str,
        /// How long it waited.
        after: Duration,
    },
    /// The controller completed a command with an error status.
    #[error("{command} failed: {status}")]
    Status {
        /// The command.
        command: &'static str,
        /// Its completion status.
        status: Status,
    },
    /// The caller asked for something impossible; nothing was sent.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The controller broke the NVMe/TCP protocol (the connection is reset).
    #[error("protocol violation by controller: {0}")]
    Protocol(String),
    /// Connecting, initializing or identifying the controller failed in a way
    /// a retry will not fix (wrong NQN, host not allowed, unusable limits).
    #[error("controller setup failed: {0}")]
    Setup(String),
    /// The handle is closed.
    #[error("controller closed: {0}")]
    Closed(String),
}

impl From<PduError> for HostError {
    fn from(e: PduError) -> Self {
        HostError::Protocol(e.to_string())
    }
}

impl HostError {
    /// Classifies the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HostError::Path(_) | HostError::Protocol(_) => ErrorKind::Path,
            HostError::Timeout { .. } => ErrorKind::Timeout,
            HostError::InvalidRequest(_) => ErrorKind::InvalidRequest,
            HostError::Setup(_) | HostError::Closed(_) => ErrorKind::Closed,
            HostError::Status { status, .. } => classify_status(status),
        }
    }

    /// Whether sending the same command again (on this or another path) can
    /// succeed.
    pub fn is_retryable(&self) -> bool {
        match self.kind() {
            ErrorKind::Path | ErrorKind::Timeout => true,
            ErrorKind::Controller => {
                matches!(self, HostError::Status { status, .. } if !status.dnr)
            }
            _ => false,
        }
    }

    /// The NVMe status, if the controller returned one.
    pub fn status(&self) -> Option<Status> {
        match self {
            HostError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

fn classify_status(s: &Status) -> ErrorKind {
    match s.code.sct {
        StatusCodeType::Path => ErrorKind::Path,
        StatusCodeType::MediaError => ErrorKind::Media,
        StatusCodeType::Generic => match s.code {
            StatusCode::TRANSIENT_TRANSPORT_ERROR | StatusCode::NAMESPACE_NOT_READY => {
                ErrorKind::Path
            }
            StatusCode::INVALID_OPCODE
            | StatusCode::INVALID_FIELD
            | StatusCode::INVALID_NAMESPACE
            | StatusCode::LBA_OUT_OF_RANGE
            | StatusCode::CAPACITY_EXCEEDED
            | StatusCode::DATA_SGL_LENGTH_INVALID
            | StatusCode::SGL_TYPE_INVALID
            | StatusCode::NAMESPACE_WRITE_PROTECTED => ErrorKind::InvalidRequest,
            StatusCode::DATA_TRANSFER_ERROR => ErrorKind::Media,
            _ => ErrorKind::Controller,
        },
        _ => ErrorKind::Controller,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let st = |c| HostError::Status {
            command: "read",
            status: Status::new(c),
        };
        assert_eq!(
            st(StatusCode::LBA_OUT_OF_RANGE).kind(),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            st(StatusCode::UNRECOVERED_READ_ERROR).kind(),
            ErrorKind::Media
        );
        assert_eq!(st(StatusCode::HOST_PATH_ERROR).kind(), ErrorKind::Path);
        assert_eq!(
            st(StatusCode::TRANSIENT_TRANSPORT_ERROR).kind(),
            ErrorKind::Path
        );
        assert_eq!(st(StatusCode::INTERNAL_ERROR).kind(), ErrorKind::Controller);
        assert!(st(StatusCode::INTERNAL_ERROR).is_retryable());
        let dnr = HostError::Status {
            command: "read",
            status: Status::new(StatusCode::INTERNAL_ERROR).dnr(),
        };
        assert!(!dnr.is_retryable());
        assert!(HostError::Path("x".into()).is_retryable());
        assert!(HostError::Timeout {
            command: "read",
            after: Duration::from_secs(1)
        }
        .is_retryable());
        assert!(!HostError::InvalidRequest("x".into()).is_retryable());
        assert_eq!(HostError::Closed("x".into()).kind(), ErrorKind::Closed);
    }
}
