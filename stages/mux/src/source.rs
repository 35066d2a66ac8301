//! The input frames of the mux stage, streamed:
//!
//! - [`VideoFrames`]: original video frames by index, decoded with the shared 25 fps
//!   recipe ([`FrameReader`]). Output frames walk the video forward, so a forward read is
//!   the decoder's next frame. Ping-pong revisits frames backwards: the frames a reverse
//!   lap will need are spooled, raw, to a scratch file while they are decoded the first
//!   time and read back by index (W*H*3 bytes each), so memory stays at one frame. Only
//!   the revisited tail is spooled (`max(0, 2n - output)..n`); when the output is at
//!   least twice the video, the whole video is, and later forward laps read the spool
//!   too. `loop` re-decodes from the start for each lap (no disk). The spool costs
//!   disk, not memory: 6.2 MB per 1080p frame.
//! - [`CropFrames`]: the generated crops, decoded in order with timestamps passed through
//!   (one decoded frame per stored frame), with the count checked.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use lipsync_runtime::media::{FrameReader, Geometry, LengthMode};

use crate::error::{MuxError, Result};

struct Spool {
    file: File,
    /// First video frame kept.
    from: usize,
    /// Frames `from..from+kept` are in the file.
    kept: usize,
}

/// Original video frames by index.
pub struct VideoFrames {
    path: PathBuf,
    frames: usize,
    geometry: Geometry,
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
    /// frames in `mode`; the spool, if any, goes to `scratch`.
    ///
    /// # Errors
    /// The spool cannot be created, or the decoder cannot start.
    pub fn open(
        video: &Path,
        frames: usize,
        geometry: Geometry,
        output: usize,
        mode: LengthMode,
        scratch: &Path,
    ) -> Result<Self> {
        let spool = match spool_from(frames, output, mode) {
            Some(from) => Some(Spool {
                file: tempfile::tempfile_in(scratch)
                    .map_err(MuxError::io("cannot create the frame spool"))?,
                from,
                kept: 0,
            }),
            None => None,
        };
        Ok(Self {
            path: video.to_path_buf(),
            frames,
            geometry,
            reader: None,
            next: 0,
            spool,
            decodes: 0,
        })
    }

    fn frame_bytes(&self) -> usize {
        self.geometry.width as usize * self.geometry.height as usize * 3
    }

    /// Reads video frame `index` into `buf`.
    ///
    /// # Errors
    /// Decoding fails, the video ends early, or the spool cannot be read or written.
    pub fn read(&mut self, index: usize, buf: &mut Vec<u8>) -> Result<()> {
        let fb = self.frame_bytes();
        if let Some(s) = &self.spool
            && index >= s.from
            && index < s.from + s.kept
        {
            buf.resize(fb, 0);
            s.file
                .read_exact_at(buf, ((index - s.from) * fb) as u64)
                .map_err(MuxError::io("cannot read the frame spool"))?;
            return Ok(());
        }
        if self.reader.is_none() || index < self.next {
            self.reader = Some(FrameReader::open(&self.path)?);
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
                s.file
                    .write_all_at(buf, (s.kept * fb) as u64)
                    .map_err(MuxError::io("cannot write the frame spool"))?;
                s.kept += 1;
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
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
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
        let mut child = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(crops)
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
