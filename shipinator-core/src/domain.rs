//! The domain model: typed ids, the enums of every state machine, and one entity per DMD table.
//!
//! Every enum has exactly one stored/wire spelling, given by [`as_str`](RunStatus::as_str) and
//! accepted by [`FromStr`]; serde uses the same spelling.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::time::Timestamp;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// What this id names, as used in error messages (`"run"`, `"step"`, ...).
            pub const WHAT: &'static str = $what;

            /// Wraps a raw UUID.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// The raw UUID.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }

            /// A fresh time-ordered (v7) id. Only the driver, the server and tests call this;
            /// the orchestrator never generates random ids.
            pub fn new_v7() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| ParseIdError {
                    what: $what,
                    input: s.chars().take(64).collect(),
                })
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }
    };
}

/// A string that is not a valid UUID where an id was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {what} id '{input}': expected a UUID such as 0192f0e4-7b3c-7a51-9d2e-1f4a5b6c7d8e"
)]
pub struct ParseIdError {
    /// What kind of id was being parsed.
    pub what: &'static str,
    /// The offending input (truncated to 64 characters).
    pub input: String,
}

id_type!(/// Identifies a [`Project`].
    ProjectId, "project");
id_type!(/// Identifies a [`Repository`].
    RepositoryId, "repository");
id_type!(/// Identifies a [`Pipeline`].
    PipelineId, "pipeline");
id_type!(/// Identifies a [`PipelineRun`].
    RunId, "run");
id_type!(/// Identifies a [`Job`] (one stage of a run).
    JobId, "job");
id_type!(/// Identifies a [`JobStep`].
    StepId, "step");
id_type!(/// Identifies an [`Artifact`].
    ArtifactId, "artifact");
id_type!(/// Identifies an [`Execution`]: one attempt of one step on an executor.
    ExecutionId, "execution");
id_type!(/// Identifies an API token ([`ApiToken`](crate::store::ApiToken)).
    ApiTokenId, "token");

/// The namespace under which deterministic child ids are derived (UUID v5).
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f1b_7c1e_8d2a_4e3b_9a6f_0c4d_2e8b_7a91);

impl JobId {
    /// The deterministic id of a run's job for `stage`: the same run and stage always give the
    /// same id, so the orchestrator never needs a random source.
    pub fn derive(run: RunId, stage: JobType) -> Self {
        // The name is the run id's bytes then the stage's text, built on the stack: ids are
        // derived for every step the orchestrator starts.
        // Stage names are at most 6 bytes (`deploy`); the test below derives every stage.
        let stage = stage.as_str().as_bytes();
        let len = 16 + stage.len();
        let mut name = [0u8; 16 + 16];
        name[..16].copy_from_slice(run.0.as_bytes());
        name[16..len].copy_from_slice(stage);
        Self(Uuid::new_v5(&ID_NAMESPACE, &name[..len]))
    }
}

impl StepId {
    /// The deterministic id of the step at `index` of `job`.
    pub fn derive(job: JobId, index: u32) -> Self {
        let mut name = [0u8; 16 + 5 + 4];
        name[..16].copy_from_slice(job.0.as_bytes());
        name[16..21].copy_from_slice(b"step:");
        name[21..].copy_from_slice(&index.to_be_bytes());
        Self(Uuid::new_v5(&ID_NAMESPACE, &name))
    }
}

impl ExecutionId {
    /// The deterministic id of `attempt` of `step`: a repeated submit of the same attempt uses
    /// the same id, so executors can make submission idempotent.
    pub fn derive(step: StepId, attempt: u32) -> Self {
        let mut name = [0u8; 16 + 5 + 4];
        name[..16].copy_from_slice(step.0.as_bytes());
        name[16..21].copy_from_slice(b"exec:");
        name[21..].copy_from_slice(&attempt.to_be_bytes());
        Self(Uuid::new_v5(&ID_NAMESPACE, &name))
    }
}

/// A text that is not one of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{input}': expected one of {}", .expected.join(", "))]
pub struct ParseEnumError {
    /// Which enum was being parsed.
    pub what: &'static str,
    /// The offending input (truncated to 64 characters).
    pub input: String,
    /// The accepted spellings.
    pub expected: &'static [&'static str],
}

