//! lipsync mux stage: the last step of a task (docs/architecture.md §4).
//!
//! Consumes `lipsync.work.mux` ([`lipsync_schemas::MuxJob`]); produces the artifacts
//! `<task_id>/result.mp4` and `<task_id>/mask.mp4` (optionally also
//! `{mux.local_dir}/{task_id}/`), PUTs the result to the task's `output_upload_url` when it
//! has one ([`upload`]), then marks the task `completed` with both URLs and deletes its
//! intermediates. Publishes no further work.
//!
//! Layout:
//! - [`source`]: original frames by index (shared 25 fps decoder; backward ping-pong
//!   laps re-decoded into an in-memory window) and the generated crops in order;
//! - [`blend`] (with `resize` and `morph`): the reference's restore step, on the face's
//!   bounding rectangle only;
//! - [`encode`]: streaming ffmpeg H.264 encoders fed from writer threads;
//! - [`render`]: the per-frame pipeline on local files;
//! - [`upload`]: the guarded, retried PUT of the result to a client's URL;
//! - [`MuxStage`]: the queue handler.
//!
//! Run with `lipsync-mux` (see `--help`); `lipsync-mux render ...` runs the pipeline on
//! local files without NATS (used by `bench/mux.sh`).

pub mod blend;
pub mod encode;
mod error;
mod morph;
pub mod render;
mod resize;
pub mod source;
mod stage;
pub mod upload;

pub use error::{MuxError, Result};
pub use stage::{AudioChoice, MuxStage};

use lipsync_runtime::{Config, StageServer, StageSpec};
use tokio_util::sync::CancellationToken;

/// Start the mux stage (tests use the returned server's address and `wait`).
///
/// # Errors
/// Invalid `[mux]` settings, or NATS cannot be reached.
pub async fn start(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<StageServer> {
    let stage = MuxStage::from_config(cfg)
        .map_err(|e| anyhow::anyhow!("invalid mux configuration: {e}"))?;
    lipsync_runtime::start_stage(
        cfg,
        StageSpec {
            name: "lipsync-mux",
            listen: cfg.mux.listen,
            concurrency: cfg.mux.concurrency,
            device: None,
        },
        stage,
        shutdown,
    )
    .await
}

/// Run the mux stage until `shutdown` is cancelled and the stage has drained.
///
/// # Errors
/// As [`start`], or the stage stopped with an error.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(&cfg, shutdown).await?.wait().await
}
