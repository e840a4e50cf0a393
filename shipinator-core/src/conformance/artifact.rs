//! Conformance checks for [`ArtifactStore`] implementations. Not semver-stable.
//!
//! Every check uses fresh artifact ids and asserts only on them, so the store need not be
//! empty. A failed check panics with a message naming the contract it broke.

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use crate::artifact::{
    ArtifactError, ArtifactMeta, ArtifactStore, ByteRange, ByteStream, GetOptions,
};
use crate::domain::{ArtifactId, ArtifactType, RunId};

/// What a store supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactCaps {
    /// Size of the large round-trip payload; set it above every internal buffer of the store.
    pub large_payload: u64,
}

impl Default for ArtifactCaps {
    /// A 24 MiB payload.
    fn default() -> Self {
        Self {
            large_payload: 24 << 20,
        }
    }
}

/// Runs every check.
pub async fn all(store: &dyn ArtifactStore, caps: &ArtifactCaps) {
    large_payload_round_trips_streaming(store, caps.large_payload).await;
    artifacts_are_immutable(store).await;
    unknown_ids_are_not_found(store).await;
    range_reads_return_exactly_the_range(store).await;
    delete_and_list(store).await;
    failed_upload_leaves_nothing(store).await;
}

/// A deterministic chunk `i` of a generated payload.
fn chunk(i: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x & 0xff) as u8);
    }
    Bytes::from(v)
}

const CHUNK: usize = 64 * 1024;

/// A payload of `size` bytes generated chunk by chunk, never held whole.
fn generated(size: u64) -> ByteStream {
    let chunks = size.div_ceil(CHUNK as u64);
    Box::pin(futures_util::stream::iter(0..chunks).map(move |i| {
        let len = (size - i * CHUNK as u64).min(CHUNK as u64) as usize;
        Ok(chunk(i, len))
    }))
}

fn digest_of_generated(size: u64) -> String {
    let mut h = Sha256::new();
    let chunks = size.div_ceil(CHUNK as u64);
    for i in 0..chunks {
        let len = (size - i * CHUNK as u64).min(CHUNK as u64) as usize;
        h.update(chunk(i, len));
    }
    hex(h)
}

fn hex(h: Sha256) -> String {
    use std::fmt::Write as _;
    let mut out = String::from("sha256:");
    for b in h.finalize() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn body(bytes: &'static [u8]) -> ByteStream {
    Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(bytes))]))
}

fn meta() -> ArtifactMeta {
    let mut meta = ArtifactMeta {
        artifact_type: Some(ArtifactType::Binary),
        content_type: Some("application/octet-stream".to_owned()),
        file_name: Some("app".to_owned()),
        run_id: Some(RunId::new_v7()),
        ..ArtifactMeta::default()
    };
    meta.extra.insert("k".to_owned(), "v".to_owned());
    meta
}

async fn read_all(store: &dyn ArtifactStore, id: ArtifactId, options: GetOptions) -> Vec<u8> {
    let read = match store.get(id, options).await {
        Ok(r) => r,
        Err(e) => panic!("get {id}: {e:?}"),
    };
    let mut out = Vec::new();
    let mut body = read.body;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => out.extend_from_slice(&c),
            Err(e) => panic!("reading {id}: {e:?}"),
        }
    }
    out
}

/// A payload larger than any buffer round-trips; its checksum and size are right.
pub async fn large_payload_round_trips_streaming(store: &dyn ArtifactStore, size: u64) {
    let id = ArtifactId::new_v7();
    let m = meta();
    let stored = match store.put(id, m.clone(), generated(size)).await {
        Ok(s) => s,
        Err(e) => panic!("put of a {size}-byte payload: {e:?}"),
    };
    let want = digest_of_generated(size);
    assert_eq!(stored.size, size, "stored size");
    assert_eq!(stored.checksum, want, "checksum computed while writing");
    assert_eq!(stored.id, id);
    assert_eq!(stored.meta, m, "metadata must be stored as given");
    assert_eq!(stored.backend, store.backend());
    let head = store.head(id).await;
    assert!(
        matches!(&head, Ok(h) if *h == stored),
        "head must return what put stored, got {head:?}"
    );
    // Stream it back, hashing as we go, without collecting it.
    let read = match store
        .get(
            id,
            GetOptions {
                range: None,
                verify_checksum: true,
            },
        )
        .await
    {
        Ok(r) => r,
        Err(e) => panic!("get: {e:?}"),
    };
    assert_eq!(read.range.start, 0);
    let mut h = Sha256::new();
    let mut n = 0u64;
    let mut body = read.body;
    while let Some(c) = body.next().await {
        match c {
            Ok(c) => {
                n += c.len() as u64;
                h.update(&c);
            }
            Err(e) => panic!("reading back: {e:?}"),
        }
    }
    assert_eq!(n, size, "read back size");
    assert_eq!(hex(h), want, "the payload must round-trip byte for byte");
    let _ = store.delete(id).await;
}

