//! The LatentSync-faithful InsightFace pair, from files the user supplies (the
//! `buffalo_l` pack is under a non-commercial licence, so it is never downloaded here).
//! The preprocessing reproduces what the reference's InsightFace calls do with the RGB
//! frames LatentSync hands them (InsightFace expects BGR and swaps the channels for its
//! networks, so the networks of the reference see **BGR**):
//! - SCRFD `det_10g.onnx` at `det_size` 512: the frame is resized with OpenCV's 8-bit
//!   `INTER_LINEAR` (no anti-aliasing) to [`scrfd_fit`]'s size (the longer side to
//!   `det_size`, the other truncated to an integer, scale = resized height / frame height)
//!   into the top-left of a black square, then `(px - 127.5) / 128` in BGR order; 9
//!   outputs (scores, box distances, 5 keypoints for strides 8, 16, 32; 2 anchors per cell
//!   at `(x, y) * stride`; distances times stride), threshold 0.5, NMS 0.4;
//! - `2d106det.onnx`: [`landmark_crop`], a 192x192 OpenCV `warpAffine` (`INTER_LINEAR`,
//!   1/32-pixel fixed-point source positions, black border) of the frame scaled by
//!   `192 / (1.5 x longer box side)` around the box centre, raw BGR 0..255 (the graph
//!   normalises itself); output 212 values in [-1, 1] -> `(v + 1) * 96` crop pixels,
//!   mapped back through the inverse warp.
//!
//! The landmarks are then rounded half to even, as the reference's `np.round` does.
//! No registry package ships these two model files, so this path is tested on its
//! preprocessing only (unit tests below) and is otherwise **unverified**.

use std::path::Path;

use ort::session::Session;
use ort::value::TensorRef;

