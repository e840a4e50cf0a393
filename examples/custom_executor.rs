//! Run with: cargo run -p shipinator-examples --example custom_executor
//!
//! Implements the [`Executor`] trait: `EchoExecutor` "runs" each step by writing its command
//! into an in-memory log and finishing at once with exit code 0. It pushes each end through
//! [`Executor::reports`] (a tokio channel), and answers [`Executor::status`] for the driver's
//! fallback polling. A small pipeline is then driven through it over the in-memory store; the
//! example fails unless the run succeeded and the executor saw every step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::ensure;
use shipinator_core::config;
use shipinator_core::domain::{ExecutionId, RunStatus, Trigger};
use shipinator_core::driver::{Driver, DriverConfig};
use shipinator_core::executor::{
    ExecHandle, ExecutionReport, ExecutionResult, ExecutionSpec, ExecutionState, Executor,
    ExecutorError, LogLineStream, ReportStream, SourceSpec,
};
use shipinator_core::memory::InMemoryStore;
use shipinator_core::orchestrator::RunRequest;
use shipinator_core::store::{PipelineSource, Store, ensure_pipeline};
use tokio::sync::mpsc;

/// Echoes each command into `log` and finishes it at once, successfully.
#[derive(Debug)]
struct EchoExecutor {
    log: Mutex<Vec<String>>,
    ended: Mutex<HashMap<ExecutionId, ExecutionState>>,
    tx: mpsc::UnboundedSender<ExecutionReport>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<ExecutionReport>>>,
}

impl EchoExecutor {
    fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (log, ended) = (Mutex::default(), Mutex::default());
        Self {
            log,
            ended,
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Executor for EchoExecutor {
    fn kind(&self) -> &'static str {
        "echo"
    }

    async fn submit(&self, spec: &ExecutionSpec) -> Result<ExecHandle, ExecutorError> {
        let handle = ExecHandle {
            execution_id: spec.execution_id,
            external_id: format!("echo-{}", spec.execution_id),
        };
        let mut ended = self.ended.lock().map_err(|_| ExecutorError::NotFound {
            id: spec.execution_id,
        })?;
        if ended.contains_key(&spec.execution_id) {
            return Ok(handle); // Submitting twice adopts the first execution.
        }
        let line = format!(
            "[{}/{}] $ {}",
            spec.stage,
            spec.step_name,
            spec.command.join(" ")
        );
        self.log
            .lock()
            .map_err(|_| ExecutorError::NotFound {
                id: spec.execution_id,
            })?
            .push(line);
        let result = ExecutionResult {
            exit_code: 0,
            logs_uri: None,
            artifacts: Vec::new(),
            failure: None,
        };
        let state = ExecutionState::Finished(result);
        ended.insert(spec.execution_id, state.clone());
        let _ = self.tx.send(ExecutionReport {
            execution_id: spec.execution_id,
            state,
        });
        Ok(handle)
    }

    async fn status(&self, handle: &ExecHandle) -> Result<ExecutionState, ExecutorError> {
        let ended = self.ended.lock().map_err(|_| ExecutorError::NotFound {
            id: handle.execution_id,
        })?;
        ended
            .get(&handle.execution_id)
            .cloned()
            .ok_or(ExecutorError::NotFound {
                id: handle.execution_id,
            })
    }

    async fn cancel(&self, _handle: &ExecHandle) -> Result<(), ExecutorError> {
        Ok(()) // Every execution has already ended.
    }

    async fn logs(
        &self,
        _handle: &ExecHandle,
        _from_seq: u64,
    ) -> Result<LogLineStream, ExecutorError> {
        Ok(Box::pin(futures_util::stream::empty()))
    }

    fn reports(&self) -> Option<ReportStream> {
        let rx = self.rx.lock().ok()?.take()?;
        Some(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|report| (report, rx)) },
        )))
    }
}

const PIPELINE: &str = r#"
build:
  steps:
    - name: fetch
      run: cargo fetch
    - name: compile
      run: cargo build --release
test:
  steps:
    - name: unit
      run: cargo test --lib
      parallel: true
    - name: doc
      run: cargo test --doc
      parallel: true
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let spec = config::parse(".shipinator.yaml", PIPELINE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Arc::new(InMemoryStore::new());
    let (_project, pipeline_row) = ensure_pipeline(
        &*store,
        PipelineSource {
            project_name: "demo",
            clone_url: "https://git.example.com/demo/app.git",
            default_branch: "main",
            pipeline_name: "app",
            source_spec: PIPELINE,
        },
    )
    .await?;
    let pipeline_id = pipeline_row.id;
    let executor = Arc::new(EchoExecutor::new());
    let driver = Driver::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::clone(&executor) as Arc<dyn Executor>,
        DriverConfig::default(),
    )
    .spawn();
    let request = RunRequest {
        pipeline_id,
        pipeline_name: "app".to_owned(),
        project_name: "demo".to_owned(),
        spec: Arc::new(spec),
        source: SourceSpec {
            clone_url: "https://git.example.com/demo/app.git".to_owned(),
            commit: "89abcdef0123456789abcdef0123456789abcdef".to_owned(),
            git_ref: "refs/heads/main".to_owned(),
            copy_working_tree: false,
        },
        branch: "main".to_owned(),
        default_branch: "main".to_owned(),
        trigger: Trigger::Manual,
        stages: None,
        requested_by: "custom_executor example".to_owned(),
    };
    let run_id = driver.submit_run(request).await?;
    let run = driver.wait_for_run(run_id).await?;
    driver.shutdown().await?;

    println!("the echo executor saw:");
    let lines = executor.lines();
    for line in &lines {
        println!("  {line}");
    }
    let record = store.load_run(run_id).await?;
    println!("run {} ended {}", run.id, run.status);
    for e in &record.executions {
        println!(
            "  execution {} on '{}': {} (exit code {:?})",
            e.external_id, e.executor_type, e.status, e.exit_code
        );
    }

    ensure!(
        run.status == RunStatus::Success,
        "the run ended {}",
        run.status
    );
    for step in &record.steps {
        let seen = lines
            .iter()
            .any(|l| l.contains(&format!("/{}] ", step.name)));
        ensure!(seen, "the executor never saw step {}", step.name);
    }
    ensure!(
        record.executions.iter().all(|e| e.executor_type == "echo"),
        "an execution ran elsewhere"
    );
    println!("ok: {} steps ran on the echo executor", record.steps.len());
    Ok(())
}
