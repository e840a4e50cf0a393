//! The async driver: the only code that spawns tasks or sleeps.
//!
//! A [`Driver`] owns an [`Orchestrator`] and runs its loop on tokio, in the manner of str0m's
//! run loop: it waits for API requests, executor reports, side-effect results or the next
//! deadline; feeds what arrived to [`Orchestrator::handle`]; commits every
//! [`Command::Persist`] of the tick in one [`Store::commit`] fenced by its run leases; and only
//! then carries out the side effects (submit, cancel, status checks), whose results come back
//! as inputs. Because the store is written first (the outbox), a driver that stops at any point
//! can be replaced by another that rebuilds every non-terminal run from the store and
//! reconciles it with the executor.
//!
//! ```no_run
//! # async fn demo(request: shipinator_core::orchestrator::RunRequest) -> Result<(), shipinator_core::driver::DriverError> {
//! use std::sync::Arc;
//! use shipinator_core::driver::{Driver, DriverConfig};
//! use shipinator_core::memory::{InMemoryStore, MockExecutor};
//!
//! let driver = Driver::new(
//!     Arc::new(InMemoryStore::new()),
//!     Arc::new(MockExecutor::new()),
//!     DriverConfig::default(),
//! );
//! let handle = driver.spawn();
//! let run = handle.submit_run(request).await?;
//! let finished = handle.wait_for_run(run).await?;
//! println!("{} ended {}", finished.id, finished.status);
//! handle.shutdown().await?;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_core::Stream;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::domain::{ExecutionId, PipelineRun, RunId};
use crate::executor::{
    ExecHandle, ExecutionReport, ExecutionState, Executor, ExecutorError, ReportStream,
};
use crate::orchestrator::{
    Command, Input, Orchestrator, OrchestratorConfig, PlanError, RunDocument, RunRequest,
    new_run_with_document, retry_run,
};
use crate::store::{Batch, NewRun, RunEvent, RunLease, RunRecord, Store, StoreError, Write};
use crate::time::Timestamp;

/// Tuning of a [`Driver`].
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// This driver's lease owner name; unique per driver process.
    pub owner: String,
    /// How long a run lease lasts without renewal; renewed every third of it.
    pub lease_ttl: Duration,
    /// How often to claim runs no driver holds (new runs created elsewhere, orphans of a
    /// stopped driver) when no wake-up says so sooner ([`Driver::with_wakeups`]); 1 s by
    /// default.
    pub claim_interval: Duration,
    /// How often to poll `Executor::status` for running executions (the fallback for lost
    /// reports).
    pub poll_interval: Duration,
    /// At most this many runs owned at once.
    pub max_runs: u32,
    /// First delay of the store-unavailable backoff (doubling up to 32 times that).
    pub retry_backoff: Duration,
    /// How long the writes recording that executions started may wait for the next commit.
    /// A tick that only learns that executions started, and carries out no side effect, is
    /// not committed on its own: its writes go first in the next tick's commit (often the
    /// execution's end, for a short step), or alone once this delay has passed. Nothing
    /// depends on them being durable (an execution recorded `pending` is submitted again
    /// under the same id after a restart), and the order of writes is kept. Zero commits
    /// them at once; 50 ms by default.
    pub started_write_delay: Duration,
    /// The orchestrator's configuration; its `executor_type` is taken from the executor.
    pub orchestrator: OrchestratorConfig,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            owner: format!("driver-{}", uuid::Uuid::new_v4()),
            lease_ttl: Duration::from_secs(30),
            claim_interval: Duration::from_secs(1),
            poll_interval: Duration::from_secs(10),
            max_runs: 10_000,
            retry_backoff: Duration::from_millis(50),
            started_write_delay: Duration::from_millis(50),
            orchestrator: OrchestratorConfig::default(),
        }
    }
}

/// Errors of the driver's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The store refused or failed.
    #[error("store error")]
    Store(#[from] StoreError),
    /// The run cannot be planned or retried.
    #[error("cannot plan the run")]
    Plan(#[from] PlanError),
    /// The driver has stopped.
    #[error("the driver has stopped")]
    Stopped,
}

/// The driver's clock: wall-clock time at start plus `tokio::time` elapsed since, so paused
/// test time moves it too.
#[derive(Debug, Clone, Copy)]
struct Clock {
    base: Timestamp,
    start: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            base: Timestamp::now(),
            start: Instant::now(),
        }
    }

    fn now(&self) -> Timestamp {
        self.base + self.start.elapsed()
    }

    fn instant_of(&self, t: Timestamp) -> Instant {
        let base_now = self.now();
        Instant::now() + t.saturating_duration_since(base_now)
    }
}

enum Msg {
    Created(Box<NewRun>, Arc<RunDocument>),
    Cancel(RunId),
    Input(Input),
    /// Notify when the run ends; answered `false` at once when this driver does not own it.
    Wait(RunId, oneshot::Sender<bool>),
    Shutdown(oneshot::Sender<()>),
}

/// The async shell around an [`Orchestrator`]. Build it with [`Driver::new`], start it with
/// [`Driver::spawn`].
#[derive(Debug)]
pub struct Driver {
    store: Arc<dyn Store>,
    executor: Arc<dyn Executor>,
    config: DriverConfig,
    wakeups: Option<WakeupSource>,
}

