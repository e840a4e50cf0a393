//! Tests: sim. A `Sim` harness (after quinn's `Pair`): a fake clock, a scripted executor and a
//! model store that applies `Persist` batches compare-and-set, driving the pure orchestrator
//! one command at a time so tests can crash it at any command boundary and rebuild it from the
//! store. It checks the engine's invariants as it goes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::config::{
    ArtifactSelector, DeploySpec, OutputSpec, PipelineSpec, StageSpec, StepSpec, Template, Triggers,
};
use crate::domain::{
    ArtifactId, ArtifactType, ExecutionId, JobType, PipelineId, RunId, RunPhase, RunStatus, Status,
    Trigger,
};
use crate::executor::{ExecHandle, ExecutionResult, ExecutionSpec, ProducedArtifact, SourceSpec};
use crate::orchestrator::{
    Command, Input, Orchestrator, OrchestratorConfig, RunDocument, RunRequest, new_run, retry_run,
};
use crate::store::{Batch, NewRun, RunEvent, RunEventKind, RunRecord, Write};
use crate::time::Timestamp;

// ---- specs -------------------------------------------------------------------------------

pub(super) fn step(name: &str) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        run: format!("make {name}"),
        image: None,
        env: BTreeMap::new(),
        timeout: None,
        workdir: None,
        outputs: Vec::new(),
        parallel_group: None,
    }
}

pub(super) fn output(t: ArtifactType, path: &str, name: Option<&str>) -> OutputSpec {
    OutputSpec {
        artifact_type: t,
        path: Some(Template::parse(path).unwrap()),
        image_ref: None,
        name: name.map(str::to_owned),
    }
}

pub(super) fn stage(steps: Vec<StepSpec>) -> StageSpec {
    StageSpec {
        image: Some("golang:1.23".to_owned()),
        env: BTreeMap::from([("GOFLAGS".to_owned(), Template::literal("-mod=mod"))]),
        steps,
    }
}

/// Build (go-build → binary, chart → helm chart), test (unit, lint), deploy the chart.
pub(super) fn full_spec() -> PipelineSpec {
    let mut go_build = step("go-build");
    go_build.outputs = vec![output(ArtifactType::Binary, "bin/app", Some("app"))];
    let mut chart = step("chart");
    chart.outputs = vec![output(
        ArtifactType::HelmChart,
        "dist/app-{{ .short_commit }}.tgz",
        Some("chart"),
    )];
    let mut unit = step("unit");
    unit.outputs = vec![output(ArtifactType::Coverage, "coverage.out", None)];
    PipelineSpec {
        triggers: Triggers::default(),
        build: Some(stage(vec![go_build, chart])),
        test: Some(stage(vec![unit, step("lint")])),
        deploy: Some(DeploySpec {
            artifact: ArtifactSelector::Type(ArtifactType::HelmChart),
            target: "local".to_owned(),
            namespace: Template::parse("apps-{{ .branch }}").unwrap(),
            release: Some(Template::literal("app")),
            values: BTreeMap::from([(
                "image.tag".to_owned(),
                Template::parse("{{ .short_commit }}").unwrap(),
            )]),
            image: Some("alpine/helm:3".to_owned()),
            branches: Vec::new(),
            timeout: None,
        }),
    }
}

pub(super) fn request(spec: PipelineSpec, trigger: Trigger, branch: &str) -> RunRequest {
    RunRequest {
        pipeline_id: PipelineId::from_uuid(Uuid::from_u128(7)),
        pipeline_name: "app".to_owned(),
        project_name: "demo".to_owned(),
        spec: Arc::new(spec),
        source: SourceSpec {
            clone_url: "file:///srv/git/app.git".to_owned(),
            commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            git_ref: format!("refs/heads/{branch}"),
            copy_working_tree: false,
        },
        branch: branch.to_owned(),
        default_branch: "main".to_owned(),
        trigger,
        stages: None,
        requested_by: "test".to_owned(),
    }
}

// ---- model store -------------------------------------------------------------------------

/// A store model: one `RunRecord` per run, updates compare-and-set on versions, identical
/// replays accepted. Records every violation of the engine's invariants it can see.
#[derive(Debug, Default)]
pub(super) struct ModelStore {
    pub(super) runs: BTreeMap<RunId, RunRecord>,
    pub(super) events: Vec<RunEvent>,
    pub(super) violations: Vec<String>,
}

impl ModelStore {
    pub(super) fn create(&mut self, new: NewRun) {
        self.runs.insert(
            new.run.id,
            RunRecord {
                run: new.run,
                jobs: new.jobs,
                steps: new.steps,
                executions: Vec::new(),
                artifacts: Vec::new(),
            },
        );
    }

    fn check_version(
        &mut self,
        what: &str,
        stored: u64,
        expected: u64,
        same: bool,
    ) -> Result<bool, String> {
        if stored == expected {
            Ok(true)
        } else if same {
            Ok(false)
        } else {
            Err(format!(
                "{what}: conflict (expected {expected}, stored {stored})"
            ))
        }
    }

    fn absorbing(&mut self, what: &str, terminal: bool, old: String, new: String) {
        if terminal && old != new {
            self.violations
                .push(format!("terminal {what} moved from {old} to {new}"));
        }
    }

    /// Applies a batch all or nothing.
    pub(super) fn apply(&mut self, run_id: RunId, batch: &Batch) -> Result<(), String> {
        let Some(mut rec) = self.runs.get(&run_id).cloned() else {
            return Err(format!("run {run_id} not found"));
        };
        let mut events = Vec::new();
        for w in &batch.writes {
            match w {
                Write::UpdateRun {
                    id,
                    expected_version,
                    status,
                    phase,
                    started_at,
                    finished_at,
                } => {
                    assert_eq!(*id, run_id);
                    let r = &rec.run;
                    let same = (r.status, r.phase, r.started_at, r.finished_at)
                        == (*status, *phase, *started_at, *finished_at);
                    let (v, old) = (r.version, r.status);
                    if self.check_version("run", v, *expected_version, same)? {
                        self.absorbing(
                            "run",
                            old.is_terminal(),
                            old.to_string(),
                            status.to_string(),
                        );
                        let r = &mut rec.run;
                        r.status = *status;
                        r.phase = *phase;
                        r.started_at = *started_at;
                        r.finished_at = *finished_at;
                        r.version += 1;
                    }
                }
                Write::UpdateJob {
                    id,
                    expected_version,
                    status,
                    started_at,
                    finished_at,
                } => {
                    let j = rec.jobs.iter().position(|j| j.id == *id).ok_or("no job")?;
                    let row = &rec.jobs[j];
                    let same = (row.status, row.started_at, row.finished_at)
                        == (*status, *started_at, *finished_at);
                    let (v, old) = (row.version, row.status);
                    if self.check_version("job", v, *expected_version, same)? {
                        self.absorbing(
                            "job",
                            old.is_terminal(),
                            old.to_string(),
                            status.to_string(),
                        );
                        let row = &mut rec.jobs[j];
                        row.status = *status;
                        row.started_at = *started_at;
                        row.finished_at = *finished_at;
                        row.version += 1;
                    }
                }
                Write::UpdateStep {
                    id,
                    expected_version,
                    status,
                    attempt,
                    started_at,
                    finished_at,
                } => {
                    let s = rec
                        .steps
                        .iter()
                        .position(|s| s.id == *id)
                        .ok_or("no step")?;
                    let row = &rec.steps[s];
                    let same = (row.status, row.attempt, row.started_at, row.finished_at)
                        == (*status, *attempt, *started_at, *finished_at);
                    let (v, old) = (row.version, row.status);
                    if self.check_version("step", v, *expected_version, same)? {
                        self.absorbing(
                            "step",
                            old.is_terminal(),
                            old.to_string(),
                            status.to_string(),
                        );
                        let row = &mut rec.steps[s];
                        row.status = *status;
                        row.attempt = *attempt;
                        row.started_at = *started_at;
                        row.finished_at = *finished_at;
                        row.version += 1;
                    }
                }
                Write::InsertExecution(e) => match rec.executions.iter().find(|x| x.id == e.id) {
                    Some(x) if x == e => {}
                    Some(_) => return Err(format!("execution {} already exists", e.id)),
                    None => rec.executions.push(e.clone()),
                },
                Write::UpdateExecution {
                    id,
                    expected_version,
                    status,
                    external_id,
                    exit_code,
                    failure,
                    completed_at,
                } => {
                    let i = rec
                        .executions
                        .iter()
                        .position(|e| e.id == *id)
                        .ok_or("no execution")?;
                    let row = &rec.executions[i];
                    let same = (
                        row.status,
                        &row.external_id,
                        row.exit_code,
                        &row.failure,
                        row.completed_at,
                    ) == (*status, external_id, *exit_code, failure, *completed_at);
                    let (v, old) = (row.version, row.status);
                    if self.check_version("execution", v, *expected_version, same)? {
                        self.absorbing(
                            "execution",
                            old.is_terminal(),
                            old.to_string(),
                            status.to_string(),
                        );
                        let row = &mut rec.executions[i];
                        row.status = *status;
                        row.external_id = external_id.clone();
                        row.exit_code = *exit_code;
                        row.failure = failure.clone();
                        row.completed_at = *completed_at;
                        row.version += 1;
                    }
                }
                Write::InsertArtifact(a) => match rec.artifacts.iter().find(|x| x.id == a.id) {
                    Some(x) if x == a => {}
                    Some(_) => return Err(format!("artifact {} already exists", a.id)),
                    None => rec.artifacts.push(a.clone()),
                },
                Write::AppendEvent(e) => events.push(e.clone()),
            }
        }
        rec.executions.sort_by_key(|e| (e.job_step_id, e.attempt));
        self.runs.insert(run_id, rec);
        self.events.extend(events);
        Ok(())
    }
}

