//! The API's JSON shapes: serializable counterparts of the domain entities, with OpenAPI
//! schemas. Times are RFC 3339 strings; ids are UUIDs; enums use the domain's spellings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shipinator_core::domain::{
    Artifact, ArtifactId, ArtifactType, Execution, ExecutionId, ExecutionStatus, Job, JobId,
    JobStatus, JobStep, JobType, Pipeline, PipelineId, PipelineRun, Project, ProjectId, Repository,
    RepositoryId, RunId, RunPhase, RunStatus, StepId, StepStatus, TokenRole, Trigger,
};
use shipinator_core::executor::ProducedArtifact;
use shipinator_core::logs::{LogLine, LogStream};
use shipinator_core::store::ApiToken;
use shipinator_core::time::Timestamp;
use utoipa::{IntoParams, ToSchema};

/// OpenAPI schemas of the domain's text enums, built from their `ALL` lists so the document
/// always names every accepted value.
pub(crate) mod schemas {
    use shipinator_core::domain::{
        ArtifactType, JobType, RunPhase, RunStatus, Status, TokenRole, Trigger,
    };
    use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, SchemaType, Type};

    fn one_of(values: impl IntoIterator<Item = &'static str>, nullable: bool) -> Object {
        let mut values: Vec<serde_json::Value> = values.into_iter().map(Into::into).collect();
        let schema_type = if nullable {
            values.push(serde_json::Value::Null);
            SchemaType::from_iter([Type::String, Type::Null])
        } else {
            SchemaType::Type(Type::String)
        };
        ObjectBuilder::new()
            .schema_type(schema_type)
            .enum_values(Some(values))
            .build()
    }

    pub(crate) fn trigger() -> Object {
        one_of(Trigger::ALL.iter().map(|v| v.as_str()), false)
    }
    pub(crate) fn trigger_opt() -> Object {
        one_of(Trigger::ALL.iter().map(|v| v.as_str()), true)
    }
    pub(crate) fn run_status() -> Object {
        one_of(RunStatus::ALL.iter().map(|v| v.as_str()), false)
    }
    pub(crate) fn run_phase() -> Object {
        one_of(RunPhase::ALL.iter().map(|v| v.as_str()), false)
    }
    pub(crate) fn status() -> Object {
        one_of(Status::ALL.iter().map(|v| v.as_str()), false)
    }
    pub(crate) fn job_type() -> Object {
        one_of(JobType::ALL.iter().map(|v| v.as_str()), false)
    }
    pub(crate) fn job_types() -> utoipa::openapi::schema::Array {
        ArrayBuilder::new().items(job_type()).build()
    }
    pub(crate) fn job_types_opt() -> utoipa::openapi::schema::Array {
        ArrayBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Array, Type::Null]))
            .items(job_type())
            .build()
    }
    pub(crate) fn artifact_type() -> Object {
        one_of(ArtifactType::ALL.iter().map(|v| v.as_str()), false)
    }
    pub(crate) fn token_role() -> Object {
        one_of(TokenRole::ALL.iter().map(|v| v.as_str()), false)
    }
    /// `LogStream`'s wire spellings.
    pub(crate) const LOG_STREAMS: [&str; 3] = ["stdout", "stderr", "system"];
    pub(crate) fn log_stream() -> Object {
        one_of(LOG_STREAMS, false)
    }
    /// The event names of a followed log.
    pub(crate) fn log_event_kind() -> Object {
        one_of(["line", "end", "error"], false)
    }
    /// `ReportedStatus`'s wire spellings.
    pub(crate) const REPORTED_STATUSES: [&str; 4] = ["running", "success", "failed", "lost"];
    pub(crate) fn reported_status() -> Object {
        one_of(REPORTED_STATUSES, false)
    }
}

fn ts(t: Timestamp) -> String {
    t.to_rfc3339()
}

fn ts_opt(t: Option<Timestamp>) -> Option<String> {
    t.map(Timestamp::to_rfc3339)
}

