//! [`NfsArtifactStore`]: artifacts on a mounted filesystem, in the DMD §3.2 layout.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use shipinator_core::artifact::{
    ArtifactError, ArtifactMeta, ArtifactRead, ArtifactStore, ByteRange, ByteStream, GetOptions,
    StoredArtifact,
};
use shipinator_core::domain::ArtifactId;
use shipinator_core::time::Timestamp;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::Error;
use crate::fsutil::{
    create_file_at, ensure_dir_at, fsync_dir, is_missing, kind_at, open_dir, open_dir_at,
    open_file_at, rename_noreplace,
};
use crate::meta::{MetadataFile, check_range, sanitize_meta};

/// The backend name stored in `artifacts.storage_backend`.
pub const BACKEND: &str = "nfs";
/// Where uploads are written before they are published (inside the base directory).
pub const STAGING_DIR: &str = ".staging";
/// Where deleted artifacts are moved before they are removed (inside the base directory).
pub const TRASH_DIR: &str = ".trash";
/// The payload's file name inside an artifact's directory.
pub const PAYLOAD_FILE: &str = "payload";
/// The metadata's file name inside an artifact's directory.
pub const METADATA_FILE: &str = "metadata.json";
/// The default base directory, relative to the working directory.
pub const DEFAULT_BASE: &str = ".shipinator/artifacts";

/// Size of the chunks read from disk, and of the buffer small upload chunks are gathered in.
pub(crate) const CHUNK_SIZE: usize = 1 << 20;
/// Chunks queued between the upload and each of the hashing and writing threads.
pub(crate) const QUEUE_DEPTH: usize = 4;
/// Upload chunks at least this large are passed on without being copied.
const DIRECT_CHUNK: usize = 64 << 10;

/// An [`ArtifactStore`] on a mounted filesystem: an NFS mount in production,
/// [`DEFAULT_BASE`] by default.
///
/// # Layout
/// ```text
/// <base>/<artifact-id>/payload         the bytes
/// <base>/<artifact-id>/metadata.json   type, size, sha256, content type, producer, created_at, …
/// <base>/.staging/<artifact-id>.<random>/   an upload in progress (never listed)
/// <base>/.trash/<artifact-id>.<random>/     a delete in progress (never listed)
/// ```
/// `storage_path` is the artifact id, relative to the base directory (the absolute payload path
/// is [`payload_path`](Self::payload_path)), so a volume can be mounted elsewhere without
/// rewriting metadata rows.
///
/// # Guarantees
/// - **Streaming:** `put` and `get` hold at most a few 1 MiB chunks in memory; the sha256 is
///   computed while writing, on its own thread, in parallel with the writes.
/// - **Atomic publish:** both files are written (and, unless disabled, fsynced) in a unique
///   staging directory on the same filesystem, which is then renamed into place with
///   `RENAME_NOREPLACE` and the base directory fsynced. A crash leaves at most a staging
///   directory, never one file without the other; a stale staging directory never blocks a
///   later `put` of the same id ([`sweep`](Self::sweep) removes old ones).
/// - **Immutability:** a `put` under an existing id is `AlreadyExists`, also when two puts
///   race (the rename refuses to replace).
/// - **Safety:** paths are built only from validated ids and fixed names; nothing below the
///   base is opened through a symlink (`O_NOFOLLOW`, `openat`); user-supplied file names are
///   sanitised ([`sanitize_file_name`](crate::sanitize_file_name)) and only stored as metadata.
///   The base directory itself may be a symlink.
#[derive(Debug, Clone)]
pub struct NfsArtifactStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    base: PathBuf,
    size_limit: Option<u64>,
    fsync: bool,
}

/// Builds an [`NfsArtifactStore`].
///
/// ```no_run
/// # fn main() -> Result<(), shipinator_nfs::Error> {
/// let store = shipinator_nfs::NfsArtifactStoreBuilder::new("/mnt/nfs/artifacts")
///     .with_size_limit(8 << 30)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NfsArtifactStoreBuilder {
    base: PathBuf,
    size_limit: Option<u64>,
    fsync: bool,
}

