//! The face stage handler: `work.face` -> face-track artifact -> face/audio join.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use lipsync_runtime::{JobCtx, JobError, join};
use lipsync_schemas::{FaceJob, Stage, TaskError, names};

use crate::detect::Detector;
use crate::error::FaceError;
use crate::pipeline::{Progress, track_file};
use crate::settings::{FaceSettings, Geometries};

/// The face stage: keeps a small pool of loaded detectors (one per concurrent job).
pub struct FaceStage {
    settings: FaceSettings,
    geometries: Geometries,
    pool: Mutex<Vec<Box<dyn Detector>>>,
    scratch: Option<PathBuf>,
}

impl FaceStage {
    /// A stage with one detector loaded up front (so a missing model fails at start-up,
    /// not in every job).
    ///
    /// # Errors
    /// [`FaceError::Model`] when the detector cannot be loaded.
    pub fn new(
        settings: FaceSettings,
        geometries: Geometries,
        scratch: Option<PathBuf>,
    ) -> Result<Self, FaceError> {
        let first = settings.build_detector()?;
        Ok(Self {
            settings,
            geometries,
            pool: Mutex::new(vec![first]),
            scratch,
        })
    }

    fn take_detector(&self) -> Option<Box<dyn Detector>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn return_detector(&self, d: Box<dyn Detector>) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(d);
    }
}

/// Maps a tracking failure to the runner's error kinds.
pub fn job_error(e: FaceError) -> JobError {
    match e {
        FaceError::NoFace {
            frame_index,
            time_s,
        } => {
            let mut err = TaskError::new(
                lipsync_schemas::ErrorCode::NoFaceDetected,
                format!(
                    "no usable face in frame {frame_index} ({time_s:.2} s): no face large and clear enough was detected"
                ),
            );
            err.frame_index = Some(frame_index);
            err.time_s = Some(time_s);
            JobError::Permanent(err)
        }
        FaceError::Stopped => JobError::Interrupted,
        FaceError::Inference(m) => JobError::Transient(format!("face detector failed: {m}")),
        FaceError::Io(e) => JobError::Transient(format!("face stage i/o: {e}")),
        other => JobError::Permanent(TaskError::new(other.code(), other.to_string())),
    }
}

#[async_trait]
impl lipsync_runtime::Handler for FaceStage {
    type Job = FaceJob;

    async fn handle(&self, ctx: JobCtx, job: FaceJob) -> Result<(), JobError> {
        ctx.progress(0.0, "tracking faces").await?;
        let scratch = self.scratch.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("lipsync-face-")
            .tempdir_in(&scratch)
            .map_err(|e| JobError::transient(format!("scratch directory: {e}")))?;
        let video = dir.path().join("video");
        ctx.artifacts.get_to_file(&job.video, &video).await?;
        ctx.check().await?;

        let geometry = self.geometries.for_model(&ctx.record.request.model);
        let mut detector = match self.take_detector() {
            Some(d) => d,
            None => {
                let settings = self.settings.clone();
                tokio::task::spawn_blocking(move || settings.build_detector())
                    .await
                    .map_err(|e| JobError::transient(format!("detector start: {e}")))?
                    .map_err(job_error)?
            }
        };

        let stop = Arc::new(AtomicBool::new(false));
        let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<Progress>(4);
        let settings = self.settings.track.clone();
        let worker_stop = stop.clone();
        let worker = tokio::task::spawn_blocking(move || {
            let result = track_file(&video, detector.as_mut(), &geometry, &settings, &mut |p| {
                if worker_stop.load(Ordering::Relaxed) {
                    return Err(FaceError::Stopped);
                }
                let _ = progress_tx.try_send(p);
                Ok(())
            });
            (detector, result)
        });

        // Progress and cancellation checks after every batch.
        let mut stopped: Option<JobError> = None;
        while let Some(p) = progress_rx.recv().await {
            if stopped.is_some() {
                continue;
            }
            let msg = match p.expected {
                Some(n) => format!("tracking faces: frame {} of about {n}", p.frames),
                None => format!("tracking faces: frame {}", p.frames),
            };
            let res = match ctx.progress(p.fraction(), &msg).await {
                Ok(()) => ctx.check().await,
                Err(e) => Err(e),
            };
            if let Err(e) = res {
                stop.store(true, Ordering::Relaxed);
                stopped = Some(e);
            }
        }
        let (detector, result) = worker
            .await
            .map_err(|e| JobError::transient(format!("face worker panicked: {e}")))?;
        self.return_detector(detector);
        if let Some(e) = stopped {
            return Err(e);
        }
        let track = result.map_err(job_error)?;
        drop(dir);

        let missing = track.frames.iter().filter(|f| !f.present).count();
        tracing::info!(
            task_id = %ctx.task_id,
            frames = track.frame_count,
            missing,
            profile = %self.geometries.for_model(&ctx.record.request.model).profile,
            "face track ready"
        );
        let body = serde_json::to_vec(&track)
            .map_err(|e| JobError::transient(format!("encode face track: {e}")))?;
        let key = names::artifact_key(&ctx.task_id, names::artifact::FACE_TRACK);
        ctx.artifacts.put(&key, &mut body.as_slice()).await?;
        let msg = if missing > 0 {
            format!(
                "face track ready ({} frames, {missing} without a face left untouched)",
                track.frame_count
            )
        } else {
            format!("face track ready ({} frames)", track.frame_count)
        };
        ctx.progress(1.0, &msg).await?;
        join::complete_part(&ctx, Stage::Face).await?;
        Ok(())
    }
}
