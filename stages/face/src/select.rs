//! Which detection is "the face" of a frame: LatentSync's filters (minimum size, aspect
//! bounds, score), then `largest`, `index` or `track`.

use crate::detect::Detection;
use crate::error::{FaceError, Result};
use crate::geometry::bbox;

/// LatentSync's candidate filters (`face_detector.py`).
#[derive(Debug, Clone, PartialEq)]
pub struct Filters {
    /// Minimum score.
    pub min_score: f32,
    /// Minimum width in pixels.
    pub min_width: f32,
    /// Minimum height in pixels.
    pub min_height: f32,
    /// Minimum width/height.
    pub min_aspect: f32,
    /// Maximum width/height.
    pub max_aspect: f32,
}

impl Default for Filters {
    fn default() -> Self {
        Self {
            min_score: 0.5,
            min_width: 50.0,
            min_height: 80.0,
            min_aspect: 0.2,
            max_aspect: 1.5,
        }
    }
}

impl Filters {
    /// Whether `d` is a usable face.
    pub fn accepts(&self, d: &Detection) -> bool {
        let (w, h) = (bbox::width(&d.bbox), bbox::height(&d.bbox));
        if h <= 0.0 {
            return false;
        }
        let aspect = w / h;
        d.score >= self.min_score
            && w >= self.min_width
            && h >= self.min_height
            && aspect >= self.min_aspect
            && aspect <= self.max_aspect
    }
}

/// `face.select`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// The largest face of each frame.
    Largest,
    /// The n-th face from the left of each frame.
    Index(usize),
    /// Follow one face by IoU; re-acquire the largest after `reacquire_after` frames
    /// without a match.
    Track {
        /// Minimum IoU with the previous box.
        min_iou: f32,
        /// Frames without a match before taking the largest face again.
        reacquire_after: usize,
    },
}

impl Policy {
    /// Parses `largest | index | track`.
    ///
    /// # Errors
    /// [`FaceError::Config`] for other values.
    pub fn parse(s: &str, index: usize, min_iou: f32, reacquire_after: usize) -> Result<Self> {
        match s {
            "largest" => Ok(Policy::Largest),
            "index" => Ok(Policy::Index(index)),
            "track" => Ok(Policy::Track {
                min_iou,
                reacquire_after,
            }),
            other => Err(FaceError::Config(format!(
                "face.select: `{other}` is not one of largest, index, track"
            ))),
        }
    }
}

/// Per-video selection state.
#[derive(Debug, Clone)]
pub struct Selector {
    filters: Filters,
    policy: Policy,
    last: Option<[f32; 4]>,
    lost_for: usize,
}

impl Selector {
    /// A selector for one video.
    pub fn new(filters: Filters, policy: Policy) -> Self {
        Self {
            filters,
            policy,
            last: None,
            lost_for: 0,
        }
    }

    /// Picks the face of the next frame from its detections (`None`: no usable face).
    pub fn choose(&mut self, dets: &[Detection]) -> Option<Detection> {
        let usable: Vec<&Detection> = dets.iter().filter(|d| self.filters.accepts(d)).collect();
        let largest = || {
            usable
                .iter()
                .copied()
                .max_by(|a, b| bbox::area(&a.bbox).total_cmp(&bbox::area(&b.bbox)))
        };
        let chosen = match self.policy {
            Policy::Largest => largest(),
            Policy::Index(n) => {
                let mut by_x = usable.clone();
                by_x.sort_by(|a, b| (a.bbox[0] + a.bbox[2]).total_cmp(&(b.bbox[0] + b.bbox[2])));
                by_x.get(n).copied()
            }
            Policy::Track {
                min_iou,
                reacquire_after,
            } => match self.last {
                Some(prev) => {
                    let best = usable
                        .iter()
                        .copied()
                        .map(|d| (bbox::iou(&prev, &d.bbox), d))
                        .max_by(|a, b| a.0.total_cmp(&b.0));
                    match best {
                        Some((iou, d)) if iou >= min_iou => Some(d),
                        _ if self.lost_for >= reacquire_after => largest(),
                        _ => None,
                    }
                }
                None => largest(),
            },
        };
        match chosen {
            Some(d) => {
                self.last = Some(d.bbox);
                self.lost_for = 0;
            }
            None => self.lost_for += 1,
        }
        chosen.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(x: f32, w: f32, score: f32) -> Detection {
        Detection {
            bbox: [x, 100.0, x + w, 100.0 + w * 1.3],
            score,
            landmarks: vec![],
        }
    }

    #[test]
    fn filters_follow_latentsync() {
        let f = Filters::default();
        assert!(f.accepts(&face(0.0, 70.0, 0.9)));
        assert!(!f.accepts(&face(0.0, 40.0, 0.9)), "too narrow");
        assert!(!f.accepts(&face(0.0, 70.0, 0.4)), "low score");
        let wide = Detection {
            bbox: [0.0, 0.0, 200.0, 100.0],
            score: 0.9,
            landmarks: vec![],
        };
        assert!(!f.accepts(&wide), "aspect above 1.5");
    }

    #[test]
    fn largest_and_index() {
        let dets = [
            face(500.0, 80.0, 0.9),
            face(0.0, 120.0, 0.8),
            face(300.0, 100.0, 0.99),
        ];
        let mut s = Selector::new(Filters::default(), Policy::Largest);
        assert_eq!(s.choose(&dets).unwrap().bbox[0], 0.0);
        let mut s = Selector::new(Filters::default(), Policy::Index(1));
        assert_eq!(s.choose(&dets).unwrap().bbox[0], 300.0);
        let mut s = Selector::new(Filters::default(), Policy::Index(5));
        assert!(s.choose(&dets).is_none());
    }

    #[test]
    fn track_follows_by_iou_then_reacquires() {
        let policy = Policy::Track {
            min_iou: 0.3,
            reacquire_after: 2,
        };
        let mut s = Selector::new(Filters::default(), policy);
        // Starts with the largest (x=0), then keeps it although a bigger face appears.
        assert_eq!(s.choose(&[face(0.0, 100.0, 0.9)]).unwrap().bbox[0], 0.0);
        let both = [face(5.0, 100.0, 0.9), face(400.0, 150.0, 0.9)];
        assert_eq!(s.choose(&both).unwrap().bbox[0], 5.0);
        // The tracked face leaves: missing for 2 frames, then the other face is taken.
        let other = [face(400.0, 150.0, 0.9)];
        assert!(s.choose(&other).is_none());
        assert!(s.choose(&other).is_none());
        assert_eq!(s.choose(&other).unwrap().bbox[0], 400.0);
    }
}
