//! Several drivers sharing one PostgreSQL database: a run one driver cannot take is picked up
//! by another, woken by the database's announcements (or its at-most-one-second poll), not by
//! its own claim interval.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, ensure};
use shipinator_core::config::{PipelineSpec, StageSpec, StepSpec, Triggers};
use shipinator_core::conformance::store::fixture;
use shipinator_core::domain::{PipelineId, RunStatus, Status, Trigger};
use shipinator_core::driver::{Driver, DriverConfig, DriverHandle};
use shipinator_core::executor::SourceSpec;
use shipinator_core::memory::MockExecutor;
use shipinator_core::orchestrator::RunRequest;
use shipinator_core::store::Store;
use shipinator_postgres::PgStore;
use shipinator_postgres::testing::TestCluster;

/// Upper bound for any wait; exceeding it fails the test instead of hanging.
const BOUND: Duration = Duration::from_secs(120);

/// Longer than the test: a driver that claims only on this interval never claims in it.
const NEVER: Duration = Duration::from_secs(24 * 3600);

fn request(pipeline_id: PipelineId) -> RunRequest {
    let step = |name: &str| StepSpec {
        name: name.to_owned(),
        run: format!("make {name}"),
        image: None,
        env: BTreeMap::new(),
        timeout: None,
        workdir: None,
        outputs: Vec::new(),
        parallel_group: None,
    };
    RunRequest {
        pipeline_id,
        pipeline_name: "app".to_owned(),
        project_name: "demo".to_owned(),
        spec: Arc::new(PipelineSpec {
            triggers: Triggers::default(),
            build: Some(StageSpec {
                image: None,
                env: BTreeMap::new(),
                steps: vec![step("compile"), step("package")],
            }),
            test: None,
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
        trigger: Trigger::Manual,
        stages: None,
        requested_by: "test".to_owned(),
    }
}

fn config(owner: &str, max_runs: u32) -> DriverConfig {
    DriverConfig {
        owner: owner.to_owned(),
        claim_interval: NEVER,
        poll_interval: Duration::from_millis(200),
        max_runs,
        ..DriverConfig::default()
    }
}

async fn wait(driver: &DriverHandle, run: shipinator_core::domain::RunId) -> anyhow::Result<()> {
    let finished = tokio::time::timeout(BOUND, driver.wait_for_run(run))
        .await
        .map_err(|_| anyhow!("run {run} did not end within {BOUND:?}"))??;
    ensure!(
        finished.status == RunStatus::Success,
        "run {run} ended {}",
        finished.status
    );
    Ok(())
}

async fn two_drivers(pg: &Arc<PgStore>) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::clone(pg) as Arc<dyn Store>;
    let fx = fixture(store.as_ref()).await;
    let executor = MockExecutor::new();
    // B claims only when woken: its claim interval outlasts the test.
    let b = Driver::new(
        Arc::clone(&store),
        Arc::new(executor.clone()),
        config("b", 100),
    )
    .with_wakeups(pg.wakeups().await?.into_stream())
    .spawn();
    // A takes no run at all (and is never woken).
    let a = Driver::new(
        Arc::clone(&store),
        Arc::new(executor.clone()),
        config("a", 0),
    )
    .spawn();

    // A run of B's own first: once it ended, B's claims at start and on its own submission
    // are behind it, and only a wake-up makes B claim again.
    let own = b.submit_run(request(fx.pipeline.id)).await?;
    wait(&b, own).await.context("B's own run")?;

    let run = a.submit_run(request(fx.pipeline.id)).await?;
    let result = wait(&b, run).await.context("the run submitted through A");
    let record = store.load_run(run).await?;
    a.shutdown().await?;
    b.shutdown().await?;
    result?;
    ensure!(
        record.steps.iter().all(|s| s.status == Status::Succeeded),
        "every step of the run succeeded: {:?}",
        record.steps
    );
    ensure!(
        executor.specs().iter().filter(|s| s.run_id == run).count() == 2,
        "B executed both steps of the run once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_run_one_driver_cannot_take_is_claimed_by_another_on_a_wakeup()
-> anyhow::Result<()> {
    let cluster = tokio::task::spawn_blocking(TestCluster::shared)
        .await?
        .map_err(|e| anyhow!("{e}"))?;
    let url = cluster.create_database().await?;
    let pg = Arc::new(PgStore::connect(&url).await?);
    let result = two_drivers(&pg).await;
    pg.close().await;
    result
}
