//! The closed set of error codes a task can fail with (docs/architecture.md §5).

use serde::{Deserialize, Serialize};

/// Machine-readable reason of a failure. Closed: clients may match on every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request itself is malformed or out of range.
    InvalidRequest,
    /// A URL was refused by the network policy (scheme, private address, ...).
    UrlNotAllowed,
    /// The remote server answered with an error or the transfer broke.
    DownloadFailed,
    /// The download did not finish within the configured time.
    DownloadTimeout,
    /// An input is larger than the configured limit.
    InputTooLarge,
    /// An input could not be read as media.
    UnsupportedMedia,
    /// The video input has no video stream.
    NoVideoStream,
    /// The audio input has no audio stream.
    NoAudioStream,
    /// An input is longer than the configured limit.
    InputTooLong,
    /// No usable face was found.
    NoFaceDetected,
    /// The requested or configured model is not installed or invalid.
    ModelUnavailable,
    /// The diffusion model failed.
    InferenceFailed,
    /// Encoding or muxing the result failed.
    EncodeFailed,
    /// The result could not be uploaded to the client's `output_upload_url` (it stays
    /// downloadable from `/outputs`).
    OutputUploadFailed,
    /// The client cancelled the task.
    Cancelled,
    /// A transient error persisted through every delivery attempt.
    RetriesExhausted,
    /// An unexpected internal error.
    Internal,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::InvalidRequest,
        ErrorCode::UrlNotAllowed,
        ErrorCode::DownloadFailed,
        ErrorCode::DownloadTimeout,
        ErrorCode::InputTooLarge,
        ErrorCode::UnsupportedMedia,
        ErrorCode::NoVideoStream,
        ErrorCode::NoAudioStream,
        ErrorCode::InputTooLong,
        ErrorCode::NoFaceDetected,
        ErrorCode::ModelUnavailable,
        ErrorCode::InferenceFailed,
        ErrorCode::EncodeFailed,
        ErrorCode::OutputUploadFailed,
        ErrorCode::Cancelled,
        ErrorCode::RetriesExhausted,
        ErrorCode::Internal,
    ];

    /// The wire name, e.g. `url_not_allowed`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UrlNotAllowed => "url_not_allowed",
            ErrorCode::DownloadFailed => "download_failed",
            ErrorCode::DownloadTimeout => "download_timeout",
            ErrorCode::InputTooLarge => "input_too_large",
            ErrorCode::UnsupportedMedia => "unsupported_media",
            ErrorCode::NoVideoStream => "no_video_stream",
            ErrorCode::NoAudioStream => "no_audio_stream",
            ErrorCode::InputTooLong => "input_too_long",
            ErrorCode::NoFaceDetected => "no_face_detected",
            ErrorCode::ModelUnavailable => "model_unavailable",
            ErrorCode::InferenceFailed => "inference_failed",
            ErrorCode::EncodeFailed => "encode_failed",
            ErrorCode::OutputUploadFailed => "output_upload_failed",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::RetriesExhausted => "retries_exhausted",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether submitting the same request again may succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::DownloadFailed
                | ErrorCode::DownloadTimeout
                | ErrorCode::OutputUploadFailed
                | ErrorCode::ModelUnavailable
                | ErrorCode::RetriesExhausted
                | ErrorCode::Internal
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure as stored in the task record and sent in API error bodies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable message; never a stack trace or server path.
    pub message: String,
    /// Whether trying again may help.
    pub retryable: bool,
    /// For `no_face_detected`: the first frame without a face.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_index: Option<u64>,
    /// For `no_face_detected`: that frame's time in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_s: Option<f64>,
}

impl TaskError {
    /// A failure with the code's default retryability.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: code.retryable(),
            frame_index: None,
            time_s: None,
        }
    }
}
