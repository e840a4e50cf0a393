//! The pure (sans-IO) orchestrator: facts in, intentions out.
//!
//! [`Orchestrator::handle`] takes a [`Input`] (a fact: a run was loaded, an execution started,
//! finished or was lost, cancel was requested, a timer fired) and returns [`Command`]s
//! (intentions: persist a batch of transitions, submit or cancel an execution, check an
//! execution's status, report that a run ended). It does no IO, reads no clock (time is the
//! `now` argument) and uses no randomness: every id it creates is derived
//! ([`ExecutionId::derive`]).
//!
//! # Ordering contract
//! The commands of one `handle` call come with every [`Command::Persist`] first. A driver
//! commits them (with its lease fences) before it carries out any other command of the call:
//! the batch is the outbox. Events ([`RunEventKind`]) and artifact registrations travel inside
//! the batch as [`Write::AppendEvent`] and [`Write::InsertArtifact`], so they are recorded in
//! the same transaction as the state change they describe.
//!
//! # Versions
//! The orchestrator tracks each row's version and bumps it optimistically with every write;
//! a [`StoreError::Conflict`](crate::store::StoreError::Conflict) means the model is stale: the
//! driver forgets the run ([`Input::RunReleased`]) and loads it again.
//!
//! # Scheduling
//! Stages run build → test → deploy, limited to the run's requested stages. Within a stage,
//! consecutive steps sharing a `parallel_group` form a wave that starts together; a wave starts
//! when every step of the previous one succeeded, and the stage succeeds when all its steps
//! did. A failed step fails its stage and the run: its running siblings are cancelled and every
//! step and stage that never started is `skipped`. A lost execution (or a refused submission)
//! is retried as a new attempt, up to [`OrchestratorConfig::max_attempts`]; a non-zero exit
//! code never is. A step whose execution passes its deadline (submission time plus the step's
//! timeout) is cancelled and failed with "timed out after …".
//!
//! # Two-phase cancellation
//! Stopping an execution (a run cancel, a timeout, a failed sibling) is recorded as an intent
//! first: the execution stays non-terminal with its `failure` set to the reason it is being
//! stopped (see [`Execution::cancel_requested`]), its step records the decision (`canceled`, or
//! `failed` for a timeout), and a [`Command::Cancel`] follows the commit. Only when the executor
//! confirms (a canceled, finished or lost report or status) is the execution recorded terminal,
//! and only once every execution of a stage is terminal do the stage and the run end. A driver
//! that crashes between the commit and the cancel leaves the intent in the store; the next one
//! sends the cancel again when it loads the run, so no execution outlives its run.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{PipelineSpec, TemplateContext};
use crate::domain::{
    Artifact, ArtifactId, Execution, ExecutionId, JobId, JobStatus, JobType, RunId, RunPhase,
    RunStatus, Status, StepId, StepStatus,
};
use crate::executor::{ExecHandle, ExecutionResult, ExecutionSpec, InputArtifact, SourceSpec};
use crate::fsm::WorkEvent;
use crate::fsm::run::RunEvent as RunFsmEvent;
use crate::store::{Batch, RunEvent, RunEventKind, RunRecord, Write};
use crate::time::Timestamp;

pub mod plan;
pub mod stages;

pub use plan::{
    DEPLOY_STEP, InheritedArtifact, PlanError, RunContext, RunDocument, RunRequest, branch_matches,
    new_run, new_run_with_document, plan_stages, retry_run, run_artifacts,
};
pub use stages::{Buildinator, Deployinator, StageError, StepRequest, Testinator};

/// Tuning of the orchestrator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrchestratorConfig {
    /// Attempts per step for infrastructure failures (lost executions, refused submissions),
    /// counting the first; at least 1. User failures (non-zero exit) are never retried.
    pub max_attempts: u32,
    /// Timeout of steps that set none; `None` for no limit.
    pub default_step_timeout: Option<Duration>,
    /// Stored in `executions.executor_type` (the executor's [`kind`](crate::executor::Executor::kind)).
    pub executor_type: String,
}

impl Default for OrchestratorConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            default_step_timeout: Some(Duration::from_secs(3600)),
            executor_type: "unknown".to_owned(),
        }
    }
}

/// A fact the orchestrator reacts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// This orchestrator now owns the run (created, claimed or reloaded): rebuild it from the
    /// record and carry on (start it, resubmit executions recorded `pending`, check those
    /// recorded `running`). `document` may carry the already-parsed run document.
    RunLoaded {
        /// Everything stored about the run.
        record: Box<RunRecord>,
        /// The parsed [`RunDocument`], if the caller has it; parsed from the run otherwise.
        document: Option<Arc<RunDocument>>,
    },
    /// The executor accepted or started an execution.
    ExecutionStarted {
        /// The execution.
        execution_id: ExecutionId,
        /// The executor's id for it, when known.
        external_id: Option<String>,
    },
    /// The execution's command ran to completion.
    ExecutionFinished {
        /// The execution.
        execution_id: ExecutionId,
        /// How it ended.
        result: ExecutionResult,
    },
    /// The execution could not run or was lost by the substrate (an infrastructure failure).
    ExecutionLost {
        /// The execution.
        execution_id: ExecutionId,
        /// What happened.
        reason: String,
    },
    /// The executor reports the execution cancelled.
    ExecutionCanceled {
        /// The execution.
        execution_id: ExecutionId,
    },
    /// Someone asked to cancel a run.
    CancelRequested {
        /// The run.
        run_id: RunId,
    },
    /// The time returned by [`Orchestrator::poll_timeout`] has come.
    TimerFired,
    /// The orchestrator no longer owns the run (its lease was taken over, or its rows changed
    /// under it): forget it without writing anything.
    RunReleased {
        /// The run.
        run_id: RunId,
    },
}