/// A project.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ProjectDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: ProjectId,
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
}

impl From<Project> for ProjectDto {
    fn from(p: Project) -> Self {
        Self {
            id: p.id,
            name: p.name,
            description: p.description,
            created_at: ts(p.created_at),
            updated_at: ts(p.updated_at),
        }
    }
}

/// A new project.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateProject {
    /// Unique name.
    pub(crate) name: String,
    pub(crate) description: Option<String>,
}

/// A repository.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct RepositoryDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: RepositoryId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) project_id: ProjectId,
    /// `git`, `gitea`, `github`, ...
    pub(crate) provider: String,
    pub(crate) clone_url: String,
    pub(crate) default_branch: String,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
}

impl From<Repository> for RepositoryDto {
    fn from(r: Repository) -> Self {
        Self {
            id: r.id,
            project_id: r.project_id,
            provider: r.vcs_provider,
            clone_url: r.clone_url,
            default_branch: r.default_branch,
            created_at: ts(r.created_at),
            updated_at: ts(r.updated_at),
        }
    }
}

/// A new repository.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRepository {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) project_id: ProjectId,
    /// `file://`, `https://` or `ssh://` URL the workers clone.
    pub(crate) clone_url: String,
    /// Default `main`.
    pub(crate) default_branch: Option<String>,
    /// Default `git`.
    pub(crate) provider: Option<String>,
}

/// A pipeline.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct PipelineDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: PipelineId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) repository_id: RepositoryId,
    pub(crate) name: String,
    #[schema(schema_with = schemas::trigger)]
    pub(crate) trigger_type: Trigger,
    /// The `.shipinator.yaml` text.
    pub(crate) config: String,
    pub(crate) created_at: String,
    pub(crate) updated_at: String,
}

impl From<Pipeline> for PipelineDto {
    fn from(p: Pipeline) -> Self {
        Self {
            id: p.id,
            repository_id: p.repository_id,
            name: p.name,
            trigger_type: p.trigger_type,
            config: p.source_spec,
            created_at: ts(p.created_at),
            updated_at: ts(p.updated_at),
        }
    }
}

/// A new pipeline, from a `.shipinator.yaml` body (`config`) or read from the repository at a
/// branch, tag or commit (`from_ref`), as the remote holds it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreatePipeline {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) repository_id: RepositoryId,
    /// Unique within the repository.
    pub(crate) name: String,
    /// Default `manual`.
    #[schema(schema_with = schemas::trigger_opt)]
    pub(crate) trigger_type: Option<Trigger>,
    /// The `.shipinator.yaml` text.
    pub(crate) config: Option<String>,
    /// Read `.shipinator.yaml` from the repository at this branch, tag or commit instead
    /// (fetched through the server's mirror of the repository).
    pub(crate) from_ref: Option<String>,
}

/// A run request (DMD §4.1): what to build, from which commit, and why.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RunRequestBody {
    /// `pr`, `push` or `manual`.
    #[schema(schema_with = schemas::trigger)]
    pub(crate) trigger: Trigger,
    /// Branch name (`main`); matched against the pipeline's triggers.
    pub(crate) branch: String,
    /// Git ref to record and fetch (`refs/pull/4/head`); default the branch.
    #[serde(rename = "ref")]
    pub(crate) git_ref: Option<String>,
    /// The exact commit (hex sha).
    pub(crate) commit: String,
    /// For manual runs, the stages to run (`build`, `test`, `deploy`); default build and test.
    #[schema(schema_with = schemas::job_types_opt)]
    pub(crate) stages: Option<Vec<JobType>>,
}

/// A run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct RunDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: RunId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) pipeline_id: PipelineId,
    #[serde(rename = "ref")]
    pub(crate) git_ref: String,
    pub(crate) commit: String,
    #[schema(schema_with = schemas::run_status)]
    pub(crate) status: RunStatus,
    #[schema(schema_with = schemas::run_phase)]
    pub(crate) phase: RunPhase,
    #[schema(schema_with = schemas::trigger)]
    pub(crate) trigger: Trigger,
    #[schema(schema_with = schemas::job_types)]
    pub(crate) requested_stages: Vec<JobType>,
    pub(crate) requested_by: String,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub(crate) retry_of: Option<RunId>,
    pub(crate) created_at: String,
    pub(crate) started_at: Option<String>,
    pub(crate) finished_at: Option<String>,
}

