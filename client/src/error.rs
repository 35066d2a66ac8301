//! Errors of the client and the process exit codes they map to.

/// Exit code: success (for `submit --wait`: the task completed).
pub const EXIT_OK: i32 = 0;
/// Exit code: a request failed (server unreachable, HTTP error, local I/O).
pub const EXIT_ERROR: i32 = 1;
/// Exit code: invalid command line (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: the task ended `failed` (its error code is printed), or was cancelled.
pub const EXIT_TASK_FAILED: i32 = 3;

/// Everything that can go wrong talking to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway answered with an error body `{error: {code, message}}`.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The gateway's error code, e.g. `not_found`, `queue_full`.
        code: String,
        /// The gateway's message.
        message: String,
    },
    /// The request could not be sent or its answer not read.
    #[error("cannot reach the server at {server}: {source}")]
    Transport {
        /// Server base URL.
        server: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not what the API documents.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// Invalid arguments detected after parsing (e.g. one URL and one file).
    #[error("{0}")]
    Usage(String),
    /// A local file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, e.g. "cannot open video.mp4".
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ClientError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Usage(_) => EXIT_USAGE,
            ClientError::Api { .. }
            | ClientError::Transport { .. }
            | ClientError::Protocol(_)
            | ClientError::Io { .. } => EXIT_ERROR,
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ClientError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
