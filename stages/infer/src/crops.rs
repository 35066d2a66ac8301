//! The generated-crops artifact: raw RGB24 `R x R` frames piped into ffmpeg at a constant
//! 25 fps and stored as Matroska, one frame per output frame (the contract with mux).

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::error::{InferError, Result};

/// Codec of the crops artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CropsCodec {
    /// libx264 `-preset veryfast -crf <crf> -pix_fmt yuv444p` (near-lossless).
    X264 {
        /// Constant rate factor.
        crf: u32,
    },
    /// FFV1 (lossless RGB).
    Ffv1,
}

impl CropsCodec {
    /// Parses `x264` / `ffv1` with the x264 `crf`.
    pub fn parse(name: &str, crf: u32) -> std::result::Result<Self, String> {
        match name {
            "x264" => Ok(CropsCodec::X264 { crf }),
            "ffv1" => Ok(CropsCodec::Ffv1),
            other => Err(format!(
                "infer.crops_codec must be x264 or ffv1, not `{other}`"
            )),
        }
    }

    fn args(self) -> Vec<String> {
        match self {
            CropsCodec::X264 { crf } => [
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-crf",
                &crf.to_string(),
                "-pix_fmt",
                "yuv444p",
            ]
            .map(str::to_owned)
            .to_vec(),
            CropsCodec::Ffv1 => ["-c:v", "ffv1", "-level", "3", "-pix_fmt", "bgr0"]
                .map(str::to_owned)
                .to_vec(),
        }
    }
}

/// An ffmpeg child encoding raw frames into a Matroska file.
pub struct CropsWriter {
    child: Child,
    stdin: Option<ChildStdin>,
    stderr: Option<std::thread::JoinHandle<String>>,
    frame_bytes: usize,
    /// Frames written so far.
    pub frames: u64,
}

impl CropsWriter {
    /// Starts encoding `r x r` frames into `out`.
    ///
    /// # Errors
    /// ffmpeg cannot be started.
    pub fn create(out: &Path, r: usize, codec: CropsCodec) -> Result<Self> {
        let size = format!("{r}x{r}");
        let mut child = Command::new("ffmpeg")
            .args([
                "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
            ])
            .args(["-s", &size, "-r", "25", "-i", "pipe:0", "-an"])
            .args(codec.args())
            .args(["-fps_mode", "passthrough", "-f", "matroska"])
            .arg(out)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| InferError::Encode(format!("cannot run ffmpeg: {e}")))?;
        let stdin = child.stdin.take();
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = e.read_to_string(&mut s);
                s
            })
        });
        Ok(Self {
            child,
            stdin,
            stderr,
            frame_bytes: r * r * 3,
            frames: 0,
        })
    }

    /// Appends one RGB24 frame.
    ///
    /// # Errors
    /// ffmpeg stopped reading (its message is returned by [`CropsWriter::finish`]).
    pub fn write(&mut self, rgb: &[u8]) -> Result<()> {
        debug_assert_eq!(rgb.len(), self.frame_bytes);
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| InferError::Encode("encoder already closed".into()))?;
        if let Err(e) = stdin.write_all(rgb) {
            let msg = self.fail_message();
            return Err(InferError::Encode(format!("{e}: {msg}")));
        }
        self.frames += 1;
        Ok(())
    }

    fn fail_message(&mut self) -> String {
        drop(self.stdin.take());
        let _ = self.child.wait();
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .and_then(|s| s.lines().find(|l| !l.trim().is_empty()).map(str::to_owned))
            .unwrap_or_else(|| "ffmpeg failed".into())
    }

    /// Closes the input and waits for ffmpeg; returns the frames written.
    ///
    /// # Errors
    /// ffmpeg exited with an error.
    pub fn finish(mut self) -> Result<u64> {
        drop(self.stdin.take());
        let status = self
            .child
            .wait()
            .map_err(|e| InferError::Encode(e.to_string()))?;
        let err = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        if !status.success() {
            let line = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            return Err(InferError::Encode(format!(
                "ffmpeg exited with {status}: {line}"
            )));
        }
        Ok(self.frames)
    }
}

impl Drop for CropsWriter {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            drop(self.stdin.take());
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
