//! ffprobe / ffmpeg runs of the fetch stage: media inspection, input validation, audio
//! conversion.
//!
//! Every run goes through the runtime's one wrapper (`lipsync_runtime::media::tool`): a
//! time limit (the child is killed when it expires), local files and pipes only
//! (`-protocol_whitelist file,pipe`), real media containers only (`-format_whitelist`,
//! see [`FORMAT_WHITELIST`]), and playlists, concat lists and text files refused by their
//! content whatever their name: a downloaded "video" that is really an HLS playlist or a
//! concat script cannot make ffmpeg fetch URLs or read other local files. Errors are
//! typed and their messages never contain server paths or raw ffmpeg output beyond one
//! sanitised line.
//!
//! The limits are checked on what the inputs decode to, not only on what they claim:
//! `probe` reads container headers only (a Matroska file can declare 10 s and hold hours
//! of clusters; an MP3's Xing header can claim a tenth of its frames).
//! [`MediaTools::check_integrity`] demuxes every packet of the video (no decoding, I/O
//! bound, stopped just past the duration cap), catching truncation and measuring the
//! real length; [`MediaTools::to_pcm16k_wav`] stops the audio conversion just past the
//! cap and counts the samples it wrote. The fetch stage runs all three.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lipsync_runtime::media::{MediaCommand, MediaError};
use serde::{Deserialize, Serialize};

/// Demuxers ffprobe/ffmpeg may use on inputs (the runtime wrapper's list). Playlists (hls,
/// dash, concat), image sequences and text formats (tty, subtitles) are absent.
pub const FORMAT_WHITELIST: &str = lipsync_runtime::media::tool::FORMATS;

/// A frame rate or other rational number as ffprobe prints it (`30000/1001`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rational {
    pub num: u32,
    pub den: u32,
}

impl Rational {
    /// Parses `num/den`; `None` for `0/0`, zero numerator or denominator, or garbage.
    pub fn parse(s: &str) -> Option<Self> {
        let (n, d) = s.trim().split_once('/')?;
        let (num, den) = (n.trim().parse().ok()?, d.trim().parse().ok()?);
        (num != 0 && den != 0).then_some(Self { num, den })
    }

    /// The value as a float.
    pub fn as_f64(&self) -> f64 {
        f64::from(self.num) / f64::from(self.den)
    }
}

impl std::fmt::Display for Rational {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.num, self.den)
    }
}

/// A video stream (attached pictures such as cover art are not listed as video).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoStream {
    /// Stream index in the container.
    pub index: u32,
    pub codec: String,
    /// Coded width and height (before rotation).
    pub width: u32,
    pub height: u32,
    pub pix_fmt: Option<String>,
    pub avg_frame_rate: Option<Rational>,
    pub r_frame_rate: Option<Rational>,
    /// Frame count from the container, when it states one.
    pub nb_frames: Option<u64>,
    pub duration_s: Option<f64>,
    /// Display rotation in degrees counter-clockwise, normalised to 0, 90, 180 or 270
    /// (ffprobe's display-matrix convention; a legacy `rotate` tag, which is clockwise,
    /// is converted).
    pub rotation: u32,
}

impl VideoStream {
    /// Frames per second: the average frame rate, else the base rate.
    pub fn fps(&self) -> Option<f64> {
        self.avg_frame_rate
            .or(self.r_frame_rate)
            .map(|r| r.as_f64())
    }

    /// Width and height as displayed (swapped for 90/270 rotation).
    pub fn display_size(&self) -> (u32, u32) {
        if self.rotation % 180 == 90 {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }

    /// `nb_frames`, else duration × fps rounded up (using `fallback_duration_s` when the
    /// stream has no duration of its own).
    pub fn frame_count(&self, fallback_duration_s: Option<f64>) -> Option<u64> {
        if let Some(n) = self.nb_frames {
            return Some(n);
        }
        let d = self.duration_s.or(fallback_duration_s)?;
        let fps = self.fps()?;
        let n = (d * fps).ceil();
        (n.is_finite() && n >= 0.0).then_some(n as u64)
    }
}

/// An audio stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioStream {
    pub index: u32,
    pub codec: String,
    pub sample_rate: u32,
    pub channels: u32,
    pub duration_s: Option<f64>,
}

