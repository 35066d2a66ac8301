//! Pasting a generated face back into its frame, as the reference's restore step does
//! (docs/architecture.md §9.4):
//!
//! 1. the R x R crop is resized to the crop box (bicubic, anti-aliased; [`CropResizer`]);
//! 2. it is inverse-warped into the frame (the 2x3 affine inverted, bilinear);
//! 3. the blend mask is the crop box warped the same way (bilinear, zero outside), eroded
//!    2x2, then eroded again with a `2*w_edge` square where
//!    `w_edge = int(sqrt(mask area)) // 20`, then Gaussian-blurred with a `2*w_edge+1`
//!    kernel and `sigma = 0.3*(w_edge - 1) + 0.8`;
//! 4. `out = soft * face + (1 - soft) * frame`.
//!
//! One deliberate difference: the reference pastes `eroded * face`, and its blur reaches
//! one or two pixels past the eroded mask on the right and bottom, where `eroded` is 0:
//! there it blends towards black (a faint dark fringe of ~2 %). Here the face's edge
//! pixels are used instead, so pixels just outside the box keep their brightness.
//!
//! All work is restricted to the bounding rectangle of the warped crop box (plus the blur
//! radius); erosion and blur are separable. Results are rounded to the nearest integer
//! (the reference truncates its fp16 values, which darkens by half a level on average).

use crate::morph::{Pad, Scratch, blur_axis0, erode_axis0, gaussian_kernel, transpose};
use crate::resize::CropResizer;

/// A half-open pixel rectangle `[x0, x1) x [y0, y1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    /// First column.
    pub x0: usize,
    /// First row.
    pub y0: usize,
    /// Column after the last.
    pub x1: usize,
    /// Row after the last.
    pub y1: usize,
}

impl Rect {
    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.x1 - self.x0
    }
    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.y1 - self.y0
    }
    /// Whether the rectangle holds no pixel.
    pub fn is_empty(&self) -> bool {
        self.x1 <= self.x0 || self.y1 <= self.y0
    }
}

/// A 2x3 affine map `(x, y) -> (a x + b y + c, d x + e y + f)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine([f64; 6]);

impl Affine {
    /// Returns the map of a face-track matrix, `None` if it has non-finite entries.
    pub fn from_rows(m: &[[f32; 3]; 2]) -> Option<Self> {
        let v = [m[0][0], m[0][1], m[0][2], m[1][0], m[1][1], m[1][2]].map(f64::from);
        v.iter().all(|x| x.is_finite()).then_some(Self(v))
    }

    /// Returns the inverse map, `None` if the matrix is (nearly) singular.
    pub fn invert(&self) -> Option<Self> {
        let [a, b, c, d, e, f] = self.0;
        let det = a * e - b * d;
        if det.abs() < 1e-12 || !det.is_finite() {
            return None;
        }
        Some(Self([
            e / det,
            -b / det,
            (b * f - c * e) / det,
            -d / det,
            a / det,
            (c * d - a * f) / det,
        ]))
    }

    /// Applies the map.
    pub fn apply(&self, x: f64, y: f64) -> (f64, f64) {
        let [a, b, c, d, e, f] = self.0;
        (a * x + b * y + c, d * x + e * y + f)
    }
}

/// Why a frame cannot be blended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlendError {
    /// The face track's matrix cannot be inverted.
    #[error("the face track has a singular or non-finite affine matrix")]
    BadAffine,
}

/// Blends generated crops into frames of one size; holds every buffer between frames.
#[derive(Debug)]
pub struct Blender {
    width: usize,
    height: usize,
    crop_w: usize,
    crop_h: usize,
    resizer: CropResizer,
    face: Vec<f32>,
    warped: Vec<f32>,
    eroded: Vec<f32>,
    center: Vec<f32>,
    soft: Vec<f32>,
    tmp: Vec<f32>,
    tmp2: Vec<f32>,
    scratch: Scratch,
    soft_rect: Rect,
    box_rect: Rect,
    reference_edge: bool,
}

