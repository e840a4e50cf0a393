//! [`InMemoryStore`]: the whole DMD in one mutex.
//!
//! Use it wherever a test or an embedded engine needs a [`Store`] without a database:
//!
//! ```
//! use std::time::Duration;
//! use shipinator_core::memory::{InMemoryStore, ManualClock};
//! use shipinator_core::store::Store;
//! use shipinator_core::time::Timestamp;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let clock = ManualClock::new(Timestamp::from_unix_micros(1_700_000_000_000_000));
//! let store = InMemoryStore::with_clock(clock.as_clock());
//! assert_eq!(store.now().await?, clock.now());
//! // Leases expire by this clock: advance it instead of sleeping.
//! clock.advance(Duration::from_secs(30));
//! assert_eq!(store.now().await?, clock.now());
//! # Ok::<(), shipinator_core::store::StoreError>(())
//! # }).unwrap();
//! ```
//!
//! Every write is O(1) or O(log n) in the size of the store; only listings scan.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::domain::{
    ApiTokenId, Artifact, ArtifactId, Execution, ExecutionId, Job, JobId, JobStep, Pipeline,
    PipelineId, PipelineRun, Project, ProjectId, Repository, RepositoryId, RunId, RunPhase,
    RunStatus, Status, StepId,
};
use crate::memory::{Clock, system_clock};
use crate::store::{
    ApiToken, Batch, ExecutionClaim, IdempotencyRecord, NewRun, Page, PageRequest, RunFilter,
    RunLease, RunRecord, Store, StoreError, StoredEvent, Write,
};
use crate::time::Timestamp;

/// A [`Store`] kept in memory behind one [`std::sync::Mutex`].
///
/// Lease expiry is judged by the store's [`Clock`] (the wall clock by default; pass a
/// [`ManualClock`](crate::memory::ManualClock) to [`InMemoryStore::with_clock`] to control it).
pub struct InMemoryStore {
    inner: Mutex<Inner>,
    clock: Clock,
}

impl fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryStore").finish_non_exhaustive()
    }
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct Inner {
    projects: BTreeMap<ProjectId, Project>,
    project_names: HashMap<String, ProjectId>,
    repositories: BTreeMap<RepositoryId, Repository>,
    pipelines: BTreeMap<PipelineId, Pipeline>,
    runs: BTreeMap<RunId, RunEntry>,
    /// Non-terminal runs no lease holds: what `claim_runs` takes first.
    unleased_runs: BTreeSet<RunId>,
    /// Non-terminal leased runs by lease expiry: `claim_runs` takes those expired.
    leased_runs: BTreeSet<(Timestamp, RunId)>,
    jobs: HashMap<JobId, JobEntry>,
    steps: HashMap<StepId, StepEntry>,
    executions: HashMap<ExecutionId, ExecEntry>,
    artifacts: BTreeMap<ArtifactId, Artifact>,
    events: Vec<StoredEvent>,
    /// Pending executions never claimed, per executor type, oldest first.
    queue: HashMap<String, BTreeSet<(Timestamp, ExecutionId)>>,
    claims: HashMap<ExecutionId, ExecutionClaim>,
    tokens: BTreeMap<ApiTokenId, ApiToken>,
    idempotency: HashMap<(PipelineId, String), IdempotencyRecord>,
    /// Runs someone asked to cancel.
    cancel_requests: HashSet<RunId>,
}

struct RunEntry {
    run: PipelineRun,
    /// Sorted by stage.
    jobs: Vec<JobId>,
    /// Insertion order.
    artifacts: Vec<ArtifactId>,
    epoch: u64,
    lease: Option<HeldLease>,
}

struct HeldLease {
    owner: String,
    expires_at: Timestamp,
}

struct JobEntry {
    job: Job,
    /// Sorted by `execution_order`.
    steps: Vec<StepId>,
}

struct StepEntry {
    step: JobStep,
    /// Sorted by attempt.
    executions: Vec<ExecutionId>,
}

struct ExecEntry {
    exec: Execution,
    claimed: bool,
}

/// What to restore when a batch fails part-way.
enum Undo {
    Run { id: RunId, fields: RunFields },
    Job { id: JobId, fields: JobFields },
    Step { id: StepId, fields: StepFields },
    ExecInserted(ExecutionId),
    Exec { id: ExecutionId, fields: ExecFields },
    ArtifactInserted(ArtifactId),
    EventAppended,
}