macro_rules! text_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The one stored and wire spelling of this value.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(ParseEnumError {
                        what: $what,
                        input: s.chars().take(64).collect(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }
    };
}

text_enum! {
    /// Status of a pipeline run (DMD `pipeline_runs.status`).
    RunStatus, "run status" {
        /// Created, not yet started.
        Pending = "pending",
        /// At least one job has started and the run has not ended.
        Running = "running",
        /// Every requested stage succeeded.
        Success = "success",
        /// A step failed (or could not be executed) and the run stopped.
        Failed = "failed",
        /// Cancelled on request.
        Canceled = "canceled",
    }
}

text_enum! {
    /// Status of a job (stage), a step or an execution.
    Status, "status" {
        /// Not yet started.
        Pending = "pending",
        /// Started and not yet ended.
        Running = "running",
        /// Ended successfully.
        Succeeded = "succeeded",
        /// Ended unsuccessfully.
        Failed = "failed",
        /// Cancelled before or while running.
        Canceled = "canceled",
        /// Never started because an earlier step or stage failed.
        Skipped = "skipped",
    }
}

/// Status of a job (one stage of a run).
pub type JobStatus = Status;
/// Status of a job step.
pub type StepStatus = Status;
/// Status of an execution (one attempt of one step).
pub type ExecutionStatus = Status;

text_enum! {
    /// Phase of a run (TDD §7.1), derived from its jobs. Failure and cancellation live in
    /// [`RunStatus`] only: a run that failed while testing stays in phase `testing`.
    RunPhase, "run phase" {
        /// Nothing has started.
        Submitted = "submitted",
        /// The build stage is running.
        Building = "building",
        /// The build stage succeeded.
        Built = "built",
        /// The test stage is running.
        Testing = "testing",
        /// The test stage succeeded.
        Tested = "tested",
        /// The deploy stage is running.
        Deploying = "deploying",
        /// The deploy stage succeeded.
        Deployed = "deployed",
    }
}

text_enum! {
    /// What asked for a run.
    Trigger, "trigger" {
        /// A pull request was opened or updated.
        Pr = "pr",
        /// A branch was pushed.
        Push = "push",
        /// A person or script asked (CLI, UI, API).
        Manual = "manual",
    }
}

text_enum! {
    /// The stage a job implements (DMD `jobs.job_type`).
    JobType, "job type" {
        /// Buildinator: produces artifacts.
        Build = "build",
        /// Testinator: tests, produces reports.
        Test = "test",
        /// Deployinator: consumes artifacts, never source.
        Deploy = "deploy",
    }
}

text_enum! {
    /// The type of an artifact (DMD `artifacts.artifact_type`, with the config's names).
    ArtifactType, "artifact type" {
        /// An executable or library.
        Binary = "binary",
        /// An OCI image: an OCI archive payload, or a reference only.
        OciImage = "oci_image",
        /// A packaged Helm chart (`.tgz`).
        HelmChart = "helm_chart",
        /// Kubernetes manifests (YAML).
        K8sManifest = "k8s_manifest",
        /// A test report such as JUnit XML.
        TestReport = "test_report",
        /// A coverage file.
        Coverage = "coverage",
        /// Any other file.
        File = "file",
    }
}

text_enum! {
    /// What an API token may do (ordered: each role includes the ones before it).
    TokenRole, "token role" {
        /// Read runs, jobs, steps, logs and artifacts.
        Viewer = "viewer",
        /// Read, and trigger, cancel and retry runs.
        Developer = "developer",
        /// Everything, including projects, repositories, pipelines and tokens.
        Admin = "admin",
    }
}

impl JobType {
    /// The stages in the order a run executes them.
    pub const ORDER: [JobType; 3] = [JobType::Build, JobType::Test, JobType::Deploy];

    /// The phase a run is in while this stage runs.
    pub const fn running_phase(self) -> RunPhase {
        match self {
            JobType::Build => RunPhase::Building,
            JobType::Test => RunPhase::Testing,
            JobType::Deploy => RunPhase::Deploying,
        }
    }

    /// The phase a run reaches when this stage succeeds.
    pub const fn done_phase(self) -> RunPhase {
        match self {
            JobType::Build => RunPhase::Built,
            JobType::Test => RunPhase::Tested,
            JobType::Deploy => RunPhase::Deployed,
        }
    }
}

