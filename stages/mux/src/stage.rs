//! The mux stage handler: fetch the inputs of one task into a scratch folder, render
//! (on a blocking thread, reporting progress and honouring cancellation), store the
//! result and mask videos, complete the task and drop its intermediates.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use lipsync_runtime::config::MuxConfig;
use lipsync_runtime::media::LengthMode;
use lipsync_runtime::{ArtifactError, Change, Handler, JobCtx, JobError, Updated};
use lipsync_schemas::{ErrorCode, FaceTrack, MuxJob, Stage, Status, names};

use crate::error::MuxError;
use crate::render::{Progress, RenderJob, RenderOptions, render};

/// Which audio goes into the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioChoice {
    /// The 16 kHz mono copy the model heard (the reference's behaviour).
    Resampled,
    /// The user's original audio track, at its own rate and channels.
    Original,
}

/// The mux stage.
#[derive(Debug, Clone)]
pub struct MuxStage {
    opts: RenderOptions,
    audio: AudioChoice,
    local_dir: Option<PathBuf>,
    delete_intermediates: bool,
    scratch: Option<PathBuf>,
}

/// Share of the stage's progress band reached after fetching the inputs.
const FETCHED: f64 = 0.05;
/// Share reached when every frame is encoded (storing the outputs is the rest).
const RENDERED: f64 = 0.9;

impl MuxStage {
    /// Builds the stage from its configuration.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn new(cfg: &MuxConfig, scratch: Option<PathBuf>) -> Result<Self, String> {
        let audio = match cfg.audio.as_str() {
            "resampled" => AudioChoice::Resampled,
            "original" => AudioChoice::Original,
            other => {
                return Err(format!(
                    "mux.audio: unknown value `{other}` (resampled or original)"
                ));
            }
        };
        if cfg.concurrency == 0 {
            return Err("mux.concurrency: must be at least 1".into());
        }
        Ok(Self {
            opts: RenderOptions::from_config(cfg)?,
            audio,
            local_dir: cfg.local_dir.clone(),
            delete_intermediates: cfg.delete_intermediates,
            scratch,
        })
    }
}

/// Parses the job's length mode.
fn length_mode(s: &str) -> Result<LengthMode, JobError> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| JobError::permanent(ErrorCode::Internal, format!("unknown length mode `{s}`")))
}

/// Fetches one artifact into `path`; a missing one is a permanent failure.
async fn fetch(ctx: &JobCtx, key: &str, what: &str, path: PathBuf) -> Result<(), JobError> {
    match ctx.artifacts.get_to_file(key, &path).await {
        Ok(_) => Ok(()),
        Err(ArtifactError::NotFound(_)) => Err(JobError::permanent(
            ErrorCode::Internal,
            format!("the {what} of this task is no longer stored"),
        )),
        Err(e) => Err(e.into()),
    }
}