impl From<PipelineRun> for RunDto {
    fn from(r: PipelineRun) -> Self {
        Self {
            id: r.id,
            pipeline_id: r.pipeline_id,
            git_ref: r.git_ref,
            commit: r.git_sha,
            status: r.status,
            phase: r.phase,
            trigger: r.trigger,
            requested_stages: r.requested_stages,
            requested_by: r.requested_by,
            retry_of: r.retry_of,
            created_at: ts(r.created_at),
            started_at: ts_opt(r.started_at),
            finished_at: ts_opt(r.finished_at),
        }
    }
}

/// A job: one stage of a run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct JobDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: JobId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) run_id: RunId,
    #[serde(rename = "type")]
    #[schema(schema_with = schemas::job_type)]
    pub(crate) job_type: JobType,
    pub(crate) name: String,
    #[schema(schema_with = schemas::status)]
    pub(crate) status: JobStatus,
    pub(crate) created_at: String,
    pub(crate) started_at: Option<String>,
    pub(crate) finished_at: Option<String>,
}

impl From<Job> for JobDto {
    fn from(j: Job) -> Self {
        Self {
            id: j.id,
            run_id: j.pipeline_run_id,
            job_type: j.job_type,
            name: j.name,
            status: j.status,
            created_at: ts(j.created_at),
            started_at: ts_opt(j.started_at),
            finished_at: ts_opt(j.finished_at),
        }
    }
}

/// An execution: one attempt of a step on an executor.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ExecutionDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: ExecutionId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) step_id: StepId,
    pub(crate) attempt: u32,
    pub(crate) executor_type: String,
    pub(crate) external_id: String,
    #[schema(schema_with = schemas::status)]
    pub(crate) status: ExecutionStatus,
    pub(crate) exit_code: Option<i32>,
    pub(crate) failure: Option<String>,
    /// The step log's reference (`logs://<execution id>`).
    pub(crate) logs_ref: String,
    pub(crate) submitted_at: String,
    pub(crate) completed_at: Option<String>,
}

impl From<Execution> for ExecutionDto {
    fn from(e: Execution) -> Self {
        Self {
            logs_ref: shipinator_core::logs::logs_uri(e.id),
            id: e.id,
            step_id: e.job_step_id,
            attempt: e.attempt,
            executor_type: e.executor_type,
            external_id: e.external_id,
            status: e.status,
            exit_code: e.exit_code,
            failure: e.failure,
            submitted_at: ts(e.submitted_at),
            completed_at: ts_opt(e.completed_at),
        }
    }
}

/// A step with its executions.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct StepDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: StepId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) job_id: JobId,
    pub(crate) name: String,
    pub(crate) execution_order: u32,
    pub(crate) parallel_group: Option<String>,
    #[schema(schema_with = schemas::status)]
    pub(crate) status: StepStatus,
    pub(crate) attempt: u32,
    pub(crate) created_at: String,
    pub(crate) started_at: Option<String>,
    pub(crate) finished_at: Option<String>,
    pub(crate) executions: Vec<ExecutionDto>,
}

impl StepDto {
    pub(crate) fn new(s: JobStep, executions: Vec<ExecutionDto>) -> Self {
        Self {
            id: s.id,
            job_id: s.job_id,
            name: s.name,
            execution_order: s.execution_order,
            parallel_group: s.parallel_group,
            status: s.status,
            attempt: s.attempt,
            created_at: ts(s.created_at),
            started_at: ts_opt(s.started_at),
            finished_at: ts_opt(s.finished_at),
            executions,
        }
    }
}

