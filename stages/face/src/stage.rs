//! The face stage handler: `work.face` -> face-track artifact -> face/audio join.

use std::sync::Mutex;

use async_trait::async_trait;
use lipsync_runtime::media::DecodeOptions;
use lipsync_runtime::{JobCtx, JobError, Outcome, StageError};
use lipsync_schemas::{ErrorCode, FaceJob, TaskError, names};

use crate::detect::Detector;
use crate::error::FaceError;
use crate::pipeline::track_file;
use crate::settings::{FaceSettings, Geometries};

/// The face stage: keeps a small pool of loaded detectors (one per concurrent job).
pub struct FaceStage {
    settings: FaceSettings,
    geometries: Geometries,
    pool: Mutex<Vec<Box<dyn Detector>>>,
}

impl FaceStage {
    /// A stage with one detector loaded up front (so a missing model fails at start-up,
    /// not in every job).
    ///
    /// # Errors
    /// [`FaceError::Model`] when the detector cannot be loaded.
    pub fn new(settings: FaceSettings, geometries: Geometries) -> Result<Self, FaceError> {
        let first = settings.build_detector()?;
        Ok(Self {
            settings,
            geometries,
            pool: Mutex::new(vec![first]),
        })
    }

    fn take_detector(&self) -> Option<Box<dyn Detector>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn return_detector(&self, d: Box<dyn Detector>) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).push(d);
    }
}

impl StageError for FaceError {
    fn code(&self) -> ErrorCode {
        FaceError::code(self)
    }
    fn retryable(&self) -> bool {
        matches!(self, FaceError::Inference(_) | FaceError::Io(_))
    }
    fn stopped(&self) -> bool {
        matches!(self, FaceError::Stopped)
    }
    fn task_error(&self) -> TaskError {
        match self {
            FaceError::NoFace {
                frame_index,
                time_s,
            } => {
                let mut err = TaskError::new(
                    ErrorCode::NoFaceDetected,
                    format!(
                        "no usable face in frame {frame_index} ({time_s:.2} s): no face large and clear enough was detected"
                    ),
                );
                err.frame_index = Some(*frame_index);
                err.time_s = Some(*time_s);
                err
            }
            other => TaskError::new(
                other.code(),
                lipsync_runtime::errors::public_message(&other.to_string()),
            ),
        }
    }
}

#[async_trait]
impl lipsync_runtime::Handler for FaceStage {
    type Job = FaceJob;

    async fn handle(&self, ctx: JobCtx, job: FaceJob) -> Result<Outcome, JobError> {
        ctx.progress(0.0, "tracking faces").await?;
        let video = ctx.read_artifact(&job.video, "video", "video").await?;
        ctx.check().await?;

        let geometry = self.geometries.for_model(&ctx.record.request.model);
        let detector = match self.take_detector() {
            Some(d) => d,
            None => {
                // Loading a model is bounded work without progress of its own.
                let settings = self.settings.clone();
                ctx.keepalive(
                    ctx.run_blocking("face detector start", move |_| settings.build_detector()),
                )
                .await???
            }
        };
        let mut settings = self.settings.track.clone();
        settings.decode = DecodeOptions::validated(job.video_stream);
        let (detector, track) = ctx
            .run_blocking("face tracker", move |b| {
                let mut detector = detector;
                let result =
                    track_file(&video, detector.as_mut(), &geometry, &settings, &mut |p| {
                        if b.should_stop() {
                            return Err(FaceError::Stopped);
                        }
                        let msg = match p.expected {
                            Some(n) => format!("tracking faces: frame {} of about {n}", p.frames),
                            None => format!("tracking faces: frame {}", p.frames),
                        };
                        b.progress(p.fraction(), msg);
                        Ok(())
                    });
                (detector, result)
            })
            .await?;
        self.return_detector(detector);
        let track = track?;

        let missing = track.frames.iter().filter(|f| !f.present).count();
        tracing::info!(
            frames = track.frame_count,
            missing,
            profile = %self.geometries.for_model(&ctx.record.request.model).profile,
            "face track ready"
        );
        let body = serde_json::to_vec(&track)
            .map_err(|e| JobError::transient(format!("encode face track: {e}")))?;
        let key = ctx
            .store_artifact_bytes(names::artifact::FACE_TRACK, &body)
            .await?;
        let msg = if missing > 0 {
            format!(
                "face track ready ({} frames, {missing} without a face left untouched)",
                track.frame_count
            )
        } else {
            format!("face track ready ({} frames)", track.frame_count)
        };
        ctx.progress(1.0, &msg).await?;
        Ok(Outcome::join([(names::artifact::FACE_TRACK, key)]))
    }
}
