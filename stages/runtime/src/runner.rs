//! The stage runner: a durable pull-consumer loop shared by every stage (design §3).
//!
//! - pulls one message per free permit (`concurrency` permits; the GPU stage uses 1), so a
//!   process fetches the next job only when it has room for it;
//! - sends in-progress acks every `ack_wait/3` while a job runs;
//! - transient errors: NAK with an exponential delay; on the last delivery the task fails
//!   with `retries_exhausted` and the message is terminated;
//! - permanent errors: the failure is written to the task record first, then TERM;
//! - records that ended (completed, failed, cancelled) are acknowledged and skipped;
//! - on shutdown: stop pulling, give in-flight jobs `shutdown_grace_s` to finish, then
//!   interrupt them and NAK so another process picks them up at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use async_trait::async_trait;
use futures::StreamExt;
use lipsync_schemas::{ErrorCode, Stage, TaskError, TaskRecord, WorkItem, names};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::artifacts::ArtifactStore;
use crate::config::{NatsConfig, RunnerConfig};
use crate::metrics::StageMetrics;
use crate::tasks::{TaskStore, Updated};

/// How a job ended badly.
#[derive(Debug)]
pub enum JobError {
    /// Worth another delivery (network, NATS, a busy resource).
    Transient(String),
    /// Will fail the same way again (bad media, no face): the task fails now.
    Permanent(TaskError),
    /// The task was cancelled or ended elsewhere while the job ran.
    Cancelled,
    /// The process is shutting down; the job goes back to the queue at once.
    Interrupted,
}

impl JobError {
    /// A permanent failure with a code and message.
    pub fn permanent(code: ErrorCode, message: impl Into<String>) -> Self {
        JobError::Permanent(TaskError::new(code, message))
    }
    /// A transient failure.
    pub fn transient(message: impl std::fmt::Display) -> Self {
        JobError::Transient(message.to_string())
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Transient(m) => write!(f, "transient: {m}"),
            JobError::Permanent(e) => write!(f, "{}: {}", e.code, e.message),
            JobError::Cancelled => f.write_str("cancelled"),
            JobError::Interrupted => f.write_str("interrupted by shutdown"),
        }
    }
}

impl From<crate::tasks::TaskStoreError> for JobError {
    fn from(e: crate::tasks::TaskStoreError) -> Self {
        JobError::Transient(e.to_string())
    }
}

impl From<crate::artifacts::ArtifactError> for JobError {
    fn from(e: crate::artifacts::ArtifactError) -> Self {
        JobError::Transient(e.to_string())
    }
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
    /// JetStream, for publishing follow-up work.
    pub js: jetstream::Context,
    interrupt: CancellationToken,
    throttle: Arc<Mutex<Throttle>>,
}

struct Throttle {
    last_write: Option<Instant>,
    last_check: Option<Instant>,
    interval: Duration,
}

impl JobCtx {
    /// Report progress: `fraction` of this stage's own work (mapped into the stage's
    /// band). Writes are throttled; a fraction of 1.0 is always written.
    pub async fn progress(&self, fraction: f64, message: &str) -> Result<(), JobError> {
        {
            let mut t = self.throttle.lock().await;
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
    /// process is shutting down past its grace period. Reads KV at most every 250 ms.
    pub async fn check(&self) -> Result<(), JobError> {
        if self.interrupt.is_cancelled() {
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

    /// Token cancelled when the job must stop now (shutdown past grace).
    pub fn interrupted(&self) -> &CancellationToken {
        &self.interrupt
    }

    /// Publish follow-up work with `Nats-Msg-Id = <task>:<stage>` and wait for the ack.
    pub async fn publish<W: WorkItem>(&self, item: &W) -> Result<(), JobError> {
        publish_work(&self.js, item)
            .await
            .map_err(JobError::Transient)
    }
}

/// Publish a work item durably (waits for the stream's ack) with Msg-Id dedup.
/// Returns `Err` with a message when the stream refused it or NATS is unreachable.
pub async fn publish_work<W: WorkItem>(js: &jetstream::Context, item: &W) -> Result<(), String> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        names::msg_id(item.task_id(), W::STAGE).as_str(),
    );
    headers.insert(
        names::SCHEMA_VERSION_HEADER,
        item.version().to_string().as_str(),
    );
    let body = serde_json::to_vec(item).map_err(|e| e.to_string())?;
    let ack = js
        .publish_with_headers(names::work_subject(W::STAGE), headers, body.into())
        .await
        .map_err(|e| format!("publish {}: {e}", W::STAGE))?;
    ack.await
        .map_err(|e| format!("publish {} not acknowledged: {e}", W::STAGE))?;
    Ok(())
}

/// The work a stage does for one job.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The work item this stage consumes.
    type Job: WorkItem;
    /// Do the work. On success the runner records the stage as finished and acks.
    async fn handle(&self, ctx: JobCtx, job: Self::Job) -> Result<(), JobError>;
}

/// Runner settings and handles.
pub struct Runner<H: Handler> {
    /// The stage's handler.
    pub handler: Arc<H>,
    /// Jobs at once in this process.
    pub concurrency: usize,
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

