//! Worker endpoints (DMD §4.3 and the upload side of artifacts), authenticated by the token
//! of the execution in the path.
//!
//! A status report is handed to this process's driver and acknowledged once it is committed.
//! When another replica owns the run, the owning driver's `Executor::status` poll picks the
//! result up; until it has, the report is answered 503 and the worker sends it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use futures_util::StreamExt;
use shipinator_core::artifact::{ArtifactError, ArtifactMeta};
use shipinator_core::domain::{ArtifactId, ExecutionId, ExecutionStatus};
use shipinator_core::executor::{
    ExecutionReport, ExecutionResult, ExecutionState, ProducedArtifact,
};
use shipinator_core::store::RunEventKind;
use tokio::sync::broadcast;

use super::{ApiJson, ApiPath};
use crate::server::AppState;
use crate::server::auth::Caller;
use crate::server::dto::{ExecutionStatusBody, LogBatch, ReportedStatus, UploadedArtifact};
use crate::server::error::{ApiError, ApiResult, ErrorBody};

/// `storage_backend` of an artifact known only by reference (an OCI image ref): no bytes.
const REFERENCE_ONLY_BACKEND: &str = "none";

/// How long a status report waits for its commit before answering 503 (at most half the
/// request timeout).
const COMMIT_WAIT: Duration = Duration::from_secs(10);
/// While waiting, how often the store is read again without a driver event (a report that
/// another replica's driver records through its status poll).
const COMMIT_RECHECK: Duration = Duration::from_millis(250);

/// An execution's status (DMD §4.3): `running`, or the result (`success`, `failed`), or
/// `lost`. Artifacts are `ProducedArtifact` objects carrying their id (an extension of the
/// DMD's list of ids).
///
/// A 204 means the report is durably recorded: the driver has committed it (the execution is
/// `running` or has ended in the store). When that does not happen within a bound, the answer
/// is 503 with `Retry-After` and the worker sends the report again. Once the execution has
/// ended its token is no longer valid: a report repeated after that is a 403 and changes
/// nothing.
#[utoipa::path(post, path = "/v1/executions/{id}/status", tag = "workers",
    params(("id" = String, Path, format = Uuid, description = "Execution id")),
    request_body = ExecutionStatusBody,
    responses(
        (status = 204, description = "Recorded"),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 403, description = "Not this execution's token, or the execution has ended", body = ErrorBody),
        (status = 503, description = "Not recorded yet: send the report again after Retry-After", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn report_status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ExecutionId>,
    ApiJson(body): ApiJson<ExecutionStatusBody>,
) -> ApiResult<StatusCode> {
    // An execution's token is valid until the execution ends, for reports too: a worker that
    // reports again after its result was recorded (it did not hear the answer) is refused,
    // which changes nothing, and a replayed worker of an ended execution is refused.
    let execution = state.authorize_execution(&caller, id).await?;
    let reported = match body.status {
        ReportedStatus::Running => ExecutionState::Running,
        ReportedStatus::Success | ReportedStatus::Failed => {
            let success = body.status == ReportedStatus::Success;
            let exit_code = match (body.exit_code, success) {
                (Some(code), true) if code != 0 => {
                    return Err(ApiError::field(
                        "exit_code",
                        format!("status success with exit_code {code}: success means exit code 0"),
                    ));
                }
                (Some(0), false) if body.failure.is_none() => {
                    return Err(ApiError::field(
                        "failure",
                        "status failed with exit_code 0 needs a failure reason",
                    ));
                }
                (Some(code), _) => code,
                (None, true) => 0,
                // Failed before or without a command exit code.
                (None, false) => -1,
            };
            ExecutionState::Finished(ExecutionResult {
                exit_code,
                logs_uri: body.logs_uri,
                artifacts: recorded_artifacts(&state, body.artifacts).await?,
                failure: body.failure,
            })
        }
        ReportedStatus::Lost => ExecutionState::Lost {
            reason: body.failure.unwrap_or_else(|| "lost".to_owned()),
        },
    };
    tracing::info!(
        execution_id = %id,
        step_id = %execution.job_step_id,
        attempt = execution.attempt,
        status = ?body.status,
        "execution reported"
    );
    let ends = !matches!(reported, ExecutionState::Running);
    // Subscribed before the report goes out, so its commit cannot be missed.
    let mut events = state.driver.subscribe();
    state.driver.report(ExecutionReport {
        execution_id: id,
        state: reported,
    })?;
    let bound = COMMIT_WAIT.min(Duration::from_secs(state.limits.request_timeout_secs.max(1)) / 2);
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match state.store.get_execution(id).await {
            Ok(e) if recorded(e.status, ends) => return Ok(StatusCode::NO_CONTENT),
            Ok(_) => {}
            Err(e) if e.is_transient() => {}
            Err(e) => return Err(e.into()),
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(execution_id = %id, "a status report was not recorded in time");
            return Err(ApiError::unavailable(format!(
                "the report of execution {id} was not recorded within {} s; send it again",
                bound.as_secs_f32()
            )));
        }
        let wake = deadline.min(now + COMMIT_RECHECK);
        // Any error (lagging behind, a stopped driver) just means: look at the store again.
        let _ = tokio::time::timeout_at(wake, async {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if matches!(event.kind,
                            RunEventKind::ExecutionChanged { execution_id, .. } if execution_id == id)
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await;
                    }
                }
            }
        })
        .await;
    }
}

