//! Step logs (TDD §6.2 `logs_ref`, §13): sequenced lines per execution, kept outside the
//! database and outside any pod.

use std::fmt;
use std::pin::Pin;

use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::domain::ExecutionId;
use crate::error::BoxError;
use crate::time::Timestamp;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The command's standard output.
    Stdout,
    /// The command's standard error.
    Stderr,
    /// Written by Shipinator itself (clone, upload, truncation notices).
    System,
}

/// One line of a step's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the execution's log, from 0, without gaps.
    pub seq: u64,
    /// When the line was read.
    pub at: Timestamp,
    /// Source stream.
    pub stream: LogStream,
    /// The text, without the trailing newline.
    pub text: String,
}

/// The `logs_ref` / `logs_uri` of an execution in a [`LogStore`].
pub fn logs_uri(execution: ExecutionId) -> String {
    format!("logs://{execution}")
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppendOutcome {
    /// Lines written by this call.
    pub written: u64,
    /// Lines ignored because their sequence number was already stored (a retried append).
    pub duplicates: u64,
    /// Whether the log has reached its size cap; further lines are dropped.
    pub truncated: bool,
    /// The next sequence number the log expects.
    pub next_seq: u64,
}

/// A stream of log lines that ends when the log is closed and fully read.
pub type LogFollow = Pin<Box<dyn Stream<Item = Result<LogLine, LogError>> + Send>>;

/// Errors of a [`LogStore`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// No log for this execution.
    #[error("no log for execution {id}")]
    NotFound {
        /// The execution.
        id: ExecutionId,
    },
    /// Lines out of order: a gap between the stored log and the appended lines.
    #[error("log of execution {id} expects line {expected}, got {got}")]
    OutOfOrder {
        /// The execution.
        id: ExecutionId,
        /// The next sequence number the log expects.
        expected: u64,
        /// The first sequence number given.
        got: u64,
    },
    /// The log was closed; nothing more can be appended.
    #[error("log of execution {id} is closed")]
    Closed {
        /// The execution.
        id: ExecutionId,
    },
    /// The backend cannot be reached now.
    #[error("log store is unavailable")]
    Unavailable {
        /// Cause.
        #[source]
        source: BoxError,
    },
    /// Any other backend failure.
    #[error("{backend} log store failed")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// Cause.
        #[source]
        source: BoxError,
    },
}

/// Keeps each execution's log lines.
///
/// # Contract
/// Checked by `conformance::logs`:
/// - Lines are stored in sequence order; `read` from any sequence number returns the lines from
///   there on, in order.
/// - An append whose lines were already stored (same sequence numbers) is ignored for those
///   lines; a gap is `OutOfOrder`.
/// - `follow` yields stored lines, then new lines as they are appended, and ends after `close`.
/// - When a log reaches the per-execution cap, one `System` line saying so is stored and later
///   lines are dropped (`truncated` is reported); the cap never loses earlier lines.
/// - `delete` removes the log; reading it afterwards is `NotFound`.
///
/// # Errors
/// See [`LogError`].
#[async_trait::async_trait]
pub trait LogStore: Send + Sync + fmt::Debug {
    /// Appends lines; the first line's `seq` must be at most the log's next sequence number.
    async fn append(&self, id: ExecutionId, lines: &[LogLine]) -> Result<AppendOutcome, LogError>;

    /// Up to `limit` lines from `from_seq` on. An execution that never logged reads as empty
    /// unless it was deleted.
    async fn read(
        &self,
        id: ExecutionId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>, LogError>;

    /// Lines from `from_seq` on, then new ones as they arrive, until the log is closed.
    async fn follow(&self, id: ExecutionId, from_seq: u64) -> Result<LogFollow, LogError>;

    /// Marks the log complete: followers end once they have read everything.
    async fn close(&self, id: ExecutionId) -> Result<(), LogError>;

    /// Removes the log.
    async fn delete(&self, id: ExecutionId) -> Result<(), LogError>;
}