    async fn process(&self, msg: jetstream::Message, interrupt: CancellationToken) {
        let stage = H::Job::STAGE;
        let label = stage.as_str();
        let delivered = msg.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
        if delivered > 1 {
            self.metrics
                .jobs_redelivered
                .with_label_values(&[label])
                .inc();
        }
        let job: H::Job = match lipsync_schemas::decode(&msg.payload) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(%stage, error = %e, "undecodable work item, terminating it");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let task_id = job.task_id().to_owned();
        let span = tracing::info_span!("job", %stage, task_id = %task_id, attempt = delivered);
        let _enter = span.enter();
        drop(_enter);

        // Skip work for tasks that ended or vanished.
        let record = match self.tasks.get(&task_id).await {
            Ok(Some((r, _))) => r,
            Ok(None) => {
                tracing::warn!(%stage, %task_id, "no task record, dropping work item");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                tracing::warn!(%stage, %task_id, error = %e, "task store unavailable");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(self.nak_delay(delivered))))
                    .await;
                return;
            }
        };
        if record.status.is_terminal() || record.cancel_requested {
            tracing::info!(%stage, %task_id, status = record.status.as_str(), "task already ended, skipping");
            let _ = msg.double_ack().await;
            return;
        }
        let record = match self.tasks.mark_started(&task_id, stage, delivered).await {
            Ok(Updated::Written(r)) | Ok(Updated::Unchanged(r)) if !r.status.is_terminal() => r,
            Ok(_) => {
                let _ = msg.double_ack().await;
                return;
            }
            Err(e) => {
                tracing::warn!(%stage, %task_id, error = %e, "cannot mark task started");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(self.nak_delay(delivered))))
                    .await;
                return;
            }
        };

        self.metrics.jobs_started.with_label_values(&[label]).inc();
        self.metrics.in_flight.with_label_values(&[label]).inc();
        let started = Instant::now();

        let ctx = JobCtx {
            task_id: task_id.clone(),
            stage,
            attempt: delivered,
            record: Arc::new(*record),
            tasks: self.tasks.clone(),
            artifacts: self.artifacts.clone(),
            js: self.js.clone(),
            interrupt: interrupt.clone(),
            throttle: Arc::new(Mutex::new(Throttle {
                last_write: None,
                last_check: None,
                interval: Duration::from_millis(self.runner.progress_interval_ms),
            })),
        };

        // In-progress acks keep the message ours while the job runs.
        let heartbeat_stop = CancellationToken::new();
        let beat = {
            let stop = heartbeat_stop.clone();
            let every = Duration::from_secs(self.nats.ack_wait_s.max(3)) / 3;
            let msg_ack = msg.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(every) => {
                            if let Err(e) = msg_ack.ack_with(AckKind::Progress).await {
                                tracing::debug!(error = %e, "progress ack failed");
                            }
                        }
                    }
                }
            })
        };

        let result = self.handler.handle(ctx, job).await;
        heartbeat_stop.cancel();
        let _ = beat.await;
        self.metrics.in_flight.with_label_values(&[label]).dec();
        self.metrics
            .job_duration
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());

        match result {
            Ok(()) => {
                if let Err(e) = self.tasks.mark_finished(&task_id, stage).await {
                    tracing::warn!(%stage, %task_id, error = %e, "cannot record stage end");
                }
                self.metrics
                    .jobs_succeeded
                    .with_label_values(&[label])
                    .inc();
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(%stage, %task_id, error = %e, "ack failed; the job may be redelivered");
                }
                tracing::info!(%stage, %task_id, secs = started.elapsed().as_secs_f64(), "job done");
            }
            Err(JobError::Cancelled) => {
                tracing::info!(%stage, %task_id, "task ended while the job ran");
                let _ = msg.double_ack().await;
            }
            Err(JobError::Interrupted) => {
                tracing::info!(%stage, %task_id, "job interrupted by shutdown, returning it");
                let _ = msg.ack_with(AckKind::Nak(None)).await;
            }
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
                    tracing::warn!(%stage, %task_id, attempt = delivered, delay_s = delay.as_secs_f64(), %reason, "transient failure, retrying later");
                    self.metrics.jobs_retried.with_label_values(&[label]).inc();
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                }
            }
        }
    }

    /// Write the failure to the task record, then terminate the message. If the record
    /// cannot be written the message is NAKed instead, so the failure is never lost.
    async fn fail_then_term(&self, msg: &jetstream::Message, task_id: &str, err: TaskError) {
        let stage = H::Job::STAGE;
        let code = err.code;
        match self.tasks.fail(task_id, Some(stage), err).await {
            Ok(_) => {
                self.metrics
                    .jobs_failed
                    .with_label_values(&[stage.as_str(), code.as_str()])
                    .inc();
                tracing::warn!(%stage, %task_id, code = code.as_str(), "task failed");
                let _ = msg.ack_with(AckKind::Term).await;
            }
            Err(e) => {
                tracing::error!(%stage, %task_id, error = %e, "cannot record failure, NAKing");
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
