//! Core's conformance suites against the filesystem and S3 stores.

use std::sync::Arc;
use std::time::Duration;

use shipinator_core::artifact::ArtifactStore;
use shipinator_core::conformance::artifact::{self, ArtifactCaps};
use shipinator_core::conformance::logs::{self, LogCaps};
use shipinator_nfs::{FsLogStoreBuilder, NfsArtifactStore};

#[tokio::test]
async fn nfs_artifact_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = NfsArtifactStore::new(dir.path().join("artifacts")).unwrap();
    artifact::all(&store, &ArtifactCaps::default()).await;
    // The same through a trait object, as the server holds it.
    let shared: Arc<dyn ArtifactStore> = Arc::new(store);
    artifact::all(shared.as_ref(), &ArtifactCaps::default()).await;
}

#[cfg(feature = "s3")]
#[tokio::test]
async fn s3_artifact_store_conformance() {
    let moto = crate::moto::Moto::start();
    moto.create_bucket("conformance");
    let store = shipinator_nfs::S3ArtifactStoreBuilder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_credentials("test", "test")
        .with_bucket("conformance")
        .with_prefix("artifacts")
        .with_part_size(5 << 20)
        .build()
        .unwrap();
    artifact::all(&store, &ArtifactCaps::default()).await;
}

#[tokio::test]
async fn fs_log_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 4096;
    let store = FsLogStoreBuilder::new(dir.path())
        .with_cap(cap)
        .build()
        .unwrap();
    logs::all(
        &store,
        &LogCaps {
            cap_bytes: cap,
            wait_limit: Duration::from_secs(10),
        },
    )
    .await;
}
