//! Conformance checks for [`LogStore`] implementations. Not semver-stable.
//!
//! Every check logs under fresh execution ids, so the store need not be empty. A failed check
//! panics with a message naming the contract it broke.

use std::time::Duration;

use futures_util::StreamExt;

use crate::domain::ExecutionId;
use crate::logs::{LogError, LogFollow, LogLine, LogStore, LogStream};
use crate::time::Timestamp;

/// How the store under test was configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCaps {
    /// The per-execution cap, in bytes of line text, the store was built with. Keep it small
    /// (a few KiB): the cap check writes past it.
    pub cap_bytes: u64,
    /// Bound on waiting for a followed line.
    pub wait_limit: Duration,
}

/// Runs every check.
pub async fn all(store: &dyn LogStore, caps: &LogCaps) {
    order_is_preserved_and_reads_start_anywhere(store).await;
    retried_appends_are_ignored_and_gaps_refused(store).await;
    follow_sees_new_lines_and_ends_on_close(store, caps).await;
    cap_is_enforced(store, caps).await;
    delete_removes_the_log(store).await;
}

fn line(seq: u64, text: impl Into<String>) -> LogLine {
    LogLine {
        seq,
        at: Timestamp::from_unix_micros(1_700_000_000_000_000 + seq as i64),
        stream: if seq % 3 == 2 {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        },
        text: text.into(),
    }
}

fn lines(from: u64, to: u64) -> Vec<LogLine> {
    (from..to).map(|i| line(i, format!("line {i}"))).collect()
}

fn ok<T>(r: Result<T, LogError>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: unexpected error {e:?}"),
    }
}

/// Lines come back in order from any starting sequence number.
pub async fn order_is_preserved_and_reads_start_anywhere(store: &dyn LogStore) {
    let id = ExecutionId::new_v7();
    assert!(
        ok(store.read(id, 0, 10).await, "read of a fresh log").is_empty(),
        "an execution that never logged reads as empty"
    );
    let all = lines(0, 250);
    for part in all.chunks(37) {
        let o = ok(store.append(id, part).await, "append");
        assert_eq!(o.written, part.len() as u64);
        assert_eq!(o.duplicates, 0);
        assert!(!o.truncated);
    }
    assert_eq!(ok(store.read(id, 0, 1000).await, "read"), all);
    assert_eq!(
        ok(store.read(id, 100, 20).await, "read"),
        all[100..120].to_vec()
    );
    assert_eq!(
        ok(store.read(id, 240, 1000).await, "read"),
        all[240..].to_vec()
    );
    assert!(ok(store.read(id, 250, 10).await, "read past the end").is_empty());
    let _ = store.delete(id).await;
}

/// Re-appending stored lines is ignored; a gap is `OutOfOrder`.
pub async fn retried_appends_are_ignored_and_gaps_refused(store: &dyn LogStore) {
    let id = ExecutionId::new_v7();
    ok(store.append(id, &lines(0, 5)).await, "append");
    let o = ok(store.append(id, &lines(3, 8)).await, "overlapping append");
    assert_eq!(
        (o.written, o.duplicates, o.next_seq),
        (3, 2, 8),
        "an overlapping append writes only the new lines"
    );
    let gap = store.append(id, &lines(10, 12)).await;
    assert!(
        matches!(
            gap,
            Err(LogError::OutOfOrder {
                expected: 8,
                got: 10,
                ..
            })
        ),
        "a gap must be OutOfOrder {{ expected: 8, got: 10 }}, got {gap:?}"
    );
    assert_eq!(ok(store.read(id, 0, 100).await, "read"), lines(0, 8));
    let _ = store.delete(id).await;
}

async fn next_line(follow: &mut LogFollow, caps: &LogCaps, what: &str) -> Option<LogLine> {
    match tokio::time::timeout(caps.wait_limit, follow.next()).await {
        Ok(Some(Ok(line))) => Some(line),
        Ok(Some(Err(e))) => panic!("{what}: follow failed: {e:?}"),
        Ok(None) => None,
        Err(_) => panic!("{what}: nothing within {:?}", caps.wait_limit),
    }
}