/// What ffprobe found in a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaInfo {
    /// ffprobe's format name, e.g. `mov,mp4,m4a,3gp,3g2,mj2` or `wav`.
    pub container: String,
    /// Container duration, else the longest stream duration.
    pub duration_s: Option<f64>,
    pub size_bytes: Option<u64>,
    pub bit_rate: Option<u64>,
    pub video: Vec<VideoStream>,
    pub audio: Vec<AudioStream>,
}

impl MediaInfo {
    /// The first video stream (ffmpeg's default choice for single-video files).
    pub fn primary_video(&self) -> Option<&VideoStream> {
        self.video.first()
    }

    /// The first audio stream.
    pub fn primary_audio(&self) -> Option<&AudioStream> {
        self.audio.first()
    }
}

/// Acceptance limits for inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaLimits {
    /// Longest accepted input, seconds.
    pub max_duration_s: f64,
    /// Shortest accepted input, seconds.
    pub min_duration_s: f64,
    /// Largest accepted picture, compared orientation-independently: the long side
    /// against the larger of the two, the short side against the smaller.
    pub max_width: u32,
    pub max_height: u32,
    /// Most video frames accepted.
    pub max_frames: u64,
}

impl Default for MediaLimits {
    fn default() -> Self {
        Self {
            max_duration_s: 600.0,
            min_duration_s: 0.2,
            max_width: 3840,
            max_height: 2160,
            max_frames: 36_000,
        }
    }
}

/// A typed media failure; [`code`](Self::code) gives the service error code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProbeError {
    /// Not a readable media file, truncated, corrupt, too large a picture, too short, ...
    #[error("{message}")]
    UnsupportedMedia { message: String },
    /// The video input has no video stream.
    #[error("the video input has no video stream")]
    NoVideoStream,
    /// The audio input has no audio stream.
    #[error("the audio input has no audio stream")]
    NoAudioStream,
    /// Longer (in time or frames) than the limits.
    #[error("{message}")]
    InputTooLong { message: String },
    /// ffprobe/ffmpeg did not finish in time (the child was killed).
    #[error("{tool} did not finish within {} s; the file may be malformed", after.as_secs_f64())]
    Timeout { tool: &'static str, after: Duration },
    /// ffprobe/ffmpeg could not be run at all (not installed, I/O error): a server fault.
    #[error("media tool unavailable: {message}")]
    Tool { message: String },
}

impl ProbeError {
    /// Service error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::UnsupportedMedia { .. } | Self::Timeout { .. } => "unsupported_media",
            Self::NoVideoStream => "no_video_stream",
            Self::NoAudioStream => "no_audio_stream",
            Self::InputTooLong { .. } => "input_too_long",
            Self::Tool { .. } => "internal",
        }
    }

    /// Whether retrying may help (only a missing/broken tool, i.e. a server fault).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Tool { .. })
    }

    fn unsupported(message: impl Into<String>) -> Self {
        Self::UnsupportedMedia {
            message: message.into(),
        }
    }
}

/// Default timeouts.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CONVERT_TIMEOUT: Duration = Duration::from_secs(300);

/// Locations of and time limits for ffprobe/ffmpeg.
#[derive(Debug, Clone, PartialEq)]
pub struct MediaTools {
    pub ffprobe: PathBuf,
    pub ffmpeg: PathBuf,
    /// Limit for `probe` and `check_integrity`.
    pub probe_timeout: Duration,
    /// Limit for conversions.
    pub convert_timeout: Duration,
    /// Longest media accepted, seconds: the integrity check and the audio conversion
    /// stop [`margin_s`](Self::margin_s) past it and report `input_too_long`.
    pub max_duration_s: f64,
    /// How far past `max_duration_s` decoding goes before it stops.
    pub margin_s: f64,
}

