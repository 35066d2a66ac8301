//! The fetch stage handler: download (or take the upload of) both inputs in parallel,
//! streaming into the artifact store, probe and validate them, convert the audio to
//! 16 kHz mono and hand the task to the face and audio stages.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lipsync_runtime::config::FetchConfig;
use lipsync_runtime::{Change, JobCtx, JobError};
use lipsync_schemas::{
    AudioJob, ErrorCode, FaceJob, FetchJob, InputSource, MediaSummary, TaskError, names,
};
use tokio::io::AsyncWriteExt;

use crate::download::{DownloadError, DownloadLimits, Tee, download_to};
use crate::guard::{ClientOptions, GuardedClient, IpNet, UrlPolicy};
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
    scratch: Option<PathBuf>,
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

fn download_error(which: Which, e: DownloadError) -> JobError {
    let msg = format!("{} download: {e}", which.name());
    if e.is_transient() {
        JobError::Transient(msg)
    } else {
        JobError::Permanent(TaskError::new(code_of(e.code()), msg))
    }
}

fn probe_error(which: Which, e: ProbeError) -> JobError {
    let msg = format!("{} input: {e}", which.name());
    if e.is_transient() {
        JobError::Transient(msg)
    } else {
        JobError::Permanent(TaskError::new(code_of(e.code()), msg))
    }
}

/// Build the URL policy of the fetch configuration; errors name the bad key.
pub fn url_policy(cfg: &FetchConfig) -> Result<UrlPolicy, String> {
    let mut allow_cidrs = Vec::new();
    for c in &cfg.allow_cidrs {
        allow_cidrs.push(
            c.parse::<IpNet>()
                .map_err(|e| format!("fetch.allow_cidrs: `{c}`: {e}"))?,
        );
    }
    Ok(UrlPolicy {
        allow_private_networks: cfg.allow_private_networks,
        allow_cidrs,
        max_url_len: cfg.max_url_len,
        ..UrlPolicy::default()
    })
}

impl FetchStage {
    /// Build the stage from its configuration.
    pub fn new(cfg: &FetchConfig, scratch: Option<PathBuf>) -> Result<Self, String> {
        let policy = url_policy(cfg)?;
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
                ..MediaTools::default()
            },
            scratch,
        })
    }

    /// Bring one input into the artifact store and a local file; returns the file.
    async fn obtain(
        &self,
        ctx: &JobCtx,
        which: Which,
        source: &InputSource,
        dir: &Path,
        counter: Arc<AtomicU64>,
        total: Arc<AtomicU64>,
    ) -> Result<PathBuf, JobError> {
        let key = names::artifact_key(&ctx.task_id, which.artifact());
        let local = dir.join(which.name());
        match source {
            InputSource::Artifact(k) => {
                // Uploaded through the gateway: only probe it.
                ctx.artifacts
                    .get_to_file(k, &local)
                    .await
                    .map_err(|e| match e {
                        lipsync_runtime::ArtifactError::NotFound(_) => JobError::permanent(
                            ErrorCode::InvalidRequest,
                            format!("the uploaded {} is no longer available", which.name()),
                        ),
                        other => JobError::from(other),
                    })?;
                Ok(local)
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
                        Ok(local)
                    }
                }
            }
        }
    }

    async fn probe_video(&self, path: &Path) -> Result<MediaInfo, JobError> {
        let info = self
            .tools
            .probe(path)
            .await
            .map_err(|e| probe_error(Which::Video, e))?;
        validate_video(&info, &self.media).map_err(|e| probe_error(Which::Video, e))?;
        self.tools
            .check_integrity(path)
            .await
            .map_err(|e| probe_error(Which::Video, e))?;
        Ok(info)
    }

    async fn probe_audio(&self, path: &Path) -> Result<MediaInfo, JobError> {
        let info = self
            .tools
            .probe(path)
            .await
            .map_err(|e| probe_error(Which::Audio, e))?;
        validate_audio(&info, &self.audio_limits).map_err(|e| probe_error(Which::Audio, e))?;
        Ok(info)
    }
}

#[async_trait]
impl lipsync_runtime::Handler for FetchStage {
    type Job = FetchJob;

    async fn handle(&self, ctx: JobCtx, job: FetchJob) -> Result<(), JobError> {
        let dir = match &self.scratch {
            Some(d) => tempfile::Builder::new().prefix("fetch-").tempdir_in(d),
            None => tempfile::Builder::new().prefix("lipsync-fetch-").tempdir(),
        }
        .map_err(JobError::transient)?;
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
                dir.path(),
                done.clone(),
                total.clone()
            ),
            self.obtain(
                &ctx,
                Which::Audio,
                &job.audio,
                dir.path(),
                done.clone(),
                total.clone()
            ),
        );
        ticker.abort();
        let (video, audio) = (video?, audio?);
        ctx.check().await?;

        let (vinfo, ainfo) = tokio::join!(self.probe_video(&video), self.probe_audio(&audio));
        let (vinfo, ainfo) = (vinfo?, ainfo?);
        ctx.progress(0.93, "fetch: inputs validated").await?;

        let wav = dir.path().join("audio_16k.wav");
        self.tools
            .to_pcm16k_wav(&audio, &wav)
            .await
            .map_err(|e| probe_error(Which::Audio, e))?;
        let wav_key = names::artifact_key(&ctx.task_id, names::artifact::AUDIO_16K);
        ctx.artifacts.put_file(&wav_key, &wav).await?;

        let v = vinfo.primary_video().expect("validated");
        let (width, height) = v.display_size();
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
        };
        let video_key = names::artifact_key(&ctx.task_id, names::artifact::VIDEO);
        let audio_key = names::artifact_key(&ctx.task_id, names::artifact::AUDIO_ORIGINAL);
        let video_key = match &job.video {
            InputSource::Artifact(k) => k.clone(),
            InputSource::Url(_) => video_key,
        };
        let audio_key = match &job.audio {
            InputSource::Artifact(k) => k.clone(),
            InputSource::Url(_) => audio_key,
        };
        let keys = [video_key.clone(), audio_key.clone(), wav_key.clone()];
        ctx.tasks
            .update(&ctx.task_id, |r| {
                r.media = Some(summary.clone());
                for k in &keys {
                    if !r.artifacts.contains(k) {
                        r.artifacts.push(k.clone());
                    }
                }
                r.raise_progress(lipsync_schemas::Stage::Fetch.progress_at(1.0));
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
        ctx.publish(&FaceJob {
            v: lipsync_schemas::WORK_VERSION,
            task_id: ctx.task_id.clone(),
            video: video_key,
        })
        .await?;
        ctx.publish(&AudioJob {
            v: lipsync_schemas::WORK_VERSION,
            task_id: ctx.task_id.clone(),
            audio_16k: wav_key,
        })
        .await?;
        Ok(())
    }
}
