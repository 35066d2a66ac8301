//! Separable image operators on `f32` planes restricted to a rectangle of the frame:
//! rectangular erosion (van Herk / Gil-Werman: three `min` per sample whatever the
//! window) and Gaussian blur with the frame's reflect border. Both work along axis 0 on
//! whole rows (vectorisable); the other axis is done by transposing.

/// What lies beyond the processed rectangle on one side of an axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pad {
    /// Frame pixels outside the rectangle: the plane is zero there.
    Zero,
    /// Outside the frame: ignored by erosion (as cv2 and kornia do at image borders).
    Ignore,
}

impl Pad {
    fn value(self) -> f32 {
        match self {
            Pad::Zero => 0.0,
            Pad::Ignore => f32::INFINITY,
        }
    }
}

/// Reusable buffers of the operators.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    g: Vec<f32>,
    h: Vec<f32>,
}

/// `out[i] = min(src[i + lo ..= i + hi])` along axis 0 of a `rows x cols` plane; rows
/// outside the plane take `before` / `after`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn erode_axis0(
    src: &[f32],
    rows: usize,
    cols: usize,
    lo: isize,
    hi: isize,
    before: Pad,
    after: Pad,
    scratch: &mut Scratch,
    out: &mut Vec<f32>,
) {
    debug_assert!(lo <= hi);
    let k = (hi - lo + 1) as usize;
    let len = rows + k - 1;
    let row = |j: usize| -> Result<&[f32], f32> {
        let orig = j as isize + lo;
        if orig < 0 {
            Err(before.value())
        } else if orig as usize >= rows {
            Err(after.value())
        } else {
            let o = orig as usize;
            Ok(&src[o * cols..(o + 1) * cols])
        }
    };
    let Scratch { g, h } = scratch;
    g.resize(len * cols, 0.0);
    h.resize(len * cols, 0.0);
    // g: running min from each block start; h: running min to each block end.
    for j in 0..len {
        let (done, rest) = g.split_at_mut(j * cols);
        let cur = &mut rest[..cols];
        let start = j % k == 0;
        match row(j) {
            Ok(r) if start => cur.copy_from_slice(r),
            Err(v) if start => cur.fill(v),
            Ok(r) => {
                let prev = &done[(j - 1) * cols..];
                for ((c, p), e) in cur.iter_mut().zip(prev).zip(r) {
                    *c = if *p < *e { *p } else { *e };
                }
            }
            Err(v) => {
                let prev = &done[(j - 1) * cols..];
                for (c, p) in cur.iter_mut().zip(prev) {
                    *c = if *p < v { *p } else { v };
                }
            }
        }
    }
    for j in (0..len).rev() {
        let (head, tail) = h.split_at_mut((j + 1) * cols);
        let cur = &mut head[j * cols..];
        let end = (j + 1) % k == 0 || j == len - 1;
        match row(j) {
            Ok(r) if end => cur.copy_from_slice(r),
            Err(v) if end => cur.fill(v),
            Ok(r) => {
                for ((c, n), e) in cur.iter_mut().zip(&tail[..cols]).zip(r) {
                    *c = if *n < *e { *n } else { *e };
                }
            }
            Err(v) => {
                for (c, n) in cur.iter_mut().zip(&tail[..cols]) {
                    *c = if *n < v { *n } else { v };
                }
            }
        }
    }
    out.clear();
    out.resize(rows * cols, 0.0);
    for i in 0..rows {
        let hs = &h[i * cols..(i + 1) * cols];
        let gs = &g[(i + k - 1) * cols..(i + k) * cols];
        for ((o, a), b) in out[i * cols..(i + 1) * cols].iter_mut().zip(hs).zip(gs) {
            *o = if *a < *b { *a } else { *b };
        }
    }
}

/// Index `i` reflected into `0..n` the way torch's `reflect` padding does (edge sample
/// not repeated).
pub(crate) fn reflect(mut i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i;
        } else if i >= n {
            i = 2 * (n - 1) - i;
        } else {
            return i as usize;
        }
    }
}

