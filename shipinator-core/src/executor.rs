//! The contract between the control plane and an execution substrate (TDD §6.0, DMD §5).
//!
//! Executors translate platform signals (process exits, Kubernetes Job conditions) into the
//! generic [`ExecutionState`]; nothing platform-specific crosses this boundary.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::domain::{ArtifactId, ArtifactType, ExecutionId, JobId, JobType, RunId, StepId};
use crate::error::BoxError;
use crate::logs::LogLine;

/// Where a run's source comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// `file://`, `https://` or `ssh://` URL of the repository, or a local directory path
    /// when `copy_working_tree` is set.
    pub clone_url: String,
    /// The exact commit to check out (may be empty for a non-git directory).
    pub commit: String,
    /// Branch or ref name, for information.
    pub git_ref: String,
    /// Copy the working tree at `clone_url` instead of cloning (`shipinator run --dirty`, or a
    /// directory that is not a git repository).
    pub copy_working_tree: bool,
}

/// The workspace a step runs in. All steps of one stage of one run share it, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkspaceRef {
    /// A relative, slash-separated key unique to (run, stage): `<run-id>/<stage>`.
    pub key: String,
}

impl WorkspaceRef {
    /// The workspace of `stage` in `run`.
    pub fn for_stage(run: RunId, stage: JobType) -> Self {
        Self {
            key: format!("{run}/{stage}"),
        }
    }
}

/// An artifact of an earlier stage that must be present in the workspace before the step runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputArtifact {
    /// The artifact to fetch from the artifact store.
    pub id: ArtifactId,
    /// Its type.
    pub artifact_type: ArtifactType,
    /// `sha256:<hex>` to verify after fetching.
    pub checksum: Option<String>,
    /// Where to place it, relative to the workspace root; `None` for reference-only artifacts
    /// (an OCI image known only by ref).
    pub path: Option<String>,
    /// The output name in the config, if any.
    pub name: Option<String>,
}

/// An output the step declared; the worker collects it after a successful command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputDecl {
    /// Type.
    pub artifact_type: ArtifactType,
    /// Rendered path relative to the workspace (files).
    pub path: Option<String>,
    /// Rendered image reference (OCI images).
    pub image_ref: Option<String>,
    /// The output's name in the config.
    pub name: Option<String>,
}

/// Everything an executor needs to run one attempt of one step (DMD §5.1, extended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionSpec {
    /// Deterministic id derived from (step, attempt): submitting it twice is harmless.
    pub execution_id: ExecutionId,
    /// Run.
    pub run_id: RunId,
    /// Job (stage).
    pub job_id: JobId,
    /// Step.
    pub step_id: StepId,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Stage type.
    pub stage: JobType,
    /// Step name.
    pub step_name: String,
    /// Container image, where the executor uses images.
    pub image: Option<String>,
    /// The command, e.g. `["sh", "-c", "make build"]`.
    pub command: Vec<String>,
    /// Environment, including every `SHIPINATOR_*` variable.
    pub env: BTreeMap<String, String>,
    /// Working directory relative to the workspace root.
    pub workdir: Option<String>,
    /// Wall-clock limit for the command.
    pub timeout: Option<Duration>,
    /// The stage's shared workspace.
    pub workspace: WorkspaceRef,
    /// What to clone into the workspace when it is prepared; `None` for deploys (which consume
    /// artifacts, never source).
    pub source: Option<SourceSpec>,
    /// Artifacts of earlier stages to materialize before the first step of the stage runs.
    pub inputs: Vec<InputArtifact>,
    /// Outputs to collect after the command succeeds.
    pub outputs: Vec<OutputDecl>,
}

/// The executor's name for a submitted execution.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExecHandle {
    /// The execution.
    pub execution_id: ExecutionId,
    /// Executor-specific id (process id and start time, Kubernetes Job name, ...).
    pub external_id: String,
}

/// An artifact a finished execution produced and already stored in the artifact store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducedArtifact {
    /// Id under which the bytes were stored (or reserved, for reference-only artifacts).
    pub id: ArtifactId,
    /// Type.
    pub artifact_type: ArtifactType,
    /// Output name from the config.
    pub name: Option<String>,
    /// Declared path relative to the workspace.
    pub path: Option<String>,
    /// Backend the bytes went to (`nfs`, `s3`, `memory`, `none` for reference-only).
    pub storage_backend: String,
    /// Where within the backend.
    pub storage_path: String,
    /// `sha256:<hex>`.
    pub checksum: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Extra metadata (image ref and digest, test counts).
    pub metadata: BTreeMap<String, String>,
}

/// How a finished execution ended (DMD §4.3's callback payload, typed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionResult {
    /// The command's exit code; 0 means success.
    pub exit_code: i32,
    /// Where the logs are (`logs://<execution-id>` for a `LogStore`).
    pub logs_uri: Option<String>,
    /// Artifacts collected after a successful command.
    pub artifacts: Vec<ProducedArtifact>,
    /// Why it failed when the reason is not the exit code alone (timeout, output missing).
    pub failure: Option<String>,
}

