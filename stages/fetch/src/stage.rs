//! The fetch stage handler: download (or take the upload of) both inputs in parallel,
//! streaming into the artifact store, probe and validate them, convert the audio to
//! 16 kHz mono and hand the task to the face and audio stages.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lipsync_runtime::config::FetchConfig;
use lipsync_runtime::{Change, JobCtx, JobError, Outcome, StageError};
use lipsync_schemas::{
    AudioJob, ErrorCode, FaceJob, FetchJob, InputSource, MediaSummary, NextWork, VideoStream, names,
};
use tokio::io::AsyncWriteExt;

use crate::download::{DownloadError, DownloadLimits, Tee, download_to};
use crate::guard::{ClientOptions, GuardedClient};
use crate::probe::{
    MediaInfo, MediaLimits, MediaTools, ProbeError, validate_audio, validate_video,
};

/// The fetch stage.
pub struct FetchStage {
    client: GuardedClient,
    limits: DownloadLimits,
    media: MediaLimits,
    audio_limits: MediaLimits,
    tools: MediaTools,
}

/// Which input a failure concerns (for messages).
#[derive(Clone, Copy)]
enum Which {
    Video,
    Audio,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Video => "video",
            Which::Audio => "audio",
        }
    }
    fn artifact(self) -> &'static str {
        match self {
            Which::Video => names::artifact::VIDEO,
            Which::Audio => names::artifact::AUDIO_ORIGINAL,
        }
    }
}

fn code_of(s: &str) -> ErrorCode {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).unwrap_or(ErrorCode::Internal)
}

/// A failure of one input, named for the client.
struct InputError<E> {
    which: Which,
    what: &'static str,
    error: E,
}

impl<E: std::fmt::Display> std::fmt::Display for InputError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.which.name(), self.what, self.error)
    }
}

impl StageError for InputError<DownloadError> {
    fn code(&self) -> ErrorCode {
        code_of(self.error.code())
    }
    fn retryable(&self) -> bool {
        self.error.is_transient()
    }
}

impl StageError for InputError<ProbeError> {
    fn code(&self) -> ErrorCode {
        code_of(self.error.code())
    }
    fn retryable(&self) -> bool {
        self.error.is_transient()
    }
}

fn download_error(which: Which, error: DownloadError) -> JobError {
    InputError {
        which,
        what: "download",
        error,
    }
    .into()
}

fn probe_error(which: Which, error: ProbeError) -> JobError {
    InputError {
        which,
        what: "input",
        error,
    }
    .into()
}

impl FetchStage {
    /// Build the stage from its configuration.
    pub fn new(cfg: &FetchConfig) -> Result<Self, String> {
        let policy = cfg.url_policy()?;
        let client = policy
            .client(&ClientOptions {
                connect_timeout: Duration::from_secs(cfg.connect_timeout_s),
                read_timeout: Duration::from_secs(cfg.read_timeout_s),
                total_timeout: Some(Duration::from_secs(cfg.total_timeout_s)),
                max_redirects: cfg.max_redirects,
            })
            .map_err(|e| e.to_string())?;
        let media = MediaLimits {
            max_duration_s: cfg.max_duration_s,
            min_duration_s: 1.0 / 25.0,
            max_width: cfg.max_width,
            max_height: cfg.max_height,
            max_frames: cfg.max_frames,
        };
        let audio_limits = MediaLimits {
            min_duration_s: cfg.min_audio_duration_s,
            ..media.clone()
        };
        Ok(Self {
            client,
            limits: DownloadLimits {
                max_bytes: cfg.max_bytes,
                total_timeout: Duration::from_secs(cfg.total_timeout_s),
                read_timeout: Duration::from_secs(cfg.read_timeout_s),
            },
            media,
            audio_limits,
            tools: MediaTools {
                probe_timeout: Duration::from_secs(cfg.tool_timeout_s),
                convert_timeout: Duration::from_secs(cfg.tool_timeout_s),
                // Checked on what the inputs decode to, not on what they declare.
                max_duration_s: cfg.max_duration_s,
                margin_s: cfg.audio_margin_s,
                ..MediaTools::default()
            },
        })
    }

    /// Bring one input into the artifact store and a local file; returns the file and
    /// the input's artifact key.
    async fn obtain(
        &self,
        ctx: &JobCtx,
        which: Which,
        source: &InputSource,
        dir: &Path,
        counter: Arc<AtomicU64>,
        total: Arc<AtomicU64>,
    ) -> Result<(PathBuf, String), JobError> {
        let key = ctx.artifact_key(which.artifact());
        let local = dir.join(which.name());
        match source {
            InputSource::Artifact(k) => {
                // Uploaded through the gateway or straight to the bucket (a presigned PUT
                // has no size cap): refuse an oversized object before reading it, then
                // only probe it.
                let what = format!("uploaded {}", which.name());
                let meta = ctx
                    .keepalive(ctx.artifacts.info(k))
                    .await?
                    .map_err(JobError::from)?;
                // A missing object is reported by the read below, as for any artifact.
                if let Some(meta) = meta
                    && meta.size > self.limits.max_bytes
                {
                    return Err(InputError {
                        which,
                        what: "upload",
                        error: DownloadError::InputTooLarge {
                            max_bytes: self.limits.max_bytes,
                            content_length: Some(meta.size),
                        },
                    }
                    .into());
                }
                let path = ctx.read_artifact(k, which.name(), &what).await?;
                Ok((path, k.clone()))
            }
            InputSource::Url(url) => {
                let file = tokio::fs::File::create(&local)
                    .await
                    .map_err(JobError::transient)?;
                let (to_store, mut from_pipe) = tokio::io::duplex(256 * 1024);
                let store = ctx.artifacts.clone();
                let put_key = key.clone();
                let put = tokio::spawn(async move { store.put(&put_key, &mut from_pipe).await });
                let mut tee = Tee::new(file, to_store);
                let mut last = 0u64;
                let result = download_to(&self.client, url, &self.limits, &mut tee, |done, len| {
                    if done > last {
                        ctx.alive();
                    }
                    counter.fetch_add(done - last, Ordering::Relaxed);
                    last = done;
                    if let Some(len) = len {
                        total.fetch_max(len, Ordering::Relaxed);
                    }
                })
                .await;
                let shut = tee.shutdown().await;
                let stored = put.await;
                match result {
                    Err(e) => {
                        // Never leave a partial input behind under the task's key.
                        let _ = ctx.artifacts.delete(&key).await;
                        Err(download_error(which, e))
                    }
                    Ok(_) => {
                        shut.map_err(JobError::transient)?;
                        stored
                            .map_err(|e| JobError::transient(format!("artifact put: {e}")))?
                            .map_err(JobError::from)?;
                        ctx.register_artifacts(std::slice::from_ref(&key)).await?;
                        Ok((local, key))
                    }
                }
            }
        }
    }

