//! `NfsArtifactStore`: each method of the contract, the layout, atomicity and crash safety.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use shipinator_core::artifact::{
    ArtifactError, ArtifactMeta, ArtifactStore, ByteRange, ByteStream, GetOptions,
};
use shipinator_core::domain::{ArtifactId, ArtifactType, JobId, PipelineId, RunId, StepId};
use shipinator_nfs::{NfsArtifactStore, NfsArtifactStoreBuilder, STAGING_DIR};

use crate::util::{checksum, collect, pattern, stream_of, wait_until};

fn store() -> (tempfile::TempDir, NfsArtifactStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = NfsArtifactStore::new(dir.path().join("artifacts")).unwrap();
    (dir, store)
}

fn staging_entries(store: &NfsArtifactStore) -> usize {
    std::fs::read_dir(store.base().join(STAGING_DIR))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn full_meta() -> ArtifactMeta {
    let mut extra = BTreeMap::new();
    extra.insert("image_ref".to_owned(), "registry.local/app:1".to_owned());
    extra.insert("image_digest".to_owned(), "sha256:abc".to_owned());
    extra.insert("tests".to_owned(), "12".to_owned());
    ArtifactMeta {
        artifact_type: Some(ArtifactType::OciImage),
        content_type: Some("application/x-tar".to_owned()),
        file_name: Some("app.tar".to_owned()),
        run_id: Some(RunId::new_v7()),
        pipeline_id: Some(PipelineId::new_v7()),
        job_id: Some(JobId::new_v7()),
        step_id: Some(StepId::new_v7()),
        extra,
    }
}

#[tokio::test]
async fn large_payload_round_trips_in_the_dmd_layout() {
    let (_dir, store) = store();
    let data = pattern(5 * 1024 * 1024 + 123, 1);
    let id = ArtifactId::new_v7();
    let meta = full_meta();
    // Small chunks are gathered, large ones passed through: try both.
    for (i, chunk) in [(0, 4096), (1, 3 << 20)] {
        let id = if i == 0 { id } else { ArtifactId::new_v7() };
        let stored = store
            .put(id, meta.clone(), stream_of(&data, chunk))
            .await
            .unwrap();
        assert_eq!(stored.size, data.len() as u64);
        assert_eq!(stored.checksum, checksum(&data));
        assert_eq!(stored.backend, "nfs");
        assert_eq!(stored.storage_path, id.to_string());
        assert_eq!(stored.meta, meta);
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
        assert_eq!(
            read.range,
            ByteRange {
                start: 0,
                end: Some(data.len() as u64)
            }
        );
        assert!(collect(read.body).await.unwrap() == data);
        assert_eq!(store.head(id).await.unwrap(), stored);
    }

    let dir = store.base().join(id.to_string());
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["metadata.json", "payload"]);
    assert_eq!(std::fs::read(dir.join("payload")).unwrap(), data);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(json["type"], "oci_image");
    assert_eq!(json["size"], data.len() as u64);
    assert_eq!(
        format!("sha256:{}", json["sha256"].as_str().unwrap()),
        checksum(&data)
    );
    assert_eq!(json["content_type"], "application/x-tar");
    assert_eq!(json["file_name"], "app.tar");
    assert_eq!(json["run_id"], meta.run_id.unwrap().to_string());
    assert_eq!(json["pipeline_id"], meta.pipeline_id.unwrap().to_string());
    assert_eq!(json["job_id"], meta.job_id.unwrap().to_string());
    assert_eq!(json["step_id"], meta.step_id.unwrap().to_string());
    assert_eq!(json["image_ref"], "registry.local/app:1");
    assert_eq!(json["image_digest"], "sha256:abc");
    assert!(json["created_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(staging_entries(&store), 0);
}

#[tokio::test]
async fn second_put_is_refused_and_the_first_is_intact() {
    let (_dir, store) = store();
    let id = ArtifactId::new_v7();
    store
        .put(id, ArtifactMeta::default(), stream_of(b"first", 2))
        .await
        .unwrap();
    let err = store
        .put(id, ArtifactMeta::default(), stream_of(b"second!", 2))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::AlreadyExists { id: e } if e == id),
        "{err:?}"
    );
    let read = store.get(id, GetOptions::default()).await.unwrap();
    assert_eq!(collect(read.body).await.unwrap(), b"first");
    assert_eq!(staging_entries(&store), 0);
}

