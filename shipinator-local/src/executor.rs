//! [`LocalExecutor`]: runs executions as local processes through the worker runtime.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use shipinator_core::artifact::ArtifactStore;
use shipinator_core::domain::ExecutionId;
use shipinator_core::executor::{
    ExecHandle, ExecutionReport, ExecutionSpec, ExecutionState, Executor, ExecutorError,
    LogLineStream, ReportStream,
};
use shipinator_core::logs::{LogError, LogStore};
use tokio::sync::{mpsc, watch};

use crate::data_dir::DataDir;
use crate::error::{Error, error_chain};
use crate::process::{ProcessIdentity, terminate_group};
use crate::worker::{
    BaseEnv, CancelHandle, WorkerContext, WorkerOutcome, cancel_pair, run_execution,
};

/// Why an execution of an earlier engine process is reported lost although its process still
/// ran. Its output pipe ended with the old engine, so its log and outputs cannot be trusted:
/// the process group is stopped and the engine retries the step.
pub const LOST_ON_RESTART: &str = "engine restarted while the step was running";

/// Runs each execution in-process through [`run_execution`]: the step's command is the only
/// child process, leading its own process group.
///
/// - `submit` is idempotent per execution id.
/// - While the command runs, `<data>/executions/<id>.pid` holds its pid and start time; when the
///   execution ends that file is overwritten with its terminal state and renamed to
///   `<data>/executions/<id>.json` (unless a state is recorded there already).
/// - After an engine restart, `status` answers from those files: a recorded state as recorded;
///   a pidfile whose process still runs (same pid *and* start time) gets its group stopped and
///   is reported `Lost` (see [`LOST_ON_RESTART`]); a pidfile whose pid is gone or was recycled
///   is reported `Lost` without signalling anyone.
/// - `cancel` sends TERM to the whole group, then KILL after the grace period; so do timeouts.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ctx: WorkerContext,
    executions: PathBuf,
    entries: Mutex<HashMap<ExecutionId, Entry>>,
    reports_tx: mpsc::UnboundedSender<ExecutionReport>,
    reports_rx: Mutex<Option<mpsc::UnboundedReceiver<ExecutionReport>>>,
    /// Whether someone took the report stream; until then reports are not queued.
    reports_taken: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Entry {
    handle: ExecHandle,
    state: watch::Receiver<ExecutionState>,
    cancel: CancelHandle,
}

/// Builds a [`LocalExecutor`].
#[derive(Debug)]
pub struct LocalExecutorBuilder {
    data_dir: DataDir,
    artifacts: Option<Arc<dyn ArtifactStore>>,
    logs: Option<Arc<dyn LogStore>>,
    grace: Duration,
    base_env: Option<BaseEnv>,
}

impl LocalExecutorBuilder {
    /// Where artifacts go and come from (required).
    pub fn artifact_store(mut self, store: Arc<dyn ArtifactStore>) -> Self {
        self.artifacts = Some(store);
        self
    }

    /// Where logs go (required).
    pub fn log_store(mut self, store: Arc<dyn LogStore>) -> Self {
        self.logs = Some(store);
        self
    }