impl NfsArtifactStoreBuilder {
    /// A store rooted at `base`, no size limit, fsync on.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self {
            base: base.into(),
            size_limit: None,
            fsync: true,
        }
    }

    /// Refuses payloads larger than `bytes` (`TooLarge`); none by default.
    pub fn with_size_limit(mut self, bytes: u64) -> Self {
        self.size_limit = Some(bytes);
        self
    }

    /// Whether to fsync payloads, metadata and directories before a `put` returns (on by
    /// default). Turning it off trades crash durability for speed; atomicity is kept.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// Creates the base, staging and trash directories if needed and returns the store.
    ///
    /// # Errors
    /// [`Error::Io`] when the base directory cannot be created or opened.
    pub fn build(self) -> Result<NfsArtifactStore, Error> {
        std::fs::create_dir_all(&self.base)
            .map_err(|e| Error::io("create directory", &self.base, e))?;
        let base = open_dir(&self.base).map_err(|e| Error::io("open", &self.base, e))?;
        for dir in [STAGING_DIR, TRASH_DIR] {
            ensure_dir_at(&base, dir).map_err(|e| Error::io("create", self.base.join(dir), e))?;
        }
        Ok(NfsArtifactStore {
            inner: Arc::new(Inner {
                base: self.base,
                size_limit: self.size_limit,
                fsync: self.fsync,
            }),
        })
    }
}

impl NfsArtifactStore {
    /// A store rooted at `base` with the default settings (see [`NfsArtifactStoreBuilder`]).
    ///
    /// # Errors
    /// [`Error::Io`] when the base directory cannot be created or opened.
    pub fn new(base: impl Into<PathBuf>) -> Result<Self, Error> {
        NfsArtifactStoreBuilder::new(base).build()
    }

    /// The base directory.
    pub fn base(&self) -> &Path {
        &self.inner.base
    }

    /// The absolute path of an artifact's payload (whether or not it exists).
    pub fn payload_path(&self, id: ArtifactId) -> PathBuf {
        self.inner.base.join(id.to_string()).join(PAYLOAD_FILE)
    }

    /// Removes staging and trash directories last modified more than `older_than` ago: what
    /// writers that crashed or were killed left behind. Returns how many were removed. Pick an
    /// age well above the longest upload when several servers share the volume.
    ///
    /// # Errors
    /// [`Error::Io`] when a directory cannot be listed.
    pub async fn sweep(&self, older_than: Duration) -> Result<usize, Error> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.sweep(older_than)).await
    }

    async fn put_inner(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        mut body: ByteStream,
    ) -> Result<StoredArtifact, Error> {
        let meta = sanitize_meta(meta);
        let inner = Arc::clone(&self.inner);
        let (staging_name, file) = blocking(move || inner.begin_put(id)).await?;
        let mut guard = StagingGuard {
            path: Some(self.inner.base.join(STAGING_DIR).join(&staging_name)),
        };

        let (write_tx, mut write_rx) = mpsc::channel::<Bytes>(QUEUE_DEPTH);
        let (hash_tx, mut hash_rx) = mpsc::channel::<Bytes>(QUEUE_DEPTH);
        let writer = tokio::task::spawn_blocking(move || -> io::Result<File> {
            let mut file = file;
            while let Some(chunk) = write_rx.blocking_recv() {
                file.write_all(&chunk)?;
            }
            Ok(file)
        });
        let hasher = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(chunk) = hash_rx.blocking_recv() {
                hasher.update(&chunk);
            }
            hasher.finalize()
        });

        let limit = self.inner.size_limit;
        let pumped: Result<u64, Error> = async {
            let mut size = 0u64;
            let mut pending = BytesMut::new();
            let send = |chunk: Bytes| {
                let (w, h) = (&write_tx, &hash_tx);
                async move {
                    // A closed channel means the writer failed; its error is reported below.
                    let a = w.send(chunk.clone()).await.is_ok();
                    let b = h.send(chunk).await.is_ok();
                    a && b
                }
            };
            while let Some(item) = body.next().await {
                let chunk = item.map_err(|source| Error::Upload { id, source })?;
                size += chunk.len() as u64;
                if let Some(limit) = limit
                    && size > limit
                {
                    return Err(Error::TooLarge { id, limit });
                }
                if chunk.len() >= DIRECT_CHUNK {
                    if !pending.is_empty() && !send(pending.split().freeze()).await {
                        break;
                    }
                    if !send(chunk).await {
                        break;
                    }
                } else {
                    pending.extend_from_slice(&chunk);
                    if pending.len() >= CHUNK_SIZE && !send(pending.split().freeze()).await {
                        break;
                    }
                }
            }
            if !pending.is_empty() {
                send(pending.split().freeze()).await;
            }
            Ok(size)
        }
        .await;
        drop(write_tx);
        drop(hash_tx);
        let written = writer.await.map_err(Error::task)?;
        let digest = hasher.await.map_err(Error::task)?;
        let size = pumped?;
        let file = written.map_err(|e| Error::io("write", guard.path(), e))?;

        let created_at = Timestamp::now();
        let record = MetadataFile::new(id, meta, size, hex::encode(digest), created_at);
        let json = record.to_json();
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.publish(id, &staging_name, file, &json)).await?;
        guard.disarm();
        Ok(record.to_stored(BACKEND, id.to_string()))
    }

    async fn get_inner(&self, id: ArtifactId, options: GetOptions) -> Result<ArtifactRead, Error> {
        let inner = Arc::clone(&self.inner);
        let (record, file, start, end) =
            blocking(move || inner.open_payload(id, options.range)).await?;
        let verify = (options.verify_checksum && options.range.is_none())
            .then(|| record.sha256_hex().to_owned());
        let (tx, rx) = mpsc::channel(2);
        tokio::task::spawn_blocking(move || stream_file(file, end - start, verify, &tx));
        Ok(ArtifactRead {
            stored: record.to_stored(BACKEND, id.to_string()),
            range: ByteRange {
                start,
                end: Some(end),
            },
            body: receiver_stream(rx),
        })
    }
}

