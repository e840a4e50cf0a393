//! The `/v1` routes, each with its OpenAPI description.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use shipinator_core::store::PageRequest;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::server::AppState;
use crate::server::error::ApiError;

pub(crate) mod artifacts;
pub(crate) mod health;
pub(crate) mod logs;
pub(crate) mod projects;
pub(crate) mod runs;
pub(crate) mod tokens;
pub(crate) mod worker;

/// The document's fixed parts; paths are added by the routers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shipinator",
        description = "The Shipinator control plane API. Authenticate with \
                       `Authorization: Bearer <token>`. Errors have one shape: \
                       `{\"error\":{\"code\":\"...\",\"message\":\"...\"}}`."
    ),
    modifiers(&SecurityAddon),
    tags(
        (name = "projects", description = "Projects, repositories and pipelines"),
        (name = "runs", description = "Pipeline runs, their jobs, steps and logs"),
        (name = "artifacts", description = "Artifact metadata and payloads"),
        (name = "workers", description = "Executor callbacks: execution tokens only"),
        (name = "tokens", description = "API tokens (admin)"),
        (name = "health", description = "Probes and metrics (no authentication)"),
    )
)]
pub(crate) struct ApiDoc;

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Routes bounded by the request timeout and the JSON body limit.
pub(crate) fn bounded_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(projects::create_project, projects::list_projects))
        .routes(routes!(projects::get_project))
        .routes(routes!(
            projects::create_repository,
            projects::list_repositories
        ))
        .routes(routes!(projects::get_repository))
        .routes(routes!(projects::create_pipeline, projects::list_pipelines))
        .routes(routes!(projects::get_pipeline))
        .routes(routes!(runs::trigger_run))
        .routes(routes!(runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(runs::list_jobs))
        .routes(routes!(runs::list_steps))
        .routes(routes!(runs::list_run_artifacts))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(runs::retry_run))
        .routes(routes!(artifacts::get_metadata))
        .routes(routes!(worker::report_status))
        .routes(routes!(worker::append_logs))
        .routes(routes!(tokens::create_token, tokens::list_tokens))
        .routes(routes!(tokens::revoke_token))
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
}

/// Streaming routes: no request timeout (their bodies may take long), own size limits.
pub(crate) fn streaming_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(artifacts::download))
        .routes(routes!(worker::upload_artifact))
        .routes(routes!(logs::step_logs))
}

/// Documents the error answers every `/v1` operation can give besides its own: 400 (a path,
/// query, header or body the server refuses), 401, 403, 404 for paths naming an object, 413
/// and 415 for JSON bodies, and 503 while the database is unavailable; each with the one
/// error shape.
pub(crate) fn complete_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
    let error = |description: &str| -> RefOr<Response> {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
            .into()
    };
    for (path, item) in &mut doc.paths.paths {
        if !path.starts_with("/v1/") {
            continue;
        }
        let names_object = path.contains('{');
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in operations.into_iter().flatten() {
            let json_body = op
                .request_body
                .as_ref()
                .is_some_and(|b| b.content.keys().any(|k| k.starts_with("application/json")));
            let mut wanted = vec![
                ("400", "Invalid path, query, header or body"),
                ("401", "No token, or an unknown or revoked one"),
                ("403", "The token may not do this"),
                ("503", "The database is unavailable; retry later"),
            ];
            if names_object {
                wanted.push(("404", "Not found"));
            }
            if json_body {
                wanted.push(("413", "The body exceeds the configured limit"));
                wanted.push(("415", "The body is not sent as application/json"));
            }
            for (code, description) in wanted {
                op.responses
                    .responses
                    .entry(code.to_owned())
                    .or_insert_with(|| error(description));
            }
        }
    }
}

/// `Json` with the API's error shape.
#[derive(Debug)]
pub(crate) struct ApiJson<T>(pub(crate) T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(v)| ApiJson(v))
            .map_err(|e: JsonRejection| ApiError::from(e))
    }
}

/// `Path` with the API's error shape.
#[derive(Debug)]
pub(crate) struct ApiPath<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e: PathRejection| ApiError::from(e))
    }
}

/// `Query` with the API's error shape.
#[derive(Debug)]
pub(crate) struct ApiQuery<T>(pub(crate) T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| ApiError::from(e))
    }
}

/// A page request from query parameters, checking the limit.
pub(crate) fn page_request(
    limit: Option<u32>,
    cursor: Option<String>,
) -> Result<PageRequest, ApiError> {
    let limit = limit.unwrap_or(50);
    if limit == 0 || limit > PageRequest::MAX_LIMIT {
        return Err(ApiError::field(
            "limit",
            format!("limit must be between 1 and {}", PageRequest::MAX_LIMIT),
        ));
    }
    Ok(PageRequest { limit, cursor })
}

/// A store error about a cursor names the field.
pub(crate) fn cursor_error(e: shipinator_core::store::StoreError) -> ApiError {
    match e {
        shipinator_core::store::StoreError::Invalid { message } => {
            ApiError::field("cursor", message)
        }
        other => other.into(),
    }
}

/// Checks a required, bounded text field.
pub(crate) fn required_text(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::field(field, format!("{field} must not be empty")));
    }
    if value.chars().count() > max {
        return Err(ApiError::field(
            field,
            format!("{field} is longer than {max} characters"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::field(
            field,
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}