/// The generic state of an execution, as an executor reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ExecutionState {
    /// Accepted, not yet running.
    Pending,
    /// Running.
    Running,
    /// The command ran to completion (successfully or not): a user outcome, never retried.
    Finished(ExecutionResult),
    /// Cancelled through [`Executor::cancel`].
    Canceled,
    /// The substrate lost it (pod evicted, node lost, process vanished): an infrastructure
    /// failure, which the engine retries.
    Lost {
        /// What happened.
        reason: String,
    },
}

impl ExecutionState {
    /// Whether this state can no longer change.
    pub fn is_terminal(&self) -> bool {
        match self {
            ExecutionState::Finished(_)
            | ExecutionState::Canceled
            | ExecutionState::Lost { .. } => true,
            ExecutionState::Pending | ExecutionState::Running => false,
        }
    }
}

/// A state change pushed by an executor (or by an HTTP callback) rather than polled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionReport {
    /// The execution.
    pub execution_id: ExecutionId,
    /// Its new state.
    pub state: ExecutionState,
}

/// A stream of log lines.
pub type LogLineStream = Pin<Box<dyn Stream<Item = Result<LogLine, ExecutorError>> + Send>>;

/// A stream of pushed reports.
pub type ReportStream = Pin<Box<dyn Stream<Item = ExecutionReport> + Send>>;

/// Errors of an [`Executor`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    /// The executor does not know this execution (never submitted, or forgotten).
    #[error("execution {id} is unknown to the executor")]
    NotFound {
        /// The execution.
        id: ExecutionId,
    },
    /// The executor refused the spec (bad image name, invalid resources): retrying the same
    /// spec will not help.
    #[error("executor refused execution {id}: {reason}")]
    Rejected {
        /// The execution.
        id: ExecutionId,
        /// Why.
        reason: String,
    },
    /// An object with this execution's name exists but belongs to someone else.
    #[error("execution {id} collides with an object the executor does not own: {detail}")]
    Ownership {
        /// The execution.
        id: ExecutionId,
        /// What was found.
        detail: String,
    },
    /// The substrate cannot be reached now; retry later.
    #[error("executor is unavailable")]
    Unavailable {
        /// Cause.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("{backend} executor failed")]
    Backend {
        /// Which executor.
        backend: &'static str,
        /// Cause.
        #[source]
        source: BoxError,
    },
}

/// Runs executions somewhere else: local processes, containers, Kubernetes Jobs.
///
/// # Contract
/// Checked by `conformance::executor`:
/// - `submit` of an execution id that was already submitted returns a handle to the existing
///   execution and starts nothing new.
/// - `cancel` of an execution that already ended is a no-op returning `Ok`.
/// - `status` works for any handle returned by `submit`, including after the executor object
///   was dropped and built again over the same substrate (engine restart), where the substrate
///   allows it; an execution that cannot be found then is reported as `Lost`, not as an error.
/// - `logs` yields an execution's lines in sequence order from `from_seq`.
/// - `reports`, when provided, yields a report for every execution that reaches a terminal
///   state; the driver still polls `status` as a fallback.
///
/// # Errors
/// See [`ExecutorError`]: `Unavailable` is retried by the driver with backoff; `Rejected`
/// fails the attempt as an infrastructure failure.
#[async_trait::async_trait]
pub trait Executor: Send + Sync + fmt::Debug {
    /// Short name stored in `executions.executor_type` (`local`, `kubernetes`, `mock`).
    fn kind(&self) -> &'static str;

    /// Starts (or adopts) an execution.
    async fn submit(&self, spec: &ExecutionSpec) -> Result<ExecHandle, ExecutorError>;

    /// [`submit`](Self::submit) with a spec the caller shares (the driver submits this way):
    /// an executor that keeps the spec overrides it to keep the `Arc` instead of a copy.
    async fn submit_shared(&self, spec: Arc<ExecutionSpec>) -> Result<ExecHandle, ExecutorError> {
        self.submit(&spec).await
    }

    /// The current state of an execution.
    async fn status(&self, handle: &ExecHandle) -> Result<ExecutionState, ExecutorError>;

    /// Stops an execution; a no-op if it already ended.
    async fn cancel(&self, handle: &ExecHandle) -> Result<(), ExecutorError>;

    /// The execution's log lines from sequence number `from_seq` (inclusive); the stream ends
    /// when the execution has ended and every line was yielded.
    async fn logs(
        &self,
        handle: &ExecHandle,
        from_seq: u64,
    ) -> Result<LogLineStream, ExecutorError>;

    /// Pushed state changes, when the executor can push them. Called once by the driver.
    fn reports(&self) -> Option<ReportStream> {
        None
    }
}