type RunFields = (
    RunStatus,
    RunPhase,
    Option<Timestamp>,
    Option<Timestamp>,
    u64,
);
type JobFields = (Status, Option<Timestamp>, Option<Timestamp>, u64);
type StepFields = (Status, u32, Option<Timestamp>, Option<Timestamp>, u64);
type ExecFields = (
    Status,
    String,
    Option<i32>,
    Option<String>,
    Option<Timestamp>,
    u64,
);

fn conflict(what: &'static str, id: impl fmt::Display, expected: u64, found: u64) -> StoreError {
    StoreError::Conflict {
        what,
        id: id.to_string(),
        expected,
        found,
    }
}

/// Newest-first page over an ordered map, by cursor (the last id of the previous page).
fn page_of<K, V, T>(
    map: &BTreeMap<K, V>,
    page: &PageRequest,
    parse: impl Fn(&str) -> Option<K>,
    key_text: impl Fn(&K) -> String,
    mut select: impl FnMut(&V) -> Option<T>,
) -> Result<Page<T>, StoreError>
where
    K: Ord + Copy,
{
    let limit = page.clamped_limit() as usize;
    let iter: Box<dyn DoubleEndedIterator<Item = (&K, &V)>> = match &page.cursor {
        None => Box::new(map.iter()),
        Some(c) => {
            let key =
                parse(c).ok_or_else(|| StoreError::invalid(format!("invalid cursor '{c}'")))?;
            Box::new(map.range(..key))
        }
    };
    let mut items = Vec::with_capacity(limit.min(64));
    let mut last = None;
    let mut more = false;
    for (k, v) in iter.rev() {
        if let Some(t) = select(v) {
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(t);
            last = Some(*k);
        }
    }
    Ok(Page {
        items,
        next_cursor: if more {
            last.map(|k| key_text(&k))
        } else {
            None
        },
    })
}

impl Inner {
    fn reindex_run(&mut self, id: RunId) {
        let Some(entry) = self.runs.get(&id) else {
            return;
        };
        let expiry = entry.lease.as_ref().map(|l| l.expires_at);
        let active = !entry.run.status.is_terminal();
        match (active, expiry) {
            (true, None) => {
                self.unleased_runs.insert(id);
            }
            (true, Some(t)) => {
                self.unleased_runs.remove(&id);
                self.leased_runs.insert((t, id));
            }
            (false, _) => {
                self.unleased_runs.remove(&id);
                if let Some(t) = expiry {
                    self.leased_runs.remove(&(t, id));
                }
            }
        }
    }

    /// Sets (or clears) a run's lease, keeping the claim indexes in step.
    fn set_lease(&mut self, id: RunId, lease: Option<HeldLease>) {
        let Some(entry) = self.runs.get_mut(&id) else {
            return;
        };
        if let Some(old) = entry.lease.take() {
            self.leased_runs.remove(&(old.expires_at, id));
        }
        self.unleased_runs.remove(&id);
        entry.lease = lease;
        self.reindex_run(id);
    }

    fn reindex_exec(&mut self, id: ExecutionId) {
        let Some(entry) = self.executions.get(&id) else {
            return;
        };
        let key = (entry.exec.submitted_at, id);
        let queued = entry.exec.status == Status::Pending && !entry.claimed;
        let exec_type = &entry.exec.executor_type;
        if queued {
            self.queue.entry(exec_type.clone()).or_default().insert(key);
        } else if let Some(q) = self.queue.get_mut(exec_type) {
            q.remove(&key);
        }
    }

