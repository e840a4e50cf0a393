//! The worker runtime: everything that happens for one execution, wherever it runs. The local
//! executor calls [`run_execution`] in-process; containers and Kubernetes pods will run the
//! same function as `shipinator worker`.
//!
//! 1. [`prepare_workspace`]: once per run and stage, clone the commit from a per-repository
//!    mirror (or copy a working tree), then place the inputs of earlier stages.
//! 2. [`StepRunner`]: `sh -c` the step's command in its own process group with the step's
//!    environment and timeout, streaming its output into the [`LogStore`].
//! 3. [`collect_outputs`]: store the declared outputs through the [`ArtifactStore`].
//! 4. Report an [`ExecutionResult`] ([`StatusCallback`] is its DMD §4.3 wire shape).
//!
//! Engine helpers (git) run with a fixed, clean environment; the step's `env` applies to the
//! user command only.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shipinator_core::artifact::ArtifactStore;
use shipinator_core::executor::{ExecutionResult, ExecutionSpec, ProducedArtifact};
use shipinator_core::logs::{LogStore, logs_uri};

use crate::data_dir::DataDir;
use crate::error::{Error, error_chain, safe_join};
use crate::process::ProcessIdentity;

mod git;
mod log;
mod outputs;
mod step;
mod workspace;

pub use git::ALLOWED_PROTOCOLS;
pub use log::LogSink;
pub use outputs::{
    Collect, TestCounts, collect_outputs, oci_manifest_digest, output_artifact_id, parse_junit,
};
pub use step::{BaseEnv, CancelHandle, CancelSignal, StepExit, StepRunner, cancel_pair};
pub use workspace::{
    FILE_MODE_KEY, FileAtRef, export_subtree, prepare_workspace, read_at_ref,
    remove_run_workspaces, workspace_dir,
};

/// The exit code reported when the command never ran (the workspace could not be prepared).
pub const EXIT_NOT_RUN: i32 = -1;

/// What the worker needs besides the spec.
#[derive(Debug, Clone)]
pub struct WorkerContext {
    /// Where mirrors and workspaces live.
    pub data_dir: DataDir,
    /// Where outputs go and inputs come from.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Where log lines go.
    pub logs: Arc<dyn LogStore>,
    /// Time between TERM and KILL when a step's process group is stopped.
    pub grace: Duration,
    /// The environment commands and helpers start from.
    pub base_env: BaseEnv,
}

impl WorkerContext {
    /// A context with a 10 s grace period and the current process's `PATH` and `HOME`.
    pub fn new(
        data_dir: DataDir,
        artifacts: Arc<dyn ArtifactStore>,
        logs: Arc<dyn LogStore>,
    ) -> Self {
        Self {
            data_dir,
            artifacts,
            logs,
            grace: Duration::from_secs(10),
            base_env: BaseEnv::from_process(),
        }
    }
}

/// How an execution ended, as the worker saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerOutcome {
    /// It ran (or failed to start) and has a result.
    Finished(ExecutionResult),
    /// It was cancelled.
    Canceled,
}

/// Runs one execution from start to end: prepare, run, collect, report. Never fails: every
/// problem ends up in the result's `failure` (and in the log as a `System` line).
///
/// `on_spawn` is called with the command's process identity once it started. The log is
/// closed when this returns.
pub async fn run_execution(
    spec: &ExecutionSpec,
    ctx: &WorkerContext,
    mut cancel: CancelSignal,
    on_spawn: &mut (dyn FnMut(ProcessIdentity) + Send),
) -> WorkerOutcome {
    let mut log = LogSink::new(Arc::clone(&ctx.logs), spec.execution_id, 0);
    let outcome = run_inner(spec, ctx, &mut cancel, on_spawn, &mut log).await;
    if let WorkerOutcome::Finished(ExecutionResult {
        failure: Some(f), ..
    }) = &outcome
    {
        log.system(f.clone()).await;
    }
    if let WorkerOutcome::Canceled = &outcome {
        log.system("canceled").await;
    }
    if let Err(e) = log.finish().await {
        tracing::warn!(execution = %spec.execution_id, error = %error_chain(&e), "writing the step's log failed");
    }
    outcome
}

fn result(
    spec: &ExecutionSpec,
    exit_code: i32,
    artifacts: Vec<ProducedArtifact>,
    failure: Option<String>,
) -> WorkerOutcome {
    WorkerOutcome::Finished(ExecutionResult {
        exit_code,
        logs_uri: Some(logs_uri(spec.execution_id)),
        artifacts,
        failure,
    })
}

