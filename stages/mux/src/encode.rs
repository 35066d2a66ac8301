//! Streaming H.264 encoders: one ffmpeg process per output, fed raw frames on stdin by a
//! writer thread (so neither side blocks the other) while another thread drains stderr.
//! Frame buffers travel to the writer and come back for reuse, so memory stays at a few
//! frames.
//!
//! Even sizes: yuv420p needs even width and height. An odd width or height is cropped by
//! one pixel (the last column or row is dropped) rather than padded, so no artificial
//! border appears; even sizes are kept exactly.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::error::{MuxError, Result};
use crate::source::{drain_stderr, first_error_line};

/// Pixel layout of the frames sent to an encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// 3 bytes per pixel.
    Rgb24,
    /// 1 byte per pixel.
    Gray,
}

impl PixelFormat {
    fn bytes(self) -> usize {
        match self {
            PixelFormat::Rgb24 => 3,
            PixelFormat::Gray => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            PixelFormat::Rgb24 => "rgb24",
            PixelFormat::Gray => "gray",
        }
    }
}

/// Returns the encoded size for a frame size: each odd dimension loses one pixel.
pub fn even_size(width: u32, height: u32) -> (u32, u32) {
    ((width & !1).max(2), (height & !1).max(2))
}

/// What an encoder writes.
#[derive(Debug, Clone)]
pub struct EncodeSpec<'a> {
    /// Width of the frames sent.
    pub width: u32,
    /// Height of the frames sent.
    pub height: u32,
    /// Layout of the frames sent.
    pub format: PixelFormat,
    /// x264 CRF.
    pub crf: u8,
    /// x264 preset.
    pub preset: &'a str,
    /// x264 threads, 0 = x264's choice.
    pub threads: u32,
    /// Audio to mux (first audio stream), trimmed to the video.
    pub audio: Option<&'a Path>,
    /// AAC bit rate (`-b:a`), none = ffmpeg's default.
    pub audio_bitrate: Option<&'a str>,
    /// Colour matrix tags: `true` for BT.709 (HD sources), `false` for BT.601.
    pub bt709: bool,
    /// Number of frames (sets the duration: frames / 25 s).
    pub frames: usize,
    /// Output file (MP4).
    pub output: &'a Path,
}

/// CPU time an encoder may use, as a multiple of the decoders' per-media-second limit
/// (x264 at the slower presets and high resolutions needs far more than a decoder).
const ENCODE_TIME_FACTOR: f64 = 10.0;

/// Builds the ffmpeg command for `spec` (the runtime's wrapper: whitelists, content
/// check of the audio input, CPU-time limit scaled to the output length).
///
/// # Errors
/// The audio input is refused (not media).
pub fn command(spec: &EncodeSpec<'_>) -> Result<Command> {
    let (ew, eh) = even_size(spec.width, spec.height);
    let fps = lipsync_runtime::media::FPS;
    let secs = spec.frames as f64 / f64::from(fps);
    let mut m = lipsync_runtime::media::MediaCommand::ffmpeg()
        .arg("-y")
        .pipe_input([
            "-f".to_owned(),
            "rawvideo".to_owned(),
            "-pix_fmt".to_owned(),
            spec.format.name().to_owned(),
            "-s".to_owned(),
            format!("{ew}x{eh}"),
            "-r".to_owned(),
            fps.to_string(),
        ])
        .cpu_limit_for(Some(secs * ENCODE_TIME_FACTOR));
    if let Some(a) = spec.audio {
        m = m.input(a);
    }
    m = m.arg("-map").arg("0:v:0");
    let mut c = m.command()?;
    if spec.audio.is_some() {
        c.args(["-map", "1:a:0", "-c:a", "aac"]);
        if let Some(b) = spec.audio_bitrate {
            c.args(["-b:a", b]);
        }
    }
    let (matrix, tag) = if spec.bt709 {
        ("bt709", "bt709")
    } else {
        ("bt601", "smpte170m")
    };
    c.args([
        "-vf",
        &format!("scale=out_color_matrix={matrix}:out_range=tv,format=yuv420p"),
        "-c:v",
        "libx264",
        "-preset",
        spec.preset,
        "-crf",
        &spec.crf.to_string(),
        "-threads",
        &spec.threads.to_string(),
        "-pix_fmt",
        "yuv420p",
        "-colorspace",
        tag,
        "-color_primaries",
        if spec.bt709 { "bt709" } else { "smpte170m" },
        "-color_trc",
        if spec.bt709 { "bt709" } else { "smpte170m" },
        "-color_range",
        "tv",
        "-t",
        &format!("{:.6}", spec.frames as f64 / f64::from(fps)),
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
    ])
    .arg(spec.output)
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    Ok(c)
}

/// Writes a `w x h` frame as `ew x eh`: extra columns and rows are dropped; a missing
/// one (a 1-pixel dimension) repeats the last.
fn write_even(
    out: &mut impl Write,
    frame: &[u8],
    (w, h): (usize, usize),
    (ew, eh): (usize, usize),
    bpp: usize,
) -> std::io::Result<()> {
    for r in 0..eh {
        let row = &frame[r.min(h - 1) * w * bpp..(r.min(h - 1) + 1) * w * bpp];
        if ew <= w {
            out.write_all(&row[..ew * bpp])?;
        } else {
            out.write_all(row)?;
            for _ in w..ew {
                out.write_all(&row[(w - 1) * bpp..])?;
            }
        }
    }
    Ok(())
}

