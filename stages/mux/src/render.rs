//! The mux pipeline on local files, synchronous (the stage runs it on a blocking thread;
//! `lipsync-mux render` runs it from the command line): for each output frame, read the
//! video frame it shows and the generated crop, paste the face back, and stream the
//! result and the blend mask into two H.264 encoders. Memory holds a few frames
//! whatever the video length, plus the backward window of a ping-pong lap
//! (`mux.pingpong_window_bytes`, see [`crate::source`]); nothing is spooled to disk.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use lipsync_runtime::config::MuxConfig;
use lipsync_runtime::media::{DecodeOptions, Geometry, LengthMode, MediaCommand, source_frame};
use lipsync_schemas::FaceTrack;

use crate::blend::Blender;
use crate::encode::{EncodeSpec, Encoder, PixelFormat};
use crate::error::{MuxError, Result};
use crate::source::{CropFrames, VideoFrames};

/// Inputs and outputs of one render.
#[derive(Debug, Clone, Copy)]
pub struct RenderJob<'a> {
    /// The original video.
    pub video: &'a Path,
    /// Its face track.
    pub track: &'a FaceTrack,
    /// The generated crops (`output_frames` frames, R x R).
    pub crops: &'a Path,
    /// The audio to mux.
    pub audio: &'a Path,
    /// Output frame count.
    pub output_frames: usize,
    /// How output frames map to video frames.
    pub mode: LengthMode,
    /// Where the result goes.
    pub result: &'a Path,
    /// Where the mask video goes.
    pub mask: &'a Path,
}

/// Encoder settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// x264 CRF of the result.
    pub crf: u8,
    /// x264 preset of the result.
    pub preset: String,
    /// x264 threads of the result encoder, 0 = x264's choice.
    pub threads: u32,
    /// x264 CRF of the mask video.
    pub mask_crf: u8,
    /// x264 preset of the mask video.
    pub mask_preset: String,
    /// AAC bit rate, none = ffmpeg's default.
    pub audio_bitrate: Option<String>,
    /// Memory of the window a backward ping-pong lap is re-decoded into, bytes (at least
    /// one frame).
    pub pingpong_window_bytes: u64,
    /// Which video stream to decode (fetch's validated stream; default `0:V:0`).
    pub video: DecodeOptions,
}

const PRESETS: &[&str] = &[
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
    "placebo",
];

impl RenderOptions {
    /// Returns the options of a configuration.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn from_config(cfg: &MuxConfig) -> std::result::Result<Self, String> {
        for (key, preset) in [
            ("mux.preset", &cfg.preset),
            ("mux.mask_preset", &cfg.mask_preset),
        ] {
            if !PRESETS.contains(&preset.as_str()) {
                return Err(format!(
                    "{key}: unknown x264 preset `{preset}` (one of {})",
                    PRESETS.join(", ")
                ));
            }
        }
        for (key, crf) in [("mux.crf", cfg.crf), ("mux.mask_crf", cfg.mask_crf)] {
            if crf > 51 {
                return Err(format!("{key}: {crf} is out of range 0..=51"));
            }
        }
        if let Some(b) = &cfg.audio_bitrate {
            let digits = b.trim_end_matches(['k', 'K', 'm', 'M']);
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(format!(
                    "mux.audio_bitrate: `{b}` is not a bit rate such as 128k"
                ));
            }
        }
        Ok(Self {
            crf: cfg.crf,
            preset: cfg.preset.clone(),
            threads: cfg.encoder_threads,
            mask_crf: cfg.mask_crf,
            mask_preset: cfg.mask_preset.clone(),
            audio_bitrate: cfg.audio_bitrate.clone(),
            pingpong_window_bytes: cfg.pingpong_window_bytes,
            video: DecodeOptions::default(),
        })
    }
}

/// Shared with the caller while a render runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Output frames written so far.
    pub done: AtomicU64,
    /// Set to stop the render (it returns [`MuxError::Aborted`]).
    pub abort: AtomicBool,
}

/// What a render did.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderStats {
    /// Output frames.
    pub frames: usize,
    /// Output frames that had a face pasted.
    pub faces: usize,
    /// Decoder runs over the original video (forward laps + backward windows).
    pub video_decodes: usize,
    /// Frames of a backward ping-pong window.
    pub window_frames: usize,
    /// Memory the backward window took, bytes (0 when no lap went backward).
    pub window_bytes: u64,
    /// Wall time.
    pub secs: f64,
}

