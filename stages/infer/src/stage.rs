//! The infer stage handler: fetch the inputs of a task, run the pipeline on one of this
//! process's GPU workers, store the crops and hand the task to mux.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lipsync_runtime::features::AudioFeatures;
use lipsync_runtime::media::LengthMode;
use lipsync_runtime::models::ResolvedProfile;
use lipsync_runtime::{ArtifactError, Change, Config, JobCtx, JobError, Updated};
use lipsync_schemas::{ErrorCode, FaceTrack, InferJob, MuxJob, names};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::crops::CropsCodec;
use crate::engine::{Device, Engine, EngineOptions};
use crate::error::InferError;
use crate::frames::CropGeometry;
use crate::mask::Mask;
use crate::pipeline::{self, Control, JobInputs, JobParams, Report};

/// The infer stage: the resolved profile, its mask and one [`Engine`] per GPU worker.
pub struct InferStage {
    profile: ResolvedProfile,
    mask: Arc<Mask>,
    engines: Mutex<Vec<Engine>>,
    codec: CropsCodec,
    length_mode: LengthMode,
    vae_sample: bool,
    prefetch: usize,
    scratch: PathBuf,
    /// When the workers last became idle (for `lipsync_infer_idle_seconds_total`).
    idle_since: Mutex<Option<std::time::Instant>>,
}

impl InferStage {
    /// Resolves the model profile and creates the sessions of every GPU worker.
    /// Blocking (model loading); call from a blocking context.
    ///
    /// # Errors
    /// Invalid settings, a missing or mismatched profile, or models that do not load.
    pub fn new(cfg: &Config) -> Result<Self, InferError> {
        let device: Device = cfg.infer.device.parse().map_err(InferError::BadRequest)?;
        let codec = CropsCodec::parse(&cfg.infer.crops_codec, cfg.infer.crops_crf)
            .map_err(InferError::BadRequest)?;
        let profile =
            lipsync_runtime::models::resolve(&cfg.models, &["vae_encoder", "vae_decoder", "unet"])
                .map_err(|e| InferError::Model(e.to_string()))?;
        let r = profile.profile.resolution as usize;
        if r == 0 || !r.is_multiple_of(8) {
            return Err(InferError::Model(format!(
                "profile resolution {r} is not a multiple of 8"
            )));
        }
        let mask = Mask::load(&profile.mask_path(), profile.profile.mask.size as usize, r)?;
        let opts = EngineOptions {
            device,
            intra_threads: cfg.infer.intra_threads,
            dylib: cfg.infer.ort_dylib_path.clone(),
        };
        let engines = (0..cfg.infer.gpu_workers.max(1))
            .map(|id| Engine::load(&profile, &opts, id))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(
            profile = %profile.name,
            resolution = r,
            provider = %engines[0].provider,
            workers = engines.len(),
            "models loaded"
        );
        if let Some(w) = profile.warning() {
            tracing::warn!(warning = %w, "test model profile in use");
        }
        Ok(Self {
            profile,
            mask: Arc::new(mask),
            engines: Mutex::new(engines),
            codec,
            length_mode: cfg.infer.length_mode,
            vae_sample: cfg.infer.vae_sample,
            prefetch: cfg.infer.prefetch_chunks,
            scratch: cfg
                .artifacts
                .scratch_dir
                .clone()
                .unwrap_or_else(std::env::temp_dir),
            idle_since: Mutex::new(Some(std::time::Instant::now())),
        })
    }

    /// Returns the resolved profile.
    pub fn profile(&self) -> &ResolvedProfile {
        &self.profile
    }

    /// Returns the execution provider of the first worker (`cpu` or `cuda:<id>`).
    pub fn provider(&self) -> String {
        self.engines
            .lock()
            .expect("engine pool")
            .first()
            .map(|e| e.provider.clone())
            .unwrap_or_default()
    }

    /// Returns the UNet runs of all workers since start-up.
    pub fn unet_runs(&self) -> u64 {
        self.engines
            .lock()
            .expect("engine pool")
            .iter()
            .map(|e| e.unet_runs)
            .sum()
    }

    /// Returns the job parameters for a request.
    pub fn params(&self, steps: u32, guidance: f64, seed: u64) -> JobParams {
        let p = &self.profile.profile;
        JobParams {
            geometry: CropGeometry {
                crop_w: p.face.crop_width as usize,
                crop_h: p.face.crop_height as usize,
                resolution: p.resolution as usize,
                fill: p.face.warp_fill,
            },
            steps,
            guidance,
            seed,
            vae_sample: self.vae_sample,
            length_mode: self.length_mode,
            frames_per_chunk: p.inference.frames_per_chunk.max(1),
            scaling: p.vae.scaling_factor,
            prefetch: self.prefetch,
            codec: self.codec,
        }
    }

