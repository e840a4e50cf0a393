//! The artifact and log stores of a worker that runs away from the server (a pod, a
//! container): both go over HTTP to the server's worker endpoints, with the execution's token.
//! Only what a worker does works (upload outputs, fetch inputs, append and close its log); the
//! rest is refused with [`Unsupported`], never a panic.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use shipinator_core::artifact::{
    ArtifactError, ArtifactMeta, ArtifactRead, ArtifactStore, ByteRange, ByteStream, GetOptions,
    StoredArtifact,
};
use shipinator_core::domain::{ArtifactId, ArtifactType, ExecutionId};
use shipinator_core::logs::{AppendOutcome, LogError, LogFollow, LogLine, LogStore};
use shipinator_core::time::Timestamp;

use crate::worker::client::{ClientError, ServerClient, error_of};

/// The backend name of artifacts whose bytes went to the server (which knows its own backend).
pub(crate) const REMOTE_BACKEND: &str = "remote";

/// Most bytes of log text sent in one request (the server limits request bodies).
const MAX_LOG_REQUEST_BYTES: usize = 512 * 1024;

/// How long an append keeps retrying before the log is given up.
const LOG_RETRY_DEADLINE: Duration = Duration::from_secs(60);

/// An operation a remote store does not offer: a worker never needs it.
#[derive(Debug, thiserror::Error)]
#[error("the worker's remote {store} store does not support {operation}: a worker only {offers}")]
pub(crate) struct Unsupported {
    store: &'static str,
    operation: &'static str,
    offers: &'static str,
}

fn artifact_unsupported(operation: &'static str) -> ArtifactError {
    ArtifactError::Backend {
        backend: REMOTE_BACKEND,
        source: Box::new(Unsupported {
            store: "artifact",
            operation,
            offers: "uploads its outputs and downloads its inputs",
        }),
    }
}

fn log_unsupported(operation: &'static str) -> LogError {
    LogError::Backend {
        backend: REMOTE_BACKEND,
        source: Box::new(Unsupported {
            store: "log",
            operation,
            offers: "appends to and closes its own log",
        }),
    }
}

fn artifact_error(id: ArtifactId, e: ClientError) -> ArtifactError {
    match e.status() {
        Some(reqwest::StatusCode::NOT_FOUND) => ArtifactError::NotFound { id },
        Some(reqwest::StatusCode::CONFLICT) => ArtifactError::AlreadyExists { id },
        Some(reqwest::StatusCode::RANGE_NOT_SATISFIABLE) => ArtifactError::InvalidRange {
            id,
            start: 0,
            end: None,
            size: 0,
        },
        Some(s) if s.is_server_error() => ArtifactError::Unavailable {
            source: Box::new(e),
        },
        Some(_) => ArtifactError::Backend {
            backend: REMOTE_BACKEND,
            source: Box::new(e),
        },
        None => match e {
            ClientError::Unreachable { .. } => ArtifactError::Unavailable {
                source: Box::new(e),
            },
            ClientError::Status { .. } | ClientError::Malformed { .. } => ArtifactError::Backend {
                backend: REMOTE_BACKEND,
                source: Box::new(e),
            },
        },
    }
}

/// What the server answers to an upload (and, with more fields, to a metadata request).
#[derive(Debug, Deserialize)]
struct ServerArtifact {
    size: u64,
    #[serde(default)]
    checksum: Option<String>,
    #[serde(default, alias = "backend")]
    storage_backend: Option<String>,
    #[serde(default)]
    storage_path: Option<String>,
    #[serde(default, alias = "type")]
    artifact_type: Option<ArtifactType>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default, alias = "extra")]
    metadata: BTreeMap<String, String>,
}

impl ServerArtifact {
    fn into_stored(self, id: ArtifactId, meta: Option<ArtifactMeta>) -> StoredArtifact {
        let meta = meta.unwrap_or_else(|| ArtifactMeta {
            artifact_type: self.artifact_type,
            content_type: self.content_type,
            extra: self.metadata,
            ..ArtifactMeta::default()
        });
        StoredArtifact {
            id,
            backend: self
                .storage_backend
                .unwrap_or_else(|| REMOTE_BACKEND.to_owned()),
            storage_path: self.storage_path.unwrap_or_else(|| id.to_string()),
            size: self.size,
            checksum: self.checksum.unwrap_or_default(),
            created_at: Timestamp::now(),
            meta,
        }
    }
}

/// Artifacts through the server: `put` streams an output to
/// `PUT /v1/executions/{execution}/artifacts/{id}`, `get` streams an input from
/// `GET /v1/artifacts/{id}/download`, `head` reads `GET /v1/artifacts/{id}/metadata`.
#[derive(Debug, Clone)]
pub(crate) struct RemoteArtifactStore {
    client: ServerClient,
}

