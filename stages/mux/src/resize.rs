//! Bicubic resampling of the generated R x R crop back to the crop box (crop_w x crop_h),
//! as the reference does with torchvision's `resize(..., BICUBIC, antialias=True)`:
//! separable, cubic kernel with a = -0.5, the kernel stretched by the scale factor when
//! shrinking (anti-aliasing), weights normalised per output sample.

/// Weights of one axis: for each output sample, the first input index and its taps.
#[derive(Debug, Clone)]
struct Axis {
    taps: Vec<(usize, Vec<f32>)>,
}

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

impl Axis {
    fn new(input: usize, output: usize) -> Self {
        let scale = input as f64 / output as f64;
        let stretch = scale.max(1.0);
        let support = 2.0 * stretch;
        let taps = (0..output)
            .map(|i| {
                let center = scale * (i as f64 + 0.5);
                let first = ((center - support + 0.5).floor().max(0.0)) as usize;
                let last = ((center + support + 0.5).floor() as usize).min(input);
                let mut w: Vec<f64> = (first..last)
                    .map(|j| cubic((j as f64 - center + 0.5) / stretch))
                    .collect();
                let sum: f64 = w.iter().sum();
                if sum != 0.0 {
                    w.iter_mut().for_each(|v| *v /= sum);
                }
                (first, w.into_iter().map(|v| v as f32).collect())
            })
            .collect();
        Self { taps }
    }
}

/// Resizes square RGB24 crops to the crop box, into `f32` RGB (values may overshoot
/// 0..255 slightly, as bicubic does; the caller clamps after warping).
#[derive(Debug, Clone)]
pub struct CropResizer {
    src: usize,
    dst_w: usize,
    dst_h: usize,
    horizontal: Axis,
    vertical: Axis,
    tmp: Vec<f32>,
}

impl CropResizer {
    /// Returns a resizer from `src` x `src` to `dst_w` x `dst_h`.
    pub fn new(src: usize, dst_w: usize, dst_h: usize) -> Self {
        Self {
            src,
            dst_w,
            dst_h,
            horizontal: Axis::new(src, dst_w),
            vertical: Axis::new(src, dst_h),
            tmp: vec![0.0; src * dst_w * 3],
        }
    }

    /// Resizes `crop` (`src*src*3` bytes) into `out` (`dst_w*dst_h*3` floats).
    pub fn resize(&mut self, crop: &[u8], out: &mut Vec<f32>) {
        let (src, dw, dh) = (self.src, self.dst_w, self.dst_h);
        debug_assert_eq!(crop.len(), src * src * 3);
        for y in 0..src {
            let row = &crop[y * src * 3..(y + 1) * src * 3];
            let trow = &mut self.tmp[y * dw * 3..(y + 1) * dw * 3];
            for (x, (first, w)) in self.horizontal.taps.iter().enumerate() {
                let mut acc = [0f32; 3];
                for (k, wk) in w.iter().enumerate() {
                    let p = (first + k) * 3;
                    acc[0] += wk * f32::from(row[p]);
                    acc[1] += wk * f32::from(row[p + 1]);
                    acc[2] += wk * f32::from(row[p + 2]);
                }
                trow[x * 3..x * 3 + 3].copy_from_slice(&acc);
            }
        }
        out.clear();
        out.resize(dw * dh * 3, 0.0);
        let stride = dw * 3;
        for (y, (first, w)) in self.vertical.taps.iter().enumerate() {
            let orow = &mut out[y * stride..(y + 1) * stride];
            for (k, wk) in w.iter().enumerate() {
                let trow = &self.tmp[(first + k) * stride..(first + k + 1) * stride];
                for (o, t) in orow.iter_mut().zip(trow) {
                    *o += wk * t;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant() {
        for (src, w, h) in [(512, 420, 560), (256, 210, 280), (16, 40, 8)] {
            let crop = vec![77u8; src * src * 3];
            let mut r = CropResizer::new(src, w, h);
            let mut out = Vec::new();
            r.resize(&crop, &mut out);
            assert_eq!(out.len(), w * h * 3);
            assert!(
                out.iter().all(|v| (v - 77.0).abs() < 1e-3),
                "{src}->{w}x{h}"
            );
        }
    }

    #[test]
    fn identity_size_is_exact() {
        let src = 8;
        let crop: Vec<u8> = (0..src * src * 3).map(|i| (i * 7 % 256) as u8).collect();
        let mut r = CropResizer::new(src, src, src);
        let mut out = Vec::new();
        r.resize(&crop, &mut out);
        for (a, b) in crop.iter().zip(&out) {
            assert!((f32::from(*a) - b).abs() < 1e-3);
        }
    }

    #[test]
    fn downscale_by_two_of_a_ramp_is_the_ramp() {
        // A linear ramp stays linear under a symmetric, normalised kernel (away from edges).
        let src = 32;
        let mut crop = vec![0u8; src * src * 3];
        for y in 0..src {
            for x in 0..src {
                crop[(y * src + x) * 3] = (x * 8) as u8;
            }
        }
        let mut r = CropResizer::new(src, 16, 16);
        let mut out = Vec::new();
        r.resize(&crop, &mut out);
        // Output x=8 covers input 16..18, centre 16.5 -> 132.
        let v = out[(8 * 16 + 8) * 3];
        assert!((v - 132.0).abs() < 0.5, "{v}");
    }
}
