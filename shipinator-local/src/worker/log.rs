//! Sequenced, batched writing of one execution's log lines into a [`LogStore`].

use std::sync::Arc;

use shipinator_core::domain::ExecutionId;
use shipinator_core::logs::{LogLine, LogStore, LogStream};
use shipinator_core::time::Timestamp;
use tokio::sync::mpsc;

use crate::error::Error;

/// Most lines written in one append.
const BATCH: usize = 256;

/// Numbers one execution's lines from 0 and appends them to the log store in batches.
#[derive(Debug)]
pub struct LogSink {
    store: Arc<dyn LogStore>,
    execution: ExecutionId,
    next_seq: u64,
    failed: Option<Error>,
}

impl LogSink {
    /// A sink for `execution`, starting at sequence number `next_seq`.
    pub fn new(store: Arc<dyn LogStore>, execution: ExecutionId, next_seq: u64) -> Self {
        Self {
            store,
            execution,
            next_seq,
            failed: None,
        }
    }

    /// The sequence number the next line gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Writes one `System` line now.
    pub async fn system(&mut self, text: impl Into<String>) {
        let line = (LogStream::System, text.into());
        self.write(vec![line]).await;
    }

    /// Numbers and appends `lines`; a log store failure is remembered (see
    /// [`finish`](Self::finish)) and later lines are dropped, so the step itself is never
    /// blocked by its log.
    pub async fn write(&mut self, lines: Vec<(LogStream, String)>) {
        if lines.is_empty() || self.failed.is_some() {
            return;
        }
        let at = Timestamp::now();
        let mut batch = Vec::with_capacity(lines.len());
        for (stream, text) in lines {
            batch.push(LogLine {
                seq: self.next_seq,
                at,
                stream,
                text,
            });
            self.next_seq += 1;
        }
        if let Err(e) = self.store.append(self.execution, &batch).await {
            tracing::warn!(execution = %self.execution, error = %e, "appending log lines failed");
            self.failed = Some(e.into());
        }
    }

    /// Drains a channel of lines until every sender is gone, appending in batches of what is
    /// already waiting (no timer: a lone line is written at once).
    pub async fn pump(&mut self, mut rx: mpsc::Receiver<(LogStream, String)>) {
        while let Some(first) = rx.recv().await {
            let mut lines = Vec::with_capacity(16);
            lines.push(first);
            while lines.len() < BATCH {
                match rx.try_recv() {
                    Ok(line) => lines.push(line),
                    Err(_) => break,
                }
            }
            self.write(lines).await;
        }
    }

    /// Closes the log; returns the first append failure, if any.
    ///
    /// # Errors
    /// An append or the close failed.
    pub async fn finish(mut self) -> Result<u64, Error> {
        if let Some(e) = self.failed.take() {
            let _ = self.store.close(self.execution).await;
            return Err(e);
        }
        self.store.close(self.execution).await?;
        Ok(self.next_seq)
    }
}