impl MuxStage {
    /// Renders on a blocking thread while reporting progress; stops it on cancellation.
    async fn render(
        &self,
        ctx: &JobCtx,
        dir: &Path,
        track: FaceTrack,
        job: &MuxJob,
        mode: LengthMode,
    ) -> Result<(), JobError> {
        let progress = Arc::new(Progress::default());
        let total = job.output_frames as usize;
        let opts = self.opts.clone();
        let (p, d) = (progress.clone(), dir.to_path_buf());
        let mut handle = tokio::task::spawn_blocking(move || {
            render(
                &RenderJob {
                    video: &d.join("video"),
                    track: &track,
                    crops: &d.join("crops.mkv"),
                    audio: &d.join("audio"),
                    output_frames: total,
                    mode,
                    result: &d.join("result.mp4"),
                    mask: &d.join("mask.mp4"),
                    scratch: &d,
                },
                &opts,
                &p,
            )
        });
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let outcome = loop {
            tokio::select! {
                r = &mut handle => break r,
                _ = tick.tick() => {
                    let done = progress.done.load(Ordering::Relaxed) as usize;
                    let fraction = FETCHED + (RENDERED - FETCHED) * done as f64 / total.max(1) as f64;
                    let status = match ctx.check().await {
                        Ok(()) => ctx.progress(fraction, &format!("mux: frame {done} of {total}")).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = status {
                        progress.abort.store(true, Ordering::Relaxed);
                        let _ = handle.await;
                        return Err(e);
                    }
                }
            }
        };
        match outcome {
            Ok(Ok(stats)) => {
                tracing::info!(
                    task_id = %ctx.task_id,
                    frames = stats.frames,
                    faces = stats.faces,
                    decodes = stats.video_decodes,
                    fps = stats.frames as f64 / stats.secs.max(1e-9),
                    "rendered"
                );
                Ok(())
            }
            Ok(Err(MuxError::Aborted)) => Err(JobError::Interrupted),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(JobError::permanent(
                ErrorCode::Internal,
                format!("the renderer crashed: {e}"),
            )),
        }
    }

    /// Copies the outputs to `{local_dir}/{task_id}/` (write, then rename).
    async fn write_local(&self, task_id: &str, dir: &Path) -> Result<(), JobError> {
        let Some(root) = &self.local_dir else {
            return Ok(());
        };
        let target = root.join(task_id);
        let local = |e: std::io::Error| {
            JobError::transient(format!("cannot write the local output copy: {e}"))
        };
        tokio::fs::create_dir_all(&target).await.map_err(local)?;
        for name in [names::artifact::RESULT, names::artifact::MASK] {
            let tmp = target.join(format!(".{name}.part"));
            tokio::fs::copy(dir.join(name), &tmp).await.map_err(local)?;
            tokio::fs::rename(&tmp, target.join(name))
                .await
                .map_err(local)?;
        }
        Ok(())
    }

    /// Marks the task completed with both URLs. `Ok(false)` if it ended otherwise.
    async fn complete(&self, ctx: &JobCtx, outputs: &[String; 2]) -> Result<bool, JobError> {
        let (epoch, rfc) = lipsync_runtime::tasks::now();
        let task_id = ctx.task_id.clone();
        let delete = self.delete_intermediates;
        let updated = ctx
            .tasks
            .update(&task_id, |r| {
                r.status = Status::Completed;
                r.stage = Some(Stage::Mux);
                r.raise_progress(1.0);
                r.message = "completed".into();
                r.output_video_url =
                    Some(format!("/outputs/{task_id}/{}", names::artifact::RESULT));
                r.output_mask_url = Some(format!("/outputs/{task_id}/{}", names::artifact::MASK));
                r.finished_at = Some(rfc.clone());
                r.end_time = Some(epoch);
                r.queue_position = None;
                r.error = None;
                r.stages
                    .entry(Stage::Mux.as_str().to_owned())
                    .or_default()
                    .finished_at = Some(epoch);
                if delete {
                    r.artifacts.retain(|k| outputs.contains(k));
                }
                for k in outputs {
                    if !r.artifacts.contains(k) {
                        r.artifacts.push(k.clone());
                    }
                }
                Change::Write
            })
            .await?;
        Ok(match updated {
            Updated::Written(_) => true,
            Updated::Unchanged(r) => r.status == Status::Completed,
            Updated::Missing => false,
        })
    }

    /// Deletes the task's intermediate artifacts (best effort: retention removes what
    /// remains).
    async fn delete_intermediates(&self, ctx: &JobCtx, job: &MuxJob, outputs: &[String; 2]) {
        let task = &ctx.task_id;
        let mut keys: Vec<String> = [
            names::artifact::VIDEO,
            names::artifact::AUDIO_ORIGINAL,
            names::artifact::AUDIO_16K,
            names::artifact::FACE_TRACK,
            names::artifact::AUDIO_FEATURES,
            names::artifact::CROPS,
        ]
        .iter()
        .map(|n| names::artifact_key(task, n))
        .chain([
            job.video.clone(),
            job.face_track.clone(),
            job.crops.clone(),
            job.audio_original.clone(),
            job.audio_16k.clone(),
        ])
        .chain(ctx.record.artifacts.iter().cloned())
        .filter(|k| !outputs.contains(k))
        .collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            if let Err(e) = ctx.artifacts.delete(&key).await {
                tracing::warn!(task_id = %task, key = %key, error = %e, "cannot delete intermediate artifact");
            }
        }
    }
}

