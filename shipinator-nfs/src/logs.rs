//! [`FsLogStore`]: step logs as append-only files on the same volume as the artifacts.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shipinator_core::domain::ExecutionId;
use shipinator_core::logs::{AppendOutcome, LogError, LogFollow, LogLine, LogStore, LogStream};
use tokio::sync::Notify;

use crate::error::Error;
use crate::fs::blocking;

/// The directory, inside the base, that holds the logs.
pub const LOGS_DIR: &str = "logs";
/// The default cap of one execution's log, in bytes of stored lines.
pub const DEFAULT_LOG_CAP: u64 = 10 << 20;
/// The default interval at which followers look for lines appended by other processes.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// One index record is kept for every this many lines.
const INDEX_EVERY: u64 = 256;
/// Bytes per index record: the line's `seq`, its byte offset and the bytes of text stored
/// before it, each a little-endian `u64`.
const INDEX_RECORD: u64 = 24;
/// Lines a follower reads at once.
const FOLLOW_BATCH: usize = 1000;
/// How the truncation notice starts; only ever written as a `System` line.
const TRUNCATION_PREFIX: &str = "[shipinator] log truncated";
/// The record `close` appends: the last line of a closed log, never a [`LogLine`].
const CLOSE_RECORD: &[u8] = b"{\"closed\":true}\n";
/// Bytes read at a time when looking backwards for the end of the last complete line.
const TAIL_CHUNK: u64 = 8 << 10;

/// A [`LogStore`] on a mounted filesystem.
///
/// # Layout
/// ```text
/// <base>/logs/<execution-id>.log      one JSON object per line: {"seq","at","stream","text"},
///                                     and once closed a last line {"closed":true}
/// <base>/logs/<execution-id>.idx      every 256th line's seq, byte offset and text bytes before it
/// <base>/logs/<execution-id>.deleted  present once the log is deleted (reads are NotFound)
/// ```
/// `read(from_seq)` seeks through the index and scans at most 256 lines before `from_seq`, so
/// reading the end of a large log does not rescan it from the start. A log closed by an
/// earlier version has a `<execution-id>.closed` file instead of the close record; it is
/// still honoured.
///
/// # Durability
/// Appends are not fsynced: a step's status lives in the store, which is durable, and a
/// running step's log is a record of output. `close` flushes the log once (`fdatasync`) after
/// writing the close record, and the worker closes a step's log before it reports the step's
/// end, so a step the store records as ended keeps its whole log, close record included, after
/// a power loss. Before that, a crash may cost a log its last lines; since the log only ever
/// grows at its end, what survives is a prefix, and a line torn by the crash is never read
/// (the next append or close cuts it off).
///
/// # Several processes
/// Appends take an exclusive `flock` on the log file, so a worker process and the server can
/// share the volume; a line torn by a crash (no trailing newline) is never read and is cut off
/// by the next append. Followers are woken at once by appends in the same process, and see
/// appends and `close` from other processes within the poll interval (200 ms by default).
///
/// # Cap
/// Each execution's log keeps at most `cap` bytes of line text (10 MiB by default; the JSON
/// framing on disk adds about 70 bytes per line). The line
/// that would cross it is replaced by one `System` line saying so, and later lines are dropped
/// (reported as `truncated`, without order checks).
#[derive(Debug, Clone)]
pub struct FsLogStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    cap: u64,
    poll: Duration,
    /// Serialises appends of one execution within this process (`flock` does across them).
    locks: Mutex<HashMap<ExecutionId, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes this process's followers.
    notifiers: Mutex<HashMap<ExecutionId, Arc<Notify>>>,
}

/// Builds an [`FsLogStore`].
#[derive(Debug, Clone)]
pub struct FsLogStoreBuilder {
    base: PathBuf,
    cap: u64,
    poll: Duration,
}

impl FsLogStoreBuilder {
    /// Logs under `<base>/logs`.
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Self {
            base: base.into(),
            cap: DEFAULT_LOG_CAP,
            poll: DEFAULT_POLL_INTERVAL,
        }
    }

    /// The per-execution cap in bytes.
    pub fn with_cap(mut self, bytes: u64) -> Self {
        self.cap = bytes;
        self
    }

    /// How often followers look for lines appended by other processes (at most 250 ms is
    /// sensible for live logs).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll = interval;
        self
    }

    /// Creates `<base>/logs` if needed and returns the store.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be created.
    pub fn build(self) -> Result<FsLogStore, Error> {
        let dir = self.base.join(LOGS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create directory", &dir, e))?;
        Ok(FsLogStore {
            inner: Arc::new(Inner {
                dir,
                cap: self.cap,
                poll: self.poll,
                locks: Mutex::default(),
                notifiers: Mutex::default(),
            }),
        })
    }
}

