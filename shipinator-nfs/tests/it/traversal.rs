//! Traversal attempts change nothing outside the base directory (checked against a canary).

use std::os::unix::fs::symlink;
use std::path::PathBuf;

use shipinator_core::artifact::{ArtifactError, ArtifactMeta, ArtifactStore, GetOptions};
use shipinator_core::domain::ArtifactId;
use shipinator_nfs::{NfsArtifactStore, STAGING_DIR, TRASH_DIR};

use crate::util::{collect, snapshot, stream_of};

struct Fixture {
    _dir: tempfile::TempDir,
    canary: PathBuf,
    store: NfsArtifactStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    std::fs::create_dir_all(canary.join("sub")).unwrap();
    std::fs::write(canary.join("secret"), b"do not touch").unwrap();
    std::fs::write(canary.join("sub/payload"), b"nested").unwrap();
    std::fs::write(canary.join("sub/metadata.json"), b"{}").unwrap();
    let store = NfsArtifactStore::new(dir.path().join("base")).unwrap();
    Fixture {
        _dir: dir,
        canary,
        store,
    }
}

#[test]
fn ids_are_uuids_never_paths() {
    for bad in ["../x", "/etc/passwd", "a\0b", "..", "", &"9".repeat(4096)] {
        assert!(bad.parse::<ArtifactId>().is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn hostile_file_names_are_sanitised_and_stay_metadata() {
    let f = fixture();
    let before = snapshot(&f.canary);
    let long = "n".repeat(10_000);
    let cases = [
        ("../canary/secret", Some("secret")),
        ("/abs/olute", Some("olute")),
        ("..\\..\\x", Some("x")),
        ("nul\0byte", Some("nulbyte")),
        ("..", None),
        ("../../", None),
        (long.as_str(), Some(&long[..255])),
    ];
    for (name, want) in cases {
        let id = ArtifactId::new_v7();
        let meta = ArtifactMeta {
            file_name: Some(name.to_owned()),
            ..ArtifactMeta::default()
        };
        let stored = f.store.put(id, meta, stream_of(b"evil", 2)).await.unwrap();
        assert_eq!(stored.meta.file_name.as_deref(), want, "{name:?}");
        assert_eq!(
            f.store.head(id).await.unwrap().meta.file_name.as_deref(),
            want
        );
    }
    assert_eq!(snapshot(&f.canary), before);
    // Only artifact directories and the store's own directories are under the base.
    for e in std::fs::read_dir(f.store.base()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(name == STAGING_DIR || name == TRASH_DIR || name.parse::<ArtifactId>().is_ok());
    }
}

#[tokio::test]
async fn a_symlink_swapped_in_for_an_artifact_is_never_followed() {
    let f = fixture();
    let before = snapshot(&f.canary);
    let id = ArtifactId::new_v7();
    symlink(f.canary.join("sub"), f.store.base().join(id.to_string())).unwrap();

    let err = f.store.get(id, GetOptions::default()).await.unwrap_err();
    assert!(matches!(err, ArtifactError::NotFound { .. }), "{err:?}");
    let err = f.store.head(id).await.unwrap_err();
    assert!(matches!(err, ArtifactError::NotFound { .. }), "{err:?}");
    let err = f.store.delete(id).await.unwrap_err();
    assert!(matches!(err, ArtifactError::NotFound { .. }), "{err:?}");
    let err = f
        .store
        .put(id, ArtifactMeta::default(), stream_of(b"x", 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ArtifactError::AlreadyExists { .. }),
        "{err:?}"
    );
    assert!(!f.store.list().await.unwrap().contains(&id));
    assert_eq!(snapshot(&f.canary), before);
}

#[tokio::test]
async fn symlinked_files_inside_an_artifact_are_never_followed() {
    let f = fixture();
    let before = snapshot(&f.canary);
    let id = ArtifactId::new_v7();
    f.store
        .put(id, ArtifactMeta::default(), stream_of(b"real", 2))
        .await
        .unwrap();
    let dir = f.store.base().join(id.to_string());
    std::fs::remove_file(dir.join("payload")).unwrap();
    symlink(f.canary.join("secret"), dir.join("payload")).unwrap();
    let err = f.store.get(id, GetOptions::default()).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Corrupt { .. }), "{err:?}");

    // Deleting removes the link, never its target.
    f.store.delete(id).await.unwrap();
    assert_eq!(snapshot(&f.canary), before);

    let id = ArtifactId::new_v7();
    f.store
        .put(id, ArtifactMeta::default(), stream_of(b"real", 2))
        .await
        .unwrap();
    let dir = f.store.base().join(id.to_string());
    std::fs::remove_file(dir.join("metadata.json")).unwrap();
    symlink(
        f.canary.join("sub/metadata.json"),
        dir.join("metadata.json"),
    )
    .unwrap();
    let err = f.store.head(id).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Corrupt { .. }), "{err:?}");
    assert_eq!(snapshot(&f.canary), before);
}

#[tokio::test]
async fn a_symlinked_staging_directory_is_refused() {
    let f = fixture();
    let before = snapshot(&f.canary);
    let staging = f.store.base().join(STAGING_DIR);
    std::fs::remove_dir(&staging).unwrap();
    symlink(&f.canary, &staging).unwrap();
    let id = ArtifactId::new_v7();
    let err = f
        .store
        .put(id, ArtifactMeta::default(), stream_of(b"x", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, ArtifactError::Backend { .. }), "{err:?}");
    assert_eq!(snapshot(&f.canary), before);
    assert!(f.store.list().await.unwrap().is_empty());

    // With the real directory back, the same id can be stored.
    std::fs::remove_file(&staging).unwrap();
    std::fs::create_dir(&staging).unwrap();
    f.store
        .put(id, ArtifactMeta::default(), stream_of(b"x", 1))
        .await
        .unwrap();
    let read = f.store.get(id, GetOptions::default()).await.unwrap();
    assert_eq!(collect(read.body).await.unwrap(), b"x");
}
