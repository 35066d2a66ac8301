//! From audio file to stored features: the log-mel of a file, the windowed encoder run
//! and a feature-artifact writer that streams window blocks to disk, so the process
//! holds the mel (32 KB per second of audio) and one window of features, never the
//! whole (T, 5, 384) array (384 KB per second in f32).

use std::io::{BufWriter, Write};
use std::path::Path;

use lipsync_runtime::features::{AudioFeatures, Dtype};

use crate::error::{Error, Result};
use crate::mel::{LogMelSpectrogram, MelCollector, SAMPLE_RATE};
use crate::pcm;
use crate::windows::{self, DIM, LAYERS, POSITION_VALUES, WindowEncoder};

/// Shortest audio the stage accepts: one video frame at 25 fps (40 ms, 640 samples),
/// which gives T = 2 positions and 3 video frames.
pub const MIN_SAMPLES: u64 = (SAMPLE_RATE / 25) as u64;

/// Returns the log-mel of a 16 kHz mono 16-bit WAV file (one streaming pass).
///
/// # Errors
/// [`Error::UnsupportedMedia`] for anything but such a WAV; [`Error::TooShort`] under
/// [`MIN_SAMPLES`].
pub fn mel_of_wav(path: &Path) -> Result<LogMelSpectrogram> {
    let mut mel = MelCollector::new();
    pcm::read_wav(path, &mut |block| {
        mel.push(block);
        Ok(())
    })?;
    finish(mel)
}

/// Returns the log-mel of any audio or video file: WAV files that are already 16 kHz
/// mono 16-bit are read directly, everything else is decoded by ffmpeg to s16le 16 kHz
/// mono (Whisper's `load_audio` recipe, the same PCM the fetch stage stores).
///
/// # Errors
/// As [`mel_of_wav`], or when ffmpeg fails.
pub fn mel_of_file(ffmpeg: &Path, path: &Path) -> Result<LogMelSpectrogram> {
    if pcm::is_pcm16k_wav(path) {
        return mel_of_wav(path);
    }
    let mut mel = MelCollector::new();
    pcm::decode_with_ffmpeg(ffmpeg, path, &mut |block| {
        mel.push(block);
        Ok(())
    })?;
    finish(mel)
}

fn finish(mel: MelCollector) -> Result<LogMelSpectrogram> {
    let samples = mel.samples() as u64;
    let too_short = || Error::TooShort {
        seconds: samples as f64 / f64::from(SAMPLE_RATE),
        min: MIN_SAMPLES as f64 / f64::from(SAMPLE_RATE),
    };
    if samples < MIN_SAMPLES {
        return Err(too_short());
    }
    mel.finish().map_err(|_| too_short())
}

/// Writes a feature artifact in the runtime's format (`AudioFeatures::write_to`) block by
/// block: the header with the final T first, then the rows as they come.
pub struct FeatureWriter<W: Write> {
    out: W,
    dtype: Dtype,
    header_len: usize,
    expected: usize,
    written: usize,
    scratch: Vec<u8>,
}

impl<W: Write> FeatureWriter<W> {
    /// Starts an artifact of `positions` positions.
    ///
    /// # Errors
    /// When writing fails.
    pub fn new(mut out: W, positions: usize, dtype: Dtype) -> Result<Self> {
        let header = |t| AudioFeatures {
            t,
            layers: LAYERS,
            dim: DIM,
            data: Vec::new(),
        };
        // The header's length, measured on the format itself.
        let mut probe = Vec::new();
        header(0).write_to(&mut probe, dtype)?;
        header(positions).write_to(&mut out, dtype)?;
        Ok(Self {
            out,
            dtype,
            header_len: probe.len(),
            expected: positions,
            written: 0,
            scratch: Vec::new(),
        })
    }

    /// Appends rows (a multiple of 5 x 384 values).
    ///
    /// # Errors
    /// When writing fails or more positions come than announced.
    pub fn append(&mut self, rows: &[f32]) -> Result<()> {
        let n = rows.len() / POSITION_VALUES;
        if self.written + n > self.expected {
            return Err(Error::Inference(format!(
                "encoder produced more than {} positions",
                self.expected
            )));
        }
        let block = AudioFeatures {
            t: n,
            layers: LAYERS,
            dim: DIM,
            data: rows.to_vec(),
        };
        self.scratch.clear();
        block.write_to(&mut self.scratch, self.dtype)?;
        self.out.write_all(&self.scratch[self.header_len..])?;
        self.written += n;
        Ok(())
    }

    /// Flushes and checks that every announced position was written.
    ///
    /// # Errors
    /// When positions are missing or flushing fails.
    pub fn finish(mut self) -> Result<W> {
        if self.written != self.expected {
            return Err(Error::Inference(format!(
                "encoder produced {} of {} positions",
                self.written, self.expected
            )));
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Encodes `mel` window by window and writes the feature artifact to `path`. `before`
/// runs before each window (index, count) and may stop the work. Returns T.
///
/// # Errors
/// From the encoder, `before` or the file.
pub fn write_features(
    mel: &LogMelSpectrogram,
    overlap_positions: usize,
    encoder: &mut dyn WindowEncoder,
    dtype: Dtype,
    path: &Path,
    before: impl FnMut(usize, usize) -> Result<()>,
) -> Result<usize> {
    let file = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut writer = FeatureWriter::new(file, mel.frames / 2, dtype)?;
    let t = windows::encode_all(mel, overlap_positions, encoder, before, |rows| {
        writer.append(rows)
    })?;
    writer.finish()?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_artifact_reads_back_as_one() {
        let t = 7;
        let data: Vec<f32> = (0..t * POSITION_VALUES).map(|x| x as f32 * 0.25).collect();
        for dtype in [Dtype::F32, Dtype::F16] {
            let mut w = FeatureWriter::new(Vec::new(), t, dtype).unwrap();
            w.append(&data[..3 * POSITION_VALUES]).unwrap();
            w.append(&data[3 * POSITION_VALUES..]).unwrap();
            let bytes = w.finish().unwrap();
            let whole = AudioFeatures {
                t,
                layers: LAYERS,
                dim: DIM,
                data: data.clone(),
            };
            let mut want = Vec::new();
            whole.write_to(&mut want, dtype).unwrap();
            assert_eq!(bytes, want);
            let back = AudioFeatures::read_from(&bytes[..]).unwrap();
            assert_eq!(back.t, t);
        }
    }

    #[test]
    fn writer_refuses_wrong_counts() {
        let mut w = FeatureWriter::new(Vec::new(), 1, Dtype::F32).unwrap();
        assert!(w.append(&vec![0.0; 2 * POSITION_VALUES]).is_err());
        let w = FeatureWriter::new(Vec::new(), 2, Dtype::F32).unwrap();
        assert!(w.finish().is_err());
    }
}
