//! Pure planning: which stages a run executes, the rows a new run is inserted with, and the
//! new run that retries a failed one from its failed stage.
//!
//! # The stored run document
//! [`PipelineRun::resolved_spec`] holds a [`RunDocument`] as JSON:
//! `{"format": 1, "spec": <PipelineSpec>, "source": <SourceSpec>, "context": <RunContext>,
//! "inherited_artifacts": [...]}`. It is everything, beside the rows, that an orchestrator needs
//! to rebuild a run after a restart, and what a retry copies unchanged.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{PipelineSpec, TemplateContext};
use crate::domain::{
    Artifact, Job, JobId, JobStatus, JobStep, JobType, PipelineId, PipelineRun, RunId, RunPhase,
    RunStatus, StepId, StepStatus, Trigger,
};
use crate::executor::SourceSpec;
use crate::store::{NewRun, RunRecord};
use crate::time::Timestamp;

/// The name of the deploy stage's single step.
pub const DEPLOY_STEP: &str = "deploy";

/// What a run is asked for: the input of [`new_run`].
#[derive(Debug, Clone, PartialEq)]
pub struct RunRequest {
    /// The pipeline.
    pub pipeline_id: PipelineId,
    /// The pipeline's name (`SHIPINATOR_PIPELINE`).
    pub pipeline_name: String,
    /// The project's name (`SHIPINATOR_PROJECT`).
    pub project_name: String,
    /// The validated spec to execute.
    pub spec: Arc<PipelineSpec>,
    /// Where the source comes from (commit, ref, clone URL).
    pub source: SourceSpec,
    /// The branch name (`main`), used for trigger and deploy branch matching.
    pub branch: String,
    /// The repository's default branch: pushes to it deploy when `deploy.branches` is empty.
    pub default_branch: String,
    /// What asked for the run.
    pub trigger: Trigger,
    /// For manual runs, the stages asked for (`None`: build and test).
    pub stages: Option<Vec<JobType>>,
    /// Who asked.
    pub requested_by: String,
}

/// The variables of a run's templates, as stored (the run id comes from the run row).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunContext {
    /// Full commit sha.
    pub commit: String,
    /// Branch name.
    pub branch: String,
    /// Git ref.
    pub git_ref: String,
    /// Pipeline name.
    pub pipeline: String,
    /// Project name.
    pub project: String,
}

impl RunContext {
    /// The template context of run `run`.
    pub fn template_context(&self, run: RunId) -> TemplateContext {
        TemplateContext {
            commit: self.commit.clone(),
            branch: self.branch.clone(),
            git_ref: self.git_ref.clone(),
            run_id: run.to_string(),
            pipeline: self.pipeline.clone(),
            project: self.project.clone(),
        }
    }
}

/// An artifact a retry reuses from the run it retries, with the stage that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InheritedArtifact {
    /// The producing stage.
    pub stage: JobType,
    /// The artifact, unchanged (same id: it is reused, never copied).
    pub artifact: Artifact,
}

/// What [`PipelineRun::resolved_spec`] holds (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunDocument {
    /// Format version, currently 1.
    pub format: u32,
    /// The validated spec, shared with the request and the orchestrator (runs of one
    /// pipeline version hold one copy).
    pub spec: Arc<PipelineSpec>,
    /// Where the source comes from.
    pub source: SourceSpec,
    /// Template variables.
    pub context: RunContext,
    /// Artifacts of stages reused from an earlier run (retries).
    #[serde(default)]
    pub inherited_artifacts: Vec<InheritedArtifact>,
}

impl RunDocument {
    /// The current format.
    pub const FORMAT: u32 = 1;

    /// Reads the document of a stored run.
    ///
    /// # Errors
    /// [`PlanError::InvalidDocument`] when the JSON is not a run document of a known format.
    pub fn from_run(run: &PipelineRun) -> Result<Self, PlanError> {
        let doc = RunDocument::deserialize(&*run.resolved_spec)
            .map_err(|source| PlanError::InvalidDocument { source })?;
        if doc.format != Self::FORMAT {
            return Err(PlanError::UnknownFormat { format: doc.format });
        }
        Ok(doc)
    }

