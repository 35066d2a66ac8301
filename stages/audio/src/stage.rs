//! The audio stage handler: 16 kHz WAV artifact -> log-mel -> encoder windows ->
//! feature artifact -> face/audio join.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lipsync_runtime::config::AudioConfig;
use lipsync_runtime::features::Dtype;
use lipsync_runtime::{ArtifactError, Change, JobCtx, JobError};
use lipsync_schemas::{AudioJob, ErrorCode, Stage, names};

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
    scratch: Option<PathBuf>,
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
        scratch: Option<PathBuf>,
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
            scratch,
            warning,
        })
    }
}

fn artifact_error(e: ArtifactError) -> JobError {
    match e {
        ArtifactError::NotFound(_) => JobError::permanent(
            ErrorCode::Internal,
            "the 16 kHz audio of this task is no longer available",
        ),
        other => JobError::from(other),
    }
}

#[async_trait]
impl lipsync_runtime::Handler for AudioStage {
    type Job = AudioJob;

    async fn handle(&self, ctx: JobCtx, job: AudioJob) -> Result<(), JobError> {
        let dir = match &self.scratch {
            Some(d) => tempfile::Builder::new().prefix("audio-").tempdir_in(d),
            None => tempfile::Builder::new().prefix("lipsync-audio-").tempdir(),
        }
        .map_err(JobError::transient)?;
        let wav = dir.path().join("audio_16k.wav");
        ctx.artifacts
            .get_to_file(&job.audio_16k, &wav)
            .await
            .map_err(artifact_error)?;
        ctx.progress(0.05, "audio: computing the log-mel").await?;

        let mel = {
            let wav = wav.clone();
            tokio::task::spawn_blocking(move || extract::mel_of_wav(&wav))
                .await
                .map_err(|e| JobError::transient(format!("mel task: {e}")))?
                .map_err(Error::into_job_error)?
        };
        let seconds = mel.frames as f64 / 100.0;
        ctx.check().await?;

        let out = dir.path().join("features.bin");
        let encoder =
            self.sessions[self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len()].clone();
        let settings = self.settings.clone();
        let runtime = tokio::runtime::Handle::current();
        let job_ctx = ctx.clone();
        let stopped: Arc<Mutex<Option<JobError>>> = Arc::default();
        let stop_slot = stopped.clone();
        let out_path = out.clone();
        let encoded = tokio::task::spawn_blocking(move || {
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
                    let step = runtime.block_on(async {
                        job_ctx.check().await?;
                        let f = 0.1 + 0.85 * i as f64 / n as f64;
                        job_ctx
                            .progress(f, &format!("audio: encoding window {} of {n}", i + 1))
                            .await
                    });
                    step.map_err(|e| {
                        *stop_slot.lock().expect("stop slot") = Some(e);
                        Error::Stopped
                    })
                },
            )
        })
        .await
        .map_err(|e| JobError::transient(format!("encoder task: {e}")))?;
        let positions = match encoded {
            Ok(t) => t,
            Err(Error::Stopped) => {
                let reason = stopped.lock().expect("stop slot").take();
                return Err(reason.unwrap_or(JobError::Interrupted));
            }
            Err(e) => return Err(e.into_job_error()),
        };

        let key = names::artifact_key(&ctx.task_id, names::artifact::AUDIO_FEATURES);
        ctx.artifacts
            .put_file(&key, &out)
            .await
            .map_err(JobError::from)?;
        let mut message =
            format!("audio: {seconds:.2} s encoded into {positions} feature positions");
        if let Some(w) = &self.warning {
            message = format!("{message} ({w})");
        }
        ctx.tasks
            .update(&ctx.task_id, |r| {
                if !r.artifacts.contains(&key) {
                    r.artifacts.push(key.clone());
                }
                r.message = message.clone();
                Change::Write
            })
            .await?;
        tracing::info!(task_id = %ctx.task_id, positions, seconds, "audio features stored");
        lipsync_runtime::join::complete_part(&ctx, Stage::Audio).await?;
        Ok(())
    }
}
