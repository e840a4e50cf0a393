//! `S3ArtifactStore` against a real S3-compatible server on 127.0.0.1.

use std::sync::Arc;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use shipinator_core::artifact::{
    ArtifactError, ArtifactMeta, ArtifactStore, ByteRange, ByteStream, GetOptions,
};
use shipinator_core::domain::{ArtifactId, ArtifactType};
use shipinator_nfs::{S3ArtifactStore, S3ArtifactStoreBuilder};

use crate::moto::Moto;
use crate::util::{checksum, collect, pattern, stream_of};

const BUCKET: &str = "artifacts";
const PREFIX: &str = "ci/prod";

fn builder(moto: &Moto) -> S3ArtifactStoreBuilder {
    S3ArtifactStoreBuilder::new()
        .with_endpoint(moto.endpoint())
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_credentials("test", "test")
        .with_bucket(BUCKET)
        .with_prefix(PREFIX)
}

fn raw(moto: &Moto) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(moto.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_bucket_name(BUCKET)
            .build()
            .unwrap(),
    )
}

fn setup() -> (Moto, S3ArtifactStore) {
    let moto = Moto::start();
    moto.create_bucket(BUCKET);
    let store = builder(&moto)
        .with_part_size(5 << 20)
        .with_max_concurrency(2)
        .build()
        .unwrap();
    (moto, store)
}