impl RunStatus {
    /// Whether no further transition can happen.
    pub const fn is_terminal(self) -> bool {
        match self {
            RunStatus::Success | RunStatus::Failed | RunStatus::Canceled => true,
            RunStatus::Pending | RunStatus::Running => false,
        }
    }
}

impl Status {
    /// Whether no further transition can happen.
    pub const fn is_terminal(self) -> bool {
        match self {
            Status::Succeeded | Status::Failed | Status::Canceled | Status::Skipped => true,
            Status::Pending | Status::Running => false,
        }
    }
}

/// A logical unit of ownership and isolation (DMD §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    /// Id.
    pub id: ProjectId,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last update time.
    pub updated_at: Timestamp,
}

/// A VCS repository mapped into Shipinator (DMD §2.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    /// Id.
    pub id: RepositoryId,
    /// Owning project.
    pub project_id: ProjectId,
    /// `gitea`, `github`, `git`, ...
    pub vcs_provider: String,
    /// Where the worker clones from (`file://`, `https://`, `ssh://`).
    pub clone_url: String,
    /// The branch pushes to which deploy by default.
    pub default_branch: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last update time.
    pub updated_at: Timestamp,
}

/// A workflow template derived from a `.shipinator.yaml` (DMD §2.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pipeline {
    /// Id.
    pub id: PipelineId,
    /// Repository the config comes from.
    pub repository_id: RepositoryId,
    /// Name, unique within the repository.
    pub name: String,
    /// The trigger this pipeline was registered for (DMD `trigger_type`).
    pub trigger_type: Trigger,
    /// The `.shipinator.yaml` text the pipeline was created from (extension).
    pub source_spec: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last update time.
    pub updated_at: Timestamp,
}

/// One concrete execution of a pipeline (DMD §2.4, extended with TDD §6.1's job fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRun {
    /// Id.
    pub id: RunId,
    /// The pipeline this is a run of.
    pub pipeline_id: PipelineId,
    /// Branch or ref name (`main`, `refs/pull/4/head`).
    pub git_ref: String,
    /// The exact commit.
    pub git_sha: String,
    /// Status.
    pub status: RunStatus,
    /// Phase, derived from the jobs.
    pub phase: RunPhase,
    /// What asked for the run.
    pub trigger: Trigger,
    /// The stages this run executes, in order.
    pub requested_stages: Vec<JobType>,
    /// Who asked (token name, user, `cli`).
    pub requested_by: String,
    /// The validated spec this run executes, as JSON (a retry reuses it exactly). Shared:
    /// cloning a run (every read of the in-memory store does) does not copy the document.
    pub resolved_spec: Arc<serde_json::Value>,
    /// The run this one retries, if any.
    pub retry_of: Option<RunId>,
    /// Compare-and-set version, incremented by every update.
    pub version: u64,
    /// Creation time.
    pub created_at: Timestamp,
    /// When it started running.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
}

/// One stage of a run (DMD §2.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Id (derived from the run and stage).
    pub id: JobId,
    /// Parent run.
    pub pipeline_run_id: RunId,
    /// The stage.
    pub job_type: JobType,
    /// Display name (the stage name).
    pub name: String,
    /// Status.
    pub status: JobStatus,
    /// Compare-and-set version.
    pub version: u64,
    /// Creation time.
    pub created_at: Timestamp,
    /// When it started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
}

/// One step of a job (DMD §2.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStep {
    /// Id (derived from the job and index).
    pub id: StepId,
    /// Parent job.
    pub job_id: JobId,
    /// Step name from the config.
    pub name: String,
    /// Position within the job, from 0.
    pub execution_order: u32,
    /// Steps sharing a group run concurrently; `None` when sequential.
    pub parallel_group: Option<String>,
    /// Status.
    pub status: StepStatus,
    /// The current attempt, from 1; 0 before the first submission.
    pub attempt: u32,
    /// Compare-and-set version.
    pub version: u64,
    /// Creation time.
    pub created_at: Timestamp,
    /// When the first attempt started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
}