/// An intention the driver carries out.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Commit these writes of one run (fenced by the driver's lease) before any other command
    /// of the same `handle` call.
    Persist {
        /// The run the writes belong to.
        run_id: RunId,
        /// The writes; `fences` is left empty for the driver to fill.
        batch: Batch,
    },
    /// Submit an execution (idempotent: its id is derived from step and attempt). Shared, so
    /// that an executor can keep it without a copy ([`Executor::submit_shared`]).
    ///
    /// [`Executor::submit_shared`]: crate::executor::Executor::submit_shared
    Submit(Arc<ExecutionSpec>),
    /// Cancel an execution (the external id may be empty when it is not known yet).
    Cancel {
        /// The run the execution belongs to.
        run_id: RunId,
        /// The execution.
        handle: ExecHandle,
    },
    /// Ask the executor for the execution's state and feed it back as an input.
    Check {
        /// The run the execution belongs to.
        run_id: RunId,
        /// The execution.
        handle: ExecHandle,
    },
    /// The run reached a terminal status; the orchestrator has forgotten it.
    RunEnded {
        /// The run.
        run_id: RunId,
        /// Its final status.
        status: RunStatus,
    },
}

#[derive(Debug)]
struct RunDoc {
    spec: Arc<PipelineSpec>,
    source: SourceSpec,
    context: TemplateContext,
}

#[derive(Debug)]
struct ExecState {
    id: ExecutionId,
    attempt: u32,
    version: u64,
    status: Status,
    external_id: String,
    exit_code: Option<i32>,
    failure: Option<String>,
    completed_at: Option<Timestamp>,
    timeout: Option<Duration>,
    deadline: Option<Timestamp>,
}

impl ExecState {
    /// Whether it was asked to stop and waits for the executor's confirmation.
    fn canceling(&self) -> bool {
        !self.status.is_terminal() && self.failure.is_some()
    }

    fn handle(&self) -> ExecHandle {
        ExecHandle {
            execution_id: self.id,
            external_id: self.external_id.clone(),
        }
    }
}

#[derive(Debug)]
struct StepState {
    id: StepId,
    index: u32,
    wave: u32,
    version: u64,
    status: StepStatus,
    attempt: u32,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    exec: Option<ExecState>,
}

#[derive(Debug)]
struct JobState {
    id: JobId,
    stage: JobType,
    version: u64,
    status: JobStatus,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    steps: Vec<StepState>,
    /// The status the job ends with once its last execution is confirmed ended.
    ending: Option<JobStatus>,
}

#[derive(Debug)]
struct RunState {
    id: RunId,
    version: u64,
    status: RunStatus,
    phase: RunPhase,
    started_at: Option<Timestamp>,
    finished_at: Option<Timestamp>,
    doc: Arc<RunDoc>,
    jobs: Vec<JobState>,
    /// Artifacts available to later stages, with the stage that produced them.
    artifacts: Earlier,
    /// The status the run ends with once every execution is confirmed ended (failing or
    /// canceling); nothing new is scheduled meanwhile.
    ending: Option<RunStatus>,
}

/// A run's registered artifacts, oldest first, with the stage that produced each: kept as two
/// parallel lists so that, while they are in stage order (as a run registers them), the
/// artifacts of the stages before one are a prefix, handed to the translators without a copy.
#[derive(Debug, Default)]
struct Earlier {
    stages: Vec<JobType>,
    inputs: Vec<InputArtifact>,
}

impl Earlier {
    fn push(&mut self, stage: JobType, input: InputArtifact) {
        self.stages.push(stage);
        self.inputs.push(input);
    }

    fn contains(&self, id: ArtifactId) -> bool {
        self.inputs.iter().any(|known| known.id == id)
    }

    /// The artifacts of the stages before `stage`, oldest first.
    fn before(&self, stage: JobType) -> Cow<'_, [InputArtifact]> {
        if self.stages.is_sorted() {
            let n = self.stages.partition_point(|s| *s < stage);
            Cow::Borrowed(&self.inputs[..n])
        } else {
            Cow::Owned(
                self.stages
                    .iter()
                    .zip(&self.inputs)
                    .filter(|(s, _)| **s < stage)
                    .map(|(_, a)| a.clone())
                    .collect(),
            )
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    run: RunId,
    job: usize,
    step: usize,
}

#[derive(Debug, Default)]
struct Index {
    execs: HashMap<ExecutionId, Loc>,
    deadlines: BTreeSet<(Timestamp, ExecutionId)>,
    /// Executions cancelled before their external id was known, whose run has ended: a later
    /// start report gets a second cancel with the real handle.
    tombstones: HashMap<ExecutionId, RunId>,
}

/// The writes and side effects of one run produced by one input.
struct Tx {
    now: Timestamp,
    run_id: RunId,
    writes: Vec<Write>,
    effects: Vec<Command>,
}

impl Tx {
    fn new(now: Timestamp, run_id: RunId) -> Self {
        Self {
            now,
            run_id,
            writes: Vec::new(),
            effects: Vec::new(),
        }
    }

    fn event(&mut self, kind: RunEventKind) {
        self.writes.push(Write::AppendEvent(RunEvent {
            run_id: self.run_id,
            at: self.now,
            kind,
        }));
    }

