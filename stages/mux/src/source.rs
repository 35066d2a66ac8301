//! The input frames of the mux stage, streamed:
//!
//! - [`VideoFrames`]: original video frames by index, decoded with the shared 25 fps
//!   recipe ([`FrameReader`]). Output frames walk the video forward, so a forward read is
//!   the decoder's next frame. Ping-pong revisits frames backwards: the frames a reverse
//!   lap will need are spooled while they are decoded the first time, **losslessly
//!   compressed** (x264 RGB at qp 0, bit-exact) in segments of `K` frames, one file per
//!   segment. A backward read decodes the segment holding the frame into a raw window
//!   file of `K` frames and reads frames from it by index, so memory stays at one frame
//!   and the raw scratch at one window: `K = mux.spool_window_bytes / (W*H*3)` (1..=250).
//!   Only the revisited tail is spooled (`max(0, 2n - output)..n`); when the output is at
//!   least twice the video, the whole video is, and later forward laps read the spool
//!   too. `loop` re-decodes from the start for each lap (no disk). Scratch is bounded by
//!   `mux.max_scratch_bytes` (spool + window): a render that would need more fails with
//!   `input_too_long` instead of filling the disk. A raw spool would take 6.2 MB per
//!   1080p frame (19 GB for 2 minutes revisited); the compressed one takes what the
//!   content needs (see bench/mux_pingpong.sh for a measured figure).
//! - [`CropFrames`]: the generated crops, decoded in order with timestamps passed through
//!   (one decoded frame per stored frame), with the count checked.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};

use lipsync_runtime::media::tool::MediaChild;
use lipsync_runtime::media::{DecodeOptions, FrameReader, Geometry, LengthMode, MediaCommand};

use crate::error::{MuxError, Result};

/// Limits of the ping-pong spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Raw bytes of the window a backward read decodes a segment into.
    pub window_bytes: u64,
    /// Most scratch bytes (compressed segments + window).
    pub max_scratch_bytes: u64,
}

impl Default for SpoolLimits {
    fn default() -> Self {
        Self {
            window_bytes: 256 << 20,
            max_scratch_bytes: 8 << 30,
        }
    }
}

/// Frames per spool segment for frames of `frame_bytes` within `window_bytes`.
pub fn segment_frames(frame_bytes: usize, window_bytes: u64) -> usize {
    ((window_bytes / frame_bytes.max(1) as u64) as usize).clamp(1, 250)
}

/// The segment being written.
struct SegmentWriter {
    child: MediaChild,
    stdin: ChildStdin,
    frames: usize,
}

/// The raw frames of one segment.
struct Window {
    segment: usize,
    file: File,
    frames: usize,
}

/// Frames `from..from+kept` of the video, losslessly compressed in segment files.
struct Spool {
    dir: tempfile::TempDir,
    geometry: Geometry,
    /// First video frame kept.
    from: usize,
    /// Frames `from..from+kept` have been handed to the spool.
    kept: usize,
    /// Frames per segment.
    seg_frames: usize,
    writer: Option<SegmentWriter>,
    /// Segments finished (all but possibly the last hold `seg_frames` frames).
    finished: usize,
    /// Bytes of the finished segments.
    bytes: u64,
    window: Option<Window>,
    limits: SpoolLimits,
    /// Largest scratch use seen (segments + window), for tests and benchmarks.
    peak: u64,
}

impl Spool {
    fn frame_bytes(&self) -> usize {
        self.geometry.width as usize * self.geometry.height as usize * 3
    }

