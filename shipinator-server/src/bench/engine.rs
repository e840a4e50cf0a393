//! `shipinator bench engine`: runs of 6 steps in 3 stages, build (2 steps) → test (3 steps: 2
//! in a parallel group, then 1) → deploy (1 step, the Deployinator's single `helm upgrade`
//! step; a deploy stage always has exactly one), on the mock executor, whose steps finish at
//! once, against the chosen store. Prints one JSON line.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shipinator_core::config::{self, PipelineSpec};
use shipinator_core::domain::{
    JobType, Pipeline, PipelineId, Project, ProjectId, Repository, RepositoryId, RunStatus, Trigger,
};
use shipinator_core::driver::{Driver, DriverConfig};
use shipinator_core::executor::SourceSpec;
use shipinator_core::memory::{InMemoryArtifactStore, InMemoryStore, MockExecutor};
use shipinator_core::orchestrator::RunRequest;
use shipinator_core::store::Store;
use shipinator_core::time::Timestamp;
use tokio::sync::Semaphore;

use super::counting::CountingStore;
use super::{BenchStore, EngineArgs, rss};

const PIPELINE: &str = r#"
build:
  steps:
    - name: compile
      run: make build
      outputs:
        - type: binary
          path: bin/app
    - name: chart
      run: make chart
      outputs:
        - type: helm_chart
          path: dist/app.tgz
test:
  steps:
    - name: unit
      run: make test
      parallel: true
    - name: lint
      run: make lint
      parallel: true
    - name: e2e
      run: make e2e
deploy:
  artifact: helm_chart
  target: local
  namespace: bench
"#;

pub(crate) async fn run(args: &EngineArgs) -> anyhow::Result<serde_json::Value> {
    if args.runs == 0 || args.concurrency == 0 {
        bail!("--runs and --concurrency must be at least 1");
    }
    let spec: Arc<PipelineSpec> = Arc::new(
        config::parse("bench.shipinator.yaml", PIPELINE)
            .map_err(|e| anyhow::anyhow!("the benchmark pipeline is invalid: {e}"))?,
    );
    let mut wakeups = None;
    let inner: Arc<dyn Store> = match args.store.store {
        BenchStore::Memory => Arc::new(InMemoryStore::new()),
        BenchStore::Sqlite => {
            let path = args
                .store
                .database
                .as_deref()
                .context("--store sqlite needs --database PATH")?;
            Arc::new(
                shipinator_sqlite::SqliteStore::open(path)
                    .await
                    .with_context(|| format!("opening SQLite database {path}"))?,
            )
        }
        BenchStore::Postgres => {
            let url = args
                .store
                .database
                .as_deref()
                .context("--store postgres needs --database URL")?;
            let options = shipinator_postgres::PgStoreOptions::default().max_connections(8);
            let pg = shipinator_postgres::PgStore::connect_with(url, options)
                .await
                .context("connecting to PostgreSQL")?;
            wakeups = Some(
                pg.wakeups()
                    .await
                    .context("listening for PostgreSQL wake-ups")?,
            );
            Arc::new(pg)
        }
    };
    let pipeline_id = seed(&*inner).await?;
    let store = Arc::new(CountingStore::new(inner));
    let executor = MockExecutor::new().with_artifact_store(Arc::new(InMemoryArtifactStore::new()));
    let config = DriverConfig {
        max_runs: u32::try_from(args.concurrency.saturating_mul(2)).unwrap_or(u32::MAX),
        poll_interval: Duration::from_secs(60),
        ..DriverConfig::default()
    };
    let mut driver = Driver::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(executor),
        config,
    );
    if let Some(wakeups) = wakeups {
        driver = driver.with_wakeups(wakeups.into_stream());
    }
    let handle = driver.spawn();

    let baseline_rss = rss::current_rss_bytes();
    let sampler = rss::PeakSampler::start(Duration::from_millis(5));
    let commits_before = store.commits.load(Ordering::Relaxed);
    let transitions_before = store.transitions.load(Ordering::Relaxed);
    let permits = Arc::new(Semaphore::new(
        usize::try_from(args.concurrency).unwrap_or(usize::MAX),
    ));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.runs {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let handle = handle.clone();
        let request = RunRequest {
            pipeline_id,
            pipeline_name: "bench".to_owned(),
            project_name: "bench".to_owned(),
            spec: Arc::clone(&spec),
            source: SourceSpec {
                clone_url: "file:///dev/null".to_owned(),
                commit: format!("{i:040x}"),
                git_ref: "main".to_owned(),
                copy_working_tree: false,
            },
            branch: "main".to_owned(),
            default_branch: "main".to_owned(),
            trigger: Trigger::Manual,
            stages: Some(vec![JobType::Build, JobType::Test, JobType::Deploy]),
            requested_by: "bench".to_owned(),
        };
        tasks.spawn(async move {
            let _permit = permit;
            let id = handle.submit_run(request).await?;
            let run = handle.wait_for_run(id).await?;
            anyhow::Ok(run.status)
        });
        while let Some(done) = tasks.try_join_next() {
            check(done)?;
        }
    }
    while let Some(done) = tasks.join_next().await {
        check(done)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss = sampler.stop().await.max(baseline_rss);
    let commits = store.commits.load(Ordering::Relaxed) - commits_before;
    let transitions = store.transitions.load(Ordering::Relaxed) - transitions_before;
    handle.shutdown().await?;
    let steps_per_run = steps_per_run(&spec);
    Ok(serde_json::json!({
        "bench": "engine",
        "store": store.backend(),
        "runs": args.runs,
        "concurrency": args.concurrency,
        "steps": args.runs * steps_per_run,
        "transitions": transitions,
        "commits": commits,
        "transitions_per_commit": ratio(transitions as f64, commits as f64),
        "seconds": seconds,
        "runs_per_s": ratio(args.runs as f64, seconds),
        "transitions_per_s": ratio(transitions as f64, seconds),
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_bytes": peak_rss,
        "rss_per_in_flight_run_bytes": (peak_rss.saturating_sub(baseline_rss)) / args.concurrency.min(args.runs),
    }))
}

