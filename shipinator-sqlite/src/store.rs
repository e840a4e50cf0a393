//! The [`Store`] implementation.

use std::collections::HashMap;
use std::time::Duration;

use shipinator_core::domain::{
    ApiTokenId, Artifact, ArtifactId, Execution, ExecutionId, Job, JobId, JobStep, Pipeline,
    PipelineId, PipelineRun, Project, ProjectId, Repository, RepositoryId, RunId, StepId,
};
use shipinator_core::store::{
    ApiToken, Batch, ExecutionClaim, IdempotencyRecord, NewRun, Page, PageRequest, RunEvent,
    RunFilter, RunLease, RunRecord, Store, StoreError, StoredEvent, Write,
};
use shipinator_core::time::Timestamp;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Sqlite, Transaction};

use crate::error::Error;
use crate::rows::{
    self, artifact_columns, execution_columns, int, job_columns, micros, micros_opt,
    pipeline_columns, project_columns, repository_columns, run_columns, stage_order, step_columns,
};
use crate::{BACKEND, SqliteStore};

/// Maps a query error with no row to name.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    Error::from(e).into()
}

/// Maps a query error about the row `what` `id` (constraint violations name it).
pub(crate) fn db_row(
    what: &'static str,
    id: impl ToString,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| Error::from(e).into_store(what, id)
}

fn decode<T>(
    rows: &[SqliteRow],
    f: fn(&SqliteRow) -> Result<T, Error>,
) -> Result<Vec<T>, StoreError> {
    rows.iter()
        .map(|r| f(r).map_err(StoreError::from))
        .collect()
}

/// The cursor of a page request as canonical UUID text.
fn cursor(page: &PageRequest) -> Result<Option<String>, StoreError> {
    page.cursor
        .as_deref()
        .map(|c| {
            uuid::Uuid::try_parse(c)
                .map(|u| u.to_string())
                .map_err(|_| StoreError::Invalid {
                    message: format!(
                        "invalid page cursor '{}': pass the next_cursor of a previous page",
                        c.chars().take(64).collect::<String>()
                    ),
                })
        })
        .transpose()
}

/// Builds a page from `limit + 1` rows fetched in descending id order.
fn page<T>(mut items: Vec<T>, limit: u32, id: impl Fn(&T) -> String) -> Page<T> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(id)
    } else {
        None
    };
    Page { items, next_cursor }
}

pub(crate) async fn begin_write(
    pool: &SqlitePool,
) -> Result<Transaction<'static, Sqlite>, StoreError> {
    pool.begin_with("BEGIN IMMEDIATE").await.map_err(db)
}

fn expires(now: Timestamp, ttl: Duration) -> i64 {
    micros(now.saturating_add(ttl))
}

impl SqliteStore {
    fn now_ts(&self) -> Timestamp {
        (self.clock)()
    }

    async fn fetch_one_opt<T>(
        &self,
        sql: &'static str,
        id: String,
        f: fn(&SqliteRow) -> Result<T, Error>,
    ) -> Result<Option<T>, StoreError> {
        let row = sqlx::query(sql)
            .bind(id)
            .fetch_optional(&self.reader)
            .await
            .map_err(db)?;
        row.as_ref().map(f).transpose().map_err(StoreError::from)
    }
}