// ---- scripted executor -------------------------------------------------------------------

/// What an execution of a step does, by attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Succeed,
    Exit(i32),
    Lose,
    Hang,
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ExecPhase {
    Running,
    Done,
    Canceled,
}

#[derive(Debug)]
struct SimExec {
    spec: ExecutionSpec,
    external_id: String,
    phase: ExecPhase,
    result: Option<Input>,
}

// ---- the harness --------------------------------------------------------------------------

/// Drives an orchestrator with a fake clock, a scripted executor and a model store.
#[derive(Debug)]
pub(super) struct Sim {
    pub(super) now: Timestamp,
    pub(super) orch: Orchestrator,
    pub(super) config: OrchestratorConfig,
    pub(super) store: ModelStore,
    /// Commands returned by the orchestrator and not yet carried out.
    pub(super) queue: std::collections::VecDeque<Command>,
    /// Inputs the executor will deliver, by time.
    reports: BTreeMap<(Timestamp, u64), Input>,
    seq: u64,
    script: HashMap<(String, u32), Outcome>,
    durations: HashMap<String, Duration>,
    execs: HashMap<ExecutionId, SimExec>,
    /// Every spec submitted, in order, with the time (repeated submits included).
    pub(super) submits: Vec<(Timestamp, ExecutionSpec)>,
    /// Every cancel carried out.
    pub(super) cancels: Vec<ExecHandle>,
    /// Runs reported ended.
    pub(super) ended: BTreeMap<RunId, RunStatus>,
    pub(super) violations: Vec<String>,
    next_run: u128,
    /// The last report delivered (for duplicate-delivery tests).
    pub(super) last_report: Option<Input>,
    /// Whether the executor was polled since the last progress (the driver's status-polling
    /// fallback, done once per quiet period).
    polled: bool,
}

impl Sim {
    pub(super) fn new(config: OrchestratorConfig) -> Self {
        Self {
            now: Timestamp::from_unix_micros(1_800_000_000_000_000),
            orch: Orchestrator::new(config.clone()),
            config,
            store: ModelStore::default(),
            queue: Default::default(),
            reports: BTreeMap::new(),
            seq: 0,
            script: HashMap::new(),
            durations: HashMap::new(),
            execs: HashMap::new(),
            submits: Vec::new(),
            cancels: Vec::new(),
            ended: BTreeMap::new(),
            violations: Vec::new(),
            next_run: 1,
            last_report: None,
            polled: false,
        }
    }

    pub(super) fn default_config() -> OrchestratorConfig {
        OrchestratorConfig {
            max_attempts: 3,
            default_step_timeout: Some(Duration::from_secs(600)),
            executor_type: "sim".to_owned(),
        }
    }

    /// Scripts `step`'s attempt `attempt`.
    pub(super) fn script(&mut self, step: &str, attempt: u32, outcome: Outcome) {
        self.script.insert((step.to_owned(), attempt), outcome);
    }

    /// How long `step`'s executions run (default 1s).
    pub(super) fn duration(&mut self, step: &str, d: Duration) {
        self.durations.insert(step.to_owned(), d);
    }

    fn next_run_id(&mut self) -> RunId {
        self.next_run += 1;
        RunId::from_uuid(Uuid::from_u128(
            0x0192_0000_0000_7000_8000_0000_0000_0000 + self.next_run,
        ))
    }

    /// Creates a run in the store and hands it to the orchestrator.
    pub(super) fn create(&mut self, req: &RunRequest) -> RunId {
        let id = self.next_run_id();
        let new = new_run(req, id, self.now).expect("plannable run");
        self.store.create(new);
        self.load(id);
        id
    }

    /// Creates the retry of a failed run.
    pub(super) fn retry(&mut self, original: RunId) -> RunId {
        let id = self.next_run_id();
        let new = retry_run(&self.store.runs[&original], id, self.now, "test").expect("retryable");
        self.store.create(new);
        self.load(id);
        id
    }

    fn load(&mut self, id: RunId) {
        let record = Box::new(self.store.runs[&id].clone());
        self.input(Input::RunLoaded {
            record,
            document: None,
        });
    }

    /// Feeds an input now.
    pub(super) fn input(&mut self, input: Input) {
        let cmds = self.orch.handle(self.now, input);
        // Persist commands come before every other command of the call.
        let first_effect = cmds
            .iter()
            .position(|c| !matches!(c, Command::Persist { .. }));
        if let Some(i) = first_effect
            && cmds[i..]
                .iter()
                .any(|c| matches!(c, Command::Persist { .. }))
        {
            self.violations
                .push("a persist after a side effect".to_owned());
        }
        self.queue.extend(cmds);
    }

    /// Delivers `input` from the executor after `after`.
    fn report(&mut self, after: Duration, input: Input) {
        self.seq += 1;
        self.reports.insert((self.now + after, self.seq), input);
    }

    /// Crashes the orchestrator (pending commands are lost) and rebuilds it from the store.
    pub(super) fn crash_and_restore(&mut self) {
        self.queue.clear();
        self.orch = Orchestrator::new(self.config.clone());
        let open: Vec<RunId> = self
            .store
            .runs
            .values()
            .filter(|r| !r.run.status.is_terminal())
            .map(|r| r.run.id)
            .collect();
        for id in open {
            self.load(id);
        }
    }

    /// Carries out one command, or delivers the next report or timer. False when idle.
    pub(super) fn step(&mut self) -> bool {
        if let Some(cmd) = self.queue.pop_front() {
            self.execute(cmd);
            return true;
        }
        let next_report = self.reports.keys().next().copied();
        let timer = self.orch.poll_timeout();
        if next_report.is_none() && !self.polled {
            // Quiet: poll the executor about every active execution, as the driver does.
            self.polled = true;
            let active = self.orch.active_executions();
            if !active.is_empty() {
                for handle in active {
                    self.execute(Command::Check {
                        run_id: RunId::from_uuid(Uuid::nil()),
                        handle,
                    });
                }
                return true;
            }
        }
        match (next_report, timer) {
            (None, None) => false,
            (Some((t, seq)), timer) if timer.is_none_or(|d| t <= d) => {
                let input = self.reports.remove(&(t, seq)).expect("present");
                self.now = self.now.max(t);
                if let Input::ExecutionFinished { execution_id, .. }
                | Input::ExecutionLost { execution_id, .. } = &input
                    && let Some(e) = self.execs.get_mut(execution_id)
                    && e.phase == ExecPhase::Running
                {
                    e.phase = ExecPhase::Done;
                }
                if !matches!(input, Input::ExecutionStarted { .. }) {
                    self.polled = false;
                }
                self.last_report = Some(input.clone());
                self.input(input);
                true
            }
            (_, Some(d)) => {
                self.now = self.now.max(d);
                self.polled = false;
                self.input(Input::TimerFired);
                true
            }
            (Some(_), None) => unreachable!("covered above"),
        }
    }

    /// Runs until idle (bounded).
    pub(super) fn drive(&mut self) {
        assert!(self.drive_bounded(100_000), "simulation did not settle");
    }

    pub(super) fn drive_bounded(&mut self, max_steps: usize) -> bool {
        for _ in 0..max_steps {
            if !self.step() {
                return true;
            }
        }
        false
    }

