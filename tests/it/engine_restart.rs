//! The engine over the real stores, interrupted mid-run: the driver crashes and another one
//! takes over (SQLite and PostgreSQL), and PostgreSQL itself goes away for a few seconds.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use shipinator_core::config::{PipelineSpec, StageSpec, StepSpec, Triggers};
use shipinator_core::conformance::store::fixture;
use shipinator_core::domain::{PipelineId, RunId, RunStatus, Status, StepId, Trigger};
use shipinator_core::driver::{Driver, DriverConfig, DriverHandle};
use shipinator_core::executor::SourceSpec;
use shipinator_core::memory::{MockExecutor, MockStep};
use shipinator_core::orchestrator::RunRequest;
use shipinator_core::store::Store;
use shipinator_postgres::testing::TestCluster;
use shipinator_postgres::{PgStore, PgStoreOptions};
use shipinator_sqlite::SqliteStore;
use tokio::time::Instant;

/// Runs submitted per test.
const RUNS: usize = 10;
/// How long every mocked step takes (real time).
const STEP_TIME: Duration = Duration::from_millis(150);
/// Upper bound for any wait; exceeding it fails the test instead of hanging.
const BOUND: Duration = Duration::from_secs(60);

fn step(name: &str) -> StepSpec {
    StepSpec {
        name: name.to_owned(),
        run: format!("make {name}"),
        image: None,
        env: BTreeMap::new(),
        timeout: None,
        workdir: None,
        outputs: Vec::new(),
        parallel_group: None,
    }
}

fn stage(names: &[&str]) -> StageSpec {
    StageSpec {
        image: None,
        env: BTreeMap::new(),
        steps: names.iter().map(|n| step(n)).collect(),
    }
}

/// Build (compile, package) then test (unit, lint); no deploy.
fn request(pipeline_id: PipelineId) -> RunRequest {
    RunRequest {
        pipeline_id,
        pipeline_name: "app".to_owned(),
        project_name: "demo".to_owned(),
        spec: Arc::new(PipelineSpec {
            triggers: Triggers::default(),
            build: Some(stage(&["compile", "package"])),
            test: Some(stage(&["unit", "lint"])),
            deploy: None,
        }),
        source: SourceSpec {
            clone_url: "file:///srv/git/app.git".to_owned(),
            commit: "0123456789abcdef0123456789abcdef01234567".to_owned(),
            git_ref: "refs/heads/main".to_owned(),
            copy_working_tree: false,
        },
        branch: "main".to_owned(),
        default_branch: "main".to_owned(),
        trigger: Trigger::Push,
        stages: None,
        requested_by: "test".to_owned(),
    }
}

/// Short leases and frequent claims, so a driver adopts a crashed one's runs within seconds.
fn config(owner: &str, lease_ttl: Duration) -> DriverConfig {
    DriverConfig {
        owner: owner.to_owned(),
        lease_ttl,
        claim_interval: Duration::from_millis(200),
        poll_interval: Duration::from_millis(500),
        ..DriverConfig::default()
    }
}

fn spawn(store: &Arc<dyn Store>, executor: &MockExecutor, config: DriverConfig) -> DriverHandle {
    Driver::new(Arc::clone(store), Arc::new(executor.clone()), config).spawn()
}

/// Creates the project/repository/pipeline and submits `RUNS` runs through `driver`.
async fn submit_runs(store: &Arc<dyn Store>, driver: &DriverHandle) -> anyhow::Result<Vec<RunId>> {
    let fx = fixture(store.as_ref()).await;
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        runs.push(driver.submit_run(request(fx.pipeline.id)).await?);
    }
    Ok(runs)
}

/// Steps recorded `succeeded` in the store, over all `runs`.
async fn succeeded_steps(store: &dyn Store, runs: &[RunId]) -> anyhow::Result<HashSet<StepId>> {
    let mut out = HashSet::new();
    for &run in runs {
        let record = store.load_run(run).await?;
        out.extend(
            record
                .steps
                .iter()
                .filter(|s| s.status == Status::Succeeded)
                .map(|s| s.id),
        );
    }
    Ok(out)
}

/// How many of `runs` are not terminal yet.
async fn unfinished(store: &dyn Store, runs: &[RunId]) -> anyhow::Result<usize> {
    let mut n = 0;
    for &run in runs {
        if !store.get_run(run).await?.status.is_terminal() {
            n += 1;
        }
    }
    Ok(n)
}

