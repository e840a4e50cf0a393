//! The client of the `/v1` API that the CLI uses with `--server`: bearer tokens, typed errors
//! that carry the server's error code and message, cursor paging, step logs followed over
//! Server-Sent Events (resuming with `Last-Event-ID` after a dropped connection), and
//! artifact downloads streamed to a file and checked against their sha256.
//!
//! The wire shapes are the server's own DTOs (`crate::server::dto`), so client and server
//! cannot drift apart within one build.

pub(crate) mod sse;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt as _;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use shipinator_core::domain::{ArtifactId, PipelineId, ProjectId, RepositoryId, RunId, StepId};
use tokio::io::AsyncWriteExt as _;

use crate::cli::{EXIT_FAILED, EXIT_USAGE};
use crate::server::dto::{
    ArtifactDto, JobDto, LogLineDto, LogPage, PageDto, PipelineDto, ProjectDto, RepositoryDto,
    RunDto, RunRequestBody, StepDto,
};

/// How long establishing a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a plain (non-streaming) request may take in total.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stream may stay silent; the server sends SSE keep-alives every 15 s.
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Consecutive failed reconnections after which following a log gives up.
const MAX_RECONNECTS: u32 = 30;
/// Most items a listing collects over all its pages.
const MAX_LISTED: usize = 100_000;

/// What can go wrong talking to the server. [`ClientError::exit_code`] maps it to the CLI's
/// exit codes: 2 for what the user must fix (server address, token, ids, arguments), 1 for
/// refusals of the operation itself (invalid pipeline configuration, conflicts, server errors,
/// a corrupt download).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// `--server` is not an http(s) URL.
    #[error("--server '{url}' is not an http:// or https:// URL (e.g. http://127.0.0.1:8080)")]
    BadServerUrl {
        /// What was given.
        url: String,
    },
    /// The connection could not be made or broke.
    #[error(
        "cannot reach the server at {url}: {reason} (is `shipinator serve` running there? \
         check --server or SHIPINATOR_SERVER)"
    )]
    Unreachable {
        /// The URL requested.
        url: String,
        /// The innermost cause (`Connection refused`, a DNS failure, ...).
        reason: String,
    },
    /// No response in time.
    #[error("{method} {url}: no response within {secs} s")]
    Timeout {
        /// The request method.
        method: Method,
        /// The URL requested.
        url: String,
        /// The bound.
        secs: u64,
    },
    /// The server answered with its error shape.
    #[error("{}", api_text(*.status, .code, .message, .field.as_deref(), .hint.as_deref()))]
    Api {
        /// HTTP status.
        status: StatusCode,
        /// The stable code (`forbidden`, `not_found`, `invalid_config`, ...).
        code: String,
        /// The server's message.
        message: String,
        /// The request field at fault.
        field: Option<String>,
        /// Located problems (`invalid_config`).
        details: Vec<serde_json::Value>,
        /// What to do about it, when the client knows better than the server.
        hint: Option<String>,
    },
    /// A response that is not what the API documents (a proxy's HTML page, a bad body).
    #[error("unexpected response from {url} (HTTP {status}): {detail}")]
    BadResponse {
        /// The URL requested.
        url: String,
        /// HTTP status.
        status: StatusCode,
        /// What was wrong.
        detail: String,
    },
    /// A log stream ended with an `error` event, or kept dropping.
    #[error("following the log of step {step}: {message}")]
    Stream {
        /// The step.
        step: StepId,
        /// What happened.
        message: String,
    },
    /// A downloaded payload does not match the recorded checksum or size.
    #[error(
        "artifact {id} arrived as {actual} ({actual_size} bytes) but the server recorded \
         {expected} ({expected_size} bytes); the download was discarded"
    )]
    Corrupt {
        /// The artifact.
        id: ArtifactId,
        /// `sha256:<hex>` the server recorded.
        expected: String,
        /// `sha256:<hex>` of what arrived.
        actual: String,
        /// Recorded size.
        expected_size: u64,
        /// Received size.
        actual_size: u64,
    },
    /// Writing a downloaded file.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A name that matches nothing, or more than one thing.
    #[error("{0}")]
    Lookup(String),
}

