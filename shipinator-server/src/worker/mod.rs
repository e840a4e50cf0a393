//! `shipinator worker`: one execution away from the server, as a Kubernetes pod (or any
//! remote executor) runs it. The same worker runtime as the local executor
//! ([`shipinator_local::worker::run_execution`]) prepares the stage's workspace, runs the
//! command and collects its outputs; here the artifacts and log lines go to the server over
//! HTTP ([`remote`]) and the result is reported to `POST /v1/executions/{id}/status`.
//!
//! Inputs (the pod's environment):
//! - `SHIPINATOR_EXECUTION_SPEC`: the `ExecutionSpec` as JSON (or `--spec FILE`);
//! - `SHIPINATOR_SERVER`: the server's base URL; `SHIPINATOR_EXECUTION_TOKEN`: the
//!   execution's bearer token (never a flag, so it does not show in process listings, and never
//!   passed to the step's command);
//! - `SHIPINATOR_WORKSPACE`: the stage's workspace directory, `<workspaces>/<run-id>/<stage>`
//!   on a volume the stage's pods share (its markers sit beside it in `<workspaces>/<run-id>/`);
//!   without it, workspaces live in the worker's data directory.
//!
//! Exit code: 0 once the terminal status was delivered (whatever the step's outcome), 1 when it
//! could not be, 2 for a usage error before anything could be reported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use shipinator_core::domain::ExecutionId;
use shipinator_core::executor::ExecutionSpec;
use shipinator_local::DataDir;
use shipinator_local::worker::{BaseEnv, WorkerContext, WorkerOutcome, cancel_pair, run_execution};
use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{EXIT_FAILED, EXIT_OK, EXIT_USAGE};

mod client;
pub(crate) mod process;
mod remote;

use client::{ServerClient, StatusReport};
use remote::{RemoteArtifactStore, RemoteLogStore};

/// The env var holding the spec.
pub(crate) const SPEC_ENV: &str = "SHIPINATOR_EXECUTION_SPEC";
/// The env var holding the execution's bearer token.
pub(crate) const TOKEN_ENV: &str = "SHIPINATOR_EXECUTION_TOKEN";
/// The env var naming the file the terminal report is also written to.
pub(crate) const RESULT_FILE_ENV: &str = "SHIPINATOR_RESULT_FILE";
/// Why a worker stopped by a signal reports its execution lost.
const STOPPED: &str =
    "the worker was stopped (SIGTERM) before the step ended; its process group was stopped";

/// `shipinator worker`.
#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// The execution to run; must be the spec's.
    #[arg(long, value_name = "ID")]
    execution: String,
    /// Read the spec (JSON) from FILE instead of SHIPINATOR_EXECUTION_SPEC.
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// The server's base URL.
    #[arg(long, env = "SHIPINATOR_SERVER", value_name = "URL")]
    server: String,
    /// The stage's workspace directory (`<workspaces>/<run-id>/<stage>`).
    #[arg(long, env = "SHIPINATOR_WORKSPACE", value_name = "DIR")]
    workspace: Option<PathBuf>,
    /// Where this worker keeps its git mirrors (and workspaces, without --workspace); default
    /// `<temp dir>/shipinator-worker`.
    #[arg(long, env = "SHIPINATOR_WORKER_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Seconds between TERM and KILL when the step's process group is stopped.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    grace: u64,
    /// How long to keep retrying the terminal status report.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    report_timeout: u64,
    /// Also write the terminal report (JSON) to FILE before sending it, for an executor that
    /// reads it back.
    #[arg(long, env = "SHIPINATOR_RESULT_FILE", value_name = "FILE")]
    result_file: Option<PathBuf>,
}

/// Runs `shipinator worker`.
pub(crate) fn run(args: WorkerArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return EXIT_USAGE;
        }
    };
    runtime.block_on(run_async(args))
}

