//! Buildinator, Testinator and Deployinator: the translations from config to
//! [`ExecutionSpec`]s, and from finished executions to registered [`Artifact`]s.
//!
//! They decide what runs; they run nothing. Build and test steps run their `run:` command with
//! `sh -c` in the stage's shared workspace, cloned from the run's source; the deploy step runs
//! `helm` or `kubectl` against one artifact of an earlier stage, fetched by id and checksum,
//! never against source.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{
    ArtifactSelector, DeploySpec, PipelineSpec, StageSpec, StepSpec, TemplateContext,
};
use crate::domain::{Artifact, ArtifactType, ExecutionId, JobId, JobType, RunId, StepId};
use crate::executor::{
    ExecutionResult, ExecutionSpec, InputArtifact, OutputDecl, SourceSpec, WorkspaceRef,
};
use crate::time::Timestamp;

use super::plan::DEPLOY_STEP;

/// Everything a translator needs to describe one attempt of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepRequest<'a> {
    /// Run.
    pub run_id: RunId,
    /// Stage.
    pub stage: JobType,
    /// The step's position in its stage.
    pub step_index: u32,
    /// Attempt, from 1.
    pub attempt: u32,
    /// The run's spec.
    pub spec: &'a PipelineSpec,
    /// The run's source.
    pub source: &'a SourceSpec,
    /// The run's template variables.
    pub context: &'a TemplateContext,
    /// Artifacts registered by earlier stages of the run, oldest first.
    pub earlier_artifacts: &'a [InputArtifact],
    /// Timeout for steps that set none.
    pub default_timeout: Option<Duration>,
}

/// The ids of one attempt of a step, each derived once.
#[derive(Debug, Clone, Copy)]
struct AttemptIds {
    job: JobId,
    step: StepId,
    execution: ExecutionId,
}

impl StepRequest<'_> {
    fn ids(&self) -> AttemptIds {
        let job = JobId::derive(self.run_id, self.stage);
        let step = StepId::derive(job, self.step_index);
        AttemptIds {
            job,
            step,
            execution: ExecutionId::derive(step, self.attempt),
        }
    }

    fn base_env(&self, step_name: &str, execution_id: ExecutionId) -> BTreeMap<String, String> {
        // One bulk build of every variable (the run's, then the attempt's), rather than
        // inserting the attempt's one by one into the run's.
        let attempt = [
            ("SHIPINATOR_STAGE", self.stage.as_str().to_owned()),
            ("SHIPINATOR_STEP", step_name.to_owned()),
            ("SHIPINATOR_ATTEMPT", self.attempt.to_string()),
            ("SHIPINATOR_EXECUTION_ID", execution_id.to_string()),
        ];
        self.context
            .env()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .chain(attempt.into_iter().map(|(k, v)| (k.to_owned(), v)))
            .collect()
    }
}

/// Why a step cannot be described.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StageError {
    /// The stored spec has no step at this position (the spec and the rows disagree).
    #[error("the {stage} stage has no step {index} in the run's spec")]
    StepMissing {
        /// Stage.
        stage: JobType,
        /// Position.
        index: u32,
    },
    /// No earlier artifact matches `deploy.artifact`.
    #[error(
        "no artifact of an earlier stage matches deploy artifact '{selector}' (declare it as a build output)"
    )]
    NoArtifact {
        /// The selector, as written.
        selector: String,
    },
    /// The selected artifact cannot be deployed.
    #[error("cannot deploy a {artifact_type} artifact: deploy a helm_chart or a k8s_manifest")]
    NotDeployable {
        /// Its type.
        artifact_type: ArtifactType,
    },
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@,+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn step_spec<'a>(
    req: &StepRequest<'a>,
    stage: &'a StageSpec,
    step: &'a StepSpec,
    inputs: Vec<InputArtifact>,
) -> ExecutionSpec {
    let ids = req.ids();
    let mut env = req.base_env(&step.name, ids.execution);
    for (k, v) in stage.env.iter().chain(step.env.iter()) {
        env.insert(k.clone(), v.render(req.context));
    }
    let outputs = step
        .outputs
        .iter()
        .map(|o| OutputDecl {
            artifact_type: o.artifact_type,
            path: o.path.as_ref().map(|p| p.render(req.context)),
            image_ref: o.image_ref.as_ref().map(|p| p.render(req.context)),
            name: o.name.clone(),
        })
        .collect();
    ExecutionSpec {
        execution_id: ids.execution,
        run_id: req.run_id,
        job_id: ids.job,
        step_id: ids.step,
        attempt: req.attempt,
        stage: req.stage,
        step_name: step.name.clone(),
        image: step.image.clone().or_else(|| stage.image.clone()),
        command: vec!["sh".to_owned(), "-c".to_owned(), step.run.clone()],
        env,
        workdir: step.workdir.clone(),
        timeout: step.timeout.or(req.default_timeout),
        workspace: WorkspaceRef::for_stage(req.run_id, req.stage),
        source: Some(req.source.clone()),
        inputs,
        outputs,
    }
}