    fn apply(&mut self, write: &Write, undo: &mut Vec<Undo>) -> Result<(), StoreError> {
        match write {
            Write::UpdateRun {
                id,
                expected_version,
                status,
                phase,
                started_at,
                finished_at,
            } => {
                let entry = self
                    .runs
                    .get_mut(id)
                    .ok_or_else(|| StoreError::not_found("run", id))?;
                let r = &mut entry.run;
                if r.version == *expected_version {
                    undo.push(Undo::Run {
                        id: *id,
                        fields: (r.status, r.phase, r.started_at, r.finished_at, r.version),
                    });
                    r.status = *status;
                    r.phase = *phase;
                    r.started_at = *started_at;
                    r.finished_at = *finished_at;
                    r.version += 1;
                    self.reindex_run(*id);
                    Ok(())
                } else if r.status == *status
                    && r.phase == *phase
                    && r.started_at == *started_at
                    && r.finished_at == *finished_at
                {
                    Ok(())
                } else {
                    Err(conflict("run", id, *expected_version, r.version))
                }
            }
            Write::UpdateJob {
                id,
                expected_version,
                status,
                started_at,
                finished_at,
            } => {
                let entry = self
                    .jobs
                    .get_mut(id)
                    .ok_or_else(|| StoreError::not_found("job", id))?;
                let j = &mut entry.job;
                if j.version == *expected_version {
                    undo.push(Undo::Job {
                        id: *id,
                        fields: (j.status, j.started_at, j.finished_at, j.version),
                    });
                    j.status = *status;
                    j.started_at = *started_at;
                    j.finished_at = *finished_at;
                    j.version += 1;
                    Ok(())
                } else if j.status == *status
                    && j.started_at == *started_at
                    && j.finished_at == *finished_at
                {
                    Ok(())
                } else {
                    Err(conflict("job", id, *expected_version, j.version))
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
                let entry = self
                    .steps
                    .get_mut(id)
                    .ok_or_else(|| StoreError::not_found("step", id))?;
                let s = &mut entry.step;
                if s.version == *expected_version {
                    undo.push(Undo::Step {
                        id: *id,
                        fields: (s.status, s.attempt, s.started_at, s.finished_at, s.version),
                    });
                    s.status = *status;
                    s.attempt = *attempt;
                    s.started_at = *started_at;
                    s.finished_at = *finished_at;
                    s.version += 1;
                    Ok(())
                } else if s.status == *status
                    && s.attempt == *attempt
                    && s.started_at == *started_at
                    && s.finished_at == *finished_at
                {
                    Ok(())
                } else {
                    Err(conflict("step", id, *expected_version, s.version))
                }
            }
            Write::InsertExecution(exec) => {
                if let Some(existing) = self.executions.get(&exec.id) {
                    return if existing.exec == *exec {
                        Ok(())
                    } else {
                        Err(StoreError::already_exists("execution", exec.id))
                    };
                }
                let step = self.steps.get_mut(&exec.job_step_id).ok_or_else(|| {
                    StoreError::invalid(format!(
                        "execution {} references missing step {}",
                        exec.id, exec.job_step_id
                    ))
                })?;
                let pos = step.executions.len()
                    - step
                        .executions
                        .iter()
                        .rev()
                        .take_while(|e| {
                            self.executions
                                .get(e)
                                .is_some_and(|x| x.exec.attempt > exec.attempt)
                        })
                        .count();
                step.executions.insert(pos, exec.id);
                self.executions.insert(
                    exec.id,
                    ExecEntry {
                        exec: exec.clone(),
                        claimed: false,
                    },
                );
                undo.push(Undo::ExecInserted(exec.id));
                self.reindex_exec(exec.id);
                Ok(())
            }
            Write::UpdateExecution {
                id,
                expected_version,
                status,
                external_id,
                exit_code,
                failure,
                completed_at,
            } => {
                let entry = self
                    .executions
                    .get_mut(id)
                    .ok_or_else(|| StoreError::not_found("execution", id))?;
                let e = &mut entry.exec;
                if e.version == *expected_version {
                    let fields = (
                        e.status,
                        std::mem::replace(&mut e.external_id, external_id.clone()),
                        e.exit_code,
                        std::mem::replace(&mut e.failure, failure.clone()),
                        e.completed_at,
                        e.version,
                    );
                    undo.push(Undo::Exec { id: *id, fields });
                    e.status = *status;
                    e.exit_code = *exit_code;
                    e.completed_at = *completed_at;
                    e.version += 1;
                    // Leave the queue when it stops being pending.
                    let key = (e.submitted_at, *id);
                    if *status != Status::Pending {
                        if let Some(q) = self.queue.get_mut(&e.executor_type) {
                            q.remove(&key);
                        }
                    } else {
                        self.reindex_exec(*id);
                    }
                    Ok(())
                } else if e.status == *status
                    && e.external_id == *external_id
                    && e.exit_code == *exit_code
                    && e.failure == *failure
                    && e.completed_at == *completed_at
                {
                    Ok(())
                } else {
                    Err(conflict("execution", id, *expected_version, e.version))
                }
            }
            Write::InsertArtifact(artifact) => {
                if let Some(existing) = self.artifacts.get(&artifact.id) {
                    return if existing == artifact {
                        Ok(())
                    } else {
                        Err(StoreError::already_exists("artifact", artifact.id))
                    };
                }
                if !self.jobs.contains_key(&artifact.job_id) {
                    return Err(StoreError::invalid(format!(
                        "artifact {} references missing job {}",
                        artifact.id, artifact.job_id
                    )));
                }
                let run = self.runs.get_mut(&artifact.run_id).ok_or_else(|| {
                    StoreError::invalid(format!(
                        "artifact {} references missing run {}",
                        artifact.id, artifact.run_id
                    ))
                })?;
                run.artifacts.push(artifact.id);
                self.artifacts.insert(artifact.id, artifact.clone());
                undo.push(Undo::ArtifactInserted(artifact.id));
                Ok(())
            }
            Write::AppendEvent(event) => {
                if !self.runs.contains_key(&event.run_id) {
                    return Err(StoreError::invalid(format!(
                        "event references missing run {}",
                        event.run_id
                    )));
                }
                let seq = self.events.len() as u64 + 1;
                self.events.push(StoredEvent {
                    seq,
                    event: event.clone(),
                });
                undo.push(Undo::EventAppended);
                Ok(())
            }
        }
    }

    fn rollback(&mut self, undo: Vec<Undo>) {
        for u in undo.into_iter().rev() {
            match u {
                Undo::Run { id, fields } => {
                    if let Some(e) = self.runs.get_mut(&id) {
                        let r = &mut e.run;
                        (r.status, r.phase, r.started_at, r.finished_at, r.version) = fields;
                    }
                    self.reindex_run(id);
                }
                Undo::Job { id, fields } => {
                    if let Some(e) = self.jobs.get_mut(&id) {
                        let j = &mut e.job;
                        (j.status, j.started_at, j.finished_at, j.version) = fields;
                    }
                }
                Undo::Step { id, fields } => {
                    if let Some(e) = self.steps.get_mut(&id) {
                        let s = &mut e.step;
                        (s.status, s.attempt, s.started_at, s.finished_at, s.version) = fields;
                    }
                }
                Undo::ExecInserted(id) => {
                    if let Some(e) = self.executions.remove(&id) {
                        if let Some(q) = self.queue.get_mut(&e.exec.executor_type) {
                            q.remove(&(e.exec.submitted_at, id));
                        }
                        if let Some(step) = self.steps.get_mut(&e.exec.job_step_id) {
                            step.executions.retain(|x| *x != id);
                        }
                    }
                }
                Undo::Exec { id, fields } => {
                    if let Some(e) = self.executions.get_mut(&id) {
                        let x = &mut e.exec;
                        (
                            x.status,
                            x.external_id,
                            x.exit_code,
                            x.failure,
                            x.completed_at,
                            x.version,
                        ) = fields;
                    }
                    self.reindex_exec(id);
                }
                Undo::ArtifactInserted(id) => {
                    if let Some(a) = self.artifacts.remove(&id)
                        && let Some(run) = self.runs.get_mut(&a.run_id)
                    {
                        if run.artifacts.last() == Some(&id) {
                            run.artifacts.pop();
                        } else {
                            run.artifacts.retain(|x| *x != id);
                        }
                    }
                }
                Undo::EventAppended => {
                    self.events.pop();
                }
            }
        }
    }
}

impl InMemoryStore {
    /// An empty store on the wall clock.
    pub fn new() -> Self {
        Self::with_clock(system_clock())
    }

