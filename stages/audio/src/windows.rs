//! Encoder windows over the mel and the assembly of their outputs into (T, 5, 384).
//!
//! Reference behaviour (`overlap = 0`): 3000-frame windows at 0, 3000, 6000, ...; each is
//! zero-padded to 3000 frames, encoded to 1500 positions, and the first
//! `floor(real_frames / 2)` positions are kept, so `T = floor(frames / 2)`.
//!
//! With an overlap of `ov` positions the windows start every `2 * (1500 - ov)` mel frames.
//! In the `ov` positions two windows share, the output is a linear cross-fade from the
//! earlier window to the later one. Every window is encoded on its own, so in the
//! reference the features jump at each 30 s boundary (the encoder's state depends on the
//! position in the window and on the context it saw): the lip twitch of LatentSync issues
//! #121, #132 and #151. The cross-fade spreads that jump over the overlap. `T` is the
//! same with or without overlap.

use crate::error::Result;
use crate::mel::{LogMelSpectrogram, N_MELS};

/// Mel frames per encoder window (30 s).
pub const WINDOW_FRAMES: usize = 3000;
/// Encoder positions per window (20 ms each).
pub const WINDOW_POSITIONS: usize = WINDOW_FRAMES / 2;
/// Hidden states per position (embedding + 4 blocks).
pub const LAYERS: usize = 5;
/// Channels of Whisper tiny.
pub const DIM: usize = 384;
/// Values per position in the (T, 5, 384) layout.
pub const POSITION_VALUES: usize = LAYERS * DIM;
/// Largest overlap accepted, in positions (half a window).
pub const MAX_OVERLAP_POSITIONS: usize = WINDOW_POSITIONS / 2;

/// Encodes one window: `mel` is `80 x 3000` (mel-major, normalised, zero-padded); the
/// result is the encoder's `hidden_states` `[5, 1500, 384]` flattened.
pub trait WindowEncoder {
    /// Runs the encoder on one window.
    ///
    /// # Errors
    /// When the model fails.
    fn encode(&mut self, mel: &[f32]) -> Result<Vec<f32>>;
}

/// One encoder window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First mel frame.
    pub mel_start: usize,
    /// Real mel frames in it (<= 3000; the rest is zero padding).
    pub mel_len: usize,
    /// First output position it covers.
    pub pos_start: usize,
    /// Positions kept: `floor(mel_len / 2)`.
    pub keep: usize,
}

/// The windows of a mel of `frames` frames with `overlap` positions shared by
/// neighbours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Windows in order.
    pub windows: Vec<Window>,
    /// Output positions: `floor(frames / 2)`.
    pub positions: usize,
    /// Positions shared by consecutive windows.
    pub overlap: usize,
}

impl Plan {
    /// Plans the windows; `overlap` is clamped to [`MAX_OVERLAP_POSITIONS`].
    pub fn new(frames: usize, overlap: usize) -> Self {
        let overlap = overlap.min(MAX_OVERLAP_POSITIONS);
        let stride = WINDOW_POSITIONS - overlap;
        let mut windows = Vec::new();
        let mut k = 0;
        loop {
            let mel_start = 2 * stride * k;
            if mel_start >= frames && k > 0 {
                break;
            }
            let mel_len = (frames - mel_start.min(frames)).min(WINDOW_FRAMES);
            windows.push(Window {
                mel_start,
                mel_len,
                pos_start: stride * k,
                keep: mel_len / 2,
            });
            if mel_start + WINDOW_FRAMES >= frames {
                break;
            }
            k += 1;
        }
        Self {
            windows,
            positions: frames / 2,
            overlap,
        }
    }

    /// Converts an overlap in seconds to positions (50 per second), rounded.
    pub fn overlap_positions(seconds: f64) -> usize {
        (seconds.max(0.0) * 50.0).round() as usize
    }
}

