//! Runs: trigger (DMD §4.1), inspect, cancel, retry.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use shipinator_core::config;
use shipinator_core::domain::{PipelineRun, RunId, TokenRole};
use shipinator_core::driver::DriverError;
use shipinator_core::executor::SourceSpec;
use shipinator_core::orchestrator::{PlanError, RunRequest};
use shipinator_core::store::{IdempotencyRecord, RunFilter};
use shipinator_core::time::Timestamp;

use super::{ApiJson, ApiPath, ApiQuery, cursor_error, page_request, required_text};
use crate::server::AppState;
use crate::server::auth::Caller;
use crate::server::dto::{
    ArtifactDto, ExecutionDto, JobDto, PageDto, RunDto, RunQuery, RunRequestBody, StepDto,
};
use crate::server::error::{ApiError, ApiResult, ErrorBody};

/// The `Idempotency-Key` header.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

fn plan_error(e: DriverError) -> ApiError {
    match e {
        DriverError::Plan(p) => {
            let field = match &p {
                PlanError::TriggerDisabled { .. } => Some("trigger"),
                PlanError::BranchNotTriggered { .. } => Some("branch"),
                PlanError::StageNotDefined { .. } | PlanError::NothingToRun => Some("stages"),
                _ => None,
            };
            let mut err = ApiError::bad_request(p.to_string());
            err.field = field.map(str::to_owned);
            err
        }
        other => other.into(),
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::field(
                "Idempotency-Key",
                "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
            )
        })?;
    Ok(Some(key.to_owned()))
}

/// Request a run of a pipeline (DMD §4.1). With an `Idempotency-Key` header, a repeated
/// request returns the run the first one created (200); the same key with a different body is
/// a 409.
#[utoipa::path(post, path = "/v1/pipelines/{id}/runs", tag = "runs",
    params(
        ("id" = String, Path, format = Uuid, description = "Pipeline id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries of this request safe"),
    ),
    request_body = RunRequestBody,
    responses(
        (status = 201, description = "Created", body = RunDto),
        (status = 200, description = "The run an earlier request with this Idempotency-Key created", body = RunDto),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 409, description = "Idempotency-Key reused with another body", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn trigger_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<shipinator_core::domain::PipelineId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<RunRequestBody>,
) -> ApiResult<(StatusCode, Json<RunDto>)> {
    caller.require(TokenRole::Developer)?;
    let pipeline = state.store.get_pipeline(id).await?;
    let repo = state.store.get_repository(pipeline.repository_id).await?;
    caller.require_project(TokenRole::Developer, repo.project_id)?;
    required_text("branch", &body.branch, 255)?;
    if let Some(r) = &body.git_ref {
        required_text("ref", r, 255)?;
    }
    let commit_ok =
        (4..=64).contains(&body.commit.len()) && body.commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !commit_ok {
        return Err(ApiError::field(
            "commit",
            "commit must be a hexadecimal commit sha (4 to 64 digits)",
        ));
    }
    let key = idempotency_key(&headers)?;
    let fingerprint = format!(
        "sha256:{}",
        hex::encode(Sha256::digest(
            serde_json::to_vec(&body).unwrap_or_default()
        ))
    );
    // One keyed request at a time in this process; across processes the store keeps the
    // first record and a losing duplicate run is cancelled below.
    let _guard = match &key {
        Some(_) => Some(state.idempotency.lock().await),
        None => None,
    };
    if let Some(key) = &key
        && let Some(record) = state.store.get_idempotency_record(id, key).await?
    {
        return replay(&state, &record, &fingerprint).await;
    }

    let project = state.store.get_project(repo.project_id).await?;
    let spec = config::parse(config::FILE_NAME, &pipeline.source_spec).map_err(|e| {
        ApiError::conflict(format!(
            "pipeline {id}'s stored configuration is no longer valid: {e}"
        ))
    })?;
    let git_ref = body.git_ref.clone().unwrap_or_else(|| body.branch.clone());
    let request = RunRequest {
        pipeline_id: pipeline.id,
        pipeline_name: pipeline.name.clone(),
        project_name: project.name.clone(),
        spec: Arc::new(spec),
        source: SourceSpec {
            clone_url: repo.clone_url.clone(),
            commit: body.commit.to_ascii_lowercase(),
            git_ref,
            copy_working_tree: false,
        },
        branch: body.branch.clone(),
        default_branch: repo.default_branch.clone(),
        trigger: body.trigger,
        stages: body.stages.clone(),
        requested_by: caller.name(),
    };
    let run_id = state.driver.submit_run(request).await.map_err(plan_error)?;
    tracing::info!(run_id = %run_id, pipeline_id = %id, trigger = %body.trigger, "run requested");
    if let Some(key) = key {
        let record = IdempotencyRecord {
            pipeline_id: id,
            key,
            fingerprint: fingerprint.clone(),
            run_id,
            created_at: Timestamp::now(),
        };
        let stored = state.store.put_idempotency_record(&record).await?;
        if stored.run_id != run_id {
            // Another replica recorded this key first: ours is a duplicate.
            if let Err(e) = state
                .driver
                .request_cancel(run_id, "idempotency-key duplicate")
                .await
            {
                tracing::warn!(run_id = %run_id, error = %e, "cannot cancel a duplicate run");
            }
            return replay(&state, &stored, &fingerprint).await;
        }
    }
    let run = state.store.get_run(run_id).await?;
    Ok((StatusCode::CREATED, Json(run.into())))
}

