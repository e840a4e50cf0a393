//! State and metadata (DMD §1–§2): the relational source of truth, behind one trait.
//!
//! Writes that move a run forward go through [`Store::commit`] as one [`Batch`]: all or nothing,
//! each update compare-and-set on the row's `version`, the whole batch fenced by the writer's
//! run lease when it has one.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod access;

pub use access::{ApiToken, IdempotencyRecord, ProjectScope};

use crate::domain::{
    ApiTokenId, Artifact, ArtifactId, Execution, ExecutionId, ExecutionStatus, Job, JobId,
    JobStatus, JobStep, Pipeline, PipelineId, PipelineRun, Project, ProjectId, Repository,
    RepositoryId, RunId, RunPhase, RunStatus, StepId, StepStatus, Trigger,
};
use crate::error::BoxError;
use crate::time::Timestamp;

mod ensure;

pub use ensure::{PipelineSource, ensure_pipeline};

/// A page of results and the cursor for the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, newest first (descending id; ids are UUID v7).
    pub items: Vec<T>,
    /// Pass this as [`PageRequest::cursor`] for the next page; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Which page to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// At most this many items (1..=1000; larger values are clamped to 1000).
    pub limit: u32,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageRequest {
    /// The largest page a store returns.
    pub const MAX_LIMIT: u32 = 1000;

    /// The first page of `limit` items.
    pub fn first(limit: u32) -> Self {
        Self {
            limit,
            cursor: None,
        }
    }

    /// The limit clamped to `1..=MAX_LIMIT`.
    pub fn clamped_limit(&self) -> u32 {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self::first(50)
    }
}

/// Filters for [`Store::list_runs`]; `None` fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Runs of this pipeline.
    pub pipeline_id: Option<PipelineId>,
    /// Runs with this status.
    pub status: Option<RunStatus>,
    /// Runs of this branch or ref (`git_ref`).
    pub git_ref: Option<String>,
    /// Runs with this trigger.
    pub trigger: Option<Trigger>,
}

/// A new run with its jobs and steps, inserted in one transaction by [`Store::create_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRun {
    /// The run, `version` 0, status `pending`.
    pub run: PipelineRun,
    /// Its jobs.
    pub jobs: Vec<Job>,
    /// Its steps.
    pub steps: Vec<JobStep>,
}

/// Everything stored about one run: what the orchestrator is rebuilt from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    /// The run.
    pub run: PipelineRun,
    /// Its jobs, in stage order.
    pub jobs: Vec<Job>,
    /// Its steps, by job then `execution_order`.
    pub steps: Vec<JobStep>,
    /// Its executions, by step then attempt.
    pub executions: Vec<Execution>,
    /// Artifacts its jobs produced, oldest first (a retry's inherited artifacts too:
    /// `orchestrator::run_artifacts`).
    pub artifacts: Vec<Artifact>,
}

/// Something that happened to a run, recorded in the same transaction as the state change
/// (the outbox). Consumers read them in `seq` order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEvent {
    /// The run.
    pub run_id: RunId,
    /// When.
    pub at: Timestamp,
    /// What.
    pub kind: RunEventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RunEventKind {
    /// The run's status or phase changed.
    RunChanged {
        /// New status.
        status: RunStatus,
        /// New phase.
        phase: RunPhase,
    },
    /// A job's status changed.
    JobChanged {
        /// Job.
        job_id: JobId,
        /// New status.
        status: JobStatus,
    },
    /// A step's status changed.
    StepChanged {
        /// Step.
        step_id: StepId,
        /// New status.
        status: StepStatus,
        /// Its attempt.
        attempt: u32,
    },
    /// An execution's status changed.
    ExecutionChanged {
        /// Execution.
        execution_id: ExecutionId,
        /// New status.
        status: ExecutionStatus,
    },
    /// An artifact was registered.
    ArtifactRegistered {
        /// Artifact.
        artifact_id: ArtifactId,
    },
}

/// An event as stored, with its global position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Position in the store's event log, increasing, from 1.
    pub seq: u64,
    /// The event.
    pub event: RunEvent,
}

