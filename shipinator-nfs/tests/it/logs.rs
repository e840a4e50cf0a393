//! `FsLogStore`: ordering, duplicates, the cap, the index, following across processes.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use shipinator_core::domain::ExecutionId;
use shipinator_core::logs::{LogError, LogLine, LogStore, LogStream};
use shipinator_core::time::Timestamp;
use shipinator_nfs::{FsLogStore, FsLogStoreBuilder};

fn line(seq: u64) -> LogLine {
    LogLine {
        seq,
        at: Timestamp::from_unix_micros(1_795_000_000_000_000 + seq as i64),
        stream: if seq.is_multiple_of(3) {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        },
        text: format!("line {seq} with \"quotes\", a tab\tand ünïcode"),
    }
}

fn lines(range: std::ops::Range<u64>) -> Vec<LogLine> {
    range.map(line).collect()
}

fn store() -> (tempfile::TempDir, FsLogStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FsLogStore::new(dir.path()).unwrap();
    (dir, store)
}

#[tokio::test]
async fn lines_read_back_in_order_from_any_seq() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    assert!(
        store.read(id, 0, 100).await.unwrap().is_empty(),
        "never logged reads as empty"
    );
    let out = store.append(id, &lines(0..10)).await.unwrap();
    assert_eq!(
        (out.written, out.duplicates, out.truncated, out.next_seq),
        (10, 0, false, 10)
    );
    store.append(id, &lines(10..25)).await.unwrap();
    assert_eq!(store.read(id, 0, 100).await.unwrap(), lines(0..25));
    assert_eq!(store.read(id, 7, 5).await.unwrap(), lines(7..12));
    assert_eq!(store.read(id, 24, 5).await.unwrap(), lines(24..25));
    assert!(store.read(id, 25, 5).await.unwrap().is_empty());
    assert!(store.read(id, 3, 0).await.unwrap().is_empty());
    assert!(store.log_path(id).starts_with(store.dir()));
}

#[tokio::test]
async fn retried_lines_are_ignored_and_gaps_refused() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    store.append(id, &lines(0..5)).await.unwrap();
    let out = store.append(id, &lines(0..5)).await.unwrap();
    assert_eq!((out.written, out.duplicates, out.next_seq), (0, 5, 5));
    let out = store.append(id, &lines(3..8)).await.unwrap();
    assert_eq!((out.written, out.duplicates, out.next_seq), (3, 2, 8));
    let err = store.append(id, &lines(9..12)).await.unwrap_err();
    assert!(
        matches!(
            err,
            LogError::OutOfOrder {
                expected: 8,
                got: 9,
                ..
            }
        ),
        "{err:?}"
    );
    let mut gappy = lines(8..10);
    gappy.push(line(11));
    let err = store.append(id, &gappy).await.unwrap_err();
    assert!(
        matches!(
            err,
            LogError::OutOfOrder {
                expected: 10,
                got: 11,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        store.read(id, 0, 100).await.unwrap(),
        lines(0..8),
        "a refused batch writes nothing"
    );
    let out = store.append(id, &[]).await.unwrap();
    assert_eq!(out.next_seq, 8);
}

#[tokio::test]
async fn the_cap_keeps_earlier_lines_and_stores_one_notice() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 2_000;
    let store = FsLogStoreBuilder::new(dir.path())
        .with_cap(cap)
        .build()
        .unwrap();
    let id = ExecutionId::new_v7();
    let mut stored_until = 0;
    let mut truncated_at = None;
    for chunk in 0..20u64 {
        let out = store
            .append(id, &lines(chunk * 5..chunk * 5 + 5))
            .await
            .unwrap();
        if out.truncated && truncated_at.is_none() {
            truncated_at = Some(out.next_seq);
            stored_until = chunk * 5 + out.written;
        }
    }
    let truncated_at = truncated_at.expect("the cap was reached");
    let all = store.read(id, 0, 1000).await.unwrap();
    assert_eq!(all.len() as u64, truncated_at);
    assert_eq!(&all[..stored_until as usize], &lines(0..stored_until)[..]);
    let notice = all.last().unwrap();
    assert_eq!(notice.stream, LogStream::System);
    assert!(
        notice.text.contains("truncated") && notice.text.contains("2000"),
        "{notice:?}"
    );
    assert_eq!(
        all.iter().filter(|l| l.stream == LogStream::System).count(),
        1
    );
    let text: usize = all[..all.len() - 1].iter().map(|l| l.text.len()).sum();
    assert!(text as u64 <= cap, "{text}");
    // Another process opening the same volume sees it as truncated too.
    let other = FsLogStoreBuilder::new(dir.path())
        .with_cap(cap)
        .build()
        .unwrap();
    let out = other.append(id, &lines(1000..1001)).await.unwrap();
    assert!(out.truncated);
    assert_eq!(out.written, 0);
    assert_eq!(other.read(id, 0, 1000).await.unwrap(), all);
}