    fn flush(self, out: &mut Vec<Command>, effects: &mut Vec<Command>) {
        if !self.writes.is_empty() {
            out.push(Command::Persist {
                run_id: self.run_id,
                batch: Batch {
                    fences: Vec::new(),
                    writes: self.writes,
                },
            });
        }
        effects.extend(self.effects);
    }
}

/// The pure orchestrator of every run a driver owns. See the [module docs](self).
#[derive(Debug, Default)]
pub struct Orchestrator {
    config: OrchestratorConfig,
    runs: HashMap<RunId, RunState>,
    index: Index,
}

fn fmt_duration(d: Duration) -> String {
    if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

impl Orchestrator {
    /// An orchestrator owning no run.
    pub fn new(config: OrchestratorConfig) -> Self {
        Self {
            config,
            runs: HashMap::new(),
            index: Index::default(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &OrchestratorConfig {
        &self.config
    }

    /// Whether the run is owned and not ended.
    pub fn owns(&self, run: RunId) -> bool {
        self.runs.contains_key(&run)
    }

    /// How many runs are owned and not ended.
    pub fn run_count(&self) -> usize {
        self.runs.len()
    }

    /// The ids of the runs owned and not ended.
    pub fn run_ids(&self) -> impl Iterator<Item = RunId> + '_ {
        self.runs.keys().copied()
    }

    /// The status of an owned run.
    pub fn run_status(&self, run: RunId) -> Option<RunStatus> {
        self.runs.get(&run).map(|r| r.status)
    }

    /// Handles of the executions that are submitted and not ended, for status polling.
    pub fn active_executions(&self) -> Vec<ExecHandle> {
        let mut out = Vec::new();
        for run in self.runs.values() {
            for job in &run.jobs {
                if job.status != JobStatus::Running {
                    continue;
                }
                for step in &job.steps {
                    if let Some(e) = &step.exec
                        && !e.status.is_terminal()
                    {
                        out.push(ExecHandle {
                            execution_id: e.id,
                            external_id: e.external_id.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// When the driver must next call `handle(now, Input::TimerFired)`: the earliest step
    /// deadline, if any.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        self.index.deadlines.first().map(|(t, _)| *t)
    }

    /// Reacts to one fact. Does no IO and reads no clock: `now` is the time of the fact.
    /// Inputs about unknown runs or executions, duplicates and stale reports produce nothing.
    pub fn handle(&mut self, now: Timestamp, input: Input) -> Vec<Command> {
        let mut persists = Vec::new();
        let mut effects = Vec::new();
        match input {
            Input::RunLoaded { record, document } => {
                let run_id = record.run.id;
                let mut tx = Tx::new(now, run_id);
                self.load(*record, document, &mut tx);
                tx.flush(&mut persists, &mut effects);
                self.collect_ended(run_id, &effects);
            }
            Input::ExecutionStarted {
                execution_id,
                external_id,
            } => {
                let Some(loc) = self.index.execs.get(&execution_id).copied() else {
                    if let Some(ext) = external_id
                        && let Some(run_id) = self.index.tombstones.remove(&execution_id)
                    {
                        effects.push(Command::Cancel {
                            run_id,
                            handle: ExecHandle {
                                execution_id,
                                external_id: ext,
                            },
                        });
                    }
                    return effects;
                };
                self.with_run(now, loc, &mut persists, &mut effects, |_, _, run, tx| {
                    started(run, loc, execution_id, external_id, tx);
                });
            }
            Input::ExecutionFinished {
                execution_id,
                result,
            } => {
                self.index.tombstones.remove(&execution_id);
                let Some(loc) = self.index.execs.get(&execution_id).copied() else {
                    return Vec::new();
                };
                self.with_run(
                    now,
                    loc,
                    &mut persists,
                    &mut effects,
                    |cfg, idx, run, tx| {
                        finished(cfg, idx, run, loc, execution_id, &result, tx);
                    },
                );
            }
            Input::ExecutionLost {
                execution_id,
                reason,
            } => {
                self.index.tombstones.remove(&execution_id);
                let Some(loc) = self.index.execs.get(&execution_id).copied() else {
                    return Vec::new();
                };
                self.with_run(
                    now,
                    loc,
                    &mut persists,
                    &mut effects,
                    |cfg, idx, run, tx| {
                        lost(cfg, idx, run, loc, execution_id, reason, tx);
                    },
                );
            }
            Input::ExecutionCanceled { execution_id } => {
                self.index.tombstones.remove(&execution_id);
                let Some(loc) = self.index.execs.get(&execution_id).copied() else {
                    return Vec::new();
                };
                // Cancelled by someone else than us: the substrate lost it.
                self.with_run(
                    now,
                    loc,
                    &mut persists,
                    &mut effects,
                    |cfg, idx, run, tx| {
                        lost(
                            cfg,
                            idx,
                            run,
                            loc,
                            execution_id,
                            "canceled outside shipinator".to_owned(),
                            tx,
                        );
                    },
                );
            }
            Input::CancelRequested { run_id } => {
                let loc = Loc {
                    run: run_id,
                    job: 0,
                    step: 0,
                };
                if self.runs.contains_key(&run_id) {
                    self.with_run(now, loc, &mut persists, &mut effects, |_, idx, run, tx| {
                        cancel_run(idx, run, tx);
                    });
                }
            }
            Input::TimerFired => {
                while let Some(&(at, id)) = self.index.deadlines.first() {
                    if at > now {
                        break;
                    }
                    self.index.deadlines.remove(&(at, id));
                    let Some(loc) = self.index.execs.get(&id).copied() else {
                        continue;
                    };
                    self.with_run(now, loc, &mut persists, &mut effects, |_, idx, run, tx| {
                        timed_out(idx, run, loc, id, tx);
                    });
                }
            }
            Input::RunReleased { run_id } => self.forget(run_id),
        }
        persists.append(&mut effects);
        persists
    }

    fn with_run(
        &mut self,
        now: Timestamp,
        loc: Loc,
        persists: &mut Vec<Command>,
        effects: &mut Vec<Command>,
        f: impl FnOnce(&OrchestratorConfig, &mut Index, &mut RunState, &mut Tx),
    ) {
        let Some(run) = self.runs.get_mut(&loc.run) else {
            return;
        };
        let mut tx = Tx::new(now, loc.run);
        f(&self.config, &mut self.index, run, &mut tx);
        let start = effects.len();
        tx.flush(persists, effects);
        let ended = effects[start..]
            .iter()
            .any(|c| matches!(c, Command::RunEnded { .. }));
        if ended {
            self.forget(loc.run);
        }
    }

    fn collect_ended(&mut self, run_id: RunId, effects: &[Command]) {
        if effects
            .iter()
            .any(|c| matches!(c, Command::RunEnded { run_id: r, .. } if *r == run_id))
        {
            self.forget(run_id);
        }
    }

    /// Drops a run and its executions from memory, keeping tombstones for executions that
    /// were cancelled before their external id was known.
    fn forget(&mut self, run_id: RunId) {
        let Some(run) = self.runs.remove(&run_id) else {
            return;
        };
        for job in &run.jobs {
            for step in &job.steps {
                if let Some(e) = &step.exec {
                    self.index.execs.remove(&e.id);
                    if let Some(d) = e.deadline {
                        self.index.deadlines.remove(&(d, e.id));
                    }
                    if e.status == Status::Canceled && e.external_id.is_empty() {
                        self.index.tombstones.insert(e.id, run_id);
                    }
                }
            }
        }
    }

    fn load(&mut self, record: RunRecord, document: Option<Arc<RunDocument>>, tx: &mut Tx) {
        let run_id = record.run.id;
        self.forget(run_id);
        let (mut state, broken) = match build_state(&self.config, record, document) {
            Ok(state) => (state, None),
            Err(failed) => {
                let (state, reason) = *failed;
                (state, Some(reason))
            }
        };
        if state.status.is_terminal() {
            tx.effects.push(Command::RunEnded {
                run_id,
                status: state.status,
            });
            return;
        }
        // Reconcile: ask again to stop what was being stopped, resubmit what may never have
        // been submitted, check the rest.
        for (ji, job) in state.jobs.iter().enumerate() {
            for (si, step) in job.steps.iter().enumerate() {
                let Some(e) = &step.exec else { continue };
                if e.status.is_terminal() {
                    continue;
                }
                self.index.execs.insert(
                    e.id,
                    Loc {
                        run: run_id,
                        job: ji,
                        step: si,
                    },
                );
                if e.canceling() {
                    tx.effects.push(Command::Cancel {
                        run_id,
                        handle: e.handle(),
                    });
                    continue;
                }
                if let Some(d) = e.deadline {
                    self.index.deadlines.insert((d, e.id));
                }
                if broken.is_some() {
                    // Asked to stop below.
                } else if e.status == Status::Pending {
                    let inputs = state.artifacts.before(job.stage);
                    if let Ok(spec) = build_spec(
                        &self.config,
                        &state,
                        job.stage,
                        step.index,
                        e.attempt,
                        &inputs,
                    ) {
                        tx.effects.push(Command::Submit(Arc::new(spec)));
                    }
                } else {
                    tx.effects.push(Command::Check {
                        run_id,
                        handle: e.handle(),
                    });
                }
            }
        }
        match broken {
            None => advance(&self.config, &mut self.index, &mut state, tx),
            Some(reason) => {
                tracing::warn!(run_id = %run_id, %reason, "cannot rebuild run; failing it");
                // Stop what runs, skip what never started, fail the run.
                if state.jobs.is_empty() {
                    set_run_status(&mut state, RunStatus::Failed, tx);
                    tx.effects.push(Command::RunEnded {
                        run_id,
                        status: RunStatus::Failed,
                    });
                } else {
                    let ji = state
                        .jobs
                        .iter()
                        .position(|j| !j.status.is_terminal())
                        .unwrap_or(0);
                    fail_job(&mut self.index, &mut state, ji, tx);
                }
            }
        }
        if !state.status.is_terminal() {
            self.runs.insert(run_id, state);
        }
    }
}

/// Rebuilds a run's state from its record; on an unreadable document or rows that disagree
/// with it, returns the state as far as the rows go (to fail the run with) and the reason.
fn build_state(
    config: &OrchestratorConfig,
    record: RunRecord,
    document: Option<Arc<RunDocument>>,
) -> Result<RunState, Box<(RunState, String)>> {
    let r = &record.run;
    let doc = match document {
        Some(d) => Ok(d),
        None => RunDocument::from_run(r).map(Arc::new),
    };
    let run_doc = Arc::new(match &doc {
        Ok(d) => RunDoc {
            spec: Arc::clone(&d.spec),
            source: d.source.clone(),
            context: d.context.template_context(r.id),
        },
        Err(_) => RunDoc {
            spec: Arc::new(PipelineSpec {
                triggers: crate::config::Triggers::default(),
                build: None,
                test: None,
                deploy: None,
            }),
            source: SourceSpec {
                clone_url: String::new(),
                commit: String::new(),
                git_ref: String::new(),
                copy_working_tree: false,
            },
            context: TemplateContext::default(),
        },
    });
    let mut state = RunState {
        id: r.id,
        version: r.version,
        status: r.status,
        phase: r.phase,
        started_at: r.started_at,
        finished_at: r.finished_at,
        doc: Arc::clone(&run_doc),
        jobs: Vec::new(),
        artifacts: Earlier::default(),
        ending: None,
    };
    let mut problem = None;
    let mut stage_of_job = HashMap::new();
    for stage in &r.requested_stages {
        let id = JobId::derive(r.id, *stage);
        let Some(job) = record.jobs.iter().find(|j| j.id == id) else {
            problem.get_or_insert_with(|| format!("the {stage} job of the run is missing"));
            continue;
        };
        stage_of_job.insert(id, *stage);
        let mut rows: Vec<_> = record.steps.iter().filter(|s| s.job_id == id).collect();
        rows.sort_by_key(|s| s.execution_order);
        let expected = plan::stage_steps(&run_doc.spec, *stage).len();
        if rows.len() != expected {
            problem.get_or_insert_with(|| {
                format!(
                    "the {stage} job has {} steps but its spec has {expected}",
                    rows.len()
                )
            });
        }
        let mut steps = Vec::with_capacity(rows.len());
        let mut wave = 0u32;
        let mut prev_group: Option<&str> = None;
        for (i, row) in rows.iter().enumerate() {
            let group = row.parallel_group.as_deref();
            if i > 0 && (group.is_none() || group != prev_group) {
                wave += 1;
            }
            prev_group = group;
            let timeout = step_timeout(config, &run_doc.spec, *stage, row.execution_order);
            let exec = record
                .executions
                .iter()
                .filter(|e| e.job_step_id == row.id)
                .max_by_key(|e| e.attempt)
                .map(|e| ExecState {
                    id: e.id,
                    attempt: e.attempt,
                    version: e.version,
                    status: e.status,
                    external_id: e.external_id.clone(),
                    exit_code: e.exit_code,
                    failure: e.failure.clone(),
                    completed_at: e.completed_at,
                    timeout,
                    deadline: timeout.map(|t| e.submitted_at + t),
                });
            steps.push(StepState {
                id: row.id,
                index: row.execution_order,
                wave,
                version: row.version,
                status: row.status,
                attempt: row.attempt,
                started_at: row.started_at,
                finished_at: row.finished_at,
                exec,
            });
        }
        state.jobs.push(JobState {
            id,
            stage: *stage,
            version: job.version,
            status: job.status,
            started_at: job.started_at,
            finished_at: job.finished_at,
            ending: ending_of(job.status, &steps),
            steps,
        });
    }
    state.ending = run_ending(&mut state);
    let doc = match doc {
        Ok(doc) => doc,
        Err(e) => return Err(Box::new((state, e.to_string()))),
    };
    if let Some(problem) = problem {
        return Err(Box::new((state, problem)));
    }
    let artifacts = doc
        .inherited_artifacts
        .iter()
        .map(|a| (a.stage, stages::as_input(&a.artifact)))
        .chain(record.artifacts.iter().filter_map(|a| {
            stage_of_job
                .get(&a.job_id)
                .map(|s| (*s, stages::as_input(a)))
        }));
    for (stage, input) in artifacts {
        state.artifacts.push(stage, input);
    }
    Ok(state)
}

/// The status a stage that has not ended ends with, as its steps' rows record the decision: a
/// failed step fails it, a cancelled one cancels it; `None` while none of its steps ended
/// otherwise than succeeding.
fn ending_of(status: JobStatus, steps: &[StepState]) -> Option<JobStatus> {
    if status.is_terminal() {
        None
    } else if steps.iter().any(|s| s.status == StepStatus::Failed) {
        Some(JobStatus::Failed)
    } else if steps
        .iter()
        .any(|s| matches!(s.status, StepStatus::Canceled | StepStatus::Skipped))
    {
        Some(JobStatus::Canceled)
    } else {
        None
    }
}

/// The status a run that has not ended ends with, from its first stage that ended (or is
/// ending) otherwise than succeeding; stages after it that did not start end with it.
fn run_ending(run: &mut RunState) -> Option<RunStatus> {
    if run.status.is_terminal() {
        return None;
    }
    let first = run.jobs.iter().position(|j| {
        j.ending.is_some() || (j.status.is_terminal() && j.status != JobStatus::Succeeded)
    })?;
    let end = match run.jobs[first].ending.unwrap_or(run.jobs[first].status) {
        JobStatus::Canceled => RunStatus::Canceled,
        JobStatus::Pending
        | JobStatus::Running
        | JobStatus::Succeeded
        | JobStatus::Failed
        | JobStatus::Skipped => RunStatus::Failed,
    };
    for job in run.jobs.iter_mut().skip(first + 1) {
        if !job.status.is_terminal() && job.ending.is_none() {
            job.ending = Some(match end {
                RunStatus::Canceled => JobStatus::Canceled,
                RunStatus::Pending
                | RunStatus::Running
                | RunStatus::Success
                | RunStatus::Failed => JobStatus::Skipped,
            });
        }
    }
    Some(end)
}

fn step_timeout(
    config: &OrchestratorConfig,
    spec: &PipelineSpec,
    stage: JobType,
    index: u32,
) -> Option<Duration> {
    let own = match stage {
        JobType::Deploy => spec.deploy.as_ref().and_then(|d| d.timeout),
        JobType::Build | JobType::Test => spec
            .stage(stage)
            .and_then(|s| s.steps.get(usize::try_from(index).ok()?))
            .and_then(|s| s.timeout),
    };
    own.or(config.default_step_timeout)
}

fn build_spec(
    config: &OrchestratorConfig,
    run: &RunState,
    stage: JobType,
    index: u32,
    attempt: u32,
    inputs: &[InputArtifact],
) -> Result<ExecutionSpec, StageError> {
    let req = StepRequest {
        run_id: run.id,
        stage,
        step_index: index,
        attempt,
        spec: &run.doc.spec,
        source: &run.doc.source,
        context: &run.doc.context,
        earlier_artifacts: inputs,
        default_timeout: config.default_step_timeout,
    };
    stages::execution_spec(&req)
}

// ---- writes -------------------------------------------------------------------------------

fn set_run_status(run: &mut RunState, status: RunStatus, tx: &mut Tx) {
    let phase = if run.jobs.is_empty() {
        run.phase
    } else {
        crate::fsm::run::phase(
            run.jobs
                .iter()
                .map(|j| (j.stage, j.status, j.started_at.is_some())),
        )
    };
    if status == run.status && phase == run.phase {
        return;
    }
    if status == RunStatus::Running && run.started_at.is_none() {
        run.started_at = Some(tx.now);
    }
    if status.is_terminal() && run.finished_at.is_none() {
        run.finished_at = Some(tx.now);
    }
    tx.writes.push(Write::UpdateRun {
        id: run.id,
        expected_version: run.version,
        status,
        phase,
        started_at: run.started_at,
        finished_at: run.finished_at,
    });
    run.version += 1;
    run.status = status;
    run.phase = phase;
    tx.event(RunEventKind::RunChanged { status, phase });
}

fn run_event(run: &mut RunState, event: RunFsmEvent, tx: &mut Tx) {
    match crate::fsm::run::on(run.status, event) {
        Ok(status) => set_run_status(run, status, tx),
        Err(e) => tracing::debug!(run_id = %run.id, error = %e, "ignored run transition"),
    }
}

fn job_event(job: &mut JobState, event: WorkEvent, tx: &mut Tx) {
    let status = match crate::fsm::job::on(job.status, event) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(job_id = %job.id, error = %e, "ignored job transition");
            return;
        }
    };
    if status == job.status {
        return;
    }
    if status == JobStatus::Running && job.started_at.is_none() {
        job.started_at = Some(tx.now);
    }
    if status.is_terminal() && job.finished_at.is_none() {
        job.finished_at = Some(tx.now);
    }
    tx.writes.push(Write::UpdateJob {
        id: job.id,
        expected_version: job.version,
        status,
        started_at: job.started_at,
        finished_at: job.finished_at,
    });
    job.version += 1;
    job.status = status;
    tx.event(RunEventKind::JobChanged {
        job_id: job.id,
        status,
    });
}

fn step_update(step: &mut StepState, status: StepStatus, attempt: u32, tx: &mut Tx) {
    if status == step.status && attempt == step.attempt {
        return;
    }
    if status == StepStatus::Running && step.started_at.is_none() {
        step.started_at = Some(tx.now);
    }
    if status.is_terminal() && step.finished_at.is_none() {
        step.finished_at = Some(tx.now);
    }
    tx.writes.push(Write::UpdateStep {
        id: step.id,
        expected_version: step.version,
        status,
        attempt,
        started_at: step.started_at,
        finished_at: step.finished_at,
    });
    step.version += 1;
    step.status = status;
    step.attempt = attempt;
    tx.event(RunEventKind::StepChanged {
        step_id: step.id,
        status,
        attempt,
    });
}

fn step_event(step: &mut StepState, event: WorkEvent, tx: &mut Tx) {
    match crate::fsm::step::on(step.status, event) {
        Ok(s) => step_update(step, s, step.attempt, tx),
        Err(e) => tracing::debug!(step_id = %step.id, error = %e, "ignored step transition"),
    }
}

/// Applies `event` to an execution with the given outcome fields; returns whether it changed.
fn exec_event(
    exec: &mut ExecState,
    event: WorkEvent,
    exit_code: Option<i32>,
    failure: Option<String>,
    tx: &mut Tx,
) -> bool {
    let status = match crate::fsm::execution::on(exec.status, event) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(execution_id = %exec.id, error = %e, "ignored execution transition");
            return false;
        }
    };
    if status == exec.status {
        return false;
    }
    exec.status = status;
    if status.is_terminal() {
        exec.completed_at = Some(tx.now);
        exec.exit_code = exit_code;
        exec.failure = failure;
    }
    write_exec(exec, tx);
    true
}

fn write_exec(exec: &mut ExecState, tx: &mut Tx) {
    tx.writes.push(Write::UpdateExecution {
        id: exec.id,
        expected_version: exec.version,
        status: exec.status,
        external_id: exec.external_id.clone(),
        exit_code: exec.exit_code,
        failure: exec.failure.clone(),
        completed_at: exec.completed_at,
    });
    exec.version += 1;
    tx.event(RunEventKind::ExecutionChanged {
        execution_id: exec.id,
        status: exec.status,
    });
}

fn clear_deadline(idx: &mut Index, exec: &ExecState) {
    if let Some(d) = exec.deadline {
        idx.deadlines.remove(&(d, exec.id));
    }
}

/// Asks to stop an active execution (the first phase of a cancellation): records the intent
/// (the execution stays non-terminal, its `failure` says why) and asks the executor to stop it.
/// The execution is recorded ended by [`confirm`] when the executor says it stopped.
fn request_cancel(idx: &mut Index, exec: &mut ExecState, reason: String, tx: &mut Tx) {
    if exec.status.is_terminal() || exec.canceling() {
        return;
    }
    clear_deadline(idx, exec);
    exec.failure = Some(reason);
    write_exec(exec, tx);
    tx.effects.push(Command::Cancel {
        run_id: tx.run_id,
        handle: exec.handle(),
    });
}

/// The second phase of a cancellation: the executor says the execution at `loc` stopped (it
/// was cancelled, finished or lost). Records it ended as its step was decided (`failed` for a
/// timeout, `canceled` otherwise) and ends its stage and the run when nothing runs any more.
fn confirm(idx: &mut Index, run: &mut RunState, loc: Loc, exit_code: Option<i32>, tx: &mut Tx) {
    let Some(step) = run
        .jobs
        .get_mut(loc.job)
        .and_then(|j| j.steps.get_mut(loc.step))
    else {
        return;
    };
    if !step.status.is_terminal() {
        step_event(step, WorkEvent::Cancel, tx);
    }
    let event = match step.status {
        StepStatus::Failed => WorkEvent::Fail,
        StepStatus::Pending
        | StepStatus::Running
        | StepStatus::Succeeded
        | StepStatus::Canceled
        | StepStatus::Skipped => WorkEvent::Cancel,
    };
    let Some(exec) = step.exec.as_mut() else {
        return;
    };
    let failure = exec.failure.clone();
    exec_event(exec, event, exit_code, failure, tx);
    clear_deadline(idx, exec);
    if run.ending.is_none() {
        // A stopped execution in a run that is not ending (rows written by an older
        // version): end the run the way its stage ends.
        fail_job(idx, run, loc.job, tx);
        return;
    }
    settle_ending(run, tx);
}

/// Ends the stages, then the run, of an ending run once none of their executions is active.
fn settle_ending(run: &mut RunState, tx: &mut Tx) {
    let Some(end) = run.ending else { return };
    let mut all_ended = true;
    for job in &mut run.jobs {
        if job.status.is_terminal() {
            continue;
        }
        let active = job
            .steps
            .iter()
            .any(|s| s.exec.as_ref().is_some_and(|e| !e.status.is_terminal()));
        match job.ending {
            Some(target) if !active => {
                let event = match target {
                    Status::Failed => WorkEvent::Fail,
                    Status::Skipped => WorkEvent::Skip,
                    Status::Pending | Status::Running | Status::Succeeded | Status::Canceled => {
                        WorkEvent::Cancel
                    }
                };
                if job.status == JobStatus::Pending && event == WorkEvent::Fail {
                    job_event(job, WorkEvent::Start, tx);
                }
                job_event(job, event, tx);
            }
            Some(_) | None => all_ended = false,
        }
        all_ended &= job.status.is_terminal();
    }
    if all_ended {
        let event = match end {
            RunStatus::Canceled => RunFsmEvent::Cancel,
            RunStatus::Pending | RunStatus::Running | RunStatus::Success | RunStatus::Failed => {
                RunFsmEvent::Fail
            }
        };
        run_event(run, event, tx);
        tx.effects.push(Command::RunEnded {
            run_id: run.id,
            status: run.status,
        });
    }
}

// ---- scheduling ---------------------------------------------------------------------------

/// Moves the run forward as far as it can go without new facts.
fn advance(config: &OrchestratorConfig, idx: &mut Index, run: &mut RunState, tx: &mut Tx) {
    if run.ending.is_some() {
        settle_ending(run, tx);
        return;
    }
    while !run.status.is_terminal() {
        let Some(ji) = run
            .jobs
            .iter()
            .position(|j| j.status != JobStatus::Succeeded)
        else {
            run_event(run, RunFsmEvent::Start, tx);
            run_event(run, RunFsmEvent::Succeed, tx);
            tx.effects.push(Command::RunEnded {
                run_id: run.id,
                status: run.status,
            });
            return;
        };
        match run.jobs[ji].status {
            JobStatus::Pending => {
                job_event(&mut run.jobs[ji], WorkEvent::Start, tx);
                run_event(run, RunFsmEvent::Start, tx);
            }
            JobStatus::Running => {
                let wave = run.jobs[ji]
                    .steps
                    .iter()
                    .find(|s| s.status != StepStatus::Succeeded)
                    .map(|s| s.wave);
                let Some(wave) = wave else {
                    job_event(&mut run.jobs[ji], WorkEvent::Succeed, tx);
                    let status = run.status;
                    set_run_status(run, status, tx);
                    continue;
                };
                let pending: Vec<usize> = run.jobs[ji]
                    .steps
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.wave == wave && s.status == StepStatus::Pending)
                    .map(|(i, _)| i)
                    .collect();
                for si in pending {
                    if run.status.is_terminal() || run.ending.is_some() {
                        break;
                    }
                    start_attempt(config, idx, run, ji, si, 1, tx);
                }
                return;
            }
            JobStatus::Succeeded => return,
            JobStatus::Failed | JobStatus::Canceled | JobStatus::Skipped => {
                // Rows that disagree with the run status: end the run the way its job ended.
                fail_job(idx, run, ji, tx);
                return;
            }
        }
    }
}

/// Starts attempt `attempt` of a step: records it, then submits it (or fails the step when it
/// cannot be described).
fn start_attempt(
    config: &OrchestratorConfig,
    idx: &mut Index,
    run: &mut RunState,
    ji: usize,
    si: usize,
    attempt: u32,
    tx: &mut Tx,
) {
    let stage = run.jobs[ji].stage;
    let index = run.jobs[ji].steps[si].index;
    let inputs = run.artifacts.before(stage);
    let spec = build_spec(config, run, stage, index, attempt, &inputs);
    drop(inputs);
    let step = &mut run.jobs[ji].steps[si];
    let next = crate::fsm::step::on(step.status, WorkEvent::Start).unwrap_or(step.status);
    step_update(step, next, attempt, tx);
    let id = ExecutionId::derive(step.id, attempt);
    let (status, failure, completed_at) = match &spec {
        Ok(_) => (Status::Pending, None, None),
        Err(e) => (Status::Failed, Some(e.to_string()), Some(tx.now)),
    };
    let timeout = match &spec {
        Ok(s) => s.timeout,
        Err(_) => None,
    };
    let deadline = timeout.map(|t| tx.now + t);
    tx.writes.push(Write::InsertExecution(Execution {
        id,
        job_step_id: step.id,
        attempt,
        executor_type: config.executor_type.clone(),
        external_id: String::new(),
        status,
        exit_code: None,
        failure: failure.clone(),
        version: 0,
        submitted_at: tx.now,
        completed_at,
    }));
    tx.event(RunEventKind::ExecutionChanged {
        execution_id: id,
        status,
    });
    step.exec = Some(ExecState {
        id,
        attempt,
        version: 0,
        status,
        external_id: String::new(),
        exit_code: None,
        failure,
        completed_at,
        timeout,
        deadline,
    });
    match spec {
        Ok(spec) => {
            idx.execs.insert(
                id,
                Loc {
                    run: run.id,
                    job: ji,
                    step: si,
                },
            );
            if let Some(d) = deadline {
                idx.deadlines.insert((d, id));
            }
            tx.effects.push(Command::Submit(Arc::new(spec)));
        }
        Err(_) => {
            step_event(step, WorkEvent::Fail, tx);
            fail_job(idx, run, ji, tx);
        }
    }
}

/// The step at `loc` and its current execution, if `execution_id` is that execution.
fn current(run: &mut RunState, loc: Loc, execution_id: ExecutionId) -> Option<&mut StepState> {
    let step = run.jobs.get_mut(loc.job)?.steps.get_mut(loc.step)?;
    match &step.exec {
        Some(e) if e.id == execution_id => Some(step),
        Some(_) | None => None,
    }
}

fn started(
    run: &mut RunState,
    loc: Loc,
    execution_id: ExecutionId,
    external_id: Option<String>,
    tx: &mut Tx,
) {
    let Some(step) = current(run, loc, execution_id) else {
        return;
    };
    let Some(exec) = step.exec.as_mut() else {
        return;
    };
    let learned = match external_id {
        Some(ext) if !ext.is_empty() && exec.external_id != ext => {
            exec.external_id = ext;
            true
        }
        Some(_) | None => false,
    };
    if exec.canceling() {
        // Asked to stop, and the executor has it: a cancel sent before the executor knew the
        // execution (or its id) is sent again now.
        let first = exec.status == Status::Pending;
        if first {
            exec_event(exec, WorkEvent::Start, None, None, tx);
        } else if learned {
            write_exec(exec, tx);
        }
        if first || learned {
            tx.effects.push(Command::Cancel {
                run_id: tx.run_id,
                handle: exec.handle(),
            });
        }
        return;
    }
    match exec.status {
        Status::Pending => {
            // `exec_event` writes the (possibly new) external id with the status.
            exec_event(exec, WorkEvent::Start, None, None, tx);
        }
        Status::Running => {
            if learned {
                write_exec(exec, tx);
            }
        }
        Status::Succeeded | Status::Failed | Status::Canceled | Status::Skipped => {
            // Its end was reported before the answer to its submission (an executor that
            // finishes at once): record the id all the same. One recorded ended without
            // running to completion (lost) is cancelled with the real handle, in case the
            // executor still has it.
            if learned {
                write_exec(exec, tx);
                if exec.exit_code.is_none() && exec.status != Status::Succeeded {
                    tx.effects.push(Command::Cancel {
                        run_id: tx.run_id,
                        handle: exec.handle(),
                    });
                }
            }
        }
    }
}

fn finished(
    config: &OrchestratorConfig,
    idx: &mut Index,
    run: &mut RunState,
    loc: Loc,
    execution_id: ExecutionId,
    result: &ExecutionResult,
    tx: &mut Tx,
) {
    let stage = run.jobs.get(loc.job).map(|j| (j.id, j.stage));
    let Some((job_id, stage)) = stage else { return };
    let ending = run.ending.is_some();
    let Some(step) = current(run, loc, execution_id) else {
        return;
    };
    let step_id = step.id;
    let Some(exec) = step.exec.as_mut() else {
        return;
    };
    if exec.status.is_terminal() {
        return;
    }
    if exec.canceling() || ending {
        confirm(idx, run, loc, Some(result.exit_code), tx);
        return;
    }
    clear_deadline(idx, exec);
    let success = result.exit_code == 0 && result.failure.is_none();
    if !success {
        exec_event(
            exec,
            WorkEvent::Fail,
            Some(result.exit_code),
            result.failure.clone(),
            tx,
        );
        step_event(step, WorkEvent::Fail, tx);
        fail_job(idx, run, loc.job, tx);
        return;
    }
    exec_event(exec, WorkEvent::Succeed, Some(0), None, tx);
    step_event(step, WorkEvent::Succeed, tx);
    let artifacts: Vec<Artifact> =
        stages::register_artifacts(result, run.id, job_id, step_id, tx.now);
    for a in artifacts {
        if run.artifacts.contains(a.id) {
            continue;
        }
        run.artifacts.push(stage, stages::as_input(&a));
        let artifact_id = a.id;
        tx.writes.push(Write::InsertArtifact(a));
        tx.event(RunEventKind::ArtifactRegistered { artifact_id });
    }
    advance(config, idx, run, tx);
}

fn lost(
    config: &OrchestratorConfig,
    idx: &mut Index,
    run: &mut RunState,
    loc: Loc,
    execution_id: ExecutionId,
    reason: String,
    tx: &mut Tx,
) {
    let ending = run.ending.is_some();
    let Some(step) = current(run, loc, execution_id) else {
        return;
    };
    let Some(exec) = step.exec.as_mut() else {
        return;
    };
    if exec.status.is_terminal() {
        return;
    }
    if exec.canceling() || ending {
        confirm(idx, run, loc, None, tx);
        return;
    }
    clear_deadline(idx, exec);
    let attempt = exec.attempt;
    exec_event(exec, WorkEvent::Fail, None, Some(reason), tx);
    idx.execs.remove(&execution_id);
    if attempt < config.max_attempts {
        start_attempt(config, idx, run, loc.job, loc.step, attempt + 1, tx);
    } else {
        step_event(step, WorkEvent::Fail, tx);
        fail_job(idx, run, loc.job, tx);
    }
}

fn timed_out(
    idx: &mut Index,
    run: &mut RunState,
    loc: Loc,
    execution_id: ExecutionId,
    tx: &mut Tx,
) {
    let Some(step) = current(run, loc, execution_id) else {
        return;
    };
    let Some(exec) = step.exec.as_mut() else {
        return;
    };
    if exec.status.is_terminal() || exec.canceling() {
        return;
    }
    let limit = exec.timeout.unwrap_or_default();
    let failure = format!("timed out after {}", fmt_duration(limit));
    request_cancel(idx, exec, failure, tx);
    step_event(step, WorkEvent::Fail, tx);
    fail_job(idx, run, loc.job, tx);
}

/// Fails job `ji` and the run: running siblings are asked to stop, steps and later stages that
/// never started are skipped; the stage and the run end once every execution stopped.
fn fail_job(idx: &mut Index, run: &mut RunState, ji: usize, tx: &mut Tx) {
    let end = match run.jobs.get(ji).map(|j| j.status) {
        Some(JobStatus::Canceled) => RunStatus::Canceled,
        Some(_) | None => RunStatus::Failed,
    };
    stop_run(idx, run, ji, end, tx);
}

/// Cancels a run: every active execution is asked to stop, every step and stage that did not
/// end is cancelled; the run ends once every execution stopped.
fn cancel_run(idx: &mut Index, run: &mut RunState, tx: &mut Tx) {
    stop_run(idx, run, 0, RunStatus::Canceled, tx);
}

/// The first phase of ending a run as `end` from job `from` on (see the module docs): records
/// the decision for every step and stage that did not end and asks every active execution to
/// stop. A run that is already ending keeps the status it ends with.
fn stop_run(idx: &mut Index, run: &mut RunState, from: usize, end: RunStatus, tx: &mut Tx) {
    if run.status.is_terminal() {
        return;
    }
    let end = *run.ending.get_or_insert(end);
    let reason = match end {
        RunStatus::Canceled => "canceled on request",
        RunStatus::Pending | RunStatus::Running | RunStatus::Success | RunStatus::Failed => {
            "canceled: the run failed"
        }
    };
    for (i, job) in run.jobs.iter_mut().enumerate() {
        if i < from || job.status.is_terminal() {
            continue;
        }
        for step in &mut job.steps {
            match step.status {
                StepStatus::Running => step_event(step, WorkEvent::Cancel, tx),
                StepStatus::Pending if end == RunStatus::Canceled => {
                    step_event(step, WorkEvent::Cancel, tx);
                }
                StepStatus::Pending => step_event(step, WorkEvent::Skip, tx),
                StepStatus::Succeeded
                | StepStatus::Failed
                | StepStatus::Canceled
                | StepStatus::Skipped => {}
            }
            if let Some(exec) = step.exec.as_mut() {
                request_cancel(idx, exec, reason.to_owned(), tx);
            }
        }
        job.ending.get_or_insert(match (end, i == from) {
            (RunStatus::Canceled, _) => JobStatus::Canceled,
            (_, true) => JobStatus::Failed,
            (_, false) => JobStatus::Skipped,
        });
    }
    settle_ending(run, tx);
}
