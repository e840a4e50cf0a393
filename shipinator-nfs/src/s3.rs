//! [`S3ArtifactStore`]: artifacts in an S3 bucket through `object_store`.

use std::sync::Arc;

use bytes::BytesMut;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions as ObjectGetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, WriteMultipart,
};
use sha2::{Digest, Sha256};
use shipinator_core::artifact::{
    ArtifactError, ArtifactMeta, ArtifactRead, ArtifactStore, ByteRange, ByteStream, GetOptions,
    StoredArtifact,
};
use shipinator_core::domain::ArtifactId;
use shipinator_core::time::Timestamp;

use crate::error::Error;
use crate::fs::{METADATA_FILE, PAYLOAD_FILE, parse_canonical_id};
use crate::meta::{MetadataFile, check_range, sanitize_meta};

/// The backend name stored in `artifacts.storage_backend`.
pub const S3_BACKEND: &str = "s3";
/// The default multipart part size (S3's minimum is 5 MiB).
pub const DEFAULT_PART_SIZE: usize = 8 << 20;
/// The default number of parts uploaded at once.
pub const DEFAULT_MAX_CONCURRENCY: usize = 4;

/// An [`ArtifactStore`] in an S3 bucket (or any S3-compatible server).
///
/// # Layout
/// ```text
/// <bucket>/<prefix>/<artifact-id>/payload
/// <bucket>/<prefix>/<artifact-id>/metadata.json   the same format as the filesystem store
/// ```
/// `storage_path` is `<prefix>/<artifact-id>` (just `<artifact-id>` without a prefix).
///
/// # Uploads
/// Payloads up to one part (8 MiB by default) are stored with a single `PUT`; larger ones with
/// a multipart upload of that part size, at most 4 parts in flight by default, so memory stays
/// near `part size × (concurrency + 1)`. The sha256 is computed while streaming. A failed
/// upload is aborted; one killed outright leaves an incomplete multipart upload, invisible to
/// readers (configure the bucket's `AbortIncompleteMultipartUpload` lifecycle rule to reclaim
/// it).
///
/// # Immutability
/// `metadata.json` is the commit point: an artifact exists when its metadata does. It is
/// written last with a conditional create (`If-None-Match: *`, [`PutMode::Create`]), and
/// `put` checks for it with a `HEAD` before uploading. A second put after the first completed
/// is refused with `AlreadyExists` and changes nothing. **Race:** two puts of the same id that
/// run at the same time both pass the `HEAD` and both write the payload (S3 multipart uploads
/// cannot be conditional here); only one writes the metadata, and the stored payload may be the
/// loser's. A `get` with `verify_checksum` detects the mismatch. Ids are fresh UUIDs per
/// artifact, so this only happens when a client retries an upload concurrently with itself.
///
/// `get`, `head`, `list` and `delete` only see artifacts whose metadata exists; `delete`
/// removes the metadata first.
#[derive(Debug, Clone)]
pub struct S3ArtifactStore {
    store: Arc<dyn ObjectStore>,
    prefix: Option<ObjectPath>,
    size_limit: Option<u64>,
    part_size: usize,
    max_concurrency: usize,
}

/// Builds an [`S3ArtifactStore`] on `object_store`'s [`AmazonS3Builder`].
///
/// ```no_run
/// # fn main() -> Result<(), shipinator_nfs::Error> {
/// let store = shipinator_nfs::S3ArtifactStoreBuilder::from_env() // AWS_* variables
///     .with_bucket("shipinator-artifacts")
///     .with_prefix("prod")
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct S3ArtifactStoreBuilder {
    s3: AmazonS3Builder,
    prefix: String,
    size_limit: Option<u64>,
    part_size: usize,
    max_concurrency: usize,
}

impl Default for S3ArtifactStoreBuilder {
    fn default() -> Self {
        Self::with_s3(AmazonS3Builder::new())
    }
}