/// Artifact metadata (DMD §2.7).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ArtifactDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: ArtifactId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) run_id: RunId,
    #[schema(value_type = String, format = Uuid)]
    pub(crate) job_id: JobId,
    #[schema(value_type = Option<String>, format = Uuid)]
    pub(crate) step_id: Option<StepId>,
    #[serde(rename = "type")]
    #[schema(schema_with = schemas::artifact_type)]
    pub(crate) artifact_type: ArtifactType,
    pub(crate) name: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) storage_backend: String,
    pub(crate) storage_path: String,
    pub(crate) checksum: Option<String>,
    pub(crate) size: u64,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) created_at: String,
}

impl From<Artifact> for ArtifactDto {
    fn from(a: Artifact) -> Self {
        Self {
            id: a.id,
            run_id: a.run_id,
            job_id: a.job_id,
            step_id: a.step_id,
            artifact_type: a.artifact_type,
            name: a.name,
            path: a.path,
            storage_backend: a.storage_backend,
            storage_path: a.storage_path,
            checksum: a.checksum,
            size: a.size,
            metadata: a.metadata,
            created_at: ts(a.created_at),
        }
    }
}

/// A page of a listing.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct PageDto<T> {
    pub(crate) items: Vec<T>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub(crate) next_cursor: Option<String>,
}

/// Paging parameters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PageQuery {
    /// Items per page, 1 to 1000 (default 50).
    pub(crate) limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
}

/// Run listing filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RunQuery {
    /// Runs of this pipeline.
    #[param(value_type = Option<String>, format = Uuid)]
    pub(crate) pipeline: Option<PipelineId>,
    /// Runs with this status.
    #[param(schema_with = schemas::run_status)]
    pub(crate) status: Option<RunStatus>,
    /// Runs of this branch or ref.
    pub(crate) branch: Option<String>,
    /// Items per page, 1 to 1000 (default 50).
    pub(crate) limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub(crate) cursor: Option<String>,
}

/// A log line as the API returns it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct LogLineDto {
    pub(crate) seq: u64,
    pub(crate) at: String,
    #[schema(schema_with = schemas::log_stream)]
    pub(crate) stream: LogStream,
    pub(crate) text: String,
}

impl From<LogLine> for LogLineDto {
    fn from(l: LogLine) -> Self {
        Self {
            seq: l.seq,
            at: ts(l.at),
            stream: l.stream,
            text: l.text,
        }
    }
}

/// One Server-Sent Event of a followed step log (`follow=true`): `line` events carry a
/// `LogLineDto` as JSON in `data` and the line's `seq` as `id`; the stream ends with one `end`
/// event (`data` is `{}`), or with an `error` event whose `data` is a message.
#[derive(Debug)]
pub(crate) enum LogEvent {}

impl utoipa::PartialSchema for LogEvent {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let text = |description: &str| {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some(description))
        };
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "One event: `line` (data: a LogLineDto as JSON, id: its seq), then one `end` \
                 (data: `{}`) or `error` (data: a message)",
            ))
            .property("event", schemas::log_event_kind())
            .required("event")
            .property(
                "data",
                text("JSON for `line` and `end`; a message for `error`"),
            )
            .required("data")
            .property("id", text("The line's sequence number (`line` events)"))
            .property(
                "retry",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0)),
            )
            .into()
    }
}

impl ToSchema for LogEvent {}

/// A step's log lines.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct LogPage {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) execution_id: ExecutionId,
    pub(crate) lines: Vec<LogLineDto>,
    /// Pass as `from_seq` to read on.
    pub(crate) next_seq: u64,
}

/// Log query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct LogQuery {
    /// Which attempt (default the step's current one).
    pub(crate) attempt: Option<u32>,
    /// First sequence number (default 0).
    pub(crate) from_seq: Option<u64>,
    /// Most lines (default 1000, at most 10000).
    pub(crate) limit: Option<usize>,
    /// Stream as Server-Sent Events until the log ends (resumable with `Last-Event-ID`).
    pub(crate) follow: Option<bool>,
}