fn api_text(
    status: StatusCode,
    code: &str,
    message: &str,
    field: Option<&str>,
    hint: Option<&str>,
) -> String {
    let mut text = format!(
        "the server refused: {message} ({code}, HTTP {})",
        status.as_u16()
    );
    if let Some(field) = field {
        text.push_str(&format!("; field: {field}"));
    }
    if let Some(hint) = hint {
        text.push_str("; ");
        text.push_str(hint);
    }
    text
}

impl ClientError {
    /// The CLI exit code for this error.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            ClientError::BadServerUrl { .. }
            | ClientError::Unreachable { .. }
            | ClientError::Io { .. }
            | ClientError::Lookup(_) => EXIT_USAGE,
            ClientError::Api { status, code, .. } => {
                if code == "invalid_config"
                    || *status == StatusCode::CONFLICT
                    || status.is_server_error()
                {
                    EXIT_FAILED
                } else {
                    EXIT_USAGE
                }
            }
            ClientError::Timeout { .. }
            | ClientError::BadResponse { .. }
            | ClientError::Stream { .. }
            | ClientError::Corrupt { .. } => EXIT_FAILED,
        }
    }

    /// The HTTP status of an API error.
    pub(crate) fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The error body every API error has.
#[derive(Debug, Deserialize)]
struct WireError {
    error: WireErrorObject,
}

#[derive(Debug, Deserialize)]
struct WireErrorObject {
    code: String,
    message: String,
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    details: Vec<serde_json::Value>,
}

/// The innermost cause of a transport error, which is the one that says what happened.
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Run listing filters.
#[derive(Debug, Default, Clone)]
pub(crate) struct RunListFilter {
    /// Runs of this pipeline.
    pub(crate) pipeline: Option<PipelineId>,
    /// Runs with this status (`success`, ...).
    pub(crate) status: Option<String>,
    /// Runs of this branch or ref.
    pub(crate) branch: Option<String>,
}

/// A finished download.
#[derive(Debug)]
pub(crate) struct Downloaded {
    /// Where it was written.
    pub(crate) path: PathBuf,
    /// Bytes written.
    pub(crate) size: u64,
    /// `sha256:<hex>`, equal to the recorded checksum.
    pub(crate) checksum: String,
}

/// A connection to one server with one (optional) token.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    /// Streams: no total timeout, a read timeout instead.
    streaming: reqwest::Client,
    /// The server URL without a trailing slash (it may carry a path prefix).
    base: String,
    token: Option<String>,
}

