//! API errors: one enum, an exhaustive status mapping, JSON bodies `{error: {code, message}}`.
//! 5xx bodies are generic; their cause is logged, never sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Machine-readable code of an API error (gateway level; task failures use the
/// `ErrorCode` of the task record instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// The body is not valid JSON.
    InvalidJson,
    /// A field is missing, has the wrong type or is out of range.
    InvalidRequest,
    /// A URL is refused by the network policy (private address, scheme).
    UrlNotAllowed,
    /// The Content-Type is neither JSON nor multipart/form-data.
    UnsupportedMediaType,
    /// No such task, file or route.
    NotFound,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// Missing or wrong API key.
    Unauthorized,
    /// The key is valid but may not do this (admin-only route, refused `Origin`).
    Forbidden,
    /// A tenant quota (queued or processing tasks) is exhausted; see Retry-After.
    QuotaExceeded,
    /// The client sent its request (upload) too slowly.
    RequestTimeout,
    /// The same Idempotency-Key was used with a different body, or is still in progress.
    IdempotencyConflict,
    /// The task already completed and cannot be cancelled.
    TaskFinished,
    /// The body is larger than allowed.
    PayloadTooLarge,
    /// The requested byte range cannot be served.
    RangeNotSatisfiable,
    /// Too many requests for this key; see Retry-After.
    RateLimited,
    /// The work queue is full; see Retry-After.
    QueueFull,
    /// The media store is full (`artifacts.max_bytes`); see Retry-After.
    StorageFull,
    /// Direct uploads (`POST /uploads`, `*_upload_id`) need the `s3` artifact backend.
    UploadsUnavailable,
    /// No upload with this id (never created, not uploaded yet, another tenant's,
    /// expired or already used by a task).
    UploadNotFound,
    /// A backend (NATS) is unavailable; try again later.
    Unavailable,
    /// The request took too long.
    Timeout,
    /// An unexpected error; details are in the server log.
    Internal,
}

/// An error answered by the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Body is not JSON.
    #[error("{0}")]
    InvalidJson(String),
    /// Validation failed.
    #[error("{0}")]
    InvalidRequest(String),
    /// URL refused by policy.
    #[error("{0}")]
    UrlNotAllowed(String),
    /// Wrong content type.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Unknown task, file or route.
    #[error("{0}")]
    NotFound(String),
    /// Wrong method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Missing or wrong API key.
    #[error("missing or invalid API key (use `Authorization: Bearer <key>`)")]
    Unauthorized,
    /// Not allowed for this key or origin.
    #[error("{0}")]
    Forbidden(String),
    /// Tenant quota exhausted.
    #[error("{message}")]
    QuotaExceeded {
        /// Which quota.
        message: String,
        /// Suggested wait in seconds.
        retry_after_s: u64,
    },
    /// The upload deadline passed.
    #[error("{0}")]
    RequestTimeout(String),
    /// Idempotency-Key conflict.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// Cancel of a completed task.
    #[error("task already completed")]
    TaskFinished,
    /// Body too large.
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// Unsatisfiable range; carries the full size.
    #[error("requested range not satisfiable")]
    RangeNotSatisfiable {
        /// Full size of the resource.
        size: u64,
    },
    /// Rate limit hit.
    #[error("rate limit exceeded, retry after {retry_after_s} s")]
    RateLimited {
        /// Seconds until a token is available.
        retry_after_s: u64,
    },
    /// Work queue full.
    #[error("the work queue is full, retry later")]
    QueueFull {
        /// Suggested wait in seconds.
        retry_after_s: u64,
    },
    /// Media store full.
    #[error("the media store is full, retry later")]
    StorageFull,
    /// Direct uploads are not available on this server.
    #[error("{0}")]
    UploadsUnavailable(String),
    /// Unknown or unusable upload id.
    #[error("{0}")]
    UploadNotFound(String),
    /// Backend down; the cause is logged.
    #[error("service temporarily unavailable")]
    Unavailable(String),
    /// Took too long.
    #[error("request timed out")]
    Timeout,
    /// Anything else; the cause is logged.
    #[error("internal error")]
    Internal(String),
}