/// An API token (never its secret).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct TokenDto {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: shipinator_core::domain::ApiTokenId,
    pub(crate) name: String,
    #[schema(schema_with = schemas::token_role)]
    pub(crate) role: TokenRole,
    /// The projects it is scoped to; absent for every project.
    #[schema(value_type = Option<Vec<String>>)]
    pub(crate) projects: Option<Vec<ProjectId>>,
    pub(crate) created_at: String,
    pub(crate) last_used_at: Option<String>,
    pub(crate) revoked_at: Option<String>,
}

impl From<ApiToken> for TokenDto {
    fn from(t: ApiToken) -> Self {
        Self {
            projects: t.scope.as_list().map(<[ProjectId]>::to_vec),
            id: t.id,
            name: t.name,
            role: t.role,
            created_at: ts(t.created_at),
            last_used_at: ts_opt(t.last_used_at),
            revoked_at: ts_opt(t.revoked_at),
        }
    }
}

/// A new token.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateToken {
    pub(crate) name: String,
    #[schema(schema_with = schemas::token_role)]
    pub(crate) role: TokenRole,
    /// Scope to these projects; absent for every project.
    #[schema(value_type = Option<Vec<String>>)]
    pub(crate) projects: Option<Vec<ProjectId>>,
}

/// A created token: the secret is shown here once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct CreatedToken {
    /// Send as `Authorization: Bearer <token>`. Not retrievable later.
    pub(crate) token: String,
    #[serde(flatten)]
    pub(crate) info: TokenDto,
}

/// What a worker reports (DMD §4.3, with artifacts as objects carrying their id).
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecutionStatusBody {
    /// `running`, `success`, `failed` or `lost`.
    #[schema(schema_with = schemas::reported_status)]
    pub(crate) status: ReportedStatus,
    pub(crate) exit_code: Option<i32>,
    pub(crate) logs_uri: Option<String>,
    /// Produced artifacts, as `shipinator_core::executor::ProducedArtifact` objects.
    #[serde(default)]
    #[schema(value_type = Vec<Object>)]
    pub(crate) artifacts: Vec<ProducedArtifact>,
    pub(crate) failure: Option<String>,
}

/// A worker's status word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReportedStatus {
    Running,
    Success,
    Failed,
    Lost,
}

/// Log lines a worker appends.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogBatch {
    /// `shipinator_core::logs::LogLine` objects (`seq`, `at` in microseconds, `stream`, `text`).
    #[schema(value_type = Vec<Object>)]
    pub(crate) lines: Vec<LogLine>,
}

/// A stored upload.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct UploadedArtifact {
    #[schema(value_type = String, format = Uuid)]
    pub(crate) id: ArtifactId,
    pub(crate) size: u64,
    /// `sha256:<hex>`.
    pub(crate) checksum: String,
    /// The artifact store the bytes went to (`nfs`, `s3`).
    pub(crate) storage_backend: String,
    /// Where within that store.
    pub(crate) storage_path: String,
}

/// Liveness and readiness.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct Health {
    pub(crate) status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_listed_spellings_match_serde() {
        for text in schemas::LOG_STREAMS {
            serde_json::from_value::<LogStream>(text.into()).expect("a log stream");
        }
        for v in [LogStream::Stdout, LogStream::Stderr, LogStream::System] {
            let text = serde_json::to_value(v).expect("serializes");
            assert!(schemas::LOG_STREAMS.contains(&text.as_str().expect("text")));
        }
        for text in schemas::REPORTED_STATUSES {
            serde_json::from_value::<ReportedStatus>(text.into()).expect("a status");
        }
        for v in [
            ReportedStatus::Running,
            ReportedStatus::Success,
            ReportedStatus::Failed,
            ReportedStatus::Lost,
        ] {
            let text = serde_json::to_value(v).expect("serializes");
            assert!(schemas::REPORTED_STATUSES.contains(&text.as_str().expect("text")));
        }
    }
}
