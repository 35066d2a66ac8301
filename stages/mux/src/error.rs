//! Errors of the mux stage and how each maps to a task outcome.

use lipsync_schemas::{ErrorCode, TaskError};

/// Result of mux operations.
pub type Result<T, E = MuxError> = std::result::Result<T, E>;

/// What can go wrong while rendering the result.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The inputs contradict each other (frame counts, sizes, matrices): a bug or a
    /// corrupt intermediate upstream; retrying cannot help.
    #[error("{0}")]
    Inconsistent(String),
    /// ffmpeg could not decode an input it decoded before.
    #[error("cannot decode {what}: {detail}")]
    Decode {
        /// Which input.
        what: &'static str,
        /// ffmpeg's first error line.
        detail: String,
    },
    /// The encoder refused the frames or the audio.
    #[error("encoding failed: {0}")]
    Encode(String),
    /// A tool could not be started or a scratch file failed (disk full, ...).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: std::io::Error,
    },
    /// The job was told to stop.
    #[error("aborted")]
    Aborted,
    /// The input decodes to more than the limits allow (`input_too_long`).
    #[error("{0}")]
    TooLong(String),
    /// The input is not media this product accepts (`unsupported_media`).
    #[error("{0}")]
    Unsupported(String),
}

impl MuxError {
    /// An I/O error with context.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| MuxError::Io { context, source }
    }
}

impl From<lipsync_runtime::media::MediaError> for MuxError {
    fn from(e: lipsync_runtime::media::MediaError) -> Self {
        use lipsync_runtime::media::MediaError;
        match e {
            MediaError::Spawn(_, source) => MuxError::Io {
                context: "cannot start ffmpeg",
                source,
            },
            MediaError::Decode(detail) => MuxError::Decode {
                what: "the video",
                detail,
            },
            MediaError::TooLong(m) => MuxError::TooLong(m),
            MediaError::Refused(m) | MediaError::Timeout(m) => MuxError::Unsupported(m),
        }
    }
}

impl lipsync_runtime::StageError for MuxError {
    fn code(&self) -> ErrorCode {
        match self {
            MuxError::Encode(_) => ErrorCode::EncodeFailed,
            MuxError::TooLong(_) => ErrorCode::InputTooLong,
            MuxError::Unsupported(_) => ErrorCode::UnsupportedMedia,
            _ => ErrorCode::Internal,
        }
    }
    /// Local I/O is worth another delivery; inconsistent inputs and encoder failures are not.
    fn retryable(&self) -> bool {
        matches!(self, MuxError::Io { .. })
    }
    fn stopped(&self) -> bool {
        matches!(self, MuxError::Aborted)
    }
    fn task_error(&self) -> TaskError {
        let message = match self {
            MuxError::Encode(m) => format!("encoding failed: {m}"),
            other => other.to_string(),
        };
        TaskError::new(
            self.code(),
            lipsync_runtime::errors::public_message(&message),
        )
    }
}
