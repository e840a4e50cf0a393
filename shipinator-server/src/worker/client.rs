//! The worker's side of the server's worker endpoints: one client per execution, every request
//! with the execution's bearer token, retries with backoff where a request is safe to repeat.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shipinator_core::domain::ExecutionId;
use shipinator_core::executor::{ExecutionResult, ProducedArtifact};
use shipinator_local::worker::WorkerOutcome;

/// How long one JSON request (status, logs, metadata) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a streaming transfer may stall without a byte moving.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// First pause between retries; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The `status` of a [`StatusReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ReportStatus {
    /// The command started.
    Running,
    /// Exit code 0 and every output collected.
    Success,
    /// The command failed, timed out, or an output could not be collected.
    Failed,
    /// The worker was stopped before the step ended (SIGTERM): an infrastructure failure.
    Lost,
}

/// The body of `POST /v1/executions/{id}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StatusReport {
    /// What happened.
    pub(crate) status: ReportStatus,
    /// The command's exit code, when it ended by itself (`-1`: it never ran).
    pub(crate) exit_code: Option<i32>,
    /// Where the logs are.
    pub(crate) logs_uri: Option<String>,
    /// Outputs already uploaded.
    pub(crate) artifacts: Vec<ProducedArtifact>,
    /// Why it failed beyond the exit code.
    pub(crate) failure: Option<String>,
}

impl StatusReport {
    /// The report sent when the command starts.
    pub(crate) fn running() -> Self {
        Self {
            status: ReportStatus::Running,
            exit_code: None,
            logs_uri: None,
            artifacts: Vec::new(),
            failure: None,
        }
    }

    /// A failure before anything ran (the spec could not be read, the workspace is wrong).
    pub(crate) fn not_run(id: ExecutionId, failure: String) -> Self {
        Self::from_result(&ExecutionResult {
            exit_code: shipinator_local::worker::EXIT_NOT_RUN,
            logs_uri: Some(shipinator_core::logs::logs_uri(id)),
            artifacts: Vec::new(),
            failure: Some(failure),
        })
    }

    /// The terminal report of a finished execution.
    pub(crate) fn from_result(r: &ExecutionResult) -> Self {
        let ok = r.exit_code == 0 && r.failure.is_none();
        Self {
            status: if ok {
                ReportStatus::Success
            } else {
                ReportStatus::Failed
            },
            exit_code: Some(r.exit_code),
            logs_uri: r.logs_uri.clone(),
            artifacts: r.artifacts.clone(),
            failure: r.failure.clone(),
        }
    }

    /// The terminal report of what the worker runtime returned; `why` says what stopped a
    /// cancelled execution.
    pub(crate) fn from_outcome(id: ExecutionId, outcome: &WorkerOutcome, why: &str) -> Self {
        match outcome {
            WorkerOutcome::Finished(r) => Self::from_result(r),
            WorkerOutcome::Canceled => Self {
                status: ReportStatus::Lost,
                exit_code: None,
                logs_uri: Some(shipinator_core::logs::logs_uri(id)),
                artifacts: Vec::new(),
                failure: Some(why.to_owned()),
            },
        }
    }
}

/// A request to the server failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// No answer (connection refused or reset, timeout), even after retrying.
    #[error("{what}: the server at {base} did not answer")]
    Unreachable {
        /// The request.
        what: String,
        /// The server's base URL.
        base: String,
        /// The last cause.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{what}: the server answered {status}{}", body_suffix(.body))]
    Status {
        /// The request.
        what: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
        /// The start of the response body (the server's error message).
        body: String,
    },
    /// The server's answer could not be understood.
    #[error("{what}: the server's answer is malformed")]
    Malformed {
        /// The request.
        what: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

fn body_suffix(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": {body}")
    }
}

impl ClientError {
    /// The HTTP status, when the server answered.
    pub(crate) fn status(&self) -> Option<reqwest::StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            ClientError::Unreachable { .. } | ClientError::Malformed { .. } => None,
        }
    }
}

