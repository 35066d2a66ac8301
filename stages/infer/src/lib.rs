//! lipsync infer stage: LatentSync diffusion through ONNX Runtime, one job per GPU.
//!
//! Consumes `lipsync.work.infer` ([`lipsync_schemas::InferJob`]: video, face track, audio
//! features), runs the reference pipeline ([`pipeline`]: warp, VAE encode, DDIM with
//! classifier-free guidance, VAE decode, paste-back) and stores the generated `R x R`
//! crops as one near-lossless Matroska artifact (`<task>/crops.mkv`, one frame per output
//! frame at 25 fps), then publishes `lipsync.work.mux` ([`lipsync_schemas::MuxJob`]).
//!
//! A one-permit consumer: `infer.gpu_workers` jobs at once per process (one per GPU);
//! the consumer's cluster-wide ceiling is the deployment's `nats.infer_max_in_flight`. Sessions are created once at start-up.
//!
//! Run: `lipsync-infer` (config: `[infer]`, `[models]`; `ORT_DYLIB_PATH` names the ONNX
//! Runtime library). `lipsync-infer bench` runs the pipeline on a local clip without NATS.

pub mod crops;
pub mod ddim;
pub mod engine;
mod error;
pub mod frames;
pub mod image;
pub mod mask;
pub mod metrics;
pub mod noise;
pub mod pipeline;
mod stage;
pub mod synthetic;

pub use error::{InferError, Result};
pub use stage::{InferHandler, InferStage, length_mode_name};

use std::sync::Arc;

use lipsync_runtime::{Config, StageServer, StageSpec};
use tokio_util::sync::CancellationToken;

/// Load the models and start the infer stage (tests use the returned server).
///
/// # Errors
/// Invalid settings, unusable models (`model_unavailable`), or NATS unreachable.
pub async fn start(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<StageServer> {
    let stage_cfg = cfg.clone();
    let stage = tokio::task::spawn_blocking(move || InferStage::new(&stage_cfg))
        .await
        .map_err(|e| anyhow::anyhow!("model loading panicked: {e}"))?
        .map_err(|e| anyhow::anyhow!("infer stage cannot start: {e}"))?;
    let workers = cfg.infer.gpu_workers.max(1);
    lipsync_runtime::start_stage(
        cfg,
        StageSpec {
            name: "lipsync-infer",
            listen: cfg.infer.listen,
            concurrency: workers,
            device: engine::provider_info().map(engine::ProviderInfo::device_json),
        },
        InferHandler(Arc::new(stage)),
        shutdown,
    )
    .await
}

/// Run the infer stage until `shutdown` is cancelled and the stage has drained.
///
/// # Errors
/// See [`start`].
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(&cfg, shutdown).await?.wait().await
}