async fn run_async(args: WorkerArgs) -> u8 {
    let id: ExecutionId = match args.execution.parse() {
        Ok(id) => id,
        Err(e) => {
            eprintln!("error: --execution: {e}");
            return EXIT_USAGE;
        }
    };
    let Some(token) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()) else {
        eprintln!("error: {TOKEN_ENV} is not set: the worker cannot authenticate to the server");
        return EXIT_USAGE;
    };
    let client = match ServerClient::new(&args.server, token, id) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return EXIT_USAGE;
        }
    };
    let report_timeout = Duration::from_secs(args.report_timeout);
    let ctx = match setup(&args, id, &client) {
        Ok(x) => x,
        Err(e) => {
            // Nothing ran, but the server can still learn why.
            let failure = format!("the worker could not start: {e:#}");
            eprintln!("error: {failure}");
            let report = StatusReport::not_run(id, failure);
            record(args.result_file.as_deref(), &report);
            return deliver(&client, &report, report_timeout).await;
        }
    };
    let (spec, ctx) = ctx;
    let outcome = execute(&spec, &ctx, &client).await;
    let timeout = match outcome {
        // The pod is being stopped: what time is left goes to the report.
        WorkerOutcome::Canceled => report_timeout.min(Duration::from_secs(10)),
        WorkerOutcome::Finished(_) => report_timeout,
    };
    let report = StatusReport::from_outcome(id, &outcome, STOPPED);
    record(args.result_file.as_deref(), &report);
    deliver(&client, &report, timeout).await
}

/// Writes the terminal report to the result file, if there is one.
fn record(file: Option<&Path>, report: &StatusReport) {
    if let Some(file) = file
        && let Err(e) = process::write_result(file, report)
    {
        tracing::warn!(file = %file.display(), error = %format!("{e:#}"), "writing the result file failed");
    }
}

/// Reads the spec and builds the worker context.
fn setup(
    args: &WorkerArgs,
    id: ExecutionId,
    client: &ServerClient,
) -> anyhow::Result<(ExecutionSpec, WorkerContext)> {
    let spec = load_spec(args.spec.as_deref(), std::env::var(SPEC_ENV).ok())?;
    if spec.execution_id != id {
        anyhow::bail!(
            "the spec is for execution {}, not {id} (--execution)",
            spec.execution_id
        );
    }
    let root = args
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("shipinator-worker"));
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating the data directory {}", root.display()))?;
    let mut data_dir = DataDir::new(root);
    if let Some(ws) = &args.workspace {
        data_dir = data_dir.with_workspaces(workspaces_root(ws, &spec.workspace.key)?);
    }
    let ctx = WorkerContext {
        data_dir,
        artifacts: Arc::new(RemoteArtifactStore::new(client.clone())),
        logs: Arc::new(RemoteLogStore::new(client.clone())),
        grace: Duration::from_secs(args.grace),
        base_env: BaseEnv::from_process(),
    };
    Ok((spec, ctx))
}

/// The spec from `file`, else from the env var's value.
fn load_spec(file: Option<&Path>, env: Option<String>) -> anyhow::Result<ExecutionSpec> {
    let (text, from) = match file {
        Some(f) => (
            std::fs::read_to_string(f)
                .with_context(|| format!("reading --spec {}", f.display()))?,
            format!("--spec {}", f.display()),
        ),
        None => (
            env.filter(|s| !s.trim().is_empty())
                .with_context(|| format!("{SPEC_ENV} is not set and no --spec FILE was given"))?,
            SPEC_ENV.to_owned(),
        ),
    };
    serde_json::from_str(&text).with_context(|| format!("{from} is not a valid execution spec"))
}

/// The directory that holds workspaces, given the stage's workspace `dir` and its key: `dir`
/// must end with the key's components (`/w/<run>/<stage>` for `<run>/<stage>` → `/w`).
fn workspaces_root(dir: &Path, key: &str) -> anyhow::Result<PathBuf> {
    let key_path = Path::new(key);
    let parts = key_path.components().count();
    let is_plain = parts > 0
        && key_path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    anyhow::ensure!(
        is_plain,
        "the spec's workspace key '{key}' is not a relative path"
    );
    let dir = std::path::absolute(dir)
        .with_context(|| format!("SHIPINATOR_WORKSPACE {}", dir.display()))?;
    anyhow::ensure!(
        dir.ends_with(key_path),
        "SHIPINATOR_WORKSPACE {} does not end with the execution's workspace key '{key}'",
        dir.display()
    );
    dir.ancestors()
        .nth(parts)
        .map(Path::to_path_buf)
        .with_context(|| format!("SHIPINATOR_WORKSPACE {} has no parent", dir.display()))
}

