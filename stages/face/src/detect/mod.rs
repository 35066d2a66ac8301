//! Face detectors with landmarks on ONNX Runtime: model-specific input preparation
//! ([`InputSpec`], run on the decoder thread), batched inference, our own anchor
//! decoding and non-maximum suppression.

mod blazeface;
mod insightface;
pub mod mesh;
mod retinaface;
pub mod session;

use std::path::PathBuf;

pub use blazeface::BlazeFace;
pub use insightface::InsightFace;
pub use retinaface::RetinaFace;

use crate::error::Result;
use crate::geometry::bbox;

/// One detected face in frame pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// `[x1, y1, x2, y2]`.
    pub bbox: [f32; 4],
    /// Detector confidence in [0, 1].
    pub score: f32,
    /// Landmarks in the detector's [`Layout`].
    pub landmarks: Vec<[f32; 2]>,
}

/// Which landmarks a detector returns (decides how alignment anchors are derived).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// RetinaFace / SCRFD: image-left eye, image-right eye, nose tip, mouth corners.
    Five,
    /// BlazeFace: image-left eye, image-right eye, nose tip, mouth centre, two ear points.
    Six,
    /// InsightFace 2d106det.
    Dense106,
    /// A 5- or 6-point detector's points followed by the three face-mesh anchors
    /// (image-left brow, image-right brow, nose; [`mesh::MeshAnchors`]).
    FiveMesh,
}

/// Tensor layout of a model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorLayout {
    /// `[B, 3, H, W]`.
    Nchw,
    /// `[B, H, W, 3]`.
    Nhwc,
}

/// How one frame becomes model input: scaled with its aspect kept into the top-left of
/// an `in_w` x `in_h` canvas, the rest filled with `pad`, then `(px - mean) / std` per
/// channel (RGB order, or BGR when `bgr`).
#[derive(Debug, Clone, PartialEq)]
pub struct InputSpec {
    /// Model input width.
    pub in_w: usize,
    /// Model input height.
    pub in_h: usize,
    /// Input pixels per frame pixel.
    pub scale: f64,
    /// Tensor layout.
    pub layout: TensorLayout,
    /// Channel order blue, green, red.
    pub bgr: bool,
    /// Subtracted per channel (in the model's channel order).
    pub mean: [f32; 3],
    /// Divisor per channel.
    pub std: [f32; 3],
    /// Raw RGB value of the canvas outside the frame.
    pub pad: [u8; 3],
    /// How the frame is resampled to the input size.
    pub resize: Resize,
}

/// Resampling of a frame into the detector input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Box averaging for strong down-scaling, then bilinear in floats (our default).
    BoxBilinear,
    /// OpenCV's `resize` with `INTER_LINEAR` on 8-bit pixels into the top-left
    /// `width` x `height` of the canvas (no anti-aliasing, 11-bit fixed-point weights,
    /// results rounded to 8 bits), as InsightFace's SCRFD preprocessing does.
    CvLinear {
        /// Width of the resized frame.
        width: usize,
        /// Height of the resized frame.
        height: usize,
    },
}

impl InputSpec {
    /// Floats per prepared frame.
    pub fn len(&self) -> usize {
        self.in_w * self.in_h * 3
    }

    /// Whether the spec describes an empty input.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fits a `width` x `height` frame into `target` x `target` (scaled so the longer side
    /// fits), with the canvas rounded up to a multiple of `align` (0 = exactly `target`
    /// square).
    pub fn fit(width: u32, height: u32, target: u32, align: u32) -> (usize, usize, f64) {
        let scale = f64::from(target) / f64::from(width.max(height));
        if align == 0 {
            return (target as usize, target as usize, scale);
        }
        let round_up = |v: f64| -> usize {
            let v = v.round().max(1.0) as u32;
            v.div_ceil(align) as usize * align as usize
        };
        (
            round_up(f64::from(width) * scale),
            round_up(f64::from(height) * scale),
            scale,
        )
    }

