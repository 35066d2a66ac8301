//! The stage runner: a durable pull-consumer loop shared by every stage, which owns the
//! whole lifecycle of a job (docs/architecture.md, "Jobs"). A stage's handler holds only
//! its own logic and returns an [`Outcome`]; the runner records it, hands the task on,
//! joins face and audio, or completes the task.
//!
//! - One message per free permit (`concurrency` permits, the GPU stage one per GPU): the
//!   limit is per process. The consumer's cluster-wide ceiling is a deployment setting.
//! - Leases: in-progress acks follow the job's progress, never a bare timer. A job that
//!   makes no progress for `runner.stall_timeout_s` is stopped (its tool processes
//!   killed) and retried; a worker that lost NATS for longer than `ack_wait` stops its job,
//!   since the message is someone else's by then.
//! - Idempotent stages: "done, with these outputs and this next work" is written to the task
//!   record before the next work is published. A redelivered job of a finished stage
//!   re-publishes (deduplicated by Msg-Id) and acks without running; a second message for
//!   a stage that another message owns is dropped.
//! - Transient errors and panics: NAK with an exponential delay; the last delivery fails
//!   the task with `retries_exhausted`. Permanent errors: the failure is written first,
//!   then TERM. Deliveries that all crashed are failed by [`crate::reaper`].
//! - Undecodable work fails its task with a typed error; it is never dropped silently.
//! - Shutdown: stop pulling, give in-flight jobs `shutdown_grace_s`, then stop them and
//!   NAK so another process picks them up at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use lipsync_schemas::{
    ErrorCode, InferJob, NextWork, Stage, StageDone, Status, TaskError, TaskRecord, WorkItem, names,
};
use tokio::sync::{Mutex, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::artifacts::{ArtifactError, ArtifactStore};
use crate::config::{NatsConfig, RunnerConfig};
use crate::jobscope::{self, Children};
use crate::metrics::StageMetrics;
use crate::tasks::{Change, TaskStore, Updated};

/// How a job ended badly.
#[derive(Debug)]
pub enum JobError {
    /// Worth another delivery (network, NATS, a busy resource).
    Transient(String),
    /// Will fail the same way again (bad media, no face): the task fails now.
    Permanent(TaskError),
    /// The task was cancelled or ended elsewhere while the job ran.
    Cancelled,
    /// The runner stopped the job (shutdown, a stalled lease, a lost connection).
    Interrupted,
}

impl JobError {
    /// A permanent failure with a code and message.
    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Self {
        JobError::Permanent(TaskError::new(
            code,
            crate::errors::public_message(&message.into()),
        ))
    }
    /// A transient failure.
    pub fn transient(message: impl std::fmt::Display) -> Self {
        JobError::Transient(crate::errors::public_message(&message.to_string()))
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Transient(m) => write!(f, "transient: {m}"),
            JobError::Permanent(e) => write!(f, "{}: {}", e.code, e.message),
            JobError::Cancelled => f.write_str("cancelled"),
            JobError::Interrupted => f.write_str("interrupted"),
        }
    }
}

impl crate::errors::StageError for crate::tasks::TaskStoreError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
    fn retryable(&self) -> bool {
        true
    }
}

impl crate::errors::StageError for ArtifactError {
    fn code(&self) -> ErrorCode {
        ErrorCode::Internal
    }
    fn retryable(&self) -> bool {
        !matches!(self, ArtifactError::NotFound(_))
    }
    fn task_error(&self) -> TaskError {
        TaskError::new(
            ErrorCode::Internal,
            "an input or intermediate result of this task is no longer stored (expired or deleted)",
        )
    }
}

/// What a finished job hands back to the runner.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The stage is done: record `outputs`, then publish `next`.
    Next {
        /// Artifact keys by well-known name.
        outputs: BTreeMap<String, String>,
        /// Work for the following stage(s).
        next: Vec<NextWork>,
    },
    /// One part of the face/audio join is done; whichever part completes the join
    /// publishes the inference job.
    Join {
        /// Artifact keys by well-known name.
        outputs: BTreeMap<String, String>,
    },
    /// The task is complete with these outputs (`result.mp4`, `mask.mp4`).
    Complete {
        /// Output artifact keys by name.
        outputs: BTreeMap<String, String>,
        /// Delete every other artifact of the task afterwards.
        delete_intermediates: bool,
    },
}

impl Outcome {
    /// [`Outcome::Next`] from `(name, key)` pairs and work items.
    pub fn next<'a>(
        outputs: impl IntoIterator<Item = (&'a str, String)>,
        next: Vec<NextWork>,
    ) -> Self {
        Outcome::Next {
            outputs: collect(outputs),
            next,
        }
    }

    /// [`Outcome::Join`] from `(name, key)` pairs.
    pub fn join<'a>(outputs: impl IntoIterator<Item = (&'a str, String)>) -> Self {
        Outcome::Join {
            outputs: collect(outputs),
        }
    }
}

fn collect<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> BTreeMap<String, String> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Why the runner stopped a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Shutdown,
    Stalled,
    Disconnected,
}

/// The runner's side of one job: its stop signal, progress clock and child processes.
struct JobScope {
    stop: CancellationToken,
    reason: StdMutex<Option<StopReason>>,
    started: Instant,
    /// Milliseconds after `started` of the last progress.
    alive_ms: AtomicU64,
    children: Arc<Children>,
}

