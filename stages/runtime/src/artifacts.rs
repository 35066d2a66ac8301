//! The artifact store: inputs, intermediates and outputs, keyed `<task_id>/<name>`.
//! Media is streamed in and out; nothing is buffered whole.
//!
//! The JetStream backend ([`NatsArtifacts`]) writes objects itself, in the object store's
//! own layout (chunks on `$O.<bucket>.C.<nuid>`, the object description on
//! `$O.<bucket>.M.<name>`), so any object-store client reads them, with three additions:
//!
//! - **No orphan chunks.** A put that fails or is abandoned half way (the source errors,
//!   the store is full, the caller drops the future, e.g. an upload whose connection was
//!   reset) purges the chunks it already published. Without this they would stay in the
//!   stream, invisible, until the retention TTL.
//! - **Ranged reads.** Every chunk but the last holds exactly [`CHUNK_SIZE`] bytes and the
//!   object description lists the stream sequence of every chunk (run-length encoded), so
//!   [`ArtifactStore::get_range`] fetches only the chunks that hold the range, by
//!   sequence, instead of reading from byte 0.
//! - **Storage accounting.** Bytes written and read, failed puts and purged chunks are
//!   counted, and [`ArtifactStore::usage`] reports the bucket's size against its cap
//!   (`artifacts.max_bytes`); the same figures are exported as metrics.
//!
//! Headroom for task records and work messages: media lives in its own stream whose cap
//! (`artifacts.max_bytes`, discard-new) is below the server's file store, so a full media
//! store refuses new media (puts fail with [`ArtifactError::Full`]) while the task-record
//! bucket and the work stream, separate streams, keep writing into the remaining space.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::object_store::{self, ObjectStore};
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use lipsync_schemas::{InputSource, Status, TaskRecord, names};
use prometheus::{IntCounter, IntGauge};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

/// Bytes per chunk of objects written by [`NatsArtifacts`] (the last chunk may be
/// shorter). A ranged read fetches at most the chunks overlapping the range.
pub const CHUNK_SIZE: usize = 128 * 1024;
/// Chunk publishes awaiting their acknowledgement at once during a put.
const PUTS_IN_FLIGHT: usize = 16;
/// Chunks fetched at once by a ranged read.
const GETS_IN_FLIGHT: usize = 4;
/// Object metadata: the stream sequences of the chunks, `first+count` runs.
const META_SEQS: &str = "lipsync-chunk-seqs";
/// Object metadata: the chunk size the object was written with.
const META_CHUNK: &str = "lipsync-chunk-size";
/// How long [`ArtifactStore::usage`] answers from its last look at the stream.
const USAGE_CACHE: Duration = Duration::from_secs(1);
/// Default of `artifacts.admission_reserve_bytes`.
const DEFAULT_RESERVE: u64 = 256 << 20;

/// Errors of the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// No artifact under this key.
    #[error("artifact {0} not found")]
    NotFound(String),
    /// The store reached its size cap (`artifacts.max_bytes`); nothing was kept.
    #[error("artifact store full: {0}")]
    Full(String),
    /// The backend failed; worth retrying.
    #[error("artifact store: {0}")]
    Backend(String),
    /// Reading the source or writing the destination failed.
    #[error("artifact i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Facts about a stored artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactMeta {
    /// Key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Content digest (usable as an ETag), if the backend keeps one.
    pub digest: Option<String>,
    /// Last modification, RFC 3339.
    pub modified: Option<String>,
}

/// How full the store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUsage {
    /// Bytes stored now (chunks and descriptions).
    pub bytes: u64,
    /// The cap, if any.
    pub max_bytes: Option<u64>,
    /// Bytes kept free under the cap for tasks already accepted
    /// (`artifacts.admission_reserve_bytes`).
    pub reserve: u64,
}

