//! Authentication and authorisation.
//!
//! - **API tokens** (`shp_` + 64 hex digits: 32 random bytes) are shown once and stored as the
//!   SHA-256 of the whole token text. A token has a role — viewer (read), developer (read,
//!   trigger, cancel, retry), admin (everything) — and a scope: every project or a list.
//! - **Execution tokens** (`shpx_` + hex HMAC-SHA256(server secret, execution id as hyphenated
//!   text)) are derived, never stored: the executor hands one to each execution's worker. One
//!   is valid only for the worker endpoints of its own execution while that execution is not
//!   terminal in the store, and for reading the artifacts of its own run and of the runs that
//!   run retries.
//!
//! A verified API token is remembered for [`TOKEN_CACHE_TTL`] so that reads cost one store
//! query, not two. Revoking through this server forgets it at once; a revocation made
//! elsewhere (`shipinator tokens revoke`, another replica) takes effect within that TTL.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use shipinator_core::domain::{
    ApiTokenId, Artifact, ExecutionId, PipelineId, ProjectId, RunId, RunStatus, TokenRole,
};
use shipinator_core::store::{ApiToken, PageRequest, RunFilter, StoreError};
use shipinator_core::time::Timestamp;

use crate::server::AppState;
use crate::server::error::{ApiError, ApiResult};

/// Prefix of API tokens.
pub(crate) const API_TOKEN_PREFIX: &str = "shp_";
/// Prefix of execution tokens.
pub(crate) const EXECUTION_TOKEN_PREFIX: &str = "shpx_";

/// How stale `last_used_at` may get before a request refreshes it.
const TOUCH_INTERVAL: Duration = Duration::from_secs(60);

/// How long a verified API token is trusted without asking the store again.
pub(crate) const TOKEN_CACHE_TTL: Duration = Duration::from_secs(5);
/// Most tokens remembered at once; a full cache starts over.
const TOKEN_CACHE_CAPACITY: usize = 4096;

/// Verified, unrevoked API tokens by the SHA-256 of their text, each with when it was read.
#[derive(Debug, Default)]
pub(crate) struct TokenCache {
    entries: std::sync::Mutex<HashMap<String, (ApiToken, Instant)>>,
}

impl TokenCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ApiToken, Instant)>> {
        // A panic while holding the lock leaves a map that is still consistent.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The token, if it was verified less than the TTL ago. When its `last_used_at` is
    /// stale, the cached copy is refreshed to `now` and `true` says the store should be too.
    fn get(&self, hash: &str, now: Timestamp) -> Option<(ApiToken, bool)> {
        let mut entries = self.lock();
        let (token, read_at) = entries.get_mut(hash)?;
        if read_at.elapsed() >= TOKEN_CACHE_TTL {
            entries.remove(hash);
            return None;
        }
        let stale = is_stale(token, now);
        if stale {
            token.last_used_at = Some(now);
        }
        Some((token.clone(), stale))
    }

    fn put(&self, hash: String, token: ApiToken) {
        let mut entries = self.lock();
        if entries.len() >= TOKEN_CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert(hash, (token, Instant::now()));
    }

    /// Forgets token `id` (it was revoked).
    pub(crate) fn forget(&self, id: ApiTokenId) {
        self.lock().retain(|_, (t, _)| t.id != id);
    }
}

fn is_stale(token: &ApiToken, now: Timestamp) -> bool {
    token
        .last_used_at
        .is_none_or(|t| now.saturating_duration_since(t) >= TOUCH_INTERVAL)
}

