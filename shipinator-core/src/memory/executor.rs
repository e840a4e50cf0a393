//! [`MockExecutor`]: an [`Executor`] scripted per step, for tests and benchmarks.
//!
//! Each step name (optionally each attempt) gets a [`MockStep`]: how it ends, how long it takes,
//! what it logs and which artifacts it produces. Unscripted steps succeed at once. Every spec
//! received is recorded ([`MockExecutor::specs`]).
//!
//! Nothing is spawned: an execution ends when its duration has elapsed by the executor's time
//! source, which is noticed by [`Executor::status`], by the [`Executor::reports`] stream (which
//! sleeps until the next deadline with `tokio::time`, so it works under
//! `#[tokio::test(start_paused = true)]`), or by [`MockExecutor::tick`] when the executor runs
//! on a [`ManualClock`](crate::memory::ManualClock). Zero-duration executions end inside
//! `submit`.
//!
//! ```
//! use std::time::Duration;
//! use shipinator_core::memory::{MockExecutor, MockStep};
//!
//! let executor = MockExecutor::new();
//! executor.script("unit-tests", MockStep::fail(2).with_duration(Duration::from_secs(5)));
//! executor.script_attempt("flaky", 1, MockStep::lost("node went away"));
//! executor.script("compile", MockStep::succeed().with_log_lines(["compiling", "done"]));
//! // A second object over the same executions, as after an engine restart:
//! let restarted = executor.restart();
//! assert!(restarted.specs().is_empty());
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, watch};

use crate::artifact::{ArtifactMeta, ArtifactStore, ByteStream};
use crate::domain::{ArtifactId, ExecutionId};
use crate::executor::{
    ExecHandle, ExecutionReport, ExecutionResult, ExecutionSpec, ExecutionState, Executor,
    ExecutorError, LogLineStream, OutputDecl, ProducedArtifact, ReportStream,
};
use crate::logs::{LogLine, LogStream, logs_uri};
use crate::memory::Clock;
use crate::time::Timestamp;

/// How a scripted execution ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MockOutcome {
    /// Finishes with exit code 0, producing its artifacts.
    Succeed,
    /// Finishes with this (non-zero) exit code.
    Fail {
        /// The exit code.
        exit_code: i32,
    },
    /// The substrate loses it: reported as [`ExecutionState::Lost`].
    Lost {
        /// Why.
        reason: String,
    },
    /// `submit` fails with [`ExecutorError::Rejected`]; nothing is started.
    RejectSubmit {
        /// Why.
        reason: String,
    },
    /// Runs until cancelled.
    Hang,
}

/// Produces the payload of a declared output: `(spec, output, index of the output)`.
pub type PayloadFn = Arc<dyn Fn(&ExecutionSpec, &OutputDecl, usize) -> Bytes + Send + Sync>;

/// The script of one step.
#[derive(Clone)]
pub struct MockStep {
    /// How it ends.
    pub outcome: MockOutcome,
    /// How long it runs before ending.
    pub duration: Duration,
    /// Artifacts reported verbatim on success (in addition to the declared outputs).
    pub artifacts: Vec<ProducedArtifact>,
    /// Log lines, available from submission on.
    pub log_lines: Vec<String>,
    /// Payload of each declared output ([`ExecutionSpec::outputs`]) stored on success when an
    /// artifact store is attached; `None` for a short text naming the step and output.
    pub payload: Option<PayloadFn>,
}