impl StoreUsage {
    /// Whether fewer than `reserve` bytes are left under the cap.
    pub fn is_full(&self, reserve: u64) -> bool {
        self.max_bytes
            .is_some_and(|m| self.bytes.saturating_add(reserve) >= m)
    }

    /// Whether new tasks are refused: less than the admission reserve is left.
    pub fn refuses_new_tasks(&self) -> bool {
        self.is_full(self.reserve)
    }
}

mod s3;
pub use s3::{MIN_PART_SIZE, S3Artifacts};

/// What a presigned URL lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presign {
    /// Download the object.
    Get,
    /// Upload (replace) the object with one `PUT`.
    Put,
}

/// The artifact store `cfg.backend` names: the JetStream object store of `topo`, or the
/// S3-compatible bucket of `cfg.s3`.
///
/// # Errors
/// An invalid `artifacts.s3` section (see [`S3Artifacts::from_config`]).
pub fn open(
    cfg: &crate::config::ArtifactsConfig,
    topo: &crate::nats::Topology,
) -> anyhow::Result<Arc<dyn ArtifactStore>> {
    Ok(match cfg.backend {
        crate::config::ArtifactBackend::Nats => Arc::new(
            NatsArtifacts::from_topology(topo).with_admission_reserve(cfg.admission_reserve_bytes),
        ),
        crate::config::ArtifactBackend::S3 => Arc::new(S3Artifacts::from_config(&cfg.s3)?),
    })
}

/// A boxed streaming reader.
pub type ArtifactReader = Pin<Box<dyn AsyncRead + Send>>;

/// Where artifacts live. The JetStream object store is the default backend; an
/// S3-compatible one can be added behind the same trait.
#[async_trait]
pub trait ArtifactStore: Send + Sync + 'static {
    /// Store everything `reader` yields under `key`, replacing any previous artifact.
    /// On error nothing of the new artifact is left in the store.
    async fn put(
        &self,
        key: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ArtifactMeta, ArtifactError>;
    /// Stream an artifact.
    async fn get(&self, key: &str) -> Result<ArtifactReader, ArtifactError>;
    /// Metadata of an artifact, `None` if absent.
    async fn info(&self, key: &str) -> Result<Option<ArtifactMeta>, ArtifactError>;
    /// Delete an artifact; deleting an absent one is not an error.
    async fn delete(&self, key: &str) -> Result<(), ArtifactError>;

    /// Stream `len` bytes of an artifact from byte `start` (fewer if it ends first).
    /// The default reads and drops the bytes before `start`; backends that can seek
    /// override it.
    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<ArtifactReader, ArtifactError> {
        let mut r = self.get(key).await?;
        tokio::io::copy(&mut (&mut r).take(start), &mut tokio::io::sink()).await?;
        Ok(Box::pin(r.take(len)))
    }

    /// How full the store is; `None` when the backend cannot tell.
    async fn usage(&self) -> Result<Option<StoreUsage>, ArtifactError> {
        Ok(None)
    }

    /// A presigned URL for one request on `key` and how long it stays valid; `None`
    /// where the backend has no such links (the JetStream object store).
    async fn presign(
        &self,
        _what: Presign,
        _key: &str,
    ) -> Result<Option<(url::Url, Duration)>, ArtifactError> {
        Ok(None)
    }

    /// Delete artifacts older than `older_than`; returns how many. Backends whose
    /// storage expires by itself (the object store's stream age limit) do nothing.
    async fn sweep(&self, _older_than: Duration) -> Result<u64, ArtifactError> {
        Ok(0)
    }

    /// The backend's name as in `artifacts.backend`.
    fn backend(&self) -> &'static str {
        "nats"
    }

    /// Store a local file.
    async fn put_file(&self, key: &str, path: &Path) -> Result<ArtifactMeta, ArtifactError> {
        let mut f = tokio::fs::File::open(path).await?;
        self.put(key, &mut f).await
    }

    /// Write an artifact into a local file; returns its size.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<u64, ArtifactError> {
        let mut r = self.get(key).await?;
        let mut f = tokio::fs::File::create(path).await?;
        let n = tokio::io::copy(&mut r, &mut f).await?;
        f.flush().await?;
        f.sync_all().await?;
        Ok(n)
    }
}

