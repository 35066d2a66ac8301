//! Streaming, size- and time-capped download of one URL into an [`AsyncWrite`] sink.
//!
//! The body is never buffered: each chunk from the connection is written to the sink
//! before the next is read, so memory stays flat whatever the file size. To send the
//! same bytes to two places (the fetch stage writes a temp file for ffprobe *and* feeds
//! the artifact store), wrap both sinks in a [`Tee`]:
//!
//! ```no_run
//! # async fn demo(client: &lipsync_fetch::guard::GuardedClient) -> Result<(), Box<dyn std::error::Error>> {
//! use lipsync_fetch::download::{download_to, DownloadLimits, Tee};
//! use tokio::io::AsyncWriteExt;
//! let file = tokio::fs::File::create("/tmp/video.bin").await?;
//! // The other half of the pipe is read by the artifact store's streaming put.
//! let (to_store, _from_pipe) = tokio::io::duplex(256 * 1024);
//! let mut tee = Tee::new(file, to_store);
//! let info = download_to(client, "https://example.com/v.mp4", &DownloadLimits::default(),
//!     &mut tee, |done, total| eprintln!("{done}/{total:?}")).await?;
//! tee.shutdown().await?; // closes both sinks (the store sees EOF)
//! # let _ = info; Ok(()) }
//! ```
//!
//! `download_to` flushes the sink at the end but does not shut it down: the caller owns
//! the sink and decides when it is complete (e.g. only after validation).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use url::Url;

use crate::guard::{GuardError, GuardedClient, root_cause};

/// Caps for one download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadLimits {
    /// Largest body accepted, in bytes (checked against Content-Length and while streaming).
    pub max_bytes: u64,
    /// Deadline for the whole download, from the first connect to the last byte.
    pub total_timeout: Duration,
    /// Longest wait for the response headers (after connecting) or for the next body chunk.
    pub read_timeout: Duration,
}

impl Default for DownloadLimits {
    fn default() -> Self {
        Self {
            max_bytes: 2 * 1024 * 1024 * 1024,
            total_timeout: Duration::from_secs(600),
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// What was downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadInfo {
    /// Body bytes written to the sink.
    pub bytes: u64,
    /// The Content-Type header, if any.
    pub content_type: Option<String>,
    /// The URL after redirects.
    pub final_url: Url,
}

/// Which part of the download ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// DNS, TCP connect or TLS handshake.
    Connect,
    /// Waiting for the response headers.
    Headers,
    /// Waiting for the next chunk of the body.
    Body,
    /// The total deadline passed.
    Total,
}

impl std::fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Connect => "connecting to the server took too long",
            Self::Headers => "the server did not answer in time",
            Self::Body => "the server stopped sending data",
            Self::Total => "the download took longer than allowed",
        })
    }
}

/// A typed download failure; [`code`](Self::code) gives the service error code.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// The URL, a redirect hop or a resolved address is refused by the SSRF policy.
    #[error("{0}")]
    UrlNotAllowed(GuardError),
    /// A non-2xx answer, a connection failure, a body cut short, a DNS failure, ...
    #[error("download failed: {reason}")]
    DownloadFailed {
        /// HTTP status when the server answered with a non-2xx status.
        status: Option<u16>,
        reason: String,
    },
    /// A read, connect or total timeout.
    #[error("download timed out: {phase}")]
    DownloadTimeout { phase: TimeoutPhase },
    /// Larger than `max_bytes` (by Content-Length, or counted while streaming).
    #[error("{}", too_large_message(*max_bytes, *content_length))]
    InputTooLarge {
        max_bytes: u64,
        /// The announced Content-Length when the refusal came from the header.
        content_length: Option<u64>,
    },
    /// Writing to the sink failed (local disk, artifact store).
    #[error("could not store the downloaded data: {0}")]
    Sink(#[source] io::Error),
}

fn too_large_message(max: u64, announced: Option<u64>) -> String {
    match announced {
        Some(n) => format!("the file is {n} bytes; at most {max} bytes are allowed"),
        None => format!("the file is larger than the allowed {max} bytes"),
    }
}

