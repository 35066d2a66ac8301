//! The audio stage handler: 16 kHz WAV artifact -> log-mel -> encoder windows ->
//! feature artifact -> face/audio join.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lipsync_runtime::config::AudioConfig;
use lipsync_runtime::features::Dtype;
use lipsync_runtime::{JobCtx, JobError, Outcome};
use lipsync_schemas::{AudioJob, names};

use crate::encoder::{Device, EncoderOptions, OrtEncoder};
use crate::error::{Error, Result};
use crate::extract;
use crate::windows::{MAX_OVERLAP_POSITIONS, Plan};

/// Stage settings resolved from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Cross-fade overlap in encoder positions (0: the reference).
    pub overlap_positions: usize,
    /// Stored element type.
    pub dtype: Dtype,
    /// Session options.
    pub encoder: EncoderOptions,
}

impl Settings {
    /// Validates the `[audio]` section.
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad key.
    pub fn from_config(cfg: &AudioConfig) -> Result<Self> {
        let max_s = MAX_OVERLAP_POSITIONS as f64 / 50.0;
        if !(0.0..=max_s).contains(&cfg.window_overlap_s) {
            return Err(Error::Config(format!(
                "audio.window_overlap_s must be between 0 and {max_s}, not {}",
                cfg.window_overlap_s
            )));
        }
        let dtype = match cfg.features_dtype.as_str() {
            "f16" => Dtype::F16,
            "f32" => Dtype::F32,
            other => {
                return Err(Error::Config(format!(
                    "audio.features_dtype must be f16 or f32, not `{other}`"
                )));
            }
        };
        Ok(Self {
            overlap_positions: Plan::overlap_positions(cfg.window_overlap_s),
            dtype,
            encoder: EncoderOptions {
                device: cfg.device.parse::<Device>()?,
                intra_threads: cfg.intra_threads,
                dylib: cfg.ort_dylib_path.clone(),
            },
        })
    }
}

/// The audio stage: encoder sessions created once at start-up, one per concurrent job.
pub struct AudioStage {
    sessions: Vec<Arc<Mutex<OrtEncoder>>>,
    next: AtomicUsize,
    settings: Settings,
    warning: Option<String>,
}

impl AudioStage {
    /// Loads `sessions` encoder sessions of the model at `model`.
    ///
    /// # Errors
    /// When the model cannot be loaded.
    pub fn new(
        model: &std::path::Path,
        settings: Settings,
        sessions: usize,
        warning: Option<String>,
    ) -> Result<Self> {
        let sessions = (0..sessions.max(1))
            .map(|_| OrtEncoder::load(model, &settings.encoder).map(|e| Arc::new(Mutex::new(e))))
            .collect::<Result<Vec<_>>>()?;
        if let Some(first) = sessions.first() {
            let provider = first.lock().map(|e| e.provider()).unwrap_or("cpu");
            tracing::info!(
                sessions = sessions.len(),
                provider,
                overlap_positions = settings.overlap_positions,
                "audio encoder loaded"
            );
        }
        Ok(Self {
            sessions,
            next: AtomicUsize::new(0),
            settings,
            warning,
        })
    }
}

#[async_trait]
impl lipsync_runtime::Handler for AudioStage {
    type Job = AudioJob;

    async fn handle(&self, ctx: JobCtx, job: AudioJob) -> std::result::Result<Outcome, JobError> {
        let wav = ctx
            .read_artifact(&job.audio_16k, "audio_16k.wav", "16 kHz audio")
            .await?;
        ctx.progress(0.05, "audio: computing the log-mel").await?;
        let mel = {
            let wav = wav.clone();
            ctx.run_blocking("log-mel", move |_| extract::mel_of_wav(&wav))
                .await??
        };
        let seconds = mel.frames as f64 / 100.0;
        ctx.check().await?;

        let out = ctx.scratch_dir()?.join("features.bin");
        let encoder =
            self.sessions[self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len()].clone();
        let settings = self.settings.clone();
        let out_path = out.clone();
        let positions = ctx
            .run_blocking("audio encoder", move |b| {
                let mut encoder = encoder
                    .lock()
                    .map_err(|_| Error::Inference("encoder session poisoned".into()))?;
                extract::write_features(
                    &mel,
                    settings.overlap_positions,
                    &mut *encoder,
                    settings.dtype,
                    &out_path,
                    |i, n| {
                        if b.should_stop() {
                            return Err(Error::Stopped);
                        }
                        let f = 0.1 + 0.85 * i as f64 / n as f64;
                        b.progress(f, format!("audio: encoding window {} of {n}", i + 1));
                        Ok(())
                    },
                )
            })
            .await??;

        let key = ctx
            .store_artifact(names::artifact::AUDIO_FEATURES, &out)
            .await?;
        let mut message =
            format!("audio: {seconds:.2} s encoded into {positions} feature positions");
        if let Some(w) = &self.warning {
            message = format!("{message} ({w})");
        }
        ctx.progress(1.0, &message).await?;
        tracing::info!(positions, seconds, "audio features stored");
        Ok(Outcome::join([(names::artifact::AUDIO_FEATURES, key)]))
    }
}