impl Default for MediaTools {
    fn default() -> Self {
        Self {
            ffprobe: PathBuf::from("ffprobe"),
            ffmpeg: PathBuf::from("ffmpeg"),
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            convert_timeout: DEFAULT_CONVERT_TIMEOUT,
            max_duration_s: 600.0,
            margin_s: 1.0,
        }
    }
}

/// What demuxing every packet of an input found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Integrity {
    /// Length actually held, seconds (the end of the last packet written).
    pub duration_s: f64,
}

/// Probes `path` with the default tools and timeout.
pub async fn probe(path: impl AsRef<Path>) -> Result<MediaInfo, ProbeError> {
    MediaTools::default().probe(path.as_ref()).await
}

/// Converts the first audio stream of `input` to a 16 kHz mono 16-bit PCM WAV file at
/// `output` (overwritten), with the default tools and timeout.
pub async fn to_pcm16k_wav(
    input: impl AsRef<Path>,
    output: impl AsRef<Path>,
) -> Result<(), ProbeError> {
    MediaTools::default()
        .to_pcm16k_wav(input.as_ref(), output.as_ref())
        .await
}

struct ToolOutput {
    success: bool,
    stdout: Vec<u8>,
    stderr: String,
}

/// A wrapper failure as a typed probe error.
fn media_error(tool: &'static str, timeout: Duration, e: MediaError) -> ProbeError {
    match e {
        MediaError::Spawn(_, err) => ProbeError::Tool {
            message: format!("could not start {tool}: {}", err.kind()),
        },
        MediaError::Timeout(_) => ProbeError::Timeout {
            tool,
            after: timeout,
        },
        MediaError::TooLong(message) => ProbeError::InputTooLong { message },
        MediaError::Refused(message) | MediaError::Decode(message) => {
            ProbeError::UnsupportedMedia { message }
        }
    }
}