/// `follow` yields stored lines, then appended ones, and ends after `close`.
pub async fn follow_sees_new_lines_and_ends_on_close(store: &dyn LogStore, caps: &LogCaps) {
    let id = ExecutionId::new_v7();
    ok(store.append(id, &lines(0, 3)).await, "append");
    let mut follow = ok(store.follow(id, 1).await, "follow");
    for want in lines(1, 3) {
        assert_eq!(
            next_line(&mut follow, caps, "stored line").await,
            Some(want),
            "follow starts with the stored lines from from_seq"
        );
    }
    ok(store.append(id, &lines(3, 6)).await, "append");
    for want in lines(3, 6) {
        assert_eq!(
            next_line(&mut follow, caps, "new line").await,
            Some(want),
            "follow must yield lines appended after it started"
        );
    }
    ok(store.close(id).await, "close");
    assert_eq!(
        next_line(&mut follow, caps, "end").await,
        None,
        "follow must end once the log is closed and read"
    );
    let appended = store.append(id, &lines(6, 7)).await;
    assert!(
        matches!(appended, Err(LogError::Closed { .. })),
        "appending to a closed log must be Closed, got {appended:?}"
    );
    // Following a closed log yields what is stored, then ends.
    let mut again = ok(store.follow(id, 4).await, "follow");
    assert_eq!(
        next_line(&mut again, caps, "closed").await,
        Some(line(4, "line 4"))
    );
    assert_eq!(
        next_line(&mut again, caps, "closed").await,
        Some(line(5, "line 5"))
    );
    assert_eq!(next_line(&mut again, caps, "closed").await, None);
    let _ = store.delete(id).await;
}

/// Past the cap one `System` line is stored and later lines dropped; earlier lines stay.
pub async fn cap_is_enforced(store: &dyn LogStore, caps: &LogCaps) {
    let id = ExecutionId::new_v7();
    let text = "x".repeat(100);
    let count = caps.cap_bytes / 100 + 10;
    let mut truncated_at = None;
    for seq in 0..count {
        let o = ok(store.append(id, &[line(seq, text.clone())]).await, "append");
        if o.truncated {
            truncated_at = Some(seq);
            break;
        }
    }
    let Some(at) = truncated_at else {
        panic!(
            "{count} lines of 100 bytes must reach a cap of {} bytes",
            caps.cap_bytes
        );
    };
    let later = ok(
        store.append(id, &[line(at + 1, text.clone())]).await,
        "append",
    );
    assert!(later.truncated, "appends after the cap report truncated");
    assert_eq!(later.written, 0, "lines after the cap are dropped");
    let stored = ok(store.read(id, 0, count as usize + 10).await, "read");
    let Some((last, kept)) = stored.split_last() else {
        panic!("a capped log must keep its lines");
    };
    assert_eq!(
        last.stream,
        LogStream::System,
        "the last line says the log was capped"
    );
    assert_eq!(last.seq, kept.len() as u64);
    assert_eq!(kept.len() as u64, at, "every line before the cap is kept");
    assert!(
        kept.iter()
            .enumerate()
            .all(|(i, l)| *l == line(i as u64, text.clone()))
    );
    let kept_bytes: u64 = kept.iter().map(|l| l.text.len() as u64).sum();
    assert!(kept_bytes <= caps.cap_bytes, "kept lines must fit the cap");
    let _ = store.delete(id).await;
}

/// After `delete`, reading is `NotFound`.
pub async fn delete_removes_the_log(store: &dyn LogStore) {
    let id = ExecutionId::new_v7();
    ok(store.append(id, &lines(0, 3)).await, "append");
    ok(store.delete(id).await, "delete");
    let r = store.read(id, 0, 10).await;
    assert!(
        matches!(r, Err(LogError::NotFound { .. })),
        "reading a deleted log must be NotFound, got {r:?}"
    );
}