    /// Appends one prepared frame (RGB24, `width` x `height`) to `out`. Strong
    /// down-scaling first averages integer `k` x `k` boxes (anti-aliasing), then samples
    /// bilinearly with precomputed taps.
    pub fn prepare(&self, frame: &[u8], width: usize, height: usize, out: &mut Vec<f32>) {
        if let Resize::CvLinear {
            width: nw,
            height: nh,
        } = self.resize
        {
            self.prepare_cv(frame, width, height, nw, nh, out);
            return;
        }
        let start = out.len();
        out.resize(start + self.len(), 0.0);
        let dst = &mut out[start..];
        let order: [usize; 3] = if self.bgr { [2, 1, 0] } else { [0, 1, 2] };
        let k = ((1.0 / self.scale).floor() as usize).max(1);
        let (src, sw, sh) = box_reduce(frame, width, height, k);
        // Source position of output pixel centres, in reduced pixels.
        let step = 1.0 / (self.scale * k as f64);
        let vis_w = ((width as f64 * self.scale).round() as usize).min(self.in_w);
        let vis_h = ((height as f64 * self.scale).round() as usize).min(self.in_h);
        let taps = |n_out: usize, n_src: usize| -> Vec<(usize, usize, f32)> {
            (0..n_out)
                .map(|i| {
                    let s = ((i as f64 + 0.5) * step - 0.5).clamp(0.0, (n_src - 1) as f64);
                    let i0 = s.floor() as usize;
                    (i0, (i0 + 1).min(n_src - 1), (s - i0 as f64) as f32)
                })
                .collect()
        };
        let (xt, yt) = (taps(vis_w, sw), taps(vis_h, sh));
        let scale_c = [0, 1, 2].map(|c| 1.0 / self.std[c]);
        let pad: [f32; 3] =
            [0, 1, 2].map(|c| (f32::from(self.pad[order[c]]) - self.mean[c]) * scale_c[c]);
        let plane = self.in_w * self.in_h;
        let mut put = |x: usize, y: usize, c: usize, v: f32| {
            let idx = match self.layout {
                TensorLayout::Nchw => c * plane + y * self.in_w + x,
                TensorLayout::Nhwc => (y * self.in_w + x) * 3 + c,
            };
            dst[idx] = v;
        };
        // Padding first (right of and below the visible frame), then the frame itself.
        for y in 0..self.in_h {
            let from = if y < vis_h { vis_w } else { 0 };
            for x in from..self.in_w {
                for (c, &v) in pad.iter().enumerate() {
                    put(x, y, c, v);
                }
            }
        }
        for (y, &(y0, y1, fy)) in yt.iter().enumerate() {
            let (r0, r1) = (y0 * sw, y1 * sw);
            for (x, &(x0, x1, fx)) in xt.iter().enumerate() {
                for (c, &sc) in order.iter().enumerate() {
                    let top = src[(r0 + x0) * 3 + sc] * (1.0 - fx) + src[(r0 + x1) * 3 + sc] * fx;
                    let bot = src[(r1 + x0) * 3 + sc] * (1.0 - fx) + src[(r1 + x1) * 3 + sc] * fx;
                    let v = top * (1.0 - fy) + bot * fy;
                    put(x, y, c, (v - self.mean[c]) * scale_c[c]);
                }
            }
        }
    }
}

impl InputSpec {
    /// [`Resize::CvLinear`]: resize to `nw` x `nh` 8-bit pixels, pad, normalise.
    fn prepare_cv(
        &self,
        frame: &[u8],
        width: usize,
        height: usize,
        nw: usize,
        nh: usize,
        out: &mut Vec<f32>,
    ) {
        let (nw, nh) = (nw.min(self.in_w), nh.min(self.in_h));
        let resized = cv_resize_linear(frame, width, height, nw, nh);
        let order: [usize; 3] = if self.bgr { [2, 1, 0] } else { [0, 1, 2] };
        let start = out.len();
        out.resize(start + self.len(), 0.0);
        let dst = &mut out[start..];
        let plane = self.in_w * self.in_h;
        for y in 0..self.in_h {
            for x in 0..self.in_w {
                for (c, &sc) in order.iter().enumerate() {
                    let raw = if x < nw && y < nh {
                        resized[(y * nw + x) * 3 + sc]
                    } else {
                        self.pad[sc]
                    };
                    let v = (f32::from(raw) - self.mean[c]) / self.std[c];
                    let idx = match self.layout {
                        TensorLayout::Nchw => c * plane + y * self.in_w + x,
                        TensorLayout::Nhwc => (y * self.in_w + x) * 3 + c,
                    };
                    dst[idx] = v;
                }
            }
        }
    }
}