/// Applies one batch inside `tx`; returns nothing, the caller commits.
async fn apply_batch(conn: &mut SqliteConnection, batch: &Batch) -> Result<(), StoreError> {
    for fence in &batch.fences {
        let current: Option<i64> =
            sqlx::query_scalar("SELECT lease_epoch FROM pipeline_runs WHERE id = ?1")
                .bind(fence.run_id.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?;
        let Some(current) = current else {
            return Err(StoreError::not_found(RunId::WHAT, fence.run_id));
        };
        let current = u64::try_from(current).unwrap_or(0);
        if current != fence.epoch {
            return Err(StoreError::Fenced {
                run_id: fence.run_id,
                epoch: fence.epoch,
                current,
            });
        }
    }

    // An identical replay of a whole batch must not append its events twice: when every
    // row write of the batch turns out to be a no-op, its events are dropped too.
    let mut row_writes = 0usize;
    let mut changed = false;
    let mut events: Vec<&RunEvent> = Vec::new();
    for write in &batch.writes {
        match write {
            Write::AppendEvent(event) => events.push(event),
            Write::UpdateRun {
                id,
                expected_version,
                status,
                phase,
                started_at,
                finished_at,
            } => {
                row_writes += 1;
                let done = sqlx::query(
                    "UPDATE pipeline_runs SET status = ?1, phase = ?2, started_at = ?3, \
                     finished_at = ?4, version = version + 1 WHERE id = ?5 AND version = ?6",
                )
                .bind(status.as_str())
                .bind(phase.as_str())
                .bind(micros_opt(*started_at))
                .bind(micros_opt(*finished_at))
                .bind(id.to_string())
                .bind(int(*expected_version))
                .execute(&mut *conn)
                .await
                .map_err(db_row(RunId::WHAT, id))?;
                if done.rows_affected() == 1 {
                    changed = true;
                    continue;
                }
                let row = sqlx::query(concat!(
                    "SELECT ",
                    run_columns!(),
                    " FROM pipeline_runs WHERE id = ?1"
                ))
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?
                .ok_or_else(|| StoreError::not_found(RunId::WHAT, id))?;
                let stored = rows::run(&row)?;
                if stored.status != *status
                    || stored.phase != *phase
                    || stored.started_at != *started_at
                    || stored.finished_at != *finished_at
                {
                    return Err(conflict(RunId::WHAT, id, *expected_version, stored.version));
                }
            }
            Write::UpdateJob {
                id,
                expected_version,
                status,
                started_at,
                finished_at,
            } => {
                row_writes += 1;
                let done = sqlx::query(
                    "UPDATE jobs SET status = ?1, started_at = ?2, finished_at = ?3, \
                     version = version + 1 WHERE id = ?4 AND version = ?5",
                )
                .bind(status.as_str())
                .bind(micros_opt(*started_at))
                .bind(micros_opt(*finished_at))
                .bind(id.to_string())
                .bind(int(*expected_version))
                .execute(&mut *conn)
                .await
                .map_err(db_row(JobId::WHAT, id))?;
                if done.rows_affected() == 1 {
                    changed = true;
                    continue;
                }
                let row = sqlx::query(concat!(
                    "SELECT ",
                    job_columns!(),
                    " FROM jobs WHERE id = ?1"
                ))
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?
                .ok_or_else(|| StoreError::not_found(JobId::WHAT, id))?;
                let stored = rows::job(&row)?;
                if stored.status != *status
                    || stored.started_at != *started_at
                    || stored.finished_at != *finished_at
                {
                    return Err(conflict(JobId::WHAT, id, *expected_version, stored.version));
                }
            }
            Write::UpdateStep {
                id,
                expected_version,
                status,
                attempt,
                started_at,
                finished_at,
            } => {
                row_writes += 1;
                let done = sqlx::query(
                    "UPDATE job_steps SET status = ?1, attempt = ?2, started_at = ?3, \
                     finished_at = ?4, version = version + 1 WHERE id = ?5 AND version = ?6",
                )
                .bind(status.as_str())
                .bind(i64::from(*attempt))
                .bind(micros_opt(*started_at))
                .bind(micros_opt(*finished_at))
                .bind(id.to_string())
                .bind(int(*expected_version))
                .execute(&mut *conn)
                .await
                .map_err(db_row(StepId::WHAT, id))?;
                if done.rows_affected() == 1 {
                    changed = true;
                    continue;
                }
                let row = sqlx::query(concat!(
                    "SELECT ",
                    step_columns!(),
                    " FROM job_steps WHERE id = ?1"
                ))
                .bind(id.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?
                .ok_or_else(|| StoreError::not_found(StepId::WHAT, id))?;
                let stored = rows::step(&row)?;
                if stored.status != *status
                    || stored.attempt != *attempt
                    || stored.started_at != *started_at
                    || stored.finished_at != *finished_at
                {
                    return Err(conflict(
                        StepId::WHAT,
                        id,
                        *expected_version,
                        stored.version,
                    ));
                }
            }
            Write::UpdateExecution {
                id,
                expected_version,
                status,
                external_id,
                exit_code,
                failure,
                completed_at,
            } => {
                row_writes += 1;
                let done = sqlx::query(
                    "UPDATE executions SET status = ?1, external_id = ?2, exit_code = ?3, \
                     failure = ?4, completed_at = ?5, version = version + 1 \
                     WHERE id = ?6 AND version = ?7",
                )
                .bind(status.as_str())
                .bind(external_id.as_str())
                .bind(exit_code.map(i64::from))
                .bind(failure.as_deref())
                .bind(micros_opt(*completed_at))
                .bind(id.to_string())
                .bind(int(*expected_version))
                .execute(&mut *conn)
                .await
                .map_err(db_row(ExecutionId::WHAT, id))?;
                if done.rows_affected() == 1 {
                    changed = true;
                    continue;
                }
                let stored = load_execution(conn, *id)
                    .await?
                    .ok_or_else(|| StoreError::not_found(ExecutionId::WHAT, id))?;
                if stored.status != *status
                    || stored.external_id != *external_id
                    || stored.exit_code != *exit_code
                    || stored.failure != *failure
                    || stored.completed_at != *completed_at
                {
                    return Err(conflict(
                        ExecutionId::WHAT,
                        id,
                        *expected_version,
                        stored.version,
                    ));
                }
            }
            Write::InsertExecution(execution) => {
                row_writes += 1;
                if insert_execution(conn, execution).await? {
                    changed = true;
                    continue;
                }
                let stored = load_execution(conn, execution.id)
                    .await?
                    .ok_or_else(|| StoreError::not_found(ExecutionId::WHAT, execution.id))?;
                if stored != *execution {
                    return Err(StoreError::AlreadyExists {
                        what: ExecutionId::WHAT,
                        id: execution.id.to_string(),
                    });
                }
            }
            Write::InsertArtifact(artifact) => {
                row_writes += 1;
                if insert_artifact(conn, artifact).await? {
                    changed = true;
                    continue;
                }
                let row = sqlx::query(concat!(
                    "SELECT ",
                    artifact_columns!(),
                    " FROM artifacts WHERE id = ?1"
                ))
                .bind(artifact.id.to_string())
                .fetch_optional(&mut *conn)
                .await
                .map_err(db)?
                .ok_or_else(|| StoreError::not_found(ArtifactId::WHAT, artifact.id))?;
                if rows::artifact(&row)? != *artifact {
                    return Err(StoreError::AlreadyExists {
                        what: ArtifactId::WHAT,
                        id: artifact.id.to_string(),
                    });
                }
            }
        }
    }

    if row_writes == 0 || changed {
        for event in events {
            let payload = serde_json::to_string(&event.kind)
                .map_err(|e| StoreError::from(Error::encode("event", e)))?;
            sqlx::query("INSERT INTO run_events (run_id, at, kind) VALUES (?1, ?2, ?3)")
                .bind(event.run_id.to_string())
                .bind(micros(event.at))
                .bind(payload)
                .execute(&mut *conn)
                .await
                .map_err(db_row("event of run", event.run_id))?;
        }
    }
    Ok(())
}

fn conflict(what: &'static str, id: impl ToString, expected: u64, found: u64) -> StoreError {
    StoreError::Conflict {
        what,
        id: id.to_string(),
        expected,
        found,
    }
}

async fn load_execution(
    conn: &mut SqliteConnection,
    id: ExecutionId,
) -> Result<Option<Execution>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        execution_columns!(),
        " FROM executions WHERE id = ?1"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut *conn)
    .await
    .map_err(db)?;
    row.as_ref()
        .map(rows::execution)
        .transpose()
        .map_err(StoreError::from)
}