    async fn probe_video(&self, ctx: &JobCtx, path: &Path) -> Result<MediaInfo, JobError> {
        // The tools run under their own time limits: keep the lease meanwhile.
        let info = ctx
            .keepalive(self.tools.probe(path))
            .await?
            .map_err(|e| probe_error(Which::Video, e))?;
        validate_video(&info, &self.media).map_err(|e| probe_error(Which::Video, e))?;
        ctx.keepalive(self.tools.check_integrity(path))
            .await?
            .map_err(|e| probe_error(Which::Video, e))?;
        Ok(info)
    }

    async fn probe_audio(&self, ctx: &JobCtx, path: &Path) -> Result<MediaInfo, JobError> {
        let info = ctx
            .keepalive(self.tools.probe(path))
            .await?
            .map_err(|e| probe_error(Which::Audio, e))?;
        validate_audio(&info, &self.audio_limits).map_err(|e| probe_error(Which::Audio, e))?;
        Ok(info)
    }
}

#[async_trait]
impl lipsync_runtime::Handler for FetchStage {
    type Job = FetchJob;

    async fn handle(&self, ctx: JobCtx, job: FetchJob) -> Result<Outcome, JobError> {
        let dir = ctx.scratch_dir()?;
        let done = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));

        // Progress ticker: bytes downloaded of the announced total, into 0-0.09.
        let ticker = {
            let ctx = ctx.clone();
            let done = done.clone();
            let total = total.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let t = total.load(Ordering::Relaxed);
                    if t > 0 {
                        let f = done.load(Ordering::Relaxed) as f64 / t as f64;
                        let mb = done.load(Ordering::Relaxed) as f64 / 1e6;
                        let _ = ctx
                            .progress(0.9 * f.min(1.0), &format!("fetch: downloaded {mb:.1} MB"))
                            .await;
                    }
                }
            })
        };
        let (video, audio) = tokio::join!(
            self.obtain(
                &ctx,
                Which::Video,
                &job.video,
                &dir,
                done.clone(),
                total.clone()
            ),
            self.obtain(
                &ctx,
                Which::Audio,
                &job.audio,
                &dir,
                done.clone(),
                total.clone()
            ),
        );
        ticker.abort();
        let ((video, video_key), (audio, audio_key)) = (video?, audio?);
        ctx.check().await?;

        let (vinfo, ainfo) = tokio::join!(
            self.probe_video(&ctx, &video),
            self.probe_audio(&ctx, &audio)
        );
        let (vinfo, ainfo) = (vinfo?, ainfo?);
        ctx.progress(0.93, "fetch: inputs validated").await?;

        let wav = dir.join("audio_16k.wav");
        ctx.keepalive(self.tools.to_pcm16k_wav(&audio, &wav))
            .await?
            .map_err(|e| probe_error(Which::Audio, e))?;
        let wav_key = ctx.store_artifact(names::artifact::AUDIO_16K, &wav).await?;

        let v = vinfo.primary_video().expect("validated");
        let (width, height) = v.display_size();
        let video_stream = Some(VideoStream {
            index: v.index,
            width,
            height,
        });
        let summary = MediaSummary {
            width,
            height,
            fps: v.fps().unwrap_or(0.0),
            video_duration_s: v.duration_s.or(vinfo.duration_s).unwrap_or(0.0),
            audio_duration_s: ainfo
                .primary_audio()
                .and_then(|a| a.duration_s)
                .or(ainfo.duration_s)
                .unwrap_or(0.0),
            video_stream,
        };
        ctx.tasks
            .update(&ctx.task_id, |r| {
                r.media = Some(summary.clone());
                r.message = format!(
                    "fetch: {}x{} video, {:.1} s; {:.1} s audio",
                    summary.width,
                    summary.height,
                    summary.video_duration_s,
                    summary.audio_duration_s
                );
                Change::Write
            })
            .await?;
        ctx.check().await?;
        let next = vec![
            NextWork::of(&FaceJob {
                v: lipsync_schemas::WORK_VERSION,
                task_id: ctx.task_id.clone(),
                video: video_key.clone(),
                video_stream,
            }),
            NextWork::of(&AudioJob {
                v: lipsync_schemas::WORK_VERSION,
                task_id: ctx.task_id.clone(),
                audio_16k: wav_key.clone(),
            }),
        ];
        Ok(Outcome::next(
            [
                (names::artifact::VIDEO, video_key),
                (names::artifact::AUDIO_ORIGINAL, audio_key),
                (names::artifact::AUDIO_16K, wav_key),
            ],
            next,
        ))
    }
}
