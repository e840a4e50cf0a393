//! Column lists and row decoding. Enums map to text only through core's `as_str()` and
//! `FromStr`; ids are canonical hyphenated UUID text; times are microseconds since the epoch.

use std::collections::BTreeMap;
use std::str::FromStr;

use shipinator_core::domain::{
    Artifact, Execution, Job, JobStep, JobType, Pipeline, PipelineRun, Project, Repository,
};
use shipinator_core::store::{ExecutionClaim, RunEvent, StoredEvent};
use shipinator_core::time::Timestamp;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

use crate::error::Error;

macro_rules! project_columns {
    () => {
        "id, name, description, created_at, updated_at"
    };
}
macro_rules! repository_columns {
    () => {
        "id, project_id, vcs_provider, clone_url, default_branch, created_at, updated_at"
    };
}
macro_rules! pipeline_columns {
    () => {
        "id, repository_id, name, trigger_type, source_spec, created_at, updated_at"
    };
}
macro_rules! run_columns {
    () => {
        "id, pipeline_id, git_ref, git_sha, status, phase, \"trigger\", requested_stages, \
         requested_by, resolved_spec, retry_of, version, created_at, started_at, finished_at"
    };
}
/// The run columns with `'null'` in place of the resolved spec (a read that shows the run).
macro_rules! run_columns_without_spec {
    () => {
        "id, pipeline_id, git_ref, git_sha, status, phase, \"trigger\", requested_stages, \
         requested_by, 'null' AS resolved_spec, retry_of, version, created_at, started_at, \
         finished_at"
    };
}
macro_rules! job_columns {
    () => {
        "id, pipeline_run_id, job_type, name, status, version, created_at, started_at, finished_at"
    };
}
macro_rules! step_columns {
    () => {
        "id, job_id, name, execution_order, parallel_group, status, attempt, version, created_at, \
         started_at, finished_at"
    };
}
macro_rules! artifact_columns {
    () => {
        "id, job_id, step_id, run_id, artifact_type, name, path, storage_backend, storage_path, \
         checksum, size, metadata, created_at"
    };
}
macro_rules! execution_columns {
    () => {
        "id, job_step_id, attempt, executor_type, external_id, status, exit_code, failure, \
         version, submitted_at, completed_at"
    };
}
/// `ORDER BY` key putting jobs in stage order.
macro_rules! stage_order {
    () => {
        "CASE job_type WHEN 'build' THEN 0 WHEN 'test' THEN 1 WHEN 'deploy' THEN 2 ELSE 3 END"
    };
}
pub(crate) use {
    artifact_columns, execution_columns, job_columns, pipeline_columns, project_columns,
    repository_columns, run_columns, run_columns_without_spec, stage_order, step_columns,
};

pub(crate) fn get<'r, T>(row: &'r SqliteRow, column: &'static str) -> Result<T, Error>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(column).map_err(|e| Error::decode(column, e))
}

pub(crate) fn parse<T>(row: &SqliteRow, column: &'static str) -> Result<T, Error>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let text: &str = get(row, column)?;
    text.parse().map_err(|e| Error::decode(column, e))
}

fn parse_opt<T>(row: &SqliteRow, column: &'static str) -> Result<Option<T>, Error>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let text: Option<&str> = get(row, column)?;
    text.map(|t| t.parse().map_err(|e| Error::decode(column, e)))
        .transpose()
}

pub(crate) fn time(row: &SqliteRow, column: &'static str) -> Result<Timestamp, Error> {
    Ok(Timestamp::from_unix_micros(get(row, column)?))
}

pub(crate) fn time_opt(row: &SqliteRow, column: &'static str) -> Result<Option<Timestamp>, Error> {
    let micros: Option<i64> = get(row, column)?;
    Ok(micros.map(Timestamp::from_unix_micros))
}

fn unsigned<T: TryFrom<i64>>(row: &SqliteRow, column: &'static str) -> Result<T, Error> {
    let value: i64 = get(row, column)?;
    T::try_from(value).map_err(|_| Error::decode(column, format!("{value} is out of range")))
}

fn json<T: serde::de::DeserializeOwned>(row: &SqliteRow, column: &'static str) -> Result<T, Error> {
    let text: &str = get(row, column)?;
    serde_json::from_str(text).map_err(|e| Error::decode(column, e))
}

/// Binds a stored time.
pub(crate) fn micros(t: Timestamp) -> i64 {
    t.as_unix_micros()
}

/// Binds an optional stored time.
pub(crate) fn micros_opt(t: Option<Timestamp>) -> Option<i64> {
    t.map(Timestamp::as_unix_micros)
}

/// Binds a version, attempt or size (all fit in SQLite's signed 64-bit integers in practice).
pub(crate) fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn project(row: &SqliteRow) -> Result<Project, Error> {
    Ok(Project {
        id: parse(row, "id")?,
        name: get(row, "name")?,
        description: get(row, "description")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
    })
}

pub(crate) fn repository(row: &SqliteRow) -> Result<Repository, Error> {
    Ok(Repository {
        id: parse(row, "id")?,
        project_id: parse(row, "project_id")?,
        vcs_provider: get(row, "vcs_provider")?,
        clone_url: get(row, "clone_url")?,
        default_branch: get(row, "default_branch")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
    })
}