/// Polls the store until at least one step succeeded; bounded by [`BOUND`].
async fn wait_for_progress(store: &dyn Store, runs: &[RunId]) -> anyhow::Result<()> {
    let deadline = Instant::now() + BOUND;
    loop {
        if !succeeded_steps(store, runs).await?.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "no step succeeded within {BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the store until every run is terminal (store errors that are transient, e.g. while
/// the database is down, are retried); bounded by [`BOUND`]. Returns the final statuses.
async fn wait_all_terminal(store: &dyn Store, runs: &[RunId]) -> anyhow::Result<Vec<RunStatus>> {
    let deadline = Instant::now() + BOUND;
    loop {
        let mut statuses = Vec::with_capacity(runs.len());
        let mut unavailable = false;
        for &run in runs {
            match store.get_run(run).await {
                Ok(r) => statuses.push(r.status),
                Err(e) if e.is_transient() => {
                    unavailable = true;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !unavailable && statuses.iter().all(|s| s.is_terminal()) {
            return Ok(statuses);
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "runs not all terminal within {BOUND:?}: {statuses:?} (store unavailable: {unavailable})"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every run succeeded and every one of its steps and their last executions did.
async fn assert_all_succeeded(store: &dyn Store, runs: &[RunId]) -> anyhow::Result<()> {
    let statuses = wait_all_terminal(store, runs).await?;
    ensure!(
        statuses.iter().all(|s| *s == RunStatus::Success),
        "every run ends success: {statuses:?}"
    );
    for &run in runs {
        let record = store.load_run(run).await?;
        ensure!(record.steps.len() == 4, "run {run} has its 4 steps");
        for s in &record.steps {
            ensure!(
                s.status == Status::Succeeded,
                "step {} of run {run} ended {:?}",
                s.name,
                s.status
            );
            let last = record
                .executions
                .iter()
                .filter(|e| e.job_step_id == s.id)
                .max_by_key(|e| e.attempt)
                .with_context(|| format!("step {} of run {run} has no execution", s.name))?;
            ensure!(
                last.status == Status::Succeeded,
                "last execution of step {} of run {run} ended {:?}",
                s.name,
                last.status
            );
        }
    }
    Ok(())
}

/// Crashes a driver mid-run and lets another one, over the same store and executions, finish
/// every run; no step recorded succeeded before the crash is submitted again.
async fn crash_and_take_over(store: Arc<dyn Store>) -> anyhow::Result<()> {
    let lease_ttl = Duration::from_secs(2);
    let executor = MockExecutor::new();
    executor.set_default(MockStep::succeed().with_duration(STEP_TIME));
    let first = spawn(&store, &executor, config("first", lease_ttl));
    let runs = submit_runs(&store, &first).await?;

    wait_for_progress(store.as_ref(), &runs).await?;
    first.abort();
    let submitted_at_crash = executor.specs().len();
    let succeeded_at_crash = succeeded_steps(store.as_ref(), &runs).await?;
    let open_runs = unfinished(store.as_ref(), &runs).await?;
    ensure!(
        open_runs > 0,
        "the crash came after every run had ended; nothing was tested"
    );
    ensure!(!succeeded_at_crash.is_empty());

    // The crashed driver's leases expire by the store's clock; the new one claims its runs.
    let second = spawn(&store, &executor.restart(), config("second", lease_ttl));
    let result = assert_all_succeeded(store.as_ref(), &runs).await;
    let specs = executor.specs();
    let resubmitted: Vec<(String, u32)> = specs[submitted_at_crash..]
        .iter()
        .filter(|s| succeeded_at_crash.contains(&s.step_id))
        .map(|s| (format!("{}/{}", s.run_id, s.step_name), s.attempt))
        .collect();
    second.shutdown().await?;
    result?;
    ensure!(
        resubmitted.is_empty(),
        "steps recorded succeeded before the crash were submitted again: {resubmitted:?}"
    );
    ensure!(
        specs.len() > submitted_at_crash,
        "the new driver submitted the remaining steps"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_engine_restart_mid_run_completes_without_rerunning_succeeded_steps()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let sqlite = Arc::new(SqliteStore::open(dir.path().join("shipinator.db")).await?);
    let store: Arc<dyn Store> = Arc::clone(&sqlite) as Arc<dyn Store>;
    let result = crash_and_take_over(store).await;
    sqlite.close().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_engine_restart_mid_run_completes_without_rerunning_succeeded_steps()
-> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking(TestCluster::shared)
        .await?
        .map_err(|e| anyhow!("{e}"))?;
    let url = cluster.create_database().await?;
    let pg = Arc::new(PgStore::connect(&url).await?);
    let store: Arc<dyn Store> = Arc::clone(&pg) as Arc<dyn Store>;
    let result = crash_and_take_over(store).await;
    pg.close().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_and_started_again_runs_complete() -> anyhow::Result<()> {
    // Its own cluster: stopping the shared one would break the other tests.
    let cluster = tokio::task::spawn_blocking(TestCluster::start)
        .await?
        .map_err(|e| anyhow!("{e}"))?;
    let url = cluster.create_database().await?;
    let pg = Arc::new(
        PgStore::connect_with(
            &url,
            PgStoreOptions::default()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(1)),
        )
        .await?,
    );
    let store: Arc<dyn Store> = Arc::clone(&pg) as Arc<dyn Store>;
    let executor = MockExecutor::new();
    executor.set_default(MockStep::succeed().with_duration(STEP_TIME));
    let driver = spawn(&store, &executor, config("driver", Duration::from_secs(10)));
    let runs = submit_runs(&store, &driver).await?;
    wait_for_progress(store.as_ref(), &runs).await?;
    let open_runs = unfinished(store.as_ref(), &runs).await?;
    ensure!(
        open_runs > 0,
        "every run had ended before the outage; nothing was tested"
    );

    tokio::task::block_in_place(|| cluster.stop_immediate()).map_err(|e| anyhow!("{e}"))?;
    // The outage lasts a few seconds while executions keep finishing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| cluster.start_again()).map_err(|e| anyhow!("{e}"))?;

    let result = assert_all_succeeded(store.as_ref(), &runs).await;
    let shutdown = driver.shutdown().await;
    pg.close().await;
    drop(cluster);
    result?;
    shutdown?;
    Ok(())
}