    /// As JSON for [`PipelineRun::resolved_spec`].
    ///
    /// # Errors
    /// [`PlanError::InvalidDocument`] if serialization fails (it does not for valid specs).
    pub fn to_json(&self) -> Result<serde_json::Value, PlanError> {
        serde_json::to_value(self).map_err(|source| PlanError::InvalidDocument { source })
    }
}

/// Why a run cannot be planned, created or retried.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// The spec's `on:` section disables this trigger.
    #[error("the pipeline does not run on {trigger} (enable it in the 'on:' section)")]
    TriggerDisabled {
        /// The trigger.
        trigger: Trigger,
    },
    /// A push to a branch that no `on.push` pattern matches.
    #[error("pushes to branch '{branch}' do not run the pipeline (add it to 'on.push')")]
    BranchNotTriggered {
        /// The branch.
        branch: String,
    },
    /// A requested stage the spec does not define.
    #[error("stage '{stage}' was requested but the pipeline defines no '{stage}:' section")]
    StageNotDefined {
        /// The stage.
        stage: JobType,
    },
    /// Nothing to execute.
    #[error("the run would execute no stage: the pipeline defines none of the requested stages")]
    NothingToRun,
    /// The stored run document cannot be read.
    #[error("the run's stored spec is not a valid run document")]
    InvalidDocument {
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The stored run document has a format this version does not know.
    #[error("the run's stored spec has format {format}; this version reads format 1")]
    UnknownFormat {
        /// The stored format.
        format: u32,
    },
    /// Only failed or cancelled runs can be retried.
    #[error("run {run} is {status}; only failed or canceled runs can be retried")]
    NotRetryable {
        /// The run.
        run: RunId,
        /// Its status.
        status: RunStatus,
    },
}