impl fmt::Debug for MockStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockStep")
            .field("outcome", &self.outcome)
            .field("duration", &self.duration)
            .field("artifacts", &self.artifacts)
            .field("log_lines", &self.log_lines)
            .field("payload", &self.payload.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl Default for MockStep {
    fn default() -> Self {
        Self::succeed()
    }
}

impl MockStep {
    fn with_outcome(outcome: MockOutcome) -> Self {
        Self {
            outcome,
            duration: Duration::ZERO,
            artifacts: Vec::new(),
            log_lines: Vec::new(),
            payload: None,
        }
    }

    /// Succeeds at once.
    pub fn succeed() -> Self {
        Self::with_outcome(MockOutcome::Succeed)
    }

    /// Fails at once with `exit_code`.
    pub fn fail(exit_code: i32) -> Self {
        Self::with_outcome(MockOutcome::Fail { exit_code })
    }

    /// Is lost at once.
    pub fn lost(reason: impl Into<String>) -> Self {
        Self::with_outcome(MockOutcome::Lost {
            reason: reason.into(),
        })
    }

    /// Is refused by `submit`.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self::with_outcome(MockOutcome::RejectSubmit {
            reason: reason.into(),
        })
    }

    /// Runs until cancelled.
    pub fn hang() -> Self {
        Self::with_outcome(MockOutcome::Hang)
    }

    /// Ends after `duration`.
    #[must_use]
    pub fn with_duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// Logs these lines.
    #[must_use]
    pub fn with_log_lines<I, S>(mut self, lines: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.log_lines = lines.into_iter().map(Into::into).collect();
        self
    }

    /// Also reports these artifacts on success.
    #[must_use]
    pub fn with_artifacts(mut self, artifacts: Vec<ProducedArtifact>) -> Self {
        self.artifacts = artifacts;
        self
    }

    /// Produces declared outputs with this payload.
    #[must_use]
    pub fn with_payload(mut self, payload: PayloadFn) -> Self {
        self.payload = Some(payload);
        self
    }
}

enum Phase {
    /// Ends at `deadline` (never for `Hang`).
    Running {
        deadline: Option<Timestamp>,
    },
    /// Its end is being computed (artifacts stored).
    Finishing,
    Done(ExecutionState),
}

struct MockExec {
    handle: ExecHandle,
    spec: Arc<ExecutionSpec>,
    script: Arc<MockStep>,
    submitted_at: Timestamp,
    phase: Phase,
}

enum TimeSource {
    /// `tokio::time` (paused or real), anchored to the wall clock at creation.
    Tokio {
        base: Timestamp,
        start: tokio::time::Instant,
    },
    /// A caller's clock; nothing sleeps, [`MockExecutor::tick`] finishes due executions.
    Clock(Clock),
}

struct Subscriber {
    tx: mpsc::UnboundedSender<ExecutionReport>,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    execs: HashMap<ExecutionId, MockExec>,
    deadlines: BTreeSet<(Timestamp, ExecutionId)>,
    /// Every spec received, sharing the execution table's copy.
    specs: Vec<Arc<ExecutionSpec>>,
    by_step: HashMap<String, Arc<MockStep>>,
    /// Step name, then attempt.
    by_attempt: HashMap<String, HashMap<u32, Arc<MockStep>>>,
    default: Arc<MockStep>,
    subscribers: Vec<Subscriber>,
    artifact_store: Option<Arc<dyn ArtifactStore>>,
    submits: u64,
}

/// The executions themselves: shared by every [`MockExecutor`] made by
/// [`MockExecutor::restart`].
struct Substrate {
    state: Mutex<State>,
    time: TimeSource,
    /// Bumped whenever an execution reaches a terminal state.
    ended: watch::Sender<u64>,
}

