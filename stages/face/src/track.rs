//! Builds the face track frame by frame: face choice, alignment, gap bridging and the
//! missing-face policy. Holds only the compact per-frame entries, never pixels.

use lipsync_runtime::media::FPS;
use lipsync_schemas::{FACE_TRACK_VERSION, FaceFrame, FaceTrack};

use crate::align::{Aligner, Geometry, anchors};
use crate::detect::{Detection, Layout};
use crate::error::{FaceError, Result};
use crate::geometry::{Affine, lerp_affine};
use crate::select::Selector;

/// `face.on_missing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// The task fails at the first frame without a face that cannot be bridged.
    Fail,
    /// Frames without a face are marked absent and left untouched downstream.
    Passthrough,
}

impl OnMissing {
    /// Parses `fail | passthrough`.
    ///
    /// # Errors
    /// [`FaceError::Config`] for other values.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "fail" => Ok(OnMissing::Fail),
            "passthrough" => Ok(OnMissing::Passthrough),
            other => Err(FaceError::Config(format!(
                "face.on_missing: `{other}` is not one of fail, passthrough"
            ))),
        }
    }
}

/// Frame index -> seconds.
pub fn frame_time(index: u64) -> f64 {
    index as f64 / f64::from(FPS)
}

/// Accumulates one video's track.
pub struct TrackBuilder {
    geometry: Geometry,
    layout: Layout,
    selector: Selector,
    aligner: Aligner,
    on_missing: OnMissing,
    max_gap: usize,
    frames: Vec<FaceFrame>,
    last_present: Option<usize>,
}

impl TrackBuilder {
    /// A builder for one video.
    pub fn new(
        geometry: Geometry,
        layout: Layout,
        selector: Selector,
        on_missing: OnMissing,
        max_gap: usize,
    ) -> Self {
        let aligner = Aligner::new(&geometry);
        Self {
            geometry,
            layout,
            selector,
            aligner,
            on_missing,
            max_gap,
            frames: Vec::new(),
            last_present: None,
        }
    }

    /// Frames so far.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether no frame was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Adds the next frame's detections.
    ///
    /// # Errors
    /// [`FaceError::NoFace`] with `on_missing = fail` once a gap can no longer be bridged.
    pub fn push(&mut self, dets: &[Detection]) -> Result<()> {
        let index = self.frames.len();
        let frame = self.selector.choose(dets).and_then(|d| self.aligned(d));
        match frame {
            Some(f) => {
                self.frames.push(f);
                self.bridge_before(index);
                self.last_present = Some(index);
            }
            None => {
                self.frames.push(absent());
                let gap_start = self.last_present.map_or(0, |p| p + 1);
                if self.on_missing == OnMissing::Fail && index + 1 - gap_start > self.max_gap {
                    return Err(no_face(gap_start));
                }
            }
        }
        Ok(())
    }

    fn aligned(&mut self, d: Detection) -> Option<FaceFrame> {
        let points = anchors(self.layout, &d.landmarks)?;
        let m = self.aligner.align(&points)?;
        Some(FaceFrame {
            present: true,
            score: d.score,
            bbox: d.bbox,
            landmarks: d.landmarks,
            affine: to_f32(&m),
            interpolated: false,
        })
    }

    /// Bridges the gap that ends just before `index` (a frame with a face).
    fn bridge_before(&mut self, index: usize) {
        let gap_start = self.last_present.map_or(0, |p| p + 1);
        let gap = index - gap_start;
        if gap == 0 || gap > self.max_gap {
            return;
        }
        let right = self.frames[index].clone();
        match self.last_present {
            Some(p) => {
                let left = self.frames[p].clone();
                for k in gap_start..index {
                    let t = (k - p) as f64 / (index - p) as f64;
                    self.frames[k] = interpolate(&left, &right, t);
                }
            }
            None => {
                for k in gap_start..index {
                    self.frames[k] = held(&right);
                }
            }
        }
    }

    /// Finishes the track.
    ///
    /// # Errors
    /// [`FaceError::Empty`] for a video without frames; [`FaceError::NoFace`] with
    /// `on_missing = fail` for a trailing gap longer than `max_gap_frames`.
    pub fn finish(mut self, width: u32, height: u32, detector: &str) -> Result<FaceTrack> {
        let n = self.frames.len();
        if n == 0 {
            return Err(FaceError::Empty);
        }
        let gap_start = self.last_present.map_or(0, |p| p + 1);
        let gap = n - gap_start;
        if gap > 0 {
            match self.last_present {
                Some(p) if gap <= self.max_gap => {
                    let left = self.frames[p].clone();
                    for k in gap_start..n {
                        self.frames[k] = held(&left);
                    }
                }
                _ if self.on_missing == OnMissing::Fail => return Err(no_face(gap_start)),
                _ => {}
            }
        }
        Ok(FaceTrack {
            v: FACE_TRACK_VERSION,
            fps: f64::from(FPS),
            width,
            height,
            frame_count: n as u64,
            crop_w: self.geometry.crop_w,
            crop_h: self.geometry.crop_h,
            resolution: self.geometry.resolution,
            detector: detector.to_owned(),
            frames: self.frames,
        })
    }
}