use super::session::{SessionOptions, load, output_f32};
use super::{Batch, Detection, Detector, InputSpec, Layout, Resize, TensorLayout, nms};
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
        let (input, scale, cx, cy) = landmark_crop(frame, width, height, bbox);
        let half = (LMK_SIZE / 2) as f32;
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
        let (nw, nh, scale) = scrfd_fit(width, height, self.det_size);
        InputSpec {
            in_w: self.det_size as usize,
            in_h: self.det_size as usize,
            scale,
            layout: TensorLayout::Nchw,
            bgr: true,
            mean: [127.5; 3],
            std: [128.0; 3],
            pad: [0, 0, 0],
            resize: Resize::CvLinear {
                width: nw,
                height: nh,
            },
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

/// SCRFD's resize of a `width` x `height` frame for a square `det_size` input: the
/// resized width and height and the scale (resized height / frame height), computed as
/// InsightFace does (the shorter side truncated towards zero).
pub fn scrfd_fit(width: u32, height: u32, det_size: u32) -> (usize, usize, f64) {
    let ratio = f64::from(height) / f64::from(width);
    let s = f64::from(det_size);
    let (nw, nh) = if ratio > 1.0 {
        ((s / ratio) as usize, det_size as usize)
    } else {
        (det_size as usize, (s * ratio) as usize)
    };
    let nh = nh.max(1);
    (nw.max(1), nh, nh as f64 / f64::from(height))
}

/// The 2d106det input for a face box: `[3, 192, 192]` raw BGR values of the frame
/// (RGB24) warped as OpenCV's `warpAffine` does it (destination pixel `(u, v)` samples
/// source `((u - 96) / scale + cx, (v - 96) / scale + cy)`, positions rounded to 1/32
/// pixel, bilinear weights in 15-bit fixed point, pixels outside the frame black, the
/// result rounded to 8 bits). Returns the tensor, the scale and the box centre.
pub fn landmark_crop(
    frame: &[u8],
    width: usize,
    height: usize,
    bbox: &[f32; 4],
) -> (Vec<f32>, f32, f32, f32) {
    const TAB: f64 = 32.0;
    const W_ONE: i64 = 1 << 15;
    let (w, h) = (bbox[2] - bbox[0], bbox[3] - bbox[1]);
    let (cx, cy) = ((bbox[0] + bbox[2]) / 2.0, (bbox[1] + bbox[3]) / 2.0);
    let scale = LMK_SIZE as f32 / (w.max(h) * 1.5);
    let half = (LMK_SIZE / 2) as f64;
    let (s, cxd, cyd) = (f64::from(scale), f64::from(cx), f64::from(cy));
    let plane = LMK_SIZE * LMK_SIZE;
    let mut input = vec![0f32; 3 * plane];
    let px = |x: i64, y: i64, c: usize| -> i64 {
        if x < 0 || y < 0 || x >= width as i64 || y >= height as i64 {
            0
        } else {
            i64::from(frame[(y as usize * width + x as usize) * 3 + c])
        }
    };
    for v in 0..LMK_SIZE {
        for u in 0..LMK_SIZE {
            let sx = (u as f64 - half) / s + cxd;
            let sy = (v as f64 - half) / s + cyd;
            let (qx, qy) = ((sx * TAB).round() as i64, (sy * TAB).round() as i64);
            let (x0, y0) = (qx.div_euclid(32), qy.div_euclid(32));
            let (ax, ay) = (
                qx.rem_euclid(32) as f64 / TAB,
                qy.rem_euclid(32) as f64 / TAB,
            );
            let w01 = ((ax * (1.0 - ay)) * W_ONE as f64).round() as i64;
            let w10 = (((1.0 - ax) * ay) * W_ONE as f64).round() as i64;
            let w11 = ((ax * ay) * W_ONE as f64).round() as i64;
            let w00 = W_ONE - w01 - w10 - w11;
            for c in 0..3 {
                let acc = px(x0, y0, c) * w00
                    + px(x0 + 1, y0, c) * w01
                    + px(x0, y0 + 1, c) * w10
                    + px(x0 + 1, y0 + 1, c) * w11;
                let val = ((acc + (1 << 14)) >> 15).clamp(0, 255);
                // Network channel order is BGR.
                input[(2 - c) * plane + v * LMK_SIZE + u] = val as f32;
            }
        }
    }
    (input, scale, cx, cy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::cv_resize_linear;

    #[test]
    fn scrfd_fit_truncates_like_the_reference() {
        assert_eq!(scrfd_fit(1920, 1080, 512), (512, 288, 288.0 / 1080.0));
        assert_eq!(scrfd_fit(1280, 720, 512), (512, 288, 0.4));
        // 563 * 512 / 1000 = 288.256 -> 288; the scale is 288 / 563, not 512 / 1000.
        let (w, h, s) = scrfd_fit(1000, 563, 512);
        assert_eq!((w, h), (512, 288));
        assert!((s - 288.0 / 563.0).abs() < 1e-12);
        // Portrait: the width is the truncated side.
        let (w, h, s) = scrfd_fit(720, 1280, 512);
        assert_eq!((w, h), (288, 512));
        assert!((s - 0.4).abs() < 1e-12);
        assert_eq!(scrfd_fit(512, 512, 512), (512, 512, 1.0));
    }

    #[test]
    fn scrfd_input_is_bgr_cv_linear_and_black_padded() {
        // 4x2 frame, pure red on the left half, pure blue on the right, into 4x4 at
        // det_size 4: no scaling, the lower half is padding.
        let mut frame = Vec::new();
        for _ in 0..2 {
            for x in 0..4 {
                frame.extend_from_slice(if x < 2 { &[255, 0, 0] } else { &[0, 0, 255] });
            }
        }
        let spec = InputSpec {
            in_w: 4,
            in_h: 4,
            scale: 1.0,
            layout: TensorLayout::Nchw,
            bgr: true,
            mean: [127.5; 3],
            std: [128.0; 3],
            pad: [0, 0, 0],
            resize: Resize::CvLinear {
                width: 4,
                height: 2,
            },
        };
        let mut out = Vec::new();
        spec.prepare(&frame, 4, 2, &mut out);
        let hi = (255.0 - 127.5) / 128.0;
        let lo = -127.5 / 128.0;
        // Channel 0 is blue: high on the right half.
        assert_eq!(&out[0..4], &[lo, lo, hi, hi]);
        // Channel 2 is red.
        assert_eq!(&out[32..36], &[hi, hi, lo, lo]);
        // Row 2 is black padding.
        assert_eq!(out[8], lo);
    }

    #[test]
    fn cv_linear_resize_matches_opencv_values() {
        // Halving a row 0, 100, 200, 255 (pixel-centre mapping): (0+100)/2, (200+255)/2
        // = 50 and 227.5 -> 228 (rounded in fixed point).
        let src: Vec<u8> = [0u8, 100, 200, 255]
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect();
        let out = cv_resize_linear(&src, 4, 1, 2, 1);
        assert_eq!(out, [50, 50, 50, 228, 228, 228]);
        // Up-scaling 2 -> 4: positions -0.25 (clamped), 0.25, 0.75, 1.25 (clamped).
        let src: Vec<u8> = [0u8, 200].iter().flat_map(|&v| [v, v, v]).collect();
        let out = cv_resize_linear(&src, 2, 1, 4, 1);
        let r: Vec<u8> = out.chunks(3).map(|p| p[0]).collect();
        assert_eq!(r, [0, 50, 150, 200]);
        // No anti-aliasing: a 4x down-scale samples between two pixels, not the average
        // of four.
        let src: Vec<u8> = [0u8, 0, 255, 255, 0, 0, 0, 0]
            .iter()
            .flat_map(|&v| [v, v, v])
            .collect();
        let out = cv_resize_linear(&src, 8, 1, 2, 1);
        assert_eq!(out[0], 128);
        assert_eq!(out[3], 0);
    }

    #[test]
    fn landmark_crop_centres_the_box_in_bgr_with_black_outside() {
        // A 100x100 frame: red with a green pixel at the box centre (50, 50).
        let (w, h) = (100usize, 100usize);
        let mut frame = vec![0u8; w * h * 3];
        for p in frame.chunks_exact_mut(3) {
            p.copy_from_slice(&[200, 0, 0]);
        }
        frame[(50 * w + 50) * 3..(50 * w + 50) * 3 + 3].copy_from_slice(&[0, 255, 0]);
        // Box 64 px wide around (50, 50): scale 192 / 96 = 2.
        let (input, scale, cx, cy) = landmark_crop(&frame, w, h, &[18.0, 18.0, 82.0, 82.0]);
        assert_eq!((scale, cx, cy), (2.0, 50.0, 50.0));
        let plane = LMK_SIZE * LMK_SIZE;
        let at = |c: usize, u: usize, v: usize| input[c * plane + v * LMK_SIZE + u];
        // Crop pixel (96, 96) samples frame (50, 50) exactly: green, channel 1.
        assert_eq!(at(1, 96, 96), 255.0);
        // Channel 2 is red, channel 0 blue.
        assert_eq!(at(2, 10 + 96, 96), 200.0);
        assert_eq!(at(0, 10 + 96, 96), 0.0);
        // (97, 96) samples (50.5, 50): half green.
        assert_eq!(at(1, 97, 96), 128.0);
        // Corner (0, 0) samples (2, 2): inside. The frame ends at crop x = 96 + 2 * 50
        // = 196 > 192, so every pixel is inside here; a box near the edge gets black.
        assert_eq!(at(2, 0, 0), 200.0);
        let (edge, ..) = landmark_crop(&frame, w, h, &[70.0, 18.0, 134.0, 82.0]);
        assert_eq!(edge[2 * plane + 96 * LMK_SIZE + 191], 0.0);
    }
}
