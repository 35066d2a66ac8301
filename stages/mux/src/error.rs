//! Errors of the mux stage and how each maps to a task outcome.

use lipsync_runtime::JobError;
use lipsync_schemas::ErrorCode;

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
        }
    }
}

impl From<MuxError> for JobError {
    fn from(e: MuxError) -> Self {
        match e {
            MuxError::Inconsistent(m) => JobError::permanent(ErrorCode::Internal, m),
            e @ MuxError::Decode { .. } => JobError::permanent(ErrorCode::Internal, e.to_string()),
            MuxError::Encode(m) => {
                JobError::permanent(ErrorCode::EncodeFailed, format!("encoding failed: {m}"))
            }
            e @ MuxError::Io { .. } => JobError::transient(e),
            MuxError::Aborted => JobError::Interrupted,
        }
    }
}