/// A fresh API token: `shp_` and 32 random bytes in hex.
pub(crate) fn new_api_token() -> anyhow::Result<String> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("the system random source failed: {e}"))?;
    Ok(format!("{API_TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// The stored form of a token: lower-case hex SHA-256 of its text.
pub(crate) fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of one execution: `shpx_` + hex(HMAC-SHA256(`secret`, execution id as text)).
///
/// Give it to executors (the Kubernetes executor's `token_provider`) so the execution's worker
/// can call back; it stops working when the execution is terminal.
pub(crate) fn execution_token(secret: &[u8], execution_id: ExecutionId) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(execution_id.to_string().as_bytes());
    format!(
        "{EXECUTION_TOKEN_PREFIX}{}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Constant-time comparison of two token texts.
fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0_u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Who is calling.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// An API token (not revoked).
    Token(ApiToken),
    /// An execution token, checked by the endpoint against the execution it names.
    Execution(String),
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "authentication required: send `Authorization: Bearer <token>`",
            ));
        };
        let text = value.to_str().unwrap_or_default();
        let Some(token) = text
            .strip_prefix("Bearer ")
            .or_else(|| text.strip_prefix("bearer "))
            .map(str::trim)
        else {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ));
        };
        if token.starts_with(EXECUTION_TOKEN_PREFIX) {
            return Ok(Caller::Execution(token.to_owned()));
        }
        let hash = hash_token(token);
        let now = Timestamp::now();
        let (found, stale) = match state.tokens.get(&hash, now) {
            Some(cached) => cached,
            None => {
                let mut found = match state.store.find_api_token(&hash).await {
                    Ok(t) => t,
                    Err(StoreError::NotFound { .. }) => {
                        return Err(ApiError::unauthorized("unknown token"));
                    }
                    Err(e) => return Err(e.into()),
                };
                if found.revoked_at.is_some() {
                    return Err(ApiError::unauthorized("this token was revoked"));
                }
                let stale = is_stale(&found, now);
                if stale {
                    found.last_used_at = Some(now);
                }
                state.tokens.put(hash, found.clone());
                (found, stale)
            }
        };
        if stale {
            let store = std::sync::Arc::clone(&state.store);
            let id = found.id;
            tokio::spawn(async move {
                if let Err(e) = store.touch_api_token(id, now).await {
                    tracing::debug!(token_id = %id, error = %e, "recording token use failed");
                }
            });
        }
        Ok(Caller::Token(found))
    }
}

impl Caller {
    /// The API token, when it has at least `role`.
    pub(crate) fn require(&self, role: TokenRole) -> ApiResult<&ApiToken> {
        match self {
            Caller::Execution(_) => Err(ApiError::forbidden(
                "an execution token may only call its execution's worker endpoints and read \
                 its run's artifacts",
            )),
            Caller::Token(t) if t.role >= role => Ok(t),
            Caller::Token(t) => Err(ApiError::forbidden(format!(
                "token '{}' has role {}; this needs {role}",
                t.name, t.role
            ))),
        }
    }

    /// The API token, when it has at least `role` on `project`.
    pub(crate) fn require_project(
        &self,
        role: TokenRole,
        project: ProjectId,
    ) -> ApiResult<&ApiToken> {
        let t = self.require(role)?;
        if t.scope.allows(project) {
            Ok(t)
        } else {
            Err(ApiError::forbidden(format!(
                "token '{}' is not scoped to project {project}",
                t.name
            )))
        }
    }

    /// An admin token scoped to every project (token management).
    pub(crate) fn require_global_admin(&self) -> ApiResult<&ApiToken> {
        let t = self.require(TokenRole::Admin)?;
        if t.scope.as_list().is_some() {
            return Err(ApiError::forbidden(
                "managing tokens needs an admin token scoped to every project",
            ));
        }
        Ok(t)
    }

    /// Who to record as `requested_by`.
    pub(crate) fn name(&self) -> String {
        match self {
            Caller::Token(t) => format!("token:{}", t.name),
            Caller::Execution(_) => "execution".to_owned(),
        }
    }
}

impl AppState {
    /// The project a pipeline belongs to.
    /// Pipelines never move, so the answer is remembered.
    pub(crate) async fn project_of_pipeline(&self, pipeline: PipelineId) -> ApiResult<ProjectId> {
        if let Some(project) = self.pipeline_projects.get(pipeline) {
            return Ok(project);
        }
        let p = self.store.get_pipeline(pipeline).await?;
        let project = self.store.get_repository(p.repository_id).await?.project_id;
        self.pipeline_projects.put(pipeline, project);
        Ok(project)
    }

    /// Checks that `caller` may read or act on (with `role`) what belongs to `pipeline`.
    pub(crate) async fn authorize_pipeline(
        &self,
        caller: &Caller,
        role: TokenRole,
        pipeline: PipelineId,
    ) -> ApiResult<()> {
        let token = caller.require(role)?;
        if token.scope.as_list().is_none() {
            return Ok(());
        }
        let project = self.project_of_pipeline(pipeline).await?;
        caller.require_project(role, project).map(|_| ())
    }

    /// Checks an execution token against execution `id`, which must exist and not be
    /// terminal. API tokens are refused: worker endpoints are for workers.
    pub(crate) async fn authorize_execution(
        &self,
        caller: &Caller,
        id: ExecutionId,
    ) -> ApiResult<shipinator_core::domain::Execution> {
        let execution = self.execution_of_token(caller, id).await?;
        if execution.status.is_terminal() {
            return Err(ApiError::forbidden(format!(
                "execution {id} has ended ({}); its token is no longer valid",
                execution.status
            )));
        }
        Ok(execution)
    }

