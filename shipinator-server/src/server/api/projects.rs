//! Projects, repositories and pipelines.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use shipinator_core::config;
use shipinator_core::domain::{
    Pipeline, PipelineId, Project, ProjectId, Repository, RepositoryId, TokenRole, Trigger,
};
use shipinator_core::store::Page;
use shipinator_core::time::Timestamp;
use utoipa::IntoParams;

use super::{ApiJson, ApiPath, ApiQuery, cursor_error, page_request, required_text};
use crate::server::AppState;
use crate::server::auth::Caller;
use crate::server::dto::{
    CreatePipeline, CreateProject, CreateRepository, PageDto, PageQuery, PipelineDto, ProjectDto,
    RepositoryDto,
};
use crate::server::error::{ApiError, ApiResult, ErrorBody};

fn page_dto<T, D: From<T>>(page: Page<T>, keep: impl Fn(&T) -> bool) -> PageDto<D> {
    PageDto {
        items: page
            .items
            .into_iter()
            .filter(|i| keep(i))
            .map(D::from)
            .collect(),
        next_cursor: page.next_cursor,
    }
}

/// Create a project (admin scoped to every project).
#[utoipa::path(post, path = "/v1/projects", tag = "projects",
    request_body = CreateProject,
    responses(
        (status = 201, description = "Created", body = ProjectDto),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_project(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateProject>,
) -> ApiResult<(StatusCode, Json<ProjectDto>)> {
    caller.require_global_admin()?;
    required_text("name", &body.name, 200)?;
    let now = Timestamp::now();
    let project = Project {
        id: ProjectId::new_v7(),
        name: body.name,
        description: body.description,
        created_at: now,
        updated_at: now,
    };
    state.store.create_project(&project).await?;
    Ok((StatusCode::CREATED, Json(project.into())))
}

/// List the projects the token may see.
#[utoipa::path(get, path = "/v1/projects", tag = "projects",
    params(PageQuery),
    responses((status = 200, description = "A page", body = PageDto<ProjectDto>)),
    security(("bearer" = [])))]
