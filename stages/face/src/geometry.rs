//! Small 2-D geometry: boxes, IoU, 2x3 affine matrices and LatentSync's 3-point
//! similarity fit.

/// A point `[x, y]` in pixels.
pub type Point = [f64; 2];

/// A 2x3 affine matrix `[[a, b, c], [d, e, f]]`: `x' = a x + b y + c`, `y' = d x + e y + f`.
pub type Affine = [[f64; 3]; 2];

/// Box `[x1, y1, x2, y2]` helpers.
pub mod bbox {
    /// Width.
    pub fn width(b: &[f32; 4]) -> f32 {
        (b[2] - b[0]).max(0.0)
    }
    /// Height.
    pub fn height(b: &[f32; 4]) -> f32 {
        (b[3] - b[1]).max(0.0)
    }
    /// Area.
    pub fn area(b: &[f32; 4]) -> f32 {
        width(b) * height(b)
    }
    /// Intersection over union (0 for disjoint or empty boxes).
    pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
        let inter = [
            a[0].max(b[0]),
            a[1].max(b[1]),
            a[2].min(b[2]),
            a[3].min(b[3]),
        ];
        let i = area(&inter);
        let u = area(a) + area(b) - i;
        if u <= 0.0 { 0.0 } else { i / u }
    }
}

/// Applies `m` to `p`.
pub fn apply(m: &Affine, p: Point) -> Point {
    [
        m[0][0] * p[0] + m[0][1] * p[1] + m[0][2],
        m[1][0] * p[0] + m[1][1] * p[1] + m[1][2],
    ]
}

/// Returns the inverse of `m`, or `None` when it is singular.
pub fn invert(m: &Affine) -> Option<Affine> {
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    if det.abs() < 1e-12 {
        return None;
    }
    let (a, b, c, d) = (m[1][1] / det, -m[0][1] / det, -m[1][0] / det, m[0][0] / det);
    Some([
        [a, b, -(a * m[0][2] + b * m[1][2])],
        [c, d, -(c * m[0][2] + d * m[1][2])],
    ])
}

/// Linear interpolation of two matrices (used to bridge short gaps; fine for the small
/// frame-to-frame changes it is used on).
pub fn lerp_affine(a: &Affine, b: &Affine, t: f64) -> Affine {
    let mut out = [[0.0; 3]; 2];
    for r in 0..2 {
        for c in 0..3 {
            out[r][c] = a[r][c] + (b[r][c] - a[r][c]) * t;
        }
    }
    out
}

/// Result of [`similarity`]: the matrix without smoothing, and the "bias" the reference
/// smooths (the difference of the normalised third points, template minus source).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimilarityFit {
    /// Frame -> template matrix `[sR | T]`.
    pub matrix: Affine,
    /// Normalised template point 3 minus normalised source point 3.
    pub bias: Point,
}

