//! Run with: cargo run -p shipinator-examples --example bespoke_workflow
//!
//! Builds a [`PipelineSpec`] in code, with no YAML: a build stage whose step declares a
//! templated output, then a test stage. The mock executor makes the `unit` step fail with exit
//! code 3, so the run fails in its test stage. After re-scripting the step to succeed,
//! [`DriverHandle::retry_run`](shipinator_core::driver::DriverHandle::retry_run) retries the run
//! from its failed stage: the build is not run again, and the retried tests receive the
//! original build's artifacts by id. Fails unless both runs end as described.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use shipinator_core::config::{OutputSpec, PipelineSpec, StageSpec, StepSpec, Template, Triggers};
use shipinator_core::domain::{
    ArtifactId, ArtifactType, JobType, RunId, RunStatus, Status, Trigger,
};
use shipinator_core::driver::{Driver, DriverConfig};
use shipinator_core::executor::SourceSpec;
use shipinator_core::memory::{InMemoryArtifactStore, InMemoryStore, MockExecutor, MockStep};
use shipinator_core::orchestrator::{RunDocument, RunRequest, run_artifacts};
use shipinator_core::store::{PipelineSource, RunRecord, Store, ensure_pipeline};

/// A step with the defaults a YAML file would get.
fn step(name: &str, run: &str) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        run: run.to_owned(),
        image: None,
        env: BTreeMap::new(),
        timeout: Some(Duration::from_secs(600)),
        workdir: None,
        outputs: Vec::new(),
        parallel_group: None,
    }
}