impl JobScope {
    fn new() -> Self {
        Self {
            stop: CancellationToken::new(),
            reason: StdMutex::new(None),
            started: Instant::now(),
            alive_ms: AtomicU64::new(0),
            children: Arc::new(Children::default()),
        }
    }

    fn alive(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.alive_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn stop(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stop.cancel();
        self.children.kill_all();
    }

    fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Throttle {
    last_write: Option<Instant>,
    last_check: Option<Instant>,
    interval: Duration,
    last_seen: Option<(f64, String)>,
}

/// Everything a handler may use while working on one job.
#[derive(Clone)]
pub struct JobCtx {
    /// The task.
    pub task_id: String,
    /// This stage.
    pub stage: Stage,
    /// Delivery count of this job (1 on the first try).
    pub attempt: u32,
    /// The task record as it was when the job started.
    pub record: Arc<TaskRecord>,
    /// Task records.
    pub tasks: TaskStore,
    /// Artifacts.
    pub artifacts: Arc<dyn ArtifactStore>,
    scope: Arc<JobScope>,
    throttle: Arc<Mutex<Throttle>>,
    scratch_root: PathBuf,
    scratch: Arc<StdMutex<Option<tempfile::TempDir>>>,
    metrics: Option<StageMetrics>,
}

impl JobCtx {
    /// A context outside any runner, for tests and tools that call a handler directly.
    pub fn detached(
        task_id: &str,
        stage: Stage,
        record: TaskRecord,
        tasks: TaskStore,
        artifacts: Arc<dyn ArtifactStore>,
        scratch_root: PathBuf,
    ) -> Self {
        Self {
            task_id: task_id.to_owned(),
            stage,
            attempt: 1,
            record: Arc::new(record),
            tasks,
            artifacts,
            scope: Arc::new(JobScope::new()),
            throttle: Arc::new(Mutex::new(Throttle {
                last_write: None,
                last_check: None,
                interval: Duration::from_millis(200),
                last_seen: None,
            })),
            scratch_root,
            scratch: Arc::default(),
            metrics: None,
        }
    }

    /// Note that the job made progress (extends its lease). Progress reports do this.
    pub fn alive(&self) {
        self.scope.alive();
    }

    /// Report progress: `fraction` of this stage's own work (mapped into the stage's
    /// band). A changed fraction or message counts as progress for the lease; writes are
    /// throttled, and a fraction of 1.0 is always written.
    pub async fn progress(&self, fraction: f64, message: &str) -> Result<(), JobError> {
        if self.scope.stop.is_cancelled() {
            return Err(JobError::Interrupted);
        }
        {
            let mut t = self.throttle.lock().await;
            let changed = t
                .last_seen
                .as_ref()
                .is_none_or(|(f, m)| *f != fraction || m != message);
            if changed {
                self.scope.alive();
                t.last_seen = Some((fraction, message.to_owned()));
            }
            let due = t.last_write.is_none_or(|w| w.elapsed() >= t.interval);
            if !due && fraction < 1.0 {
                return Ok(());
            }
            t.last_write = Some(Instant::now());
        }
        match self
            .tasks
            .progress(&self.task_id, self.stage, fraction, message)
            .await?
        {
            Updated::Unchanged(r) if r.status.is_terminal() => Err(JobError::Cancelled),
            Updated::Missing => Err(JobError::Cancelled),
            _ => Ok(()),
        }
    }

    /// Fail with `Cancelled` if the task was cancelled or ended, or `Interrupted` if the
    /// runner stopped the job. Reads KV at most every 250 ms.
    pub async fn check(&self) -> Result<(), JobError> {
        if self.scope.stop.is_cancelled() {
            return Err(JobError::Interrupted);
        }
        {
            let mut t = self.throttle.lock().await;
            if t.last_check
                .is_some_and(|c| c.elapsed() < Duration::from_millis(250))
            {
                return Ok(());
            }
            t.last_check = Some(Instant::now());
        }
        match self.tasks.get(&self.task_id).await? {
            Some((r, _)) if r.status.is_terminal() || r.cancel_requested => {
                Err(JobError::Cancelled)
            }
            None => Err(JobError::Cancelled),
            Some(_) => Ok(()),
        }
    }

    /// Token cancelled when the runner stops the job.
    pub fn interrupted(&self) -> &CancellationToken {
        &self.scope.stop
    }

    /// Run `fut`, which is bounded by its own time limit (a tool with a timeout, a
    /// transfer that moves bytes), keeping the lease alive meanwhile. Ends early with
    /// `Interrupted` when the runner stops the job (dropping `fut`).
    pub async fn keepalive<F: Future>(&self, fut: F) -> Result<F::Output, JobError> {
        let mut fut = std::pin::pin!(fut);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                _ = self.scope.stop.cancelled() => return Err(JobError::Interrupted),
                _ = tick.tick() => self.scope.alive(),
            }
        }
    }