async fn run_inner(
    spec: &ExecutionSpec,
    ctx: &WorkerContext,
    cancel: &mut CancelSignal,
    on_spawn: &mut (dyn FnMut(ProcessIdentity) + Send),
    log: &mut LogSink,
) -> WorkerOutcome {
    if cancel.is_cancelled() {
        return WorkerOutcome::Canceled;
    }
    let prepared = {
        let prepare = prepare_workspace(
            spec,
            &ctx.data_dir,
            ctx.artifacts.as_ref(),
            &ctx.base_env,
            log,
        );
        tokio::select! {
            r = prepare => r,
            () = cancel.cancelled() => return WorkerOutcome::Canceled,
        }
    };
    let ws = match prepared {
        Ok(ws) => ws,
        Err(e) => {
            let msg = format!("preparing the workspace failed: {}", error_chain(&e));
            return result(spec, EXIT_NOT_RUN, Vec::new(), Some(msg));
        }
    };
    let cwd = match workdir(&ws, spec.workdir.as_deref()) {
        Ok(cwd) => cwd,
        Err(e) => return result(spec, EXIT_NOT_RUN, Vec::new(), Some(error_chain(&e))),
    };
    let runner = StepRunner::new(ctx.grace, ctx.base_env.clone());
    let exit = match runner.run(spec, &ws, &cwd, log, cancel, on_spawn).await {
        Ok(exit) => exit,
        Err(e) => return result(spec, EXIT_NOT_RUN, Vec::new(), Some(error_chain(&e))),
    };
    let (code, which, mut failure) = match exit {
        StepExit::Canceled => return WorkerOutcome::Canceled,
        StepExit::Exited { code: 0 } => (0, Collect::All, None),
        StepExit::Exited { code } => (code, Collect::ReportsOnly, None),
        StepExit::TimedOut { after, code } => (
            code,
            Collect::ReportsOnly,
            Some(format!(
                "timed out after {}; its process group was stopped",
                human(after)
            )),
        ),
    };
    let collected = {
        let collect = collect_outputs(spec, &ws, ctx.artifacts.as_ref(), which, log);
        tokio::select! {
            r = collect => r,
            () = cancel.cancelled() => return WorkerOutcome::Canceled,
        }
    };
    let artifacts = match collected {
        Ok(a) => a,
        Err(e) => {
            if failure.is_none() {
                failure = Some(error_chain(&e));
            }
            Vec::new()
        }
    };
    result(spec, code, artifacts, failure)
}

fn workdir(ws: &Path, workdir: Option<&str>) -> Result<std::path::PathBuf, Error> {
    match workdir {
        None | Some("" | ".") => Ok(ws.to_path_buf()),
        Some(rel) => safe_join(ws, rel),
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{} ms", d.as_millis())
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// The status callback of DMD §4.3 (`POST /v1/executions/{id}/status`), which a worker in a
/// container or pod sends to the control plane. Extends the DMD's shape with `failure`, and
/// lists each artifact as its full record (with `id`) instead of the bare id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCallback {
    /// `success` or `failed`.
    pub status: CallbackStatus,
    /// The command's exit code.
    pub exit_code: i32,
    /// Where the logs are.
    pub logs_uri: Option<String>,
    /// What was collected.
    pub artifacts: Vec<ProducedArtifact>,
    /// Why it failed beyond the exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// The `status` of a [`StatusCallback`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackStatus {
    /// Exit code 0 and every output collected.
    Success,
    /// Anything else.
    Failed,
}

impl From<&ExecutionResult> for StatusCallback {
    fn from(r: &ExecutionResult) -> Self {
        let ok = r.exit_code == 0 && r.failure.is_none();
        Self {
            status: if ok {
                CallbackStatus::Success
            } else {
                CallbackStatus::Failed
            },
            exit_code: r.exit_code,
            logs_uri: r.logs_uri.clone(),
            artifacts: r.artifacts.clone(),
            failure: r.failure.clone(),
        }
    }
}

impl From<StatusCallback> for ExecutionResult {
    fn from(c: StatusCallback) -> Self {
        let failure = match (c.status, c.failure) {
            (_, Some(f)) => Some(f),
            (CallbackStatus::Failed, None) if c.exit_code == 0 => {
                Some("the worker reported a failure".to_owned())
            }
            (_, None) => None,
        };
        Self {
            exit_code: c.exit_code,
            logs_uri: c.logs_uri,
            artifacts: c.artifacts,
            failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_callback_has_the_dmd_shape_and_round_trips() {
        let result = ExecutionResult {
            exit_code: 0,
            logs_uri: Some("logs://x".to_owned()),
            artifacts: Vec::new(),
            failure: None,
        };
        let callback = StatusCallback::from(&result);
        let json = serde_json::to_value(&callback).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"status": "success", "exit_code": 0, "logs_uri": "logs://x", "artifacts": []})
        );
        assert_eq!(ExecutionResult::from(callback), result);
        let failed = ExecutionResult {
            failure: Some("declared output 'x' was not produced".to_owned()),
            ..result
        };
        let callback = StatusCallback::from(&failed);
        assert_eq!(callback.status, CallbackStatus::Failed);
        assert_eq!(ExecutionResult::from(callback), failed);
    }
}