/// A stream whose every item tells the driver to look for work in the store now.
type WakeupStream = Pin<Box<dyn Stream<Item = ()> + Send>>;

struct WakeupSource(WakeupStream);

impl std::fmt::Debug for WakeupSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WakeupSource")
    }
}

/// A cloneable handle on a running [`Driver`].
#[derive(Debug, Clone)]
pub struct DriverHandle {
    tx: mpsc::UnboundedSender<Msg>,
    events: broadcast::Sender<RunEvent>,
    store: Arc<dyn Store>,
    clock: Clock,
    poll_interval: Duration,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Created(..) => "Created",
            Msg::Cancel(_) => "Cancel",
            Msg::Input(_) => "Input",
            Msg::Wait(..) => "Wait",
            Msg::Shutdown(_) => "Shutdown",
        })
    }
}

impl Driver {
    /// A driver over `store` and `executor`.
    pub fn new(store: Arc<dyn Store>, executor: Arc<dyn Executor>, config: DriverConfig) -> Self {
        Self {
            store,
            executor,
            config,
            wakeups: None,
        }
    }

    /// Claims runs whenever `wakeups` yields an item, on top of every
    /// [`claim_interval`](DriverConfig::claim_interval): a store that announces new work (a
    /// run created, a batch written from outside a driver) lets several drivers sharing it
    /// pick work up at once. The stream ending stops the wake-ups, not the driver.
    ///
    /// With PostgreSQL: `driver.with_wakeups(pg.wakeups().await?.into_stream())`.
    #[must_use]
    pub fn with_wakeups<S>(mut self, wakeups: S) -> Self
    where
        S: Stream + Send + 'static,
    {
        self.wakeups = Some(WakeupSource(Box::pin(wakeups.map(|_| ()))));
        self
    }

    /// Starts the driver's loop on the current tokio runtime. At start it claims every run no
    /// driver holds, rebuilds each from the store and reconciles it with the executor.
    ///
    /// # Panics
    /// Outside a tokio runtime (as `tokio::spawn` does).
    pub fn spawn(self) -> DriverHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let (fx_tx, fx_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(4096);
        let clock = Clock::new();
        let mut orch_config = self.config.orchestrator.clone();
        orch_config.executor_type = self.executor.kind().to_owned();
        let poll_interval = self.config.poll_interval;
        let store = Arc::clone(&self.store);
        let state = Loop {
            orch: Orchestrator::new(orch_config),
            store: self.store,
            executor: self.executor,
            config: self.config,
            clock,
            rx,
            fx_tx,
            fx_rx,
            events: events.clone(),
            leases: HashMap::new(),
            created: HashMap::new(),
            pending_cancels: HashSet::new(),
            store_cancels: HashSet::new(),
            submitting: HashSet::new(),
            held: HashMap::new(),
            reload: Vec::new(),
            claim_now: true,
            waiters: HashMap::new(),
            tick_writes: TickWrites::default(),
            tick_effects: Vec::new(),
            deferred_until: None,
        };
        let reports = state.executor.reports();
        let wakeups = self.wakeups.map(|w| w.0);
        let task = tokio::spawn(
            state
                .run(reports, wakeups)
                .instrument(tracing::info_span!("driver")),
        );
        DriverHandle {
            tx,
            events,
            store,
            clock,
            poll_interval,
            task: Arc::new(Mutex::new(Some(task))),
        }
    }
}

impl DriverHandle {
    /// Plans and creates a run, then hands it to the driver (which claims it).
    ///
    /// # Errors
    /// [`DriverError::Plan`] when the request cannot be planned; store errors from creating it.
    pub async fn submit_run(&self, request: RunRequest) -> Result<RunId, DriverError> {
        let id = RunId::new_v7();
        let (new, doc) = new_run_with_document(&request, id, self.clock.now())?;
        self.create(new, doc).await
    }

    /// Creates a run that retries the failed or cancelled run `original` from its failed
    /// stage, reusing the artifacts of the stages that succeeded.
    ///
    /// # Errors
    /// [`DriverError::Plan`] when the run cannot be retried; store errors.
    pub async fn retry_run(
        &self,
        original: RunId,
        requested_by: &str,
    ) -> Result<RunId, DriverError> {
        let record = self.store.load_run(original).await?;
        let new = retry_run(&record, RunId::new_v7(), self.clock.now(), requested_by)?;
        let doc = RunDocument::from_run(&new.run)?;
        self.create(new, doc).await
    }

    async fn create(&self, new: NewRun, doc: RunDocument) -> Result<RunId, DriverError> {
        let doc = Arc::new(doc);
        self.store.create_run(&new).await?;
        let id = new.run.id;
        self.tx
            .send(Msg::Created(Box::new(new), doc))
            .map_err(|_| DriverError::Stopped)?;
        Ok(id)
    }