    /// An empty store whose [`Store::now`] (and so lease expiry) reads `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied batch: batches are rolled
        // back before returning, so the state behind a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_sync(&self) -> Timestamp {
        (self.clock)()
    }
}

fn id_parser<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.parse().ok()
}

#[async_trait::async_trait]
impl Store for InMemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn now(&self) -> Result<Timestamp, StoreError> {
        Ok(self.now_sync())
    }

    async fn create_project(&self, project: &Project) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.projects.contains_key(&project.id) {
            return Err(StoreError::already_exists("project", project.id));
        }
        if inner.project_names.contains_key(&project.name) {
            return Err(StoreError::already_exists("project", &project.name));
        }
        inner.project_names.insert(project.name.clone(), project.id);
        inner.projects.insert(project.id, project.clone());
        Ok(())
    }

    async fn get_project(&self, id: ProjectId) -> Result<Project, StoreError> {
        self.lock()
            .projects
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::not_found("project", id))
    }

    async fn get_project_by_name(&self, name: &str) -> Result<Project, StoreError> {
        let inner = self.lock();
        inner
            .project_names
            .get(name)
            .and_then(|id| inner.projects.get(id))
            .cloned()
            .ok_or_else(|| StoreError::not_found("project", name))
    }

    async fn list_projects(&self, page: &PageRequest) -> Result<Page<Project>, StoreError> {
        let inner = self.lock();
        page_of(&inner.projects, page, id_parser, ToString::to_string, |p| {
            Some(p.clone())
        })
    }

    async fn create_repository(&self, repository: &Repository) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.repositories.contains_key(&repository.id) {
            return Err(StoreError::already_exists("repository", repository.id));
        }
        if !inner.projects.contains_key(&repository.project_id) {
            return Err(StoreError::invalid(format!(
                "repository {} references missing project {}",
                repository.id, repository.project_id
            )));
        }
        inner.repositories.insert(repository.id, repository.clone());
        Ok(())
    }

    async fn get_repository(&self, id: RepositoryId) -> Result<Repository, StoreError> {
        self.lock()
            .repositories
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::not_found("repository", id))
    }

    async fn list_repositories(
        &self,
        project: Option<ProjectId>,
        page: &PageRequest,
    ) -> Result<Page<Repository>, StoreError> {
        let inner = self.lock();
        page_of(
            &inner.repositories,
            page,
            id_parser,
            ToString::to_string,
            |r| (project.is_none_or(|p| r.project_id == p)).then(|| r.clone()),
        )
    }

    async fn create_pipeline(&self, pipeline: &Pipeline) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.pipelines.contains_key(&pipeline.id) {
            return Err(StoreError::already_exists("pipeline", pipeline.id));
        }
        if !inner.repositories.contains_key(&pipeline.repository_id) {
            return Err(StoreError::invalid(format!(
                "pipeline {} references missing repository {}",
                pipeline.id, pipeline.repository_id
            )));
        }
        inner.pipelines.insert(pipeline.id, pipeline.clone());
        Ok(())
    }

    async fn get_pipeline(&self, id: PipelineId) -> Result<Pipeline, StoreError> {
        self.lock()
            .pipelines
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::not_found("pipeline", id))
    }

    async fn list_pipelines(
        &self,
        repository: Option<RepositoryId>,
        page: &PageRequest,
    ) -> Result<Page<Pipeline>, StoreError> {
        let inner = self.lock();
        page_of(
            &inner.pipelines,
            page,
            id_parser,
            ToString::to_string,
            |p| (repository.is_none_or(|r| p.repository_id == r)).then(|| p.clone()),
        )
    }

    async fn create_run(&self, new: &NewRun) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let run = &new.run;
        if inner.runs.contains_key(&run.id) {
            return Err(StoreError::already_exists("run", run.id));
        }
        if !inner.pipelines.contains_key(&run.pipeline_id) {
            return Err(StoreError::invalid(format!(
                "run {} references missing pipeline {}",
                run.id, run.pipeline_id
            )));
        }
        // Validate everything before inserting anything.
        let mut job_ids = HashSet::with_capacity(new.jobs.len());
        for job in &new.jobs {
            if job.pipeline_run_id != run.id {
                return Err(StoreError::invalid(format!(
                    "job {} belongs to run {}, not {}",
                    job.id, job.pipeline_run_id, run.id
                )));
            }
            if inner.jobs.contains_key(&job.id) || !job_ids.insert(job.id) {
                return Err(StoreError::already_exists("job", job.id));
            }
        }
        let mut step_ids = HashSet::with_capacity(new.steps.len());
        for step in &new.steps {
            if !job_ids.contains(&step.job_id) {
                return Err(StoreError::invalid(format!(
                    "step {} references job {} which is not part of run {}",
                    step.id, step.job_id, run.id
                )));
            }
            if inner.steps.contains_key(&step.id) || !step_ids.insert(step.id) {
                return Err(StoreError::already_exists("step", step.id));
            }
        }
        let mut jobs: Vec<&Job> = new.jobs.iter().collect();
        jobs.sort_by_key(|j| (j.job_type, j.id));
        inner.runs.insert(
            run.id,
            RunEntry {
                run: run.clone(),
                jobs: jobs.iter().map(|j| j.id).collect(),
                artifacts: Vec::new(),
                epoch: 0,
                lease: None,
            },
        );
        for job in jobs {
            inner.jobs.insert(
                job.id,
                JobEntry {
                    job: job.clone(),
                    steps: Vec::new(),
                },
            );
        }
        let mut steps: Vec<&JobStep> = new.steps.iter().collect();
        steps.sort_by_key(|s| (s.execution_order, s.id));
        for step in steps {
            if let Some(job) = inner.jobs.get_mut(&step.job_id) {
                job.steps.push(step.id);
            }
            inner.steps.insert(
                step.id,
                StepEntry {
                    step: step.clone(),
                    executions: Vec::new(),
                },
            );
        }
        inner.reindex_run(run.id);
        Ok(())
    }

    async fn get_run(&self, id: RunId) -> Result<PipelineRun, StoreError> {
        self.lock()
            .runs
            .get(&id)
            .map(|e| e.run.clone())
            .ok_or_else(|| StoreError::not_found("run", id))
    }

    async fn load_run(&self, id: RunId) -> Result<RunRecord, StoreError> {
        let inner = self.lock();
        let entry = inner
            .runs
            .get(&id)
            .ok_or_else(|| StoreError::not_found("run", id))?;
        let mut record = RunRecord {
            run: entry.run.clone(),
            jobs: Vec::with_capacity(entry.jobs.len()),
            steps: Vec::new(),
            executions: Vec::new(),
            artifacts: Vec::with_capacity(entry.artifacts.len()),
        };
        for job_id in &entry.jobs {
            let Some(job) = inner.jobs.get(job_id) else {
                continue;
            };
            record.jobs.push(job.job.clone());
            for step_id in &job.steps {
                let Some(step) = inner.steps.get(step_id) else {
                    continue;
                };
                record.steps.push(step.step.clone());
                for exec_id in &step.executions {
                    if let Some(e) = inner.executions.get(exec_id) {
                        record.executions.push(e.exec.clone());
                    }
                }
            }
        }
        for a in &entry.artifacts {
            if let Some(a) = inner.artifacts.get(a) {
                record.artifacts.push(a.clone());
            }
        }
        record.artifacts.sort_by_key(|a| (a.created_at, a.id));
        Ok(record)
    }

    async fn list_runs(
        &self,
        filter: &RunFilter,
        page: &PageRequest,
    ) -> Result<Page<PipelineRun>, StoreError> {
        let inner = self.lock();
        page_of(&inner.runs, page, id_parser, ToString::to_string, |e| {
            let r = &e.run;
            let keep = filter.pipeline_id.is_none_or(|p| r.pipeline_id == p)
                && filter.status.is_none_or(|s| r.status == s)
                && filter.git_ref.as_ref().is_none_or(|g| r.git_ref == *g)
                && filter.trigger.is_none_or(|t| r.trigger == t);
            keep.then(|| r.clone())
        })
    }

    async fn list_jobs(&self, run: RunId) -> Result<Vec<Job>, StoreError> {
        let inner = self.lock();
        let entry = inner
            .runs
            .get(&run)
            .ok_or_else(|| StoreError::not_found("run", run))?;
        Ok(entry
            .jobs
            .iter()
            .filter_map(|j| inner.jobs.get(j).map(|e| e.job.clone()))
            .collect())
    }

    async fn list_steps(&self, job: JobId) -> Result<Vec<JobStep>, StoreError> {
        let inner = self.lock();
        let entry = inner
            .jobs
            .get(&job)
            .ok_or_else(|| StoreError::not_found("job", job))?;
        Ok(entry
            .steps
            .iter()
            .filter_map(|s| inner.steps.get(s).map(|e| e.step.clone()))
            .collect())
    }

    async fn list_executions(&self, step: StepId) -> Result<Vec<Execution>, StoreError> {
        let inner = self.lock();
        let entry = inner
            .steps
            .get(&step)
            .ok_or_else(|| StoreError::not_found("step", step))?;
        Ok(entry
            .executions
            .iter()
            .filter_map(|e| inner.executions.get(e).map(|x| x.exec.clone()))
            .collect())
    }

    async fn get_execution(&self, id: ExecutionId) -> Result<Execution, StoreError> {
        self.lock()
            .executions
            .get(&id)
            .map(|e| e.exec.clone())
            .ok_or_else(|| StoreError::not_found("execution", id))
    }

    async fn get_artifact(&self, id: ArtifactId) -> Result<Artifact, StoreError> {
        self.lock()
            .artifacts
            .get(&id)
            .cloned()
            .ok_or_else(|| StoreError::not_found("artifact", id))
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        let inner = self.lock();
        let entry = inner
            .runs
            .get(&run)
            .ok_or_else(|| StoreError::not_found("run", run))?;
        let mut out: Vec<Artifact> = entry
            .artifacts
            .iter()
            .filter_map(|a| inner.artifacts.get(a).cloned())
            .collect();
        out.sort_by_key(|a| (a.created_at, a.id));
        Ok(out)
    }

    async fn list_all_artifacts(&self, page: &PageRequest) -> Result<Page<Artifact>, StoreError> {
        let inner = self.lock();
        page_of(
            &inner.artifacts,
            page,
            id_parser,
            ToString::to_string,
            |a| Some(a.clone()),
        )
    }

    async fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for fence in &batch.fences {
            let entry = inner
                .runs
                .get(&fence.run_id)
                .ok_or_else(|| StoreError::not_found("run", fence.run_id))?;
            if entry.epoch != fence.epoch {
                return Err(StoreError::Fenced {
                    run_id: fence.run_id,
                    epoch: fence.epoch,
                    current: entry.epoch,
                });
            }
        }
        let mut undo = Vec::with_capacity(batch.writes.len());
        for write in &batch.writes {
            if let Err(e) = inner.apply(write, &mut undo) {
                inner.rollback(undo);
                return Err(e);
            }
        }
        Ok(())
    }

    async fn list_events(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let inner = self.lock();
        let start = usize::try_from(after_seq)
            .unwrap_or(usize::MAX)
            .min(inner.events.len());
        let end = start.saturating_add(limit as usize).min(inner.events.len());
        Ok(inner.events[start..end].to_vec())
    }

    async fn claim_runs(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<RunLease>, StoreError> {
        let now = self.now_sync();
        let expires_at = now + ttl;
        let mut inner = self.lock();
        let inner = &mut *inner;
        let limit = limit as usize;
        // The free runs in id order: unleased ones merged with those whose lease expired.
        let mut expired: Vec<RunId> = inner
            .leased_runs
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| *id)
            .collect();
        expired.sort_unstable();
        let mut free = Vec::new();
        {
            let mut unleased = inner.unleased_runs.iter().copied().peekable();
            let mut expired = expired.into_iter().peekable();
            while free.len() < limit {
                let next = match (unleased.peek(), expired.peek()) {
                    (Some(a), Some(b)) if b < a => expired.next(),
                    (Some(_), _) => unleased.next(),
                    (None, _) => expired.next(),
                };
                match next {
                    Some(id) => free.push(id),
                    None => break,
                }
            }
        }
        let mut out = Vec::with_capacity(free.len());
        for id in free {
            let Some(entry) = inner.runs.get_mut(&id) else {
                continue;
            };
            entry.epoch += 1;
            let epoch = entry.epoch;
            inner.set_lease(
                id,
                Some(HeldLease {
                    owner: owner.to_owned(),
                    expires_at,
                }),
            );
            out.push(RunLease {
                run_id: id,
                owner: owner.to_owned(),
                epoch,
                expires_at,
            });
        }
        Ok(out)
    }

    async fn renew_leases(
        &self,
        leases: &[RunLease],
        ttl: Duration,
    ) -> Result<Vec<RunLease>, StoreError> {
        let expires_at = self.now_sync() + ttl;
        let mut inner = self.lock();
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            let Some(entry) = inner.runs.get_mut(&lease.run_id) else {
                continue;
            };
            if entry.epoch != lease.epoch {
                continue;
            }
            let Some(held) = entry.lease.as_ref() else {
                continue;
            };
            if held.owner != lease.owner {
                continue;
            }
            inner.set_lease(
                lease.run_id,
                Some(HeldLease {
                    owner: lease.owner.clone(),
                    expires_at,
                }),
            );
            out.push(RunLease {
                expires_at,
                ..lease.clone()
            });
        }
        Ok(out)
    }

    async fn release_lease(&self, lease: &RunLease) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let entry = inner
            .runs
            .get_mut(&lease.run_id)
            .ok_or_else(|| StoreError::not_found("run", lease.run_id))?;
        let held = entry.epoch == lease.epoch
            && entry.lease.as_ref().is_some_and(|l| l.owner == lease.owner);
        if held {
            inner.set_lease(lease.run_id, None);
        }
        Ok(())
    }

    async fn claim_executions(
        &self,
        executor_type: &str,
        worker: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<ExecutionClaim>, StoreError> {
        let expires_at = self.now_sync() + ttl;
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(queue) = inner.queue.get_mut(executor_type) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        while out.len() < limit as usize {
            let Some((_, id)) = queue.pop_first() else {
                break;
            };
            let Some(entry) = inner.executions.get_mut(&id) else {
                continue;
            };
            entry.claimed = true;
            let claim = ExecutionClaim {
                execution_id: id,
                step_id: entry.exec.job_step_id,
                attempt: entry.exec.attempt,
                worker: worker.to_owned(),
                expires_at,
            };
            inner.claims.insert(id, claim.clone());
            out.push(claim);
        }
        Ok(out)
    }

    async fn renew_execution_claim(
        &self,
        claim: &ExecutionClaim,
        ttl: Duration,
    ) -> Result<ExecutionClaim, StoreError> {
        let now = self.now_sync();
        let mut inner = self.lock();
        let lost = || StoreError::LeaseLost {
            what: "execution",
            id: claim.execution_id.to_string(),
            owner: claim.worker.clone(),
        };
        let held = inner.claims.get_mut(&claim.execution_id).ok_or_else(lost)?;
        if held.worker != claim.worker || held.expires_at <= now {
            return Err(lost());
        }
        held.expires_at = now + ttl;
        Ok(held.clone())
    }

    async fn take_expired_execution_claims(&self) -> Result<Vec<ExecutionClaim>, StoreError> {
        let now = self.now_sync();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let expired: Vec<ExecutionId> = inner
            .claims
            .iter()
            .filter(|(_, c)| c.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::with_capacity(expired.len());
        for id in expired {
            let Some(claim) = inner.claims.remove(&id) else {
                continue;
            };
            let terminal = inner
                .executions
                .get(&id)
                .is_none_or(|e| e.exec.status.is_terminal());
            if !terminal {
                out.push(claim);
            }
        }
        out.sort_by_key(|c| (c.expires_at, c.execution_id));
        Ok(out)
    }

    async fn create_api_token(&self, token: &ApiToken) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.tokens.contains_key(&token.id) {
            return Err(StoreError::already_exists(ApiTokenId::WHAT, token.id));
        }
        if inner
            .tokens
            .values()
            .any(|t| t.secret_sha256 == token.secret_sha256)
        {
            return Err(StoreError::already_exists(
                ApiTokenId::WHAT,
                "with this secret",
            ));
        }
        inner.tokens.insert(token.id, token.clone());
        Ok(())
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        Ok(self.lock().tokens.values().rev().cloned().collect())
    }

    async fn find_api_token(&self, secret_sha256: &str) -> Result<ApiToken, StoreError> {
        self.lock()
            .tokens
            .values()
            .find(|t| t.secret_sha256 == secret_sha256)
            .cloned()
            .ok_or_else(|| StoreError::not_found(ApiTokenId::WHAT, "with this secret"))
    }

    async fn revoke_api_token(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<ApiToken, StoreError> {
        let mut inner = self.lock();
        let token = inner
            .tokens
            .get_mut(&id)
            .ok_or_else(|| StoreError::not_found(ApiTokenId::WHAT, id))?;
        token.revoked_at.get_or_insert(at);
        Ok(token.clone())
    }

    async fn touch_api_token(&self, id: ApiTokenId, at: Timestamp) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let token = inner
            .tokens
            .get_mut(&id)
            .ok_or_else(|| StoreError::not_found(ApiTokenId::WHAT, id))?;
        token.last_used_at = Some(at);
        Ok(())
    }

    async fn put_idempotency_record(
        &self,
        record: &IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError> {
        let mut inner = self.lock();
        if !inner.pipelines.contains_key(&record.pipeline_id) {
            return Err(StoreError::not_found(PipelineId::WHAT, record.pipeline_id));
        }
        if !inner.runs.contains_key(&record.run_id) {
            return Err(StoreError::not_found(RunId::WHAT, record.run_id));
        }
        Ok(inner
            .idempotency
            .entry((record.pipeline_id, record.key.clone()))
            .or_insert_with(|| record.clone())
            .clone())
    }

    async fn get_idempotency_record(
        &self,
        pipeline: PipelineId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        Ok(self
            .lock()
            .idempotency
            .get(&(pipeline, key.to_owned()))
            .cloned())
    }

    async fn request_cancel(
        &self,
        run: RunId,
        _by: &str,
        _at: Timestamp,
    ) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if !inner.runs.contains_key(&run) {
            return Err(StoreError::not_found("run", run));
        }
        inner.cancel_requests.insert(run);
        Ok(())
    }

    async fn cancel_requests(&self, runs: &[RunId]) -> Result<Vec<RunId>, StoreError> {
        let inner = self.lock();
        Ok(runs
            .iter()
            .filter(|r| inner.cancel_requests.contains(r))
            .copied()
            .collect())
    }
}