/// Sends `len` bytes of `file` from its current position, in [`CHUNK_SIZE`] chunks; when
/// `verify` holds a sha256, ends with an `InvalidData` error if the bytes do not match it.
fn stream_file(
    mut file: File,
    len: u64,
    verify: Option<String>,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) {
    let mut hasher = verify.as_ref().map(|_| Sha256::new());
    let mut remaining = len;
    while remaining > 0 {
        let want = usize::try_from(remaining.min(CHUNK_SIZE as u64)).unwrap_or(CHUNK_SIZE);
        let mut buf = vec![0u8; want];
        if let Err(e) = file.read_exact(&mut buf) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        remaining -= want as u64;
        if let Some(h) = hasher.as_mut() {
            h.update(&buf);
        }
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            return; // the reader went away
        }
    }
    if let (Some(h), Some(expected)) = (hasher, verify)
        && hex::encode(h.finalize()) != expected
    {
        let _ = tx.blocking_send(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "payload does not match its recorded sha256",
        )));
    }
}

/// A stream over a channel's items.
pub(crate) fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> std::pin::Pin<Box<dyn futures_util::Stream<Item = T> + Send>> {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f).await.map_err(Error::task)?
}

impl Inner {
    fn base_fd(&self) -> Result<OwnedFd, Error> {
        open_dir(&self.base).map_err(|e| Error::io("open", &self.base, e))
    }

    fn special_dir(&self, base: &OwnedFd, name: &str) -> Result<OwnedFd, Error> {
        ensure_dir_at(base, name).map_err(|e| Error::io("open", self.base.join(name), e))
    }

    /// Refuses a taken id early, then creates a fresh staging directory and its payload file.
    fn begin_put(&self, id: ArtifactId) -> Result<(String, File), Error> {
        let base = self.base_fd()?;
        let name = id.to_string();
        let path = self.base.join(&name);
        if kind_at(&base, &name)
            .map_err(|e| Error::io("stat", &path, e))?
            .is_some()
        {
            return Err(Error::AlreadyExists { id });
        }
        let staging = self.special_dir(&base, STAGING_DIR)?;
        let staging_name = format!("{name}.{}", Uuid::new_v4().simple());
        let staging_path = self.base.join(STAGING_DIR).join(&staging_name);
        let dir = ensure_dir_at(&staging, &staging_name)
            .map_err(|e| Error::io("create", &staging_path, e))?;
        let file = create_file_at(&dir, PAYLOAD_FILE)
            .map_err(|e| Error::io("create", staging_path.join(PAYLOAD_FILE), e))?;
        Ok((staging_name, file))
    }