    /// This job's scratch folder, created on first use under the configured scratch
    /// directory and removed when the job ends.
    pub fn scratch_dir(&self) -> Result<PathBuf, JobError> {
        let mut slot = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = slot.as_ref() {
            return Ok(d.path().to_path_buf());
        }
        std::fs::create_dir_all(&self.scratch_root)
            .map_err(|e| JobError::transient(format!("scratch directory: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix(&scratch_prefix(self.stage))
            .tempdir_in(&self.scratch_root)
            .map_err(|e| JobError::transient(format!("scratch directory: {e}")))?;
        let path = dir.path().to_path_buf();
        *slot = Some(dir);
        Ok(path)
    }

    fn drop_scratch(&self) {
        let dir = self
            .scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(dir);
    }

    /// The key under which this attempt stores its artifact `name`.
    pub fn artifact_key(&self, name: &str) -> String {
        names::attempt_key(&self.task_id, self.stage, self.attempt, name)
    }

    /// Fetch artifact `key` into the scratch folder as `file`; `what` names it in errors.
    pub async fn read_artifact(
        &self,
        key: &str,
        file: &str,
        what: &str,
    ) -> Result<PathBuf, JobError> {
        let path = self.scratch_dir()?.join(file);
        let got = self
            .keepalive(self.artifacts.get_to_file(key, &path))
            .await?;
        got.map_err(|e| artifact_error(e, what))?;
        Ok(path)
    }

    /// Read artifact `key` whole (small artifacts: tracks, features).
    pub async fn read_artifact_bytes(&self, key: &str, what: &str) -> Result<Vec<u8>, JobError> {
        use tokio::io::AsyncReadExt;
        let read = async {
            let mut r = self.artifacts.get(key).await?;
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).await?;
            Ok::<_, ArtifactError>(buf)
        };
        self.keepalive(read)
            .await?
            .map_err(|e| artifact_error(e, what))
    }

    /// Store the file at `path` as this attempt's artifact `name` and register it with
    /// the task (for clean-up); returns its key.
    pub async fn store_artifact(&self, name: &str, path: &Path) -> Result<String, JobError> {
        let key = self.artifact_key(name);
        self.keepalive(self.artifacts.put_file(&key, path))
            .await??;
        self.register_artifacts(std::slice::from_ref(&key)).await?;
        Ok(key)
    }

    /// Store `bytes` as this attempt's artifact `name` and register it; returns its key.
    pub async fn store_artifact_bytes(&self, name: &str, bytes: &[u8]) -> Result<String, JobError> {
        let key = self.artifact_key(name);
        let mut reader = bytes;
        self.keepalive(self.artifacts.put(&key, &mut reader))
            .await??;
        self.register_artifacts(std::slice::from_ref(&key)).await?;
        Ok(key)
    }

    /// Register artifacts stored some other way (a download streamed into the store).
    pub async fn register_artifacts(&self, keys: &[String]) -> Result<(), JobError> {
        let updated = self
            .tasks
            .update_with(&self.task_id, true, |r| {
                let mut changed = false;
                for k in keys {
                    if !r.artifacts.contains(k) {
                        r.artifacts.push(k.clone());
                        changed = true;
                    }
                }
                if changed { Change::Write } else { Change::Skip }
            })
            .await?;
        match updated {
            Updated::Missing => Err(JobError::Cancelled),
            Updated::Written(r) | Updated::Unchanged(r) if r.status.is_terminal() => {
                Err(JobError::Cancelled)
            }
            _ => Ok(()),
        }
    }

    /// Run blocking work on its own thread with progress and cancellation: `work` gets a
    /// [`Blocking`] handle to report progress and to learn that it must stop. A panic in
    /// `work` fails this attempt as a retryable internal error; a stop (cancellation,
    /// shutdown, stall) returns the reason, whatever `work` returned.
    pub async fn run_blocking<R, F>(&self, what: &'static str, work: F) -> Result<R, JobError>
    where
        R: Send + 'static,
        F: FnOnce(&Blocking) -> R + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<(f64, String)>();
        let stop = Arc::new(AtomicBool::new(false));
        let handle = Blocking {
            tx,
            stop: stop.clone(),
            scope: self.scope.clone(),
        };
        let children = Some(self.scope.children.clone());
        let span = tracing::Span::current();
        let mut join = tokio::task::spawn_blocking(move || {
            let _job = jobscope::enter_thread(children);
            let _span = span.enter();
            std::panic::catch_unwind(AssertUnwindSafe(|| work(&handle)))
        });
        let mut stopped: Option<JobError> = None;
        let mut open = true;
        let result = loop {
            tokio::select! {
                // Checked first: a stop kills the job's tools, which can end `work` in the
                // same instant; the stop must win over that result.
                biased;
                _ = self.scope.stop.cancelled(), if stopped.is_none() => {
                    stop.store(true, Ordering::SeqCst);
                    stopped = Some(JobError::Interrupted);
                }
                r = &mut join => break r,
                m = rx.recv(), if open => match m {
                    Some((fraction, message)) => {
                        if stopped.is_some() {
                            continue;
                        }
                        let res = match self.progress(fraction, &message).await {
                            Ok(()) => self.check().await,
                            Err(e) => Err(e),
                        };
                        if let Err(e) = res {
                            stop.store(true, Ordering::SeqCst);
                            stopped = Some(e);
                        }
                    }
                    None => open = false,
                },
            }
        };
        if stopped.is_none() && self.scope.stop.is_cancelled() {
            stopped = Some(JobError::Interrupted);
        }
        match result {
            Ok(Ok(r)) => match stopped {
                Some(e) => Err(e),
                None => Ok(r),
            },
            Ok(Err(panic)) => {
                if let Some(m) = &self.metrics {
                    m.job_events
                        .with_label_values(&[self.stage.as_str(), "panicked"])
                        .inc();
                }
                tracing::error!(panic = %panic_message(&panic), "{what} panicked");
                Err(JobError::Transient(format!(
                    "internal error: {what} panicked: {}",
                    panic_message(&panic)
                )))
            }
            Err(e) => Err(JobError::Transient(format!(
                "internal error: {what} thread failed: {e}"
            ))),
        }
    }
}

/// The blocking side of [`JobCtx::run_blocking`].
pub struct Blocking {
    tx: mpsc::UnboundedSender<(f64, String)>,
    stop: Arc<AtomicBool>,
    scope: Arc<JobScope>,
}

impl Blocking {
    /// Report progress (fraction of the stage's own work, and a message). Never blocks.
    pub fn progress(&self, fraction: f64, message: impl Into<String>) {
        let _ = self.tx.send((fraction, message.into()));
    }

    /// Note progress for the lease without a visible report (one decoded frame, say).
    pub fn alive(&self) {
        self.scope.alive();
    }

    /// Whether the work must stop now (cancelled, shutting down or stalled).
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst) || self.scope.stop.is_cancelled()
    }