/// Process-wide storage metrics (default registry, so every binary's `/metrics` has them).
struct StoreMetrics {
    bytes_read: IntCounter,
    bytes_written: IntCounter,
    put_failures: IntCounter,
    chunks_purged: IntCounter,
    store_bytes: IntGauge,
    store_max_bytes: IntGauge,
}

static METRICS: LazyLock<StoreMetrics> = LazyLock::new(|| {
    let counter = |name: &str, help: &str| {
        let c = IntCounter::new(name, help).expect("valid metric");
        let _ = prometheus::register(Box::new(c.clone()));
        c
    };
    let gauge = |name: &str, help: &str| {
        let g = IntGauge::new(name, help).expect("valid metric");
        let _ = prometheus::register(Box::new(g.clone()));
        g
    };
    StoreMetrics {
        bytes_read: counter(
            "lipsync_artifact_read_bytes_total",
            "Bytes read from the artifact store by this process",
        ),
        bytes_written: counter(
            "lipsync_artifact_written_bytes_total",
            "Bytes of artifacts stored by this process",
        ),
        put_failures: counter(
            "lipsync_artifact_put_failures_total",
            "Artifact puts that failed or were abandoned (their chunks were purged)",
        ),
        chunks_purged: counter(
            "lipsync_artifact_orphan_chunks_purged_total",
            "Chunks of failed or abandoned puts purged from the artifact store",
        ),
        store_bytes: gauge(
            "lipsync_artifact_store_bytes",
            "Bytes held by the artifact store (last look of this process)",
        ),
        store_max_bytes: gauge(
            "lipsync_artifact_store_max_bytes",
            "Size cap of the artifact store (artifacts.max_bytes), -1 for none",
        ),
    }
});

/// Bytes this process has read from the artifact store so far (all keys, all readers).
/// Also exported as `lipsync_artifact_read_bytes_total`.
pub fn bytes_read() -> u64 {
    METRICS.bytes_read.get()
}

/// Bytes this process has stored so far (`lipsync_artifact_written_bytes_total`).
pub fn bytes_written() -> u64 {
    METRICS.bytes_written.get()
}

/// JetStream Object Store backend.
#[derive(Clone)]
pub struct NatsArtifacts {
    store: ObjectStore,
    direct: Option<Direct>,
}

/// What the backend needs beyond the object-store handle to write and read chunks.
#[derive(Clone)]
struct Direct {
    js: jetstream::Context,
    bucket: String,
    stream: Arc<tokio::sync::OnceCell<stream::Stream>>,
    usage: Arc<Mutex<Option<(Instant, StoreUsage)>>>,
    reserve: u64,
}

impl NatsArtifacts {
    /// Wrap the `lipsync_artifacts` bucket with only its object-store handle: puts go
    /// through the client library (a failed put cannot be cleaned up), ranged reads read
    /// from byte 0. Prefer [`NatsArtifacts::with_jetstream`].
    pub fn new(store: ObjectStore) -> Self {
        Self {
            store,
            direct: None,
        }
    }

    /// Wrap the `lipsync_artifacts` bucket of the JetStream context `js`: puts that fail
    /// leave nothing behind, ranged reads fetch only the chunks they need, and
    /// [`ArtifactStore::usage`] works.
    pub fn with_jetstream(js: jetstream::Context, store: ObjectStore) -> Self {
        Self {
            store,
            direct: Some(Direct {
                js,
                bucket: names::ARTIFACTS_BUCKET.to_owned(),
                stream: Arc::new(tokio::sync::OnceCell::new()),
                usage: Arc::new(Mutex::new(None)),
                reserve: DEFAULT_RESERVE,
            }),
        }
    }

