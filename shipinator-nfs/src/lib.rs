//! Artifact and log stores on a mounted filesystem — an NFS mount in production,
//! `./.shipinator/artifacts` by default — in the layout of DMD §3.2, and on S3.
//!
//! - [`NfsArtifactStore`]: an [`ArtifactStore`](shipinator_core::artifact::ArtifactStore) with
//!   `<base>/<artifact-id>/payload` and `<base>/<artifact-id>/metadata.json`: streamed,
//!   checksummed while written, published atomically (staging directory + rename), immutable,
//!   never following a symlink below the base.
//! - [`FsLogStore`]: a [`LogStore`](shipinator_core::logs::LogStore) with
//!   `<base>/logs/<execution-id>.log` and a sparse index, capped per execution, followable
//!   across processes.
//! - `S3ArtifactStore` (feature `s3`): the same layout under `<bucket>/<prefix>/`, through
//!   `object_store`, with multipart uploads of bounded concurrency.
//! - [`prune()`]: retention by age and count per pipeline that spares artifacts of pipelines
//!   with live runs.
//! - [`bench`](mod@bench): the measuring code of `shipinator bench artifacts`.
//!
//! All of them pass core's conformance suites (`tests/it/conformance.rs`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use shipinator_core::artifact::{ArtifactMeta, ArtifactStore, GetOptions};
//! use shipinator_core::domain::ArtifactId;
//!
//! let store = shipinator_nfs::NfsArtifactStore::new(shipinator_nfs::DEFAULT_BASE)?;
//! let body = Box::pin(futures_util::stream::iter([Ok(bytes::Bytes::from_static(b"hello"))]));
//! let id = ArtifactId::new_v7();
//! let stored = store.put(id, ArtifactMeta::default(), body).await?;
//! assert_eq!((stored.size, stored.storage_path), (5, id.to_string()));
//! let read = store.get(id, GetOptions { range: None, verify_checksum: true }).await?;
//! # drop(read); Ok(()) }
//! ```
//!
//! # Errors
//! One crate error, [`Error`]; the trait methods map it into core's `ArtifactError` and
//! `LogError` (an unreachable NFS server or endpoint becomes `Unavailable`).
//!
//! # Features
//! - `s3` (default): `S3ArtifactStore`, pulling in `object_store` with its AWS client
//!   (rustls). Without it the crate has no network dependencies.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod bench;
mod error;
mod fs;
mod fsutil;
mod logs;
mod meta;
mod prune;
#[cfg(feature = "s3")]
mod s3;

pub use error::Error;
pub use fs::{
    BACKEND, DEFAULT_BASE, METADATA_FILE, NfsArtifactStore, NfsArtifactStoreBuilder, PAYLOAD_FILE,
    STAGING_DIR, TRASH_DIR,
};
pub use logs::{DEFAULT_LOG_CAP, DEFAULT_POLL_INTERVAL, FsLogStore, FsLogStoreBuilder, LOGS_DIR};
pub use meta::{MAX_FILE_NAME, sanitize_file_name};
pub use prune::{PrunePolicy, PruneReport, PrunedArtifact, prune};
#[cfg(feature = "s3")]
pub use s3::{
    DEFAULT_MAX_CONCURRENCY, DEFAULT_PART_SIZE, S3_BACKEND, S3ArtifactStore, S3ArtifactStoreBuilder,
};