#[tokio::test]
async fn large_logs_are_read_through_the_index() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    for start in (0..10_000).step_by(1000) {
        store.append(id, &lines(start..start + 1000)).await.unwrap();
    }
    let idx = store.dir().join(format!("{id}.idx"));
    assert_eq!(
        std::fs::metadata(&idx).unwrap().len(),
        10_000u64.div_ceil(256) * 24
    );
    assert_eq!(
        store.read(id, 9_990, 100).await.unwrap(),
        lines(9_990..10_000)
    );
    assert_eq!(store.read(id, 5_120, 3).await.unwrap(), lines(5_120..5_123));
    assert_eq!(store.read(id, 255, 2).await.unwrap(), lines(255..257));

    // A corrupt index is ignored, never trusted.
    std::fs::write(&idx, [0xffu8; 96]).unwrap();
    assert_eq!(store.read(id, 9_000, 2).await.unwrap(), lines(9_000..9_002));
}

#[tokio::test]
async fn a_line_torn_by_a_crash_is_never_read_and_is_cut_off() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    store.append(id, &lines(0..300)).await.unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(store.log_path(id))
        .unwrap();
    f.write_all(br#"{"seq":300,"at":1,"stream":"stdo"#).unwrap();
    drop(f);
    assert_eq!(store.read(id, 0, 1000).await.unwrap(), lines(0..300));
    let out = store.append(id, &lines(300..600)).await.unwrap();
    assert_eq!((out.written, out.next_seq), (300, 600));
    assert_eq!(store.read(id, 0, 1000).await.unwrap(), lines(0..600));
    assert_eq!(store.read(id, 512, 1).await.unwrap(), lines(512..513));
}

#[tokio::test]
async fn follow_streams_stored_then_new_lines_and_ends_after_close() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    store.append(id, &lines(0..3)).await.unwrap();
    let mut follow = store.follow(id, 1).await.unwrap();
    for want in lines(1..3) {
        assert_eq!(follow.next().await.unwrap().unwrap(), want);
    }
    let writer = store.clone();
    let task = tokio::spawn(async move {
        for seq in 3..8 {
            writer.append(id, &[line(seq)]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        writer.close(id).await.unwrap();
    });
    let mut rest = Vec::new();
    while let Some(item) = follow.next().await {
        rest.push(item.unwrap());
    }
    task.await.unwrap();
    assert_eq!(rest, lines(3..8));
    let err = store.append(id, &[line(8)]).await.unwrap_err();
    assert!(matches!(err, LogError::Closed { .. }), "{err:?}");
    // Following a closed log yields what is stored, then ends.
    let all: Vec<_> = store.follow(id, 0).await.unwrap().collect().await;
    assert_eq!(
        all.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        lines(0..8)
    );
}

#[tokio::test]
async fn followers_see_appends_and_close_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    // Two stores on one volume share nothing in memory, like a worker and the server.
    let reader = FsLogStoreBuilder::new(dir.path())
        .with_poll_interval(Duration::from_millis(20))
        .build()
        .unwrap();
    let writer = FsLogStore::new(dir.path()).unwrap();
    let id = ExecutionId::new_v7();
    let follow = reader.follow(id, 0).await.unwrap();
    let task = tokio::spawn(async move {
        for start in (0..600).step_by(100) {
            writer.append(id, &lines(start..start + 100)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        writer.close(id).await.unwrap();
    });
    let got: Vec<_> = follow.collect().await;
    task.await.unwrap();
    assert_eq!(
        got.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        lines(0..600)
    );
}

#[tokio::test]
async fn delete_removes_the_log() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    store.append(id, &lines(0..10)).await.unwrap();
    let mut follow = store.follow(id, 10).await.unwrap();
    store.delete(id).await.unwrap();
    let err = store.read(id, 0, 10).await.unwrap_err();
    assert!(
        matches!(err, LogError::NotFound { id: x } if x == id),
        "{err:?}"
    );
    assert!(matches!(
        store.follow(id, 0).await,
        Err(LogError::NotFound { .. })
    ));
    // A follower of a deleted log gets NotFound and ends.
    let item = follow.next().await.unwrap();
    assert!(matches!(item, Err(LogError::NotFound { .. })), "{item:?}");
    assert!(follow.next().await.is_none());
    assert!(!store.log_path(id).exists());
    // Others are untouched.
    let other = ExecutionId::new_v7();
    store.append(other, &lines(0..2)).await.unwrap();
    assert_eq!(store.read(other, 0, 10).await.unwrap(), lines(0..2));
}

#[tokio::test]
async fn the_cap_is_counted_from_the_index_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let all = lines(0..600);
    let cap: u64 = all.iter().map(|l| l.text.len() as u64).sum();
    let first = FsLogStoreBuilder::new(dir.path())
        .with_cap(cap)
        .build()
        .unwrap();
    let id = ExecutionId::new_v7();
    let out = first.append(id, &all).await.unwrap();
    assert_eq!(
        (out.written, out.truncated),
        (600, false),
        "exactly at the cap fits"
    );
    // A fresh store (another process) recounts from the last index record, not from 0.
    let second = FsLogStoreBuilder::new(dir.path())
        .with_cap(cap)
        .build()
        .unwrap();
    let out = second.append(id, &[line(600)]).await.unwrap();
    assert_eq!((out.written, out.truncated, out.next_seq), (0, true, 601));
    let stored = second.read(id, 599, 10).await.unwrap();
    assert_eq!(stored[0], line(599));
    assert_eq!(stored[1].stream, LogStream::System);
}