/// Runs `encoder` over every window of `mel` and hands the assembled (T, 5, 384) rows to
/// `sink` in order, a block at a time (positions no later window touches). `before`
/// runs before each window with (window index, window count) and may stop the work.
///
/// # Errors
/// From the encoder, `before` or `sink`.
pub fn encode_all(
    mel: &LogMelSpectrogram,
    overlap: usize,
    encoder: &mut dyn WindowEncoder,
    mut before: impl FnMut(usize, usize) -> Result<()>,
    mut sink: impl FnMut(&[f32]) -> Result<()>,
) -> Result<usize> {
    let plan = Plan::new(mel.frames, overlap);
    let count = plan.windows.len();
    let mut assembler = Assembler::new(plan.positions);
    for (i, w) in plan.windows.iter().enumerate() {
        before(i, count)?;
        let input = mel.window(w.mel_start, w.mel_len, WINDOW_FRAMES);
        let hidden = encoder.encode(&input)?;
        let rows = to_rows(&hidden, w.keep);
        let next_start = plan.windows.get(i + 1).map(|n| n.pos_start);
        assembler.add(w.pos_start, &rows, next_start, &mut sink)?;
    }
    Ok(plan.positions)
}

/// Transposes `[5, 1500, 384]` to `(keep, 5, 384)` rows.
pub fn to_rows(hidden: &[f32], keep: usize) -> Vec<f32> {
    let mut rows = vec![0f32; keep * POSITION_VALUES];
    for p in 0..keep {
        for l in 0..LAYERS {
            let src = &hidden[(l * WINDOW_POSITIONS + p) * DIM..][..DIM];
            rows[(p * LAYERS + l) * DIM..][..DIM].copy_from_slice(src);
        }
    }
    rows
}

/// Blends window outputs and releases positions once no later window covers them.
struct Assembler {
    /// Positions in the whole output.
    total: usize,
    /// Next position to release.
    emitted: usize,
    /// Rows of positions `[emitted, emitted + pending_len)` awaiting the next window.
    pending: Vec<f32>,
}

impl Assembler {
    fn new(total: usize) -> Self {
        Self {
            total,
            emitted: 0,
            pending: Vec::new(),
        }
    }

    /// Adds the rows of a window starting at `start`; `next_start` is where the next
    /// window begins (None for the last one).
    fn add(
        &mut self,
        start: usize,
        rows: &[f32],
        next_start: Option<usize>,
        sink: &mut impl FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let len = rows.len() / POSITION_VALUES;
        let end = (start + len).min(self.total);
        let mut merged = std::mem::take(&mut self.pending);
        // `merged` holds positions [emitted, emitted + held); cross-fade the shared part.
        let held = merged.len() / POSITION_VALUES;
        debug_assert_eq!(start.max(self.emitted), self.emitted);
        let shared = (self.emitted + held).min(end).saturating_sub(start);
        for i in 0..shared {
            let w_new = (i as f32 + 0.5) / shared as f32;
            let p = start + i;
            let dst = &mut merged[(p - self.emitted) * POSITION_VALUES..][..POSITION_VALUES];
            let src = &rows[i * POSITION_VALUES..][..POSITION_VALUES];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = (1.0 - w_new) * *d + w_new * s;
            }
        }
        // A shorter last window may end inside the shared part: drop what it did not cover.
        merged.truncate((end - self.emitted).min(held) * POSITION_VALUES);
        if start + shared < end {
            merged.extend_from_slice(
                &rows[shared * POSITION_VALUES..(end - start) * POSITION_VALUES],
            );
        }
        // Release what the next window will not touch.
        let release_to = next_start.unwrap_or(end).min(end).max(self.emitted);
        let n = release_to - self.emitted;
        if n > 0 {
            sink(&merged[..n * POSITION_VALUES])?;
        }
        self.pending = merged.split_off(n * POSITION_VALUES);
        self.emitted = release_to;
        Ok(())
    }
}