impl MediaTools {
    /// Runs `cmd` within `timeout` (wall clock and CPU time).
    async fn run(&self, cmd: MediaCommand, timeout: Duration) -> Result<ToolOutput, ProbeError> {
        let tool = cmd.tool().name();
        let out = cmd
            .cpu_limit(timeout)
            .run_async(timeout)
            .await
            .map_err(|e| media_error(tool, timeout, e))?;
        Ok(ToolOutput {
            success: out.status.success(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }

    fn cap_s(&self) -> f64 {
        self.max_duration_s + self.margin_s.max(0.0)
    }

    /// Runs ffprobe on `path` and parses its streams.
    pub async fn probe(&self, path: &Path) -> Result<MediaInfo, ProbeError> {
        check_nonempty(path).await?;
        let cmd = MediaCommand::ffprobe()
            .program(&self.ffprobe)
            .args(["-print_format", "json", "-show_format", "-show_streams"])
            .input(path);
        let out = self.run(cmd, self.probe_timeout).await?;
        if !out.success {
            tracing::debug!(stderr = %out.stderr, "ffprobe failed");
            return Err(ProbeError::unsupported(format!(
                "the file is not a readable media file{}",
                detail(&out.stderr, path)
            )));
        }
        parse_ffprobe_json(&out.stdout)
    }

    /// Reads every audio/video packet of `path` without decoding (fast, I/O bound),
    /// stopping [`margin_s`](Self::margin_s) past the duration cap. Fails with
    /// `UnsupportedMedia` if the file is truncated or corrupt, and with `InputTooLong` if
    /// it holds more than `max_duration_s` whatever its header declares.
    pub async fn check_integrity(&self, path: &Path) -> Result<Integrity, ProbeError> {
        check_nonempty(path).await?;
        let cmd = MediaCommand::ffmpeg()
            .program(&self.ffmpeg)
            .arg("-xerror")
            .input(path)
            .args(["-map", "0:V?", "-map", "0:a?", "-c", "copy", "-t"])
            .arg(format!("{:.3}", self.cap_s()))
            .args(["-nostats", "-progress", "pipe:1", "-f", "null", "-"]);
        let out = self.run(cmd, self.probe_timeout).await?;
        if !out.success || !out.stderr.trim().is_empty() {
            tracing::debug!(stderr = %out.stderr, "integrity check failed");
            return Err(ProbeError::unsupported(format!(
                "the file is truncated or corrupt{}",
                detail(&out.stderr, path)
            )));
        }
        let duration_s = progress_time_s(&out.stdout).unwrap_or(0.0);
        if duration_s > self.max_duration_s {
            return Err(ProbeError::InputTooLong {
                message: format!(
                    "the file holds more than {} s of media (whatever its header declares)",
                    self.max_duration_s
                ),
            });
        }
        Ok(Integrity { duration_s })
    }

    /// Converts the first audio stream of `input` to 16 kHz mono s16le WAV at `output`.
    /// The conversion stops [`margin_s`](Self::margin_s) past `max_duration_s`; the
    /// samples written are counted and audio longer than the cap is `InputTooLong`
    /// (an MP3 whose header claims less than it holds is caught here).
    pub async fn to_pcm16k_wav(&self, input: &Path, output: &Path) -> Result<(), ProbeError> {
        check_nonempty(input).await?;
        let cmd = MediaCommand::ffmpeg()
            .program(&self.ffmpeg)
            .arg("-y")
            .input(input)
            .args([
                "-map",
                "0:a:0",
                "-vn",
                "-sn",
                "-dn",
                "-map_metadata",
                "-1",
                "-ac",
                "1",
                "-ar",
                "16000",
                "-c:a",
                "pcm_s16le",
                "-t",
            ])
            .arg(format!("{:.3}", self.cap_s()))
            .args(["-f", "wav"])
            .output(output);
        let out = self.run(cmd, self.convert_timeout).await?;
        if !out.success {
            tracing::debug!(stderr = %out.stderr, "audio conversion failed");
            let mut d = detail(&out.stderr, input);
            d = d.replace(&*output.to_string_lossy(), "output");
            if out.stderr.contains("matches no streams") {
                return Err(ProbeError::NoAudioStream);
            }
            return Err(ProbeError::unsupported(format!(
                "the audio could not be decoded{d}"
            )));
        }
        let samples = wav_samples(output).await?;
        let secs = samples as f64 / 16_000.0;
        if secs > self.max_duration_s {
            return Err(ProbeError::InputTooLong {
                message: format!(
                    "the audio decodes to more than {} s (whatever its header declares)",
                    self.max_duration_s
                ),
            });
        }
        if samples == 0 {
            return Err(ProbeError::unsupported("the audio decodes to no samples"));
        }
        Ok(())
    }
}

/// The last `out_time_us` of ffmpeg's `-progress` output, in seconds.
fn progress_time_s(stdout: &[u8]) -> Option<f64> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("out_time_us="))
        .filter_map(|v| v.trim().parse::<i64>().ok())
        .rfind(|v| *v >= 0)
        .map(|us| us as f64 / 1e6)
}

/// Number of 16-bit mono samples in the `data` chunk of a WAV file written by ffmpeg.
async fn wav_samples(path: &Path) -> Result<u64, ProbeError> {
    // Only the chunk list at the start is read, never the samples.
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| ProbeError::Tool {
            message: format!("the converted audio cannot be read: {}", e.kind()),
        })?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ProbeError::Tool {
            message: format!("the converted audio cannot be read: {}", e.kind()),
        })?
        .len();
    let mut head = vec![0u8; 4096.min(len as usize)];
    use tokio::io::AsyncReadExt;
    f.read_exact(&mut head)
        .await
        .map_err(|e| ProbeError::Tool {
            message: format!("the converted audio cannot be read: {}", e.kind()),
        })?;
    data_chunk(&head, len)
        .ok_or_else(|| ProbeError::unsupported("the converted audio is not a WAV file"))
}