impl FsLogStore {
    /// A store under `<base>/logs` with the default cap and poll interval.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be created.
    pub fn new(base: impl Into<PathBuf>) -> Result<Self, Error> {
        FsLogStoreBuilder::new(base).build()
    }

    /// The directory holding the log files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The path of an execution's log file.
    pub fn log_path(&self, id: ExecutionId) -> PathBuf {
        self.inner.path(id, "log")
    }

    fn lock_for(&self, id: ExecutionId) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.inner.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(id).or_default())
    }

    fn notifier(&self, id: ExecutionId) -> Arc<Notify> {
        self.inner.notifier(id)
    }
}

/// What the end of a log file says.
#[derive(Debug, Clone, Copy)]
struct Tail {
    next_seq: u64,
    /// Where the next line goes.
    end: u64,
    /// Bytes of text stored.
    text: u64,
    truncated: bool,
}

/// Where to start scanning: a line's seq, its byte offset and the text bytes before it.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    seq: u64,
    offset: u64,
    text: u64,
}

impl Inner {
    fn path(&self, id: ExecutionId, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    fn notifier(&self, id: ExecutionId) -> Arc<Notify> {
        let mut n = self.notifiers.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(n.entry(id).or_default())
    }

    fn is_deleted(&self, id: ExecutionId) -> bool {
        self.path(id, "deleted").exists()
    }

    /// Whether an earlier version closed the log with a marker file.
    fn has_close_marker(&self, id: ExecutionId) -> bool {
        self.path(id, "closed").exists()
    }

    fn check_not_deleted(&self, id: ExecutionId) -> Result<(), Error> {
        if self.is_deleted(id) {
            return Err(Error::Log(LogError::NotFound { id }));
        }
        Ok(())
    }

    /// The byte offset to start scanning from to find `seq`: the closest index record at or
    /// before it, checked against the log (an index that does not match is ignored).
    fn seek_offset(&self, id: ExecutionId, log: &mut File, seq: u64) -> Result<Mark, Error> {
        let idx_path = self.path(id, "idx");
        let mut idx = match File::open(&idx_path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Mark::default()),
            Err(e) => return Err(Error::io("open", &idx_path, e)),
        };
        let records = idx
            .metadata()
            .map_err(|e| Error::io("stat", &idx_path, e))?
            .len()
            / INDEX_RECORD;
        let log_len = log
            .metadata()
            .map_err(|e| Error::io("stat", self.path(id, "log"), e))?
            .len();
        let mut k = (seq / INDEX_EVERY).min(records);
        while k > 0 {
            k -= 1;
            let mut rec = [0u8; INDEX_RECORD as usize];
            idx.seek(SeekFrom::Start(k * INDEX_RECORD))
                .and_then(|_| idx.read_exact(&mut rec))
                .map_err(|e| Error::io("read", &idx_path, e))?;
            let m = split_record(&rec);
            if m.seq == k * INDEX_EVERY
                && m.offset < log_len
                && self.line_at(id, log, m.offset)? == Some(m.seq)
            {
                return Ok(m);
            }
        }
        Ok(Mark::default())
    }

