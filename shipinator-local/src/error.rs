//! The crate's error type.

use std::path::PathBuf;

use shipinator_core::artifact::ArtifactError;
use shipinator_core::domain::ArtifactId;
use shipinator_core::executor::ExecutorError;
use shipinator_core::logs::LogError;

/// Everything that can go wrong in the worker or the local executor.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A filesystem or process operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A git helper command failed.
    #[error("`git {args}` failed ({status}): {stderr}")]
    Git {
        /// The arguments.
        args: String,
        /// How it ended.
        status: String,
        /// The last lines of its standard error.
        stderr: String,
    },
    /// The repository URL uses a protocol the worker does not clone from.
    #[error(
        "refusing to clone '{url}': only file://, https:// and ssh:// URLs (or a local path) are allowed"
    )]
    ProtocolNotAllowed {
        /// The URL.
        url: String,
    },
    /// A path in the spec is absolute or leaves the workspace.
    #[error("path '{path}' must be relative and stay inside the workspace")]
    UnsafePath {
        /// The offending path.
        path: String,
    },
    /// An input artifact's bytes do not match its recorded checksum.
    #[error("input artifact {id} at '{path}' is corrupt: expected {expected}, got {actual}")]
    ChecksumMismatch {
        /// The artifact.
        id: ArtifactId,
        /// Where it was to be placed.
        path: String,
        /// The recorded checksum.
        expected: String,
        /// What was fetched.
        actual: String,
    },
    /// A declared output was not produced by the step.
    #[error("declared {artifact_type} output '{path}' was not produced by the step")]
    OutputMissing {
        /// Its type.
        artifact_type: String,
        /// Its path relative to the workspace.
        path: String,
    },
    /// A declared output is not usable as declared.
    #[error("declared output '{path}' is invalid: {reason}")]
    OutputInvalid {
        /// Its path relative to the workspace.
        path: String,
        /// Why.
        reason: String,
    },
    /// The artifact store failed.
    #[error("artifact store: {context}")]
    Artifact {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: ArtifactError,
    },
    /// The log store failed.
    #[error("log store")]
    Log {
        /// Cause.
        #[source]
        source: LogError,
    },
    /// A workspace key that cannot name a directory.
    #[error("invalid workspace key '{key}'")]
    InvalidWorkspaceKey {
        /// The key.
        key: String,
    },
    /// The executor was built without a required part.
    #[error("the local executor needs {what}; set it on the builder")]
    Builder {
        /// What is missing.
        what: &'static str,
    },
    /// The execution's spec is unusable.
    #[error("{reason}")]
    Spec {
        /// Why.
        reason: String,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn artifact(context: impl Into<String>, source: ArtifactError) -> Self {
        Self::Artifact {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io_at(what: &str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::io(format!("{what} {}", path.display()), source)
    }
}

impl From<LogError> for Error {
    fn from(source: LogError) -> Self {
        Self::Log { source }
    }
}

impl From<Error> for ExecutorError {
    fn from(e: Error) -> Self {
        ExecutorError::Backend {
            backend: "local",
            source: Box::new(e),
        }
    }
}

/// The error and its causes as one line: `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// A path relative to some root that was checked to stay inside it.
pub(crate) fn safe_join(root: &std::path::Path, rel: &str) -> Result<PathBuf, Error> {
    use std::path::Component;
    let rel_path = std::path::Path::new(rel);
    let mut out = root.to_path_buf();
    let mut depth = 0usize;
    for comp in rel_path.components() {
        match comp {
            Component::Normal(c) => {
                out.push(c);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Error::UnsafePath {
                    path: rel.to_owned(),
                });
            }
        }
    }
    if depth == 0 {
        return Err(Error::UnsafePath {
            path: rel.to_owned(),
        });
    }
    Ok(out)
}
