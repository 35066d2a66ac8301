//! The face-track artifact written by the face stage and read by infer and mux.

use serde::{Deserialize, Serialize};

/// Current face-track layout version.
pub const FACE_TRACK_VERSION: u32 = 1;

/// One decoded frame's face, in full-frame pixel coordinates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceFrame {
    /// A usable face was found (or bridged by interpolation) in this frame.
    pub present: bool,
    /// Detector score (0 when absent or interpolated).
    #[serde(default)]
    pub score: f32,
    /// Box `[x1, y1, x2, y2]`.
    #[serde(default)]
    pub bbox: [f32; 4],
    /// Detector landmarks `[[x, y], ...]` (5 for RetinaFace, 6 for BlazeFace, 106 for
    /// the InsightFace pair).
    #[serde(default)]
    pub landmarks: Vec<[f32; 2]>,
    /// 2x3 affine matrix mapping frame pixels to crop-box pixels (`crop_w` x `crop_h`),
    /// row-major `[[a, b, c], [d, e, f]]`; after translation smoothing.
    #[serde(default)]
    pub affine: [[f32; 3]; 2],
    /// The frame was bridged by interpolating its neighbours (no detection of its own).
    #[serde(default)]
    pub interpolated: bool,
}

/// The face track of one video: one entry per frame decoded at 25 fps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceTrack {
    /// Layout version.
    pub v: u32,
    /// Frame rate the frames were decoded at (always 25).
    pub fps: f64,
    /// Decoded frame width (after rotation).
    pub width: u32,
    /// Decoded frame height (after rotation).
    pub height: u32,
    /// Number of decoded frames; equals `frames.len()`.
    pub frame_count: u64,
    /// Width of the warped crop box (e.g. 420 for 512 px models).
    pub crop_w: u32,
    /// Height of the warped crop box (e.g. 560 for 512 px models).
    pub crop_h: u32,
    /// Square model resolution the crop box is resized to (256 or 512).
    pub resolution: u32,
    /// Detector that produced the track.
    pub detector: String,
    /// Per-frame entries.
    pub frames: Vec<FaceFrame>,
}

impl FaceTrack {
    /// Index of the first frame without a face.
    pub fn first_missing(&self) -> Option<usize> {
        self.frames.iter().position(|f| !f.present)
    }
}