    fn execute(&mut self, cmd: Command) {
        match cmd {
            Command::Persist { run_id, batch } => {
                if let Err(e) = self.store.apply(run_id, &batch) {
                    self.violations.push(format!("commit failed: {e}"));
                }
            }
            Command::Submit(spec) => self.submit(ExecutionSpec::clone(&spec)),
            Command::Cancel { handle, .. } => {
                self.cancels.push(handle.clone());
                if let Some(e) = self.execs.get_mut(&handle.execution_id)
                    && e.phase == ExecPhase::Running
                {
                    e.phase = ExecPhase::Canceled;
                    let execution_id = handle.execution_id;
                    self.report(Duration::ZERO, Input::ExecutionCanceled { execution_id });
                }
            }
            Command::Check { handle, .. } => {
                let id = handle.execution_id;
                let input = match self.execs.get(&id) {
                    None => Input::ExecutionLost {
                        execution_id: id,
                        reason: "unknown to the executor".to_owned(),
                    },
                    Some(e) => match e.phase {
                        ExecPhase::Running => Input::ExecutionStarted {
                            execution_id: id,
                            external_id: Some(e.external_id.clone()),
                        },
                        ExecPhase::Done => e.result.clone().expect("done has a result"),
                        ExecPhase::Canceled => Input::ExecutionCanceled { execution_id: id },
                    },
                };
                self.report(Duration::ZERO, input);
            }
            Command::RunEnded { run_id, status } => {
                self.ended.insert(run_id, status);
            }
        }
    }

    fn check_submit(&mut self, spec: &ExecutionSpec) {
        let Some(rec) = self.store.runs.get(&spec.run_id) else {
            self.violations.push("submit of an unknown run".to_owned());
            return;
        };
        if rec.run.status.is_terminal() {
            self.violations
                .push(format!("submit in a {} run", rec.run.status));
        }
        let Some(row) = rec.steps.iter().find(|s| s.id == spec.step_id) else {
            self.violations.push("submit of an unknown step".to_owned());
            return;
        };
        if row.status != Status::Running {
            self.violations.push(format!(
                "submit of {} which is recorded {}",
                spec.step_name, row.status
            ));
        }
        if rec
            .executions
            .iter()
            .any(|e| e.job_step_id == row.id && e.status == Status::Succeeded)
        {
            self.violations.push(format!(
                "{} executed again after it succeeded",
                spec.step_name
            ));
        }
        match rec.executions.iter().find(|e| e.id == spec.execution_id) {
            Some(e) if e.status == Status::Pending => {}
            Some(e) => self.violations.push(format!(
                "submit of execution {} recorded {}",
                e.id, e.status
            )),
            None => self
                .violations
                .push("submit before its execution was persisted".to_owned()),
        }
        // Predecessors: every earlier stage succeeded; every earlier wave of this stage too.
        for job in &rec.jobs {
            let earlier = JobType::ORDER.iter().position(|s| *s == job.job_type)
                < JobType::ORDER.iter().position(|s| *s == spec.stage);
            if earlier && job.status != Status::Succeeded {
                self.violations.push(format!(
                    "{} started while stage {} is {}",
                    spec.step_name, job.job_type, job.status
                ));
            }
        }
        let mut same_job: Vec<_> = rec
            .steps
            .iter()
            .filter(|s| s.job_id == spec.job_id)
            .collect();
        same_job.sort_by_key(|s| s.execution_order);
        for s in &same_job {
            if s.execution_order >= row.execution_order {
                break;
            }
            let same_wave = row.parallel_group.is_some()
                && s.parallel_group == row.parallel_group
                && same_job
                    .iter()
                    .filter(|x| {
                        x.execution_order > s.execution_order
                            && x.execution_order < row.execution_order
                    })
                    .all(|x| x.parallel_group == row.parallel_group);
            if !same_wave && s.status != Status::Succeeded {
                self.violations.push(format!(
                    "{} started before {} ended ({})",
                    spec.step_name, s.name, s.status
                ));
            }
        }
        // Artifacts of earlier stages are available (deploy takes the one it deploys).
        let doc = RunDocument::from_run(&rec.run).expect("document");
        let earlier: BTreeSet<ArtifactId> = rec
            .artifacts
            .iter()
            .filter(|a| {
                rec.jobs
                    .iter()
                    .find(|j| j.id == a.job_id)
                    .is_some_and(|j| j.job_type < spec.stage)
            })
            .map(|a| a.id)
            .chain(
                doc.inherited_artifacts
                    .iter()
                    .filter(|a| a.stage < spec.stage)
                    .map(|a| a.artifact.id),
            )
            .collect();
        let inputs: BTreeSet<ArtifactId> = spec.inputs.iter().map(|i| i.id).collect();
        let ok = match spec.stage {
            JobType::Deploy => inputs.len() == 1 && inputs.is_subset(&earlier),
            JobType::Build | JobType::Test => inputs == earlier,
        };
        if !ok {
            self.violations.push(format!(
                "{} got inputs {inputs:?}, earlier stages produced {earlier:?}",
                spec.step_name
            ));
        }
    }

