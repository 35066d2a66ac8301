//! The S3-compatible artifact backend (`artifacts.backend = "s3"`), on the `object_store`
//! crate's Amazon S3 client (SigV4 signing, retries with backoff, multipart uploads,
//! presigned URLs).
//!
//! - **Streaming both ways.** A put reads its source one part at a time
//!   (`artifacts.s3.part_size_bytes`) and uploads up to `upload_concurrency` parts at once,
//!   so memory stays near `(upload_concurrency + 1) * part_size_bytes` whatever the size;
//!   objects smaller than one part go up in one request. Reads stream the response body.
//! - **Nothing half written.** An upload that fails or is dropped half way (the caller's
//!   future is cancelled) is aborted, so its parts do not linger as an incomplete
//!   multipart upload; S3 makes an object visible only when its upload completes.
//! - **Ranged reads** are S3 `Range` requests.
//! - **Retention.** [`ArtifactStore::sweep`] deletes objects older than the TTL (the gateway
//!   runs it every `sweep_interval_s`); the bucket's lifecycle rules can do the same
//!   instead (docs/storage.md).
//! - **Credentials** are handed to the client and never formatted into an error or log
//!   line.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use tokio::io::AsyncRead;

use super::{
    ArtifactError, ArtifactMeta, ArtifactReader, ArtifactStore, Counted, METRICS, Presign, fill,
};
use crate::config::S3Config;

/// Smallest part S3 accepts (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// Largest part S3 accepts.
const MAX_PART_SIZE: u64 = 5 << 30;

/// Artifacts in an S3-compatible bucket, under `<prefix>/<key>`.
#[derive(Clone)]
pub struct S3Artifacts {
    store: Arc<AmazonS3>,
    prefix: String,
    part_size: usize,
    concurrency: usize,
    presign_expiry: Duration,
}

impl std::fmt::Debug for S3Artifacts {
    // The client's own form would show its credential provider.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Artifacts")
            .field("prefix", &self.prefix)
            .field("part_size", &self.part_size)
            .finish_non_exhaustive()
    }
}

/// A credential from the config key, else its file, else the standard variable.
fn credential(
    value: &str,
    file: Option<&std::path::Path>,
    env: &str,
) -> anyhow::Result<Option<String>> {
    if !value.is_empty() {
        return Ok(Some(value.to_owned()));
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
        let text = text.trim();
        anyhow::ensure!(!text.is_empty(), "{} is empty", f.display());
        return Ok(Some(text.to_owned()));
    }
    Ok(std::env::var(env).ok().filter(|v| !v.is_empty()))
}

/// The typed error of a failed request. Its message (which can reach a task record)
/// names the operation, the key and what the server answered (status and S3 error code),
/// never the endpoint or the response body; the whole error goes to the log.
fn s3_error(what: &str, key: &str, e: object_store::Error) -> ArtifactError {
    if let object_store::Error::NotFound { .. } = e {
        return ArtifactError::NotFound(key.to_owned());
    }
    tracing::warn!(error = %e, key, "S3 {what} failed");
    ArtifactError::Backend(format!("S3 {what} {key}: {}", summary(&e.to_string())))
}

/// What an S3 client error says, without URLs or bodies: "the server answered 403
/// (SignatureDoesNotMatch)", "the server could not be reached", or the error's kind.
fn summary(text: &str) -> String {
    let status = ["Status: ", "status code: ", "status "]
        .iter()
        .find_map(|p| {
            let at = text.find(p)? + p.len();
            let code: String = text[at..].chars().take(3).collect();
            (code.len() == 3 && code.chars().all(|c| c.is_ascii_digit())).then_some(code)
        });
    let s3_code = text.find("<Code>").and_then(|i| {
        let rest = &text[i + 6..];
        let code = &rest[..rest.find('<')?];
        (!code.is_empty() && code.chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| code.to_owned())
    });
    match (status, s3_code) {
        (Some(st), Some(c)) => format!("the server answered {st} ({c})"),
        (Some(st), None) => format!("the server answered {st}"),
        (None, Some(c)) => format!("the server answered {c}"),
        (None, None) if text.contains("error sending request") || text.contains("connect") => {
            "the server could not be reached".into()
        }
        (None, None) if text.contains("timed out") || text.contains("Timeout") => {
            "the request timed out".into()
        }
        (None, None) => text
            .split(':')
            .next()
            .unwrap_or("request failed")
            .trim()
            .to_owned(),
    }
}