/// The names of the files in the log directory, sorted.
fn files(store: &FsLogStore) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn close_adds_no_file_and_closing_again_changes_nothing() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    store.append(id, &lines(0..300)).await.unwrap();
    let before = files(&store);
    store.close(id).await.unwrap();
    assert_eq!(files(&store), before, "close creates no file");
    let closed_len = std::fs::metadata(store.log_path(id)).unwrap().len();
    store.close(id).await.unwrap();
    assert_eq!(
        std::fs::metadata(store.log_path(id)).unwrap().len(),
        closed_len,
        "a second close writes nothing"
    );
    assert_eq!(store.read(id, 0, 1000).await.unwrap(), lines(0..300));
    assert_eq!(store.read(id, 299, 10).await.unwrap(), lines(299..300));
    assert!(store.read(id, 300, 10).await.unwrap().is_empty());
    let err = store.append(id, &[line(300)]).await.unwrap_err();
    assert!(matches!(err, LogError::Closed { .. }), "{err:?}");
    // A retried append of stored lines is refused too: the log is closed.
    let err = store.append(id, &lines(0..3)).await.unwrap_err();
    assert!(matches!(err, LogError::Closed { .. }), "{err:?}");
    // A follower that asks for exactly the stored lines ends after them.
    let all: Vec<_> = store.follow(id, 0).await.unwrap().collect().await;
    assert_eq!(all.len(), 300);
    // Another process (a fresh store on the same volume) sees the close.
    let other = FsLogStore::new(store.dir().parent().unwrap()).unwrap();
    let err = other.append(id, &[line(300)]).await.unwrap_err();
    assert!(matches!(err, LogError::Closed { .. }), "{err:?}");
    let all: Vec<_> = other.follow(id, 298).await.unwrap().collect().await;
    assert_eq!(
        all.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        lines(298..300)
    );
}

#[tokio::test]
async fn closing_a_log_that_never_logged_ends_its_followers() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    let follow = store.follow(id, 0).await.unwrap();
    store.close(id).await.unwrap();
    assert_eq!(follow.collect::<Vec<_>>().await.len(), 0);
    assert!(store.read(id, 0, 10).await.unwrap().is_empty());
    let err = store.append(id, &lines(0..1)).await.unwrap_err();
    assert!(matches!(err, LogError::Closed { .. }), "{err:?}");
}

#[tokio::test]
async fn close_cuts_off_a_line_torn_by_a_crash() {
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    store.append(id, &lines(0..5)).await.unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(store.log_path(id))
        .unwrap();
    f.write_all(br#"{"seq":5,"at":1,"stream":"stdo"#).unwrap();
    drop(f);
    store.close(id).await.unwrap();
    assert_eq!(store.read(id, 0, 100).await.unwrap(), lines(0..5));
    let all: Vec<_> = store.follow(id, 0).await.unwrap().collect().await;
    assert_eq!(
        all.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        lines(0..5)
    );
    let err = store.append(id, &[line(5)]).await.unwrap_err();
    assert!(matches!(err, LogError::Closed { .. }), "{err:?}");
}

#[tokio::test]
async fn a_log_closed_with_a_marker_file_stays_closed() {
    // Earlier versions closed a log by creating `<id>.closed` next to it.
    let (_dir, store) = store();
    let id = ExecutionId::new_v7();
    store.append(id, &lines(0..4)).await.unwrap();
    std::fs::File::create(store.dir().join(format!("{id}.closed"))).unwrap();
    let err = store.append(id, &[line(4)]).await.unwrap_err();
    assert!(matches!(err, LogError::Closed { .. }), "{err:?}");
    let all: Vec<_> = store.follow(id, 1).await.unwrap().collect().await;
    assert_eq!(
        all.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        lines(1..4)
    );
    store.close(id).await.unwrap();
    store.delete(id).await.unwrap();
    assert!(
        files(&store)
            .iter()
            .all(|f| !f.starts_with(&id.to_string()) || f.ends_with(".deleted"))
    );
}