    fn submit(&mut self, spec: ExecutionSpec) {
        self.check_submit(&spec);
        self.submits.push((self.now, spec.clone()));
        let id = spec.execution_id;
        if let Some(e) = self.execs.get(&id) {
            // Idempotent: adopt the existing execution.
            let external_id = Some(e.external_id.clone());
            self.report(
                Duration::ZERO,
                Input::ExecutionStarted {
                    execution_id: id,
                    external_id,
                },
            );
            return;
        }
        let outcome = self
            .script
            .get(&(spec.step_name.clone(), spec.attempt))
            .copied()
            .unwrap_or(Outcome::Succeed);
        if outcome == Outcome::Refuse {
            self.report(
                Duration::ZERO,
                Input::ExecutionLost {
                    execution_id: id,
                    reason: "submit refused".to_owned(),
                },
            );
            return;
        }
        let external_id = format!("sim-{}", self.execs.len() + 1);
        let duration = self
            .durations
            .get(&spec.step_name)
            .copied()
            .unwrap_or(Duration::from_secs(1));
        let artifacts = spec
            .outputs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let mut name = id.0.as_bytes().to_vec();
                name.push(u8::try_from(i).unwrap_or(u8::MAX));
                ProducedArtifact {
                    id: ArtifactId::from_uuid(Uuid::new_v5(&Uuid::NAMESPACE_OID, &name)),
                    artifact_type: o.artifact_type,
                    name: o.name.clone(),
                    path: o.path.clone(),
                    storage_backend: "memory".to_owned(),
                    storage_path: format!("{id}/{i}"),
                    checksum: Some(format!("sha256:{:064x}", i + 1)),
                    size: 10,
                    metadata: BTreeMap::new(),
                }
            })
            .collect();
        let result = match outcome {
            Outcome::Succeed => Some(Input::ExecutionFinished {
                execution_id: id,
                result: ExecutionResult {
                    exit_code: 0,
                    logs_uri: None,
                    artifacts,
                    failure: None,
                },
            }),
            Outcome::Exit(code) => Some(Input::ExecutionFinished {
                execution_id: id,
                result: ExecutionResult {
                    exit_code: code,
                    logs_uri: None,
                    artifacts: Vec::new(),
                    failure: None,
                },
            }),
            Outcome::Lose => Some(Input::ExecutionLost {
                execution_id: id,
                reason: "pod evicted".to_owned(),
            }),
            Outcome::Hang | Outcome::Refuse => None,
        };
        self.report(
            Duration::ZERO,
            Input::ExecutionStarted {
                execution_id: id,
                external_id: Some(external_id.clone()),
            },
        );
        if let Some(r) = &result {
            self.report(duration, r.clone());
        }
        self.execs.insert(
            id,
            SimExec {
                spec,
                external_id,
                phase: ExecPhase::Running,
                result,
            },
        );
    }

    /// The executor loses `execution_id` (a node dies): it stops running it and reports it
    /// lost. An execution the executor does not run (its submission is still queued, or it
    /// ended) cannot be lost.
    pub(super) fn lose(&mut self, execution_id: ExecutionId) {
        let Some(e) = self.execs.get_mut(&execution_id) else {
            return;
        };
        if e.phase != ExecPhase::Running {
            return;
        }
        let lost = Input::ExecutionLost {
            execution_id,
            reason: "node lost".to_owned(),
        };
        e.phase = ExecPhase::Done;
        e.result = Some(lost.clone());
        self.report(Duration::ZERO, lost);
    }

    /// Runs to idle and checks the invariants that hold at rest.
    pub(super) fn settle(&mut self) {
        self.drive();
        self.check_at_rest();
    }

    pub(super) fn check_at_rest(&mut self) {
        let mut v = std::mem::take(&mut self.store.violations);
        for rec in self.store.runs.values() {
            if !rec.run.status.is_terminal() {
                continue;
            }
            for e in &rec.executions {
                if !e.status.is_terminal() {
                    v.push(format!(
                        "execution {} is {} in an ended run",
                        e.id, e.status
                    ));
                }
            }
            for s in &rec.steps {
                if !s.status.is_terminal() {
                    v.push(format!("step {} is {} in an ended run", s.name, s.status));
                }
            }
            // Every execution the executor still runs was cancelled or ended.
            for (id, e) in &self.execs {
                if e.spec.run_id == rec.run.id
                    && e.phase == ExecPhase::Running
                    && e.result.is_none()
                {
                    v.push(format!("execution {id} of {} still runs", e.spec.step_name));
                }
            }
        }
        self.violations.extend(v);
    }

    // ---- queries --------------------------------------------------------------------------

    pub(super) fn record(&self, id: RunId) -> &RunRecord {
        &self.store.runs[&id]
    }

    pub(super) fn run_status(&self, id: RunId) -> (RunStatus, RunPhase) {
        let r = &self.record(id).run;
        (r.status, r.phase)
    }

    /// `name=status@attempt` for every step of the run, in order.
    pub(super) fn steps(&self, id: RunId) -> Vec<String> {
        let rec = self.record(id);
        rec.jobs
            .iter()
            .flat_map(|j| {
                let mut steps: Vec<_> = rec.steps.iter().filter(|s| s.job_id == j.id).collect();
                steps.sort_by_key(|s| s.execution_order);
                steps
                    .into_iter()
                    .map(|s| format!("{}={}@{}", s.name, s.status, s.attempt))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub(super) fn jobs(&self, id: RunId) -> Vec<String> {
        self.record(id)
            .jobs
            .iter()
            .map(|j| format!("{}={}", j.job_type, j.status))
            .collect()
    }

    pub(super) fn submitted_names(&self, run: RunId) -> Vec<String> {
        self.submits
            .iter()
            .filter(|(_, s)| s.run_id == run)
            .map(|(_, s)| format!("{}#{}", s.step_name, s.attempt))
            .collect()
    }

    pub(super) fn assert_clean(&self) {
        assert!(
            self.violations.is_empty(),
            "violations: {:#?}",
            self.violations
        );
    }
}

// ---- scenarios -------------------------------------------------------------------------

fn sim() -> Sim {
    Sim::new(Sim::default_config())
}

#[test]
fn push_to_main_builds_tests_and_deploys() {
    let mut sim = sim();
    let run = sim.create(&request(full_spec(), Trigger::Push, "main"));
    sim.settle();
    sim.assert_clean();
    assert_eq!(
        sim.run_status(run),
        (RunStatus::Success, RunPhase::Deployed)
    );
    assert_eq!(
        sim.steps(run),
        [
            "go-build=succeeded@1",
            "chart=succeeded@1",
            "unit=succeeded@1",
            "lint=succeeded@1",
            "deploy=succeeded@1"
        ]
    );
    assert_eq!(
        sim.submitted_names(run),
        ["go-build#1", "chart#1", "unit#1", "lint#1", "deploy#1"]
    );
    assert_eq!(sim.ended.get(&run), Some(&RunStatus::Success));
    assert!(!sim.orch.owns(run));
    let rec = sim.record(run);
    assert_eq!(rec.artifacts.len(), 3, "binary, chart, coverage");
    // The phase moved through every stage, in order, and was reported as events.
    let phases: Vec<RunPhase> = sim
        .store
        .events
        .iter()
        .filter_map(|e| match e.kind {
            RunEventKind::RunChanged { phase, .. } => Some(phase),
            _ => None,
        })
        .fold(Vec::new(), |mut v, p| {
            if v.last() != Some(&p) {
                v.push(p);
            }
            v
        });
    assert_eq!(
        phases,
        [
            RunPhase::Building,
            RunPhase::Built,
            RunPhase::Testing,
            RunPhase::Tested,
            RunPhase::Deploying,
            RunPhase::Deployed
        ]
    );
}

#[test]
fn a_failed_step_fails_the_run_and_skips_the_rest_without_retry() {
    let mut sim = sim();
    sim.script("unit", 1, Outcome::Exit(2));
    let run = sim.create(&request(full_spec(), Trigger::Push, "main"));
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(run), (RunStatus::Failed, RunPhase::Testing));
    assert_eq!(
        sim.steps(run),
        [
            "go-build=succeeded@1",
            "chart=succeeded@1",
            "unit=failed@1",
            "lint=skipped@0",
            "deploy=skipped@0"
        ]
    );
    assert_eq!(
        sim.jobs(run),
        ["build=succeeded", "test=failed", "deploy=skipped"]
    );
    let unit = sim
        .record(run)
        .executions
        .iter()
        .filter(|e| e.exit_code == Some(2))
        .count();
    assert_eq!(unit, 1, "a user failure is never retried");
    assert_eq!(sim.submitted_names(run).len(), 3);
}

#[test]
fn parallel_group_runs_together_and_the_next_step_waits_for_all() {
    let mut spec = full_spec();
    let test = spec.test.as_mut().unwrap();
    let mut a = step("a");
    a.parallel_group = Some("g".to_owned());
    let mut b = step("b");
    b.parallel_group = Some("g".to_owned());
    test.steps = vec![a, b, step("c")];
    let mut sim = sim();
    sim.duration("a", Duration::from_secs(5));
    sim.duration("b", Duration::from_secs(2));
    let run = sim.create(&request(spec, Trigger::Pr, "feature/x"));
    sim.settle();
    sim.assert_clean();
    let at = |name: &str| {
        sim.submits
            .iter()
            .find(|(_, s)| s.step_name == name)
            .map(|(t, _)| *t)
            .unwrap()
    };
    assert_eq!(at("a"), at("b"), "a parallel group starts together");
    assert_eq!(
        at("c").saturating_duration_since(at("a")),
        Duration::from_secs(5)
    );
    assert_eq!(sim.run_status(run), (RunStatus::Success, RunPhase::Tested));
}

#[test]
fn a_parallel_failure_cancels_its_running_sibling() {
    let mut spec = full_spec();
    let test = spec.test.as_mut().unwrap();
    for s in &mut test.steps {
        s.parallel_group = Some("g".to_owned());
    }
    let mut sim = sim();
    sim.script("lint", 1, Outcome::Exit(1));
    sim.duration("unit", Duration::from_secs(30));
    let run = sim.create(&request(spec, Trigger::Pr, "feature/x"));
    sim.settle();
    sim.assert_clean();
    assert_eq!(
        sim.steps(run),
        [
            "go-build=succeeded@1",
            "chart=succeeded@1",
            "unit=canceled@1",
            "lint=failed@1"
        ]
    );
    assert_eq!(sim.cancels.len(), 1);
}

#[test]
fn a_step_past_its_timeout_is_cancelled_and_failed() {
    let mut spec = full_spec();
    spec.build.as_mut().unwrap().steps[0].timeout = Some(Duration::from_secs(10));
    let mut sim = sim();
    sim.script("go-build", 1, Outcome::Hang);
    let run = sim.create(&request(spec, Trigger::Pr, "feature/x"));
    let start = sim.now;
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(run), (RunStatus::Failed, RunPhase::Building));
    let exec = &sim.record(run).executions[0];
    assert_eq!(exec.failure.as_deref(), Some("timed out after 10s"));
    assert_eq!(exec.completed_at, Some(start + Duration::from_secs(10)));
    assert_eq!(sim.cancels.len(), 1);
    assert_eq!(sim.cancels[0].external_id, "sim-1");
}

#[test]
fn cancel_reaches_every_active_execution_and_late_reports_change_nothing() {
    let mut spec = full_spec();
    for s in &mut spec.build.as_mut().unwrap().steps {
        s.parallel_group = Some("g".to_owned());
    }
    let mut sim = sim();
    sim.duration("go-build", Duration::from_secs(60));
    sim.duration("chart", Duration::from_secs(60));
    let run = sim.create(&request(spec, Trigger::Push, "main"));
    while !sim.submitted_names(run).contains(&"chart#1".to_owned()) {
        assert!(sim.step());
    }
    for _ in 0..4 {
        sim.step();
    }
    sim.input(Input::CancelRequested { run_id: run });
    sim.settle();
    sim.assert_clean();
    assert_eq!(
        sim.run_status(run),
        (RunStatus::Canceled, RunPhase::Building)
    );
    assert_eq!(
        sim.steps(run),
        [
            "go-build=canceled@1",
            "chart=canceled@1",
            "unit=canceled@0",
            "lint=canceled@0",
            "deploy=canceled@0"
        ]
    );
    let mut cancelled: Vec<_> = sim.cancels.iter().map(|h| h.external_id.clone()).collect();
    cancelled.sort();
    assert_eq!(cancelled, ["sim-1", "sim-2"]);
    // A second cancel and a late finish are no-ops.
    let exec = sim.record(run).executions[0].id;
    let before = sim.store.events.len();
    sim.input(Input::CancelRequested { run_id: run });
    sim.input(Input::ExecutionFinished {
        execution_id: exec,
        result: ExecutionResult {
            exit_code: 0,
            logs_uri: None,
            artifacts: Vec::new(),
            failure: None,
        },
    });
    assert!(sim.queue.is_empty());
    assert_eq!(sim.store.events.len(), before);
}