/// The sample count of the `data` chunk from a WAV header; a size
/// field of 0 or 0xFFFFFFFF (streamed output) means "to the end of the file".
fn data_chunk(head: &[u8], file_len: u64) -> Option<u64> {
    if head.len() < 12 || &head[..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return None;
    }
    let mut pos = 12usize;
    while pos + 8 <= head.len() {
        let id = &head[pos..pos + 4];
        let size = u32::from_le_bytes(head[pos + 4..pos + 8].try_into().ok()?) as u64;
        let body = pos as u64 + 8;
        if id == b"data" {
            let avail = file_len.saturating_sub(body);
            let size = if size == 0 || size == u64::from(u32::MAX) {
                avail
            } else {
                size.min(avail)
            };
            return Some(size / 2);
        }
        pos = usize::try_from(body + size + (size & 1)).ok()?;
    }
    None
}

async fn check_nonempty(path: &Path) -> Result<(), ProbeError> {
    match tokio::fs::metadata(path).await {
        Ok(m) if m.len() == 0 => Err(ProbeError::unsupported("the file is empty")),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ProbeError::Tool {
            message: "the input file is missing".to_string(),
        }),
        Err(e) => Err(ProbeError::Tool {
            message: format!("the input file cannot be read: {}", e.kind()),
        }),
    }
}

/// One human line from ffmpeg's stderr, without paths or `[demuxer @ 0x...]` prefixes,
/// as ` (line)`; empty when there is nothing useful.
fn detail(stderr: &str, path: &Path) -> String {
    if stderr.contains("not on whitelist") {
        return " (unsupported container format; playlists and scripts are not accepted)"
            .to_string();
    }
    let path_str = path.to_string_lossy();
    let line = stderr
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("");
    let mut line = line.replace(&*path_str, "");
    if let Some(pos) = line.find("] ")
        && line.starts_with('[')
    {
        line = line[pos + 2..].to_string();
    }
    let line = line.trim_start_matches(':').trim();
    // Anything that still looks like a path is dropped rather than echoed.
    if line.is_empty() || line.contains('/') {
        return String::new();
    }
    let short: String = line.chars().take(160).collect();
    format!(" ({short})")
}

#[derive(Deserialize)]
struct FfprobeOutput {
    #[serde(default)]
    streams: Vec<FfStream>,
    format: Option<FfFormat>,
}

#[derive(Deserialize)]
struct FfFormat {
    format_name: Option<String>,
    duration: Option<String>,
    size: Option<String>,
    bit_rate: Option<String>,
}

#[derive(Deserialize)]
struct FfStream {
    index: Option<u32>,
    codec_type: Option<String>,
    codec_name: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    pix_fmt: Option<String>,
    avg_frame_rate: Option<String>,
    r_frame_rate: Option<String>,
    nb_frames: Option<String>,
    duration: Option<String>,
    sample_rate: Option<String>,
    channels: Option<u32>,
    #[serde(default)]
    disposition: Option<FfDisposition>,
    #[serde(default)]
    tags: Option<std::collections::HashMap<String, String>>,
    #[serde(default)]
    side_data_list: Vec<FfSideData>,
}

#[derive(Deserialize)]
struct FfDisposition {
    #[serde(default)]
    attached_pic: u8,
}

#[derive(Deserialize)]
struct FfSideData {
    side_data_type: Option<String>,
    rotation: Option<serde_json::Value>,
}

fn num<T: std::str::FromStr>(s: &Option<String>) -> Option<T> {
    s.as_deref().and_then(|s| s.trim().parse().ok())
}

fn positive_secs(s: &Option<String>) -> Option<f64> {
    num::<f64>(s).filter(|d| d.is_finite() && *d >= 0.0)
}

fn normalise_rotation(deg: f64) -> u32 {
    let r = (deg.round() as i64).rem_euclid(360);
    // Snap to the nearest quarter turn.
    (((r + 45) / 90 % 4) * 90) as u32
}