    /// The `seq` of the complete line starting at `offset`, if there is one.
    fn line_at(&self, id: ExecutionId, log: &mut File, offset: u64) -> Result<Option<u64>, Error> {
        let path = self.path(id, "log");
        log.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io("seek", &path, e))?;
        let mut line = Vec::new();
        BufReader::new(&mut *log)
            .take(1 << 20)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io("read", &path, e))?;
        if line.last() != Some(&b'\n') {
            return Ok(None);
        }
        Ok(serde_json::from_slice::<LogLine>(&line).ok().map(|l| l.seq))
    }

    fn read(&self, id: ExecutionId, from_seq: u64, limit: usize) -> Result<Vec<LogLine>, Error> {
        self.read_to_close(id, from_seq, limit)
            .map(|(lines, _)| lines)
    }

    /// Up to `limit` lines from `from_seq` on, and whether the read reached the close record
    /// (then no line follows the ones returned, ever).
    fn read_to_close(
        &self,
        id: ExecutionId,
        from_seq: u64,
        limit: usize,
    ) -> Result<(Vec<LogLine>, bool), Error> {
        self.check_not_deleted(id)?;
        let path = self.path(id, "log");
        let mut log = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.check_not_deleted(id)?;
                return Ok((Vec::new(), false));
            }
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let mut out = Vec::new();
        if limit == 0 {
            return Ok((out, false));
        }
        let mark = self.seek_offset(id, &mut log, from_seq)?;
        let closed = self.scan(id, &mut log, mark.offset, |line, _| {
            if line.seq >= from_seq {
                out.push(line);
            }
            out.len() < limit
        })?;
        Ok((out, closed))
    }

    /// Calls `f` with every complete line from `offset` on and the offset after it, until it
    /// returns false or the close record is reached. Returns whether it reached the close
    /// record.
    fn scan(
        &self,
        id: ExecutionId,
        log: &mut File,
        offset: u64,
        mut f: impl FnMut(LogLine, u64) -> bool,
    ) -> Result<bool, Error> {
        let path = self.path(id, "log");
        log.seek(SeekFrom::Start(offset))
            .map_err(|e| Error::io("seek", &path, e))?;
        let mut reader = BufReader::with_capacity(64 << 10, &mut *log);
        let mut pos = offset;
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| Error::io("read", &path, e))?;
            if n == 0 || buf.last() != Some(&b'\n') {
                // The end, or a line still being written / torn by a crash.
                return Ok(false);
            }
            if buf == CLOSE_RECORD {
                return Ok(true);
            }
            let line: LogLine =
                serde_json::from_slice(&buf).map_err(|source| Error::LogFormat {
                    id,
                    offset: pos,
                    source,
                })?;
            pos += n as u64;
            if !f(line, pos) {
                return Ok(false);
            }
        }
    }

    /// Appends under the file lock. Repairs a torn last line and missing index records first.
    fn append(&self, id: ExecutionId, lines: &[LogLine]) -> Result<AppendOutcome, Error> {
        self.check_not_deleted(id)?;
        if self.has_close_marker(id) {
            return Err(Error::Log(LogError::Closed { id }));
        }
        let path = self.path(id, "log");
        let idx_path = self.path(id, "idx");
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        rustix::fs::flock(&log, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io("lock", &path, e.into()))?;
        // Checked again under the lock: another process may have deleted it. A close record
        // is found by the scan of the tail below.
        self.check_not_deleted(id)?;

        let mut idx = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&idx_path)
            .map_err(|e| Error::io("open", &idx_path, e))?;
        let idx_len = idx
            .metadata()
            .map_err(|e| Error::io("stat", &idx_path, e))?
            .len();
        if idx_len % INDEX_RECORD != 0 {
            idx.set_len(idx_len - idx_len % INDEX_RECORD)
                .map_err(|e| Error::io("truncate", &idx_path, e))?;
        }
        let mut records = idx_len / INDEX_RECORD;

        // Find the tail: scan from the last good index record.
        let mark = self.seek_offset(id, &mut log, u64::MAX)?;
        let mut next_seq = mark.seq;
        let mut end = mark.offset;
        let mut text = mark.text;
        let mut last: Option<LogLine> = None;
        let mut missing = Vec::new();
        let closed = self.scan(id, &mut log, mark.offset, |line, after| {
            if line.seq % INDEX_EVERY == 0 && line.seq / INDEX_EVERY >= records {
                missing.push(Mark {
                    seq: line.seq,
                    offset: end,
                    text,
                });
            }
            if line.stream != LogStream::System || !line.text.starts_with(TRUNCATION_PREFIX) {
                text += line.text.len() as u64;
            }
            next_seq = line.seq + 1;
            end = after;
            last = Some(line);
            true
        })?;
        if closed {
            return Err(Error::Log(LogError::Closed { id }));
        }
        let file_len = log
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        if file_len > end {
            // A line torn by a crash: cut it off.
            log.set_len(end)
                .map_err(|e| Error::io("truncate", &path, e))?;
        }
        let mut index_out = Vec::new();
        for m in missing {
            if m.seq / INDEX_EVERY == records {
                index_out.extend_from_slice(&record(m));
                records += 1;
            }
        }
        let truncated = last.as_ref().is_some_and(|l| {
            l.stream == LogStream::System && l.text.starts_with(TRUNCATION_PREFIX)
        });
        let mut tail = Tail {
            next_seq,
            end,
            text,
            truncated,
        };

        let outcome =
            self.plan_and_write(id, lines, &mut tail, &mut log, &mut index_out, &mut records)?;
        if !index_out.is_empty() {
            idx.write_all(&index_out)
                .map_err(|e| Error::io("write", &idx_path, e))?;
        }
        Ok(outcome)
    }

    fn plan_and_write(
        &self,
        id: ExecutionId,
        lines: &[LogLine],
        tail: &mut Tail,
        log: &mut File,
        index_out: &mut Vec<u8>,
        records: &mut u64,
    ) -> Result<AppendOutcome, Error> {
        let path = self.path(id, "log");
        let mut outcome = AppendOutcome {
            next_seq: tail.next_seq,
            truncated: tail.truncated,
            ..AppendOutcome::default()
        };
        let fresh: Vec<&LogLine> = lines.iter().filter(|l| l.seq >= tail.next_seq).collect();
        outcome.duplicates = (lines.len() - fresh.len()) as u64;
        if tail.truncated {
            return Ok(outcome);
        }
        for (i, line) in fresh.iter().enumerate() {
            let expected = tail.next_seq + i as u64;
            if line.seq != expected {
                return Err(Error::Log(LogError::OutOfOrder {
                    id,
                    expected,
                    got: line.seq,
                }));
            }
        }
        let mut out = Vec::new();
        let mut offset = tail.end;
        for line in fresh {
            let text_before = tail.text;
            let (seq, text) = if tail.text + line.text.len() as u64 > self.cap {
                let notice = LogLine {
                    seq: tail.next_seq,
                    at: line.at,
                    stream: LogStream::System,
                    text: format!(
                        "{TRUNCATION_PREFIX}: it reached the cap of {} bytes of text; later lines are dropped",
                        self.cap
                    ),
                };
                let mut t = serde_json::to_vec(&notice).map_err(|source| Error::LogFormat {
                    id,
                    offset,
                    source,
                })?;
                t.push(b'\n');
                tail.truncated = true;
                (notice.seq, t)
            } else {
                let mut text = serde_json::to_vec(line).map_err(|source| Error::LogFormat {
                    id,
                    offset,
                    source,
                })?;
                text.push(b'\n');
                outcome.written += 1;
                tail.text += line.text.len() as u64;
                (line.seq, text)
            };
            if seq % INDEX_EVERY == 0 && seq / INDEX_EVERY == *records {
                index_out.extend_from_slice(&record(Mark {
                    seq,
                    offset,
                    text: text_before,
                }));
                *records += 1;
            }
            offset += text.len() as u64;
            out.extend_from_slice(&text);
            tail.next_seq = seq + 1;
            if tail.truncated {
                break;
            }
        }
        log.write_all(&out)
            .map_err(|e| Error::io("write", &path, e))?;
        tail.end = offset;
        outcome.next_seq = tail.next_seq;
        outcome.truncated = tail.truncated;
        Ok(outcome)
    }

    /// Appends the close record under the file lock, after cutting off a torn last line; a
    /// log closed already is left as it is. No new file unless the log had none.
    fn close(&self, id: ExecutionId) -> Result<(), Error> {
        self.check_not_deleted(id)?;
        if self.has_close_marker(id) {
            return Ok(());
        }
        let path = self.path(id, "log");
        let mut log = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        rustix::fs::flock(&log, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| Error::io("lock", &path, e.into()))?;
        self.check_not_deleted(id)?;
        let len = log
            .metadata()
            .map_err(|e| Error::io("stat", &path, e))?
            .len();
        let end = complete_end(&mut log, len).map_err(|e| Error::io("read", &path, e))?;
        if end >= CLOSE_RECORD.len() as u64 {
            let mut last = [0u8; CLOSE_RECORD.len()];
            log.seek(SeekFrom::Start(end - CLOSE_RECORD.len() as u64))
                .and_then(|_| log.read_exact(&mut last))
                .map_err(|e| Error::io("read", &path, e))?;
            if last == CLOSE_RECORD {
                return Ok(());
            }
        }
        if len > end {
            // A line torn by a crash: cut it off, or the record would extend it.
            log.set_len(end)
                .map_err(|e| Error::io("truncate", &path, e))?;
        }
        log.write_all(CLOSE_RECORD)
            .map_err(|e| Error::io("write", &path, e))?;
        // Durable once closed: a step recorded as ended keeps its whole log, and followers
        // see its end, even after a power loss. One flush of data already written; no new
        // file.
        log.sync_data().map_err(|e| Error::io("sync", &path, e))
    }

    fn delete(&self, id: ExecutionId) -> Result<(), Error> {
        let tomb = self.path(id, "deleted");
        File::create(&tomb).map_err(|e| Error::io("create", &tomb, e))?;
        for ext in ["log", "idx", "closed"] {
            let p = self.path(id, ext);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &p, e)),
            }
        }
        Ok(())
    }
}

