//! The infer stage handler: fetch the inputs of a task, run the pipeline on one of this
//! process's GPU workers, store the crops and hand the task to mux.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lipsync_runtime::features::AudioFeatures;
use lipsync_runtime::media::LengthMode;
use lipsync_runtime::models::ResolvedProfile;
use lipsync_runtime::{Blocking, Change, Config, JobCtx, JobError, Outcome, Updated};
use lipsync_schemas::{ErrorCode, FaceTrack, InferJob, MuxJob, NextWork, names};

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
        let profile = lipsync_runtime::models::resolve(
            &cfg.models,
            &["vae_encoder", "vae_decoder", "unet", "ddim_step"],
        )
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
        let extras = crate::engine::EngineExtras::from_config(cfg)?;
        let engines = (0..cfg.infer.gpu_workers.max(1))
            .map(|id| Engine::load_with(&profile, &opts, &extras, id))
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
            video_stream: None,
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
        // A panic in a pipeline thread fails this run only: the engine goes back to the
        // pool (its sessions hold no per-run state) and the worker keeps serving.
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pipeline::run(
                &mut engine,
                &self.profile.profile.scheduler,
                params,
                &inputs,
                &self.scratch,
                out,
                control,
            )
        }));
        self.engines.lock().expect("engine pool").push(engine);
        let res = res.unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(InferError::Panicked(msg))
        });
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

/// Forwards steps to the job's progress and stops when it must.
struct JobControl<'a>(&'a Blocking);

impl Control for JobControl<'_> {
    fn step(&mut self, done: u64, total: u64) -> bool {
        let fraction = done as f64 / total.max(1) as f64;
        self.0
            .progress(fraction, format!("infer: denoising step {done}/{total}"));
        !self.0.should_stop()
    }
}

/// The work-queue handler around a shared [`InferStage`].
#[derive(Clone)]
pub struct InferHandler(pub Arc<InferStage>);

#[async_trait]
impl lipsync_runtime::Handler for InferHandler {
    type Job = InferJob;

    async fn handle(&self, ctx: JobCtx, job: InferJob) -> Result<Outcome, JobError> {
        self.0.clone().handle_job(ctx, job).await
    }
}

impl InferStage {
    async fn handle_job(self: Arc<Self>, ctx: JobCtx, job: InferJob) -> Result<Outcome, JobError> {
        let task_id = ctx.task_id.clone();
        let request = &ctx.record.request;
        let default_seed = self.profile.profile.inference.default_seed;
        let provider = self.provider();
        let warning = self.profile.warning().or_else(|| {
            (provider == "cpu").then(|| {
                "inference runs on the CPU (infer.device = cpu): expect hours for this task"
                    .to_owned()
            })
        });
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
                    Some(w) => format!("infer: started on {provider} (seed {seed}); {w}"),
                    None => format!("infer: started on {provider} (seed {seed})"),
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
        let video = ctx.read_artifact(&job.video, "video", "video").await?;
        let track: FaceTrack = serde_json::from_slice(
            &ctx.read_artifact_bytes(&job.face_track, "face track")
                .await?,
        )
        .map_err(|e| JobError::permanent(ErrorCode::Internal, format!("face track: {e}")))?;
        let features = AudioFeatures::read_from(
            &ctx.read_artifact_bytes(&job.audio_features, "audio features")
                .await?[..],
        )
        .map_err(|e| JobError::permanent(ErrorCode::Internal, format!("audio features: {e}")))?;
        let n_out = pipeline::output_frames(&track, &features, self.length_mode);
        ctx.check().await?;

        // Inference on a blocking thread; steps come back for progress and cancellation.
        let mut params = self.params(steps, guidance, seed);
        params.video_stream = job.video_stream;
        let crops = ctx.scratch_dir()?.join("crops.mkv");
        let this = self.clone();
        let crops_path = crops.clone();
        let steps_gauge = crate::metrics::metrics()
            .steps_per_second
            .with_label_values(&["infer"]);
        let gauge = steps_gauge.clone();
        let report = ctx
            .run_blocking("inference", move |b| {
                let started = std::time::Instant::now();
                let mut control = RateControl {
                    inner: JobControl(b),
                    gauge,
                    started,
                };
                this.run_blocking(
                    &params,
                    &video,
                    &track,
                    &features,
                    &crops_path,
                    &mut control,
                )
            })
            .await;
        steps_gauge.set(0.0);
        let report = report??;
        tracing::info!(
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
        let crops_key = ctx.store_artifact(names::artifact::CROPS, &crops).await?;
        ctx.progress(1.0, "infer: done").await?;
        let fetched = |name: &str| {
            ctx.record
                .output_of(lipsync_schemas::Stage::Fetch, name)
                .map_or_else(|| names::artifact_key(&task_id, name), str::to_owned)
        };
        let mux = MuxJob {
            v: lipsync_schemas::WORK_VERSION,
            task_id: task_id.clone(),
            video: job.video.clone(),
            face_track: job.face_track.clone(),
            crops: crops_key.clone(),
            audio_original: fetched(names::artifact::AUDIO_ORIGINAL),
            audio_16k: fetched(names::artifact::AUDIO_16K),
            output_frames: n_out as u64,
            length_mode: self.length_mode,
            video_stream: job.video_stream,
        };
        Ok(Outcome::next(
            [(names::artifact::CROPS, crops_key)],
            vec![NextWork::of(&mux)],
        ))
    }
}

/// [`JobControl`] that also keeps the steps-per-second gauge.
struct RateControl<'a> {
    inner: JobControl<'a>,
    gauge: prometheus::Gauge,
    started: std::time::Instant,
}

impl Control for RateControl<'_> {
    fn step(&mut self, done: u64, total: u64) -> bool {
        self.gauge
            .set(done as f64 / self.started.elapsed().as_secs_f64().max(1e-3));
        self.inner.step(done, total)
    }
}

/// Returns the wire word of a length mode (`MuxJob::length_mode`).
pub fn length_mode_name(mode: LengthMode) -> &'static str {
    mode.as_str()
}