    /// A flag that turns true when the work must stop, for code that takes one.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

/// Prefix of every scratch folder: `lipsync-job-<stage>-<pid>-…` (cleaned at start-up by
/// [`clean_scratch`]).
pub const SCRATCH_PREFIX: &str = "lipsync-job-";

fn scratch_prefix(stage: Stage) -> String {
    format!("{SCRATCH_PREFIX}{stage}-{}-", std::process::id())
}

/// Remove scratch folders of `stage` that a process no longer running left behind (it
/// crashed or was killed). Folders of live processes (other replicas sharing the
/// directory) are kept. Run before the stage takes work; returns how many were removed.
pub fn clean_scratch(root: &Path, stage: Stage) -> usize {
    let prefix = format!("{SCRATCH_PREFIX}{stage}-");
    let Ok(entries) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        let alive = pid
            .is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

fn artifact_error(e: ArtifactError, what: &str) -> JobError {
    match e {
        ArtifactError::NotFound(_) => JobError::permanent(
            ErrorCode::Internal,
            format!("the {what} of this task is no longer stored (expired or deleted)"),
        ),
        other => JobError::transient(format!("{what}: {other}")),
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Publish a work item durably (waits for the stream's ack) with Msg-Id dedup.
/// Returns `Err` with a message when the stream refused it or NATS is unreachable.
pub async fn publish_work<W: WorkItem>(js: &jetstream::Context, item: &W) -> Result<(), String> {
    publish_next(js, item.task_id(), &NextWork::of(item)).await
}

/// The W3C trace id of a task: its UUID's 32 hex digits (one trace per task).
pub fn trace_id(task_id: &str) -> String {
    let hex: String = task_id.chars().filter(char::is_ascii_hexdigit).collect();
    if hex.len() == 32 && hex.bytes().any(|b| b != b'0') {
        hex.to_ascii_lowercase()
    } else {
        // Not a UUID (tests, tools): a stable id from its bytes.
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(task_id.as_bytes())[..16])
    }
}

/// A work message's W3C `traceparent` header.
fn traceparent(msg: &jetstream::Message) -> Option<&str> {
    Some(msg.headers.as_ref()?.get("traceparent")?.as_str())
}

/// The trace id a work message carries in its W3C `traceparent` header, if valid.
fn header_trace_id(msg: &jetstream::Message) -> Option<String> {
    let mut parts = traceparent(msg)?.split('-');
    let (_version, trace) = (parts.next()?, parts.next()?);
    (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then(|| trace.to_owned())
}

/// Publish a stored work item (see [`publish_work`]). The message carries the task's
/// trace context (`traceparent`), so every stage's job joins the task's trace.
pub async fn publish_next(
    js: &jetstream::Context,
    task_id: &str,
    item: &NextWork,
) -> Result<(), String> {
    let mut headers = async_nats::HeaderMap::new();
    // The publishing span (a job, or the gateway's task span) when spans are exported.
    let tp = crate::telemetry::current_traceparent().unwrap_or_else(|| {
        let span_id: u64 = rand::random::<u64>().max(1);
        format!("00-{}-{span_id:016x}-01", trace_id(task_id))
    });
    headers.insert("traceparent", tp.as_str());
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        names::msg_id(task_id, item.stage).as_str(),
    );
    headers.insert(
        names::SCHEMA_VERSION_HEADER,
        item.version.to_string().as_str(),
    );
    let body = serde_json::to_vec(&item.body).map_err(|e| e.to_string())?;
    let ack = js
        .publish_with_headers(names::work_subject(item.stage), headers, body.into())
        .await
        .map_err(|e| format!("publish {}: {e}", item.stage))?;
    ack.await
        .map_err(|e| format!("publish {} not acknowledged: {e}", item.stage))?;
    Ok(())
}

/// The work a stage does for one job.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The work item this stage consumes.
    type Job: WorkItem;
    /// Do the work and say what follows; the runner records, publishes and acks.
    async fn handle(&self, ctx: JobCtx, job: Self::Job) -> Result<Outcome, JobError>;
}

/// Runner settings and handles.
pub struct Runner<H: Handler> {
    /// The stage's handler.
    pub handler: Arc<H>,
    /// Jobs at once in this process (the per-process permit count).
    pub concurrency: usize,
    /// NATS client (its connection state bounds the lease).
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Task records.
    pub tasks: TaskStore,
    /// Artifacts.
    pub artifacts: Arc<dyn ArtifactStore>,
    /// Metrics.
    pub metrics: StageMetrics,
    /// NATS settings (ack wait, max deliver).
    pub nats: NatsConfig,
    /// Runner settings.
    pub runner: RunnerConfig,
    /// Execution provider recorded in each task's stage timing (None: not recorded).
    pub provider: Option<String>,
    /// Where job scratch folders go.
    pub scratch_root: PathBuf,
}

impl<H: Handler> Runner<H> {
    /// Pull and handle jobs until `shutdown` is cancelled, then drain.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), String> {
        let stage = H::Job::STAGE;
        let stream = self
            .js
            .get_stream(names::WORK_STREAM)
            .await
            .map_err(|e| format!("get work stream: {e}"))?;
        let consumer: consumer::PullConsumer = stream
            .get_consumer(names::consumer_name(stage))
            .await
            .map_err(|e| format!("get consumer {stage}: {e}"))?;
        let removed = clean_scratch(&self.scratch_root, stage);
        if removed > 0 {
            tracing::info!(%stage, removed, "removed scratch folders left by an earlier process");
        }
        let permits = Arc::new(Semaphore::new(self.concurrency.max(1)));
        let tracker = TaskTracker::new();
        let interrupt = CancellationToken::new();
        let this = Arc::new(self);
        tracing::info!(%stage, concurrency = this.concurrency, "stage runner started");

        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = permits.clone().acquire_owned() => p.map_err(|e| e.to_string())?,
            };
            let batch = tokio::select! {
                _ = shutdown.cancelled() => break,
                b = consumer
                    .batch()
                    .max_messages(1)
                    .expires(Duration::from_secs(this.runner.pull_expires_s.max(1)))
                    .messages() => b,
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(%stage, error = %e, "pull failed, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = batch.next() => m,
            };
            match msg {
                Some(Ok(msg)) => {
                    let this = this.clone();
                    let interrupt = interrupt.clone();
                    tracker.spawn(async move {
                        this.process(msg, interrupt).await;
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(%stage, error = %e, "pull returned an error");
                }
                None => {}
            }
        }

        tracker.close();
        let grace = Duration::from_secs(this.runner.shutdown_grace_s);
        tracing::info!(%stage, in_flight = tracker.len(), grace_s = grace.as_secs(), "draining");
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(%stage, "grace period over, interrupting in-flight jobs");
            interrupt.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
        }
        tracing::info!(%stage, "stage runner stopped");
        Ok(())
    }

    fn event(&self, event: &str) {
        self.metrics
            .job_events
            .with_label_values(&[H::Job::STAGE.as_str(), event])
            .inc();
    }

    async fn process(&self, msg: jetstream::Message, shutdown: CancellationToken) {
        let stage = H::Job::STAGE;
        let label = stage.as_str();
        let (delivered, seq) = msg
            .info()
            .map(|i| (i.delivered.max(1) as u32, i.stream_sequence))
            .unwrap_or((1, 0));
        if delivered > 1 {
            self.metrics
                .jobs_redelivered
                .with_label_values(&[label])
                .inc();
        }
        let job: H::Job = match lipsync_schemas::decode(&msg.payload) {
            Ok(j) => j,
            Err(e) => return self.undecodable(&msg, e).await,
        };
        let task_id = job.task_id().to_owned();
        let trace = header_trace_id(&msg).unwrap_or_else(|| trace_id(&task_id));
        let span = tracing::info_span!(
            parent: None,
            "job",
            otel.name = stage.as_str(),
            %stage,
            task_id = %task_id,
            attempt = delivered,
            trace_id = %trace
        );
        // The exported span is the child of the one that published this message.
        if !traceparent(&msg).is_some_and(|tp| crate::telemetry::continue_trace(&span, tp)) {
            crate::telemetry::root_trace(&span, &trace);
        }
        self.process_job(msg, job, delivered, seq, shutdown)
            .instrument(span)
            .await;
    }

    async fn process_job(
        &self,
        msg: jetstream::Message,
        job: H::Job,
        delivered: u32,
        seq: u64,
        shutdown: CancellationToken,
    ) {
        let stage = H::Job::STAGE;
        let label = stage.as_str();
        let task_id = job.task_id().to_owned();
        let nak_later = |delay| msg.ack_with(AckKind::Nak(Some(delay)));

        // Skip work for tasks that ended or vanished.
        let record = match self.tasks.get(&task_id).await {
            Ok(Some((r, _))) => r,
            Ok(None) => {
                tracing::warn!("no task record, dropping work item");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "task store unavailable");
                let _ = nak_later(self.nak_delay(delivered)).await;
                return;
            }
        };
        if record.status.is_terminal() || record.cancel_requested {
            tracing::info!(
                status = record.status.as_str(),
                "task already ended, skipping"
            );
            let _ = msg.double_ack().await;
            return;
        }
        // A finished stage hands its recorded work on again instead of running again.
        if record.stage_done(stage) {
            self.event("republished");
            match self.hand_on(&record).await {
                Ok(()) => {
                    tracing::info!("stage already done, its next work re-published");
                    let _ = msg.double_ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "re-publish failed");
                    let _ = nak_later(self.nak_delay(delivered)).await;
                }
            }
            return;
        }
        let owned_by_other = |r: &TaskRecord| {
            r.stages
                .get(label)
                .and_then(|t| t.message_seq)
                .is_some_and(|s| seq != 0 && s != seq)
        };
        if owned_by_other(&record) {
            self.event("duplicate");
            tracing::info!("another message owns this stage of the task, dropping this one");
            let _ = msg.double_ack().await;
            return;
        }
        let record = match self
            .tasks
            .mark_started_on(&task_id, stage, delivered, seq, self.provider.as_deref())
            .await
        {
            Ok(Updated::Written(r)) | Ok(Updated::Unchanged(r)) if !r.status.is_terminal() => r,
            Ok(_) => {
                let _ = msg.double_ack().await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot mark task started");
                let _ = nak_later(self.nak_delay(delivered)).await;
                return;
            }
        };
        if owned_by_other(&record) {
            self.event("duplicate");
            let _ = msg.double_ack().await;
            return;
        }

        self.metrics.jobs_started.with_label_values(&[label]).inc();
        self.metrics.in_flight.with_label_values(&[label]).inc();
        let started = Instant::now();
        let scope = Arc::new(JobScope::new());
        let ctx = JobCtx {
            task_id: task_id.clone(),
            stage,
            attempt: delivered,
            record: Arc::new(*record),
            tasks: self.tasks.clone(),
            artifacts: self.artifacts.clone(),
            scope: scope.clone(),
            throttle: Arc::new(Mutex::new(Throttle {
                last_write: None,
                last_check: None,
                interval: Duration::from_millis(self.runner.progress_interval_ms),
                last_seen: None,
            })),
            scratch_root: self.scratch_root.clone(),
            scratch: Arc::default(),
            metrics: Some(self.metrics.clone()),
        };

        let work = jobscope::scope(
            scope.children.clone(),
            AssertUnwindSafe(self.handler.handle(ctx.clone(), job)).catch_unwind(),
        )
        .in_current_span();
        let result = self.supervise(&msg, &scope, &shutdown, work).await;
        ctx.drop_scratch();
        self.metrics.in_flight.with_label_values(&[label]).dec();
        self.metrics
            .job_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());