fn rotation_of(s: &FfStream) -> u32 {
    for sd in &s.side_data_list {
        if sd.side_data_type.as_deref() == Some("Display Matrix")
            && let Some(v) = &sd.rotation
        {
            let deg = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|t| t.parse().ok()));
            if let Some(deg) = deg {
                return normalise_rotation(deg);
            }
        }
    }
    // Legacy tag: clockwise degrees.
    if let Some(r) = s
        .tags
        .as_ref()
        .and_then(|t| t.get("rotate"))
        .and_then(|r| r.trim().parse::<f64>().ok())
    {
        return normalise_rotation(-r);
    }
    0
}

/// Parses ffprobe's `-print_format json -show_format -show_streams` output.
pub fn parse_ffprobe_json(json: &[u8]) -> Result<MediaInfo, ProbeError> {
    let parsed: FfprobeOutput = serde_json::from_slice(json)
        .map_err(|_| ProbeError::unsupported("the media information could not be read"))?;
    let Some(format) = parsed.format else {
        return Err(ProbeError::unsupported(
            "the file is not a readable media file",
        ));
    };
    let mut video = Vec::new();
    let mut audio = Vec::new();
    for s in &parsed.streams {
        let index = s.index.unwrap_or(0);
        let codec = s
            .codec_name
            .clone()
            .unwrap_or_else(|| "unknown".to_string());
        match s.codec_type.as_deref() {
            Some("video") => {
                if s.disposition.as_ref().is_some_and(|d| d.attached_pic != 0) {
                    continue; // cover art, not a video
                }
                video.push(VideoStream {
                    index,
                    codec,
                    width: s.width.unwrap_or(0),
                    height: s.height.unwrap_or(0),
                    pix_fmt: s.pix_fmt.clone(),
                    avg_frame_rate: s.avg_frame_rate.as_deref().and_then(Rational::parse),
                    r_frame_rate: s.r_frame_rate.as_deref().and_then(Rational::parse),
                    nb_frames: num::<u64>(&s.nb_frames).filter(|n| *n > 0),
                    duration_s: positive_secs(&s.duration),
                    rotation: rotation_of(s),
                });
            }
            Some("audio") => audio.push(AudioStream {
                index,
                codec,
                sample_rate: num::<u32>(&s.sample_rate).unwrap_or(0),
                channels: s.channels.unwrap_or(0),
                duration_s: positive_secs(&s.duration),
            }),
            _ => {}
        }
    }
    let stream_max = video
        .iter()
        .filter_map(|v| v.duration_s)
        .chain(audio.iter().filter_map(|a| a.duration_s))
        .fold(None, |acc: Option<f64>, d| {
            Some(acc.map_or(d, |a| a.max(d)))
        });
    Ok(MediaInfo {
        container: format.format_name.unwrap_or_default(),
        duration_s: positive_secs(&format.duration).or(stream_max),
        size_bytes: num(&format.size),
        bit_rate: num(&format.bit_rate),
        video,
        audio,
    })
}

fn check_duration(what: &str, d: Option<f64>, limits: &MediaLimits) -> Result<f64, ProbeError> {
    let Some(d) = d else {
        return Err(ProbeError::unsupported(format!(
            "the duration of the {what} could not be determined"
        )));
    };
    if d > limits.max_duration_s {
        return Err(ProbeError::InputTooLong {
            message: format!(
                "the {what} is {d:.1} s long; at most {} s are allowed",
                limits.max_duration_s
            ),
        });
    }
    if d < limits.min_duration_s {
        return Err(ProbeError::unsupported(format!(
            "the {what} is {d:.2} s long; at least {} s are required",
            limits.min_duration_s
        )));
    }
    Ok(d)
}