/// A running encoder.
pub struct Encoder {
    child: Child,
    frames_tx: Option<SyncSender<Vec<u8>>>,
    free_rx: Receiver<Vec<u8>>,
    writer: Option<JoinHandle<std::io::Result<()>>>,
    stderr: Option<JoinHandle<String>>,
    frame_bytes: usize,
}

impl Encoder {
    /// Starts the encoder of `spec`.
    ///
    /// # Errors
    /// ffmpeg cannot start.
    pub fn start(spec: &EncodeSpec<'_>) -> Result<Self> {
        let mut child = command(spec)?
            .spawn()
            .map_err(MuxError::io("cannot start ffmpeg"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stderr = drain_stderr(&mut child);
        let (frames_tx, frames_rx) = sync_channel::<Vec<u8>>(2);
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(4);
        let bpp = spec.format.bytes();
        let (w, h) = (spec.width as usize, spec.height as usize);
        let (ew, eh) = even_size(spec.width, spec.height);
        let (ew, eh) = (ew as usize, eh as usize);
        let writer = std::thread::Builder::new()
            .name("mux-encode-writer".into())
            .spawn(move || -> std::io::Result<()> {
                let mut out = BufWriter::with_capacity(1 << 20, stdin);
                for frame in frames_rx {
                    if ew == w && eh == h {
                        out.write_all(&frame)?;
                    } else {
                        write_even(&mut out, &frame, (w, h), (ew, eh), bpp)?;
                    }
                    let _ = free_tx.try_send(frame);
                }
                out.flush()
                // Dropping `out` closes stdin: ffmpeg sees the end.
            })
            .map_err(MuxError::io("cannot start the encoder writer"))?;
        Ok(Self {
            child,
            frames_tx: Some(frames_tx),
            free_rx,
            writer: Some(writer),
            stderr: Some(stderr),
            frame_bytes: w * h * bpp,
        })
    }

    /// Returns a frame buffer (recycled when one is free), sized for one frame.
    pub fn buffer(&self) -> Vec<u8> {
        let mut b = self.free_rx.try_recv().unwrap_or_default();
        b.resize(self.frame_bytes, 0);
        b
    }

    /// Queues one frame.
    ///
    /// # Errors
    /// The encoder stopped (its error is reported by [`Encoder::finish`]).
    pub fn send(&mut self, frame: Vec<u8>) -> Result<()> {
        debug_assert_eq!(frame.len(), self.frame_bytes);
        let sent = self
            .frames_tx
            .as_ref()
            .map(|tx| tx.send(frame).is_ok())
            .unwrap_or(false);
        if sent {
            return Ok(());
        }
        // The writer ended early: ffmpeg stopped reading. Collect its reason.
        self.frames_tx = None;
        Err(self
            .collect()
            .err()
            .unwrap_or_else(|| MuxError::Encode("the encoder stopped early".into())))
    }

    /// Closes the input and waits for ffmpeg to write the file.
    ///
    /// # Errors
    /// ffmpeg failed.
    pub fn finish(mut self) -> Result<()> {
        self.frames_tx = None;
        self.collect()
    }

    fn collect(&mut self) -> Result<()> {
        let written = self
            .writer
            .take()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")))
            })
            .unwrap_or(Ok(()));
        let status = self
            .child
            .wait()
            .map_err(MuxError::io("cannot wait for ffmpeg"))?;
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        if !status.success() {
            return Err(MuxError::Encode(first_error_line(&stderr)));
        }
        written.map_err(MuxError::io("cannot feed the encoder"))
    }
}

impl Drop for Encoder {
    fn drop(&mut self) {
        // Unfinished (error or abort): stop ffmpeg rather than letting it finish a file.
        if self.writer.is_some() {
            let _ = self.child.kill();
            self.frames_tx = None;
            if let Some(w) = self.writer.take() {
                let _ = w.join();
            }
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_sizes_lose_one_pixel() {
        assert_eq!(even_size(320, 240), (320, 240));
        assert_eq!(even_size(321, 241), (320, 240));
        assert_eq!(even_size(1, 1), (2, 2));
    }

    #[test]
    fn frames_are_cropped_or_padded_to_even_sizes() {
        let frame: Vec<u8> = (0..3 * 3).collect(); // 3x3 gray
        let mut out = Vec::new();
        write_even(&mut out, &frame, (3, 3), (2, 2), 1).unwrap();
        assert_eq!(out, [0, 1, 3, 4]);
        let mut out = Vec::new();
        write_even(&mut out, &[7], (1, 1), (2, 2), 1).unwrap();
        assert_eq!(out, [7, 7, 7, 7]);
    }

    #[test]
    fn command_maps_audio_and_trims() {
        let out = Path::new("/x/out.mp4");
        // The wrapper checks the audio input's content before building the command.
        let dir = tempfile::tempdir().unwrap();
        let wav = dir.path().join("a.wav");
        std::fs::write(&wav, b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00").unwrap();
        let spec = EncodeSpec {
            width: 321,
            height: 240,
            format: PixelFormat::Rgb24,
            crf: 18,
            preset: "medium",
            threads: 0,
            audio: Some(&wav),
            audio_bitrate: None,
            bt709: false,
            frames: 51,
            output: out,
        };
        let c = command(&spec).unwrap();
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-s 320x240"), "{joined}");
        assert!(joined.contains("-map 1:a:0 -c:a aac"), "{joined}");
        assert!(joined.contains("-t 2.040000"), "{joined}");
        assert!(joined.contains("-crf 18"), "{joined}");
        assert!(joined.contains("+faststart"), "{joined}");
    }
}