/// Returns how many mel values a window input has (`80 x 3000`).
pub const fn window_input_len() -> usize {
    N_MELS * WINDOW_FRAMES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_plan_matches_the_reference_loop() {
        // seek = 0, 3000, ... while seek < frames; keep floor(segment / 2).
        for frames in [1usize, 2, 99, 2999, 3000, 3001, 6000, 6001, 10_123] {
            let plan = Plan::new(frames, 0);
            let mut want = Vec::new();
            let mut seek = 0;
            while seek < frames {
                let len = (frames - seek).min(3000);
                want.push(Window {
                    mel_start: seek,
                    mel_len: len,
                    pos_start: seek / 2,
                    keep: len / 2,
                });
                seek += 3000;
            }
            assert_eq!(plan.windows, want, "frames {frames}");
            let kept: usize = plan.windows.iter().map(|w| w.keep).sum();
            assert_eq!(kept, plan.positions);
            assert_eq!(plan.positions, frames / 2);
        }
    }

    #[test]
    fn overlap_plan_covers_every_position() {
        for frames in [100usize, 3000, 3001, 5800, 5801, 9000, 20_000] {
            for ov in [1usize, 50, 100, 750, 2000] {
                let plan = Plan::new(frames, ov);
                let mut covered = vec![0u8; plan.positions];
                for w in &plan.windows {
                    assert!(w.pos_start + w.keep <= plan.positions);
                    for c in &mut covered[w.pos_start..w.pos_start + w.keep] {
                        *c += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1 || c == 2), "{frames} {ov}");
                assert_eq!(
                    plan.windows.last().map(|w| w.pos_start + w.keep),
                    Some(plan.positions)
                );
            }
        }
    }

    /// A stand-in for Whisper's window dependence: every value is the audio signal at the
    /// position plus a slow drift with the position inside the window (like a positional
    /// embedding and growing context), which restarts at every window.
    struct Drifting;

    const DRIFT: f32 = 0.5;

    impl WindowEncoder for Drifting {
        fn encode(&mut self, mel: &[f32]) -> Result<Vec<f32>> {
            let mut out = vec![0f32; LAYERS * WINDOW_POSITIONS * DIM];
            for l in 0..LAYERS {
                for p in 0..WINDOW_POSITIONS {
                    let signal = mel[2 * p]; // mel band 0, frame 2p
                    let drift = DRIFT * p as f32 / WINDOW_POSITIONS as f32;
                    for d in 0..DIM {
                        out[(l * WINDOW_POSITIONS + p) * DIM + d] =
                            signal + drift + 0.001 * (l * DIM + d) as f32;
                    }
                }
            }
            Ok(out)
        }
    }

    /// A slowly varying mel: band 0 goes through a gentle sine over the file.
    fn smooth_mel(frames: usize) -> LogMelSpectrogram {
        let mut data = vec![0f32; frames * N_MELS];
        for f in 0..frames {
            data[f * N_MELS] = 0.2 * (f as f32 / 700.0).sin();
        }
        LogMelSpectrogram {
            data,
            frames,
            max: 1.0,
        }
    }

    fn run(mel: &LogMelSpectrogram, overlap: usize) -> Vec<f32> {
        let mut out = Vec::new();
        let t = encode_all(
            mel,
            overlap,
            &mut Drifting,
            |_, _| Ok(()),
            |rows| {
                out.extend_from_slice(rows);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out.len(), t * POSITION_VALUES);
        out
    }

    /// The largest step between consecutive positions of the first channel of layer 0.
    fn steps(rows: &[f32]) -> Vec<f32> {
        let v: Vec<f32> = rows.chunks(POSITION_VALUES).map(|r| r[0]).collect();
        v.windows(2).map(|w| (w[1] - w[0]).abs()).collect()
    }

    #[test]
    fn overlap_removes_the_seam_jump() {
        let frames = 3 * WINDOW_FRAMES + 1234; // 4 windows without overlap
        let mel = smooth_mel(frames);
        let plain = run(&mel, 0);
        let faded = run(&mel, 100);
        assert_eq!(plain.len(), faded.len());
        let (s_plain, s_faded) = (steps(&plain), steps(&faded));
        let interior = s_plain[100..1400].iter().cloned().fold(0f32, f32::max);
        let seam = s_plain[WINDOW_POSITIONS - 1];
        // Without overlap: a jump of about the drift at every 30 s boundary.
        assert!(
            seam > 0.4 && seam > 50.0 * interior,
            "seam {seam} interior {interior}"
        );
        // With a 2 s cross-fade the largest step anywhere is close to the interior steps.
        let worst = s_faded.iter().cloned().fold(0f32, f32::max);
        assert!(
            worst < 0.02 && worst < seam / 20.0,
            "worst {worst} seam {seam}"
        );
        // Before the first overlap both are the same window-0 output.
        let stride = WINDOW_POSITIONS - 100;
        assert_eq!(
            plain[..stride * POSITION_VALUES],
            faded[..stride * POSITION_VALUES]
        );
    }

    #[test]
    fn sink_sees_blocks_in_order_without_gaps() {
        let mel = smooth_mel(2 * WINDOW_FRAMES + 10);
        let mut blocks = Vec::new();
        encode_all(
            &mel,
            50,
            &mut Drifting,
            |_, _| Ok(()),
            |rows| {
                blocks.push(rows.len() / POSITION_VALUES);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(blocks.iter().sum::<usize>(), mel.frames / 2);
        assert!(blocks.len() >= 2);
    }
}