/// Result alias of the gateway.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    /// The wire code.
    pub fn code(&self) -> ApiErrorCode {
        match self {
            ApiError::InvalidJson(_) => ApiErrorCode::InvalidJson,
            ApiError::InvalidRequest(_) => ApiErrorCode::InvalidRequest,
            ApiError::UrlNotAllowed(_) => ApiErrorCode::UrlNotAllowed,
            ApiError::UnsupportedMediaType(_) => ApiErrorCode::UnsupportedMediaType,
            ApiError::NotFound(_) => ApiErrorCode::NotFound,
            ApiError::MethodNotAllowed => ApiErrorCode::MethodNotAllowed,
            ApiError::Unauthorized => ApiErrorCode::Unauthorized,
            ApiError::Forbidden(_) => ApiErrorCode::Forbidden,
            ApiError::QuotaExceeded { .. } => ApiErrorCode::QuotaExceeded,
            ApiError::RequestTimeout(_) => ApiErrorCode::RequestTimeout,
            ApiError::IdempotencyConflict(_) => ApiErrorCode::IdempotencyConflict,
            ApiError::TaskFinished => ApiErrorCode::TaskFinished,
            ApiError::PayloadTooLarge { .. } => ApiErrorCode::PayloadTooLarge,
            ApiError::RangeNotSatisfiable { .. } => ApiErrorCode::RangeNotSatisfiable,
            ApiError::RateLimited { .. } => ApiErrorCode::RateLimited,
            ApiError::QueueFull { .. } => ApiErrorCode::QueueFull,
            ApiError::StorageFull => ApiErrorCode::StorageFull,
            ApiError::UploadsUnavailable(_) => ApiErrorCode::UploadsUnavailable,
            ApiError::UploadNotFound(_) => ApiErrorCode::UploadNotFound,
            ApiError::Unavailable(_) => ApiErrorCode::Unavailable,
            ApiError::Timeout => ApiErrorCode::Timeout,
            ApiError::Internal(_) => ApiErrorCode::Internal,
        }
    }

    /// The HTTP status; exhaustive on purpose (no wildcard).
    pub fn status_code(&self) -> StatusCode {
        match self.code() {
            ApiErrorCode::InvalidJson => StatusCode::BAD_REQUEST,
            ApiErrorCode::InvalidRequest
            | ApiErrorCode::UrlNotAllowed
            | ApiErrorCode::UploadNotFound => StatusCode::UNPROCESSABLE_ENTITY,
            ApiErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiErrorCode::NotFound => StatusCode::NOT_FOUND,
            ApiErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ApiErrorCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            ApiErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiErrorCode::IdempotencyConflict
            | ApiErrorCode::TaskFinished
            | ApiErrorCode::UploadsUnavailable => StatusCode::CONFLICT,
            ApiErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiErrorCode::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
            ApiErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ApiErrorCode::QueueFull | ApiErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiErrorCode::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
            ApiErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A generic error for a status produced outside our handlers (fallback layer).
    pub fn from_status(status: StatusCode) -> Self {
        match status.as_u16() {
            400 => ApiError::InvalidJson("bad request".into()),
            401 => ApiError::Unauthorized,
            403 => ApiError::Forbidden("forbidden".into()),
            404 => ApiError::NotFound("not found".into()),
            405 => ApiError::MethodNotAllowed,
            408 => ApiError::RequestTimeout("request timed out".into()),
            504 => ApiError::Timeout,
            413 => ApiError::PayloadTooLarge { limit: 0 },
            415 => ApiError::UnsupportedMediaType("unsupported content type".into()),
            422 => ApiError::InvalidRequest("invalid request".into()),
            429 => ApiError::RateLimited { retry_after_s: 1 },
            503 => ApiError::Unavailable(format!("status {status}")),
            _ if status.is_client_error() => ApiError::InvalidRequest(
                status
                    .canonical_reason()
                    .unwrap_or("invalid request")
                    .to_lowercase(),
            ),
            _ => ApiError::Internal(format!("status {status}")),
        }
    }
}

/// Body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// Code and message of an error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code.
    pub code: ApiErrorCode,
    /// Human-readable message (never a stack trace or server path).
    pub message: String,
}

impl ApiError {
    /// The body the client gets (5xx causes stay out of it).
    pub fn body(&self) -> ErrorBody {
        let message = match self {
            ApiError::PayloadTooLarge { limit: 0 } => "request body too large".to_owned(),
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        if let ApiError::Unavailable(cause) | ApiError::Internal(cause) = &self {
            tracing::error!(code = ?self.code(), cause = %cause, "request failed");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        let retry_after = match &self {
            ApiError::RateLimited { retry_after_s }
            | ApiError::QueueFull { retry_after_s }
            | ApiError::QuotaExceeded { retry_after_s, .. } => Some(*retry_after_s),
            ApiError::Unavailable(_) => Some(1),
            ApiError::StorageFull => Some(30),
            _ => None,
        };
        if let Some(s) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s.max(1)));
        }
        if let ApiError::RangeNotSatisfiable { size } = &self
            && let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}"))
        {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_status_and_snake_case_name() {
        let all = [
            ApiError::InvalidJson(String::new()),
            ApiError::InvalidRequest(String::new()),
            ApiError::UrlNotAllowed(String::new()),
            ApiError::UnsupportedMediaType(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::Unauthorized,
            ApiError::Forbidden(String::new()),
            ApiError::QuotaExceeded {
                message: String::new(),
                retry_after_s: 1,
            },
            ApiError::RequestTimeout(String::new()),
            ApiError::IdempotencyConflict(String::new()),
            ApiError::TaskFinished,
            ApiError::PayloadTooLarge { limit: 1 },
            ApiError::RangeNotSatisfiable { size: 1 },
            ApiError::RateLimited { retry_after_s: 1 },
            ApiError::QueueFull { retry_after_s: 1 },
            ApiError::StorageFull,
            ApiError::UploadsUnavailable(String::new()),
            ApiError::UploadNotFound(String::new()),
            ApiError::Unavailable(String::new()),
            ApiError::Timeout,
            ApiError::Internal(String::new()),
        ];
        for e in all {
            let status = e.status_code();
            assert!(status.is_client_error() || status.is_server_error());
            let name = serde_json::to_value(e.code()).unwrap();
            let name = name.as_str().unwrap();
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        }
    }

    #[test]
    fn server_errors_hide_the_cause() {
        let e = ApiError::Internal("/secret/path exploded".into());
        assert_eq!(e.to_string(), "internal error");
    }
}
