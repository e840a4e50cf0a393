//! The `worker_process` executor: each execution is a `shipinator worker` subprocess with
//! exactly a Kubernetes pod's environment (spec, server URL, execution token, workspace), so it
//! reports over HTTP like a pod does. A poor man's remote executor, and the way the server's
//! worker endpoints are tested end to end.
//!
//! The step's result reaches the server through the worker's status callback. The worker also
//! writes that report to `<data>/worker-executions/<id>.json` before it exits, and `status`
//! answers from it, so the fallback poll and the callback say the same thing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use shipinator_core::domain::ExecutionId;
use shipinator_core::executor::{
    ExecHandle, ExecutionResult, ExecutionSpec, ExecutionState, Executor, ExecutorError,
    LogLineStream,
};
use shipinator_core::logs::LogStore;
use shipinator_local::DataDir;

use crate::worker::client::{ReportStatus, StatusReport};
use crate::worker::{RESULT_FILE_ENV, SPEC_ENV, TOKEN_ENV};

/// Issues an execution's bearer token.
pub(crate) type TokenFn = Arc<dyn Fn(ExecutionId) -> String + Send + Sync>;

/// What is known about one subprocess.
#[derive(Debug, Clone)]
enum Proc {
    /// Running, with this pid.
    Running(u32),
    /// Exited with this code (`None`: killed by a signal).
    Exited(Option<i32>),
    /// Could not be started.
    Failed(String),
}

/// Runs executions as `shipinator worker` subprocesses.
pub(crate) struct WorkerProcessExecutor {
    program: PathBuf,
    server_url: String,
    token: TokenFn,
    data: DataDir,
    logs: Arc<dyn LogStore>,
    procs: Arc<Mutex<HashMap<ExecutionId, Proc>>>,
    canceled: Arc<Mutex<std::collections::HashSet<ExecutionId>>>,
}

impl std::fmt::Debug for WorkerProcessExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerProcessExecutor")
            .field("program", &self.program)
            .field("server_url", &self.server_url)
            .field("data", &self.data)
            .finish_non_exhaustive()
    }
}