fn configured_step<'a>(req: &StepRequest<'a>) -> Result<(&'a StageSpec, &'a StepSpec), StageError> {
    let missing = StageError::StepMissing {
        stage: req.stage,
        index: req.step_index,
    };
    let stage = req.spec.stage(req.stage).ok_or(missing.clone())?;
    let step = usize::try_from(req.step_index)
        .ok()
        .and_then(|i| stage.steps.get(i))
        .ok_or(missing)?;
    Ok((stage, step))
}

/// Turns a finished execution's produced artifacts into artifact rows of `step`.
pub fn register_artifacts(
    result: &ExecutionResult,
    run_id: RunId,
    job_id: JobId,
    step_id: StepId,
    now: Timestamp,
) -> Vec<Artifact> {
    result
        .artifacts
        .iter()
        .map(|p| Artifact {
            id: p.id,
            job_id,
            step_id: Some(step_id),
            run_id,
            artifact_type: p.artifact_type,
            name: p.name.clone(),
            path: p.path.clone(),
            storage_backend: p.storage_backend.clone(),
            storage_path: p.storage_path.clone(),
            checksum: p.checksum.clone(),
            size: p.size,
            metadata: p.metadata.clone(),
            created_at: now,
        })
        .collect()
}

/// The input form of a registered artifact.
pub fn as_input(a: &Artifact) -> InputArtifact {
    InputArtifact {
        id: a.id,
        artifact_type: a.artifact_type,
        checksum: a.checksum.clone(),
        path: a.path.clone(),
        name: a.name.clone(),
    }
}

/// Buildinator: build steps to executions, build outputs to artifacts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buildinator;

impl Buildinator {
    /// The execution of one attempt of a build step: the step's command in the build
    /// workspace, cloned from source, collecting its declared outputs.
    ///
    /// # Errors
    /// [`StageError::StepMissing`] when the spec has no such step.
    pub fn execution_spec(req: &StepRequest<'_>) -> Result<ExecutionSpec, StageError> {
        let (stage, step) = configured_step(req)?;
        Ok(step_spec(req, stage, step, req.earlier_artifacts.to_vec()))
    }

    /// Registers what a build step produced.
    pub fn register(
        result: &ExecutionResult,
        run_id: RunId,
        job_id: JobId,
        step_id: StepId,
        now: Timestamp,
    ) -> Vec<Artifact> {
        register_artifacts(result, run_id, job_id, step_id, now)
    }
}

/// Testinator: test steps (sequential or parallel groups) to executions; reports and coverage
/// to artifacts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Testinator;

impl Testinator {
    /// The execution of one attempt of a test step: its command in the test workspace, cloned
    /// from source, with every build artifact materialized at its declared path.
    ///
    /// # Errors
    /// [`StageError::StepMissing`] when the spec has no such step.
    pub fn execution_spec(req: &StepRequest<'_>) -> Result<ExecutionSpec, StageError> {
        let (stage, step) = configured_step(req)?;
        Ok(step_spec(req, stage, step, req.earlier_artifacts.to_vec()))
    }

    /// Registers the reports and coverage a test step produced.
    pub fn register(
        result: &ExecutionResult,
        run_id: RunId,
        job_id: JobId,
        step_id: StepId,
        now: Timestamp,
    ) -> Vec<Artifact> {
        register_artifacts(result, run_id, job_id, step_id, now)
    }
}

/// Deployinator: a deploy section and one earlier artifact to a `helm` or `kubectl`
/// execution. Never source.
#[derive(Debug, Clone, Copy, Default)]
pub struct Deployinator;

