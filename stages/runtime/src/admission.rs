//! Admission at the entry only. `POST /sync` asks [`admit`] before it creates a task: while
//! the work stream holds `nats.max_queued_jobs` messages, new tasks are refused (503).
//!
//! Every accepted task that has not ended holds at least one message in the stream (the
//! job of the stage working on it, acknowledged only after the next one is published)
//! and at most three (fetch's, handing on to face and audio). Admitting only below
//! `max_queued_jobs` keeps accepted tasks at or below that number, so their hand-offs
//! need at most `3 x max_queued_jobs`; the stream's own limit is set above that
//! (`NatsConfig::work_stream_max_messages`) and a hand-off never meets a full stream.
//! Gateways deciding at the same moment can overshoot by the number deciding at once,
//! which the extra 64 messages absorb.

use async_nats::jetstream;
use lipsync_schemas::names;

use crate::config::NatsConfig;

/// Why a task was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The work queue is at its admission limit.
    #[error("the work queue is full ({queued} of {limit} messages)")]
    Full {
        /// Messages in the work stream now.
        queued: u64,
        /// The admission limit.
        limit: i64,
    },
    /// The stream could not be read.
    #[error("work queue unavailable: {0}")]
    Unavailable(String),
}

/// Admit a new task, or say why not.
///
/// # Errors
/// [`AdmitError::Full`] at the limit, [`AdmitError::Unavailable`] when NATS fails.
pub async fn admit(js: &jetstream::Context, cfg: &NatsConfig) -> Result<(), AdmitError> {
    if cfg.max_queued_jobs <= 0 {
        return Ok(());
    }
    let stream = js
        .get_stream_no_info(names::WORK_STREAM)
        .await
        .map_err(|e| AdmitError::Unavailable(e.to_string()))?;
    let info = stream
        .get_info()
        .await
        .map_err(|e| AdmitError::Unavailable(e.to_string()))?;
    let queued = info.state.messages;
    if queued >= cfg.max_queued_jobs as u64 {
        return Err(AdmitError::Full {
            queued,
            limit: cfg.max_queued_jobs,
        });
    }
    Ok(())
}
