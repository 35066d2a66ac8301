//! Errors of the infer stage and how they map onto job outcomes and error codes.

use lipsync_schemas::ErrorCode;

/// Errors of the infer stage.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The model files or the runtime cannot be used (start-up) or a model run failed.
    #[error("model: {0}")]
    Model(String),
    /// The request parameters are out of range.
    #[error("invalid request: {0}")]
    BadRequest(String),
    /// An input artifact is malformed or inconsistent (track, features, video).
    #[error("invalid input: {0}")]
    Input(String),
    /// Encoding the crops failed.
    #[error("encode: {0}")]
    Encode(String),
    /// Local I/O (scratch files, pipes).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The job was stopped (cancellation or shutdown) between two steps.
    #[error("stopped")]
    Stopped,
    /// A pipeline thread panicked; the engine was kept and the attempt is retried.
    #[error("internal error: the inference pipeline panicked: {0}")]
    Panicked(String),
}

/// `Result` with [`InferError`].
pub type Result<T, E = InferError> = std::result::Result<T, E>;

impl From<ort::Error> for InferError {
    fn from(e: ort::Error) -> Self {
        InferError::Model(e.to_string())
    }
}

impl lipsync_runtime::StageError for InferError {
    /// Model and encoder failures are permanent (`inference_failed` / `encode_failed`).
    fn code(&self) -> ErrorCode {
        match self {
            InferError::Model(_) => ErrorCode::InferenceFailed,
            InferError::BadRequest(_) => ErrorCode::InvalidRequest,
            InferError::Input(_) => ErrorCode::UnsupportedMedia,
            InferError::Encode(_) => ErrorCode::EncodeFailed,
            InferError::Io(_) | InferError::Panicked(_) | InferError::Stopped => {
                ErrorCode::Internal
            }
        }
    }
    /// Local I/O and a panic inside the pipeline are worth another delivery.
    fn retryable(&self) -> bool {
        matches!(self, InferError::Io(_) | InferError::Panicked(_))
    }
    fn stopped(&self) -> bool {
        matches!(self, InferError::Stopped)
    }
}