    /// Asks to cancel a run on behalf of `by`, wherever it is driven: the request is recorded
    /// in the store, where the driver that owns the run (this one, or another sharing the
    /// store) finds it within a claim interval, or at once when the store wakes its drivers.
    /// This driver acts on it immediately if it owns the run.
    ///
    /// # Errors
    /// Store errors (`NotFound` for an unknown run); [`DriverError::Stopped`].
    pub async fn request_cancel(&self, run: RunId, by: &str) -> Result<(), DriverError> {
        self.store.request_cancel(run, by, self.clock.now()).await?;
        self.cancel_run(run)
    }

    /// Asks to cancel a run. A run this driver does not own yet is cancelled when it claims it.
    /// Nothing is recorded: a run another driver owns is not cancelled; use
    /// [`request_cancel`](Self::request_cancel) for that.
    ///
    /// # Errors
    /// [`DriverError::Stopped`].
    pub fn cancel_run(&self, run: RunId) -> Result<(), DriverError> {
        self.tx
            .send(Msg::Cancel(run))
            .map_err(|_| DriverError::Stopped)
    }

    /// Feeds a report pushed by an executor (an HTTP callback).
    ///
    /// # Errors
    /// [`DriverError::Stopped`].
    pub fn report(&self, report: ExecutionReport) -> Result<(), DriverError> {
        match report_input(report) {
            Some(input) => self
                .tx
                .send(Msg::Input(input))
                .map_err(|_| DriverError::Stopped),
            None => Ok(()),
        }
    }

    /// Run events, as committed by this driver.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.events.subscribe()
    }

    /// Waits until the run is terminal and returns it, as stored. A run this driver owns wakes
    /// the waiter when it ends; any other run (owned by another driver, or by none yet) is read
    /// from the store at a short interval: from 10 ms, doubling up to 200 ms (or the poll
    /// interval, if shorter), so the caller learns of its end within about 200 ms.
    ///
    /// # Errors
    /// Store errors other than `Unavailable` (which is retried); [`DriverError::Stopped`].
    pub async fn wait_for_run(&self, run: RunId) -> Result<PipelineRun, DriverError> {
        let cap = WAIT_POLL_MAX.min(self.poll_interval);
        let mut delay = WAIT_POLL_MIN.min(cap);
        loop {
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Msg::Wait(run, tx))
                .map_err(|_| DriverError::Stopped)?;
            // A run this driver owns (or created and will claim) answers `true` when it ends;
            // any other answer, or none within the poll interval, is checked against the store.
            let answer = tokio::time::timeout(self.poll_interval, rx).await;
            match self.store.get_run(run).await {
                Ok(r) if r.status.is_terminal() => return Ok(r),
                Ok(_) => {}
                Err(e) if e.is_transient() => {}
                Err(e) => return Err(e.into()),
            }
            match answer {
                // Owned and ended, or not answered yet: look again.
                Ok(Ok(true)) | Err(_) => {}
                Ok(Err(_)) => return Err(DriverError::Stopped),
                // Not owned here: read the store again shortly.
                Ok(Ok(false)) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(cap);
                }
            }
        }
    }

    /// Stops the driver: handles what already arrived, commits it, releases every lease and
    /// ends the loop. Executions keep running; the next driver adopts them.
    ///
    /// # Errors
    /// [`DriverError::Stopped`] if it had already stopped.
    pub async fn shutdown(&self) -> Result<(), DriverError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Msg::Shutdown(tx))
            .map_err(|_| DriverError::Stopped)?;
        rx.await.map_err(|_| DriverError::Stopped)?;
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }

    /// Hands the driver a run as [`submit_run`](Self::submit_run) does after creating it,
    /// without creating it: tests use it to deliver the message late, after a claim
    /// overtook it.
    #[cfg(test)]
    pub(crate) fn send_created(&self, new: NewRun, doc: RunDocument) {
        let _ = self.tx.send(Msg::Created(Box::new(new), Arc::new(doc)));
    }

    /// Stops the driver at once, committing and releasing nothing, as a crash would. Its
    /// leases expire by themselves. Meant for tests of recovery.
    pub fn abort(&self) {
        if let Some(task) = self.task.lock().ok().and_then(|mut t| t.take()) {
            task.abort();
        }
    }
}

