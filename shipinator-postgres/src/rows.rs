//! Row ↔ domain conversions. Enum columns go through core's `as_str`/`FromStr` only.

use std::collections::BTreeMap;
use std::str::FromStr;

use shipinator_core::domain::{
    Artifact, Execution, Job, JobStep, JobType, Pipeline, PipelineRun, Project, Repository,
};
use shipinator_core::store::{RunEvent, StoredEvent};
use shipinator_core::time::Timestamp;
use sqlx::Row;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::Error;

pub(crate) type Result<T> = std::result::Result<T, Error>;

pub(crate) fn ts(t: Timestamp) -> OffsetDateTime {
    t.to_offset_date_time()
}

pub(crate) fn opt_ts(t: Option<Timestamp>) -> Option<OffsetDateTime> {
    t.map(ts)
}

pub(crate) fn i64_of(field: &'static str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::OutOfRange {
        field,
        value: v.to_string(),
    })
}

pub(crate) fn i32_of(field: &'static str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::OutOfRange {
        field,
        value: v.to_string(),
    })
}

pub(crate) fn col<'r, T>(row: &'r PgRow, column: &'static str) -> Result<T>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(column).map_err(|e| Error::Decode {
        column,
        source: Box::new(e),
    })
}

fn decode_err(column: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Decode {
        column,
        source: Box::new(e),
    }
}

pub(crate) fn enum_col<T>(row: &PgRow, column: &'static str) -> Result<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let text: String = col(row, column)?;
    text.parse().map_err(|e| decode_err(column, e))
}

fn timestamp(row: &PgRow, column: &'static str) -> Result<Timestamp> {
    let t: OffsetDateTime = col(row, column)?;
    Ok(Timestamp::from_offset_date_time(t))
}

fn opt_timestamp(row: &PgRow, column: &'static str) -> Result<Option<Timestamp>> {
    let t: Option<OffsetDateTime> = col(row, column)?;
    Ok(t.map(Timestamp::from_offset_date_time))
}

fn u64_col(row: &PgRow, column: &'static str) -> Result<u64> {
    let v: i64 = col(row, column)?;
    u64::try_from(v).map_err(|e| decode_err(column, e))
}

fn u32_col(row: &PgRow, column: &'static str) -> Result<u32> {
    let v: i64 = col(row, column)?;
    u32::try_from(v).map_err(|e| decode_err(column, e))
}

fn uuid_col<T: From<Uuid>>(row: &PgRow, column: &'static str) -> Result<T> {
    let v: Uuid = col(row, column)?;
    Ok(T::from(v))
}

fn opt_uuid_col<T: From<Uuid>>(row: &PgRow, column: &'static str) -> Result<Option<T>> {
    let v: Option<Uuid> = col(row, column)?;
    Ok(v.map(T::from))
}

pub(crate) const PROJECT_COLUMNS: &str = "id, name, description, created_at, updated_at";

pub(crate) fn project(row: &PgRow) -> Result<Project> {
    Ok(Project {
        id: uuid_col(row, "id")?,
        name: col(row, "name")?,
        description: col(row, "description")?,
        created_at: timestamp(row, "created_at")?,
        updated_at: timestamp(row, "updated_at")?,
    })
}

pub(crate) fn repository(row: &PgRow) -> Result<Repository> {
    Ok(Repository {
        id: uuid_col(row, "id")?,
        project_id: uuid_col(row, "project_id")?,
        vcs_provider: col(row, "vcs_provider")?,
        clone_url: col(row, "clone_url")?,
        default_branch: col(row, "default_branch")?,
        created_at: timestamp(row, "created_at")?,
        updated_at: timestamp(row, "updated_at")?,
    })
}

pub(crate) fn pipeline(row: &PgRow) -> Result<Pipeline> {
    Ok(Pipeline {
        id: uuid_col(row, "id")?,
        repository_id: uuid_col(row, "repository_id")?,
        name: col(row, "name")?,
        trigger_type: enum_col(row, "trigger_type")?,
        source_spec: col(row, "source_spec")?,
        created_at: timestamp(row, "created_at")?,
        updated_at: timestamp(row, "updated_at")?,
    })
}

pub(crate) fn stages_text(stages: &[JobType]) -> Vec<String> {
    stages.iter().map(|s| s.as_str().to_owned()).collect()
}

pub(crate) fn run(row: &PgRow) -> Result<PipelineRun> {
    let stages: Vec<String> = col(row, "requested_stages")?;
    let requested_stages = stages
        .iter()
        .map(|s| s.parse::<JobType>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| decode_err("requested_stages", e))?;
    Ok(PipelineRun {
        id: uuid_col(row, "id")?,
        pipeline_id: uuid_col(row, "pipeline_id")?,
        git_ref: col(row, "git_ref")?,
        git_sha: col(row, "git_sha")?,
        status: enum_col(row, "status")?,
        phase: enum_col(row, "phase")?,
        trigger: enum_col(row, "trigger")?,
        requested_stages,
        requested_by: col(row, "requested_by")?,
        resolved_spec: std::sync::Arc::new(col(row, "resolved_spec")?),
        retry_of: opt_uuid_col(row, "retry_of")?,
        version: u64_col(row, "version")?,
        created_at: timestamp(row, "created_at")?,
        started_at: opt_timestamp(row, "started_at")?,
        finished_at: opt_timestamp(row, "finished_at")?,
    })
}

