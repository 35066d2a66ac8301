//! The mux stage handler: fetch the inputs of one task into a scratch folder, render
//! (on a blocking thread, reporting progress and honouring cancellation), store the
//! result and mask videos, PUT the result to the task's `output_upload_url` if it has
//! one, complete the task and drop its intermediates.
//!
//! A failed upload fails the delivery as retryable; the next delivery finds the outputs
//! stored and only uploads again. On the last delivery (`nats.max_deliver`) the task
//! fails with `output_upload_failed`, keeping its outputs listed and downloadable.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use lipsync_runtime::config::{Config, MuxConfig};
use lipsync_runtime::media::LengthMode;
use lipsync_runtime::{Change, Handler, JobCtx, JobError, Outcome};
use lipsync_schemas::{ErrorCode, FaceTrack, MuxJob, names};

use crate::render::{Progress, RenderJob, RenderOptions, render};
use crate::upload::Uploader;

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
    uploader: Uploader,
    /// `nats.max_deliver`: the delivery after which a failed upload fails the task.
    max_deliver: i64,
}

/// Share of the stage's progress band reached after fetching the inputs.
const FETCHED: f64 = 0.05;
/// Share reached when every frame is encoded (storing the outputs is the rest).
const RENDERED: f64 = 0.9;

impl MuxStage {
    /// Builds the stage from the `mux` section alone: result uploads under the default
    /// download policy and delivery limit.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn new(cfg: &MuxConfig) -> Result<Self, String> {
        Self::build(
            cfg,
            &lipsync_runtime::config::FetchConfig::default(),
            lipsync_runtime::config::NatsConfig::default().max_deliver,
        )
    }

    /// The stage of a whole configuration: result uploads under the download policy
    /// (`fetch.*`) and the delivery limit of `nats.max_deliver`.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn from_config(cfg: &Config) -> Result<Self, String> {
        Self::build(&cfg.mux, &cfg.fetch, cfg.nats.max_deliver)
    }

    fn build(
        cfg: &MuxConfig,
        fetch: &lipsync_runtime::config::FetchConfig,
        max_deliver: i64,
    ) -> Result<Self, String> {
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
            uploader: Uploader::new(fetch, cfg)?,
            max_deliver,
        })
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
    ) -> Result<(), JobError> {
        let total = job.output_frames as usize;
        let mode: LengthMode = job.length_mode;
        let mut opts = self.opts.clone();
        // Decode exactly the stream fetch validated, at its validated size.
        opts.video = lipsync_runtime::media::DecodeOptions::validated(job.video_stream);
        let d = dir.to_path_buf();
        let stats = ctx
            .run_blocking("renderer", move |b| {
                let progress = Progress::default();
                std::thread::scope(|s| {
                    // Reports frames done and passes a stop on to the renderer.
                    let watcher = s.spawn(|| {
                        let mut last = u64::MAX;
                        while !progress.abort.load(Ordering::Relaxed) {
                            if b.should_stop() {
                                progress.abort.store(true, Ordering::Relaxed);
                                break;
                            }
                            let done = progress.done.load(Ordering::Relaxed);
                            if done as usize >= total {
                                // Every frame is sent: the encoders' flush is bounded.
                                b.alive();
                            }
                            if done != last {
                                last = done;
                                let f = FETCHED
                                    + (RENDERED - FETCHED) * done as f64 / total.max(1) as f64;
                                b.progress(f, format!("mux: frame {done} of {total}"));
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    });
                    let result = render(
                        &RenderJob {
                            video: &d.join("video"),
                            track: &track,
                            crops: &d.join("crops.mkv"),
                            audio: &d.join("audio"),
                            output_frames: total,
                            mode,
                            result: &d.join("result.mp4"),
                            mask: &d.join("mask.mp4"),
                        },
                        &opts,
                        &progress,
                    );
                    progress.abort.store(true, Ordering::Relaxed);
                    let _ = watcher.join();
                    result
                })
            })
            .await??;
        tracing::info!(
            frames = stats.frames,
            faces = stats.faces,
            decodes = stats.video_decodes,
            fps = stats.frames as f64 / stats.secs.max(1e-9),
            "rendered"
        );
        Ok(())
    }

    /// PUT the result at `path` to the task's `output_upload_url` and record the outcome:
    /// `output_uploaded = true`; or a retryable failure; or, on the last delivery,
    /// `output_uploaded = false` with the outputs listed and `output_upload_failed`.
    async fn upload(
        &self,
        ctx: &JobCtx,
        url: &str,
        path: &Path,
        outputs: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), JobError> {
        ctx.progress(0.95, "mux: uploading the result").await?;
        let put = self.uploader.put_file(url, path, |n, e| {
            tracing::warn!(try_no = n, error = %e, "output upload failed, trying again");
        });
        let result = ctx.keepalive(put).await?;
        let tries = self.uploader.tries();
        let failure = match result {
            Ok(()) => {
                tracing::info!("result uploaded to the output_upload_url");
                self.record_upload(ctx, true, None).await?;
                return Ok(());
            }
            Err(e) => e,
        };
        let last = !failure.is_transient()
            || (self.max_deliver > 0 && i64::from(ctx.attempt) >= self.max_deliver);
        tracing::warn!(
            error = %failure,
            attempt = ctx.attempt,
            last,
            "output upload failed"
        );
        if !last {
            return Err(JobError::transient(format!(
                "output upload failed ({tries} tries): {failure}"
            )));
        }
        let task = &ctx.task_id;
        let url_of = |name: &str| {
            outputs
                .contains_key(name)
                .then(|| format!("/outputs/{task}/{name}"))
        };
        self.record_upload(
            ctx,
            false,
            Some((
                url_of(names::artifact::RESULT),
                url_of(names::artifact::MASK),
            )),
        )
        .await?;
        Err(JobError::permanent(
            ErrorCode::OutputUploadFailed,
            format!(
                "the result could not be uploaded to output_upload_url ({failure}, {} \
                 deliveries); it stays downloadable from output_video_url",
                ctx.attempt
            ),
        ))
    }

    /// Write `output_uploaded` (and, for a task about to fail, its output URLs).
    async fn record_upload(
        &self,
        ctx: &JobCtx,
        uploaded: bool,
        urls: Option<(Option<String>, Option<String>)>,
    ) -> Result<(), JobError> {
        ctx.tasks
            .update(&ctx.task_id, |r| {
                if r.status.is_terminal() {
                    return Change::Skip;
                }
                r.output_uploaded = Some(uploaded);
                if let Some((video, mask)) = &urls {
                    r.output_video_url = video.clone();
                    r.output_mask_url = mask.clone();
                }
                Change::Write
            })
            .await?;
        Ok(())
    }

    /// Whether an earlier delivery stored and registered both outputs (its upload
    /// failed): this one only has to upload.
    async fn outputs_stored(&self, ctx: &JobCtx) -> Result<bool, JobError> {
        for name in [names::artifact::RESULT, names::artifact::MASK] {
            let key = names::artifact_key(&ctx.task_id, name);
            if !ctx.record.artifacts.contains(&key) {
                return Ok(false);
            }
            if ctx.keepalive(ctx.artifacts.info(&key)).await??.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
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
}

#[async_trait]
impl Handler for MuxStage {
    type Job = MuxJob;

    async fn handle(&self, ctx: JobCtx, job: MuxJob) -> Result<Outcome, JobError> {
        if job.output_frames == 0 {
            return Err(JobError::permanent(
                ErrorCode::Internal,
                "the mux job asks for zero output frames",
            ));
        }
        ctx.check().await?;
        let outputs: std::collections::BTreeMap<String, String> =
            [names::artifact::RESULT, names::artifact::MASK]
                .into_iter()
                .map(|n| (n.to_owned(), names::artifact_key(&ctx.task_id, n)))
                .collect();
        let upload_url = ctx.record.request.output_upload_url.clone();
        if let Some(url) = &upload_url
            && self.outputs_stored(&ctx).await?
        {
            // A redelivery after a failed upload: the outputs are stored, upload again.
            ctx.progress(RENDERED, "mux: fetching the stored result")
                .await?;
            let d = ctx.scratch_dir()?;
            for name in [names::artifact::RESULT, names::artifact::MASK] {
                ctx.read_artifact(&outputs[name], name, name).await?;
            }
            self.write_local(&ctx.task_id, &d).await?;
            self.upload(&ctx, url, &d.join(names::artifact::RESULT), &outputs)
                .await?;
            return Ok(Outcome::Complete {
                outputs,
                delete_intermediates: self.delete_intermediates,
            });
        }
        ctx.progress(0.0, "mux: fetching inputs").await?;
        let audio_key = match self.audio {
            AudioChoice::Resampled => &job.audio_16k,
            AudioChoice::Original => &job.audio_original,
        };
        let (_, track, _, audio) = tokio::try_join!(
            ctx.read_artifact(&job.video, "video", "video"),
            ctx.read_artifact_bytes(&job.face_track, "face track"),
            ctx.read_artifact(&job.crops, "crops.mkv", "generated face crops"),
            ctx.read_artifact(audio_key, "audio", "audio"),
        )?;
        debug_assert!(audio.starts_with(ctx.scratch_dir()?));
        let d = ctx.scratch_dir()?;
        let track: FaceTrack = serde_json::from_slice(&track).map_err(|e| {
            JobError::permanent(
                ErrorCode::Internal,
                format!("the face track is unreadable: {e}"),
            )
        })?;
        ctx.progress(FETCHED, "mux: rendering").await?;

        self.render(&ctx, &d, track, &job).await?;

        ctx.check().await?;
        ctx.progress(RENDERED, "mux: storing outputs").await?;
        // Outputs keep their well-known keys (`/outputs/{task}/{name}`), written once:
        // a redelivery after completion finds the task ended and never gets here.
        for (name, key) in &outputs {
            ctx.keepalive(ctx.artifacts.put_file(key, &d.join(name)))
                .await??;
        }
        ctx.register_artifacts(&outputs.values().cloned().collect::<Vec<_>>())
            .await?;
        self.write_local(&ctx.task_id, &d).await?;
        if let Some(url) = &upload_url {
            self.upload(&ctx, url, &d.join(names::artifact::RESULT), &outputs)
                .await?;
        }
        Ok(Outcome::Complete {
            outputs,
            delete_intermediates: self.delete_intermediates,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_are_checked() {
        let ok = MuxConfig::default();
        assert!(MuxStage::new(&ok).is_ok());
        let bad_audio = MuxConfig {
            audio: "stereo".into(),
            ..MuxConfig::default()
        };
        assert!(MuxStage::new(&bad_audio).unwrap_err().contains("mux.audio"));
        let bad_preset = MuxConfig {
            preset: "turbo".into(),
            ..MuxConfig::default()
        };
        assert!(
            MuxStage::new(&bad_preset)
                .unwrap_err()
                .contains("mux.preset")
        );
        let bad_crf = MuxConfig {
            crf: 60,
            ..MuxConfig::default()
        };
        assert!(MuxStage::new(&bad_crf).unwrap_err().contains("mux.crf"));
    }
}
