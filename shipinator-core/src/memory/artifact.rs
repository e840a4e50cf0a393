//! [`InMemoryArtifactStore`]: artifact payloads in memory.
//!
//! Payloads are kept as the chunks they were uploaded in (never copied into one buffer), and
//! their sha256 is computed while they are received. Attach it to a
//! [`MockExecutor`](crate::memory::MockExecutor) with `with_artifact_store` so scripted steps
//! store their declared outputs where later stages can fetch them.
//!
//! ```
//! use bytes::Bytes;
//! use shipinator_core::artifact::{ArtifactMeta, ArtifactStore, ByteStream, GetOptions};
//! use shipinator_core::domain::ArtifactId;
//! use shipinator_core::memory::InMemoryArtifactStore;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = InMemoryArtifactStore::new().with_size_limit(1 << 20);
//! let id = ArtifactId::new_v7();
//! let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from("hello"))]));
//! let stored = store.put(id, ArtifactMeta::default(), body).await.unwrap();
//! assert_eq!(stored.size, 5);
//! assert!(stored.checksum.starts_with("sha256:"));
//! let read = store.get(id, GetOptions::default()).await.unwrap();
//! assert_eq!(read.stored, stored);
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::artifact::{
    ArtifactError, ArtifactMeta, ArtifactRead, ArtifactStore, ByteRange, ByteStream, GetOptions,
    StoredArtifact,
};
use crate::domain::ArtifactId;
use crate::memory::{Clock, system_clock};

struct Payload {
    stored: StoredArtifact,
    chunks: Arc<Vec<Bytes>>,
}

/// An [`ArtifactStore`] in memory, with an optional size limit per artifact.
pub struct InMemoryArtifactStore {
    payloads: Mutex<HashMap<ArtifactId, Payload>>,
    size_limit: Option<u64>,
    clock: Clock,
}

impl fmt::Debug for InMemoryArtifactStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryArtifactStore")
            .field("artifacts", &self.lock().len())
            .field("size_limit", &self.size_limit)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryArtifactStore {
    fn default() -> Self {
        Self::new()
    }
}

fn sha256_text(hasher: Sha256) -> String {
    let digest = hasher.finalize();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        let _ = write!(out, "{b:02x}");
    }
    out
}

impl InMemoryArtifactStore {
    /// An empty store without a size limit, stamping artifacts with the wall clock.
    pub fn new() -> Self {
        Self {
            payloads: Mutex::new(HashMap::new()),
            size_limit: None,
            clock: system_clock(),
        }
    }

    /// Refuses payloads larger than `bytes` with [`ArtifactError::TooLarge`].
    #[must_use]
    pub fn with_size_limit(mut self, bytes: u64) -> Self {
        self.size_limit = Some(bytes);
        self
    }

    /// Stamps `created_at` with `clock`.
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ArtifactId, Payload>> {
        self.payloads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl ArtifactStore for InMemoryArtifactStore {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn put(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        mut body: ByteStream,
    ) -> Result<StoredArtifact, ArtifactError> {
        if self.lock().contains_key(&id) {
            return Err(ArtifactError::AlreadyExists { id });
        }
        let mut hasher = Sha256::new();
        let mut chunks = Vec::new();
        let mut size: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| ArtifactError::Upload { id, source })?;
            size = size.saturating_add(chunk.len() as u64);
            if let Some(limit) = self.size_limit
                && size > limit
            {
                return Err(ArtifactError::TooLarge { id, limit });
            }
            hasher.update(&chunk);
            if !chunk.is_empty() {
                chunks.push(chunk);
            }
        }
        let stored = StoredArtifact {
            id,
            backend: "memory".to_owned(),
            storage_path: format!("memory://artifacts/{id}"),
            size,
            checksum: sha256_text(hasher),
            created_at: (self.clock)(),
            meta,
        };
        let mut payloads = self.lock();
        // A concurrent put of the same id may have finished first: the first one wins.
        if payloads.contains_key(&id) {
            return Err(ArtifactError::AlreadyExists { id });
        }
        payloads.insert(
            id,
            Payload {
                stored: stored.clone(),
                chunks: Arc::new(chunks),
            },
        );
        Ok(stored)
    }

    async fn get(
        &self,
        id: ArtifactId,
        options: GetOptions,
    ) -> Result<ArtifactRead, ArtifactError> {
        let (stored, chunks) = {
            let payloads = self.lock();
            let p = payloads.get(&id).ok_or(ArtifactError::NotFound { id })?;
            (p.stored.clone(), Arc::clone(&p.chunks))
        };
        let size = stored.size;
        let range = match options.range {
            None => ByteRange {
                start: 0,
                end: Some(size),
            },
            Some(r) => {
                let end = r.end.unwrap_or(size);
                if r.start > end || end > size {
                    return Err(ArtifactError::InvalidRange {
                        id,
                        start: r.start,
                        end: r.end,
                        size,
                    });
                }
                ByteRange {
                    start: r.start,
                    end: Some(end),
                }
            }
        };
        let (start, end) = (range.start, range.end.unwrap_or(size));
        // Slices of the stored chunks, without copying.
        let mut parts = Vec::new();
        let mut offset = 0u64;
        for chunk in chunks.iter() {
            let len = chunk.len() as u64;
            let (lo, hi) = (offset, offset + len);
            offset = hi;
            if hi <= start || lo >= end {
                continue;
            }
            let from = usize::try_from(start.saturating_sub(lo)).unwrap_or(0);
            let to = usize::try_from(end.min(hi) - lo).unwrap_or(chunk.len());
            parts.push(chunk.slice(from..to));
        }
        let verify = options.verify_checksum && options.range.is_none();
        let expected = stored.checksum.clone();
        let body: ByteStream = if verify {
            let mut hasher = Some(Sha256::new());
            let n = parts.len();
            Box::pin(
                futures_util::stream::iter(parts.into_iter().enumerate()).map(move |(i, part)| {
                    if let Some(h) = hasher.as_mut() {
                        h.update(&part);
                    }
                    if i + 1 == n
                        && let Some(h) = hasher.take()
                        && sha256_text(h) != expected
                    {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "artifact checksum mismatch",
                        ));
                    }
                    Ok(part)
                }),
            )
        } else {
            Box::pin(futures_util::stream::iter(parts.into_iter().map(Ok)))
        };
        Ok(ArtifactRead {
            stored,
            range,
            body,
        })
    }

    async fn head(&self, id: ArtifactId) -> Result<StoredArtifact, ArtifactError> {
        self.lock()
            .get(&id)
            .map(|p| p.stored.clone())
            .ok_or(ArtifactError::NotFound { id })
    }

    async fn delete(&self, id: ArtifactId) -> Result<(), ArtifactError> {
        self.lock()
            .remove(&id)
            .map(|_| ())
            .ok_or(ArtifactError::NotFound { id })
    }

    async fn list(&self) -> Result<Vec<ArtifactId>, ArtifactError> {
        let mut ids: Vec<ArtifactId> = self.lock().keys().copied().collect();
        ids.sort_unstable();
        Ok(ids)
    }
}