pub(crate) fn pipeline(row: &SqliteRow) -> Result<Pipeline, Error> {
    Ok(Pipeline {
        id: parse(row, "id")?,
        repository_id: parse(row, "repository_id")?,
        name: get(row, "name")?,
        trigger_type: parse(row, "trigger_type")?,
        source_spec: get(row, "source_spec")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
    })
}

/// The JSON text of a run's requested stages.
pub(crate) fn stages_json(stages: &[JobType]) -> String {
    let mut out = String::from("[");
    for (i, stage) in stages.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(stage.as_str());
        out.push('"');
    }
    out.push(']');
    out
}

fn stages(row: &SqliteRow) -> Result<Vec<JobType>, Error> {
    let texts: Vec<String> = json(row, "requested_stages")?;
    texts
        .iter()
        .map(|t| t.parse().map_err(|e| Error::decode("requested_stages", e)))
        .collect()
}

pub(crate) fn run(row: &SqliteRow) -> Result<PipelineRun, Error> {
    Ok(PipelineRun {
        id: parse(row, "id")?,
        pipeline_id: parse(row, "pipeline_id")?,
        git_ref: get(row, "git_ref")?,
        git_sha: get(row, "git_sha")?,
        status: parse(row, "status")?,
        phase: parse(row, "phase")?,
        trigger: parse(row, "trigger")?,
        requested_stages: stages(row)?,
        requested_by: get(row, "requested_by")?,
        resolved_spec: std::sync::Arc::new(json(row, "resolved_spec")?),
        retry_of: parse_opt(row, "retry_of")?,
        version: unsigned(row, "version")?,
        created_at: time(row, "created_at")?,
        started_at: time_opt(row, "started_at")?,
        finished_at: time_opt(row, "finished_at")?,
    })
}

pub(crate) fn job(row: &SqliteRow) -> Result<Job, Error> {
    Ok(Job {
        id: parse(row, "id")?,
        pipeline_run_id: parse(row, "pipeline_run_id")?,
        job_type: parse(row, "job_type")?,
        name: get(row, "name")?,
        status: parse(row, "status")?,
        version: unsigned(row, "version")?,
        created_at: time(row, "created_at")?,
        started_at: time_opt(row, "started_at")?,
        finished_at: time_opt(row, "finished_at")?,
    })
}

pub(crate) fn step(row: &SqliteRow) -> Result<JobStep, Error> {
    Ok(JobStep {
        id: parse(row, "id")?,
        job_id: parse(row, "job_id")?,
        name: get(row, "name")?,
        execution_order: unsigned(row, "execution_order")?,
        parallel_group: get(row, "parallel_group")?,
        status: parse(row, "status")?,
        attempt: unsigned(row, "attempt")?,
        version: unsigned(row, "version")?,
        created_at: time(row, "created_at")?,
        started_at: time_opt(row, "started_at")?,
        finished_at: time_opt(row, "finished_at")?,
    })
}

pub(crate) fn artifact(row: &SqliteRow) -> Result<Artifact, Error> {
    let metadata: BTreeMap<String, String> = json(row, "metadata")?;
    Ok(Artifact {
        id: parse(row, "id")?,
        job_id: parse(row, "job_id")?,
        step_id: parse_opt(row, "step_id")?,
        run_id: parse(row, "run_id")?,
        artifact_type: parse(row, "artifact_type")?,
        name: get(row, "name")?,
        path: get(row, "path")?,
        storage_backend: get(row, "storage_backend")?,
        storage_path: get(row, "storage_path")?,
        checksum: get(row, "checksum")?,
        size: unsigned(row, "size")?,
        metadata,
        created_at: time(row, "created_at")?,
    })
}

pub(crate) fn execution(row: &SqliteRow) -> Result<Execution, Error> {
    let exit_code: Option<i64> = get(row, "exit_code")?;
    Ok(Execution {
        id: parse(row, "id")?,
        job_step_id: parse(row, "job_step_id")?,
        attempt: unsigned(row, "attempt")?,
        executor_type: get(row, "executor_type")?,
        external_id: get(row, "external_id")?,
        status: parse(row, "status")?,
        exit_code: exit_code
            .map(|c| {
                i32::try_from(c)
                    .map_err(|_| Error::decode("exit_code", format!("{c} is out of range")))
            })
            .transpose()?,
        failure: get(row, "failure")?,
        version: unsigned(row, "version")?,
        submitted_at: time(row, "submitted_at")?,
        completed_at: time_opt(row, "completed_at")?,
    })
}

pub(crate) fn event(row: &SqliteRow) -> Result<StoredEvent, Error> {
    Ok(StoredEvent {
        seq: unsigned(row, "seq")?,
        event: RunEvent {
            run_id: parse(row, "run_id")?,
            at: time(row, "at")?,
            kind: json(row, "kind")?,
        },
    })
}

/// Decodes `id, job_step_id, attempt, claim_worker, claim_expires_at`.
pub(crate) fn claim(row: &SqliteRow) -> Result<ExecutionClaim, Error> {
    Ok(ExecutionClaim {
        execution_id: parse(row, "id")?,
        step_id: parse(row, "job_step_id")?,
        attempt: unsigned(row, "attempt")?,
        worker: get(row, "claim_worker")?,
        expires_at: time(row, "claim_expires_at")?,
    })
}
