//! The one frame-decoding recipe every stage uses (design §4: frames must be identical in
//! every stage that decodes them), and the map from output frames to video frames.

use std::io::Read;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use serde::{Deserialize, Serialize};

pub mod framesel;

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
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-show_entries",
            "stream=width,height:stream_side_data=rotation:stream_tags=rotate",
            "-of",
            "json",
        ])
        .arg(input)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| MediaError::Spawn("ffprobe", e))?;
    if !out.status.success() {
        return Err(MediaError::Decode(first_line(&out.stderr)));
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
    let quarter = rotation.rem_euclid(180) == 90;
    Ok(if quarter {
        Geometry {
            width: h,
            height: w,
        }
    } else {
        Geometry {
            width: w,
            height: h,
        }
    })
}

fn first_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("unknown error")
        .chars()
        .take(300)
        .collect()
}

/// The decoding command: first video stream, rotation applied, exactly 25 fps with the
/// reference's frame selection ([`framesel`]: no `-vf` here), RGB24 raw frames on stdout.
pub fn decode_command(input: &Path) -> Command {
    let mut c = Command::new("ffmpeg");
    c.args(["-nostdin", "-v", "error", "-i"])
        .arg(input)
        .args(["-map", "0:v:0", "-an", "-sn", "-dn"])
        .args(framesel::OUTPUT_RATE_ARGS)
        .args(["-pix_fmt", "rgb24", "-f", "rawvideo", "pipe:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Streams decoded RGB24 frames one at a time; memory stays at one frame.
pub struct FrameReader {
    child: Child,
    stdout: ChildStdout,
    /// Frame geometry.
    pub geometry: Geometry,
    frame_bytes: usize,
    /// Frames returned so far.
    pub index: u64,
    done: bool,
}

impl FrameReader {
    /// Start decoding `input`.
    pub fn open(input: &Path) -> Result<Self, MediaError> {
        let geometry = probe_geometry(input)?;
        let mut child = decode_command(input)
            .spawn()
            .map_err(|e| MediaError::Spawn("ffmpeg", e))?;
        let stdout = child.stdout.take().expect("piped stdout");
        // Drain stderr so ffmpeg never blocks on it; keep the tail for errors.
        if let Some(mut err) = child.stderr.take() {
            std::thread::spawn(move || {
                let mut sink = Vec::new();
                let _ = err.read_to_end(&mut sink);
            });
        }
        Ok(Self {
            child,
            stdout,
            geometry,
            frame_bytes: geometry.width as usize * geometry.height as usize * 3,
            index: 0,
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
                .wait()
                .map_err(|e| MediaError::Decode(e.to_string()))?;
            if !status.success() && self.index == 0 {
                return Err(MediaError::Decode(format!("ffmpeg exited with {status}")));
            }
            return Ok(false);
        }
        if filled < self.frame_bytes {
            self.done = true;
            let _ = self.child.wait();
            return Err(MediaError::Decode(format!(
                "truncated frame {} ({filled} of {} bytes)",
                self.index, self.frame_bytes
            )));
        }
        self.index += 1;
        Ok(true)
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// How the video is fitted to the audio length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LengthMode {
    /// Forward, backward, forward, ... (the reference's behaviour).
    #[default]
    Pingpong,
    /// Forward, forward, ...
    Loop,
    /// Never repeat: the output is cut to the shorter of video and audio.
    Cut,
}

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
