//! API tokens and run idempotency keys: the rows the HTTP API keeps next to the DMD tables.

use serde::{Deserialize, Serialize};

use crate::domain::{ApiTokenId, PipelineId, ProjectId, RunId, TokenRole};
use crate::time::Timestamp;

/// Which projects a token may act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjectScope {
    /// Every project, including those created later.
    All,
    /// Only these projects.
    Projects(Vec<ProjectId>),
}

impl ProjectScope {
    /// Whether `project` is in scope.
    pub fn allows(&self, project: ProjectId) -> bool {
        match self {
            ProjectScope::All => true,
            ProjectScope::Projects(ids) => ids.contains(&project),
        }
    }

    /// The project list, `None` for [`ProjectScope::All`] (how stores persist it).
    pub fn as_list(&self) -> Option<&[ProjectId]> {
        match self {
            ProjectScope::All => None,
            ProjectScope::Projects(ids) => Some(ids),
        }
    }

    /// The inverse of [`as_list`](Self::as_list).
    pub fn from_list(ids: Option<Vec<ProjectId>>) -> Self {
        ids.map_or(ProjectScope::All, ProjectScope::Projects)
    }
}

/// An API token as stored. The secret itself is never stored: only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    /// Id.
    pub id: ApiTokenId,
    /// A name for people (`ci`, `alice`); not unique.
    pub name: String,
    /// What it may do.
    pub role: TokenRole,
    /// Where it may do it.
    pub scope: ProjectScope,
    /// Lower-case hex SHA-256 of the secret (64 characters), unique.
    pub secret_sha256: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// When it last authenticated a request (updated at most about once a minute).
    pub last_used_at: Option<Timestamp>,
    /// When it was revoked; a revoked token authenticates nothing.
    pub revoked_at: Option<Timestamp>,
}

/// What one `Idempotency-Key` of one pipeline created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The pipeline the run request was sent to; keys are unique per pipeline.
    pub pipeline_id: PipelineId,
    /// The client's key.
    pub key: String,
    /// A digest of the request body: the same key with another body is a conflict.
    pub fingerprint: String,
    /// The run the first request created.
    pub run_id: RunId,
    /// When it was recorded.
    pub created_at: Timestamp,
}
