//! Errors of the face stage and their task error codes.

use lipsync_schemas::ErrorCode;

/// Everything that can go wrong while tracking faces.
#[derive(Debug, thiserror::Error)]
pub enum FaceError {
    /// Invalid `[face]` settings (bad choice value, missing user-supplied model path).
    #[error("invalid face configuration: {0}")]
    Config(String),
    /// A detector model is missing, unreadable or rejected by ONNX Runtime.
    #[error("face detector model unavailable: {0}")]
    Model(String),
    /// ONNX Runtime failed while running a model.
    #[error("face detector failed: {0}")]
    Inference(String),
    /// The video could not be decoded.
    #[error("cannot decode the video: {0}")]
    Media(String),
    /// No usable face in a frame that could not be bridged (`on_missing = fail`).
    #[error("no usable face in frame {frame_index} ({time_s:.2} s)")]
    NoFace {
        /// First frame without a face.
        frame_index: u64,
        /// Its time in seconds (frame / 25).
        time_s: f64,
    },
    /// The video decoded to zero frames.
    #[error("the video has no frames")]
    Empty,
    /// The job was stopped (cancellation or shutdown) between batches.
    #[error("stopped")]
    Stopped,
    /// Local I/O (scratch files, preview encoder).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl FaceError {
    /// The task error code this failure maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            FaceError::Config(_) | FaceError::Model(_) => ErrorCode::ModelUnavailable,
            FaceError::Inference(_) | FaceError::Io(_) | FaceError::Stopped => ErrorCode::Internal,
            FaceError::Media(_) | FaceError::Empty => ErrorCode::UnsupportedMedia,
            FaceError::NoFace { .. } => ErrorCode::NoFaceDetected,
        }
    }
}

/// Result with [`FaceError`].
pub type Result<T, E = FaceError> = std::result::Result<T, E>;