/// build (compile, with a binary output) → test (unit, then smoke).
fn pipeline() -> anyhow::Result<PipelineSpec> {
    let mut compile = step("compile", "make dist");
    compile.outputs.push(OutputSpec {
        artifact_type: ArtifactType::Binary,
        path: Some(Template::parse("dist/app-{{ .short_commit }}")?),
        image_ref: None,
        name: Some("app".to_owned()),
    });
    let mut build_env = BTreeMap::new();
    build_env.insert(
        "VERSION".to_owned(),
        Template::parse("{{ .branch }}-{{ .short_commit }}")?,
    );
    let mut unit = step("unit", "make test");
    unit.outputs.push(OutputSpec {
        artifact_type: ArtifactType::TestReport,
        path: Some(Template::literal("reports/junit.xml")),
        image_ref: None,
        name: None,
    });
    Ok(PipelineSpec {
        triggers: Triggers::default(),
        build: Some(StageSpec {
            image: Some("debian:stable-slim".to_owned()),
            env: build_env,
            steps: vec![compile],
        }),
        test: Some(StageSpec {
            image: Some("debian:stable-slim".to_owned()),
            env: BTreeMap::new(),
            steps: vec![unit, step("smoke", "./dist/app-* --version")],
        }),
        deploy: None,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let store = Arc::new(InMemoryStore::new());
    let (_project, pipeline_row) = ensure_pipeline(
        &*store,
        PipelineSource {
            project_name: "demo",
            clone_url: "https://git.example.com/demo/app.git",
            default_branch: "main",
            pipeline_name: "app",
            source_spec: "",
        },
    )
    .await?;
    let pipeline_id = pipeline_row.id;
    let executor = MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
    executor.script(
        "unit",
        MockStep::fail(3).with_log_lines(["test tests::it_works ... FAILED"]),
    );
    let driver = Driver::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(executor.clone()),
        DriverConfig::default(),
    )
    .spawn();

    // 1. The first run fails in its test stage.
    let request = RunRequest {
        pipeline_id,
        pipeline_name: "app".to_owned(),
        project_name: "demo".to_owned(),
        spec: Arc::new(pipeline()?),
        source: SourceSpec {
            clone_url: "https://git.example.com/demo/app.git".to_owned(),
            commit: "fedcba9876543210fedcba9876543210fedcba98".to_owned(),
            git_ref: "refs/heads/main".to_owned(),
            copy_working_tree: false,
        },
        branch: "main".to_owned(),
        default_branch: "main".to_owned(),
        trigger: Trigger::Manual,
        stages: Some(vec![JobType::Build, JobType::Test]),
        requested_by: "bespoke_workflow example".to_owned(),
    };
    let first = driver.submit_run(request).await?;
    driver.wait_for_run(first).await?;
    let original = store.load_run(first).await?;
    print_run("original", &original);

    // 2. Fix the step, then retry from the failed stage.
    executor.script("unit", MockStep::succeed());
    let submits_before = executor.specs().len();
    let second = driver.retry_run(first, "bespoke_workflow example").await?;
    driver.wait_for_run(second).await?;
    driver.shutdown().await?;
    let retry = store.load_run(second).await?;
    print_run("retry", &retry);

    // 3. Check both outcomes and the reuse of the build's artifacts.
    ensure!(
        original.run.status == RunStatus::Failed,
        "the original ended {}",
        original.run.status
    );
    let unit_exit = original
        .executions
        .iter()
        .find_map(|e| e.exit_code.filter(|c| *c != 0));
    ensure!(
        unit_exit == Some(3),
        "expected exit code 3, got {unit_exit:?}"
    );
    ensure!(
        retry.run.status == RunStatus::Success,
        "the retry ended {}",
        retry.run.status
    );
    ensure!(retry.run.retry_of == Some(first), "the retry is not linked");
    let built: Vec<ArtifactId> = artifact_ids(&original, JobType::Build);
    ensure!(!built.is_empty(), "the original build produced no artifact");
    let inherited: Vec<ArtifactId> = RunDocument::from_run(&retry.run)?
        .inherited_artifacts
        .iter()
        .map(|a| a.artifact.id)
        .collect();
    ensure!(
        inherited == built,
        "the retry inherited {inherited:?}, not {built:?}"
    );
    let listed: Vec<ArtifactId> = run_artifacts(&retry).iter().map(|a| a.id).collect();
    ensure!(
        built.iter().all(|id| listed.contains(id)),
        "the retry's artifact list {listed:?} lacks the reused {built:?}"
    );
    let retried = &executor.specs()[submits_before..];
    ensure!(
        retried.iter().all(|s| s.stage == JobType::Test),
        "the retry ran the build again"
    );
    let unit = retried
        .iter()
        .find(|s| s.step_name == "unit")
        .context("the retry did not run the unit step")?;
    let inputs: Vec<ArtifactId> = unit.inputs.iter().map(|i| i.id).collect();
    ensure!(
        built.iter().all(|id| inputs.contains(id)),
        "the retried tests did not receive the build's artifacts: {inputs:?}"
    );
    println!(
        "ok: original failed (exit code 3); retry {second} succeeded reusing artifacts {built:?}"
    );
    Ok(())
}

fn artifact_ids(record: &RunRecord, stage: JobType) -> Vec<ArtifactId> {
    let jobs: Vec<_> = record
        .jobs
        .iter()
        .filter(|j| j.job_type == stage)
        .map(|j| j.id)
        .collect();
    record
        .artifacts
        .iter()
        .filter(|a| jobs.contains(&a.job_id))
        .map(|a| a.id)
        .collect()
}

fn print_run(label: &str, record: &RunRecord) {
    let run = &record.run;
    let retry_of = run.retry_of.map(|r: RunId| format!(" (retry of {r})"));
    println!(
        "{label} run {}{} ended {}",
        run.id,
        retry_of.unwrap_or_default(),
        run.status
    );
    for step in &record.steps {
        let exit = record
            .executions
            .iter()
            .filter(|e| e.job_step_id == step.id)
            .filter_map(|e| e.exit_code)
            .next_back();
        let executed = if step.attempt == 0 && step.status == Status::Succeeded {
            " (reused)"
        } else {
            ""
        };
        println!(
            "  step {} {}{executed} exit code {exit:?}",
            step.name, step.status
        );
    }
    // A retry's own artifacts and those it reuses from the run it retries.
    for a in &run_artifacts(record) {
        println!(
            "  artifact {} {} {}",
            a.id,
            a.artifact_type,
            a.path.as_deref().unwrap_or("-")
        );
    }
}