#[tokio::test]
async fn s3_store_round_trips_small_and_multipart_payloads() {
    let (moto, store) = setup();
    assert_eq!(store.backend(), "s3");
    let meta = ArtifactMeta {
        artifact_type: Some(ArtifactType::Binary),
        file_name: Some("../bin/app".to_owned()),
        ..ArtifactMeta::default()
    };
    for (len, chunk) in [(0, 1), (1000, 7), (17 * 1024 * 1024 + 5, 1 << 20)] {
        let data = pattern(len, len as u64);
        let id = ArtifactId::new_v7();
        let stored = store
            .put(id, meta.clone(), stream_of(&data, chunk))
            .await
            .unwrap();
        assert_eq!(stored.size, len as u64);
        assert_eq!(stored.checksum, checksum(&data));
        assert_eq!(stored.storage_path, format!("{PREFIX}/{id}"));
        assert_eq!(stored.meta.file_name.as_deref(), Some("app"));
        let read = store
            .get(
                id,
                GetOptions {
                    range: None,
                    verify_checksum: true,
                },
            )
            .await
            .unwrap();
        assert_eq!(read.stored, stored);
        assert!(
            collect(read.body).await.unwrap() == data,
            "payload of {len} bytes"
        );
        assert_eq!(store.head(id).await.unwrap(), stored);
    }
    // The DMD layout, under the prefix.
    let ids = store.list().await.unwrap();
    assert_eq!(ids.len(), 3);
    let raw = raw(&moto);
    for id in &ids {
        let dir = ObjectPath::from(format!("{PREFIX}/{id}"));
        raw.head(&dir.clone().join("payload")).await.unwrap();
        let json = raw
            .get(&dir.join("metadata.json"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(json["type"], "binary");
    }
}

#[tokio::test]
async fn s3_store_keeps_the_contract() {
    let (moto, store) = setup();
    let id = ArtifactId::new_v7();
    let data = pattern(11 * 1024 * 1024, 5);
    store
        .put(id, ArtifactMeta::default(), stream_of(&data, 65536))
        .await
        .unwrap();

    // Immutable.
    let err = store
        .put(id, ArtifactMeta::default(), stream_of(b"other", 2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::AlreadyExists { .. }),
        "{err:?}"
    );
    let read = store
        .get(
            id,
            GetOptions {
                range: None,
                verify_checksum: true,
            },
        )
        .await
        .unwrap();
    assert!(collect(read.body).await.unwrap() == data);

    // Ranges.
    let len = data.len() as u64;
    for (start, end) in [
        (0, Some(1)),
        (5_000_000, Some(6_000_001)),
        (len - 3, None),
        (9, Some(9)),
    ] {
        let read = store
            .get(
                id,
                GetOptions {
                    range: Some(ByteRange { start, end }),
                    verify_checksum: false,
                },
            )
            .await
            .unwrap();
        let e = end.unwrap_or(len);
        assert_eq!(
            read.range,
            ByteRange {
                start,
                end: Some(e)
            }
        );
        assert!(collect(read.body).await.unwrap() == data[start as usize..e as usize]);
    }
    let err = store
        .get(
            id,
            GetOptions {
                range: Some(ByteRange {
                    start: 0,
                    end: Some(len + 1),
                }),
                verify_checksum: false,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ArtifactError::InvalidRange { .. }), "{err:?}");

    // Unknown ids.
    let unknown = ArtifactId::new_v7();
    assert!(matches!(
        store.get(unknown, GetOptions::default()).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    assert!(matches!(
        store.head(unknown).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    assert!(matches!(
        store.delete(unknown).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));

    // Objects that are not committed artifacts are never listed: a payload without metadata
    // (a writer killed before its commit point), foreign keys, other prefixes.
    let raw = raw(&moto);
    let orphan = ArtifactId::new_v7();
    raw.put(
        &ObjectPath::from(format!("{PREFIX}/{orphan}/payload")),
        PutPayload::from_static(b"half"),
    )
    .await
    .unwrap();
    raw.put(
        &ObjectPath::from(format!("{PREFIX}/notes.txt")),
        PutPayload::from_static(b"x"),
    )
    .await
    .unwrap();
    raw.put(
        &ObjectPath::from(format!("other/{}/metadata.json", ArtifactId::new_v7())),
        PutPayload::from_static(b"{}"),
    )
    .await
    .unwrap();
    assert_eq!(store.list().await.unwrap(), [id]);
    assert!(matches!(
        store.get(orphan, GetOptions::default()).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    // ...and the next put of that id succeeds.
    store
        .put(orphan, ArtifactMeta::default(), stream_of(b"whole", 2))
        .await
        .unwrap();
    let read = store
        .get(
            orphan,
            GetOptions {
                range: None,
                verify_checksum: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(collect(read.body).await.unwrap(), b"whole");

    // Tampering is detected by the checksum.
    raw.put(
        &ObjectPath::from(format!("{PREFIX}/{orphan}/payload")),
        PutPayload::from_static(b"WHOLE"),
    )
    .await
    .unwrap();
    let read = store
        .get(
            orphan,
            GetOptions {
                range: None,
                verify_checksum: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        collect(read.body).await.unwrap_err().kind(),
        std::io::ErrorKind::InvalidData
    );

    // Delete.
    store.delete(id).await.unwrap();
    assert!(matches!(
        store.get(id, GetOptions::default()).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    assert_eq!(store.list().await.unwrap(), [orphan]);
}

#[tokio::test]
async fn s3_failed_uploads_leave_nothing() {
    let (moto, _) = setup();
    let store = builder(&moto)
        .with_part_size(5 << 20)
        .with_size_limit(6 << 20)
        .build()
        .unwrap();
    let id = ArtifactId::new_v7();
    let err = store
        .put(
            id,
            ArtifactMeta::default(),
            stream_of(&pattern(7 << 20, 1), 1 << 20),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ArtifactError::TooLarge { .. }), "{err:?}");
    let failing: ByteStream = Box::pin(futures_util::stream::iter([
        Ok(Bytes::from(pattern(6 << 20, 2))),
        Err(std::io::Error::other("client went away")),
    ]));
    let err = store
        .put(id, ArtifactMeta::default(), failing)
        .await
        .unwrap_err();
    assert!(matches!(err, ArtifactError::Upload { .. }), "{err:?}");
    assert!(store.list().await.unwrap().is_empty());
    assert!(matches!(
        store.head(id).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    store
        .put(id, ArtifactMeta::default(), stream_of(b"fine", 2))
        .await
        .unwrap();
    assert_eq!(store.list().await.unwrap(), [id]);
}