#[test]
fn a_crash_between_the_timeout_commit_and_its_cancel_cancels_after_restore() {
    let mut spec = full_spec();
    spec.build.as_mut().unwrap().steps[0].timeout = Some(Duration::from_secs(10));
    let mut sim = sim();
    sim.script("go-build", 1, Outcome::Hang);
    let run = sim.create(&request(spec, Trigger::Pr, "feature/x"));
    // Run until the timeout's commands are queued: its persist, then the cancel.
    while !sim
        .queue
        .iter()
        .any(|c| matches!(c, Command::Cancel { .. }))
    {
        assert!(sim.step(), "the timeout never fired");
    }
    let persist = sim.queue.pop_front().unwrap();
    assert!(matches!(persist, Command::Persist { .. }));
    sim.execute(persist);
    // The intent is recorded; the execution has not ended and the run has not either.
    let exec = sim.record(run).executions[0].clone();
    assert!(exec.cancel_requested(), "{exec:?}");
    assert_eq!(exec.status, Status::Running);
    assert_eq!(exec.failure.as_deref(), Some("timed out after 10s"));
    assert_eq!(sim.run_status(run).0, RunStatus::Running);
    assert_eq!(
        sim.steps(run)[0],
        "go-build=failed@1",
        "the step records the decision"
    );
    // Crash before the cancel reaches the executor.
    sim.crash_and_restore();
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.cancels.len(), 1, "the restored orchestrator cancels");
    assert_eq!(sim.cancels[0].external_id, "sim-1");
    assert_eq!(sim.run_status(run), (RunStatus::Failed, RunPhase::Building));
    let exec = &sim.record(run).executions[0];
    assert_eq!(exec.status, Status::Failed);
    assert_eq!(exec.failure.as_deref(), Some("timed out after 10s"));
    assert_eq!(
        sim.jobs(run),
        ["build=failed", "test=skipped"],
        "the stages end once the execution stopped"
    );
}

#[test]
fn a_cancelled_run_ends_only_when_the_executor_confirms() {
    let mut sim = sim();
    sim.script("go-build", 1, Outcome::Hang);
    let run = sim.create(&request(full_spec(), Trigger::Pr, "feature/x"));
    while !sim.queue.is_empty() || sim.record(run).executions[0].status != Status::Running {
        assert!(sim.step());
    }
    sim.input(Input::CancelRequested { run_id: run });
    // Commit the intent, drop the cancel (as if the executor never got it), crash.
    let persist = sim.queue.pop_front().unwrap();
    sim.execute(persist);
    assert!(matches!(sim.queue.front(), Some(Command::Cancel { .. })));
    let exec = sim.record(run).executions[0].clone();
    assert!(exec.cancel_requested());
    assert_eq!(sim.run_status(run).0, RunStatus::Running);
    sim.crash_and_restore();
    // The restored orchestrator asks again before anything else.
    assert!(
        sim.queue
            .iter()
            .any(|c| matches!(c, Command::Cancel { handle, .. } if handle.execution_id == exec.id)),
        "{:?}",
        sim.queue
    );
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(run).0, RunStatus::Canceled);
    let exec = &sim.record(run).executions[0];
    assert_eq!(exec.status, Status::Canceled);
    assert!(!exec.cancel_requested());
    assert_eq!(
        sim.steps(run),
        [
            "go-build=canceled@1",
            "chart=canceled@0",
            "unit=canceled@0",
            "lint=canceled@0"
        ]
    );
}

#[test]
fn cancel_during_submit_cancels_again_once_the_handle_is_known() {
    let mut sim = sim();
    let run = sim.create(&request(full_spec(), Trigger::Pr, "feature/x"));
    // The persist and the submit are queued; cancel before the executor answers.
    let persist = sim.queue.pop_front().unwrap();
    assert!(matches!(persist, Command::Persist { .. }));
    sim.execute(persist);
    sim.input(Input::CancelRequested { run_id: run });
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(run).0, RunStatus::Canceled);
    let handles: Vec<_> = sim.cancels.iter().map(|h| h.external_id.clone()).collect();
    assert_eq!(
        handles,
        ["", "sim-1"],
        "cancelled blind, then with the real handle"
    );
}

