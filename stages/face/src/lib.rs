//! lipsync face stage: consumes `lipsync.work.face` ([`FaceJob`](lipsync_schemas::FaceJob)),
//! decodes the video at 25 fps with the shared recipe (streaming), detects faces with
//! landmarks through ONNX Runtime in batches, chooses the face per frame, computes
//! LatentSync's alignment affine with translation smoothing, writes the face-track
//! artifact (`<task>/face_track.json`) and records its part of the face/audio join, which
//! publishes `lipsync.work.infer` once the audio features are ready too.
//!
//! Layout: [`detect`] (RetinaFace, BlazeFace, InsightFace decoders, NMS, sessions),
//! [`select`] (LatentSync's filters and the face choice), [`align`] (anchors and the
//! similarity transform), [`track`] (per-frame track, gap bridging, missing-face policy),
//! [`pipeline`] (decoder thread + bounded channel + detector loop), [`stage`] (the job
//! handler), [`preview`] (the debugging video). Run with `lipsync-face` (serve) or
//! `lipsync-face track <video> --out track.json`.

pub mod align;
pub mod detect;
pub mod error;
pub mod geometry;
pub mod pipeline;
pub mod preview;
pub mod select;
pub mod settings;
pub mod stage;
pub mod track;

pub use error::FaceError;
pub use settings::{FaceSettings, Geometries};
pub use stage::FaceStage;

use lipsync_runtime::{Config, StageServer, StageSpec};
use tokio_util::sync::CancellationToken;

/// Validates the configuration, loads the detector and the model geometry, and starts
/// the stage (tests use the returned server's address and `wait`).
///
/// # Errors
/// Invalid configuration, a missing detector model or manifest, or NATS start-up errors.
pub async fn start(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<StageServer> {
    let settings = FaceSettings::from_config(&cfg.face)?;
    let geometries = Geometries::load(&cfg.models)?;
    let stage = tokio::task::spawn_blocking(move || FaceStage::new(settings, geometries)).await??;
    lipsync_runtime::start_stage(
        cfg,
        StageSpec {
            name: "lipsync-face",
            listen: cfg.face.listen,
            concurrency: cfg.face.concurrency,
            device: None,
        },
        stage,
        shutdown,
    )
    .await
}

/// Runs the face stage until `shutdown` is cancelled and the stage has drained.
///
/// # Errors
/// As [`start`], or when the stage stops with an error.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(&cfg, shutdown).await?.wait().await
}