impl RemoteArtifactStore {
    pub(crate) fn new(client: ServerClient) -> Self {
        Self { client }
    }

    async fn metadata(&self, id: ArtifactId) -> Result<ServerArtifact, ArtifactError> {
        let what = format!("reading the metadata of artifact {id}");
        let resp = self
            .client
            .request(reqwest::Method::GET, &format!("v1/artifacts/{id}/metadata"))
            .send()
            .await
            .map_err(|e| artifact_error(id, self.unreachable(&what, e)))?;
        if !resp.status().is_success() {
            return Err(artifact_error(id, error_of(resp, &what).await));
        }
        resp.json::<ServerArtifact>()
            .await
            .map_err(|e| artifact_error(id, ClientError::Malformed { what, source: e }))
    }

    fn unreachable(&self, what: &str, e: reqwest::Error) -> ClientError {
        ClientError::Unreachable {
            what: what.to_owned(),
            base: self.client.base().to_owned(),
            source: e,
        }
    }
}

/// What passed through an upload: counted and hashed on the way, to check the server's answer.
#[derive(Debug, Default)]
struct Tally {
    size: u64,
    hasher: Sha256,
}

#[async_trait::async_trait]
impl ArtifactStore for RemoteArtifactStore {
    fn backend(&self) -> &'static str {
        REMOTE_BACKEND
    }

    async fn put(
        &self,
        id: ArtifactId,
        meta: ArtifactMeta,
        body: ByteStream,
    ) -> Result<StoredArtifact, ArtifactError> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let counted = {
            let tally = Arc::clone(&tally);
            body.inspect_ok(move |chunk| {
                let mut t = tally
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                t.size += chunk.len() as u64;
                t.hasher.update(chunk);
            })
        };
        let what = format!("uploading artifact {id}");
        let mut req = self
            .client
            .request(
                reqwest::Method::PUT,
                &format!("v1/executions/{}/artifacts/{id}", self.client.execution()),
            )
            .body(reqwest::Body::wrap_stream(counted));
        if let Some(ct) = &meta.content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        let resp = req.send().await.map_err(|e| {
            // A failure of the body stream (reading the file) surfaces here too.
            artifact_error(id, self.unreachable(&what, e))
        })?;
        if !resp.status().is_success() {
            return Err(artifact_error(id, error_of(resp, &what).await));
        }
        let answer: ServerArtifact = resp.json().await.map_err(|e| {
            artifact_error(
                id,
                ClientError::Malformed {
                    what: what.clone(),
                    source: e,
                },
            )
        })?;
        let (size, checksum) = {
            let t = std::mem::take(
                &mut *tally
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
            (
                t.size,
                format!("sha256:{}", hex::encode(t.hasher.finalize())),
            )
        };
        let stored_checksum = answer.checksum.as_deref().unwrap_or("none");
        if answer.size != size || !stored_checksum.eq_ignore_ascii_case(&checksum) {
            return Err(ArtifactError::Corrupt {
                id,
                detail: format!(
                    "sent {size} bytes with {checksum}, the server stored {} bytes with {stored_checksum}",
                    answer.size
                ),
            });
        }
        Ok(answer.into_stored(id, Some(meta)))
    }

    async fn get(
        &self,
        id: ArtifactId,
        options: GetOptions,
    ) -> Result<ArtifactRead, ArtifactError> {
        // The metadata carries the file mode and the checksum; a server that does not let an
        // execution's token read it still serves the download, checked against the spec's
        // checksum by the caller.
        let stored = match self.metadata(id).await {
            Ok(m) => Some(m.into_stored(id, None)),
            Err(ArtifactError::NotFound { .. }) => return Err(ArtifactError::NotFound { id }),
            Err(e) => {
                tracing::debug!(artifact = %id, error = %e, "artifact metadata unavailable; downloading without it");
                None
            }
        };
        let what = format!("downloading artifact {id}");
        let mut req = self
            .client
            .request(reqwest::Method::GET, &format!("v1/artifacts/{id}/download"));
        if let Some(r) = options.range {
            let value = match r.end {
                Some(end) if end <= r.start => {
                    return Err(ArtifactError::InvalidRange {
                        id,
                        start: r.start,
                        end: r.end,
                        size: stored.as_ref().map_or(0, |s| s.size),
                    });
                }
                Some(end) => format!("bytes={}-{}", r.start, end - 1),
                None => format!("bytes={}-", r.start),
            };
            req = req.header(reqwest::header::RANGE, value);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| artifact_error(id, self.unreachable(&what, e)))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(artifact_error(id, error_of(resp, &what).await));
        }
        let length = resp.content_length();
        let stored = stored.unwrap_or_else(|| StoredArtifact {
            id,
            backend: REMOTE_BACKEND.to_owned(),
            storage_path: id.to_string(),
            size: length.unwrap_or(0),
            checksum: String::new(),
            created_at: Timestamp::now(),
            meta: ArtifactMeta::default(),
        });
        let range = match options.range {
            Some(r) if status == reqwest::StatusCode::PARTIAL_CONTENT => r,
            _ => ByteRange {
                start: 0,
                end: None,
            },
        };
        let body = resp.bytes_stream().map_err(std::io::Error::other);
        let body: ByteStream =
            if options.verify_checksum && options.range.is_none() && !stored.checksum.is_empty() {
                Box::pin(Verified {
                    inner: Box::pin(body),
                    hasher: Some(Sha256::new()),
                    size: 0,
                    expected: stored.checksum.clone(),
                    expected_size: stored.size,
                })
            } else {
                Box::pin(body)
            };
        Ok(ArtifactRead {
            stored,
            range,
            body,
        })
    }

    async fn head(&self, id: ArtifactId) -> Result<StoredArtifact, ArtifactError> {
        Ok(self.metadata(id).await?.into_stored(id, None))
    }

    async fn delete(&self, _id: ArtifactId) -> Result<(), ArtifactError> {
        Err(artifact_unsupported("delete"))
    }

    async fn list(&self) -> Result<Vec<ArtifactId>, ArtifactError> {
        Err(artifact_unsupported("list"))
    }
}