pub(crate) async fn list_projects(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> ApiResult<Json<PageDto<ProjectDto>>> {
    let token = caller.require(TokenRole::Viewer)?;
    let page = state
        .store
        .list_projects(&page_request(q.limit, q.cursor)?)
        .await
        .map_err(cursor_error)?;
    Ok(Json(page_dto(page, |p: &Project| token.scope.allows(p.id))))
}

/// Get a project.
#[utoipa::path(get, path = "/v1/projects/{id}", tag = "projects",
    params(("id" = String, Path, format = Uuid, description = "Project id")),
    responses(
        (status = 200, description = "The project", body = ProjectDto),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_project(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ProjectId>,
) -> ApiResult<Json<ProjectDto>> {
    caller.require_project(TokenRole::Viewer, id)?;
    Ok(Json(state.store.get_project(id).await?.into()))
}

/// Register a repository of a project (admin of the project).
#[utoipa::path(post, path = "/v1/repositories", tag = "projects",
    request_body = CreateRepository,
    responses(
        (status = 201, description = "Created", body = RepositoryDto),
        (status = 400, description = "Invalid field", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_repository(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateRepository>,
) -> ApiResult<(StatusCode, Json<RepositoryDto>)> {
    caller.require_project(TokenRole::Admin, body.project_id)?;
    required_text("clone_url", &body.clone_url, 2000)?;
    let url = body.clone_url.trim();
    let scheme_ok = ["file://", "https://", "http://", "ssh://", "git://"]
        .iter()
        .any(|s| url.starts_with(s))
        || (url.contains('@') && url.contains(':'));
    if !scheme_ok {
        return Err(ApiError::field(
            "clone_url",
            "clone_url must be a file://, https://, http://, ssh:// or git:// URL (or user@host:path)",
        ));
    }
    let default_branch = body.default_branch.unwrap_or_else(|| "main".to_owned());
    required_text("default_branch", &default_branch, 255)?;
    let provider = body.provider.unwrap_or_else(|| "git".to_owned());
    required_text("provider", &provider, 64)?;
    match state.store.get_project(body.project_id).await {
        Ok(_) => {}
        Err(shipinator_core::store::StoreError::NotFound { .. }) => {
            return Err(ApiError::field(
                "project_id",
                format!("project {} does not exist", body.project_id),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let now = Timestamp::now();
    let repo = Repository {
        id: RepositoryId::new_v7(),
        project_id: body.project_id,
        vcs_provider: provider,
        clone_url: url.to_owned(),
        default_branch,
        created_at: now,
        updated_at: now,
    };
    state.store.create_repository(&repo).await?;
    Ok((StatusCode::CREATED, Json(repo.into())))
}

/// Repository listing filter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct RepositoryQuery {
    /// Repositories of this project.
    #[param(value_type = Option<String>, format = Uuid)]
    project: Option<ProjectId>,
    /// Items per page, 1 to 1000 (default 50).
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// List repositories.
#[utoipa::path(get, path = "/v1/repositories", tag = "projects",
    params(RepositoryQuery),
    responses((status = 200, description = "A page", body = PageDto<RepositoryDto>)),
    security(("bearer" = [])))]
pub(crate) async fn list_repositories(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<RepositoryQuery>,
) -> ApiResult<Json<PageDto<RepositoryDto>>> {
    let token = caller.require(TokenRole::Viewer)?;
    if let Some(p) = q.project {
        caller.require_project(TokenRole::Viewer, p)?;
    }
    let page = state
        .store
        .list_repositories(q.project, &page_request(q.limit, q.cursor)?)
        .await
        .map_err(cursor_error)?;
    Ok(Json(page_dto(page, |r: &Repository| {
        token.scope.allows(r.project_id)
    })))
}

/// Get a repository.
#[utoipa::path(get, path = "/v1/repositories/{id}", tag = "projects",
    params(("id" = String, Path, format = Uuid, description = "Repository id")),
    responses(
        (status = 200, description = "The repository", body = RepositoryDto),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_repository(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<RepositoryId>,
) -> ApiResult<Json<RepositoryDto>> {
    caller.require(TokenRole::Viewer)?;
    let repo = state.store.get_repository(id).await?;
    caller.require_project(TokenRole::Viewer, repo.project_id)?;
    Ok(Json(repo.into()))
}

/// Reads `.shipinator.yaml` from the repository at `reference` (a branch, tag or commit),
/// through the repository's mirror in the data directory: what the remote holds, never a
/// working tree. Bounded by the JSON body limit, the size the text could have had as `config`.
async fn read_from_repository(
    state: &AppState,
    repo: &Repository,
    reference: &str,
) -> ApiResult<String> {
    let file = shipinator_local::worker::read_at_ref(
        &state.data_dir,
        &shipinator_local::worker::BaseEnv::from_process(),
        &repo.clone_url,
        reference,
        config::FILE_NAME,
        u64::try_from(state.limits.json_body_bytes).unwrap_or(u64::MAX),
    )
    .await
    .map_err(|e| {
        ApiError::field(
            "from_ref",
            format!(
                "cannot read {} at '{reference}': {}",
                config::FILE_NAME,
                shipinator_local::error_chain(&e)
            ),
        )
    })?;
    tracing::info!(
        repository_id = %repo.id,
        reference,
        commit = %file.commit,
        "read the pipeline configuration from the repository"
    );
    Ok(file.text)
}

/// Create a pipeline from a `.shipinator.yaml` (admin of the project).
#[utoipa::path(post, path = "/v1/pipelines", tag = "projects",
    request_body = CreatePipeline,
    responses(
        (status = 201, description = "Created", body = PipelineDto),
        (status = 400, description = "Invalid field, or `invalid_config` with located problems in `details`", body = ErrorBody),
        (status = 409, description = "Name taken in the repository", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreatePipeline>,
) -> ApiResult<(StatusCode, Json<PipelineDto>)> {
    caller.require(TokenRole::Admin)?;
    let repo = match state.store.get_repository(body.repository_id).await {
        Ok(r) => r,
        Err(shipinator_core::store::StoreError::NotFound { .. }) => {
            return Err(ApiError::field(
                "repository_id",
                format!("repository {} does not exist", body.repository_id),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    caller.require_project(TokenRole::Admin, repo.project_id)?;
    required_text("name", &body.name, 200)?;
    let text = match (body.config, body.from_ref) {
        (Some(text), None) => text,
        (None, Some(reference)) => read_from_repository(&state, &repo, &reference).await?,
        (Some(_), Some(_)) => {
            return Err(ApiError::field(
                "from_ref",
                "send either `config` or `from_ref`, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::field(
                "config",
                "send the .shipinator.yaml text as `config`, or `from_ref` to read it from the repository",
            ));
        }
    };
    if let Err(errors) = config::parse(config::FILE_NAME, &text) {
        let mut e = ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_config",
            format!(
                "the pipeline configuration has {} problem(s): {errors}",
                errors.len()
            ),
        );
        e.field = Some("config".to_owned());
        e.details = errors
            .errors()
            .iter()
            .map(|c| {
                serde_json::json!({
                    "line": c.line, "column": c.column,
                    "code": c.code.to_string(), "message": c.message,
                })
            })
            .collect();
        return Err(e);
    }
    let existing = state
        .store
        .list_pipelines(
            Some(repo.id),
            &shipinator_core::store::PageRequest::first(1000),
        )
        .await?;
    if existing.items.iter().any(|p| p.name == body.name) {
        return Err(ApiError::conflict(format!(
            "repository {} already has a pipeline named '{}'",
            repo.id, body.name
        )));
    }
    let now = Timestamp::now();
    let pipeline = Pipeline {
        id: PipelineId::new_v7(),
        repository_id: repo.id,
        name: body.name,
        trigger_type: body.trigger_type.unwrap_or(Trigger::Manual),
        source_spec: text,
        created_at: now,
        updated_at: now,
    };
    state.store.create_pipeline(&pipeline).await?;
    Ok((StatusCode::CREATED, Json(pipeline.into())))
}

/// Pipeline listing filter.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct PipelineQuery {
    /// Pipelines of this repository.
    #[param(value_type = Option<String>, format = Uuid)]
    repository: Option<RepositoryId>,
    /// Items per page, 1 to 1000 (default 50).
    limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// List pipelines.
#[utoipa::path(get, path = "/v1/pipelines", tag = "projects",
    params(PipelineQuery),
    responses((status = 200, description = "A page", body = PageDto<PipelineDto>)),
    security(("bearer" = [])))]
pub(crate) async fn list_pipelines(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<PipelineQuery>,
) -> ApiResult<Json<PageDto<PipelineDto>>> {
    let token = caller.require(TokenRole::Viewer)?;
    let page = state
        .store
        .list_pipelines(q.repository, &page_request(q.limit, q.cursor)?)
        .await
        .map_err(cursor_error)?;
    if token.scope.as_list().is_none() {
        return Ok(Json(page_dto(page, |_| true)));
    }
    let mut items = Vec::with_capacity(page.items.len());
    for p in page.items {
        if token.scope.allows(state.project_of_pipeline(p.id).await?) {
            items.push(PipelineDto::from(p));
        }
    }
    Ok(Json(PageDto {
        items,
        next_cursor: page.next_cursor,
    }))
}

/// Get a pipeline.
#[utoipa::path(get, path = "/v1/pipelines/{id}", tag = "projects",
    params(("id" = String, Path, format = Uuid, description = "Pipeline id")),
    responses(
        (status = 200, description = "The pipeline", body = PipelineDto),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_pipeline(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<PipelineId>,
) -> ApiResult<Json<PipelineDto>> {
    caller.require(TokenRole::Viewer)?;
    let pipeline = state.store.get_pipeline(id).await?;
    state
        .authorize_pipeline(&caller, TokenRole::Viewer, id)
        .await?;
    Ok(Json(pipeline.into()))
}