fn no_face(index: usize) -> FaceError {
    FaceError::NoFace {
        frame_index: index as u64,
        time_s: frame_time(index as u64),
    }
}

fn absent() -> FaceFrame {
    FaceFrame {
        present: false,
        score: 0.0,
        bbox: [0.0; 4],
        landmarks: Vec::new(),
        affine: [[0.0; 3]; 2],
        interpolated: false,
    }
}

fn held(from: &FaceFrame) -> FaceFrame {
    FaceFrame {
        score: 0.0,
        interpolated: true,
        ..from.clone()
    }
}

fn interpolate(a: &FaceFrame, b: &FaceFrame, t: f64) -> FaceFrame {
    let tf = t as f32;
    let lerp = |x: f32, y: f32| x + (y - x) * tf;
    let landmarks = if a.landmarks.len() == b.landmarks.len() {
        a.landmarks
            .iter()
            .zip(&b.landmarks)
            .map(|(p, q)| [lerp(p[0], q[0]), lerp(p[1], q[1])])
            .collect()
    } else {
        a.landmarks.clone()
    };
    FaceFrame {
        present: true,
        score: 0.0,
        bbox: [0, 1, 2, 3].map(|i| lerp(a.bbox[i], b.bbox[i])),
        landmarks,
        affine: to_f32(&lerp_affine(&to_f64(&a.affine), &to_f64(&b.affine), t)),
        interpolated: true,
    }
}

fn to_f32(m: &Affine) -> [[f32; 3]; 2] {
    m.map(|r| r.map(|v| v as f32))
}

fn to_f64(m: &[[f32; 3]; 2]) -> Affine {
    m.map(|r| r.map(f64::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::{Filters, Policy};

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

    fn face(dx: f32) -> Vec<Detection> {
        vec![Detection {
            bbox: [180.0 + dx, 60.0, 270.0 + dx, 180.0],
            score: 0.99,
            landmarks: vec![
                [206.0 + dx, 102.0],
                [246.0 + dx, 104.0],
                [226.0 + dx, 130.0],
                [203.0 + dx, 141.0],
                [245.0 + dx, 143.0],
            ],
        }]
    }

    fn builder(on_missing: OnMissing, max_gap: usize) -> TrackBuilder {
        TrackBuilder::new(
            geometry(),
            Layout::Five,
            Selector::new(Filters::default(), Policy::Largest),
            on_missing,
            max_gap,
        )
    }

    #[test]
    fn short_gaps_are_interpolated() {
        let mut b = builder(OnMissing::Fail, 2);
        b.push(&face(0.0)).unwrap();
        b.push(&[]).unwrap();
        b.push(&[]).unwrap();
        b.push(&face(30.0)).unwrap();
        let t = b.finish(512, 512, "test").unwrap();
        assert_eq!(t.frame_count, 4);
        assert!(t.frames.iter().all(|f| f.present));
        assert!(t.frames[1].interpolated && t.frames[2].interpolated);
        assert!((t.frames[1].bbox[0] - 190.0).abs() < 1e-3);
        let c = |i: usize| t.frames[i].affine[0][2];
        assert!(
            c(0) > c(1) && c(1) > c(2) && c(2) > c(3),
            "translation follows the pan"
        );
    }

    #[test]
    fn fail_names_the_first_frame_of_a_long_gap() {
        let mut b = builder(OnMissing::Fail, 1);
        b.push(&face(0.0)).unwrap();
        b.push(&[]).unwrap();
        let err = b.push(&[]).unwrap_err();
        match err {
            FaceError::NoFace {
                frame_index,
                time_s,
            } => {
                assert_eq!(frame_index, 1);
                assert!((time_s - 0.04).abs() < 1e-9);
            }
            other => panic!("{other}"),
        }
        // A trailing gap within the limit is held; beyond it fails.
        let mut b = builder(OnMissing::Fail, 1);
        b.push(&face(0.0)).unwrap();
        b.push(&[]).unwrap();
        assert!(b.finish(512, 512, "t").unwrap().frames[1].interpolated);
        let mut b = builder(OnMissing::Fail, 0);
        b.push(&[]).unwrap_err();
    }

    #[test]
    fn passthrough_marks_frames_absent() {
        let mut b = builder(OnMissing::Passthrough, 1);
        for _ in 0..3 {
            b.push(&[]).unwrap();
        }
        b.push(&face(0.0)).unwrap();
        b.push(&[]).unwrap();
        let t = b.finish(512, 512, "t").unwrap();
        let present: Vec<bool> = t.frames.iter().map(|f| f.present).collect();
        assert_eq!(present, [false, false, false, true, true]);
        assert_eq!(t.first_missing(), Some(0));
        assert!(
            builder(OnMissing::Passthrough, 0)
                .finish(1, 1, "t")
                .is_err()
        );
    }
}