impl Substrate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now(&self) -> Timestamp {
        match &self.time {
            TimeSource::Tokio { base, start } => *base + start.elapsed(),
            TimeSource::Clock(clock) => clock(),
        }
    }

    /// Records a terminal state (unless one is already recorded) and reports it.
    fn set_done(&self, id: ExecutionId, state: ExecutionState) -> bool {
        let mut st = self.lock();
        let Some(exec) = st.execs.get_mut(&id) else {
            return false;
        };
        if let Phase::Done(_) = exec.phase {
            return false;
        }
        if let Phase::Running {
            deadline: Some(deadline),
        } = exec.phase
        {
            st.deadlines.remove(&(deadline, id));
        }
        let Some(exec) = st.execs.get_mut(&id) else {
            return false;
        };
        exec.phase = Phase::Done(state.clone());
        let report = ExecutionReport {
            execution_id: id,
            state,
        };
        // Every subscriber but the last gets a copy; the last gets the report itself.
        let mut report = Some(report);
        let last = st.subscribers.len().saturating_sub(1);
        let mut i = 0;
        st.subscribers.retain(|s| {
            let copy = if i == last {
                report.take()
            } else {
                report.clone()
            };
            i += 1;
            copy.is_some_and(|r| s.tx.send(r).is_ok())
        });
        drop(st);
        self.ended.send_modify(|n| *n = n.wrapping_add(1));
        true
    }

    /// Finishes every execution whose deadline has passed.
    async fn finish_due(&self) {
        let now = self.now();
        let due: Vec<ExecutionId> = {
            let mut st = self.lock();
            let mut due = Vec::new();
            while let Some(&(deadline, id)) = st.deadlines.first() {
                if deadline > now {
                    break;
                }
                st.deadlines.pop_first();
                if let Some(exec) = st.execs.get_mut(&id)
                    && matches!(exec.phase, Phase::Running { .. })
                {
                    exec.phase = Phase::Finishing;
                    due.push(id);
                }
            }
            due
        };
        for id in due {
            self.finish(id).await;
        }
    }

    /// Finishes one execution if its deadline has passed.
    async fn finish_if_due(&self, id: ExecutionId) {
        let now = self.now();
        {
            let mut st = self.lock();
            let Some(exec) = st.execs.get_mut(&id) else {
                return;
            };
            let Phase::Running {
                deadline: Some(deadline),
            } = exec.phase
            else {
                return;
            };
            if deadline > now {
                return;
            }
            exec.phase = Phase::Finishing;
            st.deadlines.remove(&(deadline, id));
        }
        self.finish(id).await;
    }

    /// Computes and records the end of an execution in phase `Finishing`.
    async fn finish(&self, id: ExecutionId) {
        let (spec, script, store) = {
            let st = self.lock();
            let Some(exec) = st.execs.get(&id) else {
                return;
            };
            (
                Arc::clone(&exec.spec),
                Arc::clone(&exec.script),
                st.artifact_store.clone(),
            )
        };
        let state = match &script.outcome {
            MockOutcome::Succeed => match produce(&spec, &script, store.as_deref()).await {
                Ok(artifacts) => ExecutionState::Finished(ExecutionResult {
                    exit_code: 0,
                    logs_uri: Some(logs_uri(id)),
                    artifacts,
                    failure: None,
                }),
                Err(message) => ExecutionState::Finished(ExecutionResult {
                    exit_code: 0,
                    logs_uri: Some(logs_uri(id)),
                    artifacts: Vec::new(),
                    failure: Some(message),
                }),
            },
            MockOutcome::Fail { exit_code } => ExecutionState::Finished(ExecutionResult {
                exit_code: *exit_code,
                logs_uri: Some(logs_uri(id)),
                artifacts: Vec::new(),
                failure: None,
            }),
            MockOutcome::Lost { reason } => ExecutionState::Lost {
                reason: reason.clone(),
            },
            // Neither reaches `finish`: rejected specs are never registered, hanging ones have
            // no deadline.
            MockOutcome::RejectSubmit { reason } => ExecutionState::Lost {
                reason: reason.clone(),
            },
            MockOutcome::Hang => return,
        };
        self.set_done(id, state);
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        self.lock().deadlines.first().map(|(t, _)| *t)
    }

    /// Sleeps until `deadline` by the time source; never returns on a caller's clock.
    async fn sleep_until(&self, deadline: Option<Timestamp>) {
        match (&self.time, deadline) {
            (TimeSource::Tokio { .. }, Some(deadline)) => {
                let d = deadline.saturating_duration_since(self.now());
                // Round up so the deadline has surely passed on wake-up.
                tokio::time::sleep(d + Duration::from_micros(1)).await;
            }
            _ => std::future::pending::<()>().await,
        }
    }
}