async fn replay(
    state: &AppState,
    record: &IdempotencyRecord,
    fingerprint: &str,
) -> ApiResult<(StatusCode, Json<RunDto>)> {
    if record.fingerprint != fingerprint {
        return Err(ApiError::conflict(format!(
            "Idempotency-Key '{}' was used for a different request (run {})",
            record.key, record.run_id
        )));
    }
    let run = state.store.get_run(record.run_id).await?;
    Ok((StatusCode::OK, Json(run.into())))
}

/// List runs, newest first, filtered by pipeline, status and branch.
#[utoipa::path(get, path = "/v1/pipeline-runs", tag = "runs",
    params(RunQuery),
    responses(
        (status = 200, description = "A page", body = PageDto<RunDto>),
        (status = 400, description = "Invalid filter or cursor", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_runs(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<RunQuery>,
) -> ApiResult<Json<PageDto<RunDto>>> {
    let token = caller.require(TokenRole::Viewer)?.clone();
    if let Some(p) = q.pipeline {
        state
            .authorize_pipeline(&caller, TokenRole::Viewer, p)
            .await?;
    }
    let filter = RunFilter {
        pipeline_id: q.pipeline,
        status: q.status,
        git_ref: q.branch,
        trigger: None,
    };
    let page = state
        .store
        .list_runs(&filter, &page_request(q.limit, q.cursor)?)
        .await
        .map_err(cursor_error)?;
    let mut items = Vec::with_capacity(page.items.len());
    let mut allowed = std::collections::HashMap::new();
    for run in page.items {
        let ok = match (token.scope.as_list(), allowed.get(&run.pipeline_id)) {
            (None, _) => true,
            (Some(_), Some(ok)) => *ok,
            (Some(_), None) => {
                let ok = token
                    .scope
                    .allows(state.project_of_pipeline(run.pipeline_id).await?);
                allowed.insert(run.pipeline_id, ok);
                ok
            }
        };
        if ok {
            items.push(RunDto::from(run));
        }
    }
    Ok(Json(PageDto {
        items,
        next_cursor: page.next_cursor,
    }))
}

/// A run the caller may see with `role`.
pub(crate) async fn visible_run(
    state: &AppState,
    caller: &Caller,
    role: TokenRole,
    id: RunId,
) -> ApiResult<PipelineRun> {
    caller.require(role)?;
    let run = state.store.get_run(id).await?;
    state
        .authorize_pipeline(caller, role, run.pipeline_id)
        .await?;
    Ok(run)
}

/// Get a run (DMD §4.1).
#[utoipa::path(get, path = "/v1/pipeline-runs/{id}", tag = "runs",
    params(("id" = String, Path, format = Uuid, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = RunDto),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<RunId>,
) -> ApiResult<Json<RunDto>> {
    Ok(Json(
        visible_run(&state, &caller, TokenRole::Viewer, id)
            .await?
            .into(),
    ))
}

/// A run's jobs in stage order (DMD §4.1).
#[utoipa::path(get, path = "/v1/pipeline-runs/{id}/jobs", tag = "runs",
    params(("id" = String, Path, format = Uuid, description = "Run id")),
    responses(
        (status = 200, description = "The jobs", body = Vec<JobDto>),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_jobs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<RunId>,
) -> ApiResult<Json<Vec<JobDto>>> {
    visible_run(&state, &caller, TokenRole::Viewer, id).await?;
    let jobs = state.store.list_jobs(id).await?;
    Ok(Json(jobs.into_iter().map(JobDto::from).collect()))
}

/// A run's steps, by job then order, each with its executions.
#[utoipa::path(get, path = "/v1/pipeline-runs/{id}/steps", tag = "runs",
    params(("id" = String, Path, format = Uuid, description = "Run id")),
    responses(
        (status = 200, description = "The steps", body = Vec<StepDto>),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_steps(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<RunId>,
) -> ApiResult<Json<Vec<StepDto>>> {
    visible_run(&state, &caller, TokenRole::Viewer, id).await?;
    let record = state.store.load_run(id).await?;
    let mut executions = record.executions;
    let steps = record
        .steps
        .into_iter()
        .map(|s| {
            let (mine, rest): (Vec<_>, Vec<_>) =
                executions.drain(..).partition(|e| e.job_step_id == s.id);
            executions = rest;
            StepDto::new(s, mine.into_iter().map(ExecutionDto::from).collect())
        })
        .collect();
    Ok(Json(steps))
}

/// The artifacts a run's jobs produced, oldest first.
#[utoipa::path(get, path = "/v1/pipeline-runs/{id}/artifacts", tag = "runs",
    params(("id" = String, Path, format = Uuid, description = "Run id")),
    responses(
        (status = 200, description = "The artifacts", body = Vec<ArtifactDto>),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn list_run_artifacts(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<RunId>,
) -> ApiResult<Json<Vec<ArtifactDto>>> {
    visible_run(&state, &caller, TokenRole::Viewer, id).await?;
    let artifacts = state.store.list_artifacts(id).await?;
    Ok(Json(artifacts.into_iter().map(ArtifactDto::from).collect()))
}

/// Ask to cancel a run: its active executions are stopped and it ends `canceled`.
#[utoipa::path(post, path = "/v1/pipeline-runs/{id}/cancel", tag = "runs",
    params(("id" = String, Path, format = Uuid, description = "Run id")),
    responses(
        (status = 202, description = "Cancellation requested", body = RunDto),
        (status = 404, description = "Not found", body = ErrorBody),
        (status = 409, description = "The run has already ended", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn cancel_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<RunId>,
) -> ApiResult<(StatusCode, Json<RunDto>)> {
    let run = visible_run(&state, &caller, TokenRole::Developer, id).await?;
    if run.status.is_terminal() {
        return Err(ApiError::conflict(format!(
            "run {id} has already ended ({})",
            run.status
        )));
    }
    // Recorded in the store, so the replica that drives the run cancels it.
    state.driver.request_cancel(id, &caller.name()).await?;
    tracing::info!(run_id = %id, "run cancellation requested");
    Ok((StatusCode::ACCEPTED, Json(run.into())))
}

/// Retry a failed or cancelled run from its failed stage: a new run linked by `retry_of`
/// that reuses the artifacts of the stages that succeeded.
#[utoipa::path(post, path = "/v1/pipeline-runs/{id}/retry", tag = "runs",
    params(("id" = String, Path, format = Uuid, description = "Run id")),
    responses(
        (status = 201, description = "The new run", body = RunDto),
        (status = 404, description = "Not found", body = ErrorBody),
        (status = 409, description = "The run cannot be retried (still running, or succeeded)", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn retry_run(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<RunId>,
) -> ApiResult<(StatusCode, Json<RunDto>)> {
    visible_run(&state, &caller, TokenRole::Developer, id).await?;
    let new = match state.driver.retry_run(id, &caller.name()).await {
        Ok(new) => new,
        Err(DriverError::Plan(e)) => return Err(ApiError::conflict(e.to_string())),
        Err(e) => return Err(e.into()),
    };
    tracing::info!(run_id = %new, retry_of = %id, "run retried");
    let run = state.store.get_run(new).await?;
    Ok((StatusCode::CREATED, Json(run.into())))
}
