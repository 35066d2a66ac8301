//! One shape for stage errors: every stage's error type says which task error code it
//! maps to and whether another delivery may help; the runner does the rest. Messages
//! that reach the task record never carry a server path.

use lipsync_schemas::{ErrorCode, TaskError};

use crate::runner::JobError;

/// Implemented by every stage's error type.
pub trait StageError: std::fmt::Display {
    /// The task error code of this failure.
    fn code(&self) -> ErrorCode;
    /// Whether another delivery of the same job may succeed (network, a busy resource,
    /// local i/o). `false` fails the task now.
    fn retryable(&self) -> bool;
    /// Whether this is the job being stopped (cancellation, shutdown, a stalled lease)
    /// rather than a failure of its own.
    fn stopped(&self) -> bool {
        false
    }
    /// The failure as stored in the task record.
    fn task_error(&self) -> TaskError {
        TaskError::new(self.code(), public_message(&self.to_string()))
    }
}

impl<E: StageError> From<E> for JobError {
    fn from(e: E) -> Self {
        if e.stopped() {
            JobError::Interrupted
        } else if e.retryable() {
            JobError::Transient(public_message(&e.to_string()))
        } else {
            JobError::Permanent(e.task_error())
        }
    }
}

/// `message` with every absolute path reduced to its last component, so a task error
/// (which clients read) never shows where the server keeps its files. Tool messages such
/// as ffmpeg's quote the input path; scratch folders are per job and meaningless outside.
pub fn public_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find('/') {
        let (head, tail) = rest.split_at(i);
        // A path starts at a '/' that begins a word (or follows a quote or '(' or '=').
        let starts_word = head
            .chars()
            .last()
            .is_none_or(|c| c.is_whitespace() || "'\"(=:[<`".contains(c));
        let is_url = head.ends_with(':') && tail.starts_with("//");
        if !starts_word || is_url {
            out.push_str(head);
            out.push('/');
            rest = &tail[1..];
            if is_url {
                // Copy the URL as it is, up to the next whitespace.
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                out.push_str(&rest[..end]);
                rest = &rest[end..];
            }
            continue;
        }
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || "'\"),;]>`".contains(c))
            .unwrap_or(tail.len());
        let path = &tail[..end];
        // `path:` (ffmpeg's "file: message") keeps its colon outside the name.
        let (path, colon) = match path.strip_suffix(':') {
            Some(p) => (p, ":"),
            None => (path, ""),
        };
        let name = path.rsplit('/').find(|s| !s.is_empty()).unwrap_or("");
        out.push_str(name);
        out.push_str(colon);
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_reduced_to_their_names() {
        assert_eq!(
            public_message("/tmp/lipsync-face-x1/video: Invalid data found"),
            "video: Invalid data found"
        );
        assert_eq!(
            public_message("cannot open '/var/lib/lipsync/scratch/a/b.wav' (denied)"),
            "cannot open 'b.wav' (denied)"
        );
        assert_eq!(public_message("ratio 16/9 kept"), "ratio 16/9 kept");
        assert_eq!(
            public_message("GET http://host/a/b failed"),
            "GET http://host/a/b failed"
        );
        assert_eq!(public_message("no path here"), "no path here");
    }

    struct E(bool);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("broke at /srv/x/y.mp4")
        }
    }
    impl StageError for E {
        fn code(&self) -> ErrorCode {
            ErrorCode::UnsupportedMedia
        }
        fn retryable(&self) -> bool {
            self.0
        }
    }

    #[test]
    fn retryability_picks_the_job_error_kind() {
        match JobError::from(E(false)) {
            JobError::Permanent(t) => {
                assert_eq!(t.code, ErrorCode::UnsupportedMedia);
                assert_eq!(t.message, "broke at y.mp4");
            }
            other => panic!("{other}"),
        }
        assert!(matches!(JobError::from(E(true)), JobError::Transient(m) if m == "broke at y.mp4"));
    }
}
