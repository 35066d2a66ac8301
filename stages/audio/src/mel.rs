//! Whisper's log-mel spectrogram, computed exactly as Whisper's `log_mel_spectrogram`
//! (docs/architecture.md §9.3): 16 kHz, 400-point periodic Hann window, hop 160, centred STFT with
//! reflect padding and the last frame dropped, `|X|^2`, 80 Slaney mel filters, `log10` of
//! the clamp at 1e-10, floor at the global maximum - 8, then `(x + 4) / 4`.
//!
//! [`LogMel`] is a streaming engine: samples are pushed in any chunk sizes and frames
//! come out as soon as their 400-sample window is complete, so the PCM is never held.
//! The floor needs the maximum over the whole file, so the caller keeps the (small)
//! un-normalised log-mel — 80 x 100 floats per second, 32 KB/s, 19 MB for 10 minutes —
//! and applies [`normalize`] per window; see [`LogMelSpectrogram`].

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};

/// Sample rate of every mel input.
pub const SAMPLE_RATE: u32 = 16_000;
/// FFT size (25 ms).
pub const N_FFT: usize = 400;
/// Hop between frames (10 ms: 100 frames per second).
pub const HOP: usize = 160;
/// Mel bands.
pub const N_MELS: usize = 80;
/// One-sided FFT bins.
pub const N_BINS: usize = N_FFT / 2 + 1;
/// Power floor before the logarithm.
const POWER_FLOOR: f64 = 1e-10;
/// Dynamic range kept below the global maximum (log10 units).
const DYNAMIC_RANGE: f32 = 8.0;
/// Samples reflected at each end (`N_FFT / 2`).
const PAD: usize = N_FFT / 2;
/// Fewest samples the centred STFT accepts (reflect padding needs more than `PAD`).
pub const MIN_SAMPLES: usize = PAD + 1;

/// Number of mel frames of a signal of `samples` samples: `floor(samples / 160)`
/// (`1 + samples / 160` centred frames, the last one dropped).
pub fn frame_count(samples: usize) -> usize {
    samples / HOP
}

/// Converts Hz to mel on the Slaney scale (librosa `hz_to_mel`, `htk=False`): linear
/// below 1 kHz (200/3 Hz per mel), logarithmic above.
pub fn hz_to_mel(hz: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

/// Inverse of [`hz_to_mel`] (librosa `mel_to_hz`, `htk=False`).
pub fn mel_to_hz(mel: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        f_sp * mel
    }
}

/// Returns the mel filter bank, `n_mels x (n_fft/2 + 1)` row-major, as librosa's
/// `filters.mel(sr, n_fft, n_mels)` builds it (fmin 0, fmax sr/2, `htk=False`,
/// `norm="slaney"`): triangles between consecutive mel points, each scaled by
/// `2 / (f[i+2] - f[i])` so that every filter has unit area. Computed in f64.
pub fn mel_filters(sample_rate: u32, n_fft: usize, n_mels: usize) -> Vec<f64> {
    let n_bins = n_fft / 2 + 1;
    let sr = f64::from(sample_rate);
    let fft_freqs: Vec<f64> = (0..n_bins)
        .map(|k| k as f64 * (sr / 2.0) / (n_bins - 1) as f64)
        .collect();
    let (mel_lo, mel_hi) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_lo + (mel_hi - mel_lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = vec![0.0; n_mels * n_bins];
    for m in 0..n_mels {
        let (left, centre, right) = (mel_f[m], mel_f[m + 1], mel_f[m + 2]);
        let enorm = 2.0 / (right - left);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - left) / (centre - left);
            let upper = (right - f) / (right - centre);
            weights[m * n_bins + k] = lower.min(upper).max(0.0) * enorm;
        }
    }
    weights
}

/// A mel filter stored sparsely: its first non-zero bin and weights.
#[derive(Debug, Clone)]
struct Band {
    first: usize,
    weights: Vec<f64>,
}