impl Deployinator {
    /// The artifact `deploy.artifact` selects among the earlier artifacts: the last one of the
    /// type, or the one with the output name.
    ///
    /// # Errors
    /// [`StageError::NoArtifact`] when none matches.
    pub fn select<'a>(
        deploy: &DeploySpec,
        earlier: &'a [InputArtifact],
    ) -> Result<&'a InputArtifact, StageError> {
        let found = match &deploy.artifact {
            ArtifactSelector::Type(t) => earlier.iter().rev().find(|a| a.artifact_type == *t),
            ArtifactSelector::Output(name) => earlier
                .iter()
                .rev()
                .find(|a| a.name.as_deref() == Some(name.as_str())),
        };
        found.ok_or_else(|| StageError::NoArtifact {
            selector: match &deploy.artifact {
                ArtifactSelector::Type(t) => t.as_str().to_owned(),
                ArtifactSelector::Output(name) => name.clone(),
            },
        })
    }

    /// The execution of one attempt of the deploy step: `helm upgrade --install` for a Helm
    /// chart, `kubectl apply` for manifests, with the artifact as the only input and no source.
    ///
    /// # Errors
    /// [`StageError::StepMissing`] when the spec has no deploy section, [`StageError`]s of
    /// [`select`](Self::select), and [`StageError::NotDeployable`] for other artifact types.
    pub fn execution_spec(req: &StepRequest<'_>) -> Result<ExecutionSpec, StageError> {
        let deploy = req.spec.deploy.as_ref().ok_or(StageError::StepMissing {
            stage: req.stage,
            index: req.step_index,
        })?;
        let artifact = Self::select(deploy, req.earlier_artifacts)?;
        let mut input = artifact.clone();
        let path = input
            .path
            .clone()
            .unwrap_or_else(|| format!("artifacts/{}", input.id));
        input.path = Some(path.clone());
        let namespace = deploy.namespace.render(req.context);
        let command = match artifact.artifact_type {
            ArtifactType::HelmChart => {
                let release = deploy
                    .release
                    .as_ref()
                    .map(|r| r.render(req.context))
                    .unwrap_or_else(|| req.context.pipeline.clone());
                let mut cmd = format!(
                    "helm upgrade --install {} {} --namespace {}",
                    shell_quote(&release),
                    shell_quote(&path),
                    shell_quote(&namespace)
                );
                for (k, v) in &deploy.values {
                    cmd.push_str(" --set ");
                    cmd.push_str(&shell_quote(&format!("{k}={}", v.render(req.context))));
                }
                cmd
            }
            ArtifactType::K8sManifest => format!(
                "kubectl apply -n {} -f {}",
                shell_quote(&namespace),
                shell_quote(&path)
            ),
            t @ (ArtifactType::Binary
            | ArtifactType::OciImage
            | ArtifactType::TestReport
            | ArtifactType::Coverage
            | ArtifactType::File) => {
                return Err(StageError::NotDeployable { artifact_type: t });
            }
        };
        let ids = req.ids();
        let mut env = req.base_env(DEPLOY_STEP, ids.execution);
        env.insert("SHIPINATOR_DEPLOY_TARGET".to_owned(), deploy.target.clone());
        env.insert("SHIPINATOR_DEPLOY_NAMESPACE".to_owned(), namespace);
        Ok(ExecutionSpec {
            execution_id: ids.execution,
            run_id: req.run_id,
            job_id: ids.job,
            step_id: ids.step,
            attempt: req.attempt,
            stage: req.stage,
            step_name: DEPLOY_STEP.to_owned(),
            image: deploy.image.clone(),
            command: vec!["sh".to_owned(), "-c".to_owned(), command],
            env,
            workdir: None,
            timeout: deploy.timeout.or(req.default_timeout),
            workspace: WorkspaceRef::for_stage(req.run_id, req.stage),
            source: None,
            inputs: vec![input],
            outputs: Vec::new(),
        })
    }
}

/// The execution of one attempt of any step, by stage.
///
/// # Errors
/// See the translators.
pub fn execution_spec(req: &StepRequest<'_>) -> Result<ExecutionSpec, StageError> {
    match req.stage {
        JobType::Build => Buildinator::execution_spec(req),
        JobType::Test => Testinator::execution_spec(req),
        JobType::Deploy => Deployinator::execution_spec(req),
    }
}