#[async_trait]
impl Handler for MuxStage {
    type Job = MuxJob;

    async fn handle(&self, ctx: JobCtx, job: MuxJob) -> Result<(), JobError> {
        let mode = length_mode(&job.length_mode)?;
        if job.output_frames == 0 {
            return Err(JobError::permanent(
                ErrorCode::Internal,
                "the mux job asks for zero output frames",
            ));
        }
        ctx.check().await?;
        ctx.progress(0.0, "mux: fetching inputs").await?;
        let dir = match &self.scratch {
            Some(s) => tempfile::Builder::new()
                .prefix("lipsync-mux-")
                .tempdir_in(s),
            None => tempfile::Builder::new().prefix("lipsync-mux-").tempdir(),
        }
        .map_err(|e| JobError::transient(format!("cannot create a scratch folder: {e}")))?;
        let d = dir.path();
        let audio_key = match self.audio {
            AudioChoice::Resampled => &job.audio_16k,
            AudioChoice::Original => &job.audio_original,
        };
        tokio::try_join!(
            fetch(&ctx, &job.video, "video", d.join("video")),
            fetch(
                &ctx,
                &job.face_track,
                "face track",
                d.join("face_track.json")
            ),
            fetch(
                &ctx,
                &job.crops,
                "generated face crops",
                d.join("crops.mkv")
            ),
            fetch(&ctx, audio_key, "audio", d.join("audio")),
        )?;
        let track: FaceTrack = serde_json::from_slice(
            &tokio::fs::read(d.join("face_track.json"))
                .await
                .map_err(JobError::transient)?,
        )
        .map_err(|e| {
            JobError::permanent(
                ErrorCode::Internal,
                format!("the face track is unreadable: {e}"),
            )
        })?;
        ctx.progress(FETCHED, "mux: rendering").await?;

        self.render(&ctx, d, track, &job, mode).await?;

        ctx.check().await?;
        ctx.progress(RENDERED, "mux: storing outputs").await?;
        let outputs = [
            names::artifact_key(&ctx.task_id, names::artifact::RESULT),
            names::artifact_key(&ctx.task_id, names::artifact::MASK),
        ];
        ctx.artifacts
            .put_file(&outputs[0], &d.join(names::artifact::RESULT))
            .await?;
        ctx.artifacts
            .put_file(&outputs[1], &d.join(names::artifact::MASK))
            .await?;
        self.write_local(&ctx.task_id, d).await?;
        if !self.complete(&ctx, &outputs).await? {
            return Err(JobError::Cancelled);
        }
        if self.delete_intermediates {
            self.delete_intermediates(&ctx, &job, &outputs).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_are_checked() {
        let ok = MuxConfig::default();
        assert!(MuxStage::new(&ok, None).is_ok());
        let bad_audio = MuxConfig {
            audio: "stereo".into(),
            ..MuxConfig::default()
        };
        assert!(
            MuxStage::new(&bad_audio, None)
                .unwrap_err()
                .contains("mux.audio")
        );
        let bad_preset = MuxConfig {
            preset: "turbo".into(),
            ..MuxConfig::default()
        };
        assert!(
            MuxStage::new(&bad_preset, None)
                .unwrap_err()
                .contains("mux.preset")
        );
        let bad_crf = MuxConfig {
            crf: 60,
            ..MuxConfig::default()
        };
        assert!(
            MuxStage::new(&bad_crf, None)
                .unwrap_err()
                .contains("mux.crf")
        );
    }

    #[test]
    fn length_modes_parse() {
        assert_eq!(length_mode("pingpong").unwrap(), LengthMode::Pingpong);
        assert_eq!(length_mode("loop").unwrap(), LengthMode::Loop);
        assert_eq!(length_mode("cut").unwrap(), LengthMode::Cut);
        assert!(length_mode("bounce").is_err());
    }
}