impl S3Artifacts {
    /// The client of `artifacts.s3.*`.
    ///
    /// # Errors
    /// No bucket, a part size outside S3's limits, an unreadable credential file or an
    /// endpoint the client refuses. The message never holds a credential.
    pub fn from_config(cfg: &S3Config) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !cfg.bucket.is_empty(),
            "artifacts.s3.bucket is required with artifacts.backend = \"s3\""
        );
        anyhow::ensure!(
            (MIN_PART_SIZE..=MAX_PART_SIZE).contains(&cfg.part_size_bytes),
            "artifacts.s3.part_size_bytes must be within 5 MiB and 5 GiB, not {}",
            cfg.part_size_bytes
        );
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_retry(RetryConfig {
                max_retries: cfg.max_retries,
                retry_timeout: Duration::from_secs(cfg.retry_timeout_s.max(1)),
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(Duration::from_secs(cfg.request_timeout_s.max(1)))
                    .with_connect_timeout(Duration::from_secs(10)),
            );
        if !cfg.endpoint.is_empty() {
            let url = url::Url::parse(&cfg.endpoint)
                .map_err(|e| anyhow::anyhow!("artifacts.s3.endpoint is not a URL: {e}"))?;
            anyhow::ensure!(
                url.username().is_empty() && url.password().is_none(),
                "artifacts.s3.endpoint must not hold credentials; use access_key_id/secret_access_key"
            );
            b = b
                .with_endpoint(cfg.endpoint.trim_end_matches('/'))
                .with_allow_http(url.scheme() == "http");
        }
        let id = credential(
            &cfg.access_key_id,
            cfg.access_key_id_file.as_deref(),
            "AWS_ACCESS_KEY_ID",
        )?;
        let secret = credential(
            &cfg.secret_access_key,
            cfg.secret_access_key_file.as_deref(),
            "AWS_SECRET_ACCESS_KEY",
        )?;
        let token = credential(
            &cfg.session_token,
            cfg.session_token_file.as_deref(),
            "AWS_SESSION_TOKEN",
        )?;
        match (id, secret) {
            (Some(id), Some(secret)) => {
                b = b.with_access_key_id(id).with_secret_access_key(secret);
            }
            (None, None) => {} // The client's own chain: instance or web-identity roles.
            _ => anyhow::bail!(
                "artifacts.s3: an access key id needs its secret access key and the other way round"
            ),
        }
        if let Some(t) = token {
            b = b.with_token(t);
        }
        let store = b
            .build()
            .map_err(|e| anyhow::anyhow!("artifacts.s3: {e}"))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: cfg.prefix.trim_matches('/').to_owned(),
            part_size: cfg.part_size_bytes as usize,
            concurrency: cfg.upload_concurrency.max(1),
            presign_expiry: Duration::from_secs(cfg.presign_expiry_s.max(1)),
        })
    }

    fn path(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    /// The artifact key of an object path under the prefix.
    fn key_of(&self, path: &ObjectPath) -> String {
        let p = path.as_ref();
        if self.prefix.is_empty() {
            p.to_owned()
        } else {
            p.strip_prefix(&self.prefix)
                .map(|k| k.trim_start_matches('/'))
                .unwrap_or(p)
                .to_owned()
        }
    }

    /// Delete every object under the prefix last modified more than `older_than` ago;
    /// returns how many were deleted. Incomplete multipart uploads are left to the
    /// bucket's `AbortIncompleteMultipartUpload` rule (docs/storage.md): the service
    /// aborts its own failed uploads, so only a process killed mid-upload leaves one.
    ///
    /// # Errors
    /// Listing or deleting failed.
    async fn sweep_older(&self, older_than: Duration) -> Result<u64, ArtifactError> {
        let cutoff = chrono_cutoff(older_than);
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let mut listing = self.store.list(prefix.as_ref());
        let mut deleted = 0;
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(|e| s3_error("list", &self.prefix, e))?;
            if meta.last_modified.timestamp() < cutoff {
                match self.store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => return Err(s3_error("delete", meta.location.as_ref(), e)),
                }
            }
        }
        Ok(deleted)
    }

    /// Keys (without the prefix) of every object under the prefix, for tests and tools.
    ///
    /// # Errors
    /// Listing failed.
    pub async fn keys(&self) -> Result<Vec<String>, ArtifactError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        self.store
            .list(prefix.as_ref())
            .map_ok(|m| self.key_of(&m.location))
            .try_collect()
            .await
            .map_err(|e| s3_error("list", &self.prefix, e))
    }

    /// Multipart upload of `first` and the rest of `reader`.
    async fn put_parts(
        &self,
        path: &ObjectPath,
        key: &str,
        first: BytesMut,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<(u64, Option<String>), ArtifactError> {
        let upload = self
            .store
            .put_multipart(path)
            .await
            .map_err(|e| s3_error("multipart upload of", key, e))?;
        let mut guard = AbortOnDrop(Some(WriteMultipart::new_with_chunk_size(
            upload,
            self.part_size,
        )));
        let w = guard.0.as_mut().expect("set");
        let mut size = first.len() as u64;
        w.put(first.freeze());
        let outcome: Result<(), ArtifactError> = async {
            loop {
                w.wait_for_capacity(self.concurrency)
                    .await
                    .map_err(|e| s3_error("part upload of", key, e))?;
                let mut buf = BytesMut::with_capacity(self.part_size);
                fill(reader, &mut buf, self.part_size).await?;
                if buf.is_empty() {
                    return Ok(());
                }
                size += buf.len() as u64;
                w.put(buf.freeze());
            }
        }
        .await;
        let w = guard.0.take().expect("set");
        match outcome {
            Ok(()) => {
                let done = w
                    .finish()
                    .await
                    .map_err(|e| s3_error("completing upload of", key, e))?;
                Ok((size, done.e_tag))
            }
            Err(e) => {
                if let Err(abort) = w.abort().await {
                    tracing::warn!(key, error = %abort, "aborting a failed upload failed");
                }
                Err(e)
            }
        }
    }
}