impl S3ArtifactStoreBuilder {
    /// A builder with nothing configured.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder configured from the `AWS_*` environment variables (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, …).
    pub fn from_env() -> Self {
        Self::with_s3(AmazonS3Builder::from_env())
    }

    fn with_s3(s3: AmazonS3Builder) -> Self {
        Self {
            s3,
            prefix: String::new(),
            size_limit: None,
            part_size: DEFAULT_PART_SIZE,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        }
    }

    /// The bucket.
    pub fn with_bucket(mut self, bucket: impl Into<String>) -> Self {
        self.s3 = self.s3.with_bucket_name(bucket);
        self
    }

    /// The endpoint of an S3-compatible server, e.g. `http://127.0.0.1:9000`.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.s3 = self.s3.with_endpoint(endpoint);
        self
    }

    /// Whether plain `http://` endpoints are allowed (off by default).
    pub fn with_allow_http(mut self, allow: bool) -> Self {
        self.s3 = self.s3.with_allow_http(allow);
        self
    }

    /// The region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.s3 = self.s3.with_region(region);
        self
    }

    /// Static credentials.
    pub fn with_credentials(
        mut self,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Self {
        self.s3 = self
            .s3
            .with_access_key_id(access_key_id)
            .with_secret_access_key(secret_access_key);
        self
    }

    /// Keys start with `<prefix>/`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Refuses payloads larger than `bytes` (`TooLarge`); none by default.
    pub fn with_size_limit(mut self, bytes: u64) -> Self {
        self.size_limit = Some(bytes);
        self
    }

    /// The multipart part size (at least 5 MiB).
    pub fn with_part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes;
        self
    }

    /// Parts uploaded at once (at least 1).
    pub fn with_max_concurrency(mut self, parts: usize) -> Self {
        self.max_concurrency = parts;
        self
    }

    /// Builds the store.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid prefix or part size, [`Error::S3`] when the S3
    /// configuration is incomplete (no bucket, ...).
    pub fn build(self) -> Result<S3ArtifactStore, Error> {
        if self.part_size < 5 << 20 {
            return Err(Error::Config {
                message: format!(
                    "part size {} is below S3's minimum of 5 MiB",
                    self.part_size
                ),
            });
        }
        let s3 = self
            .s3
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .build()
            .map_err(|source| Error::S3 { source })?;
        S3ArtifactStore::from_object_store(Arc::new(s3), &self.prefix).map(|s| S3ArtifactStore {
            size_limit: self.size_limit,
            part_size: self.part_size,
            max_concurrency: self.max_concurrency.max(1),
            ..s
        })
    }
}

impl S3ArtifactStore {
    /// A store over any `object_store` implementation that supports conditional creates,
    /// with the default part size and concurrency and no size limit.
    ///
    /// # Errors
    /// [`Error::Config`] when `prefix` is not a valid object path.
    pub fn from_object_store(store: Arc<dyn ObjectStore>, prefix: &str) -> Result<Self, Error> {
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() {
            None
        } else {
            Some(ObjectPath::parse(prefix).map_err(|e| Error::Config {
                message: format!("invalid prefix '{prefix}': {e}"),
            })?)
        };
        Ok(Self {
            store,
            prefix,
            size_limit: None,
            part_size: DEFAULT_PART_SIZE,
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        })
    }

    fn dir(&self, id: ArtifactId) -> ObjectPath {
        let name = id.to_string();
        match &self.prefix {
            Some(p) => p.clone().join(name.as_str()),
            None => ObjectPath::from(name.as_str()),
        }
    }