    fn segment_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("seg{i:06}.mkv"))
    }

    fn window_bytes(&self) -> u64 {
        (self.seg_frames * self.frame_bytes()) as u64
    }

    fn note_use(&mut self) -> Result<()> {
        let used = self.bytes
            + if self.window.is_some() {
                self.window_bytes()
            } else {
                0
            };
        self.peak = self.peak.max(used);
        if used > self.limits.max_scratch_bytes {
            return Err(MuxError::TooLong(format!(
                "the ping-pong spool needs more than mux.max_scratch_bytes ({} bytes) of scratch",
                self.limits.max_scratch_bytes
            )));
        }
        Ok(())
    }

    /// Appends the next frame (`from + kept`).
    fn push(&mut self, frame: &[u8]) -> Result<()> {
        if self.window.is_some() {
            return Err(MuxError::Inconsistent(
                "a frame was spooled after the spool was read".into(),
            ));
        }
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.frames == self.seg_frames)
        {
            self.finish_segment()?;
        }
        if self.writer.is_none() {
            let path = self.segment_path(self.finished);
            let g = self.geometry;
            let mut child = MediaCommand::ffmpeg()
                .pipe_input([
                    "-f".to_owned(),
                    "rawvideo".to_owned(),
                    "-pix_fmt".to_owned(),
                    "rgb24".to_owned(),
                    "-s".to_owned(),
                    format!("{}x{}", g.width, g.height),
                    "-r".to_owned(),
                    "25".to_owned(),
                ])
                .args([
                    "-c:v".to_owned(),
                    "libx264rgb".to_owned(),
                    "-qp".to_owned(),
                    "0".to_owned(),
                    "-preset".to_owned(),
                    "ultrafast".to_owned(),
                    "-threads".to_owned(),
                    "2".to_owned(),
                    "-g".to_owned(),
                    self.seg_frames.to_string(),
                    "-f".to_owned(),
                    "matroska".to_owned(),
                    "-y".to_owned(),
                ])
                .output(&path)
                .cpu_limit_for(Some(self.seg_frames as f64 / 25.0))
                .spawn_with(|c| {
                    c.stdin(Stdio::piped()).stdout(Stdio::null());
                })?;
            let stdin = child.child.stdin.take().expect("piped stdin");
            self.writer = Some(SegmentWriter {
                child,
                stdin,
                frames: 0,
            });
        }
        let w = self.writer.as_mut().expect("writer just started");
        w.stdin
            .write_all(frame)
            .map_err(MuxError::io("cannot write the frame spool"))?;
        w.frames += 1;
        self.kept += 1;
        Ok(())
    }

    fn finish_segment(&mut self) -> Result<()> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        let SegmentWriter {
            mut child, stdin, ..
        } = w;
        drop(stdin);
        child
            .finish()
            .map_err(|e| MuxError::Encode(format!("frame spool: {e}")))?;
        let len = std::fs::metadata(self.segment_path(self.finished))
            .map_err(MuxError::io("cannot read the frame spool"))?
            .len();
        self.bytes += len;
        self.finished += 1;
        self.note_use()
    }

    /// Reads video frame `index` (which must be in the spool) into `buf`.
    fn read(&mut self, index: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.finish_segment()?;
        let fb = self.frame_bytes();
        let rel = index - self.from;
        let segment = rel / self.seg_frames;
        if self.window.as_ref().is_none_or(|w| w.segment != segment) {
            self.load(segment)?;
        }
        let w = self.window.as_ref().expect("window loaded");
        let at = rel - segment * self.seg_frames;
        if at >= w.frames {
            return Err(MuxError::Inconsistent(format!(
                "the frame spool lost frame {index}"
            )));
        }
        buf.resize(fb, 0);
        w.file
            .read_exact_at(buf, (at * fb) as u64)
            .map_err(MuxError::io("cannot read the frame spool"))?;
        Ok(())
    }

    /// Decodes segment `segment` into the window file.
    fn load(&mut self, segment: usize) -> Result<()> {
        let fb = self.frame_bytes();
        let file = match self.window.take() {
            Some(w) => w.file,
            None => tempfile::tempfile_in(self.dir.path())
                .map_err(MuxError::io("cannot create the spool window"))?,
        };
        let path = self.segment_path(segment);
        let mut child = MediaCommand::ffmpeg()
            .input(&path)
            .args([
                "-map",
                "0:V:0",
                "-fps_mode",
                "passthrough",
                "-pix_fmt",
                "rgb24",
                "-f",
                "rawvideo",
                "pipe:1",
            ])
            .cpu_limit_for(Some(self.seg_frames as f64 / 25.0))
            .spawn()?;
        let mut out = child.child.stdout.take().expect("piped stdout");
        let mut frame = vec![0u8; fb];
        let mut frames = 0;
        loop {
            let got = read_full(&mut out, &mut frame)
                .map_err(MuxError::io("cannot read the frame spool"))?;
            if got == 0 {
                break;
            }
            if got < fb || frames == self.seg_frames {
                return Err(MuxError::Inconsistent(
                    "the frame spool holds a partial or extra frame".into(),
                ));
            }
            file.write_all_at(&frame, (frames * fb) as u64)
                .map_err(MuxError::io("cannot write the spool window"))?;
            frames += 1;
        }
        drop(out);
        child
            .finish()
            .map_err(|e| MuxError::Encode(format!("frame spool: {e}")))?;
        self.window = Some(Window {
            segment,
            file,
            frames,
        });
        self.note_use()
    }
}

