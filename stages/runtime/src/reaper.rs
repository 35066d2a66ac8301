//! Ends tasks whose job exhausted its deliveries without any attempt getting to say so:
//! every delivery crashed its process (OOM, eviction, SIGKILL). JetStream publishes a
//! max-deliveries advisory when it gives up on such a message; the bootstrap keeps those
//! advisories in the stream `LIPSYNC_ADVISORIES`, so one that arrives while every replica
//! is down waits there. Every stage process pulls from its shared durable consumer: the
//! task fails with `retries_exhausted`, its artifacts are deleted and the message leaves
//! the work stream.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use lipsync_schemas::{ErrorCode, Stage, TaskError, names};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::artifacts::ArtifactStore;
use crate::metrics::StageMetrics;
use crate::tasks::TaskStore;

/// The fields of a max-deliveries advisory that matter here.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream: String,
    consumer: String,
    stream_seq: u64,
    #[serde(default)]
    deliveries: u64,
}

/// What handling one advisory did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reaped {
    /// The task was failed and the message removed.
    Failed(String),
    /// The message was gone or its task had ended; nothing to do.
    Nothing,
}

/// Pull advisories until `shutdown`; failures are retried by redelivery.
pub async fn run(
    js: jetstream::Context,
    tasks: TaskStore,
    artifacts: Arc<dyn ArtifactStore>,
    metrics: StageMetrics,
    shutdown: CancellationToken,
) {
    let consumer = loop {
        let got = async {
            let stream = js.get_stream(names::ADVISORY_STREAM).await.ok()?;
            stream
                .get_consumer::<jetstream::consumer::pull::Config>(names::REAPER_CONSUMER)
                .await
                .ok()
        };
        if let Some(c) = got.await {
            break c;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    };
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return,
            b = consumer.batch().max_messages(8).expires(Duration::from_secs(5)).messages() => b,
        };
        let Ok(mut batch) = batch else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        };
        while let Some(Ok(msg)) = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = batch.next() => m,
        } {
            match reap(&js, &tasks, artifacts.as_ref(), &msg.payload).await {
                Ok(outcome) => {
                    if let Reaped::Failed(task_id) = &outcome {
                        tracing::warn!(%task_id, "every delivery of a job crashed; task failed");
                        let stage = serde_json::from_slice::<MaxDeliveries>(&msg.payload)
                            .map(|a| a.consumer)
                            .unwrap_or_default();
                        if stage.parse::<Stage>().is_ok() {
                            metrics
                                .job_events
                                .with_label_values(&[stage.as_str(), "reaped"])
                                .inc();
                        }
                    }
                    let _ = msg.double_ack().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot handle a max-deliveries advisory yet");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(Duration::from_secs(2))))
                        .await;
                }
            }
        }
    }
}

/// Handle one advisory body. `Err` means "try again later".
pub async fn reap(
    js: &jetstream::Context,
    tasks: &TaskStore,
    artifacts: &dyn ArtifactStore,
    body: &[u8],
) -> Result<Reaped, String> {
    let Ok(adv) = serde_json::from_slice::<MaxDeliveries>(body) else {
        return Ok(Reaped::Nothing);
    };
    if adv.stream != names::WORK_STREAM {
        return Ok(Reaped::Nothing);
    }
    let stage = adv.consumer.parse::<Stage>().ok();
    let stream = js
        .get_stream(names::WORK_STREAM)
        .await
        .map_err(|e| format!("work stream: {e}"))?;
    let msg = match stream.get_raw_message(adv.stream_seq).await {
        Ok(m) => m,
        // Already acknowledged or removed: the job ended after all.
        Err(_) => return Ok(Reaped::Nothing),
    };
    let Some(task_id) = lipsync_schemas::salvage_task_id(&msg.payload) else {
        let _ = stream.delete_message(adv.stream_seq).await;
        return Ok(Reaped::Nothing);
    };
    let what = stage.map_or_else(|| adv.consumer.clone(), |s| s.to_string());
    let err = TaskError::new(
        ErrorCode::RetriesExhausted,
        format!(
            "{what} stopped on each of {} delivery attempts without finishing (the process \
             crashed or was killed every time)",
            adv.deliveries.max(1)
        ),
    );
    let updated = tasks
        .fail(&task_id, stage, err)
        .await
        .map_err(|e| e.to_string())?;
    let failed_now = matches!(&updated, crate::tasks::Updated::Written(_));
    if let Some(r) = updated.record()
        && r.status == lipsync_schemas::Status::Failed
        && let Err(e) = crate::artifacts::delete_task_artifacts(artifacts, r).await
    {
        tracing::warn!(%task_id, error = %e, "cannot delete the failed task's artifacts");
    }
    stream
        .delete_message(adv.stream_seq)
        .await
        .map_err(|e| format!("delete message {}: {e}", adv.stream_seq))?;
    Ok(if failed_now {
        Reaped::Failed(task_id)
    } else {
        Reaped::Nothing
    })
}