/// One write of a [`Batch`].
///
/// Updates carry the row's full new mutable fields and the version the writer last saw. A
/// store applies an update when the stored version equals `expected_version` (and then stores
/// `expected_version + 1`); when the stored row already holds exactly these fields the update
/// is an idempotent replay and succeeds without change; otherwise the batch fails with
/// [`StoreError::Conflict`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Update a run's status and phase.
    UpdateRun {
        /// Run.
        id: RunId,
        /// Version the writer saw.
        expected_version: u64,
        /// New status.
        status: RunStatus,
        /// New phase.
        phase: RunPhase,
        /// Start time.
        started_at: Option<Timestamp>,
        /// End time.
        finished_at: Option<Timestamp>,
    },
    /// Update a job.
    UpdateJob {
        /// Job.
        id: JobId,
        /// Version the writer saw.
        expected_version: u64,
        /// New status.
        status: JobStatus,
        /// Start time.
        started_at: Option<Timestamp>,
        /// End time.
        finished_at: Option<Timestamp>,
    },
    /// Update a step.
    UpdateStep {
        /// Step.
        id: StepId,
        /// Version the writer saw.
        expected_version: u64,
        /// New status.
        status: StepStatus,
        /// Current attempt.
        attempt: u32,
        /// Start time.
        started_at: Option<Timestamp>,
        /// End time.
        finished_at: Option<Timestamp>,
    },
    /// Insert an execution (version 0). Inserting an identical row again is a no-op; a
    /// different row under the same id is `AlreadyExists`.
    InsertExecution(Execution),
    /// Update an execution.
    UpdateExecution {
        /// Execution.
        id: ExecutionId,
        /// Version the writer saw.
        expected_version: u64,
        /// New status.
        status: ExecutionStatus,
        /// The executor's id for it.
        external_id: String,
        /// Exit code.
        exit_code: Option<i32>,
        /// Failure reason.
        failure: Option<String>,
        /// End time.
        completed_at: Option<Timestamp>,
    },
    /// Register artifact metadata. Identical re-registration is a no-op; a different row under
    /// the same id is `AlreadyExists`.
    InsertArtifact(Artifact),
    /// Append to the event log.
    AppendEvent(RunEvent),
}

/// Proof that the writer holds a run's lease: the batch fails with [`StoreError::Fenced`] when
/// another writer has claimed the run since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The run.
    pub run_id: RunId,
    /// The lease epoch the writer holds.
    pub epoch: u64,
}

/// Writes committed together: all or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Fences checked before any write; every fenced run must still be held at its epoch.
    pub fences: Vec<Fence>,
    /// The writes, applied in order.
    pub writes: Vec<Write>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// A driver's claim on a run: while it holds an unexpired lease, no other driver claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLease {
    /// The run.
    pub run_id: RunId,
    /// Who holds it (one id per driver process).
    pub owner: String,
    /// Incremented by every claim: the fencing token.
    pub epoch: u64,
    /// When it expires, by the store's clock.
    pub expires_at: Timestamp,
}

impl RunLease {
    /// The fence for batches written under this lease.
    pub fn fence(&self) -> Fence {
        Fence {
            run_id: self.run_id,
            epoch: self.epoch,
        }
    }
}

/// A worker's claim on one queued execution (pull-based workers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionClaim {
    /// The execution.
    pub execution_id: ExecutionId,
    /// Its step.
    pub step_id: StepId,
    /// Its attempt.
    pub attempt: u32,
    /// Who holds it.
    pub worker: String,
    /// When it expires, by the store's clock.
    pub expires_at: Timestamp,
}

/// Errors of a [`Store`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such row.
    #[error("{what} {id} not found")]
    NotFound {
        /// `project`, `run`, ...
        what: &'static str,
        /// The id or name looked up.
        id: String,
    },
    /// A row with this id or unique name exists and differs.
    #[error("{what} {id} already exists")]
    AlreadyExists {
        /// `project`, `execution`, ...
        what: &'static str,
        /// The id or name.
        id: String,
    },
    /// A compare-and-set lost: someone else updated the row first.
    #[error("{what} {id} was changed concurrently (expected version {expected}, found {found})")]
    Conflict {
        /// `run`, `job`, `step`, `execution`.
        what: &'static str,
        /// The id.
        id: String,
        /// Version the writer saw.
        expected: u64,
        /// Version stored.
        found: u64,
    },
    /// The writer's lease on a run was taken over: it must stop writing for that run.
    #[error("lease on run {run_id} is held at epoch {current}, writer has {epoch}")]
    Fenced {
        /// The run.
        run_id: RunId,
        /// The writer's epoch.
        epoch: u64,
        /// The stored epoch.
        current: u64,
    },
    /// A lease or claim that is no longer held by the caller.
    #[error("lease on {what} {id} is no longer held by {owner}")]
    LeaseLost {
        /// `run` or `execution`.
        what: &'static str,
        /// The id.
        id: String,
        /// The caller.
        owner: String,
    },
    /// The request is malformed (a reference to a missing row, an invalid cursor).
    #[error("invalid request: {message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// The database cannot be reached now; nothing was committed by the failed call.
    #[error("store is unavailable")]
    Unavailable {
        /// Cause.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("{backend} store failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Cause.
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    /// `NotFound` for the `what` (`"run"`, `"project"`, ...) named `id`.
    pub fn not_found(what: &'static str, id: impl fmt::Display) -> Self {
        StoreError::NotFound {
            what,
            id: id.to_string(),
        }
    }

    /// `AlreadyExists` for the `what` named `id`.
    pub fn already_exists(what: &'static str, id: impl fmt::Display) -> Self {
        StoreError::AlreadyExists {
            what,
            id: id.to_string(),
        }
    }

    /// `Invalid` with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        StoreError::Invalid {
            message: message.into(),
        }
    }

    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// The state and metadata store.