/// Inserts unless the id is taken; returns whether a row was inserted.
async fn insert_execution(conn: &mut SqliteConnection, e: &Execution) -> Result<bool, StoreError> {
    let done = sqlx::query(concat!(
        "INSERT INTO executions (",
        execution_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (id) DO NOTHING"
    ))
    .bind(e.id.to_string())
    .bind(e.job_step_id.to_string())
    .bind(i64::from(e.attempt))
    .bind(e.executor_type.as_str())
    .bind(e.external_id.as_str())
    .bind(e.status.as_str())
    .bind(e.exit_code.map(i64::from))
    .bind(e.failure.as_deref())
    .bind(int(e.version))
    .bind(micros(e.submitted_at))
    .bind(micros_opt(e.completed_at))
    .execute(&mut *conn)
    .await
    .map_err(db_row(ExecutionId::WHAT, e.id))?;
    Ok(done.rows_affected() == 1)
}

/// Inserts unless the id is taken; returns whether a row was inserted.
async fn insert_artifact(conn: &mut SqliteConnection, a: &Artifact) -> Result<bool, StoreError> {
    let metadata = serde_json::to_string(&a.metadata)
        .map_err(|e| StoreError::from(Error::encode("artifact metadata", e)))?;
    let done = sqlx::query(concat!(
        "INSERT INTO artifacts (",
        artifact_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) \
         ON CONFLICT (id) DO NOTHING"
    ))
    .bind(a.id.to_string())
    .bind(a.job_id.to_string())
    .bind(a.step_id.map(|s| s.to_string()))
    .bind(a.run_id.to_string())
    .bind(a.artifact_type.as_str())
    .bind(a.name.as_deref())
    .bind(a.path.as_deref())
    .bind(a.storage_backend.as_str())
    .bind(a.storage_path.as_str())
    .bind(a.checksum.as_deref())
    .bind(int(a.size))
    .bind(metadata)
    .bind(micros(a.created_at))
    .execute(&mut *conn)
    .await
    .map_err(db_row(ArtifactId::WHAT, a.id))?;
    Ok(done.rows_affected() == 1)
}