/// Original video frames by index.
pub struct VideoFrames {
    path: PathBuf,
    frames: usize,
    geometry: Geometry,
    decode: DecodeOptions,
    reader: Option<FrameReader>,
    /// Index of the frame the reader returns next.
    next: usize,
    spool: Option<Spool>,
    /// Decoder runs started (1 + re-decodes), for tests and logs.
    pub decodes: usize,
}

/// First video frame a ping-pong output revisits backwards, if any.
pub fn spool_from(frames: usize, output: usize, mode: LengthMode) -> Option<usize> {
    match mode {
        LengthMode::Pingpong if output > frames => Some(frames.saturating_sub(output - frames)),
        _ => None,
    }
}

impl VideoFrames {
    /// Opens `video` (decoding `frames` frames of `geometry`) for an output of `output`
    /// frames in `mode`; the spool, if any, goes to `scratch`, within `limits`.
    ///
    /// # Errors
    /// The spool cannot be created, or the decoder cannot start.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        video: &Path,
        frames: usize,
        geometry: Geometry,
        output: usize,
        mode: LengthMode,
        scratch: &Path,
        limits: SpoolLimits,
        decode: DecodeOptions,
    ) -> Result<Self> {
        let spool = match spool_from(frames, output, mode) {
            Some(from) => {
                let fb = geometry.width as usize * geometry.height as usize * 3;
                Some(Spool {
                    dir: tempfile::Builder::new()
                        .prefix(&lipsync_runtime::media::scratch::scratch_prefix("mux"))
                        .tempdir_in(scratch)
                        .map_err(MuxError::io("cannot create the frame spool"))?,
                    geometry,
                    from,
                    kept: 0,
                    seg_frames: segment_frames(fb, limits.window_bytes),
                    writer: None,
                    finished: 0,
                    bytes: 0,
                    window: None,
                    limits,
                    peak: 0,
                })
            }
            None => None,
        };
        Ok(Self {
            path: video.to_path_buf(),
            frames,
            geometry,
            decode: DecodeOptions {
                geometry: Some(geometry),
                max_frames: Some(frames as u64),
                ..decode
            },
            reader: None,
            next: 0,
            spool,
            decodes: 0,
        })
    }

    /// Largest scratch use of the spool so far (compressed segments + window), bytes.
    pub fn scratch_peak(&self) -> u64 {
        self.spool.as_ref().map_or(0, |s| s.peak)
    }

    /// Reads video frame `index` into `buf`.
    ///
    /// # Errors
    /// Decoding fails, the video ends early, or the spool cannot be read or written.
    pub fn read(&mut self, index: usize, buf: &mut Vec<u8>) -> Result<()> {
        if let Some(s) = &mut self.spool
            && index >= s.from
            && index < s.from + s.kept
        {
            return s.read(index, buf);
        }
        if self.reader.is_none() || index < self.next {
            self.reader = Some(FrameReader::open_with(&self.path, &self.decode)?);
            self.next = 0;
            self.decodes += 1;
        }
        let reader = self.reader.as_mut().expect("reader just opened");
        if reader.geometry != self.geometry {
            return Err(MuxError::Inconsistent(format!(
                "the video decodes at {}x{}, the face track says {}x{}",
                reader.geometry.width,
                reader.geometry.height,
                self.geometry.width,
                self.geometry.height
            )));
        }
        while self.next <= index {
            if !reader.read_into(buf)? {
                return Err(MuxError::Inconsistent(format!(
                    "the video decodes to {} frames, the face track has {}",
                    self.next, self.frames
                )));
            }
            if let Some(s) = &mut self.spool
                && self.next == s.from + s.kept
            {
                s.push(buf)?;
            }
            self.next += 1;
        }
        Ok(())
    }
}

/// The generated crops, in order.
pub struct CropFrames {
    child: Child,
    stdout: ChildStdout,
    frame_bytes: usize,
    expected: usize,
    read: usize,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// Returns the first non-empty line of ffmpeg's stderr, without paths.
pub(crate) fn first_error_line(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| match l.rfind(": ") {
            // "path/to/file: Invalid data found" -> keep the reason only.
            Some(i) if l[..i].contains('/') => l[i + 2..].to_owned(),
            _ => l.to_owned(),
        })
        .unwrap_or_else(|| "unknown error".into())
        .chars()
        .take(300)
        .collect()
}

