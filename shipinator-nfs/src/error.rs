//! The crate's one error type, mapped into core's semantic errors at the trait boundary.

use std::io;
use std::path::PathBuf;

use shipinator_core::artifact::ArtifactError;
use shipinator_core::domain::{ArtifactId, ExecutionId};
use shipinator_core::logs::LogError;
use shipinator_core::store::StoreError;

/// What went wrong in this crate. Trait methods map it into [`ArtifactError`] or [`LogError`];
/// the functions of this crate that are not trait methods return it directly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No artifact with this id.
    #[error("artifact {id} not found")]
    NotFound {
        /// The id.
        id: ArtifactId,
    },
    /// An artifact with this id exists.
    #[error("artifact {id} already exists; artifacts are immutable")]
    AlreadyExists {
        /// The id.
        id: ArtifactId,
    },
    /// The upload is larger than the configured limit.
    #[error("artifact {id} exceeds the size limit of {limit} bytes")]
    TooLarge {
        /// The id.
        id: ArtifactId,
        /// The limit.
        limit: u64,
    },
    /// A range outside the payload.
    #[error("range {start}..{end:?} is outside artifact {id} of {size} bytes")]
    InvalidRange {
        /// The id.
        id: ArtifactId,
        /// Requested start.
        start: u64,
        /// Requested end.
        end: Option<u64>,
        /// Payload size.
        size: u64,
    },
    /// The stored payload does not match its metadata.
    #[error("artifact {id} is corrupt: {detail}")]
    Corrupt {
        /// The id.
        id: ArtifactId,
        /// What does not match.
        detail: String,
    },
    /// The caller's upload stream failed.
    #[error("reading the upload for artifact {id} failed")]
    Upload {
        /// The id.
        id: ArtifactId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A filesystem operation failed.
    #[error("{op} {} failed", path.display())]
    Io {
        /// What was being done (`create`, `rename`, ...).
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A `metadata.json` that cannot be read back.
    #[error("metadata of artifact {id} is unreadable")]
    Metadata {
        /// The id.
        id: ArtifactId,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A stored log line that cannot be parsed.
    #[error("log of execution {id} has an unreadable line at byte {offset}")]
    LogFormat {
        /// The execution.
        id: ExecutionId,
        /// Where the line starts.
        offset: u64,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// A core log error (ordering, closed, not found).
    #[error(transparent)]
    Log(LogError),
    /// The metadata store failed (retention).
    #[error("reading artifact metadata from the store failed")]
    Store {
        /// Cause.
        #[source]
        source: StoreError,
    },
    /// The S3 client failed.
    #[cfg(feature = "s3")]
    #[error("s3 request failed")]
    S3 {
        /// Cause.
        #[source]
        source: object_store::Error,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// A background task panicked or was cancelled.
    #[error("a background task failed")]
    Task {
        /// Cause.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn task(source: tokio::task::JoinError) -> Self {
        Error::Task { source }
    }

    /// Whether an IO error means the volume is unreachable right now (a hung or lost NFS
    /// server) rather than a permanent failure.
    fn is_unavailable(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::TimedOut
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
                    | io::ErrorKind::NetworkDown
            ),
            _ => false,
        }
    }

    pub(crate) fn into_artifact_error(self, backend: &'static str) -> ArtifactError {
        match self {
            Error::NotFound { id } => ArtifactError::NotFound { id },
            Error::AlreadyExists { id } => ArtifactError::AlreadyExists { id },
            Error::TooLarge { id, limit } => ArtifactError::TooLarge { id, limit },
            Error::InvalidRange {
                id,
                start,
                end,
                size,
            } => ArtifactError::InvalidRange {
                id,
                start,
                end,
                size,
            },
            Error::Corrupt { id, detail } => ArtifactError::Corrupt { id, detail },
            Error::Upload { id, source } => ArtifactError::Upload { id, source },
            Error::Metadata { id, source } => ArtifactError::Corrupt {
                id,
                detail: format!("metadata.json: {source}"),
            },
            e if e.is_unavailable() => ArtifactError::Unavailable {
                source: Box::new(e),
            },
            e => ArtifactError::Backend {
                backend,
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn into_log_error(self) -> LogError {
        match self {
            Error::Log(e) => e,
            e if e.is_unavailable() => LogError::Unavailable {
                source: Box::new(e),
            },
            e => LogError::Backend {
                backend: "fs",
                source: Box::new(e),
            },
        }
    }
}
