//! Alignment anchors from MediaPipe's 468-point face mesh (`face_landmark.tflite` of the
//! `mediapipe` PyPI wheel, Apache-2.0, converted to ONNX at set-up by
//! `stages/face/tools/face_mesh_onnx.py`): a wrapper around any 5-point detector that
//! runs the mesh on a 192 px crop of every detected face (1.5x the face, rotated to the
//! eye line, then re-cropped once from the mesh's own landmarks, as MediaPipe tracks) and
//! appends the three anchors to the detection's landmarks ([`Layout::FiveMesh`]: the
//! detector's own points, then the anchors).
//!
//! Correspondence with the reference's InsightFace 106-point means (by anatomy; README):
//! each eyebrow = mean of the 10 mesh points of its contour, the nose = mean of the lower
//! bridge (195), both alar wings (129, 358) and the tip (1).

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::session::{SessionOptions, load, output_f32};
use super::{Batch, Detection, Detector, InputSpec, Layout, bilinear};
use crate::error::{FaceError, Result};

/// Mesh points of the image-left eyebrow.
pub const BROW_IMG_LEFT: [usize; 10] = [70, 63, 105, 66, 107, 46, 53, 52, 65, 55];
/// Mesh points of the image-right eyebrow.
pub const BROW_IMG_RIGHT: [usize; 10] = [300, 293, 334, 296, 336, 276, 283, 282, 295, 285];
/// Mesh points of the nose anchor.
pub const NOSE: [usize; 4] = [195, 129, 358, 1];
const EYE_OUTER: (usize, usize) = (33, 263);
const SIZE: usize = 192;
const POINTS: usize = 468;

/// A crop: centre, side and angle (radians, the eye line) in frame pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Roi {
    /// Centre x, y.
    pub centre: [f64; 2],
    /// Side of the square.
    pub side: f64,
    /// Rotation.
    pub angle: f64,
}

impl Roi {
    /// The first crop of a detection: 1.5x the longer box side around the box centre,
    /// turned to the line through the two eyes.
    pub fn from_detection(bbox: &[f32; 4], el: [f32; 2], er: [f32; 2]) -> Self {
        let (w, h) = (f64::from(bbox[2] - bbox[0]), f64::from(bbox[3] - bbox[1]));
        Self {
            centre: [
                f64::from(bbox[0] + bbox[2]) / 2.0,
                f64::from(bbox[1] + bbox[3]) / 2.0,
            ],
            side: 1.5 * w.max(h),
            angle: f64::from(er[1] - el[1]).atan2(f64::from(er[0] - el[0])),
        }
    }

    /// The crop MediaPipe tracks with: 1.5x the landmarks' extent around their centre,
    /// turned to the outer eye corners.
    pub fn from_mesh(pts: &[[f64; 2]]) -> Self {
        let (mut lo, mut hi) = ([f64::MAX; 2], [f64::MIN; 2]);
        for p in pts {
            for c in 0..2 {
                lo[c] = lo[c].min(p[c]);
                hi[c] = hi[c].max(p[c]);
            }
        }
        let (a, b) = (pts[EYE_OUTER.0], pts[EYE_OUTER.1]);
        Self {
            centre: [(lo[0] + hi[0]) / 2.0, (lo[1] + hi[1]) / 2.0],
            side: 1.5 * (hi[0] - lo[0]).max(hi[1] - lo[1]),
            angle: (b[1] - a[1]).atan2(b[0] - a[0]),
        }
    }

    /// Frame position of crop pixel `(u, v)` (crop pixel units, 0..192).
    pub fn to_frame(&self, u: f64, v: f64) -> [f64; 2] {
        let k = self.side / SIZE as f64;
        let (s, c) = self.angle.sin_cos();
        let (x, y) = ((u - SIZE as f64 / 2.0) * k, (v - SIZE as f64 / 2.0) * k);
        [
            self.centre[0] + c * x - s * y,
            self.centre[1] + s * x + c * y,
        ]
    }

    /// The model input: `[3, 192, 192]` RGB in [0, 1], bilinear, black outside.
    pub fn crop(&self, frame: &[u8], width: usize, height: usize) -> Vec<f32> {
        let plane = SIZE * SIZE;
        let mut out = vec![0f32; 3 * plane];
        for v in 0..SIZE {
            for u in 0..SIZE {
                let [x, y] = self.to_frame(u as f64, v as f64);
                if x < 0.0 || y < 0.0 || x > (width - 1) as f64 || y > (height - 1) as f64 {
                    continue;
                }
                let px = bilinear(frame, width, height, x, y);
                for c in 0..3 {
                    out[c * plane + v * SIZE + u] = px[c] / 255.0;
                }
            }
        }
        out
    }
}

/// The three anchors (image-left brow, image-right brow, nose) of 468 mesh points.
pub fn mesh_anchors(pts: &[[f64; 2]]) -> [[f64; 2]; 3] {
    let mean = |idx: &[usize]| -> [f64; 2] {
        let n = idx.len() as f64;
        let (x, y) = idx
            .iter()
            .fold((0.0, 0.0), |(x, y), &i| (x + pts[i][0], y + pts[i][1]));
        [x / n, y / n]
    };
    [mean(&BROW_IMG_LEFT), mean(&BROW_IMG_RIGHT), mean(&NOSE)]
}