impl WorkerProcessExecutor {
    /// Workers of this binary that call `server_url` back; workspaces and results under
    /// `data`, logs read back from `logs` (where the server stores what workers send).
    ///
    /// # Errors
    /// The path of the running binary is unknown.
    pub(crate) fn new(
        data: DataDir,
        server_url: String,
        token: TokenFn,
        logs: Arc<dyn LogStore>,
    ) -> anyhow::Result<Self> {
        let program = std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("the path of the shipinator binary is unknown: {e}"))?;
        Ok(Self {
            program,
            server_url,
            token,
            data,
            logs,
            procs: Arc::default(),
            canceled: Arc::default(),
        })
    }

    fn results(&self) -> PathBuf {
        self.data.root().join("worker-executions")
    }

    fn result_file(&self, id: ExecutionId) -> PathBuf {
        self.results().join(format!("{id}.json"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ExecutionId, Proc>> {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn spawn(&self, spec: &ExecutionSpec) -> Result<u32, String> {
        let spec_json = serde_json::to_string(spec).map_err(|e| format!("spec: {e}"))?;
        let workspace = shipinator_local::worker::workspace_dir(&self.data, &spec.workspace.key)
            .map_err(|e| shipinator_local::error_chain(&e))?;
        let results = self.results();
        std::fs::create_dir_all(&results)
            .map_err(|e| format!("creating {}: {e}", results.display()))?;
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.arg("worker")
            .arg("--execution")
            .arg(spec.execution_id.to_string())
            .env_clear()
            .envs(shipinator_local::worker::BaseEnv::from_process().vars())
            .env(SPEC_ENV, spec_json)
            .env("SHIPINATOR_SERVER", &self.server_url)
            .env(TOKEN_ENV, (self.token)(spec.execution_id))
            .env("SHIPINATOR_WORKSPACE", &workspace)
            .env(
                "SHIPINATOR_WORKER_DATA_DIR",
                self.data.root().join("worker"),
            )
            .env(RESULT_FILE_ENV, self.result_file(spec.execution_id))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        if let Some(log) = std::env::var_os("SHIPINATOR_LOG") {
            cmd.env("SHIPINATOR_LOG", log);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.program.display()))?;
        let pid = child.id().unwrap_or(0);
        let procs = Arc::clone(&self.procs);
        let id = spec.execution_id;
        tokio::spawn(async move {
            let code = match child.wait().await {
                Ok(status) => status.code(),
                Err(e) => {
                    tracing::warn!(execution = %id, error = %e, "waiting for the worker failed");
                    None
                }
            };
            procs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(id, Proc::Exited(code));
        });
        Ok(pid)
    }

    /// The recorded report of a worker that has exited.
    fn recorded(&self, id: ExecutionId) -> Option<ExecutionState> {
        let text = std::fs::read_to_string(self.result_file(id)).ok()?;
        match serde_json::from_str::<StatusReport>(&text) {
            Ok(report) => state_of(report),
            Err(e) => Some(ExecutionState::Lost {
                reason: format!("the worker's recorded result is unreadable: {e}"),
            }),
        }
    }
}

/// The execution state a terminal report stands for (`None` for `running`), as the server
/// reads the same report.
pub(crate) fn state_of(report: StatusReport) -> Option<ExecutionState> {
    match report.status {
        ReportStatus::Running => None,
        ReportStatus::Success | ReportStatus::Failed => {
            let exit_code = report.exit_code.unwrap_or(match report.status {
                ReportStatus::Success => 0,
                _ => -1,
            });
            Some(ExecutionState::Finished(ExecutionResult {
                exit_code,
                logs_uri: report.logs_uri,
                artifacts: report.artifacts,
                failure: report.failure,
            }))
        }
        ReportStatus::Lost => Some(ExecutionState::Lost {
            reason: report.failure.unwrap_or_else(|| "lost".to_owned()),
        }),
    }
}

#[async_trait::async_trait]
impl Executor for WorkerProcessExecutor {
    fn kind(&self) -> &'static str {
        "worker_process"
    }

    async fn submit(&self, spec: &ExecutionSpec) -> Result<ExecHandle, ExecutorError> {
        let id = spec.execution_id;
        let handle = |pid: u32| ExecHandle {
            execution_id: id,
            external_id: format!("pid:{pid}"),
        };
        if let Some(p) = self.lock().get(&id) {
            return Ok(handle(match p {
                Proc::Running(pid) => *pid,
                Proc::Exited(_) | Proc::Failed(_) => 0,
            }));
        }
        if self.recorded(id).is_some() {
            // Ran in an earlier life of the server: adopt the recorded result.
            return Ok(handle(0));
        }
        let proc = match self.spawn(spec) {
            Ok(pid) => Proc::Running(pid),
            Err(e) => Proc::Failed(e),
        };
        let mut procs = self.lock();
        // The wait task may already have recorded the exit.
        let entry = procs.entry(id).or_insert(proc);
        Ok(handle(match entry {
            Proc::Running(pid) => *pid,
            Proc::Exited(_) | Proc::Failed(_) => 0,
        }))
    }

    async fn status(&self, handle: &ExecHandle) -> Result<ExecutionState, ExecutorError> {
        let id = handle.execution_id;
        let proc = self.lock().get(&id).cloned();
        let canceled = self
            .canceled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&id);
        Ok(match proc {
            Some(Proc::Running(_)) => ExecutionState::Running,
            Some(Proc::Failed(reason)) => ExecutionState::Lost {
                reason: format!("the worker could not be started: {reason}"),
            },
            Some(Proc::Exited(_)) if canceled => ExecutionState::Canceled,
            Some(Proc::Exited(Some(0))) | None => match self.recorded(id) {
                Some(state) => state,
                None if proc.is_none() => ExecutionState::Lost {
                    reason: "the worker is unknown to this server process (it restarted)"
                        .to_owned(),
                },
                None => ExecutionState::Lost {
                    reason: "the worker exited without recording its result".to_owned(),
                },
            },
            Some(Proc::Exited(code)) => ExecutionState::Lost {
                reason: match code {
                    Some(c) => {
                        format!("the worker exited with code {c} without reporting the result")
                    }
                    None => "the worker was killed by a signal".to_owned(),
                },
            },
        })
    }

    async fn cancel(&self, handle: &ExecHandle) -> Result<(), ExecutorError> {
        let id = handle.execution_id;
        self.canceled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
        if let Some(Proc::Running(pid)) = self.lock().get(&id).cloned()
            && let Some(pid) = rustix::process::Pid::from_raw(pid.try_into().unwrap_or(0))
        {
            // The worker stops the step's process group on TERM.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        Ok(())
    }

    async fn logs(
        &self,
        handle: &ExecHandle,
        from_seq: u64,
    ) -> Result<LogLineStream, ExecutorError> {
        let follow = self
            .logs
            .follow(handle.execution_id, from_seq)
            .await
            .map_err(|e| ExecutorError::Backend {
                backend: "worker_process",
                source: Box::new(e),
            })?;
        Ok(Box::pin(follow.map(|r| {
            r.map_err(|e| ExecutorError::Backend {
                backend: "worker_process",
                source: Box::new(e),
            })
        })))
    }
}

/// Writes `report` to `path`: atomically (a temporary file renamed into place) where the
/// directory allows it, else in place (a pod's `/dev/termination-log` is a mounted file in a
/// directory the worker cannot write).
///
/// # Errors
/// The file cannot be written.
pub(crate) fn write_result(path: &Path, report: &StatusReport) -> anyhow::Result<()> {
    let json = serde_json::to_vec(report)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let atomic = std::fs::write(&tmp, &json).and_then(|()| std::fs::rename(&tmp, path));
    if atomic.is_err() {
        let _ = std::fs::remove_file(&tmp);
        std::fs::write(path, &json)?;
    }
    Ok(())
}