/// The STFT + mel engine for one stream of 16 kHz samples.
pub struct LogMel {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    bands: Vec<Band>,
    frame_in: Vec<f64>,
    spectrum: Vec<Complex<f64>>,
    scratch: Vec<Complex<f64>>,
    power: Vec<f64>,
    /// Padded samples not yet consumed; `buf[0]` is padded index `buf_start`.
    buf: Vec<f64>,
    buf_start: usize,
    /// Real samples received.
    received: usize,
    /// Whether the left reflect padding was written.
    started: bool,
    /// Next frame to compute.
    next_frame: usize,
}

impl Default for LogMel {
    fn default() -> Self {
        Self::new()
    }
}

impl LogMel {
    /// Returns a fresh engine (plans the FFT, builds the window and the filter bank).
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        // Periodic Hann (torch.hann_window default): 0.5 - 0.5 cos(2 pi n / N).
        let window = (0..N_FFT)
            .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
            .collect();
        let dense = mel_filters(SAMPLE_RATE, N_FFT, N_MELS);
        let bands = (0..N_MELS)
            .map(|m| {
                let row = &dense[m * N_BINS..(m + 1) * N_BINS];
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w != 0.0).unwrap_or(0);
                Band {
                    first,
                    weights: row[first..=last.max(first)].to_vec(),
                }
            })
            .collect();
        Self {
            frame_in: fft.make_input_vec(),
            spectrum: fft.make_output_vec(),
            scratch: fft.make_scratch_vec(),
            fft,
            window,
            bands,
            power: vec![0.0; N_BINS],
            buf: Vec::with_capacity(8192),
            buf_start: 0,
            received: 0,
            started: false,
            next_frame: 0,
        }
    }

    /// Samples pushed so far.
    pub fn samples(&self) -> usize {
        self.received
    }

    /// Feeds samples (in [-1, 1]); calls `emit` with the un-normalised log10 mel of every
    /// frame whose window is now complete, in order.
    pub fn push(&mut self, samples: &[f32], mut emit: impl FnMut(&[f32; N_MELS])) {
        self.received += samples.len();
        self.buf.extend(samples.iter().map(|&s| f64::from(s)));
        if !self.started {
            if self.buf.len() < MIN_SAMPLES {
                return;
            }
            // Left reflect padding: padded[i] = x[PAD - i] for i < PAD.
            let head: Vec<f64> = (0..PAD).map(|i| self.buf[PAD - i]).collect();
            self.buf.splice(0..0, head);
            self.started = true;
        }
        // Frames lying entirely in real samples (plus the left pad) are always kept.
        let available = PAD + self.received;
        self.run_frames(|j| j * HOP + N_FFT <= available, &mut emit);
    }

    /// Ends the stream: appends the right reflect padding and emits the remaining frames.
    /// Returns the total number of frames (`floor(samples / 160)`).
    ///
    /// # Errors
    /// When fewer than [`MIN_SAMPLES`] samples were pushed (reflect padding impossible).
    pub fn finish(&mut self, mut emit: impl FnMut(&[f32; N_MELS])) -> Result<usize, TooShort> {
        if !self.started {
            return Err(TooShort {
                samples: self.received,
            });
        }
        // Right reflect padding: padded[PAD + N + k] = x[N - 2 - k] for k < PAD. The buffer
        // always holds at least the last PAD + 1 real samples (see `run_frames`).
        let end = self.buf.len();
        let tail: Vec<f64> = (0..PAD).map(|k| self.buf[end - 2 - k]).collect();
        self.buf.extend(tail);
        let total = frame_count(self.received);
        self.run_frames(|j| j < total, &mut emit);
        Ok(total)
    }

    fn run_frames(&mut self, ready: impl Fn(usize) -> bool, emit: &mut impl FnMut(&[f32; N_MELS])) {
        let mut out = [0f32; N_MELS];
        while ready(self.next_frame) {
            let at = self.next_frame * HOP - self.buf_start;
            self.frame(at, &mut out);
            emit(&out);
            self.next_frame += 1;
        }
        // Drop consumed samples now and then, keeping everything from the next frame on
        // (at least N_FFT - HOP + 1 > PAD + 1 samples, enough for the right padding).
        let keep_from = self.next_frame * HOP - self.buf_start;
        if keep_from > 16 * 1024 {
            self.buf.drain(..keep_from);
            self.buf_start += keep_from;
        }
    }

    fn frame(&mut self, at: usize, out: &mut [f32; N_MELS]) {
        for ((dst, &x), &w) in self
            .frame_in
            .iter_mut()
            .zip(&self.buf[at..at + N_FFT])
            .zip(&self.window)
        {
            *dst = x * w;
        }
        self.fft
            .process_with_scratch(&mut self.frame_in, &mut self.spectrum, &mut self.scratch)
            .expect("fft buffers sized by the planner");
        for (p, c) in self.power.iter_mut().zip(&self.spectrum) {
            *p = c.re * c.re + c.im * c.im;
        }
        for (o, band) in out.iter_mut().zip(&self.bands) {
            let mel: f64 = band
                .weights
                .iter()
                .zip(&self.power[band.first..])
                .map(|(w, p)| w * p)
                .sum();
            *o = mel.max(POWER_FLOOR).log10() as f32;
        }
    }
}