#[test]
fn infra_failures_are_retried_up_to_max_attempts() {
    let mut sim = sim();
    sim.script("go-build", 1, Outcome::Lose);
    sim.script("go-build", 2, Outcome::Refuse);
    let run = sim.create(&request(full_spec(), Trigger::Pr, "feature/x"));
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(run).0, RunStatus::Success);
    assert_eq!(sim.steps(run)[0], "go-build=succeeded@3");
    let execs: Vec<String> = sim
        .record(run)
        .executions
        .iter()
        .filter(|e| e.job_step_id == sim.record(run).steps[0].id)
        .map(|e| {
            format!(
                "{}:{}:{}",
                e.attempt,
                e.status,
                e.failure.clone().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        execs,
        [
            "1:failed:pod evicted",
            "2:failed:submit refused",
            "3:succeeded:"
        ]
    );

    let mut sim2 = Sim::new(Sim::default_config());
    for attempt in 1..=3 {
        sim2.script("go-build", attempt, Outcome::Lose);
    }
    let run = sim2.create(&request(full_spec(), Trigger::Pr, "feature/x"));
    sim2.settle();
    sim2.assert_clean();
    assert_eq!(
        sim2.run_status(run),
        (RunStatus::Failed, RunPhase::Building)
    );
    assert_eq!(sim2.steps(run)[0], "go-build=failed@3");
    assert_eq!(sim2.record(run).executions.len(), 3);
}

#[test]
fn stage_planning_by_trigger() {
    use crate::orchestrator::{PlanError, plan_stages};
    let spec = full_spec();
    let plan = |t, branch, req: Option<&[JobType]>| {
        plan_stages(&spec, t, branch, "main", req).map_err(|e| e.to_string())
    };
    use JobType::{Build, Deploy, Test};
    assert_eq!(plan(Trigger::Pr, "main", None), Ok(vec![Build, Test]));
    assert_eq!(
        plan(Trigger::Push, "main", None),
        Ok(vec![Build, Test, Deploy])
    );
    assert_eq!(
        plan(Trigger::Push, "feature/x", None),
        Ok(vec![Build, Test])
    );
    assert_eq!(
        plan(Trigger::Manual, "feature/x", None),
        Ok(vec![Build, Test])
    );
    assert_eq!(
        plan(Trigger::Manual, "x", Some(&[Deploy, Build])),
        Ok(vec![Build, Deploy])
    );
    let mut release = spec.clone();
    release.deploy.as_mut().unwrap().branches = vec!["release/*".to_owned()];
    release.triggers.push = Some(vec!["main".to_owned(), "release/*".to_owned()]);
    assert_eq!(
        plan_stages(&release, Trigger::Push, "release/1.2", "main", None).unwrap(),
        [Build, Test, Deploy]
    );
    assert_eq!(
        plan_stages(&release, Trigger::Push, "main", "main", None).unwrap(),
        [Build, Test]
    );
    assert!(matches!(
        plan_stages(&release, Trigger::Push, "feature/x", "main", None),
        Err(PlanError::BranchNotTriggered { .. })
    ));
    let mut no_test = spec.clone();
    no_test.test = None;
    expect_test::expect![[
        r#"stage 'test' was requested but the pipeline defines no 'test:' section"#
    ]]
    .assert_eq(
        &plan_stages(&no_test, Trigger::Manual, "x", "main", Some(&[Test]))
            .unwrap_err()
            .to_string(),
    );
    assert!(matches!(
        plan_stages(&no_test, Trigger::Pr, "x", "main", None),
        Ok(v) if v == [Build]
    ));
    let mut no_pr = spec.clone();
    no_pr.triggers.pull_request = false;
    expect_test::expect![[r#"the pipeline does not run on pr (enable it in the 'on:' section)"#]]
        .assert_eq(
            &plan_stages(&no_pr, Trigger::Pr, "x", "main", None)
                .unwrap_err()
                .to_string(),
        );
    assert!(crate::orchestrator::branch_matches("*", "feature/a/b"));
    assert!(crate::orchestrator::branch_matches(
        "release/*",
        "release/1.2"
    ));
    assert!(!crate::orchestrator::branch_matches("release/*", "main"));
    assert!(crate::orchestrator::branch_matches("v*-rc*", "v1-rc2"));
    assert!(!crate::orchestrator::branch_matches("main", "main2"));
}

#[test]
fn pr_runs_end_tested_and_manual_runs_do_what_was_asked() {
    let mut sim = sim();
    let pr = sim.create(&request(full_spec(), Trigger::Pr, "main"));
    let mut manual = request(full_spec(), Trigger::Manual, "feature/x");
    manual.stages = Some(vec![JobType::Build, JobType::Deploy]);
    let manual = sim.create(&manual);
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(pr), (RunStatus::Success, RunPhase::Tested));
    assert_eq!(sim.jobs(pr), ["build=succeeded", "test=succeeded"]);
    assert_eq!(
        sim.run_status(manual),
        (RunStatus::Success, RunPhase::Deployed)
    );
    assert_eq!(sim.jobs(manual), ["build=succeeded", "deploy=succeeded"]);
}

#[test]
fn build_artifacts_are_inputs_of_test_and_deploy_which_gets_no_source() {
    let mut sim = sim();
    let run = sim.create(&request(full_spec(), Trigger::Push, "main"));
    sim.settle();
    sim.assert_clean();
    let rec = sim.record(run).clone();
    let build_job = rec.jobs[0].id;
    let built: Vec<_> = rec
        .artifacts
        .iter()
        .filter(|a| a.job_id == build_job)
        .collect();
    assert_eq!(built.len(), 2);
    let spec_of = |name: &str| {
        sim.submits
            .iter()
            .find(|(_, s)| s.step_name == name)
            .unwrap()
            .1
            .clone()
    };
    let go_build = spec_of("go-build");
    assert!(go_build.inputs.is_empty());
    assert!(go_build.source.is_some());
    assert_eq!(go_build.workspace.key, format!("{run}/build"));
    assert_eq!(
        spec_of("chart").workspace,
        go_build.workspace,
        "one workspace per stage"
    );
    let unit = spec_of("unit");
    assert_eq!(unit.workspace.key, format!("{run}/test"));
    let ids: Vec<_> = unit
        .inputs
        .iter()
        .map(|i| (i.id, i.path.clone(), i.checksum.clone()))
        .collect();
    let want: Vec<_> = built
        .iter()
        .map(|a| (a.id, a.path.clone(), a.checksum.clone()))
        .collect();
    assert_eq!(ids, want);
    let deploy = spec_of("deploy");
    assert!(deploy.source.is_none(), "deploys never get source");
    assert_eq!(deploy.inputs.len(), 1);
    let chart = built
        .iter()
        .find(|a| a.artifact_type == ArtifactType::HelmChart)
        .unwrap();
    assert_eq!(deploy.inputs[0].id, chart.id);
    expect_test::expect![[r#"
        [
            "sh",
            "-c",
            "helm upgrade --install app dist/app-0123456789ab.tgz --namespace apps-main --set image.tag=0123456789ab",
        ]
    "#]]
    .assert_debug_eq(&deploy.command);
    assert_eq!(unit.command, ["sh", "-c", "make unit"]);
    assert_eq!(unit.env["SHIPINATOR_STAGE"], "test");
    assert_eq!(unit.env["SHIPINATOR_STEP"], "unit");
    assert_eq!(unit.env["SHIPINATOR_ATTEMPT"], "1");
    assert_eq!(
        unit.env["SHIPINATOR_EXECUTION_ID"],
        unit.execution_id.to_string()
    );
    assert_eq!(unit.env["SHIPINATOR_RUN_ID"], run.to_string());
    assert_eq!(unit.env["SHIPINATOR_SHORT_COMMIT"], "0123456789ab");
    assert_eq!(unit.env["GOFLAGS"], "-mod=mod");
    assert_eq!(unit.image.as_deref(), Some("golang:1.23"));
    assert_eq!(unit.timeout, Some(Duration::from_secs(600)));
}

#[test]
fn a_deploy_without_a_matching_artifact_fails_without_submitting() {
    let mut spec = full_spec();
    spec.build.as_mut().unwrap().steps[1].outputs.clear();
    let mut sim = sim();
    let run = sim.create(&request(spec, Trigger::Push, "main"));
    sim.settle();
    sim.assert_clean();
    assert_eq!(
        sim.run_status(run),
        (RunStatus::Failed, RunPhase::Deploying)
    );
    assert!(
        !sim.submitted_names(run)
            .iter()
            .any(|n| n.starts_with("deploy"))
    );
    let failure = sim
        .record(run)
        .executions
        .iter()
        .find_map(|e| e.failure.clone())
        .unwrap();
    assert!(
        failure.contains("no artifact of an earlier stage matches deploy artifact 'helm_chart'"),
        "{failure}"
    );
}

#[test]
fn retry_from_the_failed_stage_reuses_earlier_artifacts_by_id() {
    let mut sim = sim();
    sim.script("lint", 1, Outcome::Exit(1));
    let first = sim.create(&request(full_spec(), Trigger::Push, "main"));
    sim.settle();
    assert_eq!(sim.run_status(first).0, RunStatus::Failed);
    let built: Vec<ArtifactId> = sim
        .record(first)
        .artifacts
        .iter()
        .filter(|a| a.job_id == sim.record(first).jobs[0].id)
        .map(|a| a.id)
        .collect();
    sim.script.clear();
    let submits_before = sim.submits.len();
    let retry = sim.retry(first);
    assert_eq!(sim.record(retry).run.retry_of, Some(first));
    assert_eq!(sim.record(retry).run.phase, RunPhase::Built);
    sim.settle();
    sim.assert_clean();
    assert_eq!(
        sim.run_status(retry),
        (RunStatus::Success, RunPhase::Deployed)
    );
    let names: Vec<_> = sim.submits[submits_before..]
        .iter()
        .map(|(_, s)| s.step_name.clone())
        .collect();
    assert_eq!(
        names,
        ["unit", "lint", "deploy"],
        "build is not executed again"
    );
    let unit = &sim.submits[submits_before].1;
    let inputs: Vec<_> = unit.inputs.iter().map(|i| i.id).collect();
    assert_eq!(inputs, built);
    // Listing the retry's artifacts shows the inherited ones (same ids), then its own.
    let own: Vec<ArtifactId> = sim.record(retry).artifacts.iter().map(|a| a.id).collect();
    assert!(own.iter().all(|id| !built.contains(id)), "own rows only");
    let listed: Vec<ArtifactId> = crate::orchestrator::run_artifacts(sim.record(retry))
        .iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(listed, [built.clone(), own].concat());
    // Only succeeded or cancelled runs... a successful run cannot be retried.
    assert!(retry_run(sim.record(retry), RunId::new_v7(), sim.now, "t").is_err());
}

#[test]
fn crash_after_persist_before_submit_resubmits_the_same_execution() {
    let mut sim = sim();
    let run = sim.create(&request(full_spec(), Trigger::Pr, "feature/x"));
    let persist = sim.queue.pop_front().unwrap();
    sim.execute(persist);
    sim.crash_and_restore();
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(run).0, RunStatus::Success);
    assert_eq!(
        sim.submitted_names(run),
        ["go-build#1", "chart#1", "unit#1", "lint#1"]
    );
}

#[test]
fn crash_while_running_checks_the_executor_and_carries_on() {
    let mut sim = sim();
    sim.duration("chart", Duration::from_secs(30));
    let run = sim.create(&request(full_spec(), Trigger::Pr, "feature/x"));
    // Run until `chart` is running.
    while !sim.submitted_names(run).contains(&"chart#1".to_owned()) {
        assert!(sim.step());
    }
    for _ in 0..3 {
        sim.step();
    }
    sim.crash_and_restore();
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(run).0, RunStatus::Success);
    let go_build = sim
        .submitted_names(run)
        .iter()
        .filter(|n| *n == "go-build#1")
        .count();
    assert_eq!(go_build, 1, "a succeeded step is never submitted again");
}

#[test]
fn duplicate_and_unknown_inputs_change_nothing() {
    let mut sim = sim();
    let run = sim.create(&request(full_spec(), Trigger::Pr, "feature/x"));
    sim.settle();
    let exec = sim.record(run).executions[0].id;
    let events = sim.store.events.len();
    for input in [
        Input::ExecutionStarted {
            execution_id: exec,
            external_id: Some("sim-1".to_owned()),
        },
        Input::ExecutionLost {
            execution_id: exec,
            reason: "late".to_owned(),
        },
        Input::ExecutionCanceled { execution_id: exec },
        Input::CancelRequested { run_id: run },
        Input::CancelRequested {
            run_id: RunId::new_v7(),
        },
        Input::ExecutionFinished {
            execution_id: ExecutionId::new_v7(),
            result: ExecutionResult {
                exit_code: 1,
                logs_uri: None,
                artifacts: Vec::new(),
                failure: None,
            },
        },
        Input::TimerFired,
    ] {
        sim.input(input);
    }
    assert!(sim.queue.is_empty());
    assert_eq!(sim.store.events.len(), events);
    assert_eq!(sim.run_status(run).0, RunStatus::Success);
}

#[test]
fn a_run_with_an_unreadable_document_fails_instead_of_panicking() {
    let mut sim = sim();
    let id = sim.next_run_id();
    let mut new = new_run(&request(full_spec(), Trigger::Pr, "x"), id, sim.now).unwrap();
    new.run.resolved_spec = Arc::new(serde_json::json!({"format": 9}));
    sim.store.create(new);
    sim.load(id);
    sim.settle();
    sim.assert_clean();
    assert_eq!(sim.run_status(id).0, RunStatus::Failed);
    assert_eq!(sim.ended.get(&id), Some(&RunStatus::Failed));
}

/// The async driver over the in-memory store and the mock executor, in paused tokio time.
#[cfg(feature = "driver")]
mod driver {
    use std::sync::Arc;
    use std::time::Duration;

    use super::{full_spec, request};
    use crate::domain::{RunId, RunPhase, RunStatus, Status, Trigger};
    use crate::driver::{Driver, DriverConfig, DriverError, DriverHandle};
    use crate::executor::Executor;
    use crate::memory::{
        InMemoryArtifactStore, InMemoryStore, ManualClock, MockExecutor, MockStep,
    };
    use crate::orchestrator::{RunDocument, new_run_with_document};
    use crate::store::{NewRun, RunEventKind, Store, StoreError};
    use crate::time::Timestamp;

    fn config(owner: &str) -> DriverConfig {
        DriverConfig {
            owner: owner.to_owned(),
            lease_ttl: Duration::from_secs(30),
            claim_interval: Duration::from_secs(2),
            poll_interval: Duration::from_secs(3),
            ..DriverConfig::default()
        }
    }

    /// A store holding the project, repository and pipeline `request` refers to.
    async fn seeded(store: InMemoryStore) -> Arc<dyn Store> {
        use crate::domain::{Pipeline, PipelineId, Project, ProjectId, Repository, RepositoryId};
        let now = Timestamp::from_unix_micros(1_800_000_000_000_000);
        let project = Project {
            id: ProjectId::new_v7(),
            name: "demo".to_owned(),
            description: None,
            created_at: now,
            updated_at: now,
        };
        let repository = Repository {
            id: RepositoryId::new_v7(),
            project_id: project.id,
            vcs_provider: "git".to_owned(),
            clone_url: "file:///srv/git/app.git".to_owned(),
            default_branch: "main".to_owned(),
            created_at: now,
            updated_at: now,
        };
        let pipeline = Pipeline {
            id: PipelineId::from_uuid(uuid::Uuid::from_u128(7)),
            repository_id: repository.id,
            name: "app".to_owned(),
            trigger_type: Trigger::Push,
            source_spec: String::new(),
            created_at: now,
            updated_at: now,
        };
        store.create_project(&project).await.unwrap();
        store.create_repository(&repository).await.unwrap();
        store.create_pipeline(&pipeline).await.unwrap();
        Arc::new(store)
    }

    fn spawn(store: &Arc<dyn Store>, executor: Arc<dyn Executor>, owner: &str) -> DriverHandle {
        Driver::new(Arc::clone(store), executor, config(owner)).spawn()
    }

    #[tokio::test(start_paused = true)]
    async fn runs_a_pipeline_end_to_end() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.set_default(MockStep::succeed().with_duration(Duration::from_secs(2)));
        let driver = spawn(&store, Arc::new(executor.clone()), "a");
        let mut events = driver.subscribe();
        let run = driver
            .submit_run(request(full_spec(), Trigger::Push, "main"))
            .await
            .unwrap();
        let done = driver.wait_for_run(run).await.unwrap();
        assert_eq!(
            (done.status, done.phase),
            (RunStatus::Success, RunPhase::Deployed)
        );
        let record = store.load_run(run).await.unwrap();
        assert!(record.steps.iter().all(|s| s.status == Status::Succeeded));
        assert!(
            record
                .executions
                .iter()
                .all(|e| e.status == Status::Succeeded && e.executor_type == "mock")
        );
        let names: Vec<String> = executor
            .specs()
            .iter()
            .map(|s| s.step_name.clone())
            .collect();
        assert_eq!(names, ["go-build", "chart", "unit", "lint", "deploy"]);
        let deploy = executor.specs().pop().unwrap();
        let chart = record
            .artifacts
            .iter()
            .find(|a| a.artifact_type == crate::domain::ArtifactType::HelmChart)
            .unwrap();
        assert_eq!(deploy.inputs[0].id, chart.id);
        let mut saw_terminal = false;
        while let Ok(e) = events.try_recv() {
            if let RunEventKind::RunChanged { status, .. } = e.kind {
                saw_terminal |= status == RunStatus::Success;
            }
        }
        assert!(saw_terminal, "subscribers see the run end");
        driver.shutdown().await.unwrap();
    }

    /// The statuses of the executions of `run`, as stored.
    async fn execution_statuses(store: &Arc<dyn Store>, run: RunId) -> Vec<Status> {
        let record = store.load_run(run).await.unwrap();
        record.executions.iter().map(|e| e.status).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_execution_is_recorded_running_within_the_delay_while_it_runs() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.set_default(MockStep::succeed().with_duration(Duration::from_secs(600)));
        let driver = spawn(&store, Arc::new(executor.clone()), "a");
        let run = driver
            .submit_run(request(full_spec(), Trigger::Push, "main"))
            .await
            .unwrap();
        // The start of a long step is not held back until its end: it is committed alone
        // once the delay has passed.
        let delay = DriverConfig::default().started_write_delay;
        tokio::time::sleep(delay * 4).await;
        let statuses = execution_statuses(&store, run).await;
        assert!(!statuses.is_empty(), "an execution was submitted");
        assert!(
            statuses.contains(&Status::Running),
            "recorded running while it runs: {statuses:?}"
        );
        driver.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_deferred_start_is_committed_at_shutdown() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.set_default(MockStep::succeed().with_duration(Duration::from_secs(600)));
        let delay = Duration::from_secs(3600);
        let driver = Driver::new(
            Arc::clone(&store),
            Arc::new(executor.clone()),
            DriverConfig {
                started_write_delay: delay,
                ..config("a")
            },
        )
        .spawn();
        let run = driver
            .submit_run(request(full_spec(), Trigger::Push, "main"))
            .await
            .unwrap();
        let mut waited = Duration::ZERO;
        while executor.specs().is_empty() && waited < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            waited += Duration::from_millis(10);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            execution_statuses(&store, run).await,
            [Status::Pending],
            "the start waits for the next commit"
        );
        driver.shutdown().await.unwrap();
        assert_eq!(
            execution_statuses(&store, run).await,
            [Status::Running],
            "a shutdown commits what was deferred"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn short_steps_whose_start_rides_with_their_end_record_every_transition_in_order() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        // Shorter than the delay: each start is committed with the step's end.
        executor.set_default(MockStep::succeed().with_duration(Duration::from_millis(5)));
        let driver = spawn(&store, Arc::new(executor.clone()), "a");
        let mut events = driver.subscribe();
        let run = driver
            .submit_run(request(full_spec(), Trigger::Push, "main"))
            .await
            .unwrap();
        let done = driver.wait_for_run(run).await.unwrap();
        assert_eq!(done.status, RunStatus::Success);
        let record = store.load_run(run).await.unwrap();
        assert!(
            record
                .executions
                .iter()
                .all(|e| e.status == Status::Succeeded && e.version == 2),
            "each execution went pending, running, succeeded: {:?}",
            record
                .executions
                .iter()
                .map(|e| (e.status, e.version))
                .collect::<Vec<_>>()
        );
        let mut seen: std::collections::HashMap<crate::domain::ExecutionId, Vec<Status>> =
            std::collections::HashMap::new();
        while let Ok(e) = events.try_recv() {
            if let RunEventKind::ExecutionChanged {
                execution_id,
                status,
            } = e.kind
            {
                seen.entry(execution_id).or_default().push(status);
            }
        }
        assert_eq!(seen.len(), record.executions.len());
        for (id, statuses) in seen {
            let ran: Vec<Status> = statuses
                .into_iter()
                .filter(|s| *s != Status::Pending)
                .collect();
            assert_eq!(
                ran,
                [Status::Running, Status::Succeeded],
                "execution {id}: running recorded before its end"
            );
        }
        driver.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_execution_that_ends_before_its_submission_returns_keeps_its_external_id() {
        let store = seeded(InMemoryStore::new()).await;
        // Zero-duration steps end inside `submit`: the report overtakes the handle.
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        let driver = spawn(&store, Arc::new(executor.clone()), "a");
        let run = driver
            .submit_run(request(full_spec(), Trigger::Push, "main"))
            .await
            .unwrap();
        let done = driver.wait_for_run(run).await.unwrap();
        assert_eq!(done.status, RunStatus::Success);
        let record = store.load_run(run).await.unwrap();
        assert_eq!(record.executions.len(), 5);
        for e in &record.executions {
            assert_eq!(e.status, Status::Succeeded);
            assert_eq!(e.external_id, format!("mock-{}", e.id), "{e:?}");
        }
        driver.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_and_infra_retry_through_the_driver() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.script_attempt("go-build", 1, MockStep::lost("node went away"));
        executor.script("unit", MockStep::hang());
        let driver = spawn(&store, Arc::new(executor.clone()), "a");
        let run = driver
            .submit_run(request(full_spec(), Trigger::Pr, "feature/x"))
            .await
            .unwrap();
        // Wait (in paused time) until `unit` runs, then cancel.
        for _ in 0..1000 {
            if executor.specs().iter().any(|s| s.step_name == "unit") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        driver.cancel_run(run).unwrap();
        let done = driver.wait_for_run(run).await.unwrap();
        assert_eq!(
            (done.status, done.phase),
            (RunStatus::Canceled, RunPhase::Testing)
        );
        let record = store.load_run(run).await.unwrap();
        let attempts: Vec<(u32, Status)> = record
            .executions
            .iter()
            .filter(|e| e.job_step_id == record.steps[0].id)
            .map(|e| (e.attempt, e.status))
            .collect();
        assert_eq!(attempts, [(1, Status::Failed), (2, Status::Succeeded)]);
        for _ in 0..100 {
            if executor.running().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(executor.running().is_empty(), "cancel reached the executor");
        driver.shutdown().await.unwrap();
    }

    /// A run put in the store directly, as if `submit_run` had created it and the driver's
    /// claim had overtaken its creation message.
    async fn created_in_store(store: &Arc<dyn Store>) -> (NewRun, RunDocument) {
        let (new, doc) = new_run_with_document(
            &request(full_spec(), Trigger::Push, "main"),
            RunId::new_v7(),
            Timestamp::now(),
        )
        .unwrap();
        store.create_run(&new).await.unwrap();
        (new, doc)
    }

    /// Polls (in paused time) until the stored run is terminal.
    async fn until_terminal(store: &Arc<dyn Store>, run: RunId) {
        for _ in 0..1000 {
            if store.get_run(run).await.unwrap().status.is_terminal() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("run {run} did not end");
    }

    /// Neither claims nor status polls come within the test's time bound: only a prompt
    /// wake-up ends `wait_for_run` in time.
    fn slow_config(owner: &str) -> DriverConfig {
        DriverConfig {
            claim_interval: Duration::from_secs(3600),
            poll_interval: Duration::from_secs(3600),
            ..config(owner)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_creation_message_overtaken_by_the_claim_leaves_no_stale_entry() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.script("go-build", MockStep::hang());
        let (new, doc) = created_in_store(&store).await;
        let run = new.run.id;
        // The driver claims the run at start, from the store.
        let driver = Driver::new(
            Arc::clone(&store),
            Arc::new(executor.clone()),
            slow_config("a"),
        )
        .spawn();
        for _ in 0..1000 {
            if executor.specs().iter().any(|s| s.step_name == "go-build") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The creation message arrives while the driver owns the run.
        driver.send_created(new, doc);
        tokio::time::sleep(Duration::from_millis(100)).await;
        driver.cancel_run(run).unwrap();
        until_terminal(&store, run).await;
        // A waiter arriving after the run ended must not be parked on a stale entry.
        let done = tokio::time::timeout(Duration::from_secs(60), driver.wait_for_run(run))
            .await
            .expect("the waiter is answered at once, not after a poll interval")
            .unwrap();
        assert_eq!(done.status, RunStatus::Canceled);
        driver.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_creation_message_arriving_after_the_run_ended_wakes_its_waiters() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        let (new, doc) = created_in_store(&store).await;
        let run = new.run.id;
        let driver = Driver::new(
            Arc::clone(&store),
            Arc::new(executor.clone()),
            slow_config("a"),
        )
        .spawn();
        until_terminal(&store, run).await;
        // The creation message and a waiter arrive together, after the run ended: the waiter
        // is parked on the entry, which the next claim drops.
        driver.send_created(new, doc);
        let done = tokio::time::timeout(Duration::from_secs(60), driver.wait_for_run(run))
            .await
            .expect("dropping the entry wakes its waiters")
            .unwrap();
        assert_eq!(done.status, RunStatus::Success);
        driver.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_run_another_driver_owns_ends_soon_after_it_ends() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.set_default(MockStep::succeed().with_duration(Duration::from_secs(5)));
        let (new, _) = created_in_store(&store).await;
        let run = new.run.id;
        // `b` never claims anything: every run is someone else's.
        let b = Driver::new(
            Arc::clone(&store),
            Arc::new(MockExecutor::new()),
            DriverConfig {
                max_runs: 0,
                ..slow_config("b")
            },
        )
        .spawn();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.wait_for_run(run).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let a = Driver::new(
            Arc::clone(&store),
            Arc::new(executor.clone()),
            slow_config("a"),
        )
        .spawn();
        // Five steps of 5 s each: the run ends about 25 s from now.
        let done = tokio::time::timeout(Duration::from_secs(60), waiter)
            .await
            .expect("the waiter reads the store often, not once per poll interval")
            .unwrap()
            .unwrap();
        assert_eq!(done.status, RunStatus::Success);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_driver_resumes_a_crashed_drivers_run() {
        let clock = ManualClock::new(Timestamp::from_unix_micros(1_800_000_000_000_000));
        let store = seeded(InMemoryStore::with_clock(clock.as_clock())).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.set_default(MockStep::succeed().with_duration(Duration::from_secs(10)));
        let first = spawn(&store, Arc::new(executor.clone()), "a");
        let run = first
            .submit_run(request(full_spec(), Trigger::Push, "main"))
            .await
            .unwrap();
        // Crash once `go-build` is recorded succeeded and `chart` was submitted.
        for _ in 0..1000 {
            let rec = store.load_run(run).await.unwrap();
            if rec.steps[0].status == Status::Succeeded
                && executor.specs().iter().any(|s| s.step_name == "chart")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        first.abort();
        assert_eq!(store.get_run(run).await.unwrap().status, RunStatus::Running);
        // The crashed driver's lease expires by the store's clock; another driver takes over.
        clock.advance(Duration::from_secs(31));
        let second = spawn(&store, Arc::new(executor.restart()), "b");
        let done = second.wait_for_run(run).await.unwrap();
        assert_eq!(
            (done.status, done.phase),
            (RunStatus::Success, RunPhase::Deployed)
        );
        let go_builds = executor
            .specs()
            .iter()
            .filter(|s| s.step_name == "go-build")
            .count();
        assert_eq!(go_builds, 1, "a succeeded step is never submitted again");
        let record = store.load_run(run).await.unwrap();
        assert!(
            record
                .executions
                .iter()
                .all(|e| e.status == Status::Succeeded)
        );
        second.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_requested_through_another_driver_reaches_the_owner() {
        let store = seeded(InMemoryStore::new()).await;
        let executor =
            MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
        executor.script("go-build", MockStep::hang());
        let owner = spawn(&store, Arc::new(executor.clone()), "a");
        let run = owner
            .submit_run(request(full_spec(), Trigger::Push, "main"))
            .await
            .unwrap();
        for _ in 0..1000 {
            if !executor.running().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!executor.running().is_empty(), "go-build runs");
        // A second driver (another replica) that claims nothing is asked to cancel.
        let other = Driver::new(
            Arc::clone(&store),
            Arc::new(MockExecutor::new()),
            DriverConfig {
                max_runs: 0,
                ..config("b")
            },
        )
        .spawn();
        other.request_cancel(run, "alice").await.unwrap();
        let done = tokio::time::timeout(Duration::from_secs(600), owner.wait_for_run(run))
            .await
            .expect("the owning driver cancels the run")
            .unwrap();
        assert_eq!(done.status, RunStatus::Canceled);
        assert!(executor.running().is_empty(), "cancel reached the executor");
        assert!(matches!(
            other.request_cancel(RunId::new_v7(), "alice").await,
            Err(DriverError::Store(StoreError::NotFound { .. }))
        ));
        other.shutdown().await.unwrap();
        owner.shutdown().await.unwrap();
    }
}