/// Checks a probed video input: a video stream with a picture size and frame rate,
/// duration, resolution and frame count within `limits`.
pub fn validate_video(info: &MediaInfo, limits: &MediaLimits) -> Result<(), ProbeError> {
    let v = info.primary_video().ok_or(ProbeError::NoVideoStream)?;
    if v.width == 0 || v.height == 0 {
        return Err(ProbeError::unsupported(
            "the video stream has no picture size",
        ));
    }
    let fps = v
        .fps()
        .filter(|f| f.is_finite() && *f > 0.0)
        .ok_or_else(|| {
            ProbeError::unsupported("the frame rate of the video could not be determined")
        })?;
    let duration = check_duration("video", v.duration_s.or(info.duration_s), limits)?;
    let (w, h) = v.display_size();
    let (long, short) = (w.max(h), w.min(h));
    let (max_long, max_short) = (
        limits.max_width.max(limits.max_height),
        limits.max_width.min(limits.max_height),
    );
    if long > max_long || short > max_short {
        return Err(ProbeError::unsupported(format!(
            "the video is {w}x{h}; at most {}x{} (either orientation) is allowed",
            limits.max_width, limits.max_height
        )));
    }
    let frames = v
        .frame_count(Some(duration))
        .unwrap_or((duration * fps).ceil() as u64);
    if frames > limits.max_frames {
        return Err(ProbeError::InputTooLong {
            message: format!(
                "the video has {frames} frames; at most {} are allowed",
                limits.max_frames
            ),
        });
    }
    Ok(())
}