/// Metadata of an immutable artifact (DMD §2.7); the bytes live in an `ArtifactStore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Id; also the artifact store key.
    pub id: ArtifactId,
    /// Producing job.
    pub job_id: JobId,
    /// Producing step (extension).
    pub step_id: Option<StepId>,
    /// Producing run (extension, denormalised for listing).
    pub run_id: RunId,
    /// Type.
    pub artifact_type: ArtifactType,
    /// The output's `name` in the config, if it has one (extension).
    pub name: Option<String>,
    /// The path the step declared, relative to the workspace (extension).
    pub path: Option<String>,
    /// `nfs`, `s3`, `memory`, ...
    pub storage_backend: String,
    /// Where the bytes live within that backend.
    pub storage_path: String,
    /// `sha256:<hex>` of the payload.
    pub checksum: Option<String>,
    /// Payload size in bytes (extension).
    pub size: u64,
    /// Extra metadata: image ref and digest, test counts, ... (extension).
    pub metadata: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: Timestamp,
}

/// One attempt of one step on an executor (DMD §2.8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// Id, derived from (step, attempt).
    pub id: ExecutionId,
    /// The step this executes.
    pub job_step_id: StepId,
    /// Attempt number, from 1 (extension).
    pub attempt: u32,
    /// `local`, `kubernetes`, `mock`, ...
    pub executor_type: String,
    /// The executor's name for it (k8s job name, pid, ...); empty until submitted.
    pub external_id: String,
    /// Status.
    pub status: ExecutionStatus,
    /// Exit code of the step's command, when it ran to completion (extension).
    pub exit_code: Option<i32>,
    /// Why it failed or was cancelled when it was not the command's exit code (extension). Set
    /// on an execution that has not ended, it records that the engine asked the executor to
    /// stop it and why ([`Execution::cancel_requested`]).
    pub failure: Option<String>,
    /// Compare-and-set version.
    pub version: u64,
    /// When it was submitted.
    pub submitted_at: Timestamp,
    /// When it ended.
    pub completed_at: Option<Timestamp>,
}

impl Execution {
    /// Whether the engine asked the executor to stop it and waits for the executor to confirm
    /// (two-phase cancellation): it has not ended and has a `failure` reason. It is recorded
    /// ended (`canceled`, or `failed` for a timeout) when the executor reports it stopped.
    pub fn cancel_requested(&self) -> bool {
        !self.status.is_terminal() && self.failure.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_spellings_round_trip() {
        for s in RunStatus::ALL {
            assert_eq!(s.as_str().parse::<RunStatus>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), *s);
        }
        for s in ArtifactType::ALL {
            assert_eq!(s.as_str().parse::<ArtifactType>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{s}\""));
        }
        let err = "RUNNING".parse::<RunStatus>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown run status 'RUNNING': expected one of pending, running, success, failed, canceled"
        );
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let run = RunId(Uuid::from_u128(1));
        let build = JobId::derive(run, JobType::Build);
        assert_eq!(build, JobId::derive(run, JobType::Build));
        assert_ne!(build, JobId::derive(run, JobType::Test));
        let s0 = StepId::derive(build, 0);
        assert_ne!(s0, StepId::derive(build, 1));
        assert_ne!(ExecutionId::derive(s0, 1), ExecutionId::derive(s0, 2));
        assert_eq!(ExecutionId::derive(s0, 1), ExecutionId::derive(s0, 1));
    }

    #[test]
    fn derived_ids_are_v5_of_the_parent_and_a_suffix() {
        // Stored rows carry these ids: the bytes hashed must never change.
        let run = RunId(Uuid::from_u128(7));
        for stage in JobType::ORDER {
            let mut name = run.0.as_bytes().to_vec();
            name.extend_from_slice(stage.as_str().as_bytes());
            assert_eq!(
                JobId::derive(run, stage).0,
                Uuid::new_v5(&ID_NAMESPACE, &name)
            );
        }
        let job = JobId::derive(run, JobType::Test);
        let mut name = job.0.as_bytes().to_vec();
        name.extend_from_slice(b"step:");
        name.extend_from_slice(&3u32.to_be_bytes());
        let step = StepId::derive(job, 3);
        assert_eq!(step.0, Uuid::new_v5(&ID_NAMESPACE, &name));
        let mut name = step.0.as_bytes().to_vec();
        name.extend_from_slice(b"exec:");
        name.extend_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            ExecutionId::derive(step, 2).0,
            Uuid::new_v5(&ID_NAMESPACE, &name)
        );
    }
}