/// A second `put` under the same id is `AlreadyExists` and leaves the first intact.
pub async fn artifacts_are_immutable(store: &dyn ArtifactStore) {
    let id = ArtifactId::new_v7();
    let first = match store.put(id, meta(), body(b"first payload")).await {
        Ok(s) => s,
        Err(e) => panic!("put: {e:?}"),
    };
    let second = store.put(id, meta(), body(b"second")).await;
    assert!(
        matches!(second, Err(ArtifactError::AlreadyExists { id: x }) if x == id),
        "a second put must be AlreadyExists, got {second:?}"
    );
    assert_eq!(
        read_all(store, id, GetOptions::default()).await,
        b"first payload"
    );
    assert!(matches!(store.head(id).await, Ok(h) if h == first));
    let _ = store.delete(id).await;
}

/// `get`, `head` and `delete` of an unknown id are `NotFound`.
pub async fn unknown_ids_are_not_found(store: &dyn ArtifactStore) {
    let id = ArtifactId::new_v7();
    assert!(matches!(
        store.get(id, GetOptions::default()).await,
        Err(ArtifactError::NotFound { .. })
    ));
    assert!(matches!(
        store.head(id).await,
        Err(ArtifactError::NotFound { .. })
    ));
    assert!(matches!(
        store.delete(id).await,
        Err(ArtifactError::NotFound { .. })
    ));
}

/// Range reads return exactly the range; a range past the end is `InvalidRange`.
pub async fn range_reads_return_exactly_the_range(store: &dyn ArtifactStore) {
    let id = ArtifactId::new_v7();
    let size = (CHUNK as u64) * 3 + 17;
    let mut whole = Vec::new();
    for i in 0..size.div_ceil(CHUNK as u64) {
        let len = (size - i * CHUNK as u64).min(CHUNK as u64) as usize;
        whole.extend_from_slice(&chunk(i, len));
    }
    if let Err(e) = store.put(id, meta(), generated(size)).await {
        panic!("put: {e:?}");
    }
    for (start, end) in [
        (0, Some(1)),
        (5, Some(100)),
        (CHUNK as u64 - 3, Some(CHUNK as u64 * 2 + 5)),
        (size - 10, None),
        (size - 1, Some(size)),
        (7, Some(7)),
    ] {
        let got = read_all(
            store,
            id,
            GetOptions {
                range: Some(ByteRange { start, end }),
                verify_checksum: false,
            },
        )
        .await;
        let e = end.unwrap_or(size) as usize;
        assert_eq!(
            got,
            whole[start as usize..e],
            "range {start}..{end:?} must return exactly those bytes"
        );
    }
    let past = store
        .get(
            id,
            GetOptions {
                range: Some(ByteRange {
                    start: size + 1,
                    end: Some(size + 10),
                }),
                verify_checksum: false,
            },
        )
        .await;
    assert!(
        matches!(past, Err(ArtifactError::InvalidRange { .. })),
        "a range past the end must be InvalidRange, got {past:?}"
    );
    let _ = store.delete(id).await;
}

/// `delete` removes; `list` holds every stored id.
pub async fn delete_and_list(store: &dyn ArtifactStore) {
    let ids: Vec<ArtifactId> = (0..3).map(|_| ArtifactId::new_v7()).collect();
    for id in &ids {
        if let Err(e) = store.put(*id, meta(), body(b"x")).await {
            panic!("put: {e:?}");
        }
    }
    let listed = match store.list().await {
        Ok(l) => l,
        Err(e) => panic!("list: {e:?}"),
    };
    assert!(
        ids.iter().all(|id| listed.contains(id)),
        "list must hold every stored id"
    );
    if let Err(e) = store.delete(ids[0]).await {
        panic!("delete: {e:?}");
    }
    assert!(matches!(
        store.head(ids[0]).await,
        Err(ArtifactError::NotFound { .. })
    ));
    let listed = match store.list().await {
        Ok(l) => l,
        Err(e) => panic!("list: {e:?}"),
    };
    assert!(
        !listed.contains(&ids[0]),
        "a deleted id must leave the list"
    );
    assert!(listed.contains(&ids[1]) && listed.contains(&ids[2]));
    // The id is free again after delete.
    if let Err(e) = store.put(ids[0], meta(), body(b"again")).await {
        panic!("put after delete: {e:?}");
    }
    assert_eq!(
        read_all(store, ids[0], GetOptions::default()).await,
        b"again"
    );
    for id in ids {
        let _ = store.delete(id).await;
    }
}

/// An upload whose stream fails leaves nothing visible.
pub async fn failed_upload_leaves_nothing(store: &dyn ArtifactStore) {
    let id = ArtifactId::new_v7();
    let failing: ByteStream = Box::pin(futures_util::stream::iter([
        Ok(Bytes::from_static(b"partial")),
        Err(std::io::Error::other("client went away")),
    ]));
    let r = store.put(id, meta(), failing).await;
    assert!(r.is_err(), "a put whose body fails must fail");
    assert!(matches!(
        store.head(id).await,
        Err(ArtifactError::NotFound { .. })
    ));
    let listed = match store.list().await {
        Ok(l) => l,
        Err(e) => panic!("list: {e:?}"),
    };
    assert!(
        !listed.contains(&id),
        "a failed put must leave nothing listed"
    );
    if let Err(e) = store.put(id, meta(), body(b"ok")).await {
        panic!("a failed put must leave the id free: {e:?}");
    }
    let _ = store.delete(id).await;
}
