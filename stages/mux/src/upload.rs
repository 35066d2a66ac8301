//! The result upload to a task's `output_upload_url` (a client's presigned PUT URL): one
//! streamed `PUT` of the file with its `Content-Length` through the download policy's SSRF
//! guard (the policy the gateway checked the URL against), retried with backoff.
//!
//! The URL carries a signature in its query: it never appears in errors or logs (reqwest
//! errors are stripped of it, answers are reported by status only, since an S3 error
//! body may echo the credential).

use std::path::Path;
use std::time::Duration;

use lipsync_netguard::{ClientOptions, GuardError, GuardedClient, root_cause};
use lipsync_runtime::config::{FetchConfig, MuxConfig};
use tokio_util::io::ReaderStream;

/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why an upload failed (messages never contain the URL).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The URL (or where its host resolved to) is refused by the policy.
    #[error("the upload URL is not allowed: {0}")]
    Refused(String),
    /// The target answered with a non-2xx status.
    #[error("the upload target answered HTTP {0}")]
    Status(u16),
    /// No answer: connect failure, timeout, connection cut.
    #[error("the upload did not reach the target: {0}")]
    Transport(String),
    /// The local result file could not be read.
    #[error("cannot read the result file: {0}")]
    File(#[from] std::io::Error),
}

impl UploadError {
    /// Whether another try may succeed (network trouble, 5xx, 408, 429, a local read).
    pub fn is_transient(&self) -> bool {
        match self {
            UploadError::Refused(_) => false,
            UploadError::Status(s) => *s >= 500 || *s == 408 || *s == 429,
            UploadError::Transport(_) | UploadError::File(_) => true,
        }
    }
}

/// Uploads result files to client-given URLs.
#[derive(Debug, Clone)]
pub struct Uploader {
    client: GuardedClient,
    tries: u32,
    backoff: Duration,
}

impl Uploader {
    /// An uploader with the `fetch.*` policy and the `mux.upload_*` limits.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn new(fetch: &FetchConfig, mux: &MuxConfig) -> Result<Self, String> {
        if mux.upload_tries == 0 {
            return Err("mux.upload_tries: must be at least 1".into());
        }
        if mux.upload_timeout_s == 0 {
            return Err("mux.upload_timeout_s: must be at least 1".into());
        }
        let client = fetch
            .url_policy()?
            .client(&ClientOptions {
                connect_timeout: Duration::from_secs(fetch.connect_timeout_s.max(1)),
                read_timeout: Duration::from_secs(fetch.read_timeout_s.max(1)),
                total_timeout: Some(Duration::from_secs(mux.upload_timeout_s)),
                max_redirects: fetch.max_redirects,
            })
            .map_err(|e| format!("upload client: {e}"))?;
        Ok(Self {
            client,
            tries: mux.upload_tries,
            backoff: Duration::from_millis(mux.upload_backoff_ms),
        })
    }

    /// Tries per call of [`put_file`](Self::put_file).
    pub fn tries(&self) -> u32 {
        self.tries
    }

    /// PUT the file at `path` to `url`, up to `mux.upload_tries` times while the failure
    /// is transient; `on_retry` is called before each further try. Returns the last error.
    ///
    /// # Errors
    /// The last try's failure.
    pub async fn put_file(
        &self,
        url: &str,
        path: &Path,
        mut on_retry: impl FnMut(u32, &UploadError),
    ) -> Result<(), UploadError> {
        let mut wait = self.backoff;
        let mut attempt = 1;
        loop {
            match self.put_once(url, path).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < self.tries => {
                    on_retry(attempt, &e);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One streamed PUT with `Content-Length`.
    async fn put_once(&self, url: &str, path: &Path) -> Result<(), UploadError> {
        let file = tokio::fs::File::open(path).await?;
        let len = file.metadata().await?.len();
        let request = self
            .client
            .put(url)
            .map_err(|e| UploadError::Refused(e.to_string()))?
            .header(reqwest::header::CONTENT_LENGTH, len)
            .header(reqwest::header::CONTENT_TYPE, "video/mp4")
            .body(reqwest::Body::wrap_stream(ReaderStream::new(file)));
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        // Read (and drop) a short answer so the connection can be reused.
        drop(response.bytes().await);
        if status.is_success() {
            Ok(())
        } else {
            Err(UploadError::Status(status.as_u16()))
        }
    }
}

/// A reqwest error without its URL (it holds the signature), guard refusals kept typed.
fn transport(e: reqwest::Error) -> UploadError {
    if let Some(g) = GuardError::find_in(&e) {
        return if g.is_policy_refusal() {
            UploadError::Refused(g.to_string())
        } else {
            UploadError::Transport(g.to_string())
        };
    }
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_request() {
        "the request failed"
    } else {
        "the transfer failed"
    };
    let e = e.without_url();
    match std::error::Error::source(&e) {
        Some(cause) => UploadError::Transport(format!("{kind} ({})", root_cause(cause))),
        None => UploadError::Transport(kind.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_are_told_from_final_ones() {
        assert!(UploadError::Status(500).is_transient());
        assert!(UploadError::Status(429).is_transient());
        assert!(UploadError::Status(408).is_transient());
        assert!(!UploadError::Status(403).is_transient());
        assert!(!UploadError::Refused("x".into()).is_transient());
        assert!(UploadError::Transport("x".into()).is_transient());
    }

    #[test]
    fn limits_are_checked() {
        let fetch = FetchConfig::default();
        let zero = MuxConfig {
            upload_tries: 0,
            ..MuxConfig::default()
        };
        assert!(
            Uploader::new(&fetch, &zero)
                .unwrap_err()
                .contains("mux.upload_tries")
        );
        assert!(Uploader::new(&fetch, &MuxConfig::default()).is_ok());
    }

    #[tokio::test]
    async fn errors_never_carry_the_url() {
        // A closed port on loopback, with private networks allowed.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let fetch = FetchConfig {
            allow_private_networks: true,
            ..FetchConfig::default()
        };
        let mux = MuxConfig {
            upload_tries: 2,
            upload_backoff_ms: 1,
            ..MuxConfig::default()
        };
        let up = Uploader::new(&fetch, &mux).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("r.mp4");
        std::fs::write(&file, b"result").unwrap();
        let url = format!("http://127.0.0.1:{port}/b/k?X-Amz-Signature=canary-sig");
        let mut retries = 0;
        let err = up
            .put_file(&url, &file, |_, _| retries += 1)
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert_eq!(retries, 1);
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("canary-sig"), "{shown}");
        // The default policy refuses loopback before connecting, without naming the query.
        let strict = Uploader::new(&FetchConfig::default(), &mux).unwrap();
        let err = strict.put_file(&url, &file, |_, _| ()).await.unwrap_err();
        assert!(matches!(err, UploadError::Refused(_)), "{err}");
        assert!(!format!("{err:?}").contains("canary-sig"));
    }
}