impl DownloadError {
    /// Service error code: `url_not_allowed`, `download_failed`, `download_timeout`,
    /// `input_too_large`, or `internal` for sink failures.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UrlNotAllowed(g) => g.code(),
            Self::DownloadFailed { .. } => "download_failed",
            Self::DownloadTimeout { .. } => "download_timeout",
            Self::InputTooLarge { .. } => "input_too_large",
            Self::Sink(_) => "internal",
        }
    }

    /// Whether retrying later may succeed (network errors, timeouts, 5xx, 408, 429,
    /// sink failures). Refusals, 4xx and oversized inputs are permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::UrlNotAllowed(_) | Self::InputTooLarge { .. } => false,
            Self::DownloadFailed {
                status: Some(s), ..
            } => *s >= 500 || *s == 408 || *s == 429,
            Self::DownloadFailed { status: None, .. } => true,
            Self::DownloadTimeout { .. } | Self::Sink(_) => true,
        }
    }

    fn from_guard(g: GuardError) -> Self {
        if g.is_policy_refusal() {
            Self::UrlNotAllowed(g)
        } else {
            Self::DownloadFailed {
                status: None,
                reason: g.to_string(),
            }
        }
    }

    /// Maps a reqwest error, looking for guard refusals in its source chain.
    fn from_reqwest(e: &reqwest::Error, phase: TimeoutPhase) -> Self {
        if let Some(g) = GuardError::find_in(e) {
            return Self::from_guard(g.clone());
        }
        if e.is_timeout() {
            return Self::DownloadTimeout {
                phase: if e.is_connect() {
                    TimeoutPhase::Connect
                } else {
                    phase
                },
            };
        }
        let reason = if e.is_connect() {
            format!("could not connect to the server ({})", root_cause(e))
        } else if e.is_body() || e.is_decode() {
            format!(
                "the connection ended before the whole body arrived ({})",
                root_cause(e)
            )
        } else if e.is_redirect() {
            format!("redirect failed ({})", root_cause(e))
        } else {
            format!("request failed ({})", root_cause(e))
        };
        Self::DownloadFailed {
            status: None,
            reason,
        }
    }
}

/// Downloads `url` into `sink`, chunk by chunk, and calls `progress(downloaded, total)`
/// after every chunk (`total` is the Content-Length when announced; throttle in the
/// callback if needed).
///
/// The URL is vetted by the client's policy first; every redirect hop and resolved
/// address is vetted by the client. A Content-Length over `max_bytes` is refused before
/// the body is read; a body that grows past `max_bytes` is cut off after at most
/// `max_bytes` bytes have been written (the excess chunk is never written). A body shorter
/// than its Content-Length is an error. On error the sink may hold a partial body: the
/// caller discards it.
pub async fn download_to<W, P>(
    client: &GuardedClient,
    url: &str,
    limits: &DownloadLimits,
    mut sink: W,
    mut progress: P,
) -> Result<DownloadInfo, DownloadError>
where
    W: AsyncWrite + Unpin,
    P: FnMut(u64, Option<u64>),
{
    let url = client.check_url(url).map_err(DownloadError::from_guard)?;
    let deadline = Instant::now() + limits.total_timeout;
    let work = async {
        // Headers: connecting is bounded by the client's connect timeout, the wait for
        // the answer by the read timeout; the client's own read timeout backs this up.
        let header_wait = client.options().connect_timeout + limits.read_timeout;
        let response = match tokio::time::timeout(header_wait, client.http().get(url).send()).await
        {
            Err(_) => {
                return Err(DownloadError::DownloadTimeout {
                    phase: TimeoutPhase::Headers,
                });
            }
            Ok(Err(e)) => return Err(DownloadError::from_reqwest(&e, TimeoutPhase::Headers)),
            Ok(Ok(r)) => r,
        };
        let status = response.status();
        if status.is_redirection() {
            // A redirect reqwest did not follow (e.g. `Location: file:///...`, which is
            // not a valid HTTP URI): report a policy refusal when the target is one.
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| response.url().join(l).ok());
            if let Some(target) = location
                && let Err(g) = client.policy().check_parsed(&target)
            {
                return Err(DownloadError::from_guard(g));
            }
            return Err(DownloadError::DownloadFailed {
                status: Some(status.as_u16()),
                reason: format!(
                    "the server answered {status} with a redirect that cannot be followed"
                ),
            });
        }
        if !status.is_success() {
            return Err(DownloadError::DownloadFailed {
                status: Some(status.as_u16()),
                reason: format!("the server answered {status}"),
            });
        }
        let announced = response.content_length();
        if let Some(n) = announced
            && n > limits.max_bytes
        {
            return Err(DownloadError::InputTooLarge {
                max_bytes: limits.max_bytes,
                content_length: Some(n),
            });
        }
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let final_url = response.url().clone();

        let mut body = response.bytes_stream();
        let mut bytes: u64 = 0;
        // One timer for the whole body. It is not re-armed per chunk (timer churn on the
        // hot path): when it fires, it is moved to `last data + read_timeout` unless the
        // body really was silent that long, so the timeout stays exact.
        let idle = tokio::time::sleep(limits.read_timeout);
        tokio::pin!(idle);
        let mut last_data = Instant::now();
        loop {
            let next = tokio::select! {
                biased;
                next = body.next() => next,
                _ = &mut idle => {
                    let due = last_data + limits.read_timeout;
                    if Instant::now() >= due {
                        return Err(DownloadError::DownloadTimeout {
                            phase: TimeoutPhase::Body,
                        });
                    }
                    idle.as_mut().reset(due);
                    continue;
                }
            };
            last_data = Instant::now();
            let chunk = match next {
                None => break,
                Some(Err(e)) => return Err(DownloadError::from_reqwest(&e, TimeoutPhase::Body)),
                Some(Ok(chunk)) => chunk,
            };
            let new_total = bytes + chunk.len() as u64;
            if new_total > limits.max_bytes {
                return Err(DownloadError::InputTooLarge {
                    max_bytes: limits.max_bytes,
                    content_length: None,
                });
            }
            sink.write_all(&chunk).await.map_err(DownloadError::Sink)?;
            bytes = new_total;
            progress(bytes, announced);
        }
        if let Some(n) = announced
            && n != bytes
        {
            return Err(DownloadError::DownloadFailed {
                status: None,
                reason: format!("the server announced {n} bytes but sent {bytes}"),
            });
        }
        sink.flush().await.map_err(DownloadError::Sink)?;
        Ok(DownloadInfo {
            bytes,
            content_type,
            final_url,
        })
    };
    match tokio::time::timeout_at(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(DownloadError::DownloadTimeout {
            phase: TimeoutPhase::Total,
        }),
    }
}

