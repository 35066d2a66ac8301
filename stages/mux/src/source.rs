//! The input frames of the mux stage, streamed:
//!
//! - [`VideoFrames`]: original video frames by index, decoded with the shared 25 fps
//!   recipe ([`FrameReader`]). Output frames walk the video forward, so a forward read is
//!   the decoder's next frame. Ping-pong also walks it backwards; a backward lap is served
//!   from an in-memory **window** of `K = mux.pingpong_window_bytes / (W*H*3)` frames
//!   (at least 1), re-decoded from the source: for the window `[a, b)` that ends at the
//!   requested frame, the very decode command of the forward pass (same stream, same
//!   frame selection) runs again, capped at `b` output frames (`-frames:v`, applied after
//!   the constant-frame-rate sync, so the selection is unchanged); frames before `a` are
//!   dropped as they arrive and `[a, b)` is kept, then shown last to first. Frames are
//!   therefore bit-identical to the forward pass, nothing goes to disk, and memory holds
//!   one window whatever the video length.
//!
//!   Cost: a backward lap over `n` frames runs `ceil(n / K)` decodes of `b` frames each,
//!   about `n^2 / (2K) + n` decoded frames (quadratic in the video length, linear in
//!   `1/K`); `loop` and later forward laps re-decode once from the start per lap.
//! - [`CropFrames`]: the generated crops, decoded in order with timestamps passed through
//!   (one decoded frame per stored frame), with the count checked.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Stdio};

use lipsync_runtime::media::{DecodeOptions, FrameReader, Geometry, MediaCommand};

use crate::error::{MuxError, Result};

/// Frames a ping-pong window of `window_bytes` holds for frames of `frame_bytes` (at
/// least one).
pub fn window_frames(frame_bytes: usize, window_bytes: u64) -> usize {
    usize::try_from(window_bytes / frame_bytes.max(1) as u64)
        .unwrap_or(usize::MAX)
        .max(1)
}

/// Frames `start..start + len` of the video, in memory, for backward reads.
struct Window {
    start: usize,
    len: usize,
    /// `len` frames, back to back.
    data: Vec<u8>,
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
    /// Frames a backward window holds.
    window_frames: usize,
    window: Option<Window>,
    /// The frame read last.
    last: Option<usize>,
    /// Decoder runs started (forward laps + backward windows), for tests and logs.
    pub decodes: usize,
}

impl VideoFrames {
    /// Opens `video` (decoding `frames` frames of `geometry`) with backward windows of at
    /// most `window_bytes` (at least one frame), decoding the stream `decode` selects.
    ///
    /// Nothing starts until the first read.
    pub fn open(
        video: &Path,
        frames: usize,
        geometry: Geometry,
        window_bytes: u64,
        decode: DecodeOptions,
    ) -> Self {
        let fb = geometry.width as usize * geometry.height as usize * 3;
        Self {
            path: video.to_path_buf(),
            frames,
            geometry,
            decode: DecodeOptions {
                geometry: Some(geometry),
                max_frames: Some(frames as u64),
                // The frames are 25 fps: no probe before each decode for its time limit.
                duration_s: decode
                    .duration_s
                    .or(Some(frames as f64 / f64::from(lipsync_runtime::media::FPS))),
                ..decode
            },
            reader: None,
            next: 0,
            window_frames: window_frames(fb, window_bytes),
            window: None,
            last: None,
            decodes: 0,
        }
    }

    /// Frames a backward window holds.
    pub fn window_frames(&self) -> usize {
        self.window_frames
    }

    /// Bytes of the largest window held so far (0 if no backward read happened).
    pub fn window_bytes(&self) -> u64 {
        self.window.as_ref().map_or(0, |w| w.data.capacity() as u64)
    }

    fn frame_bytes(&self) -> usize {
        self.geometry.width as usize * self.geometry.height as usize * 3
    }

    /// Starts a decoder from the first frame that stops after `frames` frames.
    fn start(&mut self, frames: usize) -> Result<FrameReader> {
        let reader = FrameReader::open_with(
            &self.path,
            &DecodeOptions {
                max_frames: Some(frames as u64),
                ..self.decode
            },
        )?;
        self.decodes += 1;
        if reader.geometry != self.geometry {
            return Err(MuxError::Inconsistent(format!(
                "the video decodes at {}x{}, the face track says {}x{}",
                reader.geometry.width,
                reader.geometry.height,
                self.geometry.width,
                self.geometry.height
            )));
        }
        Ok(reader)
    }

    fn ended_early(&self, at: usize) -> MuxError {
        MuxError::Inconsistent(format!(
            "the video decodes to {at} frames, the face track has {}",
            self.frames
        ))
    }

    /// Reads video frame `index` into `buf`.
    ///
    /// # Errors
    /// Decoding fails, or the video ends early.
    pub fn read(&mut self, index: usize, buf: &mut Vec<u8>) -> Result<()> {
        if index >= self.frames {
            return Err(MuxError::Inconsistent(format!(
                "video frame {index} asked of a {}-frame video",
                self.frames
            )));
        }
        let fb = self.frame_bytes();
        let backward = self.last.is_some_and(|l| index <= l);
        self.last = Some(index);
        if let Some(w) = &self.window
            && index >= w.start
            && index < w.start + w.len
        {
            let at = (index - w.start) * fb;
            buf.clear();
            buf.extend_from_slice(&w.data[at..at + fb]);
            return Ok(());
        }
        if backward {
            // At or before the frame read last, and not in the window: a backward lap.
            return self.load_window(index, buf);
        }
        if self.reader.is_none() || index < self.next {
            self.reader = None;
            self.reader = Some(self.start(self.frames)?);
            self.next = 0;
        }
        while self.next <= index {
            let reader = self.reader.as_mut().expect("reader open");
            if !reader.read_into(buf)? {
                return Err(self.ended_early(self.next));
            }
            self.next += 1;
        }
        Ok(())
    }

    /// Decodes the window that ends at `index` (a backward read), then reads `index`.
    fn load_window(&mut self, index: usize, buf: &mut Vec<u8>) -> Result<()> {
        // The forward decoder is past this lap; it is restarted when a forward lap needs it.
        self.reader = None;
        let fb = self.frame_bytes();
        let end = index + 1;
        let start = end.saturating_sub(self.window_frames);
        let mut w = self.window.take().unwrap_or_else(|| Window {
            start: 0,
            len: 0,
            data: Vec::new(),
        });
        w.data.resize((end - start) * fb, 0);
        let mut reader = self.start(end)?;
        let mut frame = std::mem::take(buf);
        for i in 0..end {
            if !reader.read_into(&mut frame)? {
                return Err(self.ended_early(i));
            }
            if i >= start {
                w.data[(i - start) * fb..(i - start + 1) * fb].copy_from_slice(&frame);
            }
        }
        drop(reader);
        w.start = start;
        w.len = end - start;
        *buf = frame;
        self.window = Some(w);
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
    fn windows_hold_at_least_one_frame() {
        assert_eq!(window_frames(100, 0), 1);
        assert_eq!(window_frames(100, 99), 1);
        assert_eq!(window_frames(100, 250), 2);
        assert_eq!(window_frames(1920 * 1080 * 3, 512 << 20), 86);
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