/// Gaussian taps `exp(-x²/2σ²)` for `x = -r..=r`, normalised (kornia's
/// `get_gaussian_kernel1d`).
pub(crate) fn gaussian_kernel(radius: usize, sigma: f64) -> Vec<f32> {
    let w: Vec<f64> = (0..2 * radius + 1)
        .map(|i| {
            let x = i as f64 - radius as f64;
            (-(x * x) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| (v / sum) as f32).collect()
}

/// Convolves along axis 0 of a `rows x cols` plane that covers frame rows
/// `offset..offset+rows` of a frame `n` rows high. Frame rows outside the plane are zero;
/// rows outside the frame are reflected into it.
pub(crate) fn blur_axis0(
    src: &[f32],
    rows: usize,
    cols: usize,
    offset: usize,
    n: usize,
    kernel: &[f32],
    out: &mut Vec<f32>,
) {
    let r = (kernel.len() / 2) as isize;
    out.clear();
    out.resize(rows * cols, 0.0);
    for i in 0..rows {
        let orow = &mut out[i * cols..(i + 1) * cols];
        for (t, wt) in kernel.iter().enumerate() {
            let frame_row = reflect((offset + i) as isize + t as isize - r, n);
            let Some(local) = frame_row.checked_sub(offset).filter(|l| *l < rows) else {
                continue;
            };
            let srow = &src[local * cols..(local + 1) * cols];
            for (o, s) in orow.iter_mut().zip(srow) {
                *o += wt * s;
            }
        }
    }
}

/// Transposes a `rows x cols` plane into `out` (`cols x rows`).
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, out: &mut Vec<f32>) {
    const B: usize = 32;
    out.clear();
    out.resize(rows * cols, 0.0);
    for rb in (0..rows).step_by(B) {
        for cb in (0..cols).step_by(B) {
            for r in rb..(rb + B).min(rows) {
                for c in cb..(cb + B).min(cols) {
                    out[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_erode(src: &[f32], n: usize, lo: isize, hi: isize, b: Pad, a: Pad) -> Vec<f32> {
        (0..n as isize)
            .map(|i| {
                (i + lo..=i + hi)
                    .map(|j| {
                        if j < 0 {
                            b.value()
                        } else if j >= n as isize {
                            a.value()
                        } else {
                            src[j as usize]
                        }
                    })
                    .fold(f32::INFINITY, f32::min)
            })
            .collect()
    }

    #[test]
    fn van_herk_matches_naive_min() {
        let n = 37;
        let src: Vec<f32> = (0..n).map(|i| ((i * 7919) % 31) as f32 / 31.0).collect();
        for (lo, hi) in [(-1, 0), (-1, 1), (-5, 4), (-12, 11), (0, 0), (-40, 39)] {
            for (b, a) in [
                (Pad::Zero, Pad::Zero),
                (Pad::Ignore, Pad::Zero),
                (Pad::Ignore, Pad::Ignore),
            ] {
                let mut out = Vec::new();
                // As a column (rows = n, cols = 1) and as 3 identical columns.
                let wide: Vec<f32> = src.iter().flat_map(|v| [*v, *v, *v]).collect();
                erode_axis0(&wide, n, 3, lo, hi, b, a, &mut Scratch::default(), &mut out);
                let want = naive_erode(&src, n, lo, hi, b, a);
                for i in 0..n {
                    for c in 0..3 {
                        assert_eq!(out[i * 3 + c], want[i], "lo {lo} hi {hi} i {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn reflect_like_torch() {
        assert_eq!(reflect(-1, 5), 1);
        assert_eq!(reflect(-2, 5), 2);
        assert_eq!(reflect(5, 5), 3);
        assert_eq!(reflect(6, 5), 2);
        assert_eq!(reflect(3, 5), 3);
        assert_eq!(reflect(-3, 1), 0);
    }

    #[test]
    fn blur_preserves_mass_inside_and_reflects_at_the_border() {
        let k = gaussian_kernel(3, 0.3 * 2.0 + 0.8);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(k[3] > k[2] && k[2] > k[1]);
        // A constant frame stays constant, even at its reflected borders.
        let src = vec![1.0f32; 10];
        let mut out = Vec::new();
        blur_axis0(&src, 10, 1, 0, 10, &k, &mut out);
        assert!(out.iter().all(|v| (v - 1.0).abs() < 1e-6));
        // A plane covering rows 2..5 of a 10-row frame: rows outside are zero.
        let src = vec![1.0f32; 3];
        blur_axis0(&src, 3, 1, 2, 10, &k, &mut out);
        assert!(out[1] > out[0] && out[1] < 1.0);
    }

    #[test]
    fn transpose_round_trip() {
        let src: Vec<f32> = (0..35 * 70).map(|i| i as f32).collect();
        let (mut t, mut back) = (Vec::new(), Vec::new());
        transpose(&src, 35, 70, &mut t);
        assert_eq!(t[3 * 35 + 2], src[2 * 70 + 3]);
        transpose(&t, 70, 35, &mut back);
        assert_eq!(back, src);
    }
}
