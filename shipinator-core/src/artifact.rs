//! The bytes of artifacts (TDD §11, DMD §3). Metadata rows live in the [`Store`](crate::store::Store);
//! the store here keeps the payload and a copy of its metadata beside it.

use std::collections::BTreeMap;
use std::fmt;
use std::pin::Pin;

use bytes::Bytes;
use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::domain::{ArtifactId, ArtifactType, JobId, PipelineId, RunId, StepId};
use crate::error::BoxError;
use crate::time::Timestamp;

/// A stream of payload chunks.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// Metadata stored with a payload (`metadata.json` in the DMD layout).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ArtifactMeta {
    /// Type; `None` when the caller does not know (raw uploads).
    pub artifact_type: Option<ArtifactType>,
    /// MIME type, e.g. `application/gzip`.
    pub content_type: Option<String>,
    /// The original file name (sanitised by the store).
    pub file_name: Option<String>,
    /// Producing run.
    pub run_id: Option<RunId>,
    /// Producing pipeline.
    pub pipeline_id: Option<PipelineId>,
    /// Producing job.
    pub job_id: Option<JobId>,
    /// Producing step.
    pub step_id: Option<StepId>,
    /// Free-form extra fields (image ref and digest for OCI images, ...).
    pub extra: BTreeMap<String, String>,
}

/// What a successful `put` stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredArtifact {
    /// The id.
    pub id: ArtifactId,
    /// Backend name (`nfs`, `s3`, `memory`): `artifacts.storage_backend`.
    pub backend: String,
    /// Where within the backend: `artifacts.storage_path`.
    pub storage_path: String,
    /// Payload size in bytes.
    pub size: u64,
    /// `sha256:<hex>` of the payload, computed while writing.
    pub checksum: String,
    /// When it was stored.
    pub created_at: Timestamp,
    /// The metadata as stored.
    pub meta: ArtifactMeta,
}

/// A byte range of a payload, like HTTP `Range: bytes=start-end` (end exclusive here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte; `None` for "to the end".
    pub end: Option<u64>,
}

/// Options for [`ArtifactStore::get`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GetOptions {
    /// Read only this range.
    pub range: Option<ByteRange>,
    /// Verify the whole payload's sha256 against the stored one while streaming; a mismatch
    /// ends the stream with an `InvalidData` error. Ignored for range reads.
    pub verify_checksum: bool,
}

/// An open payload.
pub struct ArtifactRead {
    /// What is stored.
    pub stored: StoredArtifact,
    /// The byte range this stream covers (the whole payload when no range was asked).
    pub range: ByteRange,
    /// The bytes.
    pub body: ByteStream,
}

impl fmt::Debug for ArtifactRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactRead")
            .field("stored", &self.stored)
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// Errors of an [`ArtifactStore`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// No artifact with this id.
    #[error("artifact {id} not found")]
    NotFound {
        /// The id.
        id: ArtifactId,
    },
    /// An artifact with this id exists: artifacts are immutable.
    #[error("artifact {id} already exists; artifacts are immutable")]
    AlreadyExists {
        /// The id.
        id: ArtifactId,
    },
    /// The payload exceeds the configured limit.
    #[error("artifact {id} exceeds the size limit of {limit} bytes")]
    TooLarge {
        /// The id.
        id: ArtifactId,
        /// The limit.
        limit: u64,
    },
    /// A range outside the payload.
    #[error("range {start}..{end:?} is outside artifact {id} of {size} bytes")]
    InvalidRange {
        /// The id.
        id: ArtifactId,
        /// Requested start.
        start: u64,
        /// Requested end.
        end: Option<u64>,
        /// Payload size.
        size: u64,
    },
    /// The stored payload does not match its recorded size or checksum.
    #[error("artifact {id} is corrupt: {detail}")]
    Corrupt {
        /// The id.
        id: ArtifactId,
        /// What does not match.
        detail: String,
    },
    /// Reading the caller's stream failed.
    #[error("reading the upload for artifact {id} failed")]
    Upload {
        /// The id.
        id: ArtifactId,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The backend cannot be reached now.
    #[error("artifact store is unavailable")]
    Unavailable {
        /// Cause.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("{backend} artifact store failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Cause.
        #[source]
        source: BoxError,
    },
}

/// Stores artifact payloads, immutable and checksummed.
///
/// # Contract
/// Checked by `conformance::artifact`:
/// - `put` streams: a payload larger than any internal buffer round-trips byte for byte
///   without being held whole in memory; the sha256 is computed while writing.
/// - A second `put` under an existing id fails with `AlreadyExists` and leaves the first intact.
/// - `get`, `head` and `delete` of an unknown id fail with `NotFound`.
/// - `get` with a range returns exactly those bytes; a range past the end is `InvalidRange`.
/// - `delete` removes the artifact; `list` returns every stored id (order unspecified).
/// - A failed or abandoned `put` leaves nothing visible.
///
/// # Errors
/// See [`ArtifactError`].
#[async_trait::async_trait]
pub trait ArtifactStore: Send + Sync + fmt::Debug {
    /// Backend name stored in `artifacts.storage_backend`.
    fn backend(&self) -> &'static str;

    /// Stores a payload under `id`, streaming it.
    async fn put(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        body: ByteStream,
    ) -> Result<StoredArtifact, ArtifactError>;

    /// Opens a payload.
    async fn get(&self, id: ArtifactId, options: GetOptions)
    -> Result<ArtifactRead, ArtifactError>;

    /// The stored record without the payload.
    async fn head(&self, id: ArtifactId) -> Result<StoredArtifact, ArtifactError>;

    /// Removes a payload and its metadata.
    async fn delete(&self, id: ArtifactId) -> Result<(), ArtifactError>;

    /// Every stored id.
    async fn list(&self) -> Result<Vec<ArtifactId>, ArtifactError>;
}