    fn object_error(id: ArtifactId, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound { id },
            object_store::Error::AlreadyExists { .. } => Error::AlreadyExists { id },
            source => Error::S3 { source },
        }
    }

    async fn read_record(&self, id: ArtifactId) -> Result<MetadataFile, Error> {
        let bytes = self
            .store
            .get(&self.dir(id).join(METADATA_FILE))
            .await
            .map_err(|e| Self::object_error(id, e))?
            .bytes()
            .await
            .map_err(|e| Self::object_error(id, e))?;
        let record =
            MetadataFile::from_json(&bytes).map_err(|source| Error::Metadata { id, source })?;
        if record.id() != id {
            return Err(Error::Corrupt {
                id,
                detail: format!("metadata.json names artifact {}", record.id()),
            });
        }
        Ok(record)
    }

    async fn put_inner(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        mut body: ByteStream,
    ) -> Result<StoredArtifact, Error> {
        let meta = sanitize_meta(meta);
        let dir = self.dir(id);
        let meta_path = dir.clone().join(METADATA_FILE);
        let payload_path = dir.clone().join(PAYLOAD_FILE);
        match self.store.head(&meta_path).await {
            Ok(_) => return Err(Error::AlreadyExists { id }),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Self::object_error(id, e)),
        }

        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut first = BytesMut::new();
        let mut multipart: Option<WriteMultipart> = None;
        let uploaded: Result<(), Error> = async {
            while let Some(item) = body.next().await {
                let chunk = item.map_err(|source| Error::Upload { id, source })?;
                size += chunk.len() as u64;
                if let Some(limit) = self.size_limit
                    && size > limit
                {
                    return Err(Error::TooLarge { id, limit });
                }
                hasher.update(&chunk);
                if let Some(w) = multipart.as_mut() {
                    w.wait_for_capacity(self.max_concurrency)
                        .await
                        .map_err(|source| Error::S3 { source })?;
                    w.put(chunk);
                } else {
                    first.extend_from_slice(&chunk);
                    if first.len() > self.part_size {
                        let upload = self
                            .store
                            .put_multipart(&payload_path)
                            .await
                            .map_err(|source| Error::S3 { source })?;
                        let mut w = WriteMultipart::new_with_chunk_size(upload, self.part_size);
                        w.put(first.split().freeze());
                        multipart = Some(w);
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = uploaded {
            if let Some(w) = multipart {
                let _ = w.abort().await;
            }
            return Err(e);
        }
        match multipart {
            Some(w) => {
                w.finish().await.map_err(|source| Error::S3 { source })?;
            }
            None => {
                self.store
                    .put(&payload_path, PutPayload::from_bytes(first.freeze()))
                    .await
                    .map_err(|source| Error::S3 { source })?;
            }
        }

        let record = MetadataFile::new(
            id,
            meta,
            size,
            hex::encode(hasher.finalize()),
            Timestamp::now(),
        );
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&meta_path, PutPayload::from(record.to_json()), opts)
            .await
            .map_err(|e| Self::object_error(id, e))?;
        Ok(record.to_stored(S3_BACKEND, dir.to_string()))
    }

    async fn get_inner(&self, id: ArtifactId, options: GetOptions) -> Result<ArtifactRead, Error> {
        let record = self.read_record(id).await?;
        let (start, end) = check_range(id, options.range, record.size())?;
        let dir = self.dir(id);
        let stored = record.to_stored(S3_BACKEND, dir.to_string());
        let range = ByteRange {
            start,
            end: Some(end),
        };
        if start == end {
            // An empty range: nothing to fetch (S3 refuses zero-length ranges).
            return Ok(ArtifactRead {
                stored,
                range,
                body: Box::pin(futures_util::stream::empty()),
            });
        }
        let opts = ObjectGetOptions {
            range: options.range.map(|_| GetRange::Bounded(start..end)),
            ..ObjectGetOptions::default()
        };
        let result = self
            .store
            .get_opts(&dir.join(PAYLOAD_FILE), opts)
            .await
            .map_err(|e| match Self::object_error(id, e) {
                Error::NotFound { id } => Error::Corrupt {
                    id,
                    detail: "payload is missing".to_owned(),
                },
                e => e,
            })?;
        if result.meta.size != record.size() {
            return Err(Error::Corrupt {
                id,
                detail: format!(
                    "payload is {} bytes, metadata says {}",
                    result.meta.size,
                    record.size()
                ),
            });
        }
        let stream = result
            .into_stream()
            .map(|r| r.map_err(std::io::Error::other));
        let body: ByteStream = if options.verify_checksum && options.range.is_none() {
            verified(Box::pin(stream), record.sha256_hex().to_owned())
        } else {
            Box::pin(stream)
        };
        Ok(ArtifactRead {
            stored,
            range,
            body,
        })
    }

    async fn delete_inner(&self, id: ArtifactId) -> Result<(), Error> {
        let dir = self.dir(id);
        let meta_path = dir.clone().join(METADATA_FILE);
        self.store
            .head(&meta_path)
            .await
            .map_err(|e| Self::object_error(id, e))?;
        self.store
            .delete(&meta_path)
            .await
            .map_err(|e| Self::object_error(id, e))?;
        match self.store.delete(&dir.join(PAYLOAD_FILE)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(Error::S3 { source }),
        }
    }

    async fn list_inner(&self) -> Result<Vec<ArtifactId>, Error> {
        let mut listing = self.store.list(self.prefix.as_ref());
        let depth = self.prefix.as_ref().map_or(0, ObjectPath::parts_count);
        let mut ids = Vec::new();
        while let Some(item) = listing.next().await {
            let meta = item.map_err(|source| Error::S3 { source })?;
            let parts: Vec<_> = meta.location.parts().collect();
            if parts.len() == depth + 2
                && parts[depth + 1].as_ref() == METADATA_FILE
                && let Some(id) = parse_canonical_id(parts[depth].as_ref())
            {
                ids.push(id);
            }
        }
        Ok(ids)
    }
}

/// Passes `body` through, ending it with an `InvalidData` error if its sha256 differs from
/// `expected`.
fn verified(body: ByteStream, expected: String) -> ByteStream {
    struct State {
        body: ByteStream,
        hasher: Option<Sha256>,
        expected: String,
    }
    let state = State {
        body,
        hasher: Some(Sha256::new()),
        expected,
    };
    Box::pin(futures_util::stream::unfold(state, |mut s| async move {
        let hasher = s.hasher.as_mut()?;
        match s.body.next().await {
            Some(Ok(chunk)) => {
                hasher.update(&chunk);
                Some((Ok(chunk), s))
            }
            Some(Err(e)) => {
                s.hasher = None;
                Some((Err(e), s))
            }
            None => {
                let digest = s.hasher.take().map(|h| hex::encode(h.finalize()));
                if digest.as_deref() == Some(s.expected.as_str()) {
                    None
                } else {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "payload does not match its recorded sha256",
                    );
                    Some((Err(e), s))
                }
            }
        }
    }))
}

