//! Run with: cargo run -p shipinator-examples --example in_memory_pipeline
//!
//! Embeds the engine in one process: parses a `.shipinator.yaml` held in a string, then runs it
//! with the async [`Driver`] over the in-memory store and the mock executor. The executor has an
//! in-memory artifact store attached, so the declared outputs are really stored (and
//! checksummed). Prints the run, its steps and its artifacts as the store holds them, and fails
//! unless the run succeeded with the expected artifacts.

use std::sync::Arc;

use anyhow::{Context, ensure};
use shipinator_core::config;
use shipinator_core::domain::{ArtifactType, RunStatus, Status, Trigger};
use shipinator_core::driver::{Driver, DriverConfig};
use shipinator_core::executor::SourceSpec;
use shipinator_core::memory::{InMemoryArtifactStore, InMemoryStore, MockExecutor, MockStep};
use shipinator_core::orchestrator::RunRequest;
use shipinator_core::store::{PipelineSource, Store, ensure_pipeline};

const PIPELINE: &str = r#"
build:
  image: rust:1
  steps:
    - name: compile
      run: cargo build --release
      outputs:
        - type: binary
          path: target/release/app-{{ .short_commit }}
          name: app
test:
  image: rust:1
  steps:
    - name: unit
      run: cargo test
      parallel: true
      artifacts:
        - type: test_report
          path: reports/unit.xml
    - name: lint
      run: cargo clippy -- -D warnings
      parallel: true
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // 1. Parse and validate the pipeline, as the server does with a repository's file.
    let spec = config::parse(".shipinator.yaml", PIPELINE).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("pipeline stages: {:?}", spec.stages());

    // 2. The in-memory backends. A run refers to a pipeline row, so create one first.
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
    let artifacts = Arc::new(InMemoryArtifactStore::new());
    let executor = MockExecutor::new().with_artifact_store(artifacts);
    executor.script(
        "compile",
        MockStep::succeed().with_log_lines(["Compiling app", "Finished release"]),
    );

    // 3. Start the driver and submit a run.
    let driver = Driver::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(executor.clone()),
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
            commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            git_ref: "refs/heads/main".to_owned(),
            copy_working_tree: false,
        },
        branch: "main".to_owned(),
        default_branch: "main".to_owned(),
        trigger: Trigger::Push,
        stages: None,
        requested_by: "in_memory_pipeline example".to_owned(),
    };
    let run_id = driver.submit_run(request).await?;
    let run = driver.wait_for_run(run_id).await?;
    driver.shutdown().await?;

    // 4. Show what the store holds.
    let record = store.load_run(run_id).await?;
    println!("run {} ended {} (phase {})", run.id, run.status, run.phase);
    for job in &record.jobs {
        println!("  stage {}: {}", job.job_type, job.status);
        for step in record.steps.iter().filter(|s| s.job_id == job.id) {
            let group = step.parallel_group.as_deref().unwrap_or("-");
            println!(
                "    step {:<8} {:<10} attempt {} group {group}",
                step.name,
                step.status.as_str(),
                step.attempt
            );
        }
    }
    for a in &record.artifacts {
        println!(
            "  artifact {} {:<12} {:<36} {} bytes {} ({})",
            a.id,
            a.artifact_type.as_str(),
            a.path.as_deref().unwrap_or("-"),
            a.size,
            a.checksum.as_deref().unwrap_or("-"),
            a.storage_backend,
        );
    }

    // 5. Check the outcome.
    ensure!(
        run.status == RunStatus::Success,
        "the run ended {}",
        run.status
    );
    ensure!(
        record.steps.iter().all(|s| s.status == Status::Succeeded),
        "not every step succeeded"
    );
    let binary = record
        .artifacts
        .iter()
        .find(|a| a.artifact_type == ArtifactType::Binary)
        .context("no binary artifact")?;
    ensure!(
        binary.name.as_deref() == Some("app")
            && binary.path.as_deref() == Some("target/release/app-0123456789ab")
            && binary.size > 0
            && binary.checksum.is_some(),
        "unexpected binary artifact: {binary:?}"
    );
    ensure!(
        record
            .artifacts
            .iter()
            .any(|a| a.artifact_type == ArtifactType::TestReport),
        "no test report artifact"
    );
    // The test stage received the build's binary as an input.
    let unit = executor
        .specs()
        .into_iter()
        .find(|s| s.step_name == "unit")
        .context("the unit step was never submitted")?;
    ensure!(
        unit.inputs.iter().any(|i| i.id == binary.id),
        "the test stage did not receive the binary"
    );
    println!(
        "ok: run succeeded with {} artifacts",
        record.artifacts.len()
    );
    Ok(())
}
