//! The one frame-decoding recipe every stage uses (docs/architecture.md §4: frames must be identical in
//! every stage that decodes them), and the map from output frames to video frames.

use std::io::Read;
use std::path::Path;
use std::process::{ChildStdout, Command};

use serde::{Deserialize, Serialize};

pub mod framesel;
pub mod scratch;
pub mod tool;

pub use tool::{MediaCommand, MediaSettings, TimeLimits};

/// Frame rate of every decoded frame sequence and of the output.
pub const FPS: u32 = 25;

/// Errors of the decoder.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// ffmpeg/ffprobe could not be started.
    #[error("cannot run {0}: {1}")]
    Spawn(&'static str, std::io::Error),
    /// The input could not be probed or decoded.
    #[error("cannot decode video: {0}")]
    Decode(String),
    /// The input decodes to more than the limits allow (`input_too_long`).
    #[error("{0}")]
    TooLong(String),
    /// The input is a playlist, a list of files or text, not media (`unsupported_media`).
    #[error("{0}")]
    Refused(String),
    /// A tool ran past its time limit (`unsupported_media`: the file is likely crafted).
    #[error("{0}")]
    Timeout(String),
}

impl MediaError {
    /// The task error code of this failure.
    pub fn code(&self) -> lipsync_schemas::ErrorCode {
        use lipsync_schemas::ErrorCode;
        match self {
            MediaError::Spawn(..) => ErrorCode::Internal,
            MediaError::TooLong(_) => ErrorCode::InputTooLong,
            MediaError::Decode(_) | MediaError::Refused(_) | MediaError::Timeout(_) => {
                ErrorCode::UnsupportedMedia
            }
        }
    }

    /// Whether retrying may help (only a tool that could not start).
    pub fn is_transient(&self) -> bool {
        matches!(self, MediaError::Spawn(..))
    }
}

/// Which video stream to decode and how (fetch validates the input and hands these on in
/// the work items; the defaults are what fetch would choose).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeOptions {
    /// Container index of the validated video stream; `None` = the first video stream
    /// that is not an attached picture (`0:V:0`).
    pub stream: Option<u32>,
    /// The validated frame size (after rotation); `None` = probe it. Frames are always
    /// delivered at this size: a stream whose resolution changes mid-way is scaled back to
    /// it (ffmpeg keeps the output size of the first configuration), so a reader never
    /// returns frames of another size.
    pub geometry: Option<Geometry>,
    /// Most frames returned before [`MediaError::TooLong`]; `None` = the process-wide
    /// setting ([`tool::settings`]).
    pub max_frames: Option<u64>,
    /// Media length in seconds, for the decoder's CPU-time limit; `None` = probe it.
    pub duration_s: Option<f64>,
}

impl DecodeOptions {
    /// Decode the stream fetch validated, at its validated size (`None`: the first video
    /// stream that is not an attached picture, probed).
    pub fn validated(stream: Option<lipsync_schemas::VideoStream>) -> Self {
        Self {
            stream: stream.map(|s| s.index),
            geometry: stream.map(|s| Geometry {
                width: s.width,
                height: s.height,
            }),
            ..Self::default()
        }
    }

    /// The `-map` / `-select_streams` specifier of the stream.
    pub fn stream_spec(&self, prefix: &str) -> String {
        match self.stream {
            Some(i) => format!("{prefix}{i}"),
            None => format!("{prefix}V:0"),
        }
    }
}

/// Size of decoded frames (after applying the rotation metadata).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Geometry {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Probe the size frames will have when decoded with [`FrameReader`] (ffmpeg applies the
/// display matrix, so a 90° rotated phone video decodes with width and height swapped).
pub fn probe_geometry(input: &Path) -> Result<Geometry, MediaError> {
    probe_stream(input, &DecodeOptions::default()).map(|(g, _)| g)
}