#[tokio::test]
async fn racing_puts_of_one_id_publish_exactly_one() {
    let (_dir, store) = store();
    let id = ArtifactId::new_v7();
    let puts = (0..6u64).map(|i| {
        let store = store.clone();
        let data = pattern(300_000, i);
        tokio::spawn(async move {
            store
                .put(id, ArtifactMeta::default(), stream_of(&data, 10_000))
                .await
                .map(|s| (s, data))
        })
    });
    let results: Vec<_> = futures_util::future::join_all(puts).await;
    let winners: Vec<_> = results
        .into_iter()
        .map(Result::unwrap)
        .filter_map(Result::ok)
        .collect();
    assert_eq!(winners.len(), 1);
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
    assert_eq!(read.stored, winners[0].0);
    assert!(collect(read.body).await.unwrap() == winners[0].1);
    wait_until("staging to be cleaned", || staging_entries(&store) == 0).await;
}

#[tokio::test]
async fn unknown_ids_are_not_found() {
    let (_dir, store) = store();
    let id = ArtifactId::new_v7();
    let nf = |e: ArtifactError| matches!(e, ArtifactError::NotFound { id: x } if x == id);
    assert!(nf(store.get(id, GetOptions::default()).await.unwrap_err()));
    assert!(nf(store.head(id).await.unwrap_err()));
    assert!(nf(store.delete(id).await.unwrap_err()));
    assert!(store.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn ranges_return_exactly_those_bytes() {
    let (_dir, store) = store();
    let data = pattern(3 * 1024 * 1024 + 7, 2);
    let id = ArtifactId::new_v7();
    store
        .put(id, ArtifactMeta::default(), stream_of(&data, 65536))
        .await
        .unwrap();
    let len = data.len() as u64;
    for (start, end) in [
        (0, Some(1)),
        (1000, Some(2_500_000)),
        (len - 5, None),
        (len, None),
        (7, Some(7)),
    ] {
        let read = store
            .get(
                id,
                GetOptions {
                    range: Some(ByteRange { start, end }),
                    verify_checksum: true,
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
        let got = collect(read.body).await.unwrap();
        assert!(
            got == data[start as usize..e as usize],
            "range {start}..{end:?}"
        );
    }
    for (start, end) in [(0, Some(len + 1)), (len + 1, None), (10, Some(5))] {
        let err = store
            .get(
                id,
                GetOptions {
                    range: Some(ByteRange { start, end }),
                    verify_checksum: false,
                },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactError::InvalidRange { size, .. } if size == len),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn delete_removes_and_list_shows_only_artifacts() {
    let (_dir, store) = store();
    let ids: Vec<_> = (0..3).map(|_| ArtifactId::new_v7()).collect();
    for id in &ids {
        store
            .put(*id, ArtifactMeta::default(), stream_of(b"x", 1))
            .await
            .unwrap();
    }
    // Things under the base that are not artifacts are never listed.
    std::fs::create_dir(
        store
            .base()
            .join(STAGING_DIR)
            .join(format!("{}.abc", ids[0])),
    )
    .unwrap();
    std::fs::create_dir(store.base().join("not-an-id")).unwrap();
    std::fs::create_dir(store.base().join(ids[0].to_string().to_uppercase())).unwrap();
    std::fs::write(
        store.base().join(ArtifactId::new_v7().to_string()),
        b"a file",
    )
    .unwrap();
    let mut listed = store.list().await.unwrap();
    listed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed, want);

    store.delete(ids[1]).await.unwrap();
    assert!(matches!(
        store.get(ids[1], GetOptions::default()).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    assert!(!store.list().await.unwrap().contains(&ids[1]));
    assert!(matches!(
        store.delete(ids[1]).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    // Deleted ids stay deleted, and may be reused only by a new put.
    store
        .put(ids[1], ArtifactMeta::default(), stream_of(b"again", 3))
        .await
        .unwrap();
    assert_eq!(store.list().await.unwrap().len(), 3);
}

#[tokio::test]
async fn size_limit_refuses_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = NfsArtifactStoreBuilder::new(dir.path().join("a"))
        .with_size_limit(1000)
        .build()
        .unwrap();
    let ok = ArtifactId::new_v7();
    store
        .put(ok, ArtifactMeta::default(), stream_of(&[7; 1000], 300))
        .await
        .unwrap();
    let id = ArtifactId::new_v7();
    let err = store
        .put(id, ArtifactMeta::default(), stream_of(&[7; 1001], 300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::TooLarge { limit: 1000, .. }),
        "{err:?}"
    );
    assert_eq!(store.list().await.unwrap(), [ok]);
    wait_until("staging to be cleaned", || staging_entries(&store) == 0).await;
}

#[tokio::test]
async fn failed_or_abandoned_uploads_leave_nothing() {
    let (_dir, store) = store();
    let id = ArtifactId::new_v7();
    let failing: ByteStream = Box::pin(futures_util::stream::iter([
        Ok(Bytes::from(vec![1u8; 200_000])),
        Err(std::io::Error::other("client went away")),
    ]));
    let err = store
        .put(id, ArtifactMeta::default(), failing)
        .await
        .unwrap_err();
    assert!(matches!(err, ArtifactError::Upload { .. }), "{err:?}");
    assert!(store.list().await.unwrap().is_empty());

    // A put whose future is dropped mid-stream.
    let endless: ByteStream = Box::pin(futures_util::stream::unfold(0u64, |n| async move {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Some((Ok(Bytes::from(vec![0u8; 100_000])), n + 1))
    }));
    let put = store.put(id, ArtifactMeta::default(), endless);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), put)
            .await
            .is_err()
    );
    assert!(store.list().await.unwrap().is_empty());
    wait_until("staging to be cleaned", || staging_entries(&store) == 0).await;
    store
        .put(id, ArtifactMeta::default(), stream_of(b"ok", 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn corruption_is_detected() {
    let (_dir, store) = store();
    let data = pattern(2_000_000, 3);
    let id = ArtifactId::new_v7();
    store
        .put(id, ArtifactMeta::default(), stream_of(&data, 65536))
        .await
        .unwrap();
    let payload = store.payload_path(id);

    // Same size, one byte flipped: only the checksum notices.
    let mut bad = data.clone();
    bad[1_500_000] ^= 0xff;
    std::fs::write(&payload, &bad).unwrap();
    let read = store.get(id, GetOptions::default()).await.unwrap();
    assert!(
        collect(read.body).await.unwrap() == bad,
        "without verification bytes are served"
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
    let err = collect(read.body).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);

    // A different size is refused up front.
    std::fs::write(&payload, &data[..100]).unwrap();
    let err = store.get(id, GetOptions::default()).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Corrupt { .. }), "{err:?}");
}

#[tokio::test]
async fn stale_staging_does_not_block_and_sweep_removes_it() {
    let (_dir, store) = store();
    let id = ArtifactId::new_v7();
    let stale = store
        .base()
        .join(STAGING_DIR)
        .join(format!("{id}.0123456789abcdef"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("payload"), b"half").unwrap();
    store
        .put(id, ArtifactMeta::default(), stream_of(b"whole", 2))
        .await
        .unwrap();
    assert_eq!(store.sweep(Duration::from_secs(3600)).await.unwrap(), 0);
    assert_eq!(store.sweep(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(staging_entries(&store), 0);
    assert_eq!(store.list().await.unwrap(), [id]);
}

/// Environment variable that turns [`sigkill_writer_child`] into a slow writer.
const WRITER_ENV: &str = "SHIPINATOR_NFS_TEST_SLOW_WRITER";

/// Not a test on its own: when re-executed by `writer_killed_mid_upload_leaves_nothing` with
/// [`WRITER_ENV`] set, uploads forever, slowly, after announcing it has started.
#[tokio::test]
async fn sigkill_writer_child() {
    let Ok(spec) = std::env::var(WRITER_ENV) else {
        return;
    };
    let (base, id, marker) = {
        let mut parts = spec.split('\n');
        (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().parse::<ArtifactId>().unwrap(),
            parts.next().unwrap().to_owned(),
        )
    };
    let store = NfsArtifactStore::new(base).unwrap();
    let body: ByteStream = Box::pin(futures_util::stream::unfold(0u64, move |n| {
        let marker = marker.clone();
        async move {
            if n == 20 {
                std::fs::write(&marker, b"started").unwrap();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok(Bytes::from(vec![n as u8; 64 * 1024])), n + 1))
        }
    }));
    let _ = store.put(id, ArtifactMeta::default(), body).await;
    unreachable!("the slow upload never ends");
}

#[tokio::test]
async fn writer_killed_mid_upload_leaves_nothing() {
    let (dir, store) = store();
    let id = ArtifactId::new_v7();
    let marker = dir.path().join("writer-started");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fs_store::sigkill_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            WRITER_ENV,
            format!("{}\n{id}\n{}", store.base().display(), marker.display()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(&mut child);
    wait_until("the writer to be mid-upload", || marker.exists()).await;
    let staged = std::fs::read_dir(store.base().join(STAGING_DIR))
        .unwrap()
        .count();
    assert_eq!(staged, 1, "the upload is staged");
    guard.0.kill().unwrap(); // SIGKILL
    let status = guard.0.wait().unwrap();
    assert!(!status.success());
    drop(guard);

    assert!(!store.list().await.unwrap().contains(&id));
    assert!(matches!(
        store.get(id, GetOptions::default()).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    assert!(matches!(
        store.head(id).await.unwrap_err(),
        ArtifactError::NotFound { .. }
    ));
    let data = pattern(100_000, 9);
    let stored = store
        .put(id, ArtifactMeta::default(), stream_of(&data, 4096))
        .await
        .unwrap();
    assert_eq!(stored.checksum, checksum(&data));
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
    // What the killed writer left is swept.
    assert_eq!(store.sweep(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(staging_entries(&store), 0);
}

struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