pub(crate) fn drain_stderr(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take().expect("piped stderr");
    std::thread::spawn(move || {
        // Bounded: only the tail is kept however much ffmpeg writes.
        let mut s = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match err.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    s.extend_from_slice(&buf[..n]);
                    if s.len() > 16384 {
                        s.drain(..s.len() - 8192);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let s = String::from_utf8_lossy(&s);
        // Keep the tail: the last 4 KiB say why ffmpeg stopped.
        let start = s.len().saturating_sub(4096);
        let start = (start..s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        s[start..].to_owned()
    })
}

impl CropFrames {
    /// Starts decoding `crops`: `resolution`-square frames, exactly `expected` of them.
    ///
    /// # Errors
    /// ffmpeg cannot start.
    pub fn open(crops: &Path, resolution: usize, expected: usize) -> Result<Self> {
        let mut child = MediaCommand::ffmpeg()
            .input(crops)
            .cpu_limit_for(Some(expected as f64 / 25.0))
            .command()?
            .args([
                "-map",
                "0:v:0",
                "-an",
                "-sn",
                "-dn",
                "-fps_mode",
                "passthrough",
                "-pix_fmt",
                "rgb24",
                "-f",
                "rawvideo",
                "pipe:1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(MuxError::io("cannot start ffmpeg"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain_stderr(&mut child);
        Ok(Self {
            child,
            stdout,
            frame_bytes: resolution * resolution * 3,
            expected,
            read: 0,
            stderr: Some(stderr),
        })
    }

    /// Reads the next crop into `buf`.
    ///
    /// # Errors
    /// The crops end early or cannot be decoded.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(self.frame_bytes, 0);
        let got =
            read_full(&mut self.stdout, buf).map_err(MuxError::io("cannot read the crops"))?;
        if got < self.frame_bytes {
            let _ = self.child.wait();
            return Err(MuxError::Inconsistent(format!(
                "the generated crops hold {} frames, {} expected",
                self.read, self.expected
            )));
        }
        self.read += 1;
        Ok(())
    }

    /// Checks that no frame follows the expected ones and that ffmpeg succeeded.
    ///
    /// # Errors
    /// More frames than expected, or a decoding error.
    pub fn finish(mut self) -> Result<()> {
        let mut extra = vec![0u8; self.frame_bytes];
        let got = read_full(&mut self.stdout, &mut extra)
            .map_err(MuxError::io("cannot read the crops"))?;
        let status = self
            .child
            .wait()
            .map_err(MuxError::io("cannot wait for ffmpeg"))?;
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        if got > 0 {
            let more = got / self.frame_bytes.max(1);
            return Err(MuxError::Inconsistent(format!(
                "the generated crops hold more than the {} frames expected ({} more at least)",
                self.expected,
                more.max(1)
            )));
        }
        if !status.success() {
            return Err(MuxError::Decode {
                what: "the generated crops",
                detail: first_error_line(&stderr),
            });
        }
        Ok(())
    }
}

impl Drop for CropFrames {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_covers_only_the_revisited_tail() {
        assert_eq!(spool_from(10, 10, LengthMode::Pingpong), None);
        assert_eq!(spool_from(10, 13, LengthMode::Pingpong), Some(7));
        assert_eq!(spool_from(10, 20, LengthMode::Pingpong), Some(0));
        assert_eq!(spool_from(10, 35, LengthMode::Pingpong), Some(0));
        assert_eq!(spool_from(10, 35, LengthMode::Loop), None);
        assert_eq!(spool_from(10, 5, LengthMode::Cut), None);
        // Every frame a reverse lap shows is in the spool.
        for (n, out) in [(10, 13), (10, 20), (7, 30), (1, 4)] {
            let from = spool_from(n, out, LengthMode::Pingpong).unwrap();
            for k in n..out {
                let src = lipsync_runtime::media::source_frame(k, n, LengthMode::Pingpong);
                assert!(src >= from, "n {n} out {out} k {k}");
            }
        }
    }

    #[test]
    fn error_lines_drop_paths() {
        assert_eq!(
            first_error_line("\n/tmp/x/crops.mkv: Invalid data found when processing input\n"),
            "Invalid data found when processing input"
        );
        assert_eq!(first_error_line("Conversion failed!"), "Conversion failed!");
        assert_eq!(first_error_line(""), "unknown error");
    }
}