/// A download checked against its recorded size and sha256: a mismatch ends the stream with an
/// `InvalidData` error instead of its end.
struct Verified {
    inner: ByteStream,
    hasher: Option<Sha256>,
    size: u64,
    expected: String,
    expected_size: u64,
}

impl Stream for Verified {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(h) = this.hasher.as_mut() {
                    h.update(&chunk);
                }
                this.size += chunk.len() as u64;
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => {
                let Some(h) = this.hasher.take() else {
                    return Poll::Ready(None);
                };
                let actual = format!("sha256:{}", hex::encode(h.finalize()));
                if this.size != this.expected_size || !actual.eq_ignore_ascii_case(&this.expected) {
                    return Poll::Ready(Some(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "downloaded {} bytes with {actual}, expected {} bytes with {}",
                            this.size, this.expected_size, this.expected
                        ),
                    ))));
                }
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

/// The execution's log through the server: `append` posts lines to
/// `POST /v1/executions/{execution}/logs` in requests of bounded size, retrying connection
/// failures and 5xx answers with backoff (the server ignores lines whose `seq` it already has,
/// so a retry never duplicates). `close` sends nothing: the server closes the log when it
/// records the terminal status.
#[derive(Debug, Clone)]
pub(crate) struct RemoteLogStore {
    client: ServerClient,
    retry_deadline: Duration,
}

impl RemoteLogStore {
    pub(crate) fn new(client: ServerClient) -> Self {
        Self {
            client,
            retry_deadline: LOG_RETRY_DEADLINE,
        }
    }

    fn check(&self, id: ExecutionId) -> Result<(), LogError> {
        if id == self.client.execution() {
            Ok(())
        } else {
            Err(LogError::Backend {
                backend: REMOTE_BACKEND,
                source: format!(
                    "this worker reports for execution {}, not {id}",
                    self.client.execution()
                )
                .into(),
            })
        }
    }
}

