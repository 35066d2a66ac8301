//! Errors of the client and the process exit codes they map to.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (with `--wait`: every task completed) |
//! | 1 | a request failed (server unreachable, HTTP error, local I/O) |
//! | 2 | invalid command line |
//! | 3 | a task ended `failed` |
//! | 4 | authentication failed (HTTP 401/403: missing or wrong API key) |
//! | 5 | a task was cancelled (by `lipsync cancel`, another client or `--cancel-on-interrupt`) |
//! | 6 | `--timeout` passed before the task(s) ended (they keep running) |
//! | 130 | interrupted (Ctrl-C) while waiting: detached, the task(s) keep running |

/// Exit code: success (for `submit --wait`: every task completed).
pub const EXIT_OK: i32 = 0;
/// Exit code: a request failed (server unreachable, HTTP error, local I/O).
pub const EXIT_ERROR: i32 = 1;
/// Exit code: invalid command line (clap's own code).
pub const EXIT_USAGE: i32 = 2;
/// Exit code: a task ended `failed` (its error code is printed).
pub const EXIT_TASK_FAILED: i32 = 3;
/// Exit code: the server refused the API key (HTTP 401 or 403).
pub const EXIT_AUTH: i32 = 4;
/// Exit code: a task was cancelled.
pub const EXIT_CANCELLED: i32 = 5;
/// Exit code: `--timeout` passed while waiting; the tasks keep running on the server.
pub const EXIT_TIMEOUT: i32 = 6;
/// Exit code: Ctrl-C while waiting; the client detached and the tasks keep running.
pub const EXIT_INTERRUPTED: i32 = 130;

/// The exit-code table for `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0    success (with --wait: every task completed)
  1    a request failed (server unreachable, HTTP error, local I/O)
  2    invalid command line
  3    a task failed
  4    authentication failed (HTTP 401/403: missing or wrong API key)
  5    a task was cancelled
  6    --timeout passed before the task(s) ended (they keep running)
  130  Ctrl-C while waiting: detached (the task keeps running; the resume command is
       printed), or cancelled with --cancel-on-interrupt (then 5)";

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
            ClientError::Api {
                status: 401 | 403, ..
            } => EXIT_AUTH,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_failures_have_their_own_code() {
        let api = |status| ClientError::Api {
            status,
            code: "x".into(),
            message: "y".into(),
        };
        assert_eq!(api(401).exit_code(), EXIT_AUTH);
        assert_eq!(api(403).exit_code(), EXIT_AUTH);
        assert_eq!(api(404).exit_code(), EXIT_ERROR);
        assert_eq!(ClientError::Usage("u".into()).exit_code(), EXIT_USAGE);
        let codes = [
            EXIT_OK,
            EXIT_ERROR,
            EXIT_USAGE,
            EXIT_TASK_FAILED,
            EXIT_AUTH,
            EXIT_CANCELLED,
            EXIT_TIMEOUT,
            EXIT_INTERRUPTED,
        ];
        let distinct: std::collections::BTreeSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), codes.len());
        for c in codes {
            assert!(
                EXIT_CODES_HELP.contains(&format!("  {c} ")),
                "{c} is documented"
            );
        }
    }
}
