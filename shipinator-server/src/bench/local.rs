//! `shipinator bench local --store sqlite --steps 40`: one run of N sequential `true` steps in
//! one stage, through the whole local stack (driver, store, local executor with its workspace,
//! pidfiles and logs), against the floor measured in the same process: spawning and waiting
//! for `sh -c true` plus two durable single-row commits on the same store. Prints one JSON line.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shipinator_core::config;
use shipinator_core::domain::{JobType, Project, ProjectId, RunStatus, Trigger};
use shipinator_core::driver::Driver;
use shipinator_core::executor::SourceSpec;
use shipinator_core::orchestrator::RunRequest;
use shipinator_core::store::{RunEvent, RunEventKind, Store};
use shipinator_core::time::Timestamp;
use shipinator_local::{DataDir, LocalExecutor};
use shipinator_nfs::{FsLogStore, NfsArtifactStore};

use super::counting::CountingStore;
use super::{BenchStore, LocalArgs};
use crate::local::ensure_pipeline;

/// Samples of the floor; the median is reported.
const FLOOR_SAMPLES: usize = 41;

pub(crate) async fn run(args: &LocalArgs) -> anyhow::Result<serde_json::Value> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let scratch = Scratch::new()?;
    let data = DataDir::new(scratch.0.join("data"));
    data.create_all()
        .with_context(|| format!("creating {}", data.root().display()))?;
    let source = scratch.0.join("source");
    std::fs::create_dir_all(&source)?;

    let inner: Arc<dyn Store> = match args.store.store {
        BenchStore::Memory => Arc::new(shipinator_core::memory::InMemoryStore::new()),
        BenchStore::Sqlite => {
            let path = args
                .store
                .database
                .as_ref()
                .map_or_else(|| data.state_db(), PathBuf::from);
            Arc::new(
                shipinator_sqlite::SqliteStore::open(&path)
                    .await
                    .with_context(|| format!("opening SQLite database {}", path.display()))?,
            )
        }
        BenchStore::Postgres => {
            let url = args
                .store
                .database
                .as_deref()
                .context("--store postgres needs --database URL")?;
            Arc::new(
                shipinator_postgres::PgStore::connect(url)
                    .await
                    .context("connecting to PostgreSQL")?,
            )
        }
    };
    let floor = floor(inner.as_ref()).await?;

    let artifacts = Arc::new(NfsArtifactStore::new(data.artifacts())?);
    let logs = Arc::new(FsLogStore::new(data.root())?);
    let executor = LocalExecutor::builder(data.root())
        .artifact_store(artifacts)
        .log_store(logs)
        .build()
        .context("starting the local executor")?;
    let spec = Arc::new(
        config::parse(config::FILE_NAME, &pipeline(args.steps))
            .map_err(|e| anyhow::anyhow!("the benchmark pipeline is invalid: {e}"))?,
    );
    let (project, pipeline) = ensure_pipeline(
        inner.as_ref(),
        &format!("bench-local-{}", ProjectId::new_v7()),
        &source.display().to_string(),
        "main",
        config::FILE_NAME,
        "",
    )
    .await?;
    let store = Arc::new(CountingStore::new(inner));
    let handle = Driver::new(
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::new(executor),
        crate::cli::run::driver_config(),
    )
    .spawn();
    let request = RunRequest {
        pipeline_id: pipeline.id,
        pipeline_name: pipeline.name.clone(),
        project_name: project.name.clone(),
        spec,
        source: SourceSpec {
            clone_url: source.display().to_string(),
            commit: String::new(),
            git_ref: "main".to_owned(),
            copy_working_tree: true,
        },
        branch: "main".to_owned(),
        default_branch: "main".to_owned(),
        trigger: Trigger::Manual,
        stages: Some(vec![JobType::Build]),
        requested_by: "bench".to_owned(),
    };
    let mut events = handle.subscribe();
    let commits_before = store.commits.load(Ordering::Relaxed);
    let started = Instant::now();
    let id = handle.submit_run(request).await?;
    // The run's committed terminal event ends the clock (`wait_for_run` may add a poll
    // interval to what is measured).
    let status = loop {
        match events.recv().await {
            Ok(RunEvent {
                run_id,
                kind: RunEventKind::RunChanged { status, .. },
                ..
            }) if run_id == id && status.is_terminal() => break status,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => bail!("the engine stopped during the benchmark: {e}"),
        }
    };
    let total = started.elapsed();
    let commits = store.commits.load(Ordering::Relaxed) - commits_before;
    handle.shutdown().await.ok();
    if status != RunStatus::Success {
        bail!("the benchmark run ended {status}, expected success");
    }
    let steps = f64::from(args.steps);
    let total_ms = ms(total);
    let per_step_ms = total_ms / steps;
    let floor_ms = ms(floor.spawn) + 2.0 * ms(floor.commit);
    Ok(serde_json::json!({
        "bench": "local",
        "store": store.backend(),
        "steps": args.steps,
        "total_ms": round(total_ms),
        "per_step_ms": round(per_step_ms),
        "floor_ms": round(floor_ms),
        "floor_spawn_ms": round(ms(floor.spawn)),
        "floor_commit_ms": round(ms(floor.commit)),
        "ratio": round(per_step_ms / floor_ms),
        "commits_per_step": round(commits as f64 / steps),
    }))
}

/// A pipeline of `steps` sequential `true` steps in the build stage.
fn pipeline(steps: u32) -> String {
    let mut text = String::from("build:\n  steps:\n");
    for i in 0..steps {
        text.push_str(&format!("    - name: s{i}\n      run: 'true'\n"));
    }
    text
}

#[derive(Debug)]
struct Floor {
    spawn: Duration,
    commit: Duration,
}

/// Medians of spawning `sh -c true` and of one durable single-row commit on `store`.
async fn floor(store: &dyn Store) -> anyhow::Result<Floor> {
    let mut spawns = Vec::with_capacity(FLOOR_SAMPLES);
    let mut commits = Vec::with_capacity(FLOOR_SAMPLES);
    for _ in 0..FLOOR_SAMPLES {
        let t = Instant::now();
        let status = tokio::process::Command::new("sh")
            .args(["-c", "true"])
            .status()
            .await
            .context("spawning sh -c true")?;
        spawns.push(t.elapsed());
        if !status.success() {
            bail!("sh -c true failed: {status}");
        }
        let now = Timestamp::now();
        let project = Project {
            id: ProjectId::new_v7(),
            name: format!("bench-floor-{}", ProjectId::new_v7()),
            description: None,
            created_at: now,
            updated_at: now,
        };
        let t = Instant::now();
        store
            .create_project(&project)
            .await
            .context("committing a row")?;
        commits.push(t.elapsed());
    }
    Ok(Floor {
        spawn: median(&mut spawns),
        commit: median(&mut commits),
    })
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "shipinator-bench-local-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