/// Creates the project, repository and pipeline every benchmark run belongs to (a store
/// refuses runs of an unknown pipeline).
async fn seed(store: &dyn Store) -> anyhow::Result<PipelineId> {
    let now = Timestamp::now();
    let project = Project {
        id: ProjectId::new_v7(),
        name: format!("bench-{}", PipelineId::new_v7()),
        description: None,
        created_at: now,
        updated_at: now,
    };
    let repository = Repository {
        id: RepositoryId::new_v7(),
        project_id: project.id,
        vcs_provider: "git".to_owned(),
        clone_url: "file:///dev/null".to_owned(),
        default_branch: "main".to_owned(),
        created_at: now,
        updated_at: now,
    };
    let pipeline = Pipeline {
        id: PipelineId::new_v7(),
        repository_id: repository.id,
        name: "bench".to_owned(),
        trigger_type: Trigger::Manual,
        source_spec: String::new(),
        created_at: now,
        updated_at: now,
    };
    store
        .create_project(&project)
        .await
        .context("creating the benchmark project")?;
    store
        .create_repository(&repository)
        .await
        .context("creating the benchmark repository")?;
    store
        .create_pipeline(&pipeline)
        .await
        .context("creating the benchmark pipeline")?;
    Ok(pipeline.id)
}

/// Steps in one run of `spec`: its build and test steps, and the deploy stage's one step.
fn steps_per_run(spec: &PipelineSpec) -> u64 {
    let steps = [JobType::Build, JobType::Test]
        .into_iter()
        .filter_map(|stage| spec.stage(stage))
        .map(|stage| stage.steps.len())
        .sum::<usize>()
        + usize::from(spec.deploy.is_some());
    steps as u64
}

fn check(done: Result<anyhow::Result<RunStatus>, tokio::task::JoinError>) -> anyhow::Result<()> {
    let status = done.context("a benchmark task panicked")??;
    if status != RunStatus::Success {
        bail!("a benchmark run ended {status}, expected success");
    }
    Ok(())
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}