/// The server and the execution a worker reports for.
#[derive(Clone)]
pub(crate) struct ServerClient {
    http: reqwest::Client,
    base: reqwest::Url,
    token: String,
    execution: ExecutionId,
}

impl fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerClient")
            .field("base", &self.base.as_str())
            .field("execution", &self.execution)
            .finish_non_exhaustive()
    }
}

impl ServerClient {
    /// A client for `execution` on the server at `base` (`http://host:port`, optionally with
    /// a path prefix).
    ///
    /// # Errors
    /// `base` is not an http(s) URL, or the HTTP client cannot be built.
    pub(crate) fn new(base: &str, token: String, execution: ExecutionId) -> anyhow::Result<Self> {
        let mut url = reqwest::Url::parse(base)
            .map_err(|e| anyhow::anyhow!("SHIPINATOR_SERVER '{base}' is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
            anyhow::bail!("SHIPINATOR_SERVER '{base}' must be an http:// or https:// URL");
        }
        if !url.path().ends_with('/') {
            let path = format!("{}/", url.path());
            url.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("shipinator-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base: url,
            token,
            execution,
        })
    }

    /// The execution this client reports for.
    pub(crate) fn execution(&self) -> ExecutionId {
        self.execution
    }

    /// The server's base URL.
    pub(crate) fn base(&self) -> &str {
        self.base.as_str()
    }

    /// `base` + `path` (`path` without a leading slash).
    pub(crate) fn url(&self, path: &str) -> reqwest::Url {
        // Joining a relative path onto a base ending in '/' cannot fail.
        self.base.join(path).unwrap_or_else(|_| self.base.clone())
    }

    /// A request with the bearer token.
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Posts a status report, retrying connection failures and 5xx answers until `deadline`
    /// has passed.
    ///
    /// # Errors
    /// The server refused the report, or could not be reached in time.
    pub(crate) async fn post_status(
        &self,
        report: &StatusReport,
        deadline: Duration,
    ) -> Result<(), ClientError> {
        let path = format!("v1/executions/{}/status", self.execution);
        let what = format!("reporting status '{}'", status_text(report.status));
        self.send_json_with_retry(&path, report, &what, deadline)
            .await
            .map(drop)
    }

    /// Posts `body` as JSON to `path`, retrying connection failures and 5xx answers with
    /// backoff until `deadline` has passed. Only for requests the server treats idempotently.
    ///
    /// # Errors
    /// A 4xx answer at once; the last failure once the deadline has passed.
    pub(crate) async fn send_json_with_retry<T: Serialize + Sync + ?Sized>(
        &self,
        path: &str,
        body: &T,
        what: &str,
        deadline: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let started = tokio::time::Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let sent = self
                .request(reqwest::Method::POST, path)
                .timeout(REQUEST_TIMEOUT)
                .json(body)
                .send()
                .await;
            let failure = match sent {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) if resp.status().is_server_error() => error_of(resp, what).await,
                Ok(resp) => return Err(error_of(resp, what).await),
                Err(e) => ClientError::Unreachable {
                    what: what.to_owned(),
                    base: self.base.to_string(),
                    source: e,
                },
            };
            if started.elapsed() + backoff > deadline {
                return Err(failure);
            }
            tracing::debug!(error = %failure, retry_in = ?backoff, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn status_text(s: ReportStatus) -> &'static str {
    match s {
        ReportStatus::Running => "running",
        ReportStatus::Success => "success",
        ReportStatus::Failed => "failed",
        ReportStatus::Lost => "lost",
    }
}

/// The error of a non-success answer, with the start of its body.
pub(crate) async fn error_of(resp: reqwest::Response, what: &str) -> ClientError {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let mut body = body.trim().to_owned();
    if body.len() > 500 {
        let mut end = 500;
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        body.truncate(end);
        body.push('…');
    }
    ClientError::Status {
        what: what.to_owned(),
        status,
        body,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;
    use shipinator_core::domain::{ArtifactId, ArtifactType};

    use super::*;

    fn id() -> ExecutionId {
        "00000000-0000-4000-8000-000000000007".parse().unwrap()
    }

    #[test]
    fn a_finished_step_maps_to_success_or_failed_with_its_exit_code() {
        let ok = ExecutionResult {
            exit_code: 0,
            logs_uri: Some("logs://x".to_owned()),
            artifacts: vec![ProducedArtifact {
                id: "00000000-0000-4000-8000-000000000009"
                    .parse::<ArtifactId>()
                    .unwrap(),
                artifact_type: ArtifactType::Binary,
                name: Some("app".to_owned()),
                path: Some("out/app".to_owned()),
                storage_backend: "nfs".to_owned(),
                storage_path: "p".to_owned(),
                checksum: Some("sha256:00".to_owned()),
                size: 3,
                metadata: BTreeMap::from([("file_mode".to_owned(), "755".to_owned())]),
            }],
            failure: None,
        };
        let json = serde_json::to_value(StatusReport::from_outcome(
            id(),
            &WorkerOutcome::Finished(ok.clone()),
            "unused",
        ))
        .unwrap();
        assert_eq!(json["status"], "success");
        assert_eq!(json["exit_code"], 0);
        assert_eq!(json["logs_uri"], "logs://x");
        assert_eq!(json["failure"], serde_json::Value::Null);
        // Each artifact is the core type's own serde shape.
        assert_eq!(
            json["artifacts"][0],
            serde_json::to_value(&ok.artifacts[0]).unwrap()
        );

        let exit3 = ExecutionResult {
            exit_code: 3,
            artifacts: Vec::new(),
            ..ok.clone()
        };
        let r = StatusReport::from_result(&exit3);
        assert_eq!((r.status, r.exit_code), (ReportStatus::Failed, Some(3)));

        // Exit 0 but an output missing is a failure too.
        let missing = ExecutionResult {
            failure: Some("declared output 'x' was not produced".to_owned()),
            ..ok
        };
        let r = StatusReport::from_result(&missing);
        assert_eq!(r.status, ReportStatus::Failed);
        assert_eq!(r.failure.as_deref(), missing.failure.as_deref());
    }

    #[test]
    fn running_lost_and_not_run_have_the_contract_shape() {
        assert_eq!(
            serde_json::to_value(StatusReport::running()).unwrap(),
            json!({"status": "running", "exit_code": null, "logs_uri": null, "artifacts": [], "failure": null})
        );
        let lost = StatusReport::from_outcome(id(), &WorkerOutcome::Canceled, "stopped by SIGTERM");
        assert_eq!(
            serde_json::to_value(&lost).unwrap(),
            json!({"status": "lost", "exit_code": null, "logs_uri": format!("logs://{}", id()),
                   "artifacts": [], "failure": "stopped by SIGTERM"})
        );
        let not_run = StatusReport::not_run(id(), "no spec".to_owned());
        assert_eq!(not_run.status, ReportStatus::Failed);
        assert_eq!(
            not_run.exit_code,
            Some(shipinator_local::worker::EXIT_NOT_RUN)
        );
    }

    #[test]
    fn the_base_url_must_be_http_and_keeps_its_path_prefix() {
        let c = ServerClient::new("http://127.0.0.1:8080/ci", "t".to_owned(), id()).unwrap();
        assert_eq!(
            c.url("v1/executions/x/status").as_str(),
            "http://127.0.0.1:8080/ci/v1/executions/x/status"
        );
        let c = ServerClient::new("https://ci.example/", "t".to_owned(), id()).unwrap();
        assert_eq!(c.url("v1/a").as_str(), "https://ci.example/v1/a");
        for bad in ["", "ci.example:8080", "file:///tmp/x", "mailto:a@b"] {
            let err = ServerClient::new(bad, "t".to_owned(), id()).unwrap_err();
            assert!(
                err.to_string().contains("SHIPINATOR_SERVER"),
                "{bad}: {err}"
            );
        }
        // The token never appears in the Debug output.
        let c = ServerClient::new("http://h/", "secret-token".to_owned(), id()).unwrap();
        assert!(!format!("{c:?}").contains("secret-token"));
    }
}