/// OpenCV's `cv::resize(src, dst, (dw, dh), INTER_LINEAR)` for 8-bit, 3-channel images:
/// pixel-centre mapping `s = (d + 0.5) * src / dst - 0.5`, clamped at the borders, weights
/// in 11-bit fixed point, the two passes rounded once at the end (the scalar path of
/// OpenCV; its SIMD path may round a value 1 level differently).
pub fn cv_resize_linear(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
    const ONE: i32 = 2048;
    let taps = |n_dst: usize, n_src: usize| -> Vec<(usize, usize, i32)> {
        let scale = n_src as f64 / n_dst as f64;
        (0..n_dst)
            .map(|d| {
                let f = (d as f64 + 0.5) * scale - 0.5;
                let mut i = f.floor() as i64;
                let mut frac = f - i as f64;
                if i < 0 {
                    i = 0;
                    frac = 0.0;
                }
                if i as usize >= n_src - 1 {
                    i = n_src as i64 - 1;
                    frac = 0.0;
                }
                let i = i as usize;
                let w0 = ((1.0 - frac) * f64::from(ONE)).round() as i32;
                (i, (i + 1).min(n_src - 1), w0)
            })
            .collect()
    };
    let (xt, yt) = (taps(dw, sw), taps(dh, sh));
    let mut out = vec![0u8; dw * dh * 3];
    let mut row0 = vec![0i32; dw * 3];
    let mut row1 = vec![0i32; dw * 3];
    let hrow = |y: usize, buf: &mut [i32]| {
        let r = &src[y * sw * 3..(y + 1) * sw * 3];
        for (x, &(x0, x1, w0)) in xt.iter().enumerate() {
            for c in 0..3 {
                buf[x * 3 + c] =
                    i32::from(r[x0 * 3 + c]) * w0 + i32::from(r[x1 * 3 + c]) * (ONE - w0);
            }
        }
    };
    for (y, &(y0, y1, w0)) in yt.iter().enumerate() {
        hrow(y0, &mut row0);
        hrow(y1, &mut row1);
        let o = &mut out[y * dw * 3..(y + 1) * dw * 3];
        for (i, v) in o.iter_mut().enumerate() {
            let acc = i64::from(row0[i]) * i64::from(w0) + i64::from(row1[i]) * i64::from(ONE - w0);
            *v = ((acc + (1 << 21)) >> 22).clamp(0, 255) as u8;
        }
    }
    out
}

/// Averages `k` x `k` boxes of an RGB24 frame into f32 RGB (`k = 1`: a plain copy).
fn box_reduce(frame: &[u8], width: usize, height: usize, k: usize) -> (Vec<f32>, usize, usize) {
    if k <= 1 {
        return (frame.iter().map(|&v| f32::from(v)).collect(), width, height);
    }
    let (sw, sh) = ((width / k).max(1), (height / k).max(1));
    let mut acc = vec![0u32; sw * sh * 3];
    for y in 0..(sh * k).min(height) {
        let row = &frame[y * width * 3..(y + 1) * width * 3];
        let out_row = &mut acc[(y / k) * sw * 3..(y / k + 1) * sw * 3];
        for (x, px) in row.chunks_exact(3).take(sw * k).enumerate() {
            let o = (x / k) * 3;
            out_row[o] += u32::from(px[0]);
            out_row[o + 1] += u32::from(px[1]);
            out_row[o + 2] += u32::from(px[2]);
        }
    }
    let n = (k * k) as f32;
    (acc.into_iter().map(|v| v as f32 / n).collect(), sw, sh)
}

fn bilinear(frame: &[u8], width: usize, height: usize, sx: f64, sy: f64) -> [f32; 3] {
    let sx = sx.clamp(0.0, (width - 1) as f64);
    let sy = sy.clamp(0.0, (height - 1) as f64);
    let x0 = sx.floor() as usize;
    let y0 = sy.floor() as usize;
    let x1 = (x0 + 1).min(width - 1);
    let y1 = (y0 + 1).min(height - 1);
    let fx = (sx - x0 as f64) as f32;
    let fy = (sy - y0 as f64) as f32;
    let at = |x: usize, y: usize, c: usize| f32::from(frame[(y * width + x) * 3 + c]);
    [0, 1, 2].map(|c| {
        let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
        let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
        top * (1.0 - fy) + bottom * fy
    })
}