fn report_input(report: ExecutionReport) -> Option<Input> {
    let execution_id = report.execution_id;
    match report.state {
        ExecutionState::Pending => None,
        ExecutionState::Running => Some(Input::ExecutionStarted {
            execution_id,
            external_id: None,
        }),
        ExecutionState::Finished(result) => Some(Input::ExecutionFinished {
            execution_id,
            result,
        }),
        ExecutionState::Canceled => Some(Input::ExecutionCanceled { execution_id }),
        ExecutionState::Lost { reason } => Some(Input::ExecutionLost {
            execution_id,
            reason,
        }),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

struct Loop {
    orch: Orchestrator,
    store: Arc<dyn Store>,
    executor: Arc<dyn Executor>,
    config: DriverConfig,
    clock: Clock,
    rx: mpsc::UnboundedReceiver<Msg>,
    fx_tx: mpsc::UnboundedSender<Fx>,
    fx_rx: mpsc::UnboundedReceiver<Fx>,
    /// Executions whose submission is in flight: their status is not asked (a `NotFound`
    /// would race the submission) and a cancel waits for the submission's answer (the
    /// orchestrator asks again when it learns the execution started).
    submitting: HashSet<ExecutionId>,
    /// Reports about executions whose submission is in flight, handed over after its answer.
    held: HashMap<ExecutionId, Vec<Input>>,
    events: broadcast::Sender<RunEvent>,
    leases: HashMap<RunId, RunLease>,
    /// Runs this driver created and has not claimed yet.
    created: HashMap<RunId, (Box<NewRun>, Arc<RunDocument>)>,
    /// Cancels asked for runs not owned (yet).
    pending_cancels: HashSet<RunId>,
    /// Owned runs whose cancel request, read from the store, was already handed over.
    store_cancels: HashSet<RunId>,
    /// Runs to load again from the store (their rows changed under us).
    reload: Vec<RunId>,
    claim_now: bool,
    /// Callers of `wait_for_run`, woken when the run ends.
    waiters: HashMap<RunId, Vec<oneshot::Sender<bool>>>,
    /// Buffers of `tick`, empty between ticks unless `deferred_until` is set.
    tick_writes: TickWrites,
    tick_effects: Vec<Command>,
    /// Set while `tick_writes` holds the writes of ticks that only learned executions
    /// started: they are committed with the next tick, or alone at this instant.
    deferred_until: Option<Instant>,
}

/// The writes of one tick, in order, and which run each slice of them belongs to.
#[derive(Default)]
struct TickWrites {
    writes: Vec<Write>,
    /// Consecutive slices of `writes`: (run, length).
    runs: Vec<(RunId, usize)>,
}

impl TickWrites {
    fn push(&mut self, run_id: RunId, mut writes: Vec<Write>) {
        if writes.is_empty() {
            return;
        }
        match self.runs.last_mut() {
            Some((r, len)) if *r == run_id => *len += writes.len(),
            Some(_) | None => self.runs.push((run_id, writes.len())),
        }
        if self.writes.is_empty() {
            self.writes = writes;
        } else {
            self.writes.append(&mut writes);
        }
    }
}

/// What a side effect sends back to the loop.
#[derive(Debug)]
enum Fx {
    /// A fact learned by a status check or a cancellation.
    Input(Input),
    /// The answer to the submission of an execution.
    Submitted(ExecutionId, Input),
}

/// First and longest interval between two store reads of `wait_for_run` for a run this
/// driver does not own.
const WAIT_POLL_MIN: Duration = Duration::from_millis(10);
const WAIT_POLL_MAX: Duration = Duration::from_millis(200);

/// At most this many inputs are handled per tick (one store commit).
const MAX_TICK_INPUTS: usize = 4096;

impl Loop {
    async fn run(mut self, mut reports: Option<ReportStream>, mut wakeups: Option<WakeupStream>) {
        let mut next_claim = Instant::now();
        let mut next_renew = Instant::now() + self.config.lease_ttl / 3;
        let mut next_poll = Instant::now() + self.config.poll_interval;
        // Kept (empty) from one iteration to the next, like the tick's buffers.
        let mut inputs = Vec::new();
        let mut reported = Vec::new();
        loop {
            let now = Instant::now();
            if self.claim_now || now >= next_claim {
                self.claim_now = false;
                next_claim = now + self.config.claim_interval;
                inputs.extend(self.requested_cancels().await);
                inputs.extend(self.claim().await);
            }
            if now >= next_renew {
                next_renew = now + self.config.lease_ttl / 3;
                inputs.extend(self.renew().await);
            }
            if now >= next_poll {
                next_poll = now + self.config.poll_interval;
                self.poll_statuses();
                self.waiters.retain(|_, ws| {
                    ws.retain(|w| !w.is_closed());
                    !ws.is_empty()
                });
            }
            for run in std::mem::take(&mut self.reload) {
                if self.leases.contains_key(&run) {
                    match self.store.load_run(run).await {
                        Ok(record) => inputs.push(Input::RunLoaded {
                            record: Box::new(record),
                            document: None,
                        }),
                        Err(e) => {
                            tracing::warn!(run_id = %run, error = %error_chain(&e), "cannot reload run");
                            self.reload.push(run);
                        }
                    }
                }
            }
            if inputs.is_empty() {
                let mut wake = next_claim.min(next_renew).min(next_poll);
                if let Some(t) = self.orch.poll_timeout() {
                    wake = wake.min(self.clock.instant_of(t));
                }
                if let Some(t) = self.deferred_until {
                    wake = wake.min(t);
                }
                tokio::select! {
                    msg = self.rx.recv() => match msg {
                        None => {
                            self.stop().await;
                            return;
                        }
                        Some(Msg::Shutdown(done)) => {
                            self.drain(&mut inputs);
                            self.tick(&mut inputs).await;
                            self.flush_deferred().await;
                            self.stop().await;
                            let _ = done.send(());
                            return;
                        }
                        Some(msg) => self.accept(msg, &mut inputs),
                    },
                    Some(fx) = self.fx_rx.recv() => self.fx_input(fx, &mut inputs),
                    Some(report) = next_report(&mut reports) => {
                        if let Some(input) = report_input(report) {
                            self.reported(input, &mut inputs);
                        }
                    }
                    () = next_wakeup(&mut wakeups) => self.claim_now = true,
                    () = tokio::time::sleep_until(wake) => {}
                }
            }
            let stop = self.drain(&mut inputs);
            drain_reports(
                &mut reports,
                &mut reported,
                MAX_TICK_INPUTS.saturating_sub(inputs.len()),
            );
            for input in reported.drain(..) {
                self.reported(input, &mut inputs);
            }
            if stop {
                self.tick(&mut inputs).await;
                self.flush_deferred().await;
                self.stop().await;
                return;
            }
            if let Some(t) = self.orch.poll_timeout()
                && t <= self.clock.now()
            {
                inputs.push(Input::TimerFired);
            }
            if inputs.is_empty() {
                if self.deferred_until.is_some_and(|t| t <= Instant::now()) {
                    self.flush_deferred().await;
                }
            } else {
                self.tick(&mut inputs).await;
            }
        }
    }

    /// Takes what is ready without waiting; true when a shutdown was asked.
    fn drain(&mut self, inputs: &mut Vec<Input>) -> bool {
        while inputs.len() < MAX_TICK_INPUTS {
            match self.rx.try_recv() {
                Ok(Msg::Shutdown(done)) => {
                    let _ = done.send(());
                    return true;
                }
                Ok(msg) => self.accept(msg, inputs),
                Err(_) => break,
            }
        }
        while inputs.len() < MAX_TICK_INPUTS {
            match self.fx_rx.try_recv() {
                Ok(fx) => self.fx_input(fx, inputs),
                Err(_) => break,
            }
        }
        false
    }

    fn fx_input(&mut self, fx: Fx, inputs: &mut Vec<Input>) {
        match fx {
            Fx::Input(input) => inputs.push(input),
            Fx::Submitted(id, input) => {
                self.submitting.remove(&id);
                inputs.push(input);
                // Reports that overtook the answer come after it, so the execution's external
                // id is known when its end is recorded.
                inputs.extend(self.held.remove(&id).unwrap_or_default());
            }
        }
    }

    /// Takes a report from the executor (or a callback): held back while the execution's
    /// submission is in flight, handled now otherwise.
    fn reported(&mut self, input: Input, inputs: &mut Vec<Input>) {
        let id = match &input {
            Input::ExecutionStarted { execution_id, .. }
            | Input::ExecutionFinished { execution_id, .. }
            | Input::ExecutionLost { execution_id, .. }
            | Input::ExecutionCanceled { execution_id } => Some(*execution_id),
            Input::RunLoaded { .. }
            | Input::CancelRequested { .. }
            | Input::TimerFired
            | Input::RunReleased { .. } => None,
        };
        match id {
            Some(id) if self.submitting.contains(&id) => {
                self.held.entry(id).or_default().push(input);
            }
            Some(_) | None => inputs.push(input),
        }
    }

    fn accept(&mut self, msg: Msg, inputs: &mut Vec<Input>) {
        match msg {
            Msg::Created(new, doc) => {
                let run_id = new.run.id;
                // A claim can overtake the message (the run was in the store before it was
                // sent): a run already held needs no entry, which would otherwise outlive it.
                if !self.leases.contains_key(&run_id) && !self.orch.owns(run_id) {
                    self.created.insert(run_id, (new, doc));
                    self.claim_now = true;
                }
            }
            Msg::Cancel(run_id) => {
                if self.orch.owns(run_id) {
                    inputs.push(Input::CancelRequested { run_id });
                } else {
                    self.pending_cancels.insert(run_id);
                }
            }
            Msg::Input(input) => self.reported(input, inputs),
            Msg::Wait(run_id, tx) => {
                if self
                    .orch
                    .run_status(run_id)
                    .is_some_and(|status| status.is_terminal())
                {
                    // Already ended: no `RunEnded` will come to wake the waiter.
                    let _ = tx.send(true);
                } else if self.orch.owns(run_id)
                    || self.created.contains_key(&run_id)
                    || self.leases.contains_key(&run_id)
                {
                    // Owned, or about to be: created here and not claimed yet, or claimed and
                    // not loaded yet (between a claim and the tick that loads what it
                    // claimed, the run is neither created nor owned).
                    self.waiters.entry(run_id).or_default().push(tx);
                } else {
                    let _ = tx.send(false);
                }
            }
            Msg::Shutdown(done) => {
                let _ = done.send(());
            }
        }
    }

    async fn claim(&mut self) -> Vec<Input> {
        let owned = u32::try_from(self.leases.len()).unwrap_or(u32::MAX);
        let limit = self.config.max_runs.saturating_sub(owned);
        if limit == 0 {
            return Vec::new();
        }
        let claimed = match self
            .store
            .claim_runs(&self.config.owner, self.config.lease_ttl, limit)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot claim runs");
                self.claim_now = !self.created.is_empty();
                return Vec::new();
            }
        };
        let mut inputs = Vec::new();
        for lease in claimed {
            let run_id = lease.run_id;
            self.leases.insert(run_id, lease);
            let loaded = match self.created.remove(&run_id) {
                Some((new, doc)) => Some((
                    RunRecord {
                        run: new.run,
                        jobs: new.jobs,
                        steps: new.steps,
                        executions: Vec::new(),
                        artifacts: Vec::new(),
                    },
                    Some(doc),
                )),
                None => match self.store.load_run(run_id).await {
                    Ok(record) => Some((record, None)),
                    Err(e) => {
                        tracing::warn!(run_id = %run_id, error = %error_chain(&e), "cannot load claimed run");
                        self.reload.push(run_id);
                        None
                    }
                },
            };
            if let Some((record, document)) = loaded {
                tracing::debug!(run_id = %run_id, status = %record.run.status, "run claimed");
                inputs.push(Input::RunLoaded {
                    record: Box::new(record),
                    document,
                });
                if self.pending_cancels.remove(&run_id) {
                    inputs.push(Input::CancelRequested { run_id });
                }
            }
        }
        // Created runs another driver claimed first are that driver's.
        if !self.created.is_empty() {
            let store = &self.store;
            let mut gone = Vec::new();
            for id in self.created.keys() {
                if let Ok(run) = store.get_run(*id).await
                    && run.status.is_terminal()
                {
                    gone.push(*id);
                }
            }
            for id in gone {
                self.created.remove(&id);
                // Callers who waited on the entry learn the run ended (it did, elsewhere or
                // before this driver saw it created).
                for w in self.waiters.remove(&id).unwrap_or_default() {
                    let _ = w.send(true);
                }
            }
        }
        inputs
    }

    /// Cancel requests recorded in the store (by another process, or another replica) for
    /// runs this driver has loaded; each is handed to the orchestrator once.
    async fn requested_cancels(&mut self) -> Vec<Input> {
        let leases = &self.leases;
        self.store_cancels.retain(|r| leases.contains_key(r));
        let asked: Vec<RunId> = self
            .leases
            .keys()
            .filter(|r| self.orch.owns(**r) && !self.store_cancels.contains(*r))
            .copied()
            .collect();
        if asked.is_empty() {
            return Vec::new();
        }
        match self.store.cancel_requests(&asked).await {
            Ok(found) => found
                .into_iter()
                .filter(|r| self.store_cancels.insert(*r))
                .map(|run_id| {
                    tracing::info!(run_id = %run_id, "cancel requested through the store");
                    Input::CancelRequested { run_id }
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot read cancel requests");
                Vec::new()
            }
        }
    }

    async fn renew(&mut self) -> Vec<Input> {
        if self.leases.is_empty() {
            return Vec::new();
        }
        let held: Vec<RunLease> = self.leases.values().cloned().collect();
        match self.store.renew_leases(&held, self.config.lease_ttl).await {
            Ok(renewed) => {
                let kept: HashSet<RunId> = renewed.iter().map(|l| l.run_id).collect();
                let mut inputs = Vec::new();
                for l in held {
                    if !kept.contains(&l.run_id) {
                        tracing::warn!(run_id = %l.run_id, "lease lost; another driver owns the run");
                        self.leases.remove(&l.run_id);
                        for w in self.waiters.remove(&l.run_id).unwrap_or_default() {
                            let _ = w.send(false);
                        }
                        inputs.push(Input::RunReleased { run_id: l.run_id });
                    }
                }
                for l in renewed {
                    self.leases.insert(l.run_id, l);
                }
                inputs
            }
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "cannot renew leases");
                Vec::new()
            }
        }
    }

    /// The fallback for lost reports: asks the executor about every running execution.
    fn poll_statuses(&self) {
        let mut handles = self.orch.active_executions();
        handles.retain(|h| !self.submitting.contains(&h.execution_id));
        if handles.is_empty() {
            return;
        }
        let executor = Arc::clone(&self.executor);
        let fx = self.fx_tx.clone();
        tokio::spawn(async move {
            for handle in handles {
                if let Some(input) = check(&*executor, &handle).await
                    && fx.send(Fx::Input(input)).is_err()
                {
                    return;
                }
            }
        });
    }

    async fn tick(&mut self, inputs: &mut Vec<Input>) {
        if inputs.is_empty() {
            return;
        }
        let now = self.clock.now();
        // The tick's buffers are kept from one tick to the next (emptied): a burst of inputs
        // would otherwise allocate and free large blocks on every tick. They may hold the
        // deferred writes of earlier ticks, which go first.
        let mut tick = std::mem::take(&mut self.tick_writes);
        if self.deferred_until.is_some() {
            self.drop_unowned(&mut tick);
        }
        let mut effects = std::mem::take(&mut self.tick_effects);
        let only_started = inputs
            .iter()
            .all(|i| matches!(i, Input::ExecutionStarted { .. }));
        for input in inputs.drain(..) {
            for cmd in self.orch.handle(now, input) {
                match cmd {
                    Command::Persist { run_id, batch } => tick.push(run_id, batch.writes),
                    other => effects.push(other),
                }
            }
        }
        if only_started && effects.is_empty() && !self.config.started_write_delay.is_zero() {
            // Nothing waits for these writes: let them ride with the next commit.
            if !tick.writes.is_empty() && self.deferred_until.is_none() {
                self.deferred_until = Some(Instant::now() + self.config.started_write_delay);
            }
            self.tick_writes = tick;
            self.tick_effects = effects;
            return;
        }
        self.deferred_until = None;
        let failed = self.commit(&mut tick).await;
        for cmd in effects.drain(..) {
            self.effect(cmd, &failed).await;
        }
        self.tick_writes = tick;
        self.tick_effects = effects;
    }

    /// Commits the deferred writes of earlier ticks, if any.
    async fn flush_deferred(&mut self) {
        if self.deferred_until.take().is_none() {
            return;
        }
        let mut tick = std::mem::take(&mut self.tick_writes);
        self.drop_unowned(&mut tick);
        // Only `ExecutionStarted` ticks without side effects are deferred: there is nothing
        // to carry out, whatever failed.
        let _failed = self.commit(&mut tick).await;
        self.tick_writes = tick;
    }

    /// Drops the deferred writes of runs whose lease was lost since they were made: they must
    /// not be committed unfenced (the orchestrator forgets those runs).
    fn drop_unowned(&self, tick: &mut TickWrites) {
        if tick.runs.iter().all(|(r, _)| self.leases.contains_key(r)) {
            return;
        }
        let writes = std::mem::take(&mut tick.writes);
        let runs = std::mem::take(&mut tick.runs);
        let mut rest = writes.into_iter();
        for (run, len) in runs {
            let slice: Vec<Write> = rest.by_ref().take(len).collect();
            if self.leases.contains_key(&run) {
                tick.push(run, slice);
            } else {
                tracing::debug!(run_id = %run, "lease lost; dropping the deferred writes");
            }
        }
    }

    /// Commits the tick's writes as one batch, fenced; on a non-transient failure, run by
    /// run. Returns the runs whose writes were not committed. The writes are moved, never
    /// copied; `tick` is left empty.
    async fn commit(&mut self, tick: &mut TickWrites) -> HashSet<RunId> {
        let mut failed = HashSet::new();
        if tick.writes.is_empty() {
            tick.runs.clear();
            return failed;
        }
        let runs = std::mem::take(&mut tick.runs);
        let mut merged = Batch {
            fences: Vec::with_capacity(runs.len()),
            writes: std::mem::take(&mut tick.writes),
        };
        let mut fenced = HashSet::with_capacity(runs.len());
        for (run, _) in &runs {
            if fenced.insert(*run)
                && let Some(lease) = self.leases.get(run)
            {
                merged.fences.push(lease.fence());
            }
        }
        let done = match self.commit_retrying(&merged).await {
            Ok(()) => {
                self.publish(&merged);
                true
            }
            Err(e) if fenced.len() == 1 => {
                let run = runs[0].0;
                self.commit_failed(run, &e);
                failed.insert(run);
                true
            }
            Err(_) => false,
        };
        if done {
            // Keep the buffers for the next tick.
            merged.writes.clear();
            tick.writes = merged.writes;
            let mut runs = runs;
            runs.clear();
            tick.runs = runs;
            return failed;
        }
        // Split the merged writes back into one batch per run (a run's writes may come in
        // several slices, in order).
        let mut per_run: Vec<(RunId, Batch)> = Vec::new();
        let mut rest = merged.writes.into_iter();
        for (run, len) in runs {
            let slice = rest.by_ref().take(len);
            match per_run.iter_mut().find(|(r, _)| *r == run) {
                Some((_, b)) => b.writes.extend(slice),
                None => per_run.push((
                    run,
                    Batch {
                        fences: Vec::new(),
                        writes: slice.collect(),
                    },
                )),
            }
        }
        for (run, mut batch) in per_run {
            if failed.contains(&run) {
                continue;
            }
            batch.fences = self
                .leases
                .get(&run)
                .map(|l| vec![l.fence()])
                .unwrap_or_default();
            match self.commit_retrying(&batch).await {
                Ok(()) => self.publish(&batch),
                Err(e) => {
                    self.commit_failed(run, &e);
                    failed.insert(run);
                }
            }
        }
        failed
    }

    async fn commit_retrying(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut delay = self.config.retry_backoff;
        loop {
            match self.store.commit(batch).await {
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %error_chain(&e), ?delay, "store unavailable; retrying the commit");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.retry_backoff * 32);
                }
                other => return other,
            }
        }
    }

    fn commit_failed(&mut self, run_id: RunId, e: &StoreError) {
        self.orch
            .handle(self.clock.now(), Input::RunReleased { run_id });
        match e {
            StoreError::Fenced { .. }
            | StoreError::LeaseLost { .. }
            | StoreError::NotFound { .. } => {
                tracing::warn!(run_id = %run_id, error = %error_chain(e), "run taken over; dropping it");
                self.leases.remove(&run_id);
                for w in self.waiters.remove(&run_id).unwrap_or_default() {
                    let _ = w.send(false);
                }
            }
            _ => {
                tracing::warn!(run_id = %run_id, error = %error_chain(e), "commit failed; reloading the run");
                self.reload.push(run_id);
            }
        }
    }

    fn publish(&self, batch: &Batch) {
        if self.events.receiver_count() == 0 {
            return;
        }
        for w in &batch.writes {
            if let Write::AppendEvent(e) = w {
                let _ = self.events.send(e.clone());
            }
        }
    }

    async fn effect(&mut self, cmd: Command, failed: &HashSet<RunId>) {
        match cmd {
            Command::Persist { .. } => {}
            Command::Submit(spec) => {
                if failed.contains(&spec.run_id) {
                    return;
                }
                self.submitting.insert(spec.execution_id);
                let executor = Arc::clone(&self.executor);
                let fx = self.fx_tx.clone();
                let backoff = self.config.retry_backoff;
                let span = tracing::info_span!("submit", run_id = %spec.run_id, stage = %spec.stage, step = %spec.step_name, execution_id = %spec.execution_id, attempt = spec.attempt);
                tokio::spawn(
                    async move {
                        let execution_id = spec.execution_id;
                        let mut delay = backoff;
                        let mut tries = 0;
                        let input = loop {
                            tries += 1;
                            match executor.submit_shared(Arc::clone(&spec)).await {
                                Ok(handle) => {
                                    break Input::ExecutionStarted {
                                        execution_id,
                                        external_id: Some(handle.external_id),
                                    };
                                }
                                Err(ExecutorError::Unavailable { .. }) if tries < 4 => {
                                    tokio::time::sleep(delay).await;
                                    delay *= 2;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %error_chain(&e), "submit failed");
                                    break Input::ExecutionLost {
                                        execution_id,
                                        reason: format!("submit failed: {}", error_chain(&e)),
                                    };
                                }
                            }
                        };
                        let _ = fx.send(Fx::Submitted(execution_id, input));
                    }
                    .instrument(span),
                );
            }
            Command::Cancel { run_id, handle } => {
                if failed.contains(&run_id) || self.submitting.contains(&handle.execution_id) {
                    return;
                }
                let executor = Arc::clone(&self.executor);
                let fx = self.fx_tx.clone();
                tokio::spawn(async move {
                    if let Err(e) = executor.cancel(&handle).await
                        && !matches!(e, ExecutorError::NotFound { .. })
                    {
                        tracing::warn!(run_id = %run_id, execution_id = %handle.execution_id, error = %error_chain(&e), "cancel failed");
                    }
                    // Confirm: the execution is recorded ended once the executor says so.
                    if let Some(input) = check(&*executor, &handle).await {
                        let _ = fx.send(Fx::Input(input));
                    }
                });
            }
            Command::Check { run_id, handle } => {
                if failed.contains(&run_id) || self.submitting.contains(&handle.execution_id) {
                    return;
                }
                let executor = Arc::clone(&self.executor);
                let fx = self.fx_tx.clone();
                tokio::spawn(async move {
                    if let Some(input) = check(&*executor, &handle).await {
                        let _ = fx.send(Fx::Input(input));
                    }
                });
            }
            Command::RunEnded { run_id, status } => {
                tracing::info!(run_id = %run_id, %status, "run ended");
                if let Some(lease) = self.leases.remove(&run_id) {
                    let store = Arc::clone(&self.store);
                    tokio::spawn(async move {
                        if let Err(e) = store.release_lease(&lease).await {
                            tracing::debug!(run_id = %run_id, error = %error_chain(&e), "release failed");
                        }
                    });
                }
                for w in self.waiters.remove(&run_id).unwrap_or_default() {
                    let _ = w.send(true);
                }
            }
        }
    }

    async fn stop(&mut self) {
        for (_, lease) in self.leases.drain() {
            if let Err(e) = self.store.release_lease(&lease).await {
                tracing::debug!(run_id = %lease.run_id, error = %error_chain(&e), "release failed");
            }
        }
    }
}

