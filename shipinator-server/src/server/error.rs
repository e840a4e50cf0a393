//! The one error shape of the API: `{"error":{"code":"...","message":"...","field":"..."}}`.

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use shipinator_core::artifact::ArtifactError;
use shipinator_core::driver::DriverError;
use shipinator_core::logs::LogError;
use shipinator_core::store::StoreError;
use utoipa::ToSchema;

/// An API error: a status, a stable code and a message for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) field: Option<String>,
    pub(crate) details: Vec<serde_json::Value>,
    /// Extra headers (`WWW-Authenticate`, `Content-Range`).
    pub(crate) headers: Vec<(header::HeaderName, HeaderValue)>,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorObject,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorObject {
    /// Stable machine-readable code: `invalid_request`, `invalid_config`, `unauthorized`,
    /// `forbidden`, `not_found`, `conflict`, `payload_too_large`, `range_not_satisfiable`,
    /// `unsupported_media_type`, `method_not_allowed`, `timeout`, `unavailable`, `internal`.
    pub(crate) code: String,
    /// For people.
    pub(crate) message: String,
    /// The request field at fault, for `invalid_request`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) field: Option<String>,
    /// Located problems (`invalid_config`: one object per problem with line and column).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub(crate) details: Vec<serde_json::Value>,
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            details: Vec::new(),
            headers: Vec::new(),
        }
    }

    /// 400 naming the field at fault.
    pub(crate) fn field(field: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request", message);
        e.field = Some(field.to_owned());
        e
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(crate) fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
        e.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"shipinator\""),
        ));
        e
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub(crate) fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    pub(crate) fn unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message);
        e.headers
            .push((header::RETRY_AFTER, HeaderValue::from_static("1")));
        e
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub(crate) fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorObject {
                code: self.code.to_owned(),
                message: self.message,
                field: self.field,
                details: self.details,
            },
        };
        let mut response = (self.status, Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// Full error chain text, for logs and 5xx messages.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { .. } => ApiError::not_found(e.to_string()),
            StoreError::AlreadyExists { .. }
            | StoreError::Conflict { .. }
            | StoreError::Fenced { .. }
            | StoreError::LeaseLost { .. } => ApiError::conflict(e.to_string()),
            StoreError::Invalid { message } => ApiError::bad_request(message.clone()),
            _ if e.is_transient() => {
                tracing::warn!(error = %chain(&e), "store unavailable");
                ApiError::unavailable("the database is unavailable; retry later")
            }
            _ => {
                tracing::error!(error = %chain(&e), "store failed");
                ApiError::internal("the database failed; see the server log")
            }
        }
    }
}

impl From<DriverError> for ApiError {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::Store(e) => e.into(),
            DriverError::Plan(e) => ApiError::bad_request(e.to_string()),
            DriverError::Stopped => ApiError::unavailable("the server is shutting down"),
            other => ApiError::internal(chain(&other)),
        }
    }
}

impl From<ArtifactError> for ApiError {
    fn from(e: ArtifactError) -> Self {
        match &e {
            ArtifactError::NotFound { .. } => ApiError::not_found(e.to_string()),
            ArtifactError::AlreadyExists { .. } => ApiError::conflict(e.to_string()),
            ArtifactError::TooLarge { .. } => ApiError::too_large(e.to_string()),
            ArtifactError::InvalidRange { .. } => ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                e.to_string(),
            ),
            ArtifactError::Upload { .. } => ApiError::bad_request(chain(&e)),
            ArtifactError::Unavailable { .. } => {
                tracing::warn!(error = %chain(&e), "artifact store unavailable");
                ApiError::unavailable("the artifact store is unavailable; retry later")
            }
            _ => {
                tracing::error!(error = %chain(&e), "artifact store failed");
                ApiError::internal("the artifact store failed; see the server log")
            }
        }
    }
}

impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match &e {
            LogError::NotFound { .. } => ApiError::not_found(e.to_string()),
            LogError::OutOfOrder { .. } | LogError::Closed { .. } => {
                ApiError::conflict(e.to_string())
            }
            LogError::Unavailable { .. } => {
                ApiError::unavailable("the log store is unavailable; retry later")
            }
            _ => {
                tracing::error!(error = %chain(&e), "log store failed");
                ApiError::internal("the log store failed; see the server log")
            }
        }
    }
}

/// The field a serde error is about: the path axum's JSON extractor puts before `: `.
fn field_of(text: &str) -> Option<String> {
    let (path, _) = text.split_once(": ")?;
    let path = path.trim();
    (!path.is_empty() && path != "." && !path.contains(' ')).then(|| path.to_owned())
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = r.body_text();
        match r {
            JsonRejection::JsonDataError(e) => {
                // "Failed to deserialize the JSON body into the target type: trigger: unknown
                // variant ..." — the inner error's text is "path: message".
                let inner = std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| text.clone());
                let mut err = ApiError::bad_request(format!("invalid request body: {inner}"));
                err.field = field_of(&inner).or_else(|| missing_field(&inner));
                err
            }
            JsonRejection::JsonSyntaxError(_) => {
                ApiError::bad_request(format!("the request body is not valid JSON: {text}"))
            }
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ),
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::too_large("the request body exceeds the configured limit")
            }
            other => ApiError::bad_request(other.body_text()),
        }
    }
}

/// `missing field `commit`` names the field.
fn missing_field(text: &str) -> Option<String> {
    let start = text.find("missing field `")? + "missing field `".len();
    let end = text[start..].find('`')? + start;
    Some(text[start..end].to_owned())
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        let mut e = ApiError::bad_request(r.body_text());
        e.field = Some("path".to_owned());
        e
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = r.body_text();
        let inner = text
            .strip_prefix("Failed to deserialize query string: ")
            .unwrap_or(&text)
            .to_owned();
        let mut e = ApiError::bad_request(format!("invalid query string: {inner}"));
        e.field = field_of(&inner).or_else(|| missing_field(&inner));
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_are_taken_from_serde_messages() {
        assert_eq!(
            field_of("trigger: unknown variant `x`").as_deref(),
            Some("trigger")
        );
        assert_eq!(
            missing_field("missing field `commit` at line 1 column 2").as_deref(),
            Some("commit")
        );
        assert_eq!(field_of("expected value at line 1 column 1"), None);
    }
}