    /// Sets the bytes [`StoreUsage::refuses_new_tasks`] keeps free under the cap.
    pub fn with_admission_reserve(mut self, bytes: u64) -> Self {
        if let Some(d) = &mut self.direct {
            d.reserve = bytes;
        }
        self
    }

    /// The backend of a bootstrapped topology.
    pub fn from_topology(topo: &crate::nats::Topology) -> Self {
        Self::with_jetstream(topo.js.clone(), topo.artifacts.clone())
    }
}

fn meta(info: &object_store::ObjectInfo) -> ArtifactMeta {
    ArtifactMeta {
        key: info.name.clone(),
        size: info.size as u64,
        digest: info.digest.clone(),
        modified: info.modified.and_then(|m| {
            m.format(&time::format_description::well_known::Rfc3339)
                .ok()
        }),
    }
}

/// Base64 with the URL-safe alphabet and padding: how the object store names the
/// subject of an object's description.
fn encode_name(name: &str) -> String {
    encode_base64url_bytes(name.as_bytes())
}

/// `first+count` runs of ascending sequences.
fn encode_seqs(seqs: &[u64]) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in seqs {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == s => *count += 1,
            _ => runs.push((s, 1)),
        }
    }
    runs.iter()
        .map(|(f, c)| format!("{f}+{c}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn decode_seqs(s: &str) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    if s.is_empty() {
        return Some(out);
    }
    for run in s.split(',') {
        let (f, c) = run.split_once('+')?;
        let (f, c): (u64, u64) = (f.parse().ok()?, c.parse().ok()?);
        out.extend(f..f.checked_add(c)?);
    }
    Some(out)
}

fn is_full_error(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("maximum bytes") || m.contains("insufficient") || m.contains("storage")
}

fn backend(what: &str, e: impl std::fmt::Display) -> ArtifactError {
    let msg = format!("{what}: {e}");
    if is_full_error(&msg) {
        ArtifactError::Full(msg)
    } else {
        ArtifactError::Backend(msg)
    }
}

/// The acknowledgement of one chunk publish.
type AckFuture = Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    async_nats::jetstream::publish::PublishAck,
                    async_nats::jetstream::context::PublishError,
                >,
            > + Send,
    >,
>;

/// Purges the chunks of an unfinished put if it is dropped or fails before the object
/// description is written.
struct PurgeGuard {
    stream: stream::Stream,
    subject: String,
    chunks: Arc<std::sync::atomic::AtomicU64>,
    armed: AtomicBool,
}

impl PurgeGuard {
    async fn purge_now(&self) {
        self.armed.store(false, Ordering::Relaxed);
        purge_chunks(&self.stream, &self.subject, &self.chunks).await;
    }
}

async fn purge_chunks(
    stream: &stream::Stream,
    subject: &str,
    chunks: &std::sync::atomic::AtomicU64,
) {
    METRICS.put_failures.inc();
    match stream.purge().filter(subject).await {
        Ok(r) => {
            METRICS.chunks_purged.inc_by(r.purged);
            chunks.store(0, Ordering::Relaxed);
        }
        Err(e) => tracing::warn!(error = %e, "could not purge the chunks of a failed put"),
    }
}

impl Drop for PurgeGuard {
    fn drop(&mut self) {
        if self.armed.load(Ordering::Relaxed)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let stream = self.stream.clone();
            let subject = std::mem::take(&mut self.subject);
            let chunks = self.chunks.clone();
            rt.spawn(async move {
                purge_chunks(&stream, &subject, &chunks).await;
                // Chunks still in flight when the put was dropped may land after the
                // first purge.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(e) = stream.purge().filter(subject.as_str()).await {
                    tracing::warn!(error = %e, "could not purge the chunks of a dropped put");
                }
            });
        }
    }
}

