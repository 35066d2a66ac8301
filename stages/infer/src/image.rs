//! Pixel work on the CPU: the affine warp of a frame into the face crop box (bilinear,
//! constant fill, like the reference's `warp_affine`), the crop-box to model-resolution
//! resize (Lanczos, a = 4, the kernel of the reference's `cv2.INTER_LANCZOS4`; not
//! aspect preserving), the keep-mask, and conversions between RGB bytes and the
//! models' planar [-1, 1] floats.

/// Returns the inverse of a 2x3 affine matrix, or `None` if it is singular.
pub fn invert_affine(m: &[[f32; 3]; 2]) -> Option<[[f64; 3]; 2]> {
    let [[a, b, c], [d, e, f]] = m.map(|r| r.map(f64::from));
    let det = a * e - b * d;
    if !det.is_finite() || det.abs() < 1e-12 {
        return None;
    }
    let (ia, ib, id, ie) = (e / det, -b / det, -d / det, a / det);
    Some([[ia, ib, -(ia * c + ib * f)], [id, ie, -(id * c + ie * f)]])
}

/// Warps an RGB24 frame into an RGB24 `out_w x out_h` crop: crop pixel (u, v) samples
/// the frame at `inv (u, v)` bilinearly; neighbours outside the frame read `fill`. The
/// result is truncated to an integer like the reference's (`make parity` measured the
/// rounding this used before as +0.47 levels on average against it).
pub fn warp_affine(
    frame: &[u8],
    width: usize,
    height: usize,
    inv: &[[f64; 3]; 2],
    (out_w, out_h): (usize, usize),
    fill: u8,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.resize(out_w * out_h * 3, fill);
    let fillf = f32::from(fill);
    let px = |x: i64, y: i64, ch: usize| -> f32 {
        if x < 0 || y < 0 || x >= width as i64 || y >= height as i64 {
            fillf
        } else {
            f32::from(frame[(y as usize * width + x as usize) * 3 + ch])
        }
    };
    for v in 0..out_h {
        for u in 0..out_w {
            let (uf, vf) = (u as f64, v as f64);
            let sx = inv[0][0] * uf + inv[0][1] * vf + inv[0][2];
            let sy = inv[1][0] * uf + inv[1][1] * vf + inv[1][2];
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = ((sx - x0) as f32, (sy - y0) as f32);
            let (x0, y0) = (x0 as i64, y0 as i64);
            if x0 < -1 || y0 < -1 || x0 >= width as i64 || y0 >= height as i64 {
                continue; // entirely outside: stays `fill`
            }
            let o = (v * out_w + u) * 3;
            for ch in 0..3 {
                let top = px(x0, y0, ch) * (1.0 - fx) + px(x0 + 1, y0, ch) * fx;
                let bottom = px(x0, y0 + 1, ch) * (1.0 - fx) + px(x0 + 1, y0 + 1, ch) * fx;
                // Truncated, as the reference's `astype(np.uint8)` after its warp does.
                out[o + ch] = (top * (1.0 - fy) + bottom * fy).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

const LANCZOS_A: f64 = 4.0;

fn lanczos(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else if x.abs() >= LANCZOS_A {
        0.0
    } else {
        let px = std::f64::consts::PI * x;
        LANCZOS_A * px.sin() * (px / LANCZOS_A).sin() / (px * px)
    }
}

/// Per output index: first source index and normalised weights (half-pixel centres,
/// clamped borders, no kernel widening when shrinking, as OpenCV does).
fn taps(src: usize, dst: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = src as f64 / dst as f64;
    let n = (2.0 * LANCZOS_A) as i64;
    (0..dst)
        .map(|o| {
            let centre = (o as f64 + 0.5) * scale - 0.5;
            let first = centre.floor() as i64 - (n / 2 - 1);
            let mut idx = Vec::with_capacity(n as usize);
            let mut w = Vec::with_capacity(n as usize);
            for k in 0..n {
                let s = first + k;
                idx.push(s.clamp(0, src as i64 - 1) as usize);
                w.push(lanczos(centre - s as f64));
            }
            let sum: f64 = w.iter().sum();
            // Express as weights over a contiguous clamped window: fold duplicates.
            let lo = idx[0];
            let hi = *idx.last().expect("taps");
            let mut folded = vec![0f32; hi - lo + 1];
            for (i, wi) in idx.iter().zip(&w) {
                folded[i - lo] += (wi / sum) as f32;
            }
            (lo, folded)
        })
        .collect()
}

/// Resizes interleaved `channels`-channel bytes from `sw x sh` to `dw x dh` (separable
/// Lanczos, rounded and clamped).
pub fn resize_lanczos(
    src: &[u8],
    sw: usize,
    sh: usize,
    channels: usize,
    dw: usize,
    dh: usize,
) -> Vec<u8> {
    let xt = taps(sw, dw);
    let yt = taps(sh, dh);
    // Horizontal pass into f32 rows.
    let mut mid = vec![0f32; sh * dw * channels];
    for y in 0..sh {
        let row = &src[y * sw * channels..(y + 1) * sw * channels];
        let out = &mut mid[y * dw * channels..(y + 1) * dw * channels];
        for (x, (lo, w)) in xt.iter().enumerate() {
            for c in 0..channels {
                let mut acc = 0f32;
                for (k, wk) in w.iter().enumerate() {
                    acc += wk * f32::from(row[(lo + k) * channels + c]);
                }
                out[x * channels + c] = acc;
            }
        }
    }
    // Vertical pass.
    let mut dst = vec![0u8; dw * dh * channels];
    let stride = dw * channels;
    for (y, (lo, w)) in yt.iter().enumerate() {
        let out = &mut dst[y * stride..(y + 1) * stride];
        for (i, o) in out.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (k, wk) in w.iter().enumerate() {
                acc += wk * mid[(lo + k) * stride + i];
            }
            *o = acc.round().clamp(0.0, 255.0) as u8;
        }
    }
    dst
}

/// Nearest-neighbour resize of a single-channel f32 plane (PyTorch `interpolate`
/// `mode="nearest"`: source index `floor(dst * src / dst_size)`).
pub fn resize_nearest(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(dw * dh);
    for y in 0..dh {
        let sy = (y * sh / dh).min(sh - 1);
        for x in 0..dw {
            let sx = (x * sw / dw).min(sw - 1);
            out.push(src[sy * sw + sx]);
        }
    }
    out
}

/// Appends an RGB24 `r x r` image to `dst` as planar [-1, 1] floats (3 planes), each
/// value multiplied by `mask` (per pixel) when given.
pub fn push_planar(rgb: &[u8], mask: Option<&[f32]>, dst: &mut Vec<f32>) {
    let n = rgb.len() / 3;
    for c in 0..3 {
        for i in 0..n {
            let v = f32::from(rgb[i * 3 + c]) / 127.5 - 1.0;
            dst.push(match mask {
                Some(m) => v * m[i],
                None => v,
            });
        }
    }
}

/// Pastes the surrounding pixels back: `out = decoded (1 - mask) + original mask` with
/// `decoded` planar [-1, 1] (clamped) and `original` RGB24; returns RGB24.
pub fn paste_back(decoded: &[f32], original: &[u8], mask: &[f32], out: &mut Vec<u8>) {
    let n = mask.len();
    out.clear();
    out.resize(n * 3, 0);
    for i in 0..n {
        let m = mask[i];
        for c in 0..3 {
            let gen_v = decoded[c * n + i].clamp(-1.0, 1.0);
            let orig = f32::from(original[i * 3 + c]) / 127.5 - 1.0;
            let v = gen_v * (1.0 - m) + orig * m;
            out[i * 3 + c] = ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_warp_copies_and_outside_is_fill() {
        let (w, h) = (5usize, 4usize);
        let frame: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let id = invert_affine(&[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).unwrap();
        let mut out = Vec::new();
        warp_affine(&frame, w, h, &id, (w, h), 127, &mut out);
        assert_eq!(out, frame);
        // Shift by +10 px: all outside.
        let sh = invert_affine(&[[1.0, 0.0, 10.0], [0.0, 1.0, 0.0]]).unwrap();
        warp_affine(&frame, w, h, &sh, (w, h), 127, &mut out);
        assert!(out.iter().all(|&v| v == 127));
        // Scale 2 (frame -> crop): crop pixel (2,2) is frame pixel (1,1).
        let s2 = invert_affine(&[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]).unwrap();
        warp_affine(&frame, w, h, &s2, (4, 4), 127, &mut out);
        let o = (2 * 4 + 2) * 3;
        let f = (w + 1) * 3;
        assert_eq!(&out[o..o + 3], &frame[f..f + 3]);
        assert!(invert_affine(&[[0.0; 3], [0.0; 3]]).is_none());
    }

    #[test]
    fn warp_truncates_like_the_reference() {
        // Two columns 100 and 101; a half-pixel shift samples 100.5 -> 100 (astype(uint8)).
        let frame: Vec<u8> = [100u8, 101].iter().flat_map(|&v| [v; 3]).collect();
        let half = invert_affine(&[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]).unwrap();
        let mut out = Vec::new();
        warp_affine(&frame, 2, 1, &half, (1, 1), 0, &mut out);
        assert_eq!(out, vec![100; 3]);
    }

    #[test]
    fn lanczos_keeps_flat_images_flat_and_sizes_right() {
        let src = vec![90u8; 21 * 28 * 3];
        let out = resize_lanczos(&src, 21, 28, 3, 32, 32);
        assert_eq!(out.len(), 32 * 32 * 3);
        assert!(out.iter().all(|&v| v == 90));
        // Same size: identity.
        let src: Vec<u8> = (0..16 * 16).map(|i| (i % 256) as u8).collect();
        assert_eq!(resize_lanczos(&src, 16, 16, 1, 16, 16), src);
    }

    #[test]
    fn nearest_and_paste_back() {
        let m = resize_nearest(&[0.0, 1.0, 2.0, 3.0], 2, 2, 4, 4);
        assert_eq!(&m[..4], &[0.0, 0.0, 1.0, 1.0]);
        assert_eq!(&m[12..], &[2.0, 2.0, 3.0, 3.0]);
        // mask 1 keeps the original, 0 takes the decoded value.
        let decoded = vec![1.0f32, -1.0, -1.0, 1.0, 1.0, -1.0];
        let original = [10u8, 20, 30, 40, 50, 60];
        let mut out = Vec::new();
        paste_back(&decoded, &original, &[1.0, 0.0], &mut out);
        assert_eq!(&out[..3], &[10, 20, 30]);
        assert_eq!(&out[3..], &[0, 255, 0]);
        let mut planar = Vec::new();
        push_planar(&[255, 0, 255], Some(&[0.5]), &mut planar);
        assert_eq!(planar, vec![0.5, -0.5, 0.5]);
    }
}