    /// Checks an execution token against execution `id`, which must exist; it may have
    /// ended ([`authorize_execution`](Self::authorize_execution) refuses that).
    async fn execution_of_token(
        &self,
        caller: &Caller,
        id: ExecutionId,
    ) -> ApiResult<shipinator_core::domain::Execution> {
        let Caller::Execution(token) = caller else {
            return Err(ApiError::forbidden(
                "worker endpoints need the execution's own token",
            ));
        };
        if !same_token(token, &execution_token(&self.secret, id)) {
            return Err(ApiError::forbidden(format!(
                "this token is not the token of execution {id}"
            )));
        }
        Ok(self.store.get_execution(id).await?)
    }

    /// Checks that `caller` may read `artifact`: a viewer of its project, or the token of a
    /// live execution of the artifact's run or of a run retrying it.
    pub(crate) async fn authorize_artifact_read(
        &self,
        caller: &Caller,
        artifact: &Artifact,
    ) -> ApiResult<()> {
        let run = self.store.get_run(artifact.run_id).await?;
        let token = match caller {
            Caller::Token(_) => {
                return self
                    .authorize_pipeline(caller, TokenRole::Viewer, run.pipeline_id)
                    .await;
            }
            Caller::Execution(token) => token,
        };
        for status in [RunStatus::Running, RunStatus::Pending] {
            let filter = RunFilter {
                pipeline_id: Some(run.pipeline_id),
                status: Some(status),
                ..RunFilter::default()
            };
            let live = self
                .store
                .list_runs(&filter, &PageRequest::first(PageRequest::MAX_LIMIT))
                .await?;
            for candidate in live.items {
                let record = self.store.load_run(candidate.id).await?;
                let holds = record.executions.iter().any(|e| {
                    !e.status.is_terminal()
                        && same_token(token, &execution_token(&self.secret, e.id))
                });
                if holds && self.descends_from(candidate.id, artifact.run_id).await? {
                    return Ok(());
                }
            }
        }
        Err(ApiError::forbidden(format!(
            "this token may not read artifact {}",
            artifact.id
        )))
    }

    /// Whether `run` is `ancestor` or retries it (directly or through earlier retries).
    async fn descends_from(&self, run: RunId, ancestor: RunId) -> ApiResult<bool> {
        let mut current = Some(run);
        for _ in 0..64 {
            match current {
                Some(id) if id == ancestor => return Ok(true),
                Some(id) => current = self.store.get_run(id).await?.retry_of,
                None => return Ok(false),
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_tokens_are_per_execution_and_per_secret() {
        let a = ExecutionId::new_v7();
        let b = ExecutionId::new_v7();
        let t = execution_token(b"secret-one", a);
        assert!(t.starts_with(EXECUTION_TOKEN_PREFIX));
        assert_eq!(t.len(), EXECUTION_TOKEN_PREFIX.len() + 64);
        assert_eq!(t, execution_token(b"secret-one", a));
        assert_ne!(t, execution_token(b"secret-one", b));
        assert_ne!(t, execution_token(b"secret-two", a));
    }

    #[test]
    fn the_token_cache_remembers_refreshes_and_forgets() {
        let cache = TokenCache::default();
        let now = Timestamp::now();
        let token = ApiToken {
            id: ApiTokenId::new_v7(),
            name: "t".to_owned(),
            role: TokenRole::Viewer,
            scope: shipinator_core::store::ProjectScope::All,
            secret_sha256: "h".to_owned(),
            created_at: now,
            last_used_at: None,
            revoked_at: None,
        };
        assert!(cache.get("h", now).is_none());
        cache.put("h".to_owned(), token.clone());
        // Never used: the first hit asks for a store update, the next ones do not.
        let (hit, stale) = cache.get("h", now).expect("cached");
        assert_eq!(hit.id, token.id);
        assert!(stale);
        let (_, stale) = cache.get("h", now).expect("cached");
        assert!(!stale);
        cache.forget(ApiTokenId::new_v7());
        assert!(cache.get("h", now).is_some(), "another id leaves it");
        cache.forget(token.id);
        assert!(
            cache.get("h", now).is_none(),
            "a revoked token is forgotten"
        );
    }

    #[test]
    fn api_tokens_are_random_and_hashed() {
        let a = new_api_token().expect("random");
        let b = new_api_token().expect("random");
        assert_ne!(a, b);
        assert_eq!(a.len(), API_TOKEN_PREFIX.len() + 64);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
        assert!(same_token(&a, &a.clone()));
        assert!(!same_token(&a, &b));
    }
}