/// Probe the decoded frame size of the stream `opts` selects, and the media duration.
pub fn probe_stream(
    input: &Path,
    opts: &DecodeOptions,
) -> Result<(Geometry, Option<f64>), MediaError> {
    let cmd = MediaCommand::ffprobe()
        .args([
            "-select_streams".to_owned(),
            opts.stream_spec(""),
            "-show_entries".to_owned(),
            "stream=width,height:stream_side_data=rotation:stream_tags=rotate:format=duration"
                .to_owned(),
            "-of".to_owned(),
            "json".to_owned(),
        ])
        .input(input)
        .cpu_limit_for(None);
    let out = cmd.run(tool::settings().time.for_media(None))?;
    if !out.status.success() {
        return Err(MediaError::Decode(cmd.reason(&out.stderr)));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| MediaError::Decode(format!("ffprobe output: {e}")))?;
    let s = v["streams"]
        .get(0)
        .ok_or_else(|| MediaError::Decode("no video stream".into()))?;
    let w = s["width"].as_u64().unwrap_or(0) as u32;
    let h = s["height"].as_u64().unwrap_or(0) as u32;
    if w == 0 || h == 0 {
        return Err(MediaError::Decode("video stream has no size".into()));
    }
    let mut rotation = s["tags"]["rotate"]
        .as_str()
        .and_then(|r| r.parse::<i64>().ok())
        .unwrap_or(0);
    if let Some(sd) = s["side_data_list"].as_array() {
        for d in sd {
            if let Some(r) = d["rotation"].as_i64() {
                rotation = r;
            } else if let Some(r) = d["rotation"].as_f64() {
                rotation = r.round() as i64;
            }
        }
    }
    let duration = v["format"]["duration"]
        .as_str()
        .and_then(|d| d.parse::<f64>().ok())
        .filter(|d| d.is_finite() && *d >= 0.0);
    let quarter = rotation.rem_euclid(180) == 90;
    let g = if quarter {
        Geometry {
            width: h,
            height: w,
        }
    } else {
        Geometry {
            width: w,
            height: h,
        }
    };
    Ok((g, duration))
}

/// The decoding command: first video stream, rotation applied, exactly 25 fps with the
/// reference's frame selection ([`framesel`]: no `-vf` here), RGB24 raw frames on stdout.
///
/// The stream is the validated one (`0:V:0` by default: never an attached picture),
/// frames are pinned to `geometry` (`-s`, an output size, not a filter, so the frame
/// selection is unchanged), at most `max_frames + 1` are decoded (one more than allowed,
/// so the reader can tell "exactly at the cap" from "over it"), with the whitelists and
/// the CPU-time limit of [`MediaCommand`].
pub fn decode_media_command(
    input: &Path,
    opts: &DecodeOptions,
    geometry: Geometry,
    max_frames: u64,
    duration_s: Option<f64>,
) -> MediaCommand {
    MediaCommand::ffmpeg()
        .input(input)
        .args(["-map".to_owned(), opts.stream_spec("0:")])
        .args(["-an", "-sn", "-dn"])
        .args(framesel::OUTPUT_RATE_ARGS)
        .args([
            "-s".to_owned(),
            format!("{}x{}", geometry.width, geometry.height),
            "-frames:v".to_owned(),
            max_frames.saturating_add(1).to_string(),
        ])
        .args(["-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"])
        .cpu_limit_for(duration_s)
}

/// [`decode_media_command`] with the defaults, as a plain process (content check of the
/// input skipped: use [`FrameReader`] to decode untrusted files).
pub fn decode_command(input: &Path) -> Command {
    let geometry = probe_geometry(input).unwrap_or(Geometry {
        width: 0,
        height: 0,
    });
    let mut cmd = decode_media_command(
        input,
        &DecodeOptions::default(),
        geometry,
        tool::settings().max_frames,
        None,
    );
    if geometry.width == 0 {
        cmd = MediaCommand::ffmpeg()
            .input(input)
            .args(["-map", "0:V:0", "-an", "-sn", "-dn"])
            .args(framesel::OUTPUT_RATE_ARGS)
            .args(["-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"]);
    }
    cmd.command().unwrap_or_else(|_| Command::new("false"))
}

/// Streams decoded RGB24 frames one at a time; memory stays at one frame.
pub struct FrameReader {
    child: tool::MediaChild,
    stdout: ChildStdout,
    /// Frame geometry.
    pub geometry: Geometry,
    frame_bytes: usize,
    /// Frames returned so far.
    pub index: u64,
    max_frames: u64,
    done: bool,
}

impl FrameReader {
    /// Start decoding `input` with the default options (first real video stream, probed
    /// size, the process-wide frame cap).
    pub fn open(input: &Path) -> Result<Self, MediaError> {
        Self::open_with(input, &DecodeOptions::default())
    }