/// LatentSync's similarity fit of three source points onto three template points
/// (Umeyama/Procrustes on centred points, each set divided by the sample standard
/// deviation of all its centred coordinates, with the reflection fix). Returns `None`
/// for degenerate input (all points equal).
pub fn similarity(src: &[Point; 3], dst: &[Point; 3]) -> Option<SimilarityFit> {
    let mean = |p: &[Point; 3]| -> Point {
        [
            (p[0][0] + p[1][0] + p[2][0]) / 3.0,
            (p[0][1] + p[1][1] + p[2][1]) / 3.0,
        ]
    };
    let (c1, c2) = (mean(src), mean(dst));
    let centred = |p: &[Point; 3], c: Point| -> [Point; 3] {
        [
            [p[0][0] - c[0], p[0][1] - c[1]],
            [p[1][0] - c[0], p[1][1] - c[1]],
            [p[2][0] - c[0], p[2][1] - c[1]],
        ]
    };
    let (p1, p2) = (centred(src, c1), centred(dst, c2));
    // torch.std over all 6 centred values (unbiased); their mean is 0.
    let std = |p: &[Point; 3]| -> f64 {
        let ss: f64 = p.iter().map(|q| q[0] * q[0] + q[1] * q[1]).sum();
        (ss / 5.0).sqrt()
    };
    let (s1, s2) = (std(&p1), std(&p2));
    if s1 < 1e-9 || s2 < 1e-9 {
        return None;
    }
    let n1: [Point; 3] = p1.map(|q| [q[0] / s1, q[1] / s1]);
    let n2: [Point; 3] = p2.map(|q| [q[0] / s2, q[1] / s2]);
    // H = n1^T n2 (2x2). The rotation maximising tr(R H^T) is R = V U^T for H = U S V^T;
    // in 2-D it is the rotation by atan2(h01 - h10, h00 + h11), which is what the SVD with
    // the reflection fix yields.
    let mut h = [[0.0f64; 2]; 2];
    for k in 0..3 {
        for i in 0..2 {
            for j in 0..2 {
                h[i][j] += n1[k][i] * n2[k][j];
            }
        }
    }
    let theta = (h[0][1] - h[1][0]).atan2(h[0][0] + h[1][1]);
    let (sin, cos) = theta.sin_cos();
    // R maps source (column) vectors to template vectors: R = [[cos, -sin], [sin, cos]].
    let r = [[cos, -sin], [sin, cos]];
    let scale = s2 / s1;
    let t = [
        c2[0] - scale * (r[0][0] * c1[0] + r[0][1] * c1[1]),
        c2[1] - scale * (r[1][0] * c1[0] + r[1][1] * c1[1]),
    ];
    Some(SimilarityFit {
        matrix: [
            [scale * r[0][0], scale * r[0][1], t[0]],
            [scale * r[1][0], scale * r[1][1], t[1]],
        ],
        bias: [n2[2][0] - n1[2][0], n2[2][1] - n1[2][1]],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn similarity_recovers_a_known_transform() {
        let dst = [[47.6, 56.0], [162.4, 56.0], [105.0, 112.0]];
        // Source = dst rotated by 10°, scaled by 0.5 and shifted: the fit must invert it.
        let (s, c) = (10f64.to_radians().sin(), 10f64.to_radians().cos());
        let src = dst.map(|p| {
            [
                0.5 * (c * p[0] - s * p[1]) + 300.0,
                0.5 * (s * p[0] + c * p[1]) + 100.0,
            ]
        });
        let fit = similarity(&src, &dst).unwrap();
        for k in 0..3 {
            let q = apply(&fit.matrix, src[k]);
            assert!(close(q[0], dst[k][0], 1e-9) && close(q[1], dst[k][1], 1e-9));
        }
        // The reference's bias compares normalised points without undoing the rotation,
        // so it is non-zero here; without rotation it vanishes.
        assert!(fit.bias[0].abs() > 1e-3);
        let shifted = dst.map(|p| [0.5 * p[0] + 300.0, 0.5 * p[1] + 100.0]);
        let plain = similarity(&shifted, &dst).unwrap();
        assert!(plain.bias[0].abs() < 1e-9 && plain.bias[1].abs() < 1e-9);
        let inv = invert(&fit.matrix).unwrap();
        let back = apply(&inv, dst[2]);
        assert!(close(back[0], src[2][0], 1e-9) && close(back[1], src[2][1], 1e-9));
    }

    #[test]
    fn similarity_is_least_squares_for_inexact_points() {
        let dst = [[0.0, 0.0], [10.0, 0.0], [5.0, 5.0]];
        let src = [[0.0, 0.0], [10.0, 0.0], [5.0, 8.0]];
        let fit = similarity(&src, &dst).unwrap();
        // No rotation is needed for a vertically stretched triangle; scale < 1.
        assert!(fit.matrix[0][1].abs() < 1e-9 && fit.matrix[1][0].abs() < 1e-9);
        assert!(fit.matrix[0][0] < 1.0 && fit.matrix[0][0] > 0.7);
        assert!(fit.bias[1].abs() > 0.01);
        assert!(similarity(&[[1.0, 1.0]; 3], &dst).is_none());
    }

    #[test]
    fn iou_of_boxes() {
        let a = [0.0, 0.0, 10.0, 10.0];
        assert_eq!(bbox::iou(&a, &a), 1.0);
        assert_eq!(bbox::iou(&a, &[20.0, 20.0, 30.0, 30.0]), 0.0);
        let half = bbox::iou(&a, &[5.0, 0.0, 15.0, 10.0]);
        assert!((half - 1.0 / 3.0).abs() < 1e-6);
    }
}