/// An [`AsyncWrite`] that writes every byte to two sinks, `a` first, then `b`.
///
/// A write completes once `a` has accepted the bytes; they are copied to a small
/// internal buffer and handed to `b` before the next write is accepted (so at most one
/// write's worth of bytes is buffered). `flush` and `shutdown` drain that buffer and
/// flush / shut down both sinks. An error from either sink fails the write.
#[derive(Debug)]
pub struct Tee<A, B> {
    a: A,
    b: B,
    pending: Vec<u8>,
    pos: usize,
}

impl<A, B> Tee<A, B> {
    /// Tees writes into `a` and `b`.
    pub fn new(a: A, b: B) -> Self {
        Self {
            a,
            b,
            pending: Vec::new(),
            pos: 0,
        }
    }

    /// Returns both sinks. Bytes not yet handed to `b` are lost: flush first.
    pub fn into_inner(self) -> (A, B) {
        (self.a, self.b)
    }

    /// Borrows both sinks.
    pub fn get_ref(&self) -> (&A, &B) {
        (&self.a, &self.b)
    }
}

impl<A: AsyncWrite + Unpin, B: AsyncWrite + Unpin> Tee<A, B> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.pending.len() {
            let n =
                std::task::ready!(Pin::new(&mut self.b).poll_write(cx, &self.pending[self.pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.pending.clear();
        self.pos = 0;
        Poll::Ready(Ok(()))
    }
}

impl<A: AsyncWrite + Unpin, B: AsyncWrite + Unpin> AsyncWrite for Tee<A, B> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.a).poll_write(cx, buf))?;
        this.pending.extend_from_slice(&buf[..n]);
        // Try to hand the bytes to `b` now; if it is not ready, the next call finishes it.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::task::ready!(Pin::new(&mut this.a).poll_flush(cx))?;
        Pin::new(&mut this.b).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_drain(cx))?;
        std::task::ready!(Pin::new(&mut this.a).poll_shutdown(cx))?;
        Pin::new(&mut this.b).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn tee_writes_both_through_a_small_pipe() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (wr, mut rd) = tokio::io::duplex(1024);
        let reader = tokio::spawn(async move {
            let mut v = Vec::new();
            rd.read_to_end(&mut v).await.unwrap();
            v
        });
        let mut tee = Tee::new(Vec::new(), wr);
        for chunk in data.chunks(7000) {
            tee.write_all(chunk).await.unwrap();
        }
        tee.shutdown().await.unwrap();
        let (a, _b) = tee.into_inner();
        assert_eq!(a, data);
        assert_eq!(reader.await.unwrap(), data);
    }

    #[tokio::test]
    async fn tee_propagates_errors() {
        let (wr, rd) = tokio::io::duplex(16);
        drop(rd);
        let mut tee = Tee::new(Vec::new(), wr);
        assert!(tee.write_all(&[1u8; 64]).await.is_err());
    }

    #[test]
    fn codes_and_transience() {
        let e = DownloadError::DownloadFailed {
            status: Some(404),
            reason: String::new(),
        };
        assert_eq!(e.code(), "download_failed");
        assert!(!e.is_transient());
        let e = DownloadError::DownloadFailed {
            status: Some(503),
            reason: String::new(),
        };
        assert!(e.is_transient());
        let e = DownloadError::InputTooLarge {
            max_bytes: 1,
            content_length: Some(2),
        };
        assert_eq!(e.code(), "input_too_large");
        assert!(!e.is_transient());
        let e = DownloadError::DownloadTimeout {
            phase: TimeoutPhase::Body,
        };
        assert_eq!(e.code(), "download_timeout");
        assert!(e.to_string().contains("stopped sending"));
        let e = DownloadError::from_guard(GuardError::UserinfoNotAllowed);
        assert_eq!(e.code(), "url_not_allowed");
        let e = DownloadError::from_guard(GuardError::TooManyRedirects { max: 2 });
        assert!(matches!(e, DownloadError::DownloadFailed { .. }));
    }
}