    /// Runs one job on a free worker (blocking). Tests and the bench call this directly.
    ///
    /// # Errors
    /// See [`pipeline::run`]; also when no worker is free.
    pub fn run_blocking(
        &self,
        params: &JobParams,
        video: &Path,
        track: &FaceTrack,
        features: &AudioFeatures,
        out: &Path,
        control: &mut dyn Control,
    ) -> Result<Report, InferError> {
        let mut engine = self
            .engines
            .lock()
            .expect("engine pool")
            .pop()
            .ok_or_else(|| InferError::Model("no free gpu worker".into()))?;
        let m = crate::metrics::metrics();
        if let Some(since) = self.idle_since.lock().expect("idle clock").take() {
            m.idle_seconds
                .with_label_values(&["infer"])
                .inc_by(since.elapsed().as_secs_f64());
        }
        let inputs = JobInputs {
            video,
            track,
            features,
            mask: &self.mask,
        };
        let res = pipeline::run(
            &mut engine,
            &self.profile.profile.scheduler,
            params,
            &inputs,
            &self.scratch,
            out,
            control,
        );
        self.engines.lock().expect("engine pool").push(engine);
        *self.idle_since.lock().expect("idle clock") = Some(std::time::Instant::now());
        if let Ok(r) = &res {
            let outside = r.wall_time.saturating_sub(r.model_time);
            m.idle_seconds
                .with_label_values(&["infer"])
                .inc_by(outside.as_secs_f64());
            if r.output_frames > 0 {
                m.seconds_per_output_second
                    .with_label_values(&["infer"])
                    .observe(r.wall_time.as_secs_f64() / (r.output_frames as f64 / 25.0));
            }
        }
        res
    }
}

/// Forwards steps to the async side and stops when it says so.
struct ChannelControl {
    tx: mpsc::UnboundedSender<(u64, u64)>,
    stop: Arc<AtomicBool>,
}

impl Control for ChannelControl {
    fn step(&mut self, done: u64, total: u64) -> bool {
        let _ = self.tx.send((done, total));
        !self.stop.load(Ordering::SeqCst)
    }
}

fn artifact_error(e: ArtifactError) -> JobError {
    match e {
        ArtifactError::NotFound(_) => JobError::permanent(
            ErrorCode::Internal,
            "an intermediate result of this task is missing (expired or deleted)",
        ),
        other => JobError::transient(other),
    }
}

async fn read_all(ctx: &JobCtx, key: &str) -> Result<Vec<u8>, JobError> {
    let mut r = ctx.artifacts.get(key).await.map_err(artifact_error)?;
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)
        .await
        .map_err(|e| JobError::transient(format!("read {key}: {e}")))?;
    Ok(buf)
}

/// The work-queue handler around a shared [`InferStage`].
#[derive(Clone)]
pub struct InferHandler(pub Arc<InferStage>);

#[async_trait]
impl lipsync_runtime::Handler for InferHandler {
    type Job = InferJob;

    async fn handle(&self, ctx: JobCtx, job: InferJob) -> Result<(), JobError> {
        self.0.clone().handle_job(ctx, job).await
    }
}

