//! This crate's detailed error, mapped onto [`ExecutorError`] at the trait boundary.

use shipinator_core::domain::ExecutionId;
use shipinator_core::executor::ExecutorError;

/// Errors of the Kubernetes executor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The spec cannot run here.
    #[error("execution {id} rejected: {reason}")]
    Rejected {
        /// The execution.
        id: ExecutionId,
        /// Why.
        reason: String,
    },
    /// A Job with the execution's name exists but is not ours.
    #[error("job {name} exists but does not belong to execution {id}: {detail}")]
    Ownership {
        /// The execution.
        id: ExecutionId,
        /// The Job's name.
        name: String,
        /// What was found.
        detail: String,
    },
    /// The builder lacks a setting.
    #[error("invalid executor configuration: {0}")]
    Config(String),
    /// A call to the API server failed.
    #[error("kubernetes API call '{op}' failed")]
    Api {
        /// What was being done.
        op: &'static str,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The API server's client could not be configured.
    #[error("cannot configure the kubernetes client")]
    Client {
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub(crate) fn api(op: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Api { op, source }
    }

    /// Whether retrying later may help (server overloaded, connection failed, timeout).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Api { source, .. } => is_transient(source),
            Error::Rejected { .. }
            | Error::Ownership { .. }
            | Error::Config(_)
            | Error::Client { .. } => false,
        }
    }
}

pub(crate) fn api_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

fn is_transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => {
            status.code >= 500 || status.code == 429 || status.code == 408 || status.code == 0
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

impl From<Error> for ExecutorError {
    fn from(e: Error) -> Self {
        match e {
            Error::Rejected { id, reason } => ExecutorError::Rejected { id, reason },
            Error::Ownership { id, name, detail } => ExecutorError::Ownership {
                id,
                detail: format!("job {name}: {detail}"),
            },
            e if e.is_transient() => ExecutorError::Unavailable {
                source: Box::new(e),
            },
            e => ExecutorError::Backend {
                backend: "kubernetes",
                source: Box::new(e),
            },
        }
    }
}