/// Coverage of pixel coordinate `u` by a box `0..=n-1` under bilinear sampling with zero
/// padding (1 inside, falling linearly to 0 one pixel outside).
fn coverage(u: f64, n: usize) -> f32 {
    (u + 1.0).min(n as f64 - u).clamp(0.0, 1.0) as f32
}

impl Blender {
    /// Returns a blender for `width x height` frames, `crop_w x crop_h` crop boxes and
    /// `resolution`-square generated crops.
    pub fn new(
        width: usize,
        height: usize,
        crop_w: usize,
        crop_h: usize,
        resolution: usize,
    ) -> Self {
        Self {
            width,
            height,
            crop_w,
            crop_h,
            resizer: CropResizer::new(resolution, crop_w, crop_h),
            face: Vec::new(),
            warped: Vec::new(),
            eroded: Vec::new(),
            center: Vec::new(),
            soft: Vec::new(),
            tmp: Vec::new(),
            tmp2: Vec::new(),
            scratch: Scratch::default(),
            soft_rect: Rect::default(),
            box_rect: Rect::default(),
            reference_edge: false,
        }
    }

    /// Switches to the reference's edge (off by default): the face is pasted as
    /// `eroded * face` (the 2x2-eroded box mask times the face), so where the blur reaches
    /// past the eroded mask the frame blends towards black, as in the reference. For
    /// parity comparisons; see the module documentation.
    pub fn set_reference_edge(&mut self, on: bool) {
        self.reference_edge = on;
    }

    /// The blend mask of the last blended frame: its rectangle and values (row-major over
    /// the rectangle, 0..1); zero everywhere else.
    pub fn soft_mask(&self) -> (Rect, &[f32]) {
        (self.soft_rect, &self.soft)
    }

    /// Forgets the last mask (for frames without a face).
    pub fn clear(&mut self) {
        self.soft_rect = Rect::default();
        self.soft.clear();
    }

    /// Blends `crop` (R x R RGB24) into `frame` (RGB24) with the track's frame-to-crop-box
    /// matrix `affine`.
    ///
    /// # Errors
    /// [`BlendError::BadAffine`] when the matrix cannot be inverted.
    pub fn blend(
        &mut self,
        frame: &mut [u8],
        crop: &[u8],
        affine: &[[f32; 3]; 2],
    ) -> Result<(), BlendError> {
        let to_crop = Affine::from_rows(affine).ok_or(BlendError::BadAffine)?;
        let to_frame = to_crop.invert().ok_or(BlendError::BadAffine)?;
        self.clear();
        let Some(box_rect) = self.warped_box(&to_frame) else {
            return Ok(());
        };
        self.resizer.resize(crop, &mut self.face);
        self.box_rect = box_rect;
        self.warp_mask(&to_crop, box_rect);
        let w_edge = self.erode(box_rect);
        self.blur(box_rect, w_edge);
        self.composite(frame, &to_crop);
        Ok(())
    }

    /// Bounding rectangle (clipped to the frame) of the pixels the warped crop box can
    /// touch, `None` if it misses the frame.
    fn warped_box(&self, to_frame: &Affine) -> Option<Rect> {
        let (cw, ch) = (self.crop_w as f64, self.crop_h as f64);
        let pts =
            [(-1.0, -1.0), (cw, -1.0), (-1.0, ch), (cw, ch)].map(|(u, v)| to_frame.apply(u, v));
        let min_x = pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let max_x = pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let min_y = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let max_y = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let clip = |v: f64, n: usize| v.clamp(0.0, n as f64) as usize;
        let r = Rect {
            x0: clip(min_x.floor(), self.width),
            x1: clip(max_x.ceil() + 1.0, self.width),
            y0: clip(min_y.floor(), self.height),
            y1: clip(max_y.ceil() + 1.0, self.height),
        };
        (!r.is_empty()).then_some(r)
    }

    /// The crop box warped into the frame over `r` (bilinear coverage, zero outside).
    fn warp_mask(&mut self, to_crop: &Affine, r: Rect) {
        self.warped.clear();
        self.warped.reserve(r.width() * r.height());
        for y in r.y0..r.y1 {
            for x in r.x0..r.x1 {
                let (u, v) = to_crop.apply(x as f64, y as f64);
                self.warped
                    .push(coverage(u, self.crop_w) * coverage(v, self.crop_h));
            }
        }
    }