#[async_trait::async_trait]
impl ArtifactStore for S3ArtifactStore {
    fn backend(&self) -> &'static str {
        S3_BACKEND
    }

    async fn put(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        body: ByteStream,
    ) -> Result<StoredArtifact, ArtifactError> {
        self.put_inner(id, meta, body)
            .await
            .map_err(|e| e.into_artifact_error(S3_BACKEND))
    }

    async fn get(
        &self,
        id: ArtifactId,
        options: GetOptions,
    ) -> Result<ArtifactRead, ArtifactError> {
        self.get_inner(id, options)
            .await
            .map_err(|e| e.into_artifact_error(S3_BACKEND))
    }

    async fn head(&self, id: ArtifactId) -> Result<StoredArtifact, ArtifactError> {
        self.read_record(id)
            .await
            .map(|r| r.to_stored(S3_BACKEND, self.dir(id).to_string()))
            .map_err(|e| e.into_artifact_error(S3_BACKEND))
    }

    async fn delete(&self, id: ArtifactId) -> Result<(), ArtifactError> {
        self.delete_inner(id)
            .await
            .map_err(|e| e.into_artifact_error(S3_BACKEND))
    }

    async fn list(&self) -> Result<Vec<ArtifactId>, ArtifactError> {
        self.list_inner()
            .await
            .map_err(|e| e.into_artifact_error(S3_BACKEND))
    }
}