pub(crate) const RUN_COLUMNS: &str = "id, pipeline_id, git_ref, git_sha, status, phase, trigger, \
     requested_stages, requested_by, resolved_spec, retry_of, version, created_at, started_at, \
     finished_at";

/// [`RUN_COLUMNS`] with a JSON `null` in place of the resolved spec: a read that shows the
/// run and never executes it skips reading and decoding the document.
pub(crate) const RUN_COLUMNS_WITHOUT_SPEC: &str = "id, pipeline_id, git_ref, git_sha, status, \
     phase, trigger, requested_stages, requested_by, 'null'::jsonb AS resolved_spec, retry_of, \
     version, created_at, started_at, finished_at";

pub(crate) fn job(row: &PgRow) -> Result<Job> {
    Ok(Job {
        id: uuid_col(row, "id")?,
        pipeline_run_id: uuid_col(row, "pipeline_run_id")?,
        job_type: enum_col(row, "job_type")?,
        name: col(row, "name")?,
        status: enum_col(row, "status")?,
        version: u64_col(row, "version")?,
        created_at: timestamp(row, "created_at")?,
        started_at: opt_timestamp(row, "started_at")?,
        finished_at: opt_timestamp(row, "finished_at")?,
    })
}

pub(crate) fn step(row: &PgRow) -> Result<JobStep> {
    let order: i32 = col(row, "execution_order")?;
    Ok(JobStep {
        id: uuid_col(row, "id")?,
        job_id: uuid_col(row, "job_id")?,
        name: col(row, "name")?,
        execution_order: u32::try_from(order).map_err(|e| decode_err("execution_order", e))?,
        parallel_group: col(row, "parallel_group")?,
        status: enum_col(row, "status")?,
        attempt: u32_col(row, "attempt")?,
        version: u64_col(row, "version")?,
        created_at: timestamp(row, "created_at")?,
        started_at: opt_timestamp(row, "started_at")?,
        finished_at: opt_timestamp(row, "finished_at")?,
    })
}

pub(crate) fn execution(row: &PgRow) -> Result<Execution> {
    Ok(Execution {
        id: uuid_col(row, "id")?,
        job_step_id: uuid_col(row, "job_step_id")?,
        attempt: u32_col(row, "attempt")?,
        executor_type: col(row, "executor_type")?,
        external_id: col(row, "external_id")?,
        status: enum_col(row, "status")?,
        exit_code: col(row, "exit_code")?,
        failure: col(row, "failure")?,
        version: u64_col(row, "version")?,
        submitted_at: timestamp(row, "submitted_at")?,
        completed_at: opt_timestamp(row, "completed_at")?,
    })
}

pub(crate) const EXECUTION_COLUMNS: &str = "id, job_step_id, attempt, executor_type, external_id, \
     status, exit_code, failure, version, submitted_at, completed_at";

pub(crate) fn metadata_json(m: &BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

pub(crate) fn artifact(row: &PgRow) -> Result<Artifact> {
    let metadata: serde_json::Value = col(row, "metadata")?;
    let metadata: BTreeMap<String, String> =
        serde_json::from_value(metadata).map_err(|e| decode_err("metadata", e))?;
    Ok(Artifact {
        id: uuid_col(row, "id")?,
        job_id: uuid_col(row, "job_id")?,
        step_id: opt_uuid_col(row, "step_id")?,
        run_id: uuid_col(row, "run_id")?,
        artifact_type: enum_col(row, "artifact_type")?,
        name: col(row, "name")?,
        path: col(row, "path")?,
        storage_backend: col(row, "storage_backend")?,
        storage_path: col(row, "storage_path")?,
        checksum: col(row, "checksum")?,
        size: u64_col(row, "size")?,
        metadata,
        created_at: timestamp(row, "created_at")?,
    })
}

pub(crate) const ARTIFACT_COLUMNS: &str = "id, job_id, step_id, run_id, artifact_type, name, path, \
     storage_backend, storage_path, checksum, size, metadata, created_at";

pub(crate) fn event(row: &PgRow) -> Result<StoredEvent> {
    let kind: serde_json::Value = col(row, "kind")?;
    Ok(StoredEvent {
        seq: u64_col(row, "seq")?,
        event: RunEvent {
            run_id: uuid_col(row, "run_id")?,
            at: timestamp(row, "at")?,
            kind: serde_json::from_value(kind).map_err(|e| decode_err("kind", e))?,
        },
    })
}

pub(crate) fn opt_ts_col(row: &PgRow, column: &'static str) -> Result<Option<Timestamp>> {
    opt_timestamp(row, column)
}

pub(crate) fn ts_col(row: &PgRow, column: &'static str) -> Result<Timestamp> {
    timestamp(row, column)
}

pub(crate) fn u64_of(row: &PgRow, column: &'static str) -> Result<u64> {
    u64_col(row, column)
}

pub(crate) fn u32_of(row: &PgRow, column: &'static str) -> Result<u32> {
    u32_col(row, column)
}

pub(crate) fn id_of<T: From<Uuid>>(row: &PgRow, column: &'static str) -> Result<T> {
    uuid_col(row, column)
}