    /// Erodes the warped mask 2x2 (into `eroded`), measures `w_edge` and erodes again with
    /// the `2*w_edge` square (into `center`). Returns `w_edge`.
    fn erode(&mut self, r: Rect) -> usize {
        let (rows, cols) = (r.height(), r.width());
        // Beyond the rectangle: zero inside the frame, ignored outside it.
        let pad = |at_edge: bool| if at_edge { Pad::Ignore } else { Pad::Zero };
        let (top, bottom) = (pad(r.y0 == 0), pad(r.y1 == self.height));
        let (left, right) = (pad(r.x0 == 0), pad(r.x1 == self.width));
        let rect_erode = |src: &[f32], lo: isize, hi: isize, out: &mut Vec<f32>, s: &mut Self| {
            erode_axis0(
                src,
                rows,
                cols,
                lo,
                hi,
                top,
                bottom,
                &mut s.scratch,
                &mut s.tmp,
            );
            transpose(&s.tmp, rows, cols, &mut s.tmp2);
            erode_axis0(
                &s.tmp2,
                cols,
                rows,
                lo,
                hi,
                left,
                right,
                &mut s.scratch,
                &mut s.tmp,
            );
            transpose(&s.tmp, cols, rows, out);
        };
        // kornia's 2x2 erosion: anchor (1, 1), i.e. offsets -1..=0.
        let warped = std::mem::take(&mut self.warped);
        let mut eroded = std::mem::take(&mut self.eroded);
        rect_erode(&warped, -1, 0, &mut eroded, self);
        let area: f64 = eroded.iter().map(|v| f64::from(*v)).sum();
        let w_edge = (area.sqrt() as usize) / 20;
        // cv2.erode with a (2w x 2w) kernel: anchor w, offsets -w..=w-1; an empty kernel
        // (w = 0) means cv2's default 3x3.
        let (lo, hi) = if w_edge == 0 {
            (-1, 1)
        } else {
            (-(w_edge as isize), w_edge as isize - 1)
        };
        let mut center = std::mem::take(&mut self.center);
        rect_erode(&eroded, lo, hi, &mut center, self);
        self.warped = warped;
        self.eroded = eroded;
        self.center = center;
        w_edge
    }

    /// Blurs `center` (over `r`, zero elsewhere) into `soft` over `r` grown by `w_edge`.
    fn blur(&mut self, r: Rect, w_edge: usize) {
        let s = Rect {
            x0: r.x0.saturating_sub(w_edge),
            y0: r.y0.saturating_sub(w_edge),
            x1: (r.x1 + w_edge).min(self.width),
            y1: (r.y1 + w_edge).min(self.height),
        };
        let (rows, cols) = (s.height(), s.width());
        // Place center into the grown rectangle.
        self.tmp2.clear();
        self.tmp2.resize(rows * cols, 0.0);
        for y in r.y0..r.y1 {
            let src = &self.center[(y - r.y0) * r.width()..(y - r.y0 + 1) * r.width()];
            let at = (y - s.y0) * cols + (r.x0 - s.x0);
            self.tmp2[at..at + r.width()].copy_from_slice(src);
        }
        self.soft_rect = s;
        if w_edge == 0 {
            std::mem::swap(&mut self.soft, &mut self.tmp2);
            return;
        }
        let size = 2 * w_edge + 1;
        let sigma = 0.3 * ((size as f64 - 1.0) * 0.5 - 1.0) + 0.8;
        let kernel = gaussian_kernel(w_edge, sigma);
        blur_axis0(
            &self.tmp2,
            rows,
            cols,
            s.y0,
            self.height,
            &kernel,
            &mut self.tmp,
        );
        transpose(&self.tmp, rows, cols, &mut self.tmp2);
        blur_axis0(
            &self.tmp2,
            cols,
            rows,
            s.x0,
            self.width,
            &kernel,
            &mut self.tmp,
        );
        transpose(&self.tmp, cols, rows, &mut self.soft);
    }

