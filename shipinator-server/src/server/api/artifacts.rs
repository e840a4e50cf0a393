//! Artifact metadata and downloads (DMD §4.2).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shipinator_core::artifact::{ByteRange, GetOptions};
use shipinator_core::domain::ArtifactId;

use super::ApiPath;
use crate::server::AppState;
use crate::server::auth::Caller;
use crate::server::dto::ArtifactDto;
use crate::server::error::{ApiError, ApiResult, ErrorBody};

/// Artifact metadata (DMD §4.2). Viewers of the project, or the token of a live execution of
/// the artifact's run (or of a run retrying it).
#[utoipa::path(get, path = "/v1/artifacts/{id}/metadata", tag = "artifacts",
    params(("id" = String, Path, format = Uuid, description = "Artifact id")),
    responses(
        (status = 200, description = "The metadata", body = ArtifactDto),
        (status = 404, description = "Not found", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn get_metadata(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ArtifactId>,
) -> ApiResult<Json<ArtifactDto>> {
    let artifact = state.store.get_artifact(id).await?;
    state.authorize_artifact_read(&caller, &artifact).await?;
    Ok(Json(artifact.into()))
}

/// The byte range a `Range` header asks for, end exclusive. `Ok(None)`: the whole payload
/// (no header, or one this server ignores, as RFC 9110 allows: several ranges or another
/// unit). `Err`: unsatisfiable.
pub(crate) fn parse_range(
    value: Option<&HeaderValue>,
    size: u64,
) -> Result<Option<(u64, u64)>, ()> {
    let Some(text) = value.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix: the last N bytes.
        let Ok(n) = last.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(());
        }
        return Ok(Some((size.saturating_sub(n), size)));
    }
    let Ok(start) = first.parse::<u64>() else {
        return Ok(None);
    };
    let end = if last.is_empty() {
        size
    } else {
        let Ok(last) = last.parse::<u64>() else {
            return Ok(None);
        };
        if last < start {
            return Ok(None);
        }
        last.saturating_add(1).min(size)
    };
    if start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// Download an artifact's payload (DMD §4.2), streamed, with single-range `Range` support
/// (206, or 416 for a range past the end).
#[utoipa::path(get, path = "/v1/artifacts/{id}/download", tag = "artifacts",
    params(
        ("id" = String, Path, format = Uuid, description = "Artifact id"),
        ("Range" = Option<String>, Header, description = "`bytes=START-END`, `bytes=START-` or `bytes=-SUFFIX`"),
    ),
    responses(
        (status = 200, description = "The payload", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The requested range", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, description = "Not found", body = ErrorBody),
        (status = 416, description = "Range not satisfiable", body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub(crate) async fn download(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<ArtifactId>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let artifact = state.store.get_artifact(id).await?;
    state.authorize_artifact_read(&caller, &artifact).await?;
    let head = state.artifacts.head(id).await?;
    let size = head.size;
    let range = parse_range(headers.get(header::RANGE), size).map_err(|()| {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "range_not_satisfiable",
            format!("the requested range is outside artifact {id} of {size} bytes"),
        )
        .with_header(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes */{size}"))
                .unwrap_or(HeaderValue::from_static("bytes */0")),
        )
    })?;
    let read = state
        .artifacts
        .get(
            id,
            GetOptions {
                range: range.map(|(start, end)| ByteRange {
                    start,
                    end: Some(end),
                }),
                verify_checksum: range.is_none(),
            },
        )
        .await?;
    let (status, length) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, end - start),
        None => (StatusCode::OK, size),
    };
    let mut response = (status, Body::from_stream(read.body)).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{}\"", head.checksum)) {
        h.insert(header::ETAG, etag);
    }
    if let Some((start, end)) = range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{size}", end - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    let file_name = artifact
        .name
        .as_deref()
        .or(head.meta.file_name.as_deref())
        .map(|n| {
            n.replace(
                |c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-' && c != '_',
                "_",
            )
        });
    if let Some(name) = file_name
        && let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(text: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
        parse_range(Some(&HeaderValue::from_str(text).expect("header")), size)
    }

    #[test]
    fn ranges() {
        assert_eq!(range("bytes=0-9", 100), Ok(Some((0, 10))));
        assert_eq!(range("bytes=90-", 100), Ok(Some((90, 100))));
        assert_eq!(range("bytes=-10", 100), Ok(Some((90, 100))));
        assert_eq!(range("bytes=-1000", 100), Ok(Some((0, 100))));
        assert_eq!(range("bytes=50-1000", 100), Ok(Some((50, 100))));
        assert_eq!(range("bytes=100-", 100), Err(()));
        assert_eq!(range("bytes=-0", 100), Err(()));
        assert_eq!(range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(range("items=0-1", 100), Ok(None));
        assert_eq!(range("bytes=9-2", 100), Ok(None));
        assert_eq!(range("bytes=x-2", 100), Ok(None));
        assert_eq!(parse_range(None, 100), Ok(None));
    }
}