/// A batch of frames ready for a detector.
pub struct Batch {
    /// Index of the first frame in the video.
    pub first: u64,
    /// Frames in the batch.
    pub count: usize,
    /// Prepared inputs, `count` x [`InputSpec::len`] floats.
    pub input: Vec<f32>,
    /// The raw RGB frames, kept only when the detector or a preview needs them.
    pub frames: Vec<Vec<u8>>,
}

/// A face detector with landmarks.
pub trait Detector: Send {
    /// Short name recorded in the face track.
    fn name(&self) -> &'static str;
    /// Landmark layout of its detections.
    fn layout(&self) -> Layout;
    /// Input preparation for frames of this size.
    fn input_spec(&self, width: u32, height: u32) -> InputSpec;
    /// Whether [`Detector::detect`] needs the raw frames in the batch.
    fn needs_frames(&self) -> bool {
        false
    }
    /// Detects faces in every frame of `batch` (frame pixels, sorted by score). Returns
    /// one list per frame.
    ///
    /// # Errors
    /// [`crate::error::FaceError::Inference`] when ONNX Runtime fails.
    fn detect(
        &mut self,
        batch: &Batch,
        spec: &InputSpec,
        width: u32,
        height: u32,
    ) -> Result<Vec<Vec<Detection>>>;
}

/// Which detector to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetectorKind {
    /// RetinaFace mobilenet0.25 (default).
    RetinaFace,
    /// MediaPipe BlazeFace short range (128 px).
    BlazeFaceFront,
    /// MediaPipe BlazeFace full range (256 px).
    BlazeFaceBack,
    /// InsightFace SCRFD + 2d106det from user-supplied files.
    InsightFace {
        /// `det_10g.onnx`.
        det: PathBuf,
        /// `2d106det.onnx`.
        landmarks: PathBuf,
    },
}

/// Greedy non-maximum suppression: sorts by score and drops boxes overlapping a kept
/// box by more than `iou`.
pub fn nms(mut dets: Vec<Detection>, iou: f32) -> Vec<Detection> {
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut keep: Vec<Detection> = Vec::with_capacity(dets.len().min(16));
    for d in dets {
        if keep.iter().all(|k| bbox::iou(&k.bbox, &d.bbox) <= iou) {
            keep.push(d);
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(b: [f32; 4], s: f32) -> Detection {
        Detection {
            bbox: b,
            score: s,
            landmarks: vec![],
        }
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes() {
        let kept = nms(
            vec![
                det([0.0, 0.0, 10.0, 10.0], 0.8),
                det([1.0, 1.0, 11.0, 11.0], 0.9),
                det([50.0, 50.0, 60.0, 60.0], 0.7),
            ],
            0.4,
        );
        assert_eq!(kept.len(), 2);
        assert_eq!(kept[0].score, 0.9);
        assert_eq!(kept[1].score, 0.7);
    }

    #[test]
    fn fit_keeps_aspect_and_aligns() {
        let (w, h, s) = InputSpec::fit(1920, 1080, 640, 32);
        assert_eq!((w, h), (640, 384));
        assert!((s - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(InputSpec::fit(1280, 720, 128, 0).0, 128);
    }

    #[test]
    fn prepare_normalises_pads_and_orders_channels() {
        // 2x1 frame: red, blue; scaled 1:1 into a 3x2 canvas.
        let frame = [255u8, 0, 0, 0, 0, 255];
        let spec = InputSpec {
            in_w: 3,
            in_h: 2,
            scale: 1.0,
            layout: TensorLayout::Nchw,
            bgr: true,
            mean: [0.0; 3],
            std: [1.0; 3],
            pad: [7, 8, 9],
            resize: Resize::BoxBilinear,
        };
        let mut out = Vec::new();
        spec.prepare(&frame, 2, 1, &mut out);
        // Channel 0 is blue.
        assert_eq!(&out[0..3], &[0.0, 255.0, 9.0]);
        // Channel 2 is red.
        assert_eq!(&out[12..15], &[255.0, 0.0, 7.0]);
        // Second row is padding.
        assert_eq!(out[3], 9.0);
    }
}