impl Client {
    /// A client of `server` (`http://host:port`, optionally with a path prefix).
    pub(crate) fn new(server: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let bad = || ClientError::BadServerUrl {
            url: server.to_owned(),
        };
        let url = Url::parse(server.trim()).map_err(|_| bad())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(bad());
        }
        let base = url.as_str().trim_end_matches('/').to_owned();
        let build = |streaming: bool| {
            let b = reqwest::Client::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .user_agent(concat!("shipinator/", env!("CARGO_PKG_VERSION")));
            let b = if streaming {
                b.read_timeout(STREAM_READ_TIMEOUT)
            } else {
                b.timeout(REQUEST_TIMEOUT)
            };
            b.build().map_err(|e| ClientError::Unreachable {
                url: base.clone(),
                reason: format!("cannot set up the HTTP client: {}", root_cause(&e)),
            })
        };
        Ok(Self {
            http: build(false)?,
            streaming: build(true)?,
            base: base.clone(),
            token: token.map(str::to_owned).filter(|t| !t.trim().is_empty()),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn request(&self, http: &reqwest::Client, method: Method, path: &str) -> RequestBuilder {
        let req = http.request(method, self.url(path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends a request; a non-2xx answer becomes [`ClientError::Api`].
    async fn send(
        &self,
        req: RequestBuilder,
        method: &Method,
        path: &str,
    ) -> Result<Response, ClientError> {
        let url = self.url(path);
        let response = req
            .send()
            .await
            .map_err(|e| self.transport(e, method, &url))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(self.api_error(response, &url).await)
    }

    fn transport(&self, e: reqwest::Error, method: &Method, url: &str) -> ClientError {
        if e.is_timeout() {
            ClientError::Timeout {
                method: method.clone(),
                url: url.to_owned(),
                secs: REQUEST_TIMEOUT.as_secs(),
            }
        } else {
            ClientError::Unreachable {
                url: url.to_owned(),
                reason: root_cause(&e),
            }
        }
    }

    async fn api_error(&self, response: Response, url: &str) -> ClientError {
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return ClientError::BadResponse {
                    url: url.to_owned(),
                    status,
                    detail: format!("the error body broke off: {}", root_cause(&e)),
                };
            }
        };
        match serde_json::from_slice::<WireError>(&body) {
            Ok(WireError { error }) => {
                let hint = match status {
                    StatusCode::UNAUTHORIZED if self.token.is_none() => {
                        Some("pass a token with --token or SHIPINATOR_TOKEN".to_owned())
                    }
                    StatusCode::UNAUTHORIZED => {
                        Some("check the token given with --token or SHIPINATOR_TOKEN".to_owned())
                    }
                    _ => None,
                };
                ClientError::Api {
                    status,
                    code: error.code,
                    message: error.message,
                    field: error.field,
                    details: error.details,
                    hint,
                }
            }
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                let text: String = text.trim().chars().take(200).collect();
                ClientError::BadResponse {
                    url: url.to_owned(),
                    status,
                    detail: if text.is_empty() {
                        "no error body (is this a Shipinator server?)".to_owned()
                    } else {
                        format!("not the API's error shape: {text}")
                    },
                }
            }
        }
    }

    async fn decode<T: DeserializeOwned>(response: Response, url: &str) -> Result<T, ClientError> {
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| ClientError::BadResponse {
                url: url.to_owned(),
                status,
                detail: format!("the body broke off: {}", root_cause(&e)),
            })?;
        serde_json::from_slice(&body).map_err(|e| ClientError::BadResponse {
            url: url.to_owned(),
            status,
            detail: format!("the JSON body does not have the expected shape: {e}"),
        })
    }

    /// `GET path?query` as JSON.
    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let req = self.request(&self.http, Method::GET, path).query(query);
        let response = self.send(req, &Method::GET, path).await?;
        Self::decode(response, &self.url(path)).await
    }