/// Stores the declared outputs (when an artifact store is attached) and returns every artifact.
async fn produce(
    spec: &ExecutionSpec,
    script: &MockStep,
    store: Option<&dyn ArtifactStore>,
) -> Result<Vec<ProducedArtifact>, String> {
    let mut out = script.artifacts.clone();
    let Some(store) = store else {
        return Ok(out);
    };
    for (index, decl) in spec.outputs.iter().enumerate() {
        let mut metadata = BTreeMap::new();
        if let Some(image_ref) = &decl.image_ref {
            metadata.insert("image_ref".to_owned(), image_ref.clone());
        }
        if decl.path.is_none() {
            // Reference only (an image known by ref): nothing to store.
            out.push(ProducedArtifact {
                id: ArtifactId::new_v7(),
                artifact_type: decl.artifact_type,
                name: decl.name.clone(),
                path: None,
                storage_backend: "none".to_owned(),
                storage_path: String::new(),
                checksum: None,
                size: 0,
                metadata,
            });
            continue;
        }
        let payload = match &script.payload {
            Some(f) => f(spec, decl, index),
            None => Bytes::from(format!(
                "mock output {index} of step {} ({}), execution {}\n",
                spec.step_name,
                decl.path.as_deref().unwrap_or_default(),
                spec.execution_id
            )),
        };
        let id = ArtifactId::new_v7();
        let meta = ArtifactMeta {
            artifact_type: Some(decl.artifact_type),
            content_type: None,
            file_name: decl
                .path
                .as_deref()
                .and_then(|p| p.rsplit('/').next())
                .map(str::to_owned),
            run_id: Some(spec.run_id),
            pipeline_id: None,
            job_id: Some(spec.job_id),
            step_id: Some(spec.step_id),
            extra: metadata.clone(),
        };
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok::<_, std::io::Error>(
            payload,
        )]));
        let stored = store
            .put(id, meta, body)
            .await
            .map_err(|e| format!("storing output {index} failed: {e}"))?;
        out.push(ProducedArtifact {
            id,
            artifact_type: decl.artifact_type,
            name: decl.name.clone(),
            path: decl.path.clone(),
            storage_backend: stored.backend,
            storage_path: stored.storage_path,
            checksum: Some(stored.checksum),
            size: stored.size,
            metadata,
        });
    }
    Ok(out)
}

/// An [`Executor`] that runs nothing: each execution ends as its step's [`MockStep`] says.
///
/// Clones share everything; [`MockExecutor::restart`] makes a new object over the same
/// executions (with its own [`Executor::reports`] stream), as an engine restart would.
#[derive(Clone)]
pub struct MockExecutor {
    substrate: Arc<Substrate>,
}

impl fmt::Debug for MockExecutor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.substrate.lock();
        f.debug_struct("MockExecutor")
            .field("executions", &st.execs.len())
            .field("submits", &st.submits)
            .finish_non_exhaustive()
    }
}

impl Default for MockExecutor {
    fn default() -> Self {
        Self::new()
    }
}

impl MockExecutor {
    fn with_time(time: TimeSource) -> Self {
        let (ended, _) = watch::channel(0);
        Self {
            substrate: Arc::new(Substrate {
                state: Mutex::new(State::default()),
                time,
                ended,
            }),
        }
    }

    /// An executor whose durations elapse by `tokio::time` (paused or real).
    pub fn new() -> Self {
        Self::with_time(TimeSource::Tokio {
            base: Timestamp::now(),
            start: tokio::time::Instant::now(),
        })
    }

