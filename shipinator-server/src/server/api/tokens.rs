//! API token management (admin scoped to every project).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use shipinator_core::domain::ApiTokenId;
use shipinator_core::store::{ApiToken, ProjectScope, StoreError};
use shipinator_core::time::Timestamp;

use super::{ApiJson, ApiPath, required_text};
use crate::server::AppState;
use crate::server::auth::{Caller, hash_token, new_api_token};
use crate::server::dto::{CreateToken, CreatedToken, TokenDto};
use crate::server::error::{ApiError, ApiResult, ErrorBody};

/// Create a token; its secret is in the response and nowhere else.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens",
    request_body = CreateToken,
    responses(
        (status = 201, description = "Created; `token` is shown only here", body = CreatedToken),
        (status = 400, description = "Invalid field", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> ApiResult<(StatusCode, Json<CreatedToken>)> {
    caller.require_global_admin()?;
    required_text("name", &body.name, 200)?;
    if let Some(projects) = &body.projects {
        if projects.is_empty() {
            return Err(ApiError::field(
                "projects",
                "projects must list at least one project; omit it for every project",
            ));
        }
        for p in projects {
            match state.store.get_project(*p).await {
                Ok(_) => {}
                Err(StoreError::NotFound { .. }) => {
                    return Err(ApiError::field(
                        "projects",
                        format!("project {p} does not exist"),
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    let (secret, token) = issue(
        &state,
        body.name,
        body.role,
        ProjectScope::from_list(body.projects),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            token: secret,
            info: token.into(),
        }),
    ))
}

/// Creates and stores a token; returns its secret and record.
pub(crate) async fn issue(
    state: &AppState,
    name: String,
    role: shipinator_core::domain::TokenRole,
    scope: ProjectScope,
) -> ApiResult<(String, ApiToken)> {
    let (secret, token) = mint(ApiTokenId::new_v7(), name, role, scope)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    state.store.create_api_token(&token).await?;
    Ok((secret, token))
}

/// A new token under `id` and its secret (random); the token holds only the secret's hash.
pub(crate) fn mint(
    id: ApiTokenId,
    name: String,
    role: shipinator_core::domain::TokenRole,
    scope: ProjectScope,
) -> anyhow::Result<(String, ApiToken)> {
    let secret = new_api_token()?;
    let token = ApiToken {
        id,
        name,
        role,
        scope,
        secret_sha256: hash_token(&secret),
        created_at: Timestamp::now(),
        last_used_at: None,
        revoked_at: None,
    };
    Ok((secret, token))
}

/// List tokens (never their secrets), newest first.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "The tokens", body = Vec<TokenDto>)),
    security(("bearer" = [])))]
pub(crate) async fn list_tokens(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<Vec<TokenDto>>> {
    caller.require_global_admin()?;
    let tokens = state.store.list_api_tokens().await?;
    Ok(Json(tokens.into_iter().map(TokenDto::from).collect()))
}

/// Revoke a token: it authenticates nothing from now on.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, format = Uuid, description = "Token id")),
    responses(
        (status = 200, description = "Revoked", body = TokenDto),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn revoke_token(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ApiTokenId>,
) -> ApiResult<Json<TokenDto>> {
    caller.require_global_admin()?;
    let token = state.store.revoke_api_token(id, Timestamp::now()).await?;
    state.tokens.forget(id);
    Ok(Json(token.into()))
}