    /// Time between TERM and KILL when a process group is stopped (default 10 s).
    pub fn grace_period(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The environment commands start from (default: this process's `PATH` and `HOME`).
    pub fn base_env(mut self, env: BaseEnv) -> Self {
        self.base_env = Some(env);
        self
    }

    /// Creates the data directory's subdirectories and builds the executor.
    ///
    /// # Errors
    /// A store is missing, or the data directory cannot be created.
    pub fn build(self) -> Result<LocalExecutor, Error> {
        let artifacts = self.artifacts.ok_or(Error::Builder {
            what: "an artifact store",
        })?;
        let logs = self.logs.ok_or(Error::Builder {
            what: "a log store",
        })?;
        self.data_dir
            .create_all()
            .map_err(|e| Error::io_at("creating data directory", self.data_dir.root(), e))?;
        let executions = self.data_dir.executions();
        let mut ctx = WorkerContext::new(self.data_dir, artifacts, logs);
        ctx.grace = self.grace;
        if let Some(env) = self.base_env {
            ctx.base_env = env;
        }
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        Ok(LocalExecutor {
            inner: Arc::new(Inner {
                ctx,
                executions,
                entries: Mutex::new(HashMap::new()),
                reports_tx,
                reports_rx: Mutex::new(Some(reports_rx)),
                reports_taken: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }
}

impl LocalExecutor {
    /// A builder over the data directory at `data_dir`.
    pub fn builder(data_dir: impl Into<PathBuf>) -> LocalExecutorBuilder {
        LocalExecutorBuilder {
            data_dir: DataDir::new(data_dir),
            artifacts: None,
            logs: None,
            grace: Duration::from_secs(10),
            base_env: None,
        }
    }

    /// The worker context executions run with.
    pub fn context(&self) -> &WorkerContext {
        &self.inner.ctx
    }

    /// The pidfile of an execution while its command runs.
    pub fn pidfile_path(&self, id: ExecutionId) -> PathBuf {
        self.inner.executions.join(format!("{id}.pid"))
    }

    /// The recorded terminal state of an execution.
    pub fn result_path(&self, id: ExecutionId) -> PathBuf {
        self.inner.executions.join(format!("{id}.json"))
    }

    fn handle_for(id: ExecutionId) -> ExecHandle {
        ExecHandle {
            execution_id: id,
            external_id: format!("local:{id}"),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<ExecutionId, Entry>> {
        self.inner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn recorded(&self, id: ExecutionId) -> Result<Option<ExecutionState>, ExecutorError> {
        let path = self.result_path(id);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::Spec {
                    reason: format!("{} is not a recorded state: {e}", path.display()),
                }
                .into()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io_at("reading", &path, e).into()),
        }
    }

    /// Settles an execution this executor object did not start (an earlier engine process):
    /// its recorded state, or `Lost` after stopping a still-running group. `terminal` is the
    /// state to record when a live process had to be stopped.
    async fn settle_foreign(
        &self,
        id: ExecutionId,
        terminal: ExecutionState,
    ) -> Result<ExecutionState, ExecutorError> {
        if let Some(state) = self.recorded(id)? {
            return Ok(state);
        }
        let pidfile = self.pidfile_path(id);
        let read_identity = || {
            ProcessIdentity::read_pidfile(&pidfile)
                .map_err(|e| Error::io_at("reading", &pidfile, e))
        };
        let claim = match read_identity()? {
            Some(identity) if identity.is_live_group_leader() => terminal,
            Some(_) => ExecutionState::Lost {
                reason: "the step's process ended while the engine was down".to_owned(),
            },
            None => ExecutionState::Lost {
                reason: "the local executor has no record of this execution".to_owned(),
            },
        };
        // Claim the verdict before acting on it: whoever records first decides.
        let state = record(&self.inner.executions, id, claim.clone());
        if state != claim {
            return Ok(state);
        }
        // Re-read: a step that started meanwhile wrote its pidfile before checking for a
        // verdict, so one of the two of us sees the other. Only the exact process (same pid and
        // start time) leading its own group is ever signalled.
        if let Some(identity) = read_identity()?
            && identity.is_live_group_leader()
        {
            tracing::warn!(execution = %id, pid = identity.pid, "stopping a step left running by an earlier engine");
            terminate_group(identity.pid, self.inner.ctx.grace)
                .await
                .map_err(|e| Error::io("stopping an orphaned step", e))?;
        }
        // Readers following the log of a dead execution must not wait forever.
        let _ = self.inner.ctx.logs.close(id).await;
        let _ = std::fs::remove_file(&pidfile);
        Ok(state)
    }
}

/// Records an execution's terminal state unless one is recorded already (the first answer
/// wins, so an old executor object finishing late cannot overwrite what a new one decided);
/// returns the recorded state.
fn record(executions: &Path, id: ExecutionId, state: ExecutionState) -> ExecutionState {
    let tmp = executions.join(format!("{id}.json.{}.tmp", std::process::id()));
    let written = serde_json::to_vec(&state)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes));
    settle_record(executions, id, state, &tmp, written)
}

/// Records the terminal state of an execution whose pidfile this executor wrote, reusing the
/// pidfile: its text is replaced by the state, then it is renamed to the result record. One
/// file per execution instead of a pidfile plus a temporary file for the record. Until the
/// rename, a reader of the pidfile finds no process identity in it, which is what it would
/// find after the rename too (the process has ended).
fn record_over_pidfile(
    executions: &Path,
    id: ExecutionId,
    state: ExecutionState,
    pidfile: &Path,
) -> ExecutionState {
    let written = serde_json::to_vec(&state)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(pidfile, bytes));
    settle_record(executions, id, state, pidfile, written)
}

/// Moves `from` (holding `state`, if `written` is fine) to the result record unless a record
/// exists already, then removes `from` whatever happened; returns the recorded state.
fn settle_record(
    executions: &Path,
    id: ExecutionId,
    state: ExecutionState,
    from: &Path,
    written: std::io::Result<()>,
) -> ExecutionState {
    let path = executions.join(format!("{id}.json"));
    let moved = written.and_then(|()| move_unless_exists(from, &path));
    if moved.is_err() {
        let _ = std::fs::remove_file(from);
    }
    match moved {
        Ok(()) => state,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(recorded) => recorded,
                None => state,
            }
        }
        Err(e) => {
            tracing::warn!(execution = %id, error = %e, "recording an execution's state failed");
            state
        }
    }
}

/// Renames `from` to `to` only if `to` does not exist (`AlreadyExists` otherwise), atomically:
/// `renameat2(RENAME_NOREPLACE)`, or a hard link and an unlink where the file system lacks it.
fn move_unless_exists(from: &Path, to: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::NOTSUP) => {
            std::fs::hard_link(from, to)?;
            let _ = std::fs::remove_file(from);
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[async_trait::async_trait]
impl Executor for LocalExecutor {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn submit(&self, spec: &ExecutionSpec) -> Result<ExecHandle, ExecutorError> {
        let id = spec.execution_id;
        let handle = Self::handle_for(id);
        if spec.command.is_empty() {
            return Err(ExecutorError::Rejected {
                id,
                reason: "the step has an empty command".to_owned(),
            });
        }
        // An execution of an earlier engine process is not started again.
        if self.pidfile_path(id).exists() || self.result_path(id).exists() {
            return Ok(handle);
        }
        let (state_tx, state_rx) = watch::channel(ExecutionState::Pending);
        let (cancel, signal) = cancel_pair();
        let own_cancel = cancel.clone();
        {
            let mut entries = self.entries();
            if let Some(existing) = entries.get(&id) {
                return Ok(existing.handle.clone());
            }
            entries.insert(
                id,
                Entry {
                    handle: handle.clone(),
                    state: state_rx,
                    cancel: cancel.clone(),
                },
            );
        }
        let inner = Arc::clone(&self.inner);
        let spec = spec.clone();
        tokio::spawn(async move {
            let own_cancel = own_cancel;
            state_tx.send_replace(ExecutionState::Running);
            let pidfile = inner.executions.join(format!("{id}.pid"));
            let result_file = inner.executions.join(format!("{id}.json"));
            let mut pidfile_written = false;
            let mut on_spawn = |identity: ProcessIdentity| {
                // Written in place rather than through a temporary file: a reader that finds it
                // empty or half-written finds no identity, as it would before it existed, and
                // this step checks for a verdict only after writing it.
                match std::fs::write(&pidfile, identity.to_pidfile()) {
                    Ok(()) => pidfile_written = true,
                    Err(e) => {
                        tracing::warn!(execution = %id, error = %e, "writing the pidfile failed");
                    }
                }
                // Another executor object over this data directory already settled it.
                if result_file.exists() {
                    own_cancel.cancel();
                }
            };
            let outcome = run_execution(&spec, &inner.ctx, signal, &mut on_spawn).await;
            let state = match outcome {
                WorkerOutcome::Finished(result) => ExecutionState::Finished(result),
                WorkerOutcome::Canceled => ExecutionState::Canceled,
            };
            let state = if pidfile_written {
                record_over_pidfile(&inner.executions, id, state, &pidfile)
            } else {
                record(&inner.executions, id, state)
            };
            state_tx.send_replace(state.clone());
            if inner
                .reports_taken
                .load(std::sync::atomic::Ordering::Acquire)
            {
                let _ = inner.reports_tx.send(ExecutionReport {
                    execution_id: id,
                    state,
                });
            }
        });
        Ok(handle)
    }

    async fn status(&self, handle: &ExecHandle) -> Result<ExecutionState, ExecutorError> {
        let id = handle.execution_id;
        if let Some(entry) = self.entries().get(&id) {
            return Ok(entry.state.borrow().clone());
        }
        let state = self
            .settle_foreign(
                id,
                ExecutionState::Lost {
                    reason: LOST_ON_RESTART.to_owned(),
                },
            )
            .await?;
        Ok(state)
    }

    async fn cancel(&self, handle: &ExecHandle) -> Result<(), ExecutorError> {
        let id = handle.execution_id;
        let running = self
            .entries()
            .get(&id)
            .map(|e| (e.cancel.clone(), e.state.clone()));
        match running {
            Some((cancel, mut state)) => {
                if state.borrow().is_terminal() {
                    return Ok(());
                }
                cancel.cancel();
                // Returns once the group is gone: at most the grace period plus a moment.
                let _ = state.wait_for(ExecutionState::is_terminal).await;
                Ok(())
            }
            None => {
                self.settle_foreign(id, ExecutionState::Canceled).await?;
                Ok(())
            }
        }
    }

    async fn logs(
        &self,
        handle: &ExecHandle,
        from_seq: u64,
    ) -> Result<LogLineStream, ExecutorError> {
        let id = handle.execution_id;
        let follow = self
            .inner
            .ctx
            .logs
            .follow(id, from_seq)
            .await
            .map_err(|e| log_error(id, e))?;
        Ok(Box::pin(
            follow.map(move |r| r.map_err(|e| log_error(id, e))),
        ))
    }

    fn reports(&self) -> Option<ReportStream> {
        let rx = self
            .inner
            .reports_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        self.inner
            .reports_taken
            .store(true, std::sync::atomic::Ordering::Release);
        Some(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|r| (r, rx))
        })))
    }
}