/// The offset just after the last newline of the first `len` bytes of `file` (0 if none): the
/// end of its last complete line.
fn complete_end(file: &mut File, len: u64) -> io::Result<u64> {
    let mut end = len;
    let mut chunk = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(TAIL_CHUNK);
        chunk.resize(usize::try_from(end - start).unwrap_or(0), 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn record(m: Mark) -> [u8; INDEX_RECORD as usize] {
    let mut r = [0u8; INDEX_RECORD as usize];
    r[..8].copy_from_slice(&m.seq.to_le_bytes());
    r[8..16].copy_from_slice(&m.offset.to_le_bytes());
    r[16..].copy_from_slice(&m.text.to_le_bytes());
    r
}

fn split_record(r: &[u8; INDEX_RECORD as usize]) -> Mark {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&r[i * 8..i * 8 + 8]);
        u64::from_le_bytes(w)
    };
    Mark {
        seq: word(0),
        offset: word(1),
        text: word(2),
    }
}

/// Where a follower is.
struct Follower {
    inner: Arc<Inner>,
    id: ExecutionId,
    next: u64,
    buffer: VecDeque<LogLine>,
    notify: Arc<Notify>,
    done: bool,
}

impl Follower {
    async fn next_line(mut self) -> Option<(Result<LogLine, LogError>, Self)> {
        loop {
            if let Some(line) = self.buffer.pop_front() {
                return Some((Ok(line), self));
            }
            if self.done {
                return None;
            }
            // Register for a wake-up before looking, so an append in between is not missed.
            let notify = Arc::clone(&self.notify);
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (inner, id, from) = (Arc::clone(&self.inner), self.id, self.next);
            // The close record ends the lines it follows, so one read tells both. An earlier
            // version's marker is looked at before the lines: whatever was appended before
            // that close is then part of this read.
            let polled = blocking(move || {
                let marked = inner.has_close_marker(id);
                inner
                    .read_to_close(id, from, FOLLOW_BATCH)
                    .map(|(lines, closed)| (marked || closed, lines))
            })
            .await;
            match polled {
                Err(e) => {
                    self.done = true;
                    return Some((Err(e.into_log_error()), self));
                }
                Ok((closed, lines)) => {
                    if let Some(last) = lines.last() {
                        self.next = last.seq + 1;
                        self.buffer.extend(lines);
                        self.done = closed;
                        continue;
                    }
                    if closed {
                        return None;
                    }
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(self.inner.poll) => {}
            }
        }
    }
}

#[async_trait::async_trait]
impl LogStore for FsLogStore {
    async fn append(&self, id: ExecutionId, lines: &[LogLine]) -> Result<AppendOutcome, LogError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let inner = Arc::clone(&self.inner);
        let lines = lines.to_vec();
        let outcome = blocking(move || inner.append(id, &lines))
            .await
            .map_err(Error::into_log_error)?;
        if outcome.written > 0 || outcome.truncated {
            self.notifier(id).notify_waiters();
        }
        Ok(outcome)
    }

    async fn read(
        &self,
        id: ExecutionId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>, LogError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.read(id, from_seq, limit))
            .await
            .map_err(Error::into_log_error)
    }

    async fn follow(&self, id: ExecutionId, from_seq: u64) -> Result<LogFollow, LogError> {
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.check_not_deleted(id))
            .await
            .map_err(Error::into_log_error)?;
        let follower = Follower {
            inner: Arc::clone(&self.inner),
            id,
            next: from_seq,
            buffer: VecDeque::new(),
            notify: self.notifier(id),
            done: false,
        };
        Ok(Box::pin(futures_util::stream::unfold(
            follower,
            Follower::next_line,
        )))
    }

    async fn close(&self, id: ExecutionId) -> Result<(), LogError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.close(id))
            .await
            .map_err(Error::into_log_error)?;
        self.notifier(id).notify_waiters();
        Ok(())
    }

    async fn delete(&self, id: ExecutionId) -> Result<(), LogError> {
        let lock = self.lock_for(id);
        let _held = lock.lock().await;
        let inner = Arc::clone(&self.inner);
        blocking(move || inner.delete(id))
            .await
            .map_err(Error::into_log_error)?;
        self.notifier(id).notify_waiters();
        Ok(())
    }
}