    /// `POST path` with an optional JSON body and headers.
    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&serde_json::Value>,
        headers: HeaderMap,
    ) -> Result<T, ClientError> {
        let mut req = self
            .request(&self.http, Method::POST, path)
            .headers(headers);
        if let Some(body) = body {
            req = req.json(body);
        }
        let response = self.send(req, &Method::POST, path).await?;
        Self::decode(response, &self.url(path)).await
    }

    /// Every item of a paged listing, following `next_cursor`.
    async fn list_all<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        most: usize,
    ) -> Result<Vec<T>, ClientError> {
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut q = query.to_vec();
            let limit = most.saturating_sub(items.len()).clamp(1, 1000);
            q.push(("limit", limit.to_string()));
            if let Some(c) = cursor.take() {
                q.push(("cursor", c));
            }
            let page: PageDto<T> = self.get(path, &q).await?;
            items.extend(page.items);
            match page.next_cursor {
                Some(next) if items.len() < most => cursor = Some(next),
                _ => break,
            }
        }
        items.truncate(most);
        Ok(items)
    }

    // --- projects, repositories, pipelines ---

    /// `POST /v1/projects`.
    pub(crate) async fn create_project(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> Result<ProjectDto, ClientError> {
        let body = serde_json::json!({ "name": name, "description": description });
        self.post("/v1/projects", Some(&body), HeaderMap::new())
            .await
    }

    /// Every project the token sees.
    pub(crate) async fn list_projects(&self) -> Result<Vec<ProjectDto>, ClientError> {
        self.list_all("/v1/projects", &[], MAX_LISTED).await
    }

    /// A project by id, or by its (unique) name.
    pub(crate) async fn find_project(&self, id_or_name: &str) -> Result<ProjectDto, ClientError> {
        if let Ok(id) = id_or_name.parse::<ProjectId>() {
            return self.get(&format!("/v1/projects/{id}"), &[]).await;
        }
        let all = self.list_projects().await?;
        all.into_iter()
            .find(|p| p.name == id_or_name)
            .ok_or_else(|| {
                ClientError::Lookup(format!(
                    "no project named '{id_or_name}' on {} (list them with `shipinator projects list`)",
                    self.base
                ))
            })
    }

    /// `POST /v1/repositories`.
    pub(crate) async fn create_repository(
        &self,
        project: ProjectId,
        clone_url: &str,
        default_branch: Option<&str>,
        provider: Option<&str>,
    ) -> Result<RepositoryDto, ClientError> {
        let body = serde_json::json!({
            "project_id": project,
            "clone_url": clone_url,
            "default_branch": default_branch,
            "provider": provider,
        });
        self.post("/v1/repositories", Some(&body), HeaderMap::new())
            .await
    }

    /// Every repository the token sees, optionally of one project.
    pub(crate) async fn list_repositories(
        &self,
        project: Option<ProjectId>,
    ) -> Result<Vec<RepositoryDto>, ClientError> {
        let query: Vec<_> = project
            .map(|p| ("project", p.to_string()))
            .into_iter()
            .collect();
        self.list_all("/v1/repositories", &query, MAX_LISTED).await
    }

    /// `POST /v1/pipelines` from a configuration text or a ref of the repository.
    pub(crate) async fn create_pipeline(
        &self,
        repository: RepositoryId,
        name: &str,
        trigger_type: Option<&str>,
        config: Option<&str>,
        from_ref: Option<&str>,
    ) -> Result<PipelineDto, ClientError> {
        let body = serde_json::json!({
            "repository_id": repository,
            "name": name,
            "trigger_type": trigger_type,
            "config": config,
            "from_ref": from_ref,
        });
        self.post("/v1/pipelines", Some(&body), HeaderMap::new())
            .await
    }

    /// Every pipeline the token sees, optionally of one repository.
    pub(crate) async fn list_pipelines(
        &self,
        repository: Option<RepositoryId>,
    ) -> Result<Vec<PipelineDto>, ClientError> {
        let query: Vec<_> = repository
            .map(|r| ("repository", r.to_string()))
            .into_iter()
            .collect();
        self.list_all("/v1/pipelines", &query, MAX_LISTED).await
    }

    /// `GET /v1/repositories/{id}`.
    pub(crate) async fn get_repository(
        &self,
        id: RepositoryId,
    ) -> Result<RepositoryDto, ClientError> {
        self.get(&format!("/v1/repositories/{id}"), &[]).await
    }

    /// A pipeline by id, or by name when exactly one pipeline the token sees has it (the API
    /// has no lookup by name: names are unique per repository only).
    pub(crate) async fn find_pipeline(&self, id_or_name: &str) -> Result<PipelineDto, ClientError> {
        if let Ok(id) = id_or_name.parse::<PipelineId>() {
            return self.get(&format!("/v1/pipelines/{id}"), &[]).await;
        }
        let mut matching: Vec<_> = self
            .list_pipelines(None)
            .await?
            .into_iter()
            .filter(|p| p.name == id_or_name)
            .collect();
        match matching.len() {
            1 => Ok(matching.remove(0)),
            0 => Err(ClientError::Lookup(format!(
                "no pipeline named '{id_or_name}' on {} (list them with `shipinator pipelines list`)",
                self.base
            ))),
            n => {
                let ids: Vec<String> = matching
                    .iter()
                    .map(|p| format!("{} (repository {})", p.id, p.repository_id))
                    .collect();
                Err(ClientError::Lookup(format!(
                    "{n} pipelines are named '{id_or_name}'; name one by id: {}",
                    ids.join(", ")
                )))
            }
        }
    }

    // --- runs ---

    /// `POST /v1/pipelines/{id}/runs`, with an optional `Idempotency-Key`.
    pub(crate) async fn trigger(
        &self,
        pipeline: PipelineId,
        request: &RunRequestBody,
        idempotency_key: Option<&str>,
    ) -> Result<RunDto, ClientError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = idempotency_key {
            let value = HeaderValue::from_str(key).map_err(|_| {
                ClientError::Lookup(format!(
                    "--idempotency-key '{key}' must be visible ASCII characters"
                ))
            })?;
            headers.insert("idempotency-key", value);
        }
        let body = serde_json::to_value(request).map_err(|e| ClientError::Lookup(e.to_string()))?;
        self.post(
            &format!("/v1/pipelines/{pipeline}/runs"),
            Some(&body),
            headers,
        )
        .await
    }

    /// Runs, newest first, at most `limit`.
    pub(crate) async fn list_runs(
        &self,
        filter: &RunListFilter,
        limit: usize,
    ) -> Result<Vec<RunDto>, ClientError> {
        let mut query = Vec::new();
        if let Some(p) = filter.pipeline {
            query.push(("pipeline", p.to_string()));
        }
        if let Some(s) = &filter.status {
            query.push(("status", s.clone()));
        }
        if let Some(b) = &filter.branch {
            query.push(("branch", b.clone()));
        }
        self.list_all("/v1/pipeline-runs", &query, limit).await
    }

    /// `GET /v1/pipeline-runs/{id}`.
    pub(crate) async fn get_run(&self, id: RunId) -> Result<RunDto, ClientError> {
        self.get(&format!("/v1/pipeline-runs/{id}"), &[]).await
    }

    /// A run's jobs in stage order.
    pub(crate) async fn run_jobs(&self, id: RunId) -> Result<Vec<JobDto>, ClientError> {
        self.get(&format!("/v1/pipeline-runs/{id}/jobs"), &[]).await
    }

    /// A run's steps with their executions.
    pub(crate) async fn run_steps(&self, id: RunId) -> Result<Vec<StepDto>, ClientError> {
        self.get(&format!("/v1/pipeline-runs/{id}/steps"), &[])
            .await
    }

    /// A run's artifacts.
    pub(crate) async fn run_artifacts(&self, id: RunId) -> Result<Vec<ArtifactDto>, ClientError> {
        self.get(&format!("/v1/pipeline-runs/{id}/artifacts"), &[])
            .await
    }

    /// `POST /v1/pipeline-runs/{id}/cancel`.
    pub(crate) async fn cancel_run(&self, id: RunId) -> Result<RunDto, ClientError> {
        self.post(
            &format!("/v1/pipeline-runs/{id}/cancel"),
            None,
            HeaderMap::new(),
        )
        .await
    }

    /// `POST /v1/pipeline-runs/{id}/retry`: the new run.
    pub(crate) async fn retry_run(&self, id: RunId) -> Result<RunDto, ClientError> {
        self.post(
            &format!("/v1/pipeline-runs/{id}/retry"),
            None,
            HeaderMap::new(),
        )
        .await
    }

    // --- logs ---

    /// A page of a step's current attempt's log (404 when the step has not started).
    pub(crate) async fn step_log_page(
        &self,
        run: RunId,
        step: StepId,
        from_seq: u64,
    ) -> Result<LogPage, ClientError> {
        let path = format!("/v1/pipeline-runs/{run}/steps/{step}/logs");
        self.get(
            &path,
            &[
                ("from_seq", from_seq.to_string()),
                ("limit", "10000".to_owned()),
            ],
        )
        .await
    }

    /// Follows the log of one attempt of a step (`None`: whichever is current when the server
    /// looks) until it ends, calling `on_line` once per line in order. A dropped connection is
    /// resumed with `Last-Event-ID` (the last line's sequence number), so no line is lost or
    /// repeated; it gives up after [`MAX_RECONNECTS`] failed reconnections in a row.
    pub(crate) async fn follow_step_log(
        &self,
        run: RunId,
        step: StepId,
        attempt: Option<u32>,
        mut on_line: impl FnMut(LogLineDto),
    ) -> Result<(), ClientError> {
        let mut query = vec![("follow", "true".to_owned())];
        if let Some(a) = attempt {
            query.push(("attempt", a.to_string()));
        }
        let path = format!("/v1/pipeline-runs/{run}/steps/{step}/logs");
        let mut last_seq: Option<u64> = None;
        let mut failures = 0u32;
        let mut connected_once = false;
        loop {
            let mut req = self
                .request(&self.streaming, Method::GET, &path)
                .query(&query)
                .header(reqwest::header::ACCEPT, "text/event-stream");
            if let Some(seq) = last_seq {
                req = req.header("last-event-id", seq.to_string());
            }
            let why = match self.send(req, &Method::GET, &path).await {
                Ok(response) => {
                    connected_once = true;
                    let before = last_seq;
                    let stopped =
                        Self::read_events(response, step, &mut last_seq, &mut on_line).await;
                    if last_seq != before {
                        failures = 0;
                    }
                    match stopped {
                        Ok(true) => return Ok(()),
                        Ok(false) => "the server closed the stream before the log ended".to_owned(),
                        Err(StreamStop::Fatal(e)) => return Err(e),
                        Err(StreamStop::Broken(why)) => why,
                    }
                }
                // Before the first connection, an error is the answer; later (a server
                // restarting, a proxy hiccup) it is worth another try.
                Err(e @ (ClientError::Unreachable { .. } | ClientError::Timeout { .. }))
                    if connected_once =>
                {
                    e.to_string()
                }
                Err(e) if connected_once && e.status().is_some_and(|s| s.is_server_error()) => {
                    e.to_string()
                }
                Err(e) => return Err(e),
            };
            failures += 1;
            if failures > MAX_RECONNECTS {
                return Err(ClientError::Stream {
                    step,
                    message: format!("gave up after {MAX_RECONNECTS} reconnections: {why}"),
                });
            }
            tracing::debug!(%step, failures, reason = %why, "log stream dropped; resuming");
            let backoff = Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)));
            tokio::time::sleep(backoff.min(Duration::from_secs(5))).await;
        }
    }

    /// Reads one connection's events. `Ok(true)`: the log ended; `Ok(false)`: the stream ended
    /// without saying so.
    async fn read_events(
        response: Response,
        step: StepId,
        last_seq: &mut Option<u64>,
        on_line: &mut impl FnMut(LogLineDto),
    ) -> Result<bool, StreamStop> {
        let mut parser = sse::Parser::default();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StreamStop::Broken(root_cause(&e)))?;
            let events = parser.feed(&chunk).map_err(|e| {
                StreamStop::Fatal(ClientError::Stream {
                    step,
                    message: e.to_string(),
                })
            })?;
            for event in events {
                match event.event.as_str() {
                    "line" => {
                        let line: LogLineDto = serde_json::from_str(&event.data).map_err(|e| {
                            StreamStop::Fatal(ClientError::Stream {
                                step,
                                message: format!("a line event is not a log line: {e}"),
                            })
                        })?;
                        if last_seq.is_some_and(|last| line.seq <= last) {
                            continue;
                        }
                        *last_seq = Some(line.seq);
                        on_line(line);
                    }
                    "end" => return Ok(true),
                    "error" => {
                        return Err(StreamStop::Fatal(ClientError::Stream {
                            step,
                            message: format!("the server reported: {}", event.data),
                        }));
                    }
                    _ => {}
                }
            }
        }
        Ok(false)
    }

    // --- artifacts ---

    /// `GET /v1/artifacts/{id}/metadata`.
    pub(crate) async fn artifact_metadata(
        &self,
        id: ArtifactId,
    ) -> Result<ArtifactDto, ClientError> {
        self.get(&format!("/v1/artifacts/{id}/metadata"), &[]).await
    }

    /// Streams an artifact into `target` (through `target.partial`, renamed when complete),
    /// computing its sha256 on the way; a payload that does not match the recorded checksum
    /// and size is deleted and reported.
    pub(crate) async fn download_artifact(
        &self,
        meta: &ArtifactDto,
        target: &Path,
    ) -> Result<Downloaded, ClientError> {
        let path = format!("/v1/artifacts/{}/download", meta.id);
        let req = self.request(&self.streaming, Method::GET, &path);
        let response = self.send(req, &Method::GET, &path).await?;
        let mut partial_name = target
            .file_name()
            .map(std::ffi::OsStr::to_os_string)
            .unwrap_or_default();
        partial_name.push(".partial");
        let partial = target.with_file_name(partial_name);
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ClientError::Io {
                action,
                path,
                source,
            }
        };
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(io("creating", &partial))?;
        let result = async {
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ClientError::Unreachable {
                    url: self.url(&path),
                    reason: format!("the download broke off: {}", root_cause(&e)),
                })?;
                hasher.update(&chunk);
                size += chunk.len() as u64;
                file.write_all(&chunk)
                    .await
                    .map_err(io("writing", &partial))?;
            }
            file.sync_all().await.map_err(io("writing", &partial))?;
            let checksum = format!("sha256:{}", hex::encode(hasher.finalize()));
            let expected = meta.checksum.clone().unwrap_or_else(|| checksum.clone());
            if checksum != expected || size != meta.size {
                return Err(ClientError::Corrupt {
                    id: meta.id,
                    expected,
                    actual: checksum,
                    expected_size: meta.size,
                    actual_size: size,
                });
            }
            Ok((size, checksum))
        }
        .await;
        match result {
            Ok((size, checksum)) => {
                tokio::fs::rename(&partial, target)
                    .await
                    .map_err(io("renaming the download to", target))?;
                Ok(Downloaded {
                    path: target.to_path_buf(),
                    size,
                    checksum,
                })
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(e)
            }
        }
    }
}