/// Aborts a multipart upload that is dropped unfinished (its put was cancelled).
struct AbortOnDrop(Option<WriteMultipart>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(w) = self.0.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error = %e, "aborting an abandoned upload failed");
                }
            });
        }
    }
}

/// Unix seconds of now minus `age`.
fn chrono_cutoff(age: Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(age).as_secs() as i64
}

fn etag(e: Option<String>) -> Option<String> {
    e.map(|t| t.trim_matches('"').to_owned())
}

#[async_trait]
impl ArtifactStore for S3Artifacts {
    async fn put(
        &self,
        key: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ArtifactMeta, ArtifactError> {
        let path = self.path(key);
        let mut first = BytesMut::with_capacity(self.part_size);
        let failed = |e: ArtifactError| {
            METRICS.put_failures.inc();
            e
        };
        fill(reader, &mut first, self.part_size)
            .await
            .map_err(|e| failed(e.into()))?;
        let (size, tag) = if first.len() < self.part_size {
            let size = first.len() as u64;
            let done = self
                .store
                .put(&path, PutPayload::from(first.freeze()))
                .await
                .map_err(|e| failed(s3_error("upload of", key, e)))?;
            (size, done.e_tag)
        } else {
            self.put_parts(&path, key, first, reader)
                .await
                .map_err(failed)?
        };
        METRICS.bytes_written.inc_by(size);
        Ok(ArtifactMeta {
            key: key.to_owned(),
            size,
            digest: etag(tag),
            modified: None,
        })
    }

    async fn get(&self, key: &str) -> Result<ArtifactReader, ArtifactError> {
        let res = self
            .store
            .get(&self.path(key))
            .await
            .map_err(|e| s3_error("read of", key, e))?;
        let body = res.into_stream().map_err(std::io::Error::other);
        Ok(Box::pin(Counted {
            inner: tokio_util::io::StreamReader::new(body),
        }))
    }

    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<ArtifactReader, ArtifactError> {
        let Some(size) = self.info(key).await?.map(|m| m.size) else {
            return Err(ArtifactError::NotFound(key.to_owned()));
        };
        let end = start.saturating_add(len).min(size);
        if start >= end {
            return Ok(Box::pin(tokio::io::empty()));
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(start..end)),
            ..GetOptions::default()
        };
        let res = self
            .store
            .get_opts(&self.path(key), opts)
            .await
            .map_err(|e| s3_error("ranged read of", key, e))?;
        let body = res.into_stream().map_err(std::io::Error::other);
        Ok(Box::pin(Counted {
            inner: tokio_util::io::StreamReader::new(body),
        }))
    }

    async fn info(&self, key: &str) -> Result<Option<ArtifactMeta>, ArtifactError> {
        match self.store.head(&self.path(key)).await {
            Ok(m) => Ok(Some(ArtifactMeta {
                key: key.to_owned(),
                size: m.size,
                digest: etag(m.e_tag),
                modified: time::OffsetDateTime::from_unix_timestamp(m.last_modified.timestamp())
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    }),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_error("metadata of", key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error("delete of", key, e)),
        }
    }

    async fn presign(
        &self,
        what: Presign,
        key: &str,
    ) -> Result<Option<(url::Url, Duration)>, ArtifactError> {
        let method = match what {
            Presign::Get => object_store::signer::Method::GET,
            Presign::Put => object_store::signer::Method::PUT,
        };
        let url = self
            .store
            .signed_url(method, &self.path(key), self.presign_expiry)
            .await
            .map_err(|e| s3_error("presign", key, e))?;
        Ok(Some((url, self.presign_expiry)))
    }

    async fn sweep(&self, older_than: Duration) -> Result<u64, ArtifactError> {
        self.sweep_older(older_than).await
    }

    fn backend(&self) -> &'static str {
        "s3"
    }
}

#[cfg(test)]
mod tests {
    use super::summary;

    #[test]
    fn summaries_keep_the_answer_and_drop_urls_and_bodies() {
        let denied = "Generic S3 error: Error performing PUT http://10.0.0.7:9000/media/t/a in 3ms - Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>x</Message></Error>";
        assert_eq!(
            summary(denied),
            "the server answered 403 (SignatureDoesNotMatch)"
        );
        let refused = "Generic S3 error: Error performing GET http://127.0.0.1:1/b/k in 1ms, after 3 retries - HTTP error: error sending request";
        assert_eq!(summary(refused), "the server could not be reached");
        for s in [summary(denied), summary(refused)] {
            assert!(
                !s.contains("http") && !s.contains("10.0.0.7") && !s.contains("<"),
                "{s}"
            );
        }
    }
}