impl InferStage {
    async fn handle_job(self: Arc<Self>, ctx: JobCtx, job: InferJob) -> Result<(), JobError> {
        let task_id = ctx.task_id.clone();
        let request = &ctx.record.request;
        let default_seed = self.profile.profile.inference.default_seed;
        let warning = self.profile.warning();
        let (steps, guidance) = (request.inference_steps, request.guidance_scale);
        if !(1..=1000).contains(&steps) || !guidance.is_finite() || guidance < 0.0 {
            return Err(JobError::permanent(
                ErrorCode::InvalidRequest,
                "inference_steps must be 1-1000 and guidance_scale a non-negative number",
            ));
        }

        if request.model != self.profile.name {
            return Err(JobError::permanent(
                ErrorCode::ModelUnavailable,
                format!(
                    "the task asks for model `{}`, but this inference stage runs `{}`",
                    request.model, self.profile.name
                ),
            ));
        }

        // Resolve and record the seed (a redelivery reuses it) and the test-model warning.
        let mut seed = request.seed.unwrap_or(default_seed);
        let updated = ctx
            .tasks
            .update(&task_id, |r| {
                seed = r.request.seed.unwrap_or(default_seed);
                r.request.seed = Some(seed);
                if let Some(w) = &warning
                    && !r.warnings.contains(w)
                {
                    r.warnings.push(w.clone());
                }
                r.message = match &warning {
                    Some(w) => format!("infer: started (seed {seed}); {w}"),
                    None => format!("infer: started (seed {seed})"),
                };
                Change::Write
            })
            .await?;
        match updated {
            Updated::Missing => return Err(JobError::Cancelled),
            Updated::Unchanged(r) if r.status.is_terminal() => return Err(JobError::Cancelled),
            _ => {}
        }

        // Inputs.
        let dir = tempfile::Builder::new()
            .prefix("lipsync-infer-")
            .tempdir_in(&self.scratch)
            .map_err(|e| JobError::transient(format!("scratch dir: {e}")))?;
        let video = dir.path().join("video");
        ctx.artifacts
            .get_to_file(&job.video, &video)
            .await
            .map_err(artifact_error)?;
        let track: FaceTrack = serde_json::from_slice(&read_all(&ctx, &job.face_track).await?)
            .map_err(|e| JobError::permanent(ErrorCode::Internal, format!("face track: {e}")))?;
        let features = AudioFeatures::read_from(&read_all(&ctx, &job.audio_features).await?[..])
            .map_err(|e| {
                JobError::permanent(ErrorCode::Internal, format!("audio features: {e}"))
            })?;
        let n_out = pipeline::output_frames(&track, &features, self.length_mode);
        ctx.check().await?;

        // Inference on a blocking thread; steps come back for progress and cancellation.
        let params = self.params(steps, guidance, seed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut control = ChannelControl {
            tx,
            stop: stop.clone(),
        };
        let crops = dir.path().join("crops.mkv");
        let this = self.clone();
        let (video_path, crops_path) = (video.clone(), crops.clone());
        let mut work = tokio::task::spawn_blocking(move || {
            this.run_blocking(
                &params,
                &video_path,
                &track,
                &features,
                &crops_path,
                &mut control,
            )
        });
        let mut stopped_by: Option<JobError> = None;
        let steps_gauge = crate::metrics::metrics()
            .steps_per_second
            .with_label_values(&["infer"]);
        let steps_started = std::time::Instant::now();
        let result = loop {
            tokio::select! {
                res = &mut work => break res,
                Some((done, total)) = rx.recv() => {
                    if stopped_by.is_some() {
                        continue;
                    }
                    steps_gauge.set(done as f64 / steps_started.elapsed().as_secs_f64().max(1e-3));
                    let msg = format!("infer: denoising step {done}/{total}");
                    let fraction = done as f64 / total.max(1) as f64;
                    let res = match ctx.progress(fraction, &msg).await {
                        Ok(()) => ctx.check().await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = res {
                        stop.store(true, Ordering::SeqCst);
                        stopped_by = Some(e);
                    }
                }
            }
        };
        steps_gauge.set(0.0);
        let report = match result {
            Ok(Ok(r)) => r,
            Ok(Err(InferError::Stopped)) => {
                return Err(stopped_by.unwrap_or(JobError::Cancelled));
            }
            Ok(Err(e)) => return Err(e.into_job_error()),
            Err(join) => {
                return Err(JobError::permanent(
                    ErrorCode::Internal,
                    format!("inference worker crashed: {join}"),
                ));
            }
        };
        tracing::info!(
            %task_id,
            seed,
            frames = report.output_frames,
            chunks = report.chunks_generated,
            unet_steps = report.unet_steps,
            ms_per_unet_step = report.unet_time_ms_per_step(),
            duty_cycle = report.duty_cycle(),
            wall_s = report.wall_time.as_secs_f64(),
            "inference done"
        );

        // Store the crops, then hand over to mux.
        let crops_key = names::artifact_key(&task_id, names::artifact::CROPS);
        ctx.artifacts.put_file(&crops_key, &crops).await?;
        ctx.tasks
            .update(&task_id, |r| {
                if r.artifacts.contains(&crops_key) {
                    return Change::Skip;
                }
                r.artifacts.push(crops_key.clone());
                Change::Write
            })
            .await?;
        ctx.check().await?;
        let mux = MuxJob {
            v: lipsync_schemas::WORK_VERSION,
            task_id: task_id.clone(),
            video: job.video.clone(),
            face_track: job.face_track.clone(),
            crops: crops_key,
            audio_original: names::artifact_key(&task_id, names::artifact::AUDIO_ORIGINAL),
            audio_16k: names::artifact_key(&task_id, names::artifact::AUDIO_16K),
            output_frames: n_out as u64,
            length_mode: length_mode_name(self.length_mode).to_owned(),
        };
        ctx.publish(&mux).await?;
        ctx.progress(1.0, "infer: done").await?;
        Ok(())
    }
}

/// Returns the wire word of a length mode (`MuxJob::length_mode`).
pub fn length_mode_name(mode: LengthMode) -> &'static str {
    match mode {
        LengthMode::Pingpong => "pingpong",
        LengthMode::Loop => "loop",
        LengthMode::Cut => "cut",
    }
}