/// Checks a probed audio input: an audio stream (a video file with sound is fine) with a
/// sample rate and channels, duration within `limits`.
pub fn validate_audio(info: &MediaInfo, limits: &MediaLimits) -> Result<(), ProbeError> {
    let a = info.primary_audio().ok_or(ProbeError::NoAudioStream)?;
    if a.sample_rate == 0 || a.channels == 0 {
        return Err(ProbeError::unsupported(
            "the audio stream has no sample rate or channels",
        ));
    }
    check_duration("audio", a.duration_s.or(info.duration_s), limits)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rationals() {
        assert_eq!(
            Rational::parse("30000/1001"),
            Some(Rational {
                num: 30000,
                den: 1001
            })
        );
        assert!((Rational::parse("30000/1001").unwrap().as_f64() - 29.97).abs() < 0.01);
        assert_eq!(Rational::parse("0/0"), None);
        assert_eq!(Rational::parse("25"), None);
        assert_eq!(Rational::parse("x/y"), None);
    }

    #[test]
    fn rotation_normalisation() {
        assert_eq!(normalise_rotation(90.0), 90);
        assert_eq!(normalise_rotation(-90.0), 270);
        assert_eq!(normalise_rotation(180.0), 180);
        assert_eq!(normalise_rotation(-180.0), 180);
        assert_eq!(normalise_rotation(359.6), 0);
        assert_eq!(normalise_rotation(0.0), 0);
        assert_eq!(normalise_rotation(89.7), 90);
    }

    #[test]
    fn parses_sample_json_with_cover_art_and_legacy_rotate() {
        let json = br#"{
          "streams": [
            {"index":0,"codec_type":"video","codec_name":"h264","width":1920,"height":1080,
             "avg_frame_rate":"30000/1001","r_frame_rate":"30000/1001","nb_frames":"300",
             "duration":"10.010000","tags":{"rotate":"90"}},
            {"index":1,"codec_type":"audio","codec_name":"aac","sample_rate":"48000",
             "channels":2,"duration":"10.000000"},
            {"index":2,"codec_type":"video","codec_name":"mjpeg","width":300,"height":300,
             "disposition":{"attached_pic":1}}
          ],
          "format": {"format_name":"mov,mp4,m4a,3gp,3g2,mj2","duration":"10.010000",
                     "size":"123456","bit_rate":"98765"}
        }"#;
        let info = parse_ffprobe_json(json).unwrap();
        assert_eq!(info.video.len(), 1);
        let v = &info.video[0];
        assert_eq!(v.rotation, 270);
        assert_eq!(v.display_size(), (1080, 1920));
        assert_eq!(v.nb_frames, Some(300));
        assert!((v.fps().unwrap() - 29.97).abs() < 0.01);
        assert_eq!(info.audio[0].sample_rate, 48000);
        assert_eq!(info.size_bytes, Some(123456));
        assert_eq!(info.duration_s, Some(10.01));
        validate_video(&info, &MediaLimits::default()).unwrap();
        validate_audio(&info, &MediaLimits::default()).unwrap();
    }

    fn info_with(video: Option<(u32, u32, f64, f64)>, audio: bool) -> MediaInfo {
        MediaInfo {
            container: "x".into(),
            duration_s: video.map(|v| v.3).or(Some(5.0)),
            size_bytes: None,
            bit_rate: None,
            video: video
                .map(|(w, h, fps, d)| VideoStream {
                    index: 0,
                    codec: "h264".into(),
                    width: w,
                    height: h,
                    pix_fmt: None,
                    avg_frame_rate: Some(Rational {
                        num: (fps * 1000.0) as u32,
                        den: 1000,
                    }),
                    r_frame_rate: None,
                    nb_frames: None,
                    duration_s: Some(d),
                    rotation: 0,
                })
                .into_iter()
                .collect(),
            audio: if audio {
                vec![AudioStream {
                    index: 1,
                    codec: "aac".into(),
                    sample_rate: 44100,
                    channels: 1,
                    duration_s: Some(5.0),
                }]
            } else {
                vec![]
            },
        }
    }

    #[test]
    fn validation_limits() {
        let l = MediaLimits::default();
        assert_eq!(
            validate_video(&info_with(None, true), &l),
            Err(ProbeError::NoVideoStream)
        );
        assert_eq!(
            validate_audio(&info_with(Some((640, 480, 25.0, 5.0)), false), &l),
            Err(ProbeError::NoAudioStream)
        );
        validate_video(&info_with(Some((640, 480, 25.0, 5.0)), false), &l).unwrap();
        // Portrait 4K is fine with 3840x2160 limits; 8K is not.
        validate_video(&info_with(Some((2160, 3840, 25.0, 5.0)), false), &l).unwrap();
        let e = validate_video(&info_with(Some((7680, 4320, 25.0, 5.0)), false), &l).unwrap_err();
        assert_eq!(e.code(), "unsupported_media");
        let e = validate_video(&info_with(Some((640, 480, 25.0, 601.0)), false), &l).unwrap_err();
        assert_eq!(e.code(), "input_too_long");
        let e = validate_video(&info_with(Some((640, 480, 25.0, 0.05)), false), &l).unwrap_err();
        assert_eq!(e.code(), "unsupported_media");
        let frames = MediaLimits {
            max_frames: 100,
            ..MediaLimits::default()
        };
        let e =
            validate_video(&info_with(Some((640, 480, 25.0, 5.0)), false), &frames).unwrap_err();
        assert!(matches!(e, ProbeError::InputTooLong { .. }), "{e}");
        validate_video(&info_with(Some((640, 480, 25.0, 3.9)), false), &frames).unwrap();
    }

    #[test]
    fn detail_strips_paths_and_prefixes() {
        let p = Path::new("/srv/tmp/abc/in.mp4");
        let err = "[mov,mp4,m4a,3gp,3g2,mj2 @ 0x55] moov atom not found\n/srv/tmp/abc/in.mp4: Invalid data found when processing input\n";
        assert_eq!(
            detail(err, p),
            " (Invalid data found when processing input)"
        );
        assert_eq!(detail("", p), "");
        assert_eq!(detail("cannot open /etc/other", p), "");
    }

    #[test]
    fn garbage_json_is_unsupported() {
        assert_eq!(
            parse_ffprobe_json(b"{}").unwrap_err().code(),
            "unsupported_media"
        );
        assert_eq!(
            parse_ffprobe_json(b"not json").unwrap_err().code(),
            "unsupported_media"
        );
    }
}