/// Whether `branch` matches the glob `pattern`: `*` matches any run of characters (including
/// `/`), everything else matches itself.
pub fn branch_matches(pattern: &str, branch: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let b: Vec<char> = branch.chars().collect();
    // Iterative glob matching with backtracking to the last star.
    let (mut pi, mut bi) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while bi < b.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, bi));
            pi += 1;
        } else if pi < p.len() && p[pi] == b[bi] {
            pi += 1;
            bi += 1;
        } else if let Some((sp, sb)) = star {
            pi = sp + 1;
            bi = sb + 1;
            star = Some((sp, sb + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The stages a run executes, in order:
/// - `pr`: build and test;
/// - `push`: build and test, plus deploy when the branch matches `deploy.branches` (the
///   repository's default branch when that list is empty);
/// - `manual`: the stages asked for, build and test when none were.
///
/// Stages the spec does not define are left out, except that a manual run asking for one is an
/// error.
///
/// # Errors
/// See [`PlanError`]: a disabled trigger, a push to an untriggered branch, a requested stage
/// the spec lacks, or nothing to run.
pub fn plan_stages(
    spec: &PipelineSpec,
    trigger: Trigger,
    branch: &str,
    default_branch: &str,
    requested: Option<&[JobType]>,
) -> Result<Vec<JobType>, PlanError> {
    let defined = spec.stages();
    let wanted: Vec<JobType> = match trigger {
        Trigger::Pr => {
            if !spec.triggers.pull_request {
                return Err(PlanError::TriggerDisabled { trigger });
            }
            vec![JobType::Build, JobType::Test]
        }
        Trigger::Push => {
            let Some(patterns) = &spec.triggers.push else {
                return Err(PlanError::TriggerDisabled { trigger });
            };
            if !patterns.iter().any(|p| branch_matches(p, branch)) {
                return Err(PlanError::BranchNotTriggered {
                    branch: branch.to_owned(),
                });
            }
            let deploys = spec.deploy.as_ref().is_some_and(|d| {
                if d.branches.is_empty() {
                    branch == default_branch
                } else {
                    d.branches.iter().any(|p| branch_matches(p, branch))
                }
            });
            let mut v = vec![JobType::Build, JobType::Test];
            if deploys {
                v.push(JobType::Deploy);
            }
            v
        }
        Trigger::Manual => {
            if !spec.triggers.manual {
                return Err(PlanError::TriggerDisabled { trigger });
            }
            match requested {
                Some(stages) if !stages.is_empty() => {
                    if let Some(stage) = stages.iter().find(|s| !defined.contains(s)) {
                        return Err(PlanError::StageNotDefined { stage: *stage });
                    }
                    JobType::ORDER
                        .into_iter()
                        .filter(|s| stages.contains(s))
                        .collect()
                }
                Some(_) | None => vec![JobType::Build, JobType::Test],
            }
        }
    };
    let stages: Vec<JobType> = wanted.into_iter().filter(|s| defined.contains(s)).collect();
    if stages.is_empty() {
        return Err(PlanError::NothingToRun);
    }
    Ok(stages)
}

/// The names and parallel groups of a stage's steps, in order.
pub(crate) fn stage_steps(spec: &PipelineSpec, stage: JobType) -> Vec<(&str, Option<&str>)> {
    match spec.stage(stage) {
        Some(s) => s
            .steps
            .iter()
            .map(|st| (st.name.as_str(), st.parallel_group.as_deref()))
            .collect(),
        None if stage == JobType::Deploy && spec.deploy.is_some() => vec![(DEPLOY_STEP, None)],
        None => Vec::new(),
    }
}

fn new_job(run: RunId, stage: JobType, now: Timestamp) -> Job {
    Job {
        id: JobId::derive(run, stage),
        pipeline_run_id: run,
        job_type: stage,
        name: stage.as_str().to_owned(),
        status: JobStatus::Pending,
        version: 0,
        created_at: now,
        started_at: None,
        finished_at: None,
    }
}

fn new_steps(spec: &PipelineSpec, job: &Job, now: Timestamp) -> Vec<JobStep> {
    stage_steps(spec, job.job_type)
        .into_iter()
        .zip(0u32..)
        .map(|((name, group), index)| JobStep {
            id: StepId::derive(job.id, index),
            job_id: job.id,
            name: name.to_owned(),
            execution_order: index,
            parallel_group: group.map(str::to_owned),
            status: StepStatus::Pending,
            attempt: 0,
            version: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        })
        .collect()
}

/// The rows of a new run `id` for `request`, status `pending`, with one job per planned stage
/// and one step per configured step (the deploy stage has one step, [`DEPLOY_STEP`]).
///
/// # Errors
/// See [`plan_stages`].
pub fn new_run(request: &RunRequest, id: RunId, now: Timestamp) -> Result<NewRun, PlanError> {
    new_run_with_document(request, id, now).map(|(new, _)| new)
}

/// [`new_run`], also returning the [`RunDocument`] its `resolved_spec` holds, so that a
/// caller which hands the run to an orchestrator need not read the JSON back.
///
/// # Errors
/// See [`new_run`].
pub fn new_run_with_document(
    request: &RunRequest,
    id: RunId,
    now: Timestamp,
) -> Result<(NewRun, RunDocument), PlanError> {
    let stages = plan_stages(
        &request.spec,
        request.trigger,
        &request.branch,
        &request.default_branch,
        request.stages.as_deref(),
    )?;
    let doc = RunDocument {
        format: RunDocument::FORMAT,
        spec: Arc::clone(&request.spec),
        source: request.source.clone(),
        context: RunContext {
            commit: request.source.commit.clone(),
            branch: request.branch.clone(),
            git_ref: request.source.git_ref.clone(),
            pipeline: request.pipeline_name.clone(),
            project: request.project_name.clone(),
        },
        inherited_artifacts: Vec::new(),
    };
    let jobs: Vec<Job> = stages.iter().map(|s| new_job(id, *s, now)).collect();
    let steps = jobs
        .iter()
        .flat_map(|j| new_steps(&request.spec, j, now))
        .collect();
    let resolved_spec = Arc::new(doc.to_json()?);
    let new = NewRun {
        run: PipelineRun {
            id,
            pipeline_id: request.pipeline_id,
            git_ref: request.source.git_ref.clone(),
            git_sha: request.source.commit.clone(),
            status: RunStatus::Pending,
            phase: RunPhase::Submitted,
            trigger: request.trigger,
            requested_stages: stages,
            requested_by: request.requested_by.clone(),
            resolved_spec,
            retry_of: None,
            version: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        },
        jobs,
        steps,
    };
    Ok((new, doc))
}

/// Every artifact a run can use, oldest first: those a retry inherited from the run it
/// retries (reused by id: registered under the original run, so not in
/// [`RunRecord::artifacts`], which lists only what the run's own jobs produced), then its own.
/// For listing a run's artifacts (`runs show`, an API); an unreadable run document yields
/// only the run's own.
pub fn run_artifacts(record: &RunRecord) -> Vec<Artifact> {
    let mut out: Vec<Artifact> = match RunDocument::from_run(&record.run) {
        Ok(doc) => doc
            .inherited_artifacts
            .into_iter()
            .map(|a| a.artifact)
            .collect(),
        Err(_) => Vec::new(),
    };
    for a in &record.artifacts {
        if !out.iter().any(|known| known.id == a.id) {
            out.push(a.clone());
        }
    }
    out
}

/// A new run `id` that retries `original` (failed or cancelled) from its first stage that did
/// not succeed, with the same stored spec and requested stages.
///
/// The stages that succeeded are not executed again: their jobs and steps are inserted already
/// `succeeded` (attempt 0, no executions, the original's start and end times), and their
/// artifacts are reused by id through [`RunDocument::inherited_artifacts`], so later stages'
/// inputs point at the original artifacts. The new run starts in the phase those stages reached.
///
/// # Errors
/// [`PlanError::NotRetryable`] unless the original failed or was cancelled; a document error
/// if its stored spec cannot be read.
pub fn retry_run(
    original: &RunRecord,
    id: RunId,
    now: Timestamp,
    requested_by: &str,
) -> Result<NewRun, PlanError> {
    let status = original.run.status;
    if !matches!(status, RunStatus::Failed | RunStatus::Canceled) {
        return Err(PlanError::NotRetryable {
            run: original.run.id,
            status,
        });
    }
    let mut doc = RunDocument::from_run(&original.run)?;
    let mut jobs = Vec::new();
    let mut steps = Vec::new();
    let mut reusing = true;
    let mut inherited = Vec::new();
    for stage in &original.run.requested_stages {
        let old = original.jobs.iter().find(|j| j.job_type == *stage);
        let mut job = new_job(id, *stage, now);
        let mut job_steps = new_steps(&doc.spec, &job, now);
        reusing = reusing && old.is_some_and(|j| j.status == JobStatus::Succeeded);
        if let (true, Some(old)) = (reusing, old) {
            job.status = JobStatus::Succeeded;
            job.started_at = old.started_at;
            job.finished_at = old.finished_at;
            for step in &mut job_steps {
                step.status = StepStatus::Succeeded;
                step.started_at = old.started_at;
                step.finished_at = old.finished_at;
            }
            inherited.extend(
                original
                    .artifacts
                    .iter()
                    .filter(|a| a.job_id == old.id)
                    .map(|a| InheritedArtifact {
                        stage: *stage,
                        artifact: a.clone(),
                    }),
            );
        }
        jobs.push(job);
        steps.extend(job_steps);
    }
    // Artifacts the original itself inherited stay available to the retry.
    let reused_stages: Vec<JobType> = jobs
        .iter()
        .filter(|j| j.status == JobStatus::Succeeded)
        .map(|j| j.job_type)
        .collect();
    doc.inherited_artifacts
        .retain(|a| reused_stages.contains(&a.stage));
    doc.inherited_artifacts.extend(inherited);
    let phase = crate::fsm::run::phase(jobs.iter().map(|j| {
        (
            j.job_type,
            j.status,
            j.started_at.is_some() || j.status == JobStatus::Succeeded,
        )
    }));
    Ok(NewRun {
        run: PipelineRun {
            id,
            pipeline_id: original.run.pipeline_id,
            git_ref: original.run.git_ref.clone(),
            git_sha: original.run.git_sha.clone(),
            status: RunStatus::Pending,
            phase,
            trigger: original.run.trigger,
            requested_stages: original.run.requested_stages.clone(),
            requested_by: requested_by.to_owned(),
            resolved_spec: Arc::new(doc.to_json()?),
            retry_of: Some(original.run.id),
            version: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        },
        jobs,
        steps,
    })
}