    /// An executor whose durations elapse by `clock`. Nothing sleeps: executions are finished
    /// by [`Executor::status`] or by [`MockExecutor::tick`] after the clock moved.
    pub fn with_clock(clock: Clock) -> Self {
        Self::with_time(TimeSource::Clock(clock))
    }

    /// Stores the declared outputs of succeeding steps in `store`, so later stages can fetch
    /// them. Applies to executions that finish from now on.
    #[must_use]
    pub fn with_artifact_store(self, store: Arc<dyn ArtifactStore>) -> Self {
        self.substrate.lock().artifact_store = Some(store);
        self
    }

    /// Scripts every attempt of steps named `step_name`.
    pub fn script(&self, step_name: impl Into<String>, step: MockStep) {
        self.substrate
            .lock()
            .by_step
            .insert(step_name.into(), Arc::new(step));
    }

    /// Scripts one attempt of steps named `step_name` (takes precedence over
    /// [`MockExecutor::script`]).
    pub fn script_attempt(&self, step_name: impl Into<String>, attempt: u32, step: MockStep) {
        self.substrate
            .lock()
            .by_attempt
            .entry(step_name.into())
            .or_default()
            .insert(attempt, Arc::new(step));
    }

    /// Scripts every step that has no script of its own (initially: succeed at once).
    pub fn set_default(&self, step: MockStep) {
        self.substrate.lock().default = Arc::new(step);
    }

    /// A new executor object over the same executions and scripts, as after a restart of the
    /// engine. Its [`Executor::reports`] stream is its own.
    pub fn restart(&self) -> MockExecutor {
        self.clone()
    }

    /// Every spec received by `submit`, in order, including repeated and rejected submits.
    pub fn specs(&self) -> Vec<ExecutionSpec> {
        self.substrate
            .lock()
            .specs
            .iter()
            .map(|s| ExecutionSpec::clone(s))
            .collect()
    }

    /// How many times `submit` was called.
    pub fn submit_count(&self) -> u64 {
        self.substrate.lock().submits
    }

    /// Executions that have started and not ended.
    pub fn running(&self) -> Vec<ExecHandle> {
        let st = self.substrate.lock();
        let mut out: Vec<ExecHandle> = st
            .execs
            .values()
            .filter(|e| !matches!(e.phase, Phase::Done(_)))
            .map(|e| e.handle.clone())
            .collect();
        out.sort_by_key(|h| h.execution_id);
        out
    }

    /// Finishes every execution whose duration has elapsed, reporting each. Call it after
    /// advancing the clock of an executor built [`with_clock`](MockExecutor::with_clock).
    pub async fn tick(&self) {
        self.substrate.finish_due().await;
    }

    /// Makes a running execution lost now, as if its node vanished. Returns whether it was
    /// running.
    pub fn lose(&self, id: ExecutionId, reason: impl Into<String>) -> bool {
        self.substrate.set_done(
            id,
            ExecutionState::Lost {
                reason: reason.into(),
            },
        )
    }

    fn script_for(st: &State, spec: &ExecutionSpec) -> Arc<MockStep> {
        st.by_attempt
            .get(spec.step_name.as_str())
            .and_then(|attempts| attempts.get(&spec.attempt))
            .or_else(|| st.by_step.get(spec.step_name.as_str()))
            .map_or_else(|| Arc::clone(&st.default), Arc::clone)
    }
}

fn external_id(id: ExecutionId) -> String {
    format!("mock-{id}")
}