/// Takes the executor reports that are ready without waiting, so that a burst of reports is
/// handled in one tick (one store commit) rather than one tick each.
fn drain_reports(reports: &mut Option<ReportStream>, inputs: &mut Vec<Input>, max: usize) {
    while inputs.len() < max {
        let Some(stream) = reports.as_mut() else {
            return;
        };
        match stream.next().now_or_never() {
            Some(Some(report)) => inputs.extend(report_input(report)),
            // Ended: `next_report` waits forever from now on.
            Some(None) => *reports = None,
            None => return,
        }
    }
}

/// The next wake-up; pending forever once the stream ended (or without one).
async fn next_wakeup(wakeups: &mut Option<WakeupStream>) {
    if let Some(stream) = wakeups {
        if stream.next().await.is_some() {
            return;
        }
        *wakeups = None;
    }
    std::future::pending().await
}

async fn next_report(reports: &mut Option<ReportStream>) -> Option<ExecutionReport> {
    match reports {
        Some(stream) => match stream.next().await {
            Some(r) => Some(r),
            None => {
                *reports = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// One status check, as an input (`None` when the executor cannot say now).
async fn check(executor: &dyn Executor, handle: &ExecHandle) -> Option<Input> {
    let execution_id = handle.execution_id;
    match executor.status(handle).await {
        Ok(ExecutionState::Running | ExecutionState::Pending) => Some(Input::ExecutionStarted {
            execution_id,
            external_id: Some(handle.external_id.clone()).filter(|s| !s.is_empty()),
        }),
        Ok(state) => report_input(ExecutionReport {
            execution_id,
            state,
        }),
        Err(ExecutorError::NotFound { .. }) => Some(Input::ExecutionLost {
            execution_id,
            reason: "the executor does not know the execution".to_owned(),
        }),
        Err(e) => {
            tracing::warn!(execution_id = %execution_id, error = %error_chain(&e), "status check failed");
            None
        }
    }
}