/// The signal was too short for the centred STFT.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("audio too short: {samples} samples (at least {MIN_SAMPLES} needed)")]
pub struct TooShort {
    /// Samples received.
    pub samples: usize,
}

/// Applies Whisper's floor and scaling to un-normalised log10 mel values in place:
/// `(max(x, global_max - 8) + 4) / 4`.
pub fn normalize(values: &mut [f32], global_max: f32) {
    let floor = global_max - DYNAMIC_RANGE;
    for v in values {
        *v = (v.max(floor) + 4.0) / 4.0;
    }
}

/// The un-normalised log-mel of a whole signal, frame-major (`frames x 80`), with its
/// maximum, ready to be normalised window by window.
#[derive(Debug, Clone, Default)]
pub struct LogMelSpectrogram {
    /// `frames * 80` log10 values, frame-major.
    pub data: Vec<f32>,
    /// Frames.
    pub frames: usize,
    /// Largest value (the floor is this - 8).
    pub max: f32,
}

impl LogMelSpectrogram {
    /// Returns the normalised mel of frames `[start, start + len)` as `80 x width`
    /// (mel-major, the encoder layout), zero-padded past the end of the signal or of
    /// `len`, like Whisper's `pad_or_trim`.
    pub fn window(&self, start: usize, len: usize, width: usize) -> Vec<f32> {
        let mut out = vec![0f32; N_MELS * width];
        let end = (start + len.min(width)).min(self.frames);
        let floor = self.max - DYNAMIC_RANGE;
        for (col, frame) in (start..end).enumerate() {
            let src = &self.data[frame * N_MELS..(frame + 1) * N_MELS];
            for (m, &v) in src.iter().enumerate() {
                out[m * width + col] = (v.max(floor) + 4.0) / 4.0;
            }
        }
        out
    }

    /// Returns the whole normalised mel as `80 x frames` (mel-major).
    pub fn normalized(&self) -> Vec<f32> {
        self.window(0, self.frames, self.frames)
    }
}

/// Collects a [`LogMel`] stream into a [`LogMelSpectrogram`].
pub struct MelCollector {
    engine: LogMel,
    spec: LogMelSpectrogram,
}

impl Default for MelCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl MelCollector {
    /// Returns an empty collector.
    pub fn new() -> Self {
        Self {
            engine: LogMel::new(),
            spec: LogMelSpectrogram {
                max: f32::NEG_INFINITY,
                ..LogMelSpectrogram::default()
            },
        }
    }

