//! Errors of the infer stage and how they map onto job outcomes and error codes.

use lipsync_runtime::JobError;
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
}

/// `Result` with [`InferError`].
pub type Result<T, E = InferError> = std::result::Result<T, E>;

impl From<ort::Error> for InferError {
    fn from(e: ort::Error) -> Self {
        InferError::Model(e.to_string())
    }
}

impl InferError {
    /// Returns the job outcome: model and encoder failures are permanent
    /// (`inference_failed` / `encode_failed`), local I/O is transient.
    pub fn into_job_error(self) -> JobError {
        match self {
            InferError::Model(m) => JobError::permanent(ErrorCode::InferenceFailed, m),
            InferError::BadRequest(m) => JobError::permanent(ErrorCode::InvalidRequest, m),
            InferError::Input(m) => JobError::permanent(ErrorCode::UnsupportedMedia, m),
            InferError::Encode(m) => JobError::permanent(ErrorCode::EncodeFailed, m),
            InferError::Io(e) => JobError::transient(format!("local i/o: {e}")),
            InferError::Stopped => JobError::Cancelled,
        }
    }
}