    /// `frame = soft * face + (1 - soft) * frame` over the soft rectangle.
    fn composite(&mut self, frame: &mut [u8], to_crop: &Affine) {
        let s = self.soft_rect;
        let (cw, ch) = (self.crop_w, self.crop_h);
        for y in s.y0..s.y1 {
            let srow = &self.soft[(y - s.y0) * s.width()..(y - s.y0 + 1) * s.width()];
            for (i, &alpha) in srow.iter().enumerate() {
                if alpha <= 0.0 {
                    continue;
                }
                let x = s.x0 + i;
                let (u, v) = to_crop.apply(x as f64, y as f64);
                let face = sample(&self.face, cw, ch, u, v);
                let keep = if self.reference_edge {
                    self.eroded_at(x, y)
                } else {
                    1.0
                };
                let px = &mut frame[(y * self.width + x) * 3..(y * self.width + x) * 3 + 3];
                for c in 0..3 {
                    let out = alpha * keep * face[c] + (1.0 - alpha) * f32::from(px[c]);
                    // Non-negative after the clamp: truncating x + 0.5 rounds (and stays inline).
                    px[c] = (out + 0.5).clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
}

impl Blender {
    /// The 2x2-eroded box mask at frame pixel `(x, y)` (0 outside the box rectangle).
    fn eroded_at(&self, x: usize, y: usize) -> f32 {
        let b = self.box_rect;
        if x < b.x0 || x >= b.x1 || y < b.y0 || y >= b.y1 {
            return 0.0;
        }
        self.eroded[(y - b.y0) * b.width() + (x - b.x0)]
    }
}

/// Bilinear sample of an RGB `f32` image at `(u, v)`, clamped to the image and to 0..255.
fn sample(img: &[f32], w: usize, h: usize, u: f64, v: f64) -> [f32; 3] {
    let axis = |p: f64, n: usize| -> (usize, usize, f32) {
        let p = p.clamp(0.0, (n - 1) as f64);
        let i = (p as usize).min(n.saturating_sub(2));
        let j = (i + 1).min(n - 1);
        (i, j, (p - i as f64) as f32)
    };
    let (x0, x1, fx) = axis(u, w);
    let (y0, y1, fy) = axis(v, h);
    let at = |x: usize, y: usize, c: usize| img[(y * w + x) * 3 + c];
    let mut out = [0f32; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
        let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
        *o = (top * (1.0 - fy) + bottom * fy).clamp(0.0, 255.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A track matrix for a crop box scaled by `s` and placed at `(tx, ty)` in the frame.
    fn placed(s: f32, tx: f32, ty: f32) -> [[f32; 3]; 2] {
        // frame -> crop: u = (x - tx) / s.
        [[1.0 / s, 0.0, -tx / s], [0.0, 1.0 / s, -ty / s]]
    }

    #[test]
    fn affine_inverse_round_trips() {
        let m = Affine::from_rows(&[[0.8, -0.3, 12.0], [0.25, 0.9, -4.0]]).unwrap();
        let inv = m.invert().unwrap();
        let (u, v) = m.apply(37.0, 11.0);
        let (x, y) = inv.apply(u, v);
        assert!((x - 37.0).abs() < 1e-9 && (y - 11.0).abs() < 1e-9);
        assert!(
            Affine::from_rows(&[[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]])
                .unwrap()
                .invert()
                .is_none()
        );
        assert!(Affine::from_rows(&[[f32::NAN, 0.0, 0.0], [0.0, 1.0, 0.0]]).is_none());
    }

    #[test]
    fn face_replaces_the_centre_and_leaves_the_outside() {
        let (w, h) = (200, 160);
        let mut frame = vec![50u8; w * h * 3];
        let crop = vec![200u8; 32 * 32 * 3];
        // Crop box 42x56 scaled 1.5x at (60, 30): covers x 60..121.5, y 30..112.5.
        let mut b = Blender::new(w, h, 42, 56, 32);
        b.blend(&mut frame, &crop, &placed(1.5, 60.0, 30.0))
            .unwrap();
        let px = |x: usize, y: usize| frame[(y * w + x) * 3];
        assert_eq!(px(90, 70), 200, "centre takes the face");
        assert_eq!(px(10, 10), 50, "far outside untouched");
        assert_eq!(px(59, 70), 50, "just outside the box untouched");
        assert_eq!(px(125, 70), 50);
        // The edge is feathered: strictly between at the box border.
        let edge = px(62, 70);
        assert!(edge > 50 && edge < 200, "{edge}");
        let (r, soft) = b.soft_mask();
        assert!(!r.is_empty());
        assert!(soft.iter().all(|v| (0.0..=1.0 + 1e-6).contains(v)));
        // Mask area ~ 63*84 = 5292 -> sqrt 72 -> w_edge 3.
        assert!(r.x0 <= 60 - 3 + 1 && r.x1 >= 122);
    }

    #[test]
    fn reference_edge_darkens_just_past_the_eroded_box_only() {
        let (w, h) = (200, 160);
        let crop = vec![200u8; 32 * 32 * 3];
        let m = placed(1.5, 60.0, 30.0);
        let run = |reference: bool| {
            let mut frame = vec![100u8; w * h * 3];
            let mut b = Blender::new(w, h, 42, 56, 32);
            b.set_reference_edge(reference);
            b.blend(&mut frame, &crop, &m).unwrap();
            frame
        };
        let (ours, theirs) = (run(false), run(true));
        let px = |f: &[u8], x: usize, y: usize| f[(y * w + x) * 3];
        // Inside the box both paste the face; the centre is identical.
        assert_eq!(px(&ours, 90, 70), px(&theirs, 90, 70));
        // Right of the box (x > 121.5) the blur still reaches: ours blends towards the
        // face edge (brighter than the frame), the reference towards black (darker).
        let darker = (120..132)
            .filter(|&x| px(&theirs, x, 70) < 100)
            .collect::<Vec<_>>();
        assert!(
            !darker.is_empty(),
            "the reference edge darkens past the box"
        );
        assert!(
            darker.iter().all(|&x| px(&ours, x, 70) >= 100),
            "ours does not"
        );
        assert!(
            ours.iter().zip(&theirs).all(|(a, b)| a >= b),
            "the reference edge never brightens"
        );
    }

    #[test]
    fn soft_mask_is_symmetric_for_a_centred_box() {
        let (w, h) = (120, 120);
        let mut frame = vec![0u8; w * h * 3];
        let crop = vec![255u8; 16 * 16 * 3];
        let mut b = Blender::new(w, h, 41, 41, 16);
        b.blend(&mut frame, &crop, &placed(1.0, 40.0, 40.0))
            .unwrap();
        // The box spans 40..=80 (centre 60); the reference's even-sized erosions (2x2
        // with anchor 1, then 2w with anchor w) shift the mask by one pixel right and
        // down, so the soft mask is symmetric about 61.
        for d in 0..25 {
            let l = frame[(61 * w + 61 - d) * 3];
            let r = frame[(61 * w + 61 + d) * 3];
            assert_eq!(l, r, "d {d}");
            let t = frame[((61 - d) * w + 61) * 3];
            assert_eq!(l, t, "d {d}");
        }
        assert_eq!(frame[(61 * w + 38) * 3], 0);
        assert_eq!(frame[(61 * w + 61) * 3], 255);
    }

    #[test]
    fn a_face_at_the_frame_border_and_outside_it() {
        let (w, h) = (64, 48);
        let mut frame = vec![10u8; w * h * 3];
        let crop = vec![240u8; 8 * 8 * 3];
        let mut b = Blender::new(w, h, 30, 30, 8);
        b.blend(&mut frame, &crop, &placed(1.0, -10.0, -10.0))
            .unwrap();
        assert_eq!(frame[(5 * w + 5) * 3], 240);
        let before = frame.clone();
        b.blend(&mut frame, &crop, &placed(1.0, 500.0, 500.0))
            .unwrap();
        assert_eq!(frame, before);
        assert!(b.soft_mask().0.is_empty());
        assert_eq!(
            b.blend(&mut frame, &crop, &[[0.0; 3]; 2]),
            Err(BlendError::BadAffine)
        );
    }
}