/// Runs the execution: reports `running` once the command started, and stops the step's
/// process group on SIGTERM or SIGINT.
async fn execute(
    spec: &ExecutionSpec,
    ctx: &WorkerContext,
    client: &ServerClient,
) -> WorkerOutcome {
    let (cancel, signal_rx) = cancel_pair();
    let stopper = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::warn!("cannot listen for SIGTERM: the step cannot be stopped early");
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("stopping: the step's process group gets TERM, then KILL");
            cancel.cancel();
        })
    };
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let running = {
        let client = client.clone();
        tokio::spawn(async move {
            if started_rx.await.is_ok()
                && let Err(e) = client
                    .post_status(&StatusReport::running(), Duration::from_secs(30))
                    .await
            {
                tracing::warn!(error = %shipinator_local::error_chain(&e), "reporting 'running' failed");
            }
        })
    };
    let outcome = {
        let mut started_tx = Some(started_tx);
        let mut on_spawn = move |_process| {
            if let Some(tx) = started_tx.take() {
                let _ = tx.send(());
            }
        };
        run_execution(spec, ctx, signal_rx, &mut on_spawn).await
    };
    stopper.abort();
    // `running` goes out before the terminal report (it ends at once if the command never
    // started).
    let _ = running.await;
    outcome
}

/// Posts the terminal report; the process's exit code says whether it arrived.
async fn deliver(client: &ServerClient, report: &StatusReport, timeout: Duration) -> u8 {
    match client.post_status(report, timeout).await {
        Ok(()) => EXIT_OK,
        // The server already holds a final state for this execution (it was cancelled): the
        // report is moot, but it was heard.
        Err(e) if e.status() == Some(reqwest::StatusCode::CONFLICT) => {
            tracing::warn!(error = %e, "the server refused the report as stale");
            EXIT_OK
        }
        Err(e) => {
            eprintln!(
                "error: execution {}: {}",
                client.execution(),
                shipinator_local::error_chain(&e)
            );
            EXIT_FAILED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json() -> String {
        let spec = ExecutionSpec {
            execution_id: "00000000-0000-4000-8000-000000000001".parse().unwrap(),
            run_id: "00000000-0000-4000-8000-000000000002".parse().unwrap(),
            job_id: "00000000-0000-4000-8000-000000000003".parse().unwrap(),
            step_id: "00000000-0000-4000-8000-000000000004".parse().unwrap(),
            attempt: 1,
            stage: shipinator_core::domain::JobType::Build,
            step_name: "compile".to_owned(),
            image: None,
            command: vec!["sh".to_owned(), "-c".to_owned(), "true".to_owned()],
            env: std::collections::BTreeMap::new(),
            workdir: None,
            timeout: None,
            workspace: shipinator_core::executor::WorkspaceRef::for_stage(
                "00000000-0000-4000-8000-000000000002".parse().unwrap(),
                shipinator_core::domain::JobType::Build,
            ),
            source: None,
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        serde_json::to_string(&spec).unwrap()
    }

    #[test]
    fn the_spec_comes_from_the_file_or_the_env_and_errors_name_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("spec.json");
        std::fs::write(&file, spec_json()).unwrap();
        let from_file = load_spec(Some(&file), Some("not json".to_owned())).unwrap();
        let from_env = load_spec(None, Some(spec_json())).unwrap();
        assert_eq!(from_file, from_env);
        assert_eq!(from_env.step_name, "compile");

        let err = load_spec(None, None).unwrap_err();
        assert!(format!("{err:#}").contains(SPEC_ENV), "{err:#}");
        let err = load_spec(None, Some("{\"execution_id\": 3}".to_owned())).unwrap_err();
        assert!(
            format!("{err:#}").contains("SHIPINATOR_EXECUTION_SPEC is not a valid execution spec"),
            "{err:#}"
        );
        let missing = dir.path().join("nope.json");
        let err = load_spec(Some(&missing), None).unwrap_err();
        assert!(format!("{err:#}").contains("nope.json"), "{err:#}");
    }

    #[test]
    fn the_workspaces_root_is_the_workspace_minus_its_key() {
        assert_eq!(
            workspaces_root(Path::new("/workspaces/r1/build"), "r1/build").unwrap(),
            Path::new("/workspaces")
        );
        assert_eq!(
            workspaces_root(Path::new("/workspaces/r1/build/"), "r1/build").unwrap(),
            Path::new("/workspaces")
        );
        for (dir, key) in [
            ("/workspaces/r1/test", "r1/build"),
            ("/workspace", "r1/build"),
            ("/workspaces/r1/build", "../build"),
            ("/workspaces/r1/build", "/r1/build"),
            ("/workspaces/r1/build", ""),
        ] {
            assert!(workspaces_root(Path::new(dir), key).is_err(), "{dir} {key}");
        }
    }
}