    /// Writes `metadata.json` beside the payload, syncs both, and renames the staging directory
    /// into place.
    fn publish(
        &self,
        id: ArtifactId,
        staging_name: &str,
        payload: File,
        metadata: &[u8],
    ) -> Result<(), Error> {
        let staging_path = self.base.join(STAGING_DIR).join(staging_name);
        let io = |op, name: &str| {
            let p = staging_path.join(name);
            move |e| Error::io(op, p, e)
        };
        if self.fsync {
            payload.sync_all().map_err(io("fsync", PAYLOAD_FILE))?;
        }
        drop(payload);
        let base = self.base_fd()?;
        let staging = self.special_dir(&base, STAGING_DIR)?;
        let dir = open_dir_at(&staging, staging_name).map_err(io("open", ""))?;
        let mut meta = create_file_at(&dir, METADATA_FILE).map_err(io("create", METADATA_FILE))?;
        meta.write_all(metadata)
            .map_err(io("write", METADATA_FILE))?;
        if self.fsync {
            meta.sync_all().map_err(io("fsync", METADATA_FILE))?;
            fsync_dir(&dir).map_err(io("fsync", ""))?;
        }
        drop(meta);
        let name = id.to_string();
        rename_noreplace(&staging, staging_name, &base, &name).map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                Error::AlreadyExists { id }
            } else {
                Error::io("rename", &staging_path, e)
            }
        })?;
        if self.fsync {
            fsync_dir(&base).map_err(|e| Error::io("fsync", &self.base, e))?;
            fsync_dir(&staging).map_err(|e| Error::io("fsync", self.base.join(STAGING_DIR), e))?;
        }
        Ok(())
    }

    /// Opens an artifact's directory, never through a symlink.
    fn artifact_dir(&self, base: &OwnedFd, id: ArtifactId) -> Result<OwnedFd, Error> {
        let name = id.to_string();
        open_dir_at(base, &name).map_err(|e| {
            if is_missing(&e) {
                Error::NotFound { id }
            } else {
                Error::io("open", self.base.join(&name), e)
            }
        })
    }

    fn read_record(&self, dir: &OwnedFd, id: ArtifactId) -> Result<MetadataFile, Error> {
        let path = self.base.join(id.to_string()).join(METADATA_FILE);
        let mut bytes = Vec::new();
        open_file_at(dir, METADATA_FILE)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| {
                if is_missing(&e) {
                    Error::Corrupt {
                        id,
                        detail: "metadata.json is missing".to_owned(),
                    }
                } else {
                    Error::io("read", &path, e)
                }
            })?;
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

    fn head(&self, id: ArtifactId) -> Result<MetadataFile, Error> {
        let base = self.base_fd()?;
        let dir = self.artifact_dir(&base, id)?;
        self.read_record(&dir, id)
    }

    fn open_payload(
        &self,
        id: ArtifactId,
        range: Option<ByteRange>,
    ) -> Result<(MetadataFile, File, u64, u64), Error> {
        let base = self.base_fd()?;
        let dir = self.artifact_dir(&base, id)?;
        let record = self.read_record(&dir, id)?;
        let path = self.payload_path(id);
        let mut file = open_file_at(&dir, PAYLOAD_FILE).map_err(|e| {
            if is_missing(&e) {
                Error::Corrupt {
                    id,
                    detail: "payload is missing".to_owned(),
                }
            } else {
                Error::io("open", &path, e)
            }
        })?;
        let actual = file
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        if actual != record.size() {
            return Err(Error::Corrupt {
                id,
                detail: format!("payload is {actual} bytes, metadata says {}", record.size()),
            });
        }
        let (start, end) = check_range(id, range, actual)?;
        file.seek(SeekFrom::Start(start))
            .map_err(|e| Error::io("seek", &path, e))?;
        Ok((record, file, start, end))
    }

    fn payload_path(&self, id: ArtifactId) -> PathBuf {
        self.base.join(id.to_string()).join(PAYLOAD_FILE)
    }

    /// Moves the artifact's directory to the trash (one atomic step: it disappears whole),
    /// then removes it.
    fn delete(&self, id: ArtifactId) -> Result<(), Error> {
        let base = self.base_fd()?;
        let name = id.to_string();
        let path = self.base.join(&name);
        match kind_at(&base, &name).map_err(|e| Error::io("stat", &path, e))? {
            Some(rustix::fs::FileType::Directory) => {}
            // A symlink or file under an id is not an artifact: leave it alone.
            _ => return Err(Error::NotFound { id }),
        }
        let trash = self.special_dir(&base, TRASH_DIR)?;
        let trash_name = format!("{name}.{}", Uuid::new_v4().simple());
        rustix::fs::renameat(&base, name.as_str(), &trash, trash_name.as_str()).map_err(|e| {
            let e = io::Error::from(e);
            if is_missing(&e) {
                Error::NotFound { id }
            } else {
                Error::io("rename", &path, e)
            }
        })?;
        if self.fsync {
            fsync_dir(&base).map_err(|e| Error::io("fsync", &self.base, e))?;
        }
        let trash_path = self.base.join(TRASH_DIR).join(trash_name);
        // `remove_dir_all` does not follow symlinks.
        std::fs::remove_dir_all(&trash_path).map_err(|e| Error::io("remove", &trash_path, e))
    }

    fn list(&self) -> Result<Vec<ArtifactId>, Error> {
        let entries =
            std::fs::read_dir(&self.base).map_err(|e| Error::io("list", &self.base, e))?;
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &self.base, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(id) = parse_canonical_id(&name) else {
                continue;
            };
            // `DirEntry::file_type` does not follow symlinks.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    fn sweep(&self, older_than: Duration) -> Result<usize, Error> {
        let cutoff = SystemTime::now().checked_sub(older_than);
        let mut removed = 0;
        for dir in [STAGING_DIR, TRASH_DIR] {
            let path = self.base.join(dir);
            let entries = match std::fs::read_dir(&path) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("list", &path, e)),
            };
            for entry in entries.flatten() {
                let old = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|m| cutoff.is_some_and(|c| m <= c));
                if old {
                    let p = entry.path();
                    let res = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                    match res {
                        Ok(()) => removed += 1,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io("remove", &p, e)),
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// The id named by a directory entry, only in the canonical lowercase hyphenated form.
pub(crate) fn parse_canonical_id(name: &str) -> Option<ArtifactId> {
    let uuid = Uuid::parse_str(name).ok()?;
    (uuid.hyphenated().to_string() == name).then_some(ArtifactId(uuid))
}

/// Removes a staging directory when an upload fails or its future is dropped.
struct StagingGuard {
    path: Option<PathBuf>,
}

impl StagingGuard {
    fn path(&self) -> PathBuf {
        self.path.clone().unwrap_or_default()
    }

    fn disarm(&mut self) {
        self.path = None;
    }
}

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let remove = move || {
                if let Err(e) = std::fs::remove_dir_all(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(path = %path.display(), error = %e, "removing an abandoned upload failed");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => drop(handle.spawn_blocking(remove)),
                Err(_) => remove(),
            }
        }
    }
}

#[async_trait::async_trait]
impl ArtifactStore for NfsArtifactStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn put(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        body: ByteStream,
    ) -> Result<StoredArtifact, ArtifactError> {
        self.put_inner(id, meta, body)
            .await
            .map_err(|e| e.into_artifact_error(BACKEND))
    }

    async fn get(
        &self,
        id: ArtifactId,
        options: GetOptions,
    ) -> Result<ArtifactRead, ArtifactError> {
        self.get_inner(id, options)
            .await
            .map_err(|e| e.into_artifact_error(BACKEND))
    }

    async fn head(&self, id: ArtifactId) -> Result<StoredArtifact, ArtifactError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.head(id))
            .await
            .map(|r| r.to_stored(BACKEND, id.to_string()))
            .map_err(|e| e.into_artifact_error(BACKEND))
    }

    async fn delete(&self, id: ArtifactId) -> Result<(), ArtifactError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.delete(id))
            .await
            .map_err(|e| e.into_artifact_error(BACKEND))
    }

    async fn list(&self) -> Result<Vec<ArtifactId>, ArtifactError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.list())
            .await
            .map_err(|e| e.into_artifact_error(BACKEND))
    }
}