    /// Start decoding the stream of `input` that `opts` selects.
    ///
    /// # Errors
    /// The input is refused (playlist, text), cannot be probed, or ffmpeg cannot start.
    pub fn open_with(input: &Path, opts: &DecodeOptions) -> Result<Self, MediaError> {
        let (geometry, duration) = match (opts.geometry, opts.duration_s) {
            (Some(g), Some(d)) => (g, Some(d)),
            _ => {
                let (g, d) = probe_stream(input, opts)?;
                (opts.geometry.unwrap_or(g), opts.duration_s.or(d))
            }
        };
        if geometry.width == 0 || geometry.height == 0 {
            return Err(MediaError::Decode("video stream has no size".into()));
        }
        let max_frames = opts.max_frames.unwrap_or(tool::settings().max_frames);
        let mut child =
            decode_media_command(input, opts, geometry, max_frames, duration).spawn()?;
        let stdout = child.child.stdout.take().expect("piped stdout");
        Ok(Self {
            child,
            stdout,
            geometry,
            frame_bytes: geometry.width as usize * geometry.height as usize * 3,
            index: 0,
            max_frames,
            done: false,
        })
    }

    /// Bytes of one frame.
    pub fn frame_bytes(&self) -> usize {
        self.frame_bytes
    }

    /// Read the next frame into `buf` (resized to one frame). `Ok(false)` at the end.
    pub fn read_into(&mut self, buf: &mut Vec<u8>) -> Result<bool, MediaError> {
        if self.done {
            return Ok(false);
        }
        if self.index >= self.max_frames {
            // ffmpeg decodes one frame past the cap: if it comes, the input is too long.
            let mut probe = vec![0u8; self.frame_bytes.min(1 << 16)];
            let more = loop {
                match self.stdout.read(&mut probe) {
                    Ok(n) => break n > 0,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(MediaError::Decode(e.to_string())),
                }
            };
            self.done = true;
            if more {
                let _ = self.child.child.kill();
                return Err(MediaError::TooLong(format!(
                    "the video decodes to more than {} frames at 25 fps",
                    self.max_frames
                )));
            }
            let _ = self.child.child.wait();
            return Ok(false);
        }
        buf.resize(self.frame_bytes, 0);
        let mut filled = 0;
        while filled < self.frame_bytes {
            match self.stdout.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MediaError::Decode(e.to_string())),
            }
        }
        if filled == 0 {
            self.done = true;
            let status = self
                .child
                .child
                .wait()
                .map_err(|e| MediaError::Decode(e.to_string()))?;
            self.child.check_cpu(status)?;
            if !status.success() && self.index == 0 {
                let stderr = self.child.take_stderr();
                return Err(MediaError::Decode(self.child.reason(&stderr)));
            }
            return Ok(false);
        }
        if filled < self.frame_bytes {
            self.done = true;
            let status = self.child.child.wait();
            if let Ok(status) = status {
                self.child.check_cpu(status)?;
            }
            return Err(MediaError::Decode(format!(
                "truncated frame {} ({filled} of {} bytes)",
                self.index, self.frame_bytes
            )));
        }
        self.index += 1;
        Ok(true)
    }
}

pub use lipsync_schemas::LengthMode;

/// Number of output frames for `n_video` video frames and `n_audio` audio chunks.
pub fn output_len(n_video: usize, n_audio: usize, mode: LengthMode) -> usize {
    if n_video == 0 {
        return 0;
    }
    match mode {
        LengthMode::Cut => n_video.min(n_audio),
        LengthMode::Pingpong | LengthMode::Loop => n_audio,
    }
}

/// Video frame shown at output frame `k`.
pub fn source_frame(k: usize, n_video: usize, mode: LengthMode) -> usize {
    let lap = k / n_video;
    let pos = k % n_video;
    match mode {
        LengthMode::Pingpong if lap % 2 == 1 => n_video - 1 - pos,
        _ => pos,
    }
}

/// The whole output-to-video frame map.
pub fn frame_map(n_video: usize, n_audio: usize, mode: LengthMode) -> Vec<usize> {
    (0..output_len(n_video, n_audio, mode))
        .map(|k| source_frame(k, n_video, mode))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingpong_loop_and_cut() {
        assert_eq!(
            frame_map(3, 8, LengthMode::Pingpong),
            [0, 1, 2, 2, 1, 0, 0, 1]
        );
        assert_eq!(frame_map(3, 7, LengthMode::Loop), [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(frame_map(5, 3, LengthMode::Pingpong), [0, 1, 2]);
        assert_eq!(frame_map(5, 3, LengthMode::Cut), [0, 1, 2]);
        assert_eq!(frame_map(3, 8, LengthMode::Cut), [0, 1, 2]);
        assert!(frame_map(0, 8, LengthMode::Pingpong).is_empty());
        assert_eq!(frame_map(1, 3, LengthMode::Pingpong), [0, 0, 0]);
    }
}