/// Reads until `buf` holds `want` bytes or the source ends.
async fn fill(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    buf: &mut BytesMut,
    want: usize,
) -> std::io::Result<()> {
    while buf.len() < want {
        let before = buf.len();
        let mut limited = (&mut *reader).take((want - before) as u64);
        if limited.read_buf(buf).await? == 0 {
            break;
        }
    }
    Ok(())
}

/// Counts the bytes a reader yields into the process-wide counter.
struct Counted<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        METRICS
            .bytes_read
            .inc_by((buf.filled().len() - before) as u64);
        r
    }
}

impl Direct {
    async fn stream(&self) -> Result<&stream::Stream, ArtifactError> {
        self.stream
            .get_or_try_init(|| async {
                self.js
                    .get_stream(format!("OBJ_{}", self.bucket))
                    .await
                    .map_err(|e| backend("object store stream", e))
            })
            .await
    }

    async fn put(
        &self,
        store: &ObjectStore,
        key: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ArtifactMeta, ArtifactError> {
        let stream = self.stream().await?.clone();
        let previous = match store.info(key).await {
            Ok(i) if !i.deleted => Some(i),
            _ => None,
        };
        let nuid = uuid::Uuid::new_v4().simple().to_string();
        let subject = format!("$O.{}.C.{nuid}", self.bucket);
        let guard = PurgeGuard {
            stream: stream.clone(),
            subject: subject.clone(),
            chunks: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            armed: AtomicBool::new(true),
        };
        let written = self.write(&guard, key, &nuid, reader).await;
        let info = match written {
            Ok(info) => {
                guard.armed.store(false, Ordering::Relaxed);
                info
            }
            Err(e) => {
                guard.purge_now().await;
                return Err(e);
            }
        };
        if let Some(old) = previous
            && old.nuid != nuid
        {
            let old_subject = format!("$O.{}.C.{}", self.bucket, old.nuid);
            if let Err(e) = stream.purge().filter(old_subject).await {
                tracing::warn!(key, error = %e, "could not purge the replaced artifact's chunks");
            }
        }
        self.note_change(info.size as i64);
        Ok(meta(&info))
    }

    async fn write(
        &self,
        guard: &PurgeGuard,
        key: &str,
        nuid: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<object_store::ObjectInfo, ArtifactError> {
        let mut acks = futures::stream::FuturesOrdered::new();
        let mut seqs = Vec::new();
        let mut size = 0u64;
        let mut sha = Sha256::new();
        let sent = self
            .send_chunks(guard, reader, &mut acks, &mut seqs, &mut size, &mut sha)
            .await;
        if let Err(e) = sent {
            // Every chunk already sent must be stored or refused before the caller purges,
            // or one landing after the purge would stay behind.
            while acks.next().await.is_some() {}
            return Err(e);
        }
        let digest = sha.finalize();
        let mut metadata = std::collections::HashMap::new();
        metadata.insert(META_SEQS.to_owned(), encode_seqs(&seqs));
        metadata.insert(META_CHUNK.to_owned(), CHUNK_SIZE.to_string());
        let info = object_store::ObjectInfo {
            name: key.to_owned(),
            description: None,
            metadata,
            headers: None,
            options: Some(object_store::ObjectOptions {
                link: None,
                max_chunk_size: Some(CHUNK_SIZE),
            }),
            bucket: self.bucket.clone(),
            nuid: nuid.to_owned(),
            size: size as usize,
            chunks: seqs.len(),
            modified: Some(time::OffsetDateTime::now_utc()),
            digest: Some(format!("SHA-256={}", encode_base64url_bytes(&digest))),
            deleted: false,
        };
        let body = serde_json::to_vec(&info).map_err(|e| backend("object description", e))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Rollup", "sub");
        self.js
            .publish_with_headers(
                format!("$O.{}.M.{}", self.bucket, encode_name(key)),
                headers,
                body.into(),
            )
            .await
            .map_err(|e| backend("object description publish", e))?
            .await
            .map_err(|e| backend("object description ack", e))?;
        METRICS.bytes_written.inc_by(size);
        Ok(info)
    }

    /// Publishes the chunks of `reader`, keeping up to [`PUTS_IN_FLIGHT`] unacknowledged.
    async fn send_chunks(
        &self,
        guard: &PurgeGuard,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        acks: &mut futures::stream::FuturesOrdered<AckFuture>,
        seqs: &mut Vec<u64>,
        size: &mut u64,
        sha: &mut Sha256,
    ) -> Result<(), ArtifactError> {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
            fill(reader, &mut buf, CHUNK_SIZE).await?;
            if buf.is_empty() {
                break;
            }
            let payload: Bytes = buf.freeze();
            sha.update(&payload);
            *size += payload.len() as u64;
            let last = payload.len() < CHUNK_SIZE;
            let ack = self
                .js
                .publish(guard.subject.clone(), payload)
                .await
                .map_err(|e| backend("chunk publish", e))?;
            guard.chunks.fetch_add(1, Ordering::Relaxed);
            acks.push_back(std::future::IntoFuture::into_future(ack));
            while acks.len() >= PUTS_IN_FLIGHT {
                let ack = acks.next().await.expect("non-empty");
                seqs.push(ack.map_err(|e| backend("chunk ack", e))?.sequence);
            }
            if last {
                break;
            }
        }
        while let Some(ack) = acks.next().await {
            seqs.push(ack.map_err(|e| backend("chunk ack", e))?.sequence);
        }
        Ok(())
    }

    async fn get_range(
        &self,
        store: &ObjectStore,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<Option<ArtifactReader>, ArtifactError> {
        let info = match store.info(key).await {
            Ok(i) if !i.deleted => i,
            Ok(_) => return Err(ArtifactError::NotFound(key.to_owned())),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => {
                return Err(ArtifactError::NotFound(key.to_owned()));
            }
            Err(e) => return Err(backend("object info", e)),
        };
        let chunk = info
            .metadata
            .get(META_CHUNK)
            .and_then(|c| c.parse::<u64>().ok())
            .filter(|c| *c > 0);
        let seqs = info.metadata.get(META_SEQS).and_then(|s| decode_seqs(s));
        let (Some(chunk), Some(seqs)) = (chunk, seqs) else {
            return Ok(None); // Not written by this backend: no chunk index.
        };
        if seqs.len() != info.chunks {
            return Ok(None);
        }
        let size = info.size as u64;
        let end = start.saturating_add(len).min(size);
        if start >= end {
            return Ok(Some(Box::pin(tokio::io::empty())));
        }
        let first = (start / chunk) as usize;
        let last = ((end - 1) / chunk) as usize;
        let stream = self.stream().await?.clone();
        let subject = format!("$O.{}.C.{}", self.bucket, info.nuid);
        let wanted: Vec<(usize, u64)> = (first..=last).map(|i| (i, seqs[i])).collect();
        let body = futures::stream::iter(wanted)
            .map(move |(i, seq)| {
                let stream = stream.clone();
                let subject = subject.clone();
                async move {
                    let m = stream
                        .direct_get(seq)
                        .await
                        .map_err(|e| std::io::Error::other(format!("chunk {i}: {e}")))?;
                    METRICS.bytes_read.inc_by(m.payload.len() as u64);
                    if m.subject.as_str() != subject {
                        return Err(std::io::Error::other(format!(
                            "chunk {i} of the artifact is gone"
                        )));
                    }
                    let from = i as u64 * chunk;
                    let lo = start.saturating_sub(from) as usize;
                    let hi = ((end - from) as usize).min(m.payload.len());
                    if lo > hi {
                        return Err(std::io::Error::other(format!(
                            "chunk {i} of the artifact is short"
                        )));
                    }
                    Ok::<Bytes, std::io::Error>(m.payload.slice(lo..hi))
                }
            })
            .buffered(GETS_IN_FLIGHT)
            .into_stream();
        Ok(Some(Box::pin(tokio_util::io::StreamReader::new(body))))
    }

    async fn delete(&self, store: &ObjectStore, key: &str) -> Result<(), ArtifactError> {
        let info = match store.info(key).await {
            Ok(i) => i,
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(backend("object info", e)),
        };
        let stream = self.stream().await?;
        if !info.nuid.is_empty() {
            stream
                .purge()
                .filter(format!("$O.{}.C.{}", self.bucket, info.nuid))
                .await
                .map_err(|e| backend("purge chunks", e))?;
        }
        // The description too, tombstone included: a deleted artifact costs nothing.
        stream
            .purge()
            .filter(format!("$O.{}.M.{}", self.bucket, encode_name(key)))
            .await
            .map_err(|e| backend("purge description", e))?;
        self.note_change(-(info.size as i64));
        Ok(())
    }

    /// Marks the cached usage stale after a change.
    fn note_change(&self, _delta: i64) {
        if let Ok(mut u) = self.usage.lock() {
            *u = None;
        }
    }

    async fn usage(&self) -> Result<StoreUsage, ArtifactError> {
        if let Ok(u) = self.usage.lock()
            && let Some((at, usage)) = *u
            && at.elapsed() < USAGE_CACHE
        {
            return Ok(usage);
        }
        let info = self
            .stream()
            .await?
            .get_info()
            .await
            .map_err(|e| backend("object store info", e))?;
        let usage = StoreUsage {
            bytes: info.state.bytes,
            max_bytes: u64::try_from(info.config.max_bytes).ok().filter(|m| *m > 0),
            reserve: self.reserve,
        };
        METRICS
            .store_bytes
            .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
        METRICS.store_max_bytes.set(info.config.max_bytes);
        if let Ok(mut u) = self.usage.lock() {
            *u = Some((Instant::now(), usage));
        }
        Ok(usage)
    }
}

/// Base64, URL-safe alphabet, with padding.
fn encode_base64url_bytes(b: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[async_trait]
impl ArtifactStore for NatsArtifacts {
    async fn put(
        &self,
        key: &str,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<ArtifactMeta, ArtifactError> {
        if let Some(d) = &self.direct {
            return d.put(&self.store, key, reader).await;
        }
        let info = self
            .store
            .put(key, &mut &mut *reader)
            .await
            .map_err(|e| backend("put", e))?;
        METRICS.bytes_written.inc_by(info.size as u64);
        Ok(meta(&info))
    }

    async fn get(&self, key: &str) -> Result<ArtifactReader, ArtifactError> {
        match self.store.get(key).await {
            Ok(obj) => Ok(Box::pin(Counted { inner: obj })),
            Err(e) if e.kind() == object_store::GetErrorKind::NotFound => {
                Err(ArtifactError::NotFound(key.to_owned()))
            }
            Err(e) => Err(backend("get", e)),
        }
    }

    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<ArtifactReader, ArtifactError> {
        if let Some(d) = &self.direct
            && let Some(r) = d.get_range(&self.store, key, start, len).await?
        {
            return Ok(r);
        }
        let mut r = self.get(key).await?;
        tokio::io::copy(&mut (&mut r).take(start), &mut tokio::io::sink()).await?;
        Ok(Box::pin(r.take(len)))
    }

    async fn info(&self, key: &str) -> Result<Option<ArtifactMeta>, ArtifactError> {
        match self.store.info(key).await {
            Ok(i) if !i.deleted => Ok(Some(meta(&i))),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == object_store::InfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend("info", e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), ArtifactError> {
        if let Some(d) = &self.direct {
            return d.delete(&self.store, key).await;
        }
        match self.store.delete(key).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend("delete", e)),
        }
    }

    async fn usage(&self) -> Result<Option<StoreUsage>, ArtifactError> {
        match &self.direct {
            Some(d) => d.usage().await.map(Some),
            None => Ok(None),
        }
    }
}

/// Every artifact key a task may own: the keys its record lists, its uploads, what its
/// stages recorded as outputs, the well-known names and the per-attempt names of every
/// attempt its stages made.
pub fn task_artifact_keys(record: &TaskRecord) -> Vec<String> {
    let tid = &record.task_id;
    let mut keys: Vec<String> = record.artifacts.clone();
    for src in [&record.request.video, &record.request.audio] {
        if let InputSource::Artifact(k) = src {
            keys.push(k.clone());
        }
    }
    let well_known = [
        names::artifact::VIDEO,
        names::artifact::AUDIO_ORIGINAL,
        names::artifact::AUDIO_16K,
        names::artifact::FACE_TRACK,
        names::artifact::AUDIO_FEATURES,
        names::artifact::CROPS,
        names::artifact::RESULT,
        names::artifact::MASK,
    ];
    for name in well_known {
        keys.push(names::artifact_key(tid, name));
    }
    for (stage, timing) in &record.stages {
        if let Some(done) = &timing.done {
            keys.extend(done.outputs.values().cloned());
        }
        if let Ok(stage) = serde_json::from_value::<lipsync_schemas::Stage>(
            serde_json::Value::String(stage.clone()),
        ) {
            for attempt in 1..=timing.attempts.max(1) {
                for name in well_known {
                    keys.push(names::attempt_key(tid, stage, attempt, name));
                }
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Deletes what a finished task no longer needs: for a failed or cancelled task
/// (or one not finished), everything it owns, inputs and uploads included; for a
/// completed task, everything but its result and mask. Outputs the record lists
/// (`output_video_url`, `output_mask_url`) are kept whatever the status: a task that
/// failed after storing them (`output_upload_failed`) still serves them. Returns the
/// number of keys deleted (absent keys included); the first error is returned after
/// trying every key.
///
/// # Errors
/// The store failed for some key.
pub async fn delete_task_artifacts(
    store: &dyn ArtifactStore,
    record: &TaskRecord,
) -> Result<usize, ArtifactError> {
    let completed = record.status == Status::Completed;
    let keep: Vec<String> = [
        (names::artifact::RESULT, record.output_video_url.is_some()),
        (names::artifact::MASK, record.output_mask_url.is_some()),
    ]
    .iter()
    .filter(|(_, listed)| completed || *listed)
    .map(|(n, _)| names::artifact_key(&record.task_id, n))
    .collect();
    let keys: Vec<String> = task_artifact_keys(record)
        .into_iter()
        .filter(|k| !keep.contains(k))
        .collect();
    let n = keys.len();
    let results: Vec<Result<(), ArtifactError>> = futures::stream::iter(keys)
        .map(|k| async move { store.delete(&k).await })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_encode_like_the_object_store() {
        assert_eq!(encode_name("abc"), "YWJj");
        assert_eq!(encode_name("ab"), "YWI=");
        assert_eq!(encode_name("a"), "YQ==");
        assert_eq!(encode_name("t/x?"), "dC94Pw==");
        assert_eq!(encode_base64url_bytes(&[0xfb, 0xff]), "-_8=");
    }

    #[test]
    fn sequence_runs_round_trip() {
        let seqs = [5, 6, 7, 9, 10, 20];
        let s = encode_seqs(&seqs);
        assert_eq!(s, "5+3,9+2,20+1");
        assert_eq!(decode_seqs(&s).unwrap(), seqs);
        assert_eq!(decode_seqs("").unwrap(), Vec::<u64>::new());
        assert!(decode_seqs("x+1").is_none());
    }

    #[test]
    fn usage_full() {
        let u = StoreUsage {
            bytes: 90,
            max_bytes: Some(100),
            reserve: 10,
        };
        assert!(u.refuses_new_tasks());
        assert!(!u.is_full(5));
        assert!(u.is_full(10));
        assert!(
            !StoreUsage {
                bytes: 90,
                max_bytes: None,
                reserve: 0,
            }
            .is_full(1000)
        );
    }
}
