//! [`InMemoryLogStore`]: step logs in memory, with a per-execution cap in bytes.
//!
//! ```
//! use shipinator_core::domain::ExecutionId;
//! use shipinator_core::logs::{LogLine, LogStore, LogStream};
//! use shipinator_core::memory::InMemoryLogStore;
//! use shipinator_core::time::Timestamp;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let logs = InMemoryLogStore::new(1 << 20);
//! let id = ExecutionId::new_v7();
//! let line = LogLine { seq: 0, at: Timestamp::EPOCH, stream: LogStream::Stdout, text: "hi".into() };
//! logs.append(id, &[line.clone()]).await.unwrap();
//! assert_eq!(logs.read(id, 0, 10).await.unwrap(), vec![line]);
//! # });
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::domain::ExecutionId;
use crate::logs::{AppendOutcome, LogError, LogFollow, LogLine, LogStore, LogStream};

struct Log {
    lines: Vec<LogLine>,
    bytes: u64,
    truncated: bool,
    closed: bool,
    /// Bumped on every change; followers wait on it.
    changed: watch::Sender<u64>,
}

impl Log {
    fn new() -> Self {
        Self {
            lines: Vec::new(),
            bytes: 0,
            truncated: false,
            closed: false,
            changed: watch::channel(0).0,
        }
    }

    fn next_seq(&self) -> u64 {
        self.lines.len() as u64
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

#[derive(Default)]
struct Logs {
    logs: HashMap<ExecutionId, Log>,
    deleted: HashSet<ExecutionId>,
}

/// A [`LogStore`] in memory. Each execution's log holds at most `cap_bytes` of line text;
/// the line that would exceed it is replaced by one `System` line saying so.
pub struct InMemoryLogStore {
    inner: Arc<Mutex<Logs>>,
    cap_bytes: u64,
}

impl fmt::Debug for InMemoryLogStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryLogStore")
            .field("cap_bytes", &self.cap_bytes)
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryLogStore {
    /// A store with a 16 MiB cap per execution.
    fn default() -> Self {
        Self::new(16 << 20)
    }
}

fn lock(inner: &Mutex<Logs>) -> MutexGuard<'_, Logs> {
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read_from(logs: &Logs, id: ExecutionId, from_seq: u64, limit: usize) -> Option<Vec<LogLine>> {
    if logs.deleted.contains(&id) {
        return None;
    }
    let Some(log) = logs.logs.get(&id) else {
        return Some(Vec::new());
    };
    let start = usize::try_from(from_seq)
        .unwrap_or(usize::MAX)
        .min(log.lines.len());
    let end = start.saturating_add(limit).min(log.lines.len());
    Some(log.lines[start..end].to_vec())
}

impl InMemoryLogStore {
    /// An empty store capping each execution's log at `cap_bytes` of text.
    pub fn new(cap_bytes: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Logs::default())),
            cap_bytes,
        }
    }

    /// The truncation notice stored when a log reaches the cap.
    fn notice(&self) -> String {
        format!(
            "log truncated: it reached the cap of {} bytes; later lines were dropped",
            self.cap_bytes
        )
    }
}

#[async_trait::async_trait]
impl LogStore for InMemoryLogStore {
    async fn append(&self, id: ExecutionId, lines: &[LogLine]) -> Result<AppendOutcome, LogError> {
        let notice = self.notice();
        let mut logs = lock(&self.inner);
        logs.deleted.remove(&id);
        let log = logs.logs.entry(id).or_insert_with(Log::new);
        if log.closed {
            return Err(LogError::Closed { id });
        }
        let mut outcome = AppendOutcome::default();
        let mut expected = log.next_seq();
        for line in lines {
            if log.truncated {
                break;
            }
            if line.seq < expected {
                outcome.duplicates += 1;
                continue;
            }
            if line.seq > expected {
                if outcome.written > 0 {
                    log.bump();
                }
                return Err(LogError::OutOfOrder {
                    id,
                    expected,
                    got: line.seq,
                });
            }
            let len = line.text.len() as u64;
            if log.bytes.saturating_add(len) > self.cap_bytes {
                log.lines.push(LogLine {
                    seq: expected,
                    at: line.at,
                    stream: LogStream::System,
                    text: notice.clone(),
                });
                log.truncated = true;
                outcome.written += 1;
                break;
            }
            log.bytes += len;
            log.lines.push(line.clone());
            outcome.written += 1;
            expected += 1;
        }
        outcome.truncated = log.truncated;
        outcome.next_seq = log.next_seq();
        if outcome.written > 0 {
            log.bump();
        }
        Ok(outcome)
    }

    async fn read(
        &self,
        id: ExecutionId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>, LogError> {
        read_from(&lock(&self.inner), id, from_seq, limit).ok_or(LogError::NotFound { id })
    }

    async fn follow(&self, id: ExecutionId, from_seq: u64) -> Result<LogFollow, LogError> {
        let rx = {
            let mut logs = lock(&self.inner);
            if logs.deleted.contains(&id) {
                return Err(LogError::NotFound { id });
            }
            logs.logs
                .entry(id)
                .or_insert_with(Log::new)
                .changed
                .subscribe()
        };
        let inner = Arc::clone(&self.inner);
        let stream = futures_util::stream::unfold(
            (
                inner,
                rx,
                from_seq,
                Vec::<LogLine>::new().into_iter(),
                false,
            ),
            move |(inner, mut rx, mut next, mut buffered, done)| async move {
                loop {
                    if let Some(line) = buffered.next() {
                        next = line.seq + 1;
                        return Some((Ok(line), (inner, rx, next, buffered, done)));
                    }
                    if done {
                        return None;
                    }
                    // Mark the current version seen before reading, so no change is missed.
                    rx.borrow_and_update();
                    let (lines, closed) = {
                        let logs = lock(&inner);
                        let lines = read_from(&logs, id, next, 1024);
                        let closed = logs.logs.get(&id).is_none_or(|l| l.closed);
                        (lines, closed)
                    };
                    let Some(lines) = lines else {
                        return Some((
                            Err(LogError::NotFound { id }),
                            (inner, rx, next, Vec::new().into_iter(), true),
                        ));
                    };
                    if !lines.is_empty() {
                        buffered = lines.into_iter();
                        continue;
                    }
                    if closed {
                        return None;
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn close(&self, id: ExecutionId) -> Result<(), LogError> {
        let mut logs = lock(&self.inner);
        if logs.deleted.contains(&id) {
            return Err(LogError::NotFound { id });
        }
        let log = logs.logs.entry(id).or_insert_with(Log::new);
        log.closed = true;
        log.bump();
        Ok(())
    }

    async fn delete(&self, id: ExecutionId) -> Result<(), LogError> {
        let mut logs = lock(&self.inner);
        if let Some(log) = logs.logs.remove(&id) {
            log.bump();
        }
        logs.deleted.insert(id);
        Ok(())
    }
}
