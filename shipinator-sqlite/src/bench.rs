//! Micro-benchmark helpers for `shipinator bench`: the store's transition rate and the
//! baseline it is held to, a plain loop of single-row commits with the same durability.

use std::path::Path;
use std::time::{Duration, Instant};

use shipinator_core::domain::{
    Job, JobId, JobStep, JobType, Pipeline, PipelineId, PipelineRun, Project, ProjectId,
    Repository, RepositoryId, RunId, RunPhase, RunStatus, Status, StepId, Trigger,
};
use shipinator_core::store::{Batch, NewRun, Store, StoreError, Write};
use shipinator_core::time::Timestamp;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{ConnectOptions, Connection};

use crate::error::{Error, Kind};
use crate::{SqliteStore, SqliteStoreOptions};

/// What a timed loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Commits made.
    pub commits: u32,
    /// Wall time they took.
    pub elapsed: Duration,
}

impl Measurement {
    /// Commits per second.
    pub fn per_second(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs <= 0.0 {
            return f64::INFINITY;
        }
        f64::from(self.commits) / secs
    }
}

/// The baseline: `commits` transactions of one single-row `UPDATE` each on a fresh database at
/// `path`, in WAL mode with the durability of `options`, through one connection.
///
/// # Errors
/// When the file cannot be created or a statement fails.
pub async fn baseline_commits(
    path: &Path,
    options: &SqliteStoreOptions,
    commits: u32,
) -> Result<Measurement, Error> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|source| Kind::CreateDir {
            path: parent.to_owned(),
            source,
        })?;
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(options.synchronous.pragma())
        .busy_timeout(options.busy_timeout)
        .connect()
        .await
        .map_err(|source| Kind::Open {
            path: path.to_owned(),
            source,
        })?;
    sqlx::query("CREATE TABLE IF NOT EXISTS bench (id INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
        .execute(&mut conn)
        .await?;
    sqlx::query("INSERT OR REPLACE INTO bench (id, n) VALUES (1, 0)")
        .execute(&mut conn)
        .await?;
    let start = Instant::now();
    for _ in 0..commits {
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query("UPDATE bench SET n = n + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let elapsed = start.elapsed();
    conn.close().await?;
    Ok(Measurement { commits, elapsed })
}

/// The store's rate: `commits` state transitions through [`Store::commit`], each one batch
/// that moves a step and its job forward compare-and-set (two updates), on a run created for
/// the purpose.
///
/// # Errors
/// Whatever the store returns.
pub async fn store_transitions(
    store: &SqliteStore,
    commits: u32,
) -> Result<Measurement, StoreError> {
    let now = store.now().await?;
    let project = Project {
        id: ProjectId::new_v7(),
        name: format!("bench-{}", uuid::Uuid::now_v7()),
        description: None,
        created_at: now,
        updated_at: now,
    };
    store.create_project(&project).await?;
    let repository = Repository {
        id: RepositoryId::new_v7(),
        project_id: project.id,
        vcs_provider: "git".to_owned(),
        clone_url: "file:///dev/null".to_owned(),
        default_branch: "main".to_owned(),
        created_at: now,
        updated_at: now,
    };
    store.create_repository(&repository).await?;
    let pipeline = Pipeline {
        id: PipelineId::new_v7(),
        repository_id: repository.id,
        name: "bench".to_owned(),
        trigger_type: Trigger::Manual,
        source_spec: String::new(),
        created_at: now,
        updated_at: now,
    };
    store.create_pipeline(&pipeline).await?;
    let run_id = RunId::new_v7();
    let job_id = JobId::derive(run_id, JobType::Build);
    let step_id = StepId::derive(job_id, 0);
    let new = NewRun {
        run: PipelineRun {
            id: run_id,
            pipeline_id: pipeline.id,
            git_ref: "main".to_owned(),
            git_sha: "0".repeat(40),
            status: RunStatus::Pending,
            phase: RunPhase::Submitted,
            trigger: Trigger::Manual,
            requested_stages: vec![JobType::Build],
            requested_by: "bench".to_owned(),
            resolved_spec: std::sync::Arc::new(serde_json::Value::Null),
            retry_of: None,
            version: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        },
        jobs: vec![Job {
            id: job_id,
            pipeline_run_id: run_id,
            job_type: JobType::Build,
            name: "build".to_owned(),
            status: Status::Pending,
            version: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        }],
        steps: vec![JobStep {
            id: step_id,
            job_id,
            name: "step".to_owned(),
            execution_order: 0,
            parallel_group: None,
            status: Status::Pending,
            attempt: 0,
            version: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        }],
    };
    store.create_run(&new).await?;
    let start = Instant::now();
    for i in 0..commits {
        let version = u64::from(i);
        let status = if i % 2 == 0 {
            Status::Running
        } else {
            Status::Pending
        };
        let at = Some(Timestamp::from_unix_micros(
            now.as_unix_micros() + i64::from(i),
        ));
        store
            .commit(&Batch {
                fences: Vec::new(),
                writes: vec![
                    Write::UpdateStep {
                        id: step_id,
                        expected_version: version,
                        status,
                        attempt: i,
                        started_at: at,
                        finished_at: None,
                    },
                    Write::UpdateJob {
                        id: job_id,
                        expected_version: version,
                        status,
                        started_at: at,
                        finished_at: None,
                    },
                ],
            })
            .await?;
    }
    Ok(Measurement {
        commits,
        elapsed: start.elapsed(),
    })
}