/// Why reading a stream stopped early.
enum StreamStop {
    /// Try again from the last line.
    Broken(String),
    /// Give up.
    Fatal(ClientError),
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::body::Body;
    use axum::http::{HeaderMap, StatusCode as AxumStatus, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;

    use super::*;

    fn line_event(seq: u64) -> String {
        format!(
            "id: {seq}\nevent: line\ndata: {{\"seq\":{seq},\"at\":\"2026-01-01T00:00:00Z\",\
             \"stream\":\"stdout\",\"text\":\"line {seq}\"}}\n\n"
        )
    }

    fn event_stream(chunks: Vec<Result<String, std::io::Error>>) -> Response {
        (
            [(header::CONTENT_TYPE, "text/event-stream")],
            // Paced, so what precedes an error reaches the client before the connection breaks.
            Body::from_stream(futures_util::stream::iter(chunks).then(|c| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                c
            })),
        )
            .into_response()
    }

    /// A log stream that breaks off mid-way, then meets a server error on the first
    /// reconnection, resumes after the last line it delivered: every line once, in order.
    /// (The real server cannot be made to drop a connection at a chosen line; this one speaks
    /// the same protocol over real HTTP.)
    #[tokio::test]
    async fn a_dropped_log_stream_resumes_after_the_last_line() {
        let resumed_from: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let seen = Arc::clone(&resumed_from);
        let app = Router::new().route(
            "/v1/pipeline-runs/{run}/steps/{step}/logs",
            get(move |headers: HeaderMap| {
                let seen = Arc::clone(&seen);
                async move {
                    let last = headers
                        .get("last-event-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let attempt = {
                        let mut seen = seen.lock().unwrap();
                        seen.push(last);
                        seen.len()
                    };
                    match attempt {
                        1 => event_stream(vec![
                            Ok(line_event(0)),
                            Ok(line_event(1) + &line_event(2)),
                            Err(std::io::Error::other("connection reset")),
                        ]),
                        2 => (
                            AxumStatus::SERVICE_UNAVAILABLE,
                            [(header::CONTENT_TYPE, "application/json")],
                            r#"{"error":{"code":"unavailable","message":"restarting"}}"#,
                        )
                            .into_response(),
                        _ => event_stream(vec![
                            // A server may repeat the last line; the client skips it.
                            Ok(line_event(2)),
                            Ok(line_event(3)),
                            Ok(line_event(4) + "event: end\ndata: {}\n\n"),
                        ]),
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let client = Client::new(&format!("http://{addr}"), Some("shp_test")).unwrap();
        let mut lines = Vec::new();
        client
            .follow_step_log(RunId::new_v7(), StepId::new_v7(), Some(1), |l| {
                lines.push(l.text);
            })
            .await
            .unwrap();
        server.abort();
        assert_eq!(lines, ["line 0", "line 1", "line 2", "line 3", "line 4"]);
        assert_eq!(
            *resumed_from.lock().unwrap(),
            [None, Some("2".to_owned()), Some("2".to_owned())]
        );
    }

    #[tokio::test]
    async fn an_error_body_becomes_a_typed_error_with_the_servers_code() {
        let app = Router::new().route(
            "/v1/pipeline-runs/{id}",
            get(|| async {
                (
                    AxumStatus::FORBIDDEN,
                    [(header::CONTENT_TYPE, "application/json")],
                    r#"{"error":{"code":"forbidden","message":"token 'v' has role viewer; this needs developer"}}"#,
                )
            }),
        )
        .route("/v1/pipeline-runs/{id}/jobs", get(|| async { "<html>proxy</html>" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = Client::new(&format!("http://{addr}/"), None).unwrap();
        let e = client.get_run(RunId::new_v7()).await.unwrap_err();
        assert_eq!(e.exit_code(), EXIT_USAGE);
        assert_eq!(
            e.to_string(),
            "the server refused: token 'v' has role viewer; this needs developer (forbidden, HTTP 403)"
        );
        let e = client.run_jobs(RunId::new_v7()).await.unwrap_err();
        assert!(
            matches!(&e, ClientError::BadResponse { detail, .. } if detail.contains("expected shape")),
            "{e}"
        );
        server.abort();
        assert!(matches!(
            Client::new("127.0.0.1:8080", None),
            Err(ClientError::BadServerUrl { .. })
        ));
    }

    /// A payload that does not match its recorded checksum is discarded, never left where the
    /// caller asked for it.
    #[tokio::test]
    async fn a_download_that_does_not_match_its_checksum_is_discarded() {
        let app = Router::new().route(
            "/v1/artifacts/{id}/download",
            get(|| async { "payload with a flipped bit" }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = Client::new(&format!("http://{addr}"), Some("shp_test")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.bin");
        let body = b"payload with a flipped bit";
        let good = format!("sha256:{}", hex::encode(Sha256::digest(body)));
        let meta = |checksum: &str| ArtifactDto {
            id: ArtifactId::new_v7(),
            run_id: RunId::new_v7(),
            job_id: shipinator_core::domain::JobId::new_v7(),
            step_id: None,
            artifact_type: shipinator_core::domain::ArtifactType::Binary,
            name: None,
            path: Some("out/app.bin".to_owned()),
            storage_backend: "nfs".to_owned(),
            storage_path: String::new(),
            checksum: Some(checksum.to_owned()),
            size: body.len() as u64,
            metadata: Default::default(),
            created_at: "2026-01-01T00:00:00Z".to_owned(),
        };
        let bad = meta(&format!("sha256:{}", "0".repeat(64)));
        let e = client.download_artifact(&bad, &target).await.unwrap_err();
        assert!(matches!(e, ClientError::Corrupt { .. }), "{e}");
        assert_eq!(e.exit_code(), EXIT_FAILED);
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "no partial file left"
        );
        let done = client
            .download_artifact(&meta(&good), &target)
            .await
            .unwrap();
        assert_eq!(done.checksum, good);
        assert_eq!(std::fs::read(&target).unwrap(), body);
        server.abort();
    }
}