    /// Feeds samples in [-1, 1].
    pub fn push(&mut self, samples: &[f32]) {
        let spec = &mut self.spec;
        self.engine.push(samples, |f| {
            spec.max = f.iter().fold(spec.max, |a, &b| a.max(b));
            spec.data.extend_from_slice(f);
        });
    }

    /// Samples pushed so far.
    pub fn samples(&self) -> usize {
        self.engine.samples()
    }

    /// Ends the stream and returns the spectrogram.
    ///
    /// # Errors
    /// When the signal is shorter than [`MIN_SAMPLES`].
    pub fn finish(mut self) -> Result<LogMelSpectrogram, TooShort> {
        let spec = &mut self.spec;
        let frames = self.engine.finish(|f| {
            spec.max = f.iter().fold(spec.max, |a, &b| a.max(b));
            spec.data.extend_from_slice(f);
        })?;
        self.spec.frames = frames;
        Ok(self.spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slaney_scale_round_trips() {
        for hz in [0.0, 100.0, 999.0, 1000.0, 1234.5, 8000.0] {
            assert!((mel_to_hz(hz_to_mel(hz)) - hz).abs() < 1e-9, "{hz}");
        }
        assert!((hz_to_mel(1000.0) - 15.0).abs() < 1e-12);
    }

    #[test]
    fn filters_have_unit_area_shape() {
        let w = mel_filters(SAMPLE_RATE, N_FFT, N_MELS);
        assert_eq!(w.len(), N_MELS * N_BINS);
        for m in 0..N_MELS {
            let row = &w[m * N_BINS..(m + 1) * N_BINS];
            assert!(row.iter().all(|&x| x >= 0.0));
            assert!(row.iter().any(|&x| x > 0.0), "filter {m} is empty");
        }
    }

    #[test]
    fn frame_count_follows_whisper() {
        assert_eq!(frame_count(16_000), 100);
        assert_eq!(frame_count(16_159), 100);
        assert_eq!(frame_count(16_160), 101);
    }

    fn signal(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = i as f32 / SAMPLE_RATE as f32;
                0.5 * (2.0 * std::f32::consts::PI * 440.0 * t).sin()
                    + 0.1 * (2.0 * std::f32::consts::PI * 3100.0 * t).sin()
            })
            .collect()
    }

    #[test]
    fn chunking_of_the_input_does_not_matter() {
        let x = signal(16_000 + 77);
        let mut whole = MelCollector::new();
        whole.push(&x);
        let whole = whole.finish().unwrap();
        assert_eq!(whole.frames, frame_count(x.len()));
        assert_eq!(whole.data.len(), whole.frames * N_MELS);
        for step in [1usize, 7, 160, 401, 5000] {
            let mut c = MelCollector::new();
            for piece in x.chunks(step) {
                c.push(piece);
            }
            let got = c.finish().unwrap();
            assert_eq!(got.data, whole.data, "step {step}");
        }
    }

    #[test]
    fn too_short_is_an_error() {
        let mut c = MelCollector::new();
        c.push(&signal(MIN_SAMPLES - 1));
        assert!(c.finish().is_err());
        let mut c = MelCollector::new();
        c.push(&signal(MIN_SAMPLES));
        assert_eq!(c.finish().unwrap().frames, 1);
    }

    #[test]
    fn window_pads_with_zeros_and_normalizes() {
        let mut c = MelCollector::new();
        c.push(&signal(8000));
        let spec = c.finish().unwrap();
        let w = spec.window(0, spec.frames, 100);
        assert_eq!(w.len(), N_MELS * 100);
        // Columns past the 50 frames are zero; real ones lie in Whisper's range.
        for m in 0..N_MELS {
            assert!(w[m * 100 + 50..(m + 1) * 100].iter().all(|&v| v == 0.0));
            let max = (spec.max + 4.0) / 4.0;
            assert!(
                w[m * 100..m * 100 + 50]
                    .iter()
                    .all(|&v| v <= max && v >= max - 2.0)
            );
        }
    }
}
