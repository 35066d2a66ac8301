//! Whisper encoder features (T, 5, 384) as stored by the audio stage, and the per-frame
//! chunking of the reference (`[2i-4, 2i+6)` clamped, reshaped to 50 x 384,
//! `floor(T/2)+2` frames). Audio and infer use exactly this code.

use std::io::{Read, Write};

/// Magic bytes of the feature artifact.
const MAGIC: &[u8; 4] = b"LSAF";
/// Format version.
const VERSION: u32 = 1;

/// Feature positions per video frame (50 per second over 25 fps).
pub const POSITIONS_PER_FRAME: usize = 2;
/// Positions before the frame's centre in a window (`audio_feat_length[0] * 2`).
pub const WINDOW_BEFORE: usize = 4;
/// Positions from the centre to the window end (`(audio_feat_length[1] + 1) * 2`).
pub const WINDOW_AFTER: usize = 6;

/// Stored element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 16-bit float (half the size; ~1e-3 relative error).
    F16,
}

/// Encoder features: `t` positions x `layers` hidden states x `dim` channels, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioFeatures {
    /// Positions (about 50 per second of audio).
    pub t: usize,
    /// Hidden states per position (5 for Whisper tiny with embeddings).
    pub layers: usize,
    /// Channels (384 for Whisper tiny).
    pub dim: usize,
    /// `t * layers * dim` values.
    pub data: Vec<f32>,
}

/// Errors reading a feature artifact.
#[derive(Debug, thiserror::Error)]
pub enum FeaturesError {
    /// Not a feature artifact or a version this build does not read.
    #[error("invalid feature artifact: {0}")]
    Invalid(String),
    /// I/O error.
    #[error("feature artifact i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl AudioFeatures {
    /// Number of video frames the features drive: `floor(T/2) + 2` (the reference's
    /// loop stops after the first frame whose centre is past the end).
    pub fn frame_count(&self) -> usize {
        if self.t == 0 {
            0
        } else {
            self.t / POSITIONS_PER_FRAME + 2
        }
    }

    /// The `(10 * layers) x dim` chunk of video frame `i`, flattened: positions
    /// `[2i-4, 2i+6)` clamped into `[0, T-1]`, each contributing its `layers x dim` block.
    pub fn chunk(&self, i: usize) -> Vec<f32> {
        let block = self.layers * self.dim;
        let mut out = Vec::with_capacity((WINDOW_BEFORE + WINDOW_AFTER) * block);
        let centre = (i * POSITIONS_PER_FRAME) as i64;
        let last = self.t.saturating_sub(1) as i64;
        for p in (centre - WINDOW_BEFORE as i64)..(centre + WINDOW_AFTER as i64) {
            let idx = p.clamp(0, last) as usize;
            out.extend_from_slice(&self.data[idx * block..(idx + 1) * block]);
        }
        out
    }

    /// Serialise: magic, version, dtype, t, layers, dim (u32 LE), then the values (LE).
    pub fn write_to(&self, mut w: impl Write, dtype: Dtype) -> std::io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        let code: u32 = match dtype {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
        };
        w.write_all(&code.to_le_bytes())?;
        for n in [self.t, self.layers, self.dim] {
            w.write_all(&(n as u32).to_le_bytes())?;
        }
        let mut buf = Vec::with_capacity(64 * 1024);
        for chunk in self.data.chunks(8192) {
            buf.clear();
            for &x in chunk {
                match dtype {
                    Dtype::F32 => buf.extend_from_slice(&x.to_le_bytes()),
                    Dtype::F16 => buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes()),
                }
            }
            w.write_all(&buf)?;
        }
        Ok(())
    }

    /// Parse what [`AudioFeatures::write_to`] wrote.
    pub fn read_from(mut r: impl Read) -> Result<Self, FeaturesError> {
        let mut head = [0u8; 24];
        r.read_exact(&mut head)?;
        if &head[0..4] != MAGIC {
            return Err(FeaturesError::Invalid("bad magic".into()));
        }
        let u = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
        if u(4) != VERSION {
            return Err(FeaturesError::Invalid(format!("version {}", u(4))));
        }
        let dtype = match u(8) {
            0 => Dtype::F32,
            1 => Dtype::F16,
            d => return Err(FeaturesError::Invalid(format!("dtype {d}"))),
        };
        let (t, layers, dim) = (u(12) as usize, u(16) as usize, u(20) as usize);
        let n = t
            .checked_mul(layers)
            .and_then(|x| x.checked_mul(dim))
            .filter(|&n| n <= 1 << 31)
            .ok_or_else(|| FeaturesError::Invalid("shape too large".into()))?;
        let width = if dtype == Dtype::F32 { 4 } else { 2 };
        let mut raw = vec![0u8; n * width];
        r.read_exact(&mut raw)?;
        let data = match dtype {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes(b.try_into().expect("2 bytes")).to_f32())
                .collect(),
        };
        Ok(Self {
            t,
            layers,
            dim,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(t: usize) -> AudioFeatures {
        let (layers, dim) = (5, 3);
        AudioFeatures {
            t,
            layers,
            dim,
            data: (0..t * layers * dim).map(|x| x as f32).collect(),
        }
    }

    /// Direct transcription of the reference loop: i = 0, 1, ...; stop after the first
    /// i with 2i > T; indices [2i-4, 2i+6) clamped.
    fn reference(f: &AudioFeatures) -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        let mut i = 0usize;
        loop {
            let centre = 2 * i as i64;
            let mut chunk = Vec::new();
            for p in centre - 4..centre + 6 {
                let idx = p.max(0).min(f.t as i64 - 1) as usize;
                let block = f.layers * f.dim;
                chunk.extend_from_slice(&f.data[idx * block..(idx + 1) * block]);
            }
            out.push(chunk);
            if 2 * i > f.t {
                break;
            }
            i += 1;
        }
        out
    }

    #[test]
    fn chunks_match_the_reference_rule() {
        for t in [1, 2, 3, 10, 11, 500, 501] {
            let f = feats(t);
            let want = reference(&f);
            assert_eq!(f.frame_count(), want.len(), "t={t}");
            for (i, w) in want.iter().enumerate() {
                assert_eq!(&f.chunk(i), w, "t={t} i={i}");
            }
        }
        // 10 s of audio: T = 500 -> 252 frames.
        assert_eq!(feats(500).frame_count(), 252);
        // First chunk repeats position 0 four times (edge clamp), then 0..6.
        let f = feats(20);
        let c = f.chunk(0);
        let block = 15;
        for k in 0..5 {
            assert_eq!(c[k * block], 0.0);
        }
        assert_eq!(c[5 * block], block as f32);
    }

    #[test]
    fn roundtrip_f32_and_f16() {
        let f = feats(7);
        let mut buf = Vec::new();
        f.write_to(&mut buf, Dtype::F32).unwrap();
        assert_eq!(AudioFeatures::read_from(&buf[..]).unwrap(), f);
        let mut buf16 = Vec::new();
        f.write_to(&mut buf16, Dtype::F16).unwrap();
        assert!(buf16.len() < buf.len());
        let back = AudioFeatures::read_from(&buf16[..]).unwrap();
        for (a, b) in back.data.iter().zip(&f.data) {
            assert!((a - b).abs() <= b.abs() * 1e-3 + 1e-3);
        }
        assert!(AudioFeatures::read_from(&b"nope"[..]).is_err());
        buf[0] = b'X';
        assert!(AudioFeatures::read_from(&buf[..]).is_err());
    }
}