/// Checks that the track describes a usable video.
fn check_track(track: &FaceTrack, output_frames: usize, mode: LengthMode) -> Result<()> {
    let bad = |m: String| Err(MuxError::Inconsistent(m));
    if track.frames.is_empty() || track.frame_count as usize != track.frames.len() {
        return bad(format!(
            "the face track lists {} frames but says {}",
            track.frames.len(),
            track.frame_count
        ));
    }
    if track.width == 0
        || track.height == 0
        || track.crop_w == 0
        || track.crop_h == 0
        || track.resolution == 0
    {
        return bad("the face track has a zero frame, crop or model size".into());
    }
    if output_frames == 0 {
        return bad("the job asks for zero output frames".into());
    }
    if mode == LengthMode::Cut && output_frames > track.frames.len() {
        return bad(format!(
            "cut mode asks for {output_frames} frames of a {}-frame video",
            track.frames.len()
        ));
    }
    Ok(())
}

/// Whether the video is tagged BT.709 (then the result is encoded and tagged BT.709 too,
/// matching how the decoder turned it into RGB).
pub fn is_bt709(video: &Path) -> bool {
    is_bt709_stream(video, &DecodeOptions::default())
}

/// [`is_bt709`] of the stream `opts` selects.
pub fn is_bt709_stream(video: &Path, opts: &DecodeOptions) -> bool {
    let settings = lipsync_runtime::media::tool::settings();
    MediaCommand::ffprobe()
        .args([
            "-select_streams".to_owned(),
            opts.stream_spec(""),
            "-show_entries".to_owned(),
            "stream=color_space".to_owned(),
            "-of".to_owned(),
            "csv=p=0".to_owned(),
        ])
        .input(video)
        .cpu_limit_for(None)
        .run(settings.time.for_media(None))
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "bt709")
        .unwrap_or(false)
}

/// Renders `job`.
///
/// # Errors
/// Inconsistent inputs, decoding or encoding failures, or an abort.
pub fn render(
    job: &RenderJob<'_>,
    opts: &RenderOptions,
    progress: &Progress,
) -> Result<RenderStats> {
    let started = Instant::now();
    let track = job.track;
    check_track(track, job.output_frames, job.mode)?;
    let geometry = Geometry {
        width: track.width,
        height: track.height,
    };
    let (w, h) = (track.width as usize, track.height as usize);
    let res = track.resolution as usize;
    let n = track.frames.len();
    let bt709 = is_bt709_stream(job.video, &opts.video);

    let mut crops = CropFrames::open(job.crops, res, job.output_frames)?;
    let mut video = VideoFrames::open(
        job.video,
        n,
        geometry,
        opts.pingpong_window_bytes,
        opts.video,
    );
    let mut result = Encoder::start(&EncodeSpec {
        width: track.width,
        height: track.height,
        format: PixelFormat::Rgb24,
        crf: opts.crf,
        preset: &opts.preset,
        threads: opts.threads,
        audio: Some(job.audio),
        audio_bitrate: opts.audio_bitrate.as_deref(),
        bt709,
        frames: job.output_frames,
        output: job.result,
    })?;
    let mut mask = Encoder::start(&EncodeSpec {
        width: track.width,
        height: track.height,
        format: PixelFormat::Gray,
        crf: opts.mask_crf,
        preset: &opts.mask_preset,
        threads: 2,
        audio: None,
        audio_bitrate: None,
        bt709,
        frames: job.output_frames,
        output: job.mask,
    })?;
    let mut blender = Blender::new(w, h, track.crop_w as usize, track.crop_h as usize, res);
    let mut crop = Vec::new();
    let mut faces = 0;
    for k in 0..job.output_frames {
        if progress.abort.load(Ordering::Relaxed) {
            return Err(MuxError::Aborted);
        }
        let src = source_frame(k, n, job.mode);
        let mut frame = result.buffer();
        video.read(src, &mut frame)?;
        crops.next_into(&mut crop)?;
        let face = &track.frames[src];
        if face.present {
            blender
                .blend(&mut frame, &crop, &face.affine)
                .map_err(|e| MuxError::Inconsistent(format!("video frame {src}: {e}")))?;
            faces += 1;
        } else {
            blender.clear();
        }
        let mut grey = mask.buffer();
        grey.fill(0);
        let (r, soft) = blender.soft_mask();
        for y in r.y0..r.y1 {
            let row = &soft[(y - r.y0) * r.width()..(y - r.y0 + 1) * r.width()];
            for (o, s) in grey[y * w + r.x0..y * w + r.x1].iter_mut().zip(row) {
                *o = (s * 255.0 + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
        result.send(frame)?;
        mask.send(grey)?;
        progress.done.store(k as u64 + 1, Ordering::Relaxed);
    }
    crops.finish()?;
    result.finish()?;
    mask.finish()?;
    Ok(RenderStats {
        frames: job.output_frames,
        faces,
        video_decodes: video.decodes,
        window_frames: video.window_frames(),
        window_bytes: video.window_bytes(),
        secs: started.elapsed().as_secs_f64(),
    })
}
