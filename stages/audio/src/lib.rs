//! lipsync audio stage: Whisper log-mel and encoder features.
//!
//! Consumes `lipsync.work.audio` ([`lipsync_schemas::AudioJob`]: the 16 kHz mono WAV
//! artifact the fetch stage stored), computes Whisper's log-mel exactly ([`mel`]), runs
//! the `whisper_encoder` model of the resolved profile over 30 s windows through ONNX
//! Runtime ([`encoder`], [`windows`]; optional cross-faded overlap), stores the (T, 5,
//! 384) features as the `audio_features` artifact and records its part of the face/audio
//! join, which publishes `lipsync.work.infer` when the face track is done too.
//!
//! Run with `lipsync-audio` (serves the stage), or `lipsync-audio mel <audio> --out
//! mel.npy` / `lipsync-audio features <audio> --out features.npy` to inspect a file.

pub mod encoder;
pub mod error;
pub mod extract;
pub mod mel;
pub mod pcm;
mod stage;
pub mod windows;

pub use error::{Error, Result};
pub use stage::{AudioStage, Settings};

use lipsync_runtime::{Config, StageServer, StageSpec};
use tokio_util::sync::CancellationToken;

/// Resolves the model, loads the encoder sessions and builds the stage handler.
///
/// # Errors
/// When the configuration is invalid or the model is unavailable.
pub fn build(cfg: &Config) -> anyhow::Result<AudioStage> {
    let settings = Settings::from_config(&cfg.audio)?;
    let profile = lipsync_runtime::models::resolve(&cfg.models, &["whisper_encoder"])?;
    let model = profile
        .model_path("whisper_encoder")
        .ok_or_else(|| anyhow::anyhow!("profile `{}` has no whisper_encoder", profile.name))?;
    if let Some(w) = profile.warning() {
        tracing::warn!(profile = %profile.name, "{w}");
    }
    Ok(AudioStage::new(
        &model,
        settings,
        cfg.audio.concurrency,
        profile.warning(),
    )?)
}

/// Starts the audio stage (tests use the returned server's address and `wait`).
///
/// # Errors
/// When the model cannot be loaded or NATS cannot be reached.
pub async fn start(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<StageServer> {
    let handler = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || build(&cfg)).await??
    };
    lipsync_runtime::start_stage(
        cfg,
        StageSpec {
            name: "lipsync-audio",
            listen: cfg.audio.listen,
            concurrency: cfg.audio.concurrency,
            device: None,
        },
        handler,
        shutdown,
    )
    .await
}

/// Runs the audio stage until `shutdown` is cancelled and the stage has drained.
///
/// # Errors
/// As [`start`].
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(&cfg, shutdown).await?.wait().await
}
