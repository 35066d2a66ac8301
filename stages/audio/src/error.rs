//! Errors of the audio stage and their task error codes.

use lipsync_schemas::ErrorCode;

/// What can go wrong turning audio into features.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not a readable WAV / audio file.
    #[error("the audio could not be read: {0}")]
    UnsupportedMedia(String),
    /// Too short for a single video frame.
    #[error("the audio is too short ({seconds:.3} s; at least {min:.3} s is needed)")]
    TooShort {
        /// Duration received.
        seconds: f64,
        /// Shortest accepted duration.
        min: f64,
    },
    /// The encoder model cannot be loaded or has an unexpected contract.
    #[error("audio model unavailable: {0}")]
    Model(String),
    /// Running the encoder failed.
    #[error("audio encoder failed: {0}")]
    Inference(String),
    /// The configuration is invalid.
    #[error("invalid audio configuration: {0}")]
    Config(String),
    /// Local file or pipe I/O.
    #[error("audio i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Stopped by the caller (cancellation or shutdown) between windows.
    #[error("stopped")]
    Stopped,
}

/// `Result` of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Returns the task error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::UnsupportedMedia(_) | Error::TooShort { .. } => ErrorCode::UnsupportedMedia,
            Error::Model(_) | Error::Config(_) => ErrorCode::ModelUnavailable,
            Error::Inference(_) => ErrorCode::InferenceFailed,
            Error::Io(_) | Error::Stopped => ErrorCode::Internal,
        }
    }
}

impl lipsync_runtime::StageError for Error {
    fn code(&self) -> ErrorCode {
        Error::code(self)
    }
    /// Local I/O is worth another delivery; bad media and model failures are not.
    fn retryable(&self) -> bool {
        matches!(self, Error::Io(_))
    }
    fn stopped(&self) -> bool {
        matches!(self, Error::Stopped)
    }
}
