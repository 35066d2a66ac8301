//! The generated-crops artifact: raw RGB24 `R x R` frames piped into ffmpeg at a constant
//! 25 fps and stored as Matroska, one frame per output frame (the contract with mux).

use std::io::Write;
use std::path::Path;
use std::process::{ChildStdin, Stdio};

use lipsync_runtime::media::MediaCommand;
use lipsync_runtime::media::tool::MediaChild;

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
    child: MediaChild,
    stdin: Option<ChildStdin>,
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
        let mut child = MediaCommand::ffmpeg()
            .arg("-y")
            .pipe_input([
                "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &size, "-r", "25",
            ])
            .arg("-an")
            .args(codec.args())
            .args(["-fps_mode", "passthrough", "-f", "matroska"])
            .output(out)
            .spawn_with(|c| {
                c.stdin(Stdio::piped()).stdout(Stdio::null());
            })
            .map_err(|e| InferError::Encode(format!("cannot run ffmpeg: {e}")))?;
        let stdin = child.child.stdin.take();
        Ok(Self {
            child,
            stdin,
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
        let _ = self.child.child.wait();
        let err = self.child.take_stderr();
        let reason = self.child.reason(&err);
        if reason.is_empty() {
            "ffmpeg failed".into()
        } else {
            reason
        }
    }

    /// Closes the input and waits for ffmpeg; returns the frames written.
    ///
    /// # Errors
    /// ffmpeg exited with an error.
    pub fn finish(mut self) -> Result<u64> {
        drop(self.stdin.take());
        let status = self
            .child
            .child
            .wait()
            .map_err(|e| InferError::Encode(e.to_string()))?;
        let err = self.child.take_stderr();
        if !status.success() {
            return Err(InferError::Encode(format!(
                "ffmpeg exited with {status}: {}",
                self.child.reason(&err)
            )));
        }
        Ok(self.frames)
    }
}

impl Drop for CropsWriter {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            // Unfinished: stop the encoder (the child's own drop reaps it).
            drop(self.stdin.take());
            let _ = self.child.child.kill();
        }
    }
}