#[async_trait::async_trait]
impl Executor for MockExecutor {
    fn kind(&self) -> &'static str {
        "mock"
    }

    async fn submit(&self, spec: &ExecutionSpec) -> Result<ExecHandle, ExecutorError> {
        self.submit_shared(Arc::new(spec.clone())).await
    }

    async fn submit_shared(&self, spec: Arc<ExecutionSpec>) -> Result<ExecHandle, ExecutorError> {
        let now = self.substrate.now();
        let id = spec.execution_id;
        let (handle, finish_now) = {
            let mut st = self.substrate.lock();
            st.submits += 1;
            if let Some(existing) = st.execs.get(&id) {
                let handle = existing.handle.clone();
                // A repeated submit of the same spec shares the recorded copy.
                let copy = if existing.spec == spec {
                    Arc::clone(&existing.spec)
                } else {
                    spec
                };
                st.specs.push(copy);
                return Ok(handle);
            }
            st.specs.push(Arc::clone(&spec));
            let script = Self::script_for(&st, &spec);
            let deadline = match &script.outcome {
                MockOutcome::RejectSubmit { reason } => {
                    return Err(ExecutorError::Rejected {
                        id,
                        reason: reason.clone(),
                    });
                }
                MockOutcome::Hang => None,
                MockOutcome::Succeed | MockOutcome::Fail { .. } | MockOutcome::Lost { .. } => {
                    Some(now + script.duration)
                }
            };
            let handle = ExecHandle {
                execution_id: id,
                external_id: external_id(id),
            };
            let finish_now = deadline.is_some() && script.duration.is_zero();
            let phase = if finish_now {
                Phase::Finishing
            } else {
                Phase::Running { deadline }
            };
            if let (Some(d), false) = (deadline, finish_now) {
                st.deadlines.insert((d, id));
                for s in &st.subscribers {
                    s.wake.notify_one();
                }
            }
            st.execs.insert(
                id,
                MockExec {
                    handle: handle.clone(),
                    spec,
                    script,
                    submitted_at: now,
                    phase,
                },
            );
            (handle, finish_now)
        };
        if finish_now {
            self.substrate.finish(id).await;
        }
        Ok(handle)
    }

    async fn status(&self, handle: &ExecHandle) -> Result<ExecutionState, ExecutorError> {
        let id = handle.execution_id;
        self.substrate.finish_if_due(id).await;
        let st = self.substrate.lock();
        let exec = st.execs.get(&id).ok_or(ExecutorError::NotFound { id })?;
        Ok(match &exec.phase {
            Phase::Done(state) => state.clone(),
            Phase::Running { .. } | Phase::Finishing => ExecutionState::Running,
        })
    }

    async fn cancel(&self, handle: &ExecHandle) -> Result<(), ExecutorError> {
        let id = handle.execution_id;
        if !self.substrate.lock().execs.contains_key(&id) {
            return Err(ExecutorError::NotFound { id });
        }
        self.substrate.set_done(id, ExecutionState::Canceled);
        Ok(())
    }

    async fn logs(
        &self,
        handle: &ExecHandle,
        from_seq: u64,
    ) -> Result<LogLineStream, ExecutorError> {
        let id = handle.execution_id;
        let (lines, at) = {
            let st = self.substrate.lock();
            let exec = st.execs.get(&id).ok_or(ExecutorError::NotFound { id })?;
            (exec.script.log_lines.clone(), exec.submitted_at)
        };
        let start = usize::try_from(from_seq).unwrap_or(usize::MAX);
        let lines: Vec<Result<LogLine, ExecutorError>> = lines
            .into_iter()
            .enumerate()
            .skip(start)
            .map(|(seq, text)| {
                Ok(LogLine {
                    seq: seq as u64,
                    at,
                    stream: LogStream::Stdout,
                    text,
                })
            })
            .collect();
        let substrate = Arc::clone(&self.substrate);
        // Every line exists from submission on; the stream ends once the execution has ended.
        let wait_end = futures_util::stream::once(async move {
            let mut ended = substrate.ended.subscribe();
            loop {
                substrate.finish_if_due(id).await;
                let deadline = {
                    let st = substrate.lock();
                    match st.execs.get(&id).map(|e| &e.phase) {
                        None | Some(Phase::Done(_)) => return,
                        Some(Phase::Running { deadline }) => *deadline,
                        Some(Phase::Finishing) => None,
                    }
                };
                tokio::select! {
                    changed = ended.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = substrate.sleep_until(deadline) => {}
                }
            }
        })
        .filter_map(|()| std::future::ready(None));
        Ok(Box::pin(futures_util::stream::iter(lines).chain(wait_end)))
    }

    fn reports(&self) -> Option<ReportStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        let wake = Arc::new(Notify::new());
        self.substrate.lock().subscribers.push(Subscriber {
            tx,
            wake: Arc::clone(&wake),
        });
        let substrate = Arc::clone(&self.substrate);
        let stream = futures_util::stream::unfold(
            (substrate, rx, wake),
            |(substrate, mut rx, wake)| async move {
                loop {
                    if let Ok(report) = rx.try_recv() {
                        return Some((report, (substrate, rx, wake)));
                    }
                    substrate.finish_due().await;
                    if let Ok(report) = rx.try_recv() {
                        return Some((report, (substrate, rx, wake)));
                    }
                    let deadline = substrate.next_deadline();
                    tokio::select! {
                        report = rx.recv() => {
                            return report.map(|r| (r, (substrate, rx, wake)));
                        }
                        () = substrate.sleep_until(deadline) => {}
                        () = wake.notified() => {}
                    }
                }
            },
        );
        Some(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobId, JobType, RunId, StepId};
    use crate::executor::WorkspaceRef;

    fn spec(step_name: &str, attempt: u32) -> ExecutionSpec {
        let run_id = RunId::new_v7();
        let job_id = JobId::derive(run_id, JobType::Build);
        let step_id = StepId::derive(job_id, 0);
        ExecutionSpec {
            execution_id: ExecutionId::derive(step_id, attempt),
            run_id,
            job_id,
            step_id,
            attempt,
            stage: JobType::Build,
            step_name: step_name.to_owned(),
            image: None,
            command: vec!["true".to_owned()],
            env: BTreeMap::new(),
            workdir: None,
            timeout: None,
            workspace: WorkspaceRef::for_stage(run_id, JobType::Build),
            source: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn scripted_durations_elapse_on_paused_time() {
        let ex = MockExecutor::new();
        ex.script(
            "slow",
            MockStep::fail(3).with_duration(Duration::from_secs(60)),
        );
        let mut reports = ex.reports().unwrap();
        let s = spec("slow", 1);
        let h = ex.submit(&s).await.unwrap();
        assert_eq!(ex.status(&h).await.unwrap(), ExecutionState::Running);
        let report = reports.next().await.unwrap();
        assert_eq!(report.execution_id, s.execution_id);
        match report.state {
            ExecutionState::Finished(r) => assert_eq!(r.exit_code, 3),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn manual_clock_and_attempt_scripts() {
        let clock = crate::memory::ManualClock::new(Timestamp::from_unix_micros(0));
        let ex = MockExecutor::with_clock(clock.as_clock());
        ex.script(
            "s",
            MockStep::succeed().with_duration(Duration::from_secs(1)),
        );
        ex.script_attempt("s", 1, MockStep::lost("gone"));
        ex.script("r", MockStep::reject("bad image"));
        let h1 = ex.submit(&spec("s", 1)).await.unwrap();
        assert!(matches!(
            ex.status(&h1).await.unwrap(),
            ExecutionState::Lost { .. }
        ));
        let h2 = ex.submit(&spec("s", 2)).await.unwrap();
        assert_eq!(ex.status(&h2).await.unwrap(), ExecutionState::Running);
        clock.advance(Duration::from_secs(1));
        ex.tick().await;
        assert!(matches!(
            ex.status(&h2).await.unwrap(),
            ExecutionState::Finished(ExecutionResult { exit_code: 0, .. })
        ));
        assert!(matches!(
            ex.submit(&spec("r", 1)).await,
            Err(ExecutorError::Rejected { .. })
        ));
        assert_eq!(ex.specs().len(), 3);
        assert!(ex.running().is_empty());
    }
}