fn log_error(id: ExecutionId, e: LogError) -> ExecutorError {
    match e {
        LogError::NotFound { .. } => ExecutorError::NotFound { id },
        LogError::Unavailable { source } => ExecutorError::Unavailable { source },
        other => ExecutorError::Backend {
            backend: "local",
            source: format!("log store: {}", error_chain(&other)).into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(code: i32) -> ExecutionState {
        ExecutionState::Finished(shipinator_core::executor::ExecutionResult {
            exit_code: code,
            logs_uri: None,
            artifacts: Vec::new(),
            failure: None,
        })
    }

    fn read(path: &Path) -> ExecutionState {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn the_pidfile_becomes_the_record() {
        let tmp = tempfile::tempdir().unwrap();
        let id = ExecutionId::new_v7();
        let pidfile = tmp.path().join(format!("{id}.pid"));
        std::fs::write(&pidfile, "1 2\n").unwrap();
        let state = record_over_pidfile(tmp.path(), id, finished(0), &pidfile);
        assert_eq!(state, finished(0));
        assert!(!pidfile.exists());
        assert_eq!(read(&tmp.path().join(format!("{id}.json"))), finished(0));
        // Nothing else is left behind.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_earlier_record_wins_and_the_pidfile_goes() {
        let tmp = tempfile::tempdir().unwrap();
        let id = ExecutionId::new_v7();
        let lost = ExecutionState::Lost {
            reason: LOST_ON_RESTART.to_owned(),
        };
        assert_eq!(record(tmp.path(), id, lost.clone()), lost);
        let pidfile = tmp.path().join(format!("{id}.pid"));
        std::fs::write(&pidfile, "1 2\n").unwrap();
        assert_eq!(
            record_over_pidfile(tmp.path(), id, finished(0), &pidfile),
            lost
        );
        assert!(!pidfile.exists());
        assert_eq!(read(&tmp.path().join(format!("{id}.json"))), lost);
        assert_eq!(record(tmp.path(), id, finished(1)), lost);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }
}