        let result = match result {
            Some(Ok(r)) => r,
            Some(Err(panic)) => {
                self.event("panicked");
                tracing::error!(panic = %panic_message(&panic), "handler panicked");
                Err(JobError::Transient(format!(
                    "internal error: the {stage} handler panicked"
                )))
            }
            None => Err(JobError::Interrupted),
        };
        // A stopped job's tools were killed: whatever it returned after the stop, even
        // success, is not trusted and the job counts as stopped.
        let result = match (result, scope.reason()) {
            (Ok(_) | Err(JobError::Interrupted), Some(StopReason::Stalled)) => {
                Err(JobError::Transient(format!(
                    "{stage} made no progress for {:.0} s",
                    self.stall_timeout().as_secs_f64()
                )))
            }
            (Ok(_), Some(_)) => Err(JobError::Interrupted),
            (r, _) => r,
        };

        match result {
            Ok(outcome) => match self.finish(&ctx, outcome).await {
                Ok(()) => {
                    self.metrics
                        .jobs_succeeded
                        .with_label_values(&[label])
                        .inc();
                    if let Err(e) = msg.double_ack().await {
                        tracing::warn!(error = %e, "ack failed; a redelivery will re-publish");
                    }
                    tracing::info!(secs = started.elapsed().as_secs_f64(), "job done");
                }
                Err(JobError::Cancelled) => {
                    let _ = msg.double_ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the outcome, retrying");
                    let _ = nak_later(self.nak_delay(delivered)).await;
                }
            },
            Err(JobError::Cancelled) => {
                tracing::info!("task ended while the job ran");
                let _ = msg.double_ack().await;
            }
            Err(JobError::Interrupted) => match scope.reason() {
                Some(StopReason::Disconnected) => {
                    // The message is someone else's by now; leave it alone.
                    tracing::warn!("lost NATS for longer than ack_wait, job abandoned");
                }
                _ => {
                    tracing::info!("job interrupted, returning it to the queue");
                    let _ = msg.ack_with(AckKind::Nak(None)).await;
                }
            },
            Err(JobError::Permanent(err)) => {
                self.fail_then_term(&msg, &task_id, err).await;
            }
            Err(JobError::Transient(reason)) => {
                let max = self.nats.max_deliver;
                if max > 0 && i64::from(delivered) >= max {
                    let err = TaskError::new(
                        ErrorCode::RetriesExhausted,
                        format!("{stage} failed after {delivered} attempts: {reason}"),
                    );
                    self.fail_then_term(&msg, &task_id, err).await;
                } else {
                    let delay = self.nak_delay(delivered);
                    tracing::warn!(delay_s = delay.as_secs_f64(), %reason, "transient failure, retrying later");
                    self.metrics.jobs_retried.with_label_values(&[label]).inc();
                    let _ = nak_later(delay).await;
                }
            }
        }
    }

    fn stall_timeout(&self) -> Duration {
        self.runner.stall_timeout(self.nats.ack_wait_s)
    }

    /// Drive the handler while keeping its lease: in-progress acks only after progress,
    /// a stop when it stalls, when NATS is gone for longer than `ack_wait`, or on shutdown
    /// past the grace period. `None` if the handler did not return after being stopped.
    async fn supervise<F: Future>(
        &self,
        msg: &jetstream::Message,
        scope: &JobScope,
        shutdown: &CancellationToken,
        work: F,
    ) -> Option<F::Output> {
        let ack_wait = Duration::from_secs(self.nats.ack_wait_s.max(1));
        let beat_every = ack_wait / 3;
        let stall = self.stall_timeout();
        let mut work = std::pin::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_beat = Instant::now();
        let mut beat_alive = 0u64;
        let mut offline_since: Option<Instant> = None;
        let mut stopped_at: Option<Instant> = None;
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                _ = shutdown.cancelled(), if stopped_at.is_none() => {
                    scope.stop(StopReason::Shutdown);
                    stopped_at = Some(Instant::now());
                }
                _ = tick.tick() => {
                    if let Some(at) = stopped_at {
                        // Stopped: its tools are dead; give it a moment to return.
                        scope.children.kill_all();
                        if at.elapsed() > Duration::from_secs(30) {
                            tracing::error!("job did not return after being stopped, abandoning it");
                            return None;
                        }
                        continue;
                    }
                    let alive = scope.alive_ms.load(Ordering::Relaxed);
                    let now = scope.started.elapsed();
                    let connected = self.client.connection_state()
                        == async_nats::connection::State::Connected;
                    if connected {
                        offline_since = None;
                        if alive > beat_alive && last_beat.elapsed() >= beat_every {
                            if let Err(e) = msg.ack_with(AckKind::Progress).await {
                                tracing::debug!(error = %e, "progress ack failed");
                            }
                            last_beat = Instant::now();
                            beat_alive = alive;
                        }
                    } else {
                        let since = *offline_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > ack_wait {
                            self.event("connection_lost");
                            tracing::warn!("NATS unreachable for longer than ack_wait, stopping the job");
                            scope.stop(StopReason::Disconnected);
                            stopped_at = Some(Instant::now());
                            continue;
                        }
                    }
                    if now.saturating_sub(Duration::from_millis(alive)) > stall {
                        self.event("stalled");
                        tracing::warn!(stall_s = stall.as_secs_f64(), "no progress, stopping the job");
                        scope.stop(StopReason::Stalled);
                        stopped_at = Some(Instant::now());
                    }
                }
            }
        }
    }

    /// Record the outcome in the task record, then hand the task on.
    async fn finish(&self, ctx: &JobCtx, outcome: Outcome) -> Result<(), JobError> {
        let stage = ctx.stage;
        let (epoch, rfc) = crate::tasks::now();
        match outcome {
            Outcome::Next { outputs, next } => {
                let done = StageDone {
                    outputs: outputs.clone(),
                    next,
                };
                let record = self.record_done(ctx, done, epoch).await?;
                self.discard_losing_outputs(ctx, &record, &outputs).await;
                self.hand_on(&record).await.map_err(JobError::Transient)
            }
            Outcome::Join { outputs } => {
                let done = StageDone {
                    outputs: outputs.clone(),
                    next: Vec::new(),
                };
                let record = self.record_done(ctx, done, epoch).await?;
                self.discard_losing_outputs(ctx, &record, &outputs).await;
                self.hand_on(&record).await.map_err(JobError::Transient)
            }
            Outcome::Complete {
                outputs,
                delete_intermediates,
            } => {
                let task_id = ctx.task_id.clone();
                let keep: Vec<String> = outputs.values().cloned().collect();
                let url = |name: &str| {
                    outputs
                        .contains_key(name)
                        .then(|| format!("/outputs/{task_id}/{name}"))
                };
                let (video_url, mask_url) =
                    (url(names::artifact::RESULT), url(names::artifact::MASK));
                let updated = self
                    .tasks
                    .update(&task_id, |r| {
                        r.status = Status::Completed;
                        r.stage = Some(stage);
                        r.raise_progress(1.0);
                        r.message = "completed".into();
                        r.output_video_url = video_url.clone();
                        r.output_mask_url = mask_url.clone();
                        r.finished_at = Some(rfc.clone());
                        r.end_time = Some(epoch);
                        r.queue_position = None;
                        r.error = None;
                        let t = r.stages.entry(stage.as_str().to_owned()).or_default();
                        t.finished_at = Some(epoch);
                        t.done = Some(StageDone {
                            outputs: outputs.clone(),
                            next: Vec::new(),
                        });
                        for k in &keep {
                            if !r.artifacts.contains(k) {
                                r.artifacts.push(k.clone());
                            }
                        }
                        Change::Write
                    })
                    .await?;
                let record = match updated {
                    Updated::Written(r) => r,
                    Updated::Unchanged(r) if r.status == Status::Completed => r,
                    _ => return Err(JobError::Cancelled),
                };
                if delete_intermediates {
                    // Everything but the outputs: inputs, intermediates of every attempt.
                    if let Err(e) =
                        crate::artifacts::delete_task_artifacts(self.artifacts.as_ref(), &record)
                            .await
                    {
                        tracing::warn!(error = %e, "cannot delete intermediate artifacts");
                    }
                    let _ = self
                        .tasks
                        .update_with(&task_id, true, |r| {
                            r.artifacts.retain(|k| keep.contains(k));
                            Change::Write
                        })
                        .await;
                }
                Ok(())
            }
        }
    }

    /// Write "done" for this stage unless an earlier attempt already did; returns the
    /// record after the write (with whichever attempt's outputs won).
    async fn record_done(
        &self,
        ctx: &JobCtx,
        done: StageDone,
        epoch: f64,
    ) -> Result<TaskRecord, JobError> {
        let stage = ctx.stage;
        let updated = self
            .tasks
            .update(&ctx.task_id, |r| {
                let t = r.stages.entry(stage.as_str().to_owned()).or_default();
                if t.done.is_some() {
                    return Change::Skip;
                }
                t.done = Some(done.clone());
                t.finished_at = Some(epoch);
                match stage {
                    Stage::Face => r.join.face_done = true,
                    Stage::Audio => r.join.audio_done = true,
                    _ => {}
                }
                if r.stage_done(Stage::Face) && r.stage_done(Stage::Audio) {
                    r.join.infer_published = true;
                }
                r.raise_progress(stage.progress_at(1.0));
                Change::Write
            })
            .await?;
        match updated {
            Updated::Missing => Err(JobError::Cancelled),
            Updated::Written(r) => Ok(*r),
            Updated::Unchanged(r) if r.status.is_terminal() => Err(JobError::Cancelled),
            Updated::Unchanged(r) => Ok(*r),
        }
    }

    /// If another attempt recorded the stage done first, delete what this one stored.
    async fn discard_losing_outputs(
        &self,
        ctx: &JobCtx,
        record: &TaskRecord,
        ours: &BTreeMap<String, String>,
    ) {
        let Some(theirs) = record
            .stages
            .get(ctx.stage.as_str())
            .and_then(|t| t.done.as_ref())
        else {
            return;
        };
        for key in ours.values() {
            if !theirs.outputs.values().any(|k| k == key) && key.starts_with(&ctx.task_id) {
                tracing::info!(key = %key, "an earlier attempt finished first, deleting this attempt's output");
                let _ = self.artifacts.delete(key).await;
            }
        }
    }

    /// Publish what follows the stages recorded done in `record`: their stored next work,
    /// and the inference job once both face and audio are done.
    async fn hand_on(&self, record: &TaskRecord) -> Result<(), String> {
        let stage = H::Job::STAGE;
        let task_id = &record.task_id;
        if matches!(stage, Stage::Face | Stage::Audio) {
            if let Some(job) = infer_job(record) {
                publish_work(&self.js, &job).await?;
            }
            return Ok(());
        }
        let Some(done) = record
            .stages
            .get(stage.as_str())
            .and_then(|t| t.done.as_ref())
        else {
            return Ok(());
        };
        for item in &done.next {
            publish_next(&self.js, task_id, item).await?;
        }
        Ok(())
    }

    /// A message that is not a readable work item: fail its task (if it names one) with a
    /// typed error, then terminate it.
    async fn undecodable(&self, msg: &jetstream::Message, e: lipsync_schemas::DecodeError) {
        let stage = H::Job::STAGE;
        self.event("undecodable");
        match lipsync_schemas::salvage_task_id(&msg.payload) {
            Some(task_id) => {
                tracing::error!(%stage, %task_id, error = %e, "undecodable work item, failing its task");
                let err = TaskError::new(
                    ErrorCode::Internal,
                    format!("a {stage} work item of this task could not be read: {e}"),
                );
                match self.tasks.fail(&task_id, Some(stage), err).await {
                    Ok(_) => {
                        let _ = msg.ack_with(AckKind::Term).await;
                    }
                    Err(store) => {
                        tracing::warn!(%task_id, error = %store, "cannot record the failure, retrying");
                        let _ = msg
                            .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
            }
            None => {
                tracing::error!(%stage, error = %e, "undecodable work item naming no task, terminating it");
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
    }

    /// Write the failure to the task record, then terminate the message. If the record
    /// cannot be written the message is NAKed instead, so the failure is never lost.
    async fn fail_then_term(&self, msg: &jetstream::Message, task_id: &str, err: TaskError) {
        let stage = H::Job::STAGE;
        let code = err.code;
        match self.tasks.fail(task_id, Some(stage), err).await {
            Ok(updated) => {
                self.metrics
                    .jobs_failed
                    .with_label_values(&[stage.as_str(), code.as_str()])
                    .inc();
                tracing::warn!(code = code.as_str(), "task failed");
                let _ = msg.ack_with(AckKind::Term).await;
                if let Some(r) = updated.record()
                    && let Err(e) =
                        crate::artifacts::delete_task_artifacts(self.artifacts.as_ref(), r).await
                {
                    tracing::warn!(error = %e, "cannot delete the failed task's artifacts");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record failure, NAKing");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }

    fn nak_delay(&self, delivered: u32) -> Duration {
        let base = self.runner.nak_delay_s.max(0.0);
        let exp = 2f64.powi(delivered.saturating_sub(1).min(16) as i32);
        Duration::from_secs_f64((base * exp).min(self.runner.nak_delay_max_s.max(base)))
    }
}

/// The inference job of a task whose face and audio stages are both done.
pub fn infer_job(record: &TaskRecord) -> Option<InferJob> {
    let face_track = record.output_of(Stage::Face, names::artifact::FACE_TRACK)?;
    let features = record.output_of(Stage::Audio, names::artifact::AUDIO_FEATURES)?;
    let video = record.output_of(Stage::Fetch, names::artifact::VIDEO)?;
    Some(InferJob {
        v: lipsync_schemas::WORK_VERSION,
        task_id: record.task_id.clone(),
        video: video.to_owned(),
        face_track: face_track.to_owned(),
        audio_features: features.to_owned(),
        video_stream: record.media.as_ref().and_then(|m| m.video_stream),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_up_cleaning_keeps_the_folders_of_live_replicas() {
        let root = tempfile::tempdir().unwrap();
        let make = |name: &str| std::fs::create_dir(root.path().join(name)).unwrap();
        // pid 1 is alive; 4194304 is above Linux's pid limit, so never alive.
        make("lipsync-job-face-1-abc");
        make("lipsync-job-face-4194304-abc");
        make(&format!("lipsync-job-face-{}-abc", std::process::id()));
        make("lipsync-job-mux-4194304-abc");
        make("unrelated");
        assert_eq!(clean_scratch(root.path(), Stage::Face), 2);
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "lipsync-job-face-1-abc",
                "lipsync-job-mux-4194304-abc",
                "unrelated"
            ]
        );
    }
}
