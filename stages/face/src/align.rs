//! LatentSync's alignment: three anchors (eyebrow centres and nose) fitted by a
//! similarity transform onto the profile's template, with the translation "bias" EMA.
//!
//! # Anchors from 5 or 6 landmarks
//!
//! The reference takes its anchors from InsightFace's 106 landmarks: the means of the two
//! eyebrows (indices 43, 48, 49, 51, 50 and 101..105) and of four nose points (74, 77,
//! 83, 86: bridge, both nostril wings, tip). RetinaFace and BlazeFace give eye centres
//! and the nose tip instead, so the anchors are derived in the face's own frame: with
//! `el`, `er` the image-left and image-right eye, `d = |er - el|`, `u` the unit vector
//! from `el` to `er` and `v` the perpendicular pointing down the face,
//!
//! - left eyebrow  = `el - BROW_OUT * d * u - BROW_UP * d * v`
//! - right eyebrow = `er + BROW_OUT * d * u - BROW_UP * d * v`
//! - nose          = `m + NOSE_T * (nose_tip - m)`, `m` the midpoint of the eyes.
//!
//! The constants were calibrated on the test portrait (`astronaut.png`): its eyebrow
//! centres (mean of the visible brow arc) and the mean of its nose bridge, nostril wings
//! and tip were read off the image at 8-10x zoom and compared with RetinaFace's eye and
//! nose-tip landmarks on the same image (README, "Alignment anchors"). They are
//! anthropometrically plausible for a frontal face (brows about a quarter of the
//! inter-ocular distance above the eyes, the nose centroid about four fifths of the way
//! from the eye line to the tip). The 106-point path uses the reference's exact indices
//! and rounding.

use crate::detect::Layout;
use crate::geometry::{Affine, Point, similarity};

/// Eyebrow centre: outward shift along the eye axis, in inter-ocular distances.
pub const BROW_OUT: f64 = 0.035;
/// Eyebrow centre: height above the eye centre, in inter-ocular distances.
pub const BROW_UP: f64 = 0.26;
/// Nose anchor: fraction of the way from the eye midpoint to the nose tip.
pub const NOSE_T: f64 = 0.75;

const BROW_LEFT_106: [usize; 5] = [43, 48, 49, 51, 50];
const BROW_RIGHT_106: [usize; 5] = [101, 102, 103, 104, 105];
const NOSE_106: [usize; 4] = [74, 77, 83, 86];

/// The crop geometry of a model profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Profile name.
    pub profile: String,
    /// Crop-box width.
    pub crop_w: u32,
    /// Crop-box height.
    pub crop_h: u32,
    /// Model resolution the crop box is resized to.
    pub resolution: u32,
    /// Template points (left eyebrow, right eyebrow, nose) in crop-box pixels.
    pub template: [Point; 3],
    /// Weight of the previous translation bias in the EMA (0.2).
    pub smoothing: f64,
}

/// The three alignment anchors of a detection, or `None` if its landmarks do not fit
/// the layout.
pub fn anchors(layout: Layout, landmarks: &[[f32; 2]]) -> Option<[Point; 3]> {
    let p = |i: usize| -> Option<Point> {
        landmarks.get(i).map(|q| [f64::from(q[0]), f64::from(q[1])])
    };
    match layout {
        Layout::Five | Layout::Six => {
            let (el, er, tip) = (p(0)?, p(1)?, p(2)?);
            Some(anchors_from_eyes_nose(el, er, tip))
        }
        Layout::FiveMesh => {
            let n = landmarks.len().checked_sub(3).filter(|&n| n >= 2)?;
            Some([p(n)?, p(n + 1)?, p(n + 2)?])
        }
        Layout::Dense106 => {
            if landmarks.len() < 106 {
                return None;
            }
            let mean = |idx: &[usize]| -> Point {
                let n = idx.len() as f64;
                // The reference rounds the landmarks to integers, then the means, both
                // with `np.round` (halves to even).
                let (sx, sy) = idx.iter().fold((0.0, 0.0), |(x, y), &i| {
                    (
                        x + f64::from(landmarks[i][0]).round_ties_even(),
                        y + f64::from(landmarks[i][1]).round_ties_even(),
                    )
                });
                [(sx / n).round_ties_even(), (sy / n).round_ties_even()]
            };
            Some([mean(&BROW_LEFT_106), mean(&BROW_RIGHT_106), mean(&NOSE_106)])
        }
    }
}

/// Eyebrow centres and nose anchor from the eye centres and nose tip (see module docs).
pub fn anchors_from_eyes_nose(el: Point, er: Point, tip: Point) -> [Point; 3] {
    let (dx, dy) = (er[0] - el[0], er[1] - el[1]);
    let d = (dx * dx + dy * dy).sqrt().max(1e-6);
    let u = [dx / d, dy / d];
    let v = [-u[1], u[0]];
    let m = [(el[0] + er[0]) / 2.0, (el[1] + er[1]) / 2.0];
    let brow_l = [
        el[0] - BROW_OUT * d * u[0] - BROW_UP * d * v[0],
        el[1] - BROW_OUT * d * u[1] - BROW_UP * d * v[1],
    ];
    let brow_r = [
        er[0] + BROW_OUT * d * u[0] - BROW_UP * d * v[0],
        er[1] + BROW_OUT * d * u[1] - BROW_UP * d * v[1],
    ];
    let nose = [
        m[0] + NOSE_T * (tip[0] - m[0]),
        m[1] + NOSE_T * (tip[1] - m[1]),
    ];
    [brow_l, brow_r, nose]
}