/// Whether a report is recorded when its execution is stored with `status`: a final report
/// once the execution has ended, `running` once it has left `pending`.
fn recorded(status: ExecutionStatus, ends: bool) -> bool {
    if ends {
        status.is_terminal()
    } else {
        status != ExecutionStatus::Pending
    }
}

/// The reported artifacts as the server records them: where the bytes are, their size and
/// checksum come from this server's artifact store, not from the worker, which only knows the
/// upload endpoint. A payload artifact that was never uploaded is refused.
async fn recorded_artifacts(
    state: &AppState,
    reported: Vec<ProducedArtifact>,
) -> ApiResult<Vec<ProducedArtifact>> {
    let mut recorded = Vec::with_capacity(reported.len());
    for mut artifact in reported {
        if artifact.storage_backend != REFERENCE_ONLY_BACKEND {
            let stored = match state.artifacts.head(artifact.id).await {
                Ok(stored) => stored,
                Err(ArtifactError::NotFound { id }) => {
                    return Err(ApiError::field(
                        "artifacts",
                        format!("artifact {id} was reported but never uploaded"),
                    ));
                }
                Err(e) => return Err(e.into()),
            };
            artifact.storage_backend = stored.backend;
            artifact.storage_path = stored.storage_path;
            artifact.size = stored.size;
            artifact.checksum = Some(stored.checksum);
        }
        recorded.push(artifact);
    }
    Ok(recorded)
}

/// Append log lines of an execution. Lines whose sequence numbers are already stored are
/// ignored, so a worker may resend a batch; a gap is a 409.
#[utoipa::path(post, path = "/v1/executions/{id}/logs", tag = "workers",
    params(("id" = String, Path, format = Uuid, description = "Execution id")),
    request_body = LogBatch,
    responses(
        (status = 204, description = "Stored"),
        (status = 403, description = "Not this execution's token, or the execution has ended", body = ErrorBody),
        (status = 409, description = "A gap in sequence numbers, or the log is closed", body = ErrorBody),
        (status = 413, description = "Batch too large", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn append_logs(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ExecutionId>,
    ApiJson(body): ApiJson<LogBatch>,
) -> ApiResult<StatusCode> {
    state.authorize_execution(&caller, id).await?;
    if body.lines.is_empty() {
        return Ok(StatusCode::NO_CONTENT);
    }
    if body.lines.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
        return Err(ApiError::field(
            "lines",
            "lines must have consecutive sequence numbers",
        ));
    }
    state.logs.append(id, &body.lines).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Upload an artifact produced by an execution: the raw body, streamed to the artifact
/// store. `Content-Type` and `X-Shipinator-File-Name` are kept as metadata.
#[utoipa::path(put, path = "/v1/executions/{id}/artifacts/{artifact_id}", tag = "workers",
    params(
        ("id" = String, Path, format = Uuid, description = "Execution id"),
        ("artifact_id" = String, Path, format = Uuid, description = "The new artifact's id"),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = UploadedArtifact),
        (status = 403, description = "Not this execution's token, or the execution has ended", body = ErrorBody),
        (status = 409, description = "An artifact with this id exists", body = ErrorBody),
        (status = 413, description = "Larger than the configured limit", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn upload_artifact(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, artifact_id)): ApiPath<(ExecutionId, ArtifactId)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<UploadedArtifact>)> {
    let execution = state.authorize_execution(&caller, id).await?;
    let limit = state.limits.artifact_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::too_large(format!(
            "the artifact exceeds the upload limit of {limit} bytes"
        )));
    }
    let meta = ArtifactMeta {
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        file_name: headers
            .get("x-shipinator-file-name")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        step_id: Some(execution.job_step_id),
        ..ArtifactMeta::default()
    };
    let exceeded = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&exceeded);
    let mut total: u64 = 0;
    let stream = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        total = total.saturating_add(chunk.len() as u64);
        if total > limit {
            flag.store(true, Ordering::Relaxed);
            return Err(std::io::Error::other("upload limit exceeded"));
        }
        Ok(chunk)
    });
    let stored = match state
        .artifacts
        .put(artifact_id, meta, Box::pin(stream))
        .await
    {
        Ok(stored) => stored,
        Err(_) if exceeded.load(Ordering::Relaxed) => {
            return Err(ApiError::too_large(format!(
                "the artifact exceeds the upload limit of {limit} bytes"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(execution_id = %id, artifact_id = %artifact_id, size = stored.size, "artifact uploaded");
    let checksum = if stored.checksum.starts_with("sha256:") {
        stored.checksum
    } else {
        format!("sha256:{}", stored.checksum)
    };
    Ok((
        StatusCode::CREATED,
        Json(UploadedArtifact {
            id: stored.id,
            size: stored.size,
            checksum,
            storage_backend: stored.backend,
            storage_path: stored.storage_path,
        }),
    ))
}