/// The lines of `lines` split into requests of at most [`MAX_LOG_REQUEST_BYTES`] of text (a
/// longer single line goes alone).
fn chunks(lines: &[LogLine]) -> Vec<&[LogLine]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, line) in lines.iter().enumerate() {
        // Text plus the JSON around it.
        let cost = line.text.len() + 64;
        if i > start && bytes + cost > MAX_LOG_REQUEST_BYTES {
            out.push(&lines[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += cost;
    }
    if start < lines.len() {
        out.push(&lines[start..]);
    }
    out
}

#[derive(serde::Serialize)]
struct AppendBody<'a> {
    lines: &'a [LogLine],
}

#[async_trait::async_trait]
impl LogStore for RemoteLogStore {
    async fn append(&self, id: ExecutionId, lines: &[LogLine]) -> Result<AppendOutcome, LogError> {
        self.check(id)?;
        let path = format!("v1/executions/{id}/logs");
        let mut written = 0;
        for chunk in chunks(lines) {
            let what = format!(
                "appending log lines {}..={}",
                chunk.first().map_or(0, |l| l.seq),
                chunk.last().map_or(0, |l| l.seq)
            );
            match self
                .client
                .send_json_with_retry(
                    &path,
                    &AppendBody { lines: chunk },
                    &what,
                    self.retry_deadline,
                )
                .await
            {
                Ok(_) => written += chunk.len() as u64,
                Err(e) => {
                    return Err(match e.status() {
                        Some(reqwest::StatusCode::NOT_FOUND) => LogError::NotFound { id },
                        Some(reqwest::StatusCode::CONFLICT) => LogError::Closed { id },
                        Some(s) if !s.is_server_error() => LogError::Backend {
                            backend: REMOTE_BACKEND,
                            source: Box::new(e),
                        },
                        _ => LogError::Unavailable {
                            source: Box::new(e),
                        },
                    });
                }
            }
        }
        Ok(AppendOutcome {
            written,
            duplicates: 0,
            truncated: false,
            next_seq: lines.last().map_or(0, |l| l.seq + 1),
        })
    }

    async fn read(
        &self,
        _id: ExecutionId,
        _from_seq: u64,
        _limit: usize,
    ) -> Result<Vec<LogLine>, LogError> {
        Err(log_unsupported("read"))
    }

    async fn follow(&self, _id: ExecutionId, _from_seq: u64) -> Result<LogFollow, LogError> {
        Err(log_unsupported("follow"))
    }

    async fn close(&self, id: ExecutionId) -> Result<(), LogError> {
        self.check(id)
    }

    async fn delete(&self, _id: ExecutionId) -> Result<(), LogError> {
        Err(log_unsupported("delete"))
    }
}

#[cfg(test)]
mod tests {
    use futures_util::{StreamExt, stream};
    use shipinator_core::logs::LogStream;

    use super::*;

    fn line(seq: u64, len: usize) -> LogLine {
        LogLine {
            seq,
            at: Timestamp::EPOCH,
            stream: LogStream::Stdout,
            text: "x".repeat(len),
        }
    }

    #[test]
    fn log_requests_stay_under_the_size_bound_and_keep_every_line_in_order() {
        let lines: Vec<LogLine> = (0..40).map(|i| line(i, 64 * 1024 - 1)).collect();
        let parts = chunks(&lines);
        assert!(parts.len() > 1);
        let mut seq = 0;
        for p in &parts {
            let bytes: usize = p.iter().map(|l| l.text.len() + 64).sum();
            assert!(bytes <= MAX_LOG_REQUEST_BYTES, "{bytes}");
            for l in *p {
                assert_eq!(l.seq, seq);
                seq += 1;
            }
        }
        assert_eq!(seq, 40);
        // A line longer than the bound goes alone rather than being lost.
        let huge = [line(0, 10), line(1, MAX_LOG_REQUEST_BYTES * 2), line(2, 10)];
        assert_eq!(
            chunks(&huge).iter().map(|c| c.len()).collect::<Vec<_>>(),
            [1, 1, 1]
        );
        assert!(chunks(&[]).is_empty());
    }

    #[tokio::test]
    async fn a_verified_download_fails_on_a_wrong_checksum_and_passes_on_the_right_one() {
        let data = b"hello world".to_vec();
        let right = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
        let make = |expected: String, expected_size: u64| Verified {
            inner: Box::pin(stream::iter(vec![
                Ok(Bytes::from_static(b"hello ")),
                Ok(Bytes::from_static(b"world")),
            ])),
            hasher: Some(Sha256::new()),
            size: 0,
            expected,
            expected_size,
        };
        let ok: Vec<_> = make(right.clone(), 11).collect().await;
        assert!(ok.iter().all(Result::is_ok));
        assert_eq!(ok.len(), 2);
        let bad: Vec<_> = make(format!("sha256:{}", "0".repeat(64)), 11)
            .collect()
            .await;
        let err = bad.last().unwrap().as_ref().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let short: Vec<_> = make(right, 12).collect().await;
        assert!(short.last().unwrap().is_err());
    }

    #[tokio::test]
    async fn operations_a_worker_never_needs_are_refused_with_a_clear_error() {
        let id: ExecutionId = "00000000-0000-4000-8000-000000000001".parse().unwrap();
        let client = ServerClient::new("http://127.0.0.1:9/", "t".to_owned(), id).unwrap();
        let logs = RemoteLogStore::new(client.clone());
        let err = logs.read(id, 0, 10).await.unwrap_err();
        let msg = shipinator_local::error_chain(&err);
        assert!(msg.contains("does not support read"), "{msg}");
        let artifacts = RemoteArtifactStore::new(client);
        let err = artifacts.list().await.unwrap_err();
        let msg = shipinator_local::error_chain(&err);
        assert!(msg.contains("does not support list"), "{msg}");
        // Another execution's log is not this worker's to write.
        let other: ExecutionId = "00000000-0000-4000-8000-000000000002".parse().unwrap();
        let err = logs.append(other, &[line(0, 1)]).await.unwrap_err();
        assert!(shipinator_local::error_chain(&err).contains("not 00000000"));
    }
}