/// Per-video alignment state (the reference's `AlignRestore.p_bias`).
#[derive(Debug, Clone)]
pub struct Aligner {
    template: [Point; 3],
    smoothing: f64,
    prev_bias: Option<Point>,
}

impl Aligner {
    /// A fresh aligner for one video.
    pub fn new(geometry: &Geometry) -> Self {
        Self {
            template: geometry.template,
            smoothing: geometry.smoothing,
            prev_bias: None,
        }
    }

    /// The frame -> crop-box matrix for the next frame's anchors, with the smoothed
    /// translation bias added (`smoothing * previous + (1 - smoothing) * current`).
    pub fn align(&mut self, anchors: &[Point; 3]) -> Option<Affine> {
        let fit = similarity(anchors, &self.template)?;
        let bias = match self.prev_bias {
            None => fit.bias,
            Some(p) => [
                p[0] * self.smoothing + fit.bias[0] * (1.0 - self.smoothing),
                p[1] * self.smoothing + fit.bias[1] * (1.0 - self.smoothing),
            ],
        };
        self.prev_bias = Some(bias);
        let mut m = fit.matrix;
        m[0][2] += bias[0];
        m[1][2] += bias[1];
        Some(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::apply;

    fn geometry() -> Geometry {
        Geometry {
            profile: "tiny".into(),
            crop_w: 210,
            crop_h: 280,
            resolution: 256,
            template: [[47.6, 56.0], [162.4, 56.0], [105.0, 112.0]],
            smoothing: 0.2,
        }
    }

    #[test]
    fn anchors_follow_rotation_of_the_eyes() {
        let upright = anchors_from_eyes_nose([100.0, 100.0], [140.0, 100.0], [120.0, 125.0]);
        assert!(
            upright[0][1] < 100.0 && upright[1][1] < 100.0,
            "brows above the eyes"
        );
        assert!(
            upright[0][0] < 100.0 && upright[1][0] > 140.0,
            "brows slightly outward"
        );
        assert!(upright[2][1] > 110.0 && upright[2][1] < 125.0);
        // Rotated by 90° (eyes vertical): the brows move to the side.
        let turned = anchors_from_eyes_nose([100.0, 100.0], [100.0, 140.0], [75.0, 120.0]);
        assert!(turned[0][0] > 100.0 && turned[1][0] > 100.0);
    }

    #[test]
    fn aligner_maps_anchors_near_the_template_and_smooths_translation() {
        let mut a = Aligner::new(&geometry());
        let anchors = anchors_from_eyes_nose([200.0, 100.0], [240.0, 100.0], [220.0, 125.0]);
        let m0 = a.align(&anchors).unwrap();
        for (k, t) in geometry().template.iter().enumerate() {
            let q = apply(&m0, anchors[k]);
            assert!(
                (q[0] - t[0]).abs() < 12.0 && (q[1] - t[1]).abs() < 12.0,
                "{q:?} vs {t:?}"
            );
        }
        // Same anchors again: identical matrix (the EMA of a constant bias is constant).
        let m1 = a.align(&anchors).unwrap();
        for r in 0..2 {
            for c in 0..3 {
                assert!((m0[r][c] - m1[r][c]).abs() < 1e-9);
            }
        }
        // A pan by 10 px shifts the translation by -10 * scale (plus the bias change).
        let moved = anchors.map(|p| [p[0] + 10.0, p[1]]);
        let m2 = a.align(&moved).unwrap();
        let expected = m1[0][2] - 10.0 * m1[0][0];
        assert!(
            (m2[0][2] - expected).abs() < 0.5,
            "{} vs {expected}",
            m2[0][2]
        );
    }

    #[test]
    fn dense_106_uses_the_reference_indices() {
        let mut lm = vec![[0.0f32, 0.0]; 106];
        for i in BROW_LEFT_106 {
            lm[i] = [10.0, 20.0];
        }
        for i in BROW_RIGHT_106 {
            lm[i] = [50.0, 20.0];
        }
        for i in NOSE_106 {
            lm[i] = [30.4, 40.6];
        }
        let a = anchors(Layout::Dense106, &lm).unwrap();
        assert_eq!(a, [[10.0, 20.0], [50.0, 20.0], [30.0, 41.0]]);
        // Halves go to even, as `np.round` does: 2.5 -> 2, 3.5 -> 4, -0.5 -> -0; and the
        // mean 10.5 of the brow (10, 10, 11, 11, 10.5 -> 10) -> 10.
        for (k, i) in BROW_LEFT_106.into_iter().enumerate() {
            lm[i] = [[10.0, 10.0, 11.0, 11.0, 10.5][k], 2.5];
        }
        for i in NOSE_106 {
            lm[i] = [3.5, -0.5];
        }
        let a = anchors(Layout::Dense106, &lm).unwrap();
        assert_eq!(a[0], [10.0, 2.0]);
        assert_eq!(a[2], [4.0, 0.0]);
        // 11, 11, 11.5 (-> 12), 12: the mean 11.5 goes to 12.
        let mut lm2 = lm.clone();
        for (k, i) in NOSE_106.into_iter().enumerate() {
            lm2[i] = [[11.0, 11.0, 11.5, 12.0][k], 0.0];
        }
        assert_eq!(anchors(Layout::Dense106, &lm2).unwrap()[2], [12.0, 0.0]);
        assert!(anchors(Layout::Dense106, &lm[..10]).is_none());
    }
}