///
/// # Contract
/// Checked by `conformance::store`:
/// - Every entity created can be loaded back unchanged; creating a project with a taken name,
///   or any row with a taken id, is `AlreadyExists`; a reference to a missing parent is
///   `Invalid` or `NotFound`.
/// - `commit` is atomic, applies updates compare-and-set on `version` (see [`Write`]), treats an
///   identical replay as a no-op, and checks every [`Fence`] before writing.
/// - Lists are ordered by descending id and paginated by cursor without gaps or repeats.
/// - `claim_runs` hands each non-terminal run to at most one owner at a time; a lease expires by
///   the store's clock and the run can then be claimed again with a higher epoch, after which
///   the previous holder's fenced batches fail with `Fenced`.
/// - `claim_executions` hands each queued execution to exactly one worker, once.
/// - API tokens are found by their secret's hash, revoked idempotently, listed newest first;
///   an idempotency record is stored once per (pipeline, key) and never replaced.
///
/// # Errors
/// See [`StoreError`]. `Unavailable` means the call had no effect and may be retried.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Backend name for logs and errors (`postgres`, `sqlite`, `memory`).
    fn backend(&self) -> &'static str;

    /// The store's clock: lease expiry is judged by it, so drivers on skewed machines agree.
    async fn now(&self) -> Result<Timestamp, StoreError>;

    /// Inserts a project.
    async fn create_project(&self, project: &Project) -> Result<(), StoreError>;
    /// Loads a project.
    async fn get_project(&self, id: ProjectId) -> Result<Project, StoreError>;
    /// Loads a project by its unique name.
    async fn get_project_by_name(&self, name: &str) -> Result<Project, StoreError>;
    /// Lists projects.
    async fn list_projects(&self, page: &PageRequest) -> Result<Page<Project>, StoreError>;

    /// Inserts a repository.
    async fn create_repository(&self, repository: &Repository) -> Result<(), StoreError>;
    /// Loads a repository.
    async fn get_repository(&self, id: RepositoryId) -> Result<Repository, StoreError>;
    /// Lists repositories, optionally of one project.
    async fn list_repositories(
        &self,
        project: Option<ProjectId>,
        page: &PageRequest,
    ) -> Result<Page<Repository>, StoreError>;

    /// Inserts a pipeline.
    async fn create_pipeline(&self, pipeline: &Pipeline) -> Result<(), StoreError>;
    /// Loads a pipeline.
    async fn get_pipeline(&self, id: PipelineId) -> Result<Pipeline, StoreError>;
    /// Lists pipelines, optionally of one repository.
    async fn list_pipelines(
        &self,
        repository: Option<RepositoryId>,
        page: &PageRequest,
    ) -> Result<Page<Pipeline>, StoreError>;

    /// Inserts a run with its jobs and steps in one transaction.
    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError>;
    /// Loads a run.
    async fn get_run(&self, id: RunId) -> Result<PipelineRun, StoreError>;
    /// Loads a run with everything that belongs to it.
    async fn load_run(&self, id: RunId) -> Result<RunRecord, StoreError>;
    /// Lists runs.
    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest,
    ) -> Result<Page<PipelineRun>, StoreError>;
    /// The jobs of a run, in stage order.
    async fn list_jobs(&self, run: RunId) -> Result<Vec<Job>, StoreError>;
    /// The steps of a job, in `execution_order`.
    async fn list_steps(&self, job: JobId) -> Result<Vec<JobStep>, StoreError>;
    /// The executions of a step, by attempt.
    async fn list_executions(&self, step: StepId) -> Result<Vec<Execution>, StoreError>;
    /// Loads an execution.
    async fn get_execution(&self, id: ExecutionId) -> Result<Execution, StoreError>;

    /// Loads artifact metadata.
    async fn get_artifact(&self, id: ArtifactId) -> Result<Artifact, StoreError>;
    /// The artifacts of a run, oldest first.
    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError>;
    /// Every artifact, newest first (for retention and listings).
    async fn list_all_artifacts(&self, page: &PageRequest) -> Result<Page<Artifact>, StoreError>;

    /// Applies a batch atomically.
    async fn commit(&self, batch: &Batch) -> Result<(), StoreError>;

    /// Events after `after_seq`, at most `limit`, in order.
    async fn list_events(&self, after_seq: u64, limit: u32)
    -> Result<Vec<StoredEvent>, StoreError>;

    /// Claims up to `limit` non-terminal runs that no one holds or whose lease expired.
    async fn claim_runs(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<RunLease>, StoreError>;
    /// Extends leases still held by their owner; returns the renewed ones. Leases that were
    /// lost (expired and claimed by another) are left out.
    async fn renew_leases(
        &self,
        leases: &[RunLease],
        ttl: Duration,
    ) -> Result<Vec<RunLease>, StoreError>;
    /// Gives a lease up (a finished run, a shutting-down driver).
    async fn release_lease(&self, lease: &RunLease) -> Result<(), StoreError>;

    /// Claims up to `limit` queued executions (status `pending`, `executor_type` equal to
    /// `executor_type`, never claimed before) for a pull worker.
    async fn claim_executions(
        &self,
        executor_type: &str,
        worker: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<ExecutionClaim>, StoreError>;
    /// Extends an execution claim still held by its worker.
    async fn renew_execution_claim(
        &self,
        claim: &ExecutionClaim,
        ttl: Duration,
    ) -> Result<ExecutionClaim, StoreError>;
    /// Executions whose claim expired by the store's clock and are not terminal: their
    /// workers are presumed lost. Each is returned once.
    async fn take_expired_execution_claims(&self) -> Result<Vec<ExecutionClaim>, StoreError>;

    /// Inserts an API token. A taken id or secret hash is `AlreadyExists`.
    async fn create_api_token(&self, token: &ApiToken) -> Result<(), StoreError>;
    /// Every API token, revoked ones included, newest first.
    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>, StoreError>;
    /// The token whose secret hashes to `secret_sha256` (revoked or not); `NotFound` otherwise.
    async fn find_api_token(&self, secret_sha256: &str) -> Result<ApiToken, StoreError>;
    /// Revokes a token at `at` and returns it; revoking a revoked token keeps its first
    /// revocation time. `NotFound` for an unknown id.
    async fn revoke_api_token(&self, id: ApiTokenId, at: Timestamp)
    -> Result<ApiToken, StoreError>;
    /// Records that a token was used at `at`. `NotFound` for an unknown id.
    async fn touch_api_token(&self, id: ApiTokenId, at: Timestamp) -> Result<(), StoreError>;

    /// Records `record` unless its (pipeline, key) is already recorded, and returns the
    /// record stored for that (pipeline, key): `record` itself, or the earlier one, whose
    /// fingerprint and run the caller compares. A missing pipeline or run is `Invalid` or
    /// `NotFound`.
    async fn put_idempotency_record(
        &self,
        record: &IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError>;
    /// The record of (pipeline, key), if any.
    async fn get_idempotency_record(
        &self,
        pipeline: PipelineId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError>;

    /// Records that `by` asked at `at` to cancel `run`, for whichever driver owns the run: the
    /// request outlives the process that took it, and a driver on another replica acts on it
    /// (see [`cancel_requests`](Store::cancel_requests)). Stores that announce new work wake
    /// their drivers. Idempotent: the first request of a run is kept. `NotFound` for an
    /// unknown run; a request on an ended run is recorded and changes nothing.
    async fn request_cancel(&self, run: RunId, by: &str, at: Timestamp) -> Result<(), StoreError>;
    /// Which of `runs` have a cancel request, in no particular order.
    async fn cancel_requests(&self, runs: &[RunId]) -> Result<Vec<RunId>, StoreError>;
}