async fn insert_new_run(conn: &mut SqliteConnection, new: &NewRun) -> Result<(), StoreError> {
    let run = &new.run;
    let spec = serde_json::to_string(&run.resolved_spec)
        .map_err(|e| StoreError::from(Error::encode("resolved spec", e)))?;
    sqlx::query(concat!(
        "INSERT INTO pipeline_runs (",
        run_columns!(),
        ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))
    .bind(run.id.to_string())
    .bind(run.pipeline_id.to_string())
    .bind(run.git_ref.as_str())
    .bind(run.git_sha.as_str())
    .bind(run.status.as_str())
    .bind(run.phase.as_str())
    .bind(run.trigger.as_str())
    .bind(rows::stages_json(&run.requested_stages))
    .bind(run.requested_by.as_str())
    .bind(spec)
    .bind(run.retry_of.map(|r| r.to_string()))
    .bind(int(run.version))
    .bind(micros(run.created_at))
    .bind(micros_opt(run.started_at))
    .bind(micros_opt(run.finished_at))
    .execute(&mut *conn)
    .await
    .map_err(db_row(RunId::WHAT, run.id))?;
    for job in &new.jobs {
        sqlx::query(concat!(
            "INSERT INTO jobs (",
            job_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ))
        .bind(job.id.to_string())
        .bind(job.pipeline_run_id.to_string())
        .bind(job.job_type.as_str())
        .bind(job.name.as_str())
        .bind(job.status.as_str())
        .bind(int(job.version))
        .bind(micros(job.created_at))
        .bind(micros_opt(job.started_at))
        .bind(micros_opt(job.finished_at))
        .execute(&mut *conn)
        .await
        .map_err(db_row(JobId::WHAT, job.id))?;
    }
    for step in &new.steps {
        sqlx::query(concat!(
            "INSERT INTO job_steps (",
            step_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
        ))
        .bind(step.id.to_string())
        .bind(step.job_id.to_string())
        .bind(step.name.as_str())
        .bind(i64::from(step.execution_order))
        .bind(step.parallel_group.as_deref())
        .bind(step.status.as_str())
        .bind(i64::from(step.attempt))
        .bind(int(step.version))
        .bind(micros(step.created_at))
        .bind(micros_opt(step.started_at))
        .bind(micros_opt(step.finished_at))
        .execute(&mut *conn)
        .await
        .map_err(db_row(StepId::WHAT, step.id))?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn now(&self) -> Result<Timestamp, StoreError> {
        Ok(self.now_ts())
    }

    async fn create_project(&self, project: &Project) -> Result<(), StoreError> {
        let mut tx = begin_write(&self.writer).await?;
        let taken: Option<String> = sqlx::query_scalar("SELECT id FROM projects WHERE name = ?1")
            .bind(project.name.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db)?;
        if taken.is_some() {
            return Err(StoreError::AlreadyExists {
                what: ProjectId::WHAT,
                id: project.name.clone(),
            });
        }
        sqlx::query(concat!(
            "INSERT INTO projects (",
            project_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5)"
        ))
        .bind(project.id.to_string())
        .bind(project.name.as_str())
        .bind(project.description.as_deref())
        .bind(micros(project.created_at))
        .bind(micros(project.updated_at))
        .execute(&mut *tx)
        .await
        .map_err(db_row(ProjectId::WHAT, project.id))?;
        tx.commit().await.map_err(db)
    }

    async fn get_project(&self, id: ProjectId) -> Result<Project, StoreError> {
        self.fetch_one_opt(
            concat!(
                "SELECT ",
                project_columns!(),
                " FROM projects WHERE id = ?1"
            ),
            id.to_string(),
            rows::project,
        )
        .await?
        .ok_or_else(|| StoreError::not_found(ProjectId::WHAT, id))
    }

    async fn get_project_by_name(&self, name: &str) -> Result<Project, StoreError> {
        self.fetch_one_opt(
            concat!(
                "SELECT ",
                project_columns!(),
                " FROM projects WHERE name = ?1"
            ),
            name.to_owned(),
            rows::project,
        )
        .await?
        .ok_or_else(|| StoreError::not_found(ProjectId::WHAT, name))
    }

    async fn list_projects(&self, req: &PageRequest) -> Result<Page<Project>, StoreError> {
        let limit = req.clamped_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            project_columns!(),
            " FROM projects WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2"
        ))
        .bind(cursor(req)?)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        Ok(page(decode(&rows, rows::project)?, limit, |p| {
            p.id.to_string()
        }))
    }

    async fn create_repository(&self, repository: &Repository) -> Result<(), StoreError> {
        let r = repository;
        sqlx::query(concat!(
            "INSERT INTO repositories (",
            repository_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ))
        .bind(r.id.to_string())
        .bind(r.project_id.to_string())
        .bind(r.vcs_provider.as_str())
        .bind(r.clone_url.as_str())
        .bind(r.default_branch.as_str())
        .bind(micros(r.created_at))
        .bind(micros(r.updated_at))
        .execute(&self.writer)
        .await
        .map_err(db_row(RepositoryId::WHAT, r.id))?;
        Ok(())
    }

    async fn get_repository(&self, id: RepositoryId) -> Result<Repository, StoreError> {
        self.fetch_one_opt(
            concat!(
                "SELECT ",
                repository_columns!(),
                " FROM repositories WHERE id = ?1"
            ),
            id.to_string(),
            rows::repository,
        )
        .await?
        .ok_or_else(|| StoreError::not_found(RepositoryId::WHAT, id))
    }

    async fn list_repositories(
        &self,
        project: Option<ProjectId>,
        req: &PageRequest,
    ) -> Result<Page<Repository>, StoreError> {
        let limit = req.clamped_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            repository_columns!(),
            " FROM repositories WHERE (?1 IS NULL OR id < ?1) AND (?2 IS NULL OR project_id = ?2) \
             ORDER BY id DESC LIMIT ?3"
        ))
        .bind(cursor(req)?)
        .bind(project.map(|p| p.to_string()))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        Ok(page(decode(&rows, rows::repository)?, limit, |r| {
            r.id.to_string()
        }))
    }

    async fn create_pipeline(&self, pipeline: &Pipeline) -> Result<(), StoreError> {
        let p = pipeline;
        sqlx::query(concat!(
            "INSERT INTO pipelines (",
            pipeline_columns!(),
            ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
        ))
        .bind(p.id.to_string())
        .bind(p.repository_id.to_string())
        .bind(p.name.as_str())
        .bind(p.trigger_type.as_str())
        .bind(p.source_spec.as_str())
        .bind(micros(p.created_at))
        .bind(micros(p.updated_at))
        .execute(&self.writer)
        .await
        .map_err(db_row(PipelineId::WHAT, p.id))?;
        Ok(())
    }

    async fn get_pipeline(&self, id: PipelineId) -> Result<Pipeline, StoreError> {
        self.fetch_one_opt(
            concat!(
                "SELECT ",
                pipeline_columns!(),
                " FROM pipelines WHERE id = ?1"
            ),
            id.to_string(),
            rows::pipeline,
        )
        .await?
        .ok_or_else(|| StoreError::not_found(PipelineId::WHAT, id))
    }

    async fn list_pipelines(
        &self,
        repository: Option<RepositoryId>,
        req: &PageRequest,
    ) -> Result<Page<Pipeline>, StoreError> {
        let limit = req.clamped_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            pipeline_columns!(),
            " FROM pipelines WHERE (?1 IS NULL OR id < ?1) AND (?2 IS NULL OR repository_id = ?2) \
             ORDER BY id DESC LIMIT ?3"
        ))
        .bind(cursor(req)?)
        .bind(repository.map(|r| r.to_string()))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        Ok(page(decode(&rows, rows::pipeline)?, limit, |p| {
            p.id.to_string()
        }))
    }

    async fn create_run(&self, run: &NewRun) -> Result<(), StoreError> {
        let mut tx = begin_write(&self.writer).await?;
        insert_new_run(&mut tx, run).await?;
        tx.commit().await.map_err(db)
    }

    async fn get_run(&self, id: RunId) -> Result<PipelineRun, StoreError> {
        self.fetch_one_opt(
            concat!(
                "SELECT ",
                run_columns!(),
                " FROM pipeline_runs WHERE id = ?1"
            ),
            id.to_string(),
            rows::run,
        )
        .await?
        .ok_or_else(|| StoreError::not_found(RunId::WHAT, id))
    }

    async fn load_run(&self, id: RunId) -> Result<RunRecord, StoreError> {
        // One read transaction: a consistent snapshot of the run.
        let mut tx = self.reader.begin().await.map_err(db)?;
        let key = id.to_string();
        let run = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM pipeline_runs WHERE id = ?1"
        ))
        .bind(key.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::not_found(RunId::WHAT, id))?;
        let run = rows::run(&run)?;
        let jobs = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE pipeline_run_id = ?1 ORDER BY ",
            stage_order!(),
            ", id"
        ))
        .bind(key.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let jobs = decode(&jobs, rows::job)?;
        let steps = sqlx::query(concat!(
            "SELECT ",
            step_columns!(),
            " FROM job_steps WHERE job_id IN (SELECT id FROM jobs WHERE pipeline_run_id = ?1)"
        ))
        .bind(key.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut steps = decode(&steps, rows::step)?;
        let job_pos: HashMap<JobId, usize> =
            jobs.iter().enumerate().map(|(i, j)| (j.id, i)).collect();
        steps.sort_by_key(|s| (job_pos.get(&s.job_id).copied(), s.execution_order, s.id));
        let executions = sqlx::query(concat!(
            "SELECT ",
            execution_columns!(),
            " FROM executions WHERE job_step_id IN (SELECT s.id FROM job_steps s \
             JOIN jobs j ON j.id = s.job_id WHERE j.pipeline_run_id = ?1)"
        ))
        .bind(key.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let mut executions = decode(&executions, rows::execution)?;
        let step_pos: HashMap<StepId, usize> =
            steps.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
        executions.sort_by_key(|e| (step_pos.get(&e.job_step_id).copied(), e.attempt, e.id));
        let artifacts = sqlx::query(concat!(
            "SELECT ",
            artifact_columns!(),
            " FROM artifacts WHERE run_id = ?1 ORDER BY created_at, id"
        ))
        .bind(key.as_str())
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let artifacts = decode(&artifacts, rows::artifact)?;
        tx.commit().await.map_err(db)?;
        Ok(RunRecord {
            run,
            jobs,
            steps,
            executions,
            artifacts,
        })
    }

    async fn list_runs(
        &self,
        filter: &RunFilter,
        req: &PageRequest,
    ) -> Result<Page<PipelineRun>, StoreError> {
        let limit = req.clamped_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            run_columns!(),
            " FROM pipeline_runs WHERE (?1 IS NULL OR id < ?1) \
             AND (?2 IS NULL OR pipeline_id = ?2) AND (?3 IS NULL OR status = ?3) \
             AND (?4 IS NULL OR git_ref = ?4) AND (?5 IS NULL OR \"trigger\" = ?5) \
             ORDER BY id DESC LIMIT ?6"
        ))
        .bind(cursor(req)?)
        .bind(filter.pipeline_id.map(|p| p.to_string()))
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.git_ref.as_deref())
        .bind(filter.trigger.map(|t| t.as_str()))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        Ok(page(decode(&rows, rows::run)?, limit, |r| r.id.to_string()))
    }

    async fn list_jobs(&self, run: RunId) -> Result<Vec<Job>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            job_columns!(),
            " FROM jobs WHERE pipeline_run_id = ?1 ORDER BY ",
            stage_order!(),
            ", id"
        ))
        .bind(run.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        decode(&rows, rows::job)
    }

    async fn list_steps(&self, job: JobId) -> Result<Vec<JobStep>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            step_columns!(),
            " FROM job_steps WHERE job_id = ?1 ORDER BY execution_order, id"
        ))
        .bind(job.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        decode(&rows, rows::step)
    }

    async fn list_executions(&self, step: StepId) -> Result<Vec<Execution>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            execution_columns!(),
            " FROM executions WHERE job_step_id = ?1 ORDER BY attempt, id"
        ))
        .bind(step.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        decode(&rows, rows::execution)
    }

    async fn get_execution(&self, id: ExecutionId) -> Result<Execution, StoreError> {
        self.fetch_one_opt(
            concat!(
                "SELECT ",
                execution_columns!(),
                " FROM executions WHERE id = ?1"
            ),
            id.to_string(),
            rows::execution,
        )
        .await?
        .ok_or_else(|| StoreError::not_found(ExecutionId::WHAT, id))
    }

    async fn get_artifact(&self, id: ArtifactId) -> Result<Artifact, StoreError> {
        self.fetch_one_opt(
            concat!(
                "SELECT ",
                artifact_columns!(),
                " FROM artifacts WHERE id = ?1"
            ),
            id.to_string(),
            rows::artifact,
        )
        .await?
        .ok_or_else(|| StoreError::not_found(ArtifactId::WHAT, id))
    }

    async fn list_artifacts(&self, run: RunId) -> Result<Vec<Artifact>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            artifact_columns!(),
            " FROM artifacts WHERE run_id = ?1 ORDER BY created_at, id"
        ))
        .bind(run.to_string())
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        decode(&rows, rows::artifact)
    }

    async fn list_all_artifacts(&self, req: &PageRequest) -> Result<Page<Artifact>, StoreError> {
        let limit = req.clamped_limit();
        let rows = sqlx::query(concat!(
            "SELECT ",
            artifact_columns!(),
            " FROM artifacts WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2"
        ))
        .bind(cursor(req)?)
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        Ok(page(decode(&rows, rows::artifact)?, limit, |a| {
            a.id.to_string()
        }))
    }

    async fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.writes.is_empty() && batch.fences.is_empty() {
            return Ok(());
        }
        let mut tx = begin_write(&self.writer).await?;
        // On error the transaction is dropped, which rolls it back.
        apply_batch(&mut tx, batch).await?;
        tx.commit().await.map_err(db)
    }

    async fn list_events(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let limit = limit.min(PageRequest::MAX_LIMIT);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT seq, run_id, at, kind FROM run_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(int(after_seq))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await
        .map_err(db)?;
        decode(&rows, rows::event)
    }

    async fn claim_runs(
        &self,
        owner: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<RunLease>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = self.now_ts();
        let mut tx = begin_write(&self.writer).await?;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "UPDATE pipeline_runs SET lease_owner = ?1, lease_epoch = lease_epoch + 1, \
             lease_expires_at = ?2 WHERE id IN (SELECT id FROM pipeline_runs \
             WHERE status IN ('pending', 'running') \
             AND (lease_owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at <= ?3) \
             ORDER BY id LIMIT ?4) RETURNING id, lease_epoch, lease_expires_at",
        )
        .bind(owner)
        .bind(expires(now, ttl))
        .bind(micros(now))
        .bind(i64::from(limit.min(PageRequest::MAX_LIMIT)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut leases = rows
            .into_iter()
            .map(|(id, epoch, expires_at)| {
                Ok(RunLease {
                    run_id: id.parse().map_err(|e| Error::decode("id", e))?,
                    owner: owner.to_owned(),
                    epoch: u64::try_from(epoch).map_err(|e| Error::decode("lease_epoch", e))?,
                    expires_at: Timestamp::from_unix_micros(expires_at),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        leases.sort_by_key(|l| l.run_id);
        Ok(leases)
    }

    async fn renew_leases(
        &self,
        leases: &[RunLease],
        ttl: Duration,
    ) -> Result<Vec<RunLease>, StoreError> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now_ts();
        let expires_at = expires(now, ttl);
        let mut tx = begin_write(&self.writer).await?;
        let mut renewed = Vec::with_capacity(leases.len());
        for lease in leases {
            let done = sqlx::query(
                "UPDATE pipeline_runs SET lease_expires_at = ?1 \
                 WHERE id = ?2 AND lease_owner = ?3 AND lease_epoch = ?4",
            )
            .bind(expires_at)
            .bind(lease.run_id.to_string())
            .bind(lease.owner.as_str())
            .bind(int(lease.epoch))
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            if done.rows_affected() == 1 {
                renewed.push(RunLease {
                    expires_at: Timestamp::from_unix_micros(expires_at),
                    ..lease.clone()
                });
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(renewed)
    }

    async fn release_lease(&self, lease: &RunLease) -> Result<(), StoreError> {
        // Releasing a lease that was already lost changes nothing: the new holder keeps it.
        let done = sqlx::query(
            "UPDATE pipeline_runs SET lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3",
        )
        .bind(lease.run_id.to_string())
        .bind(lease.owner.as_str())
        .bind(int(lease.epoch))
        .execute(&self.writer)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT 1 FROM pipeline_runs WHERE id = ?1")
                    .bind(lease.run_id.to_string())
                    .fetch_optional(&self.reader)
                    .await
                    .map_err(db)?;
            if exists.is_none() {
                return Err(StoreError::not_found(RunId::WHAT, lease.run_id));
            }
        }
        Ok(())
    }

    async fn claim_executions(
        &self,
        executor_type: &str,
        worker: &str,
        ttl: Duration,
        limit: u32,
    ) -> Result<Vec<ExecutionClaim>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let now = self.now_ts();
        let mut tx = begin_write(&self.writer).await?;
        let rows = sqlx::query(
            "UPDATE executions SET claim_worker = ?1, claim_expires_at = ?2 \
             WHERE id IN (SELECT id FROM executions WHERE status = 'pending' \
             AND executor_type = ?3 AND claim_worker IS NULL ORDER BY submitted_at, id LIMIT ?4) \
             RETURNING id, job_step_id, attempt, claim_worker, claim_expires_at, submitted_at",
        )
        .bind(worker)
        .bind(expires(now, ttl))
        .bind(executor_type)
        .bind(i64::from(limit.min(PageRequest::MAX_LIMIT)))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut claims = Vec::with_capacity(rows.len());
        for row in &rows {
            let submitted: i64 = sqlx::Row::try_get(row, "submitted_at")
                .map_err(|e| StoreError::from(Error::decode("submitted_at", e)))?;
            claims.push((submitted, rows::claim(row)?));
        }
        claims.sort_by_key(|(submitted, c)| (*submitted, c.execution_id));
        Ok(claims.into_iter().map(|(_, c)| c).collect())
    }

    async fn renew_execution_claim(
        &self,
        claim: &ExecutionClaim,
        ttl: Duration,
    ) -> Result<ExecutionClaim, StoreError> {
        // A claim that expired is lost even before `take_expired_execution_claims` reports it:
        // its execution may already be handed to someone else.
        let now = self.now_ts();
        let expires_at = expires(now, ttl);
        let done = sqlx::query(
            "UPDATE executions SET claim_expires_at = ?1 WHERE id = ?2 AND claim_worker = ?3 \
             AND claim_taken = 0 AND claim_expires_at > ?4",
        )
        .bind(expires_at)
        .bind(claim.execution_id.to_string())
        .bind(claim.worker.as_str())
        .bind(micros(now))
        .execute(&self.writer)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost {
                what: ExecutionId::WHAT,
                id: claim.execution_id.to_string(),
                owner: claim.worker.clone(),
            });
        }
        Ok(ExecutionClaim {
            expires_at: Timestamp::from_unix_micros(expires_at),
            ..claim.clone()
        })
    }

    async fn take_expired_execution_claims(&self) -> Result<Vec<ExecutionClaim>, StoreError> {
        let now = self.now_ts();
        let mut tx = begin_write(&self.writer).await?;
        let rows = sqlx::query(
            "UPDATE executions SET claim_taken = 1 WHERE claim_worker IS NOT NULL \
             AND claim_taken = 0 AND claim_expires_at <= ?1 AND status IN ('pending', 'running') \
             RETURNING id, job_step_id, attempt, claim_worker, claim_expires_at",
        )
        .bind(micros(now))
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        let mut claims = decode(&rows, rows::claim)?;
        claims.sort_by_key(|c| (c.expires_at, c.execution_id));
        Ok(claims)
    }

    async fn create_api_token(&self, token: &ApiToken) -> Result<(), StoreError> {
        self.create_api_token_impl(token).await
    }

    async fn list_api_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        self.list_api_tokens_impl().await
    }

    async fn find_api_token(&self, secret_sha256: &str) -> Result<ApiToken, StoreError> {
        self.find_api_token_impl(secret_sha256).await
    }

    async fn revoke_api_token(
        &self,
        id: ApiTokenId,
        at: Timestamp,
    ) -> Result<ApiToken, StoreError> {
        self.revoke_api_token_impl(id, at).await
    }

    async fn touch_api_token(&self, id: ApiTokenId, at: Timestamp) -> Result<(), StoreError> {
        self.touch_api_token_impl(id, at).await
    }

    async fn put_idempotency_record(
        &self,
        record: &IdempotencyRecord,
    ) -> Result<IdempotencyRecord, StoreError> {
        self.put_idempotency_record_impl(record).await
    }

    async fn get_idempotency_record(
        &self,
        pipeline: PipelineId,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, StoreError> {
        self.get_idempotency_record_impl(pipeline, key).await
    }

    async fn request_cancel(&self, run: RunId, by: &str, at: Timestamp) -> Result<(), StoreError> {
        self.request_cancel_impl(run, by, at).await
    }

    async fn cancel_requests(&self, runs: &[RunId]) -> Result<Vec<RunId>, StoreError> {
        self.cancel_requests_impl(runs).await
    }
}