/// A 5-point detector whose detections carry mesh anchors.
pub struct MeshAnchors {
    inner: Box<dyn Detector>,
    mesh: Session,
}

impl MeshAnchors {
    /// Wraps `inner` (which must return [`Layout::Five`]).
    ///
    /// # Errors
    /// [`FaceError::Model`] when the mesh model cannot be loaded or `inner` has another
    /// layout.
    pub fn new(inner: Box<dyn Detector>, model: &Path, opts: &SessionOptions) -> Result<Self> {
        if !matches!(inner.layout(), Layout::Five | Layout::Six) {
            return Err(FaceError::Model(
                "face.anchors = \"mesh\" needs a detector with eye points (retinaface, blazeface)"
                    .into(),
            ));
        }
        Ok(Self {
            inner,
            mesh: load(model, opts)?,
        })
    }

    fn run(
        &mut self,
        roi: &Roi,
        frame: &[u8],
        width: usize,
        height: usize,
    ) -> Result<Vec<[f64; 2]>> {
        let input = roi.crop(frame, width, height);
        let tensor = TensorRef::from_array_view(([1, 3, SIZE, SIZE], input.as_slice()))
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let outputs = self
            .mesh
            .run(ort::inputs![tensor])
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let (_, lm) = output_f32(&outputs, 0)?;
        if lm.len() < POINTS * 3 {
            return Err(FaceError::Inference(format!(
                "face mesh returned {} values, expected {}",
                lm.len(),
                POINTS * 3
            )));
        }
        Ok((0..POINTS)
            .map(|i| roi.to_frame(f64::from(lm[3 * i]), f64::from(lm[3 * i + 1])))
            .collect())
    }
}

impl Detector for MeshAnchors {
    fn name(&self) -> &'static str {
        match self.inner.name() {
            "retinaface-mnet025-refined" => "retinaface-mnet025-refined+facemesh468",
            "retinaface-mnet025" => "retinaface-mnet025+facemesh468",
            _ => "blazeface+facemesh468",
        }
    }

    fn layout(&self) -> Layout {
        Layout::FiveMesh
    }

    fn input_spec(&self, width: u32, height: u32) -> InputSpec {
        self.inner.input_spec(width, height)
    }

    fn needs_frames(&self) -> bool {
        true
    }

    fn detect(
        &mut self,
        batch: &Batch,
        spec: &InputSpec,
        width: u32,
        height: u32,
    ) -> Result<Vec<Vec<Detection>>> {
        let mut all = self.inner.detect(batch, spec, width, height)?;
        let (w, h) = (width as usize, height as usize);
        for (f, dets) in all.iter_mut().enumerate() {
            let frame = batch
                .frames
                .get(f)
                .ok_or_else(|| FaceError::Inference("frame missing from batch".into()))?;
            for d in dets.iter_mut() {
                if d.landmarks.len() < 2 {
                    continue;
                }
                let roi = Roi::from_detection(&d.bbox, d.landmarks[0], d.landmarks[1]);
                let first = self.run(&roi, frame, w, h)?;
                let pts = self.run(&Roi::from_mesh(&first), frame, w, h)?;
                d.landmarks
                    .extend(mesh_anchors(&pts).map(|p| [p[0] as f32, p[1] as f32]));
            }
        }
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roi_maps_the_crop_centre_and_turns_with_the_eyes() {
        let roi = Roi::from_detection(
            &[100.0, 100.0, 200.0, 220.0],
            [130.0, 150.0],
            [170.0, 150.0],
        );
        assert_eq!(roi.side, 180.0);
        assert_eq!(roi.to_frame(96.0, 96.0), [150.0, 160.0]);
        // One crop pixel is side / 192 frame pixels, along the eye line.
        let p = roi.to_frame(96.0 + 192.0, 96.0);
        assert!((p[0] - 330.0).abs() < 1e-9 && (p[1] - 160.0).abs() < 1e-9);
        let turned = Roi::from_detection(
            &[100.0, 100.0, 200.0, 220.0],
            [150.0, 130.0],
            [150.0, 170.0],
        );
        let q = turned.to_frame(96.0 + 192.0, 96.0);
        assert!((q[0] - 150.0).abs() < 1e-9 && (q[1] - 340.0).abs() < 1e-9);
    }

    #[test]
    fn mesh_anchors_are_the_documented_means() {
        let mut pts = vec![[0.0, 0.0]; POINTS];
        for (k, &i) in BROW_IMG_LEFT.iter().enumerate() {
            pts[i] = [10.0 + k as f64, 20.0];
        }
        for &i in &BROW_IMG_RIGHT {
            pts[i] = [60.0, 22.0];
        }
        for (k, &i) in NOSE.iter().enumerate() {
            pts[i] = [35.0, 40.0 + k as f64];
        }
        assert_eq!(
            mesh_anchors(&pts),
            [[14.5, 20.0], [60.0, 22.0], [35.0, 41.5]]
        );
    }
}
