//! The LatentSync-faithful InsightFace pair, from files the user supplies (the
//! `buffalo_l` pack is under a non-commercial licence, so it is never downloaded here):
//! - SCRFD `det_10g.onnx`: input `[1,3,S,S]` RGB `(px - 127.5) / 128`, the frame scaled
//!   into the top-left of the square; 9 outputs (scores, box distances, 5 keypoints for
//!   strides 8, 16, 32; 2 anchors per cell at `(x, y) * stride`; distances times stride);
//! - `2d106det.onnx`: a 192x192 crop centred on the box, scaled so 1.5 x the longer box
//!   side fills it, raw RGB 0..255 (the mxnet export normalises inside the graph), output
//!   212 values in [-1, 1] -> `(v + 1) * 96` crop pixels.
//!
//! Written from the published formats; no model file was available to test it, so this
//! path is **unverified**.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::session::{SessionOptions, load, output_f32};
use super::{Batch, Detection, Detector, InputSpec, Layout, TensorLayout, nms};
use crate::error::{FaceError, Result};

const STRIDES: [usize; 3] = [8, 16, 32];
const LMK_SIZE: usize = 192;

/// SCRFD + 2d106det.
pub struct InsightFace {
    det: Session,
    lmk: Session,
    det_size: u32,
    min_score: f32,
    nms_iou: f32,
}

impl InsightFace {
    /// Loads both models.
    ///
    /// # Errors
    /// [`FaceError::Model`] when a model cannot be loaded.
    pub fn new(
        det: &Path,
        landmarks: &Path,
        opts: &SessionOptions,
        det_size: u32,
        min_score: f32,
        nms_iou: f32,
    ) -> Result<Self> {
        Ok(Self {
            det: load(det, opts)?,
            lmk: load(landmarks, opts)?,
            det_size,
            min_score,
            nms_iou,
        })
    }

    fn scrfd(&mut self, input: &[f32], spec: &InputSpec) -> Result<Vec<Detection>> {
        let tensor = TensorRef::from_array_view(([1, 3, spec.in_h, spec.in_w], input))
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let outputs = self
            .det
            .run(ort::inputs![tensor])
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        if outputs.len() != 9 {
            return Err(FaceError::Inference(format!(
                "scrfd model has {} outputs, expected 9 (det_10g with keypoints)",
                outputs.len()
            )));
        }
        let mut all = Vec::with_capacity(9);
        for i in 0..9 {
            all.push(output_f32(&outputs, i)?.1);
        }
        drop(outputs);
        let inv = 1.0 / spec.scale as f32;
        let mut dets = Vec::new();
        for (level, stride) in STRIDES.iter().enumerate() {
            let (fw, fh) = (spec.in_w / stride, spec.in_h / stride);
            let (scores, boxes, kps) = (&all[level], &all[level + 3], &all[level + 6]);
            let n = fw * fh * 2;
            if scores.len() < n || boxes.len() < n * 4 || kps.len() < n * 10 {
                return Err(FaceError::Inference(
                    "scrfd output sizes do not match".into(),
                ));
            }
            let s = *stride as f32;
            for (a, &score) in scores.iter().take(n).enumerate() {
                if score < self.min_score {
                    continue;
                }
                let cell = a / 2;
                let (cx, cy) = ((cell % fw) as f32 * s, (cell / fw) as f32 * s);
                let d = &boxes[a * 4..a * 4 + 4];
                let bbox =
                    [cx - d[0] * s, cy - d[1] * s, cx + d[2] * s, cy + d[3] * s].map(|v| v * inv);
                let k = &kps[a * 10..a * 10 + 10];
                let landmarks = (0..5)
                    .map(|i| [(cx + k[2 * i] * s) * inv, (cy + k[2 * i + 1] * s) * inv])
                    .collect();
                dets.push(Detection {
                    bbox,
                    score,
                    landmarks,
                });
            }
        }
        Ok(nms(dets, self.nms_iou))
    }

    fn landmarks106(
        &mut self,
        frame: &[u8],
        width: usize,
        height: usize,
        bbox: &[f32; 4],
    ) -> Result<Vec<[f32; 2]>> {
        let (w, h) = (bbox[2] - bbox[0], bbox[3] - bbox[1]);
        let (cx, cy) = ((bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0);
        let scale = LMK_SIZE as f32 / (w.max(h) * 1.5);
        let half = (LMK_SIZE / 2) as f32;
        let plane = LMK_SIZE * LMK_SIZE;
        let mut input = vec![0f32; 3 * plane];
        for v in 0..LMK_SIZE {
            for u in 0..LMK_SIZE {
                let sx = (u as f32 - half) / scale + cx;
                let sy = (v as f32 - half) / scale + cy;
                if sx < 0.0 || sy < 0.0 || sx > (width - 1) as f32 || sy > (height - 1) as f32 {
                    continue;
                }
                let px = super::bilinear(frame, width, height, f64::from(sx), f64::from(sy));
                for c in 0..3 {
                    input[c * plane + v * LMK_SIZE + u] = px[c];
                }
            }
        }
        let tensor = TensorRef::from_array_view(([1, 3, LMK_SIZE, LMK_SIZE], input.as_slice()))
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let outputs = self
            .lmk
            .run(ort::inputs![tensor])
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let (_, pred) = output_f32(&outputs, 0)?;
        if pred.len() < 212 {
            return Err(FaceError::Inference(format!(
                "landmark model returned {} values, expected 212",
                pred.len()
            )));
        }
        let pred = &pred[pred.len() - 212..];
        Ok((0..106)
            .map(|i| {
                let qx = (pred[2 * i] + 1.0) * half;
                let qy = (pred[2 * i + 1] + 1.0) * half;
                [(qx - half) / scale + cx, (qy - half) / scale + cy]
            })
            .collect())
    }
}

impl Detector for InsightFace {
    fn name(&self) -> &'static str {
        "insightface-scrfd10g-2d106"
    }

    fn layout(&self) -> Layout {
        Layout::Dense106
    }

    fn needs_frames(&self) -> bool {
        true
    }

    fn input_spec(&self, width: u32, height: u32) -> InputSpec {
        let (in_w, in_h, scale) = InputSpec::fit(width, height, self.det_size, 0);
        InputSpec {
            in_w,
            in_h,
            scale,
            layout: TensorLayout::Nchw,
            bgr: false,
            mean: [127.5; 3],
            std: [128.0; 3],
            pad: [0, 0, 0],
        }
    }

    fn detect(
        &mut self,
        batch: &Batch,
        spec: &InputSpec,
        width: u32,
        height: u32,
    ) -> Result<Vec<Vec<Detection>>> {
        let per = spec.len();
        let mut out = Vec::with_capacity(batch.count);
        for f in 0..batch.count {
            let mut dets = self.scrfd(&batch.input[f * per..(f + 1) * per], spec)?;
            let frame = batch
                .frames
                .get(f)
                .ok_or_else(|| FaceError::Inference("frame missing from batch".into()))?;
            for d in &mut dets {
                d.landmarks = self.landmarks106(frame, width as usize, height as usize, &d.bbox)?;
            }
            out.push(dets);
        }
        Ok(out)
    }
}
