//! Synthetic inputs for tests, the benchmark and the GPU check: a plausible face track
//! (a similarity transform drifting slowly over the frame) and seeded random audio
//! features. Nothing here runs in production jobs.

use std::path::Path;

use lipsync_runtime::features::{AudioFeatures, Dtype};
use lipsync_runtime::{ArtifactError, ArtifactStore};
use lipsync_schemas::{FaceFrame, FaceTrack, InferJob, names};

use crate::noise::Gaussian;

/// Returns a face track of `frames` frames of a `width x height` video whose crop box
/// (`crop_w x crop_h`) covers the middle 60 % of the frame height, rotating by a few
/// degrees and drifting by a few pixels over time.
pub fn face_track(
    width: u32,
    height: u32,
    frames: usize,
    crop_w: u32,
    crop_h: u32,
    resolution: u32,
) -> FaceTrack {
    let (cx, cy) = (f64::from(width) / 2.0, f64::from(height) / 2.0);
    let s = f64::from(crop_h) / (0.6 * f64::from(height));
    let frames = (0..frames)
        .map(|i| {
            let t = i as f64 / 25.0;
            let theta = (3.0f64).to_radians() * (t * 1.3).sin();
            let (dx, dy) = (4.0 * (t * 0.7).sin(), 3.0 * (t * 0.9).cos());
            let (a, b) = (s * theta.cos(), -s * theta.sin());
            let (d, e) = (s * theta.sin(), s * theta.cos());
            // Frame point (cx+dx, cy+dy) maps to the crop centre.
            let (fx, fy) = (cx + dx, cy + dy);
            let c = f64::from(crop_w) / 2.0 - (a * fx + b * fy);
            let f = f64::from(crop_h) / 2.0 - (d * fx + e * fy);
            let half_w = f64::from(crop_w) / s / 2.0;
            let half_h = f64::from(crop_h) / s / 2.0;
            FaceFrame {
                present: true,
                score: 0.9,
                bbox: [
                    (fx - half_w) as f32,
                    (fy - half_h) as f32,
                    (fx + half_w) as f32,
                    (fy + half_h) as f32,
                ],
                landmarks: Vec::new(),
                affine: [
                    [a as f32, b as f32, c as f32],
                    [d as f32, e as f32, f as f32],
                ],
                interpolated: false,
            }
        })
        .collect::<Vec<_>>();
    FaceTrack {
        v: lipsync_schemas::FACE_TRACK_VERSION,
        fps: 25.0,
        width,
        height,
        frame_count: frames.len() as u64,
        crop_w,
        crop_h,
        resolution,
        detector: "synthetic".into(),
        frames,
    }
}

/// Returns seeded random Whisper-like features (`5 x 384` per position) driving exactly
/// `frames` video frames (`frames >= 3`; `T = 2 (frames - 2)`).
pub fn features(frames: usize, seed: u64) -> AudioFeatures {
    let t = 2 * frames.saturating_sub(2).max(1);
    let (layers, dim) = (5, 384);
    let mut g = Gaussian::new(seed, 7);
    let data = (0..t * layers * dim)
        .map(|_| (g.next_f64() * 0.5) as f32)
        .collect();
    AudioFeatures {
        t,
        layers,
        dim,
        data,
    }
}

/// Stores a task's infer inputs (video file, face track, features) in `artifacts` under
/// the well-known names and returns the matching work item.
///
/// # Errors
/// The artifact store refused a write.
pub async fn store_inputs(
    artifacts: &dyn ArtifactStore,
    task_id: &str,
    video: &Path,
    track: &FaceTrack,
    features: &AudioFeatures,
) -> Result<InferJob, ArtifactError> {
    let key = |name: &str| names::artifact_key(task_id, name);
    artifacts
        .put_file(&key(names::artifact::VIDEO), video)
        .await?;
    let json = serde_json::to_vec(track).expect("face track serialises");
    artifacts
        .put(&key(names::artifact::FACE_TRACK), &mut &json[..])
        .await?;
    let mut bin = Vec::new();
    features
        .write_to(&mut bin, Dtype::F16)
        .expect("write to memory");
    artifacts
        .put(&key(names::artifact::AUDIO_FEATURES), &mut &bin[..])
        .await?;
    Ok(InferJob {
        v: lipsync_schemas::WORK_VERSION,
        task_id: task_id.to_owned(),
        video: key(names::artifact::VIDEO),
        face_track: key(names::artifact::FACE_TRACK),
        audio_features: key(names::artifact::AUDIO_FEATURES),
        video_stream: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_drive_the_requested_frames() {
        for n in [3, 16, 17, 100] {
            assert_eq!(features(n, 1).frame_count(), n);
        }
    }

    #[test]
    fn track_maps_the_frame_centre_to_the_crop_centre() {
        let t = face_track(320, 240, 3, 210, 280, 256);
        assert_eq!(t.frame_count, 3);
        let m = t.frames[0].affine;
        let (fx, fy) = (160.0f32, 240.0 / 2.0 + 3.0);
        let u = m[0][0] * fx + m[0][1] * fy + m[0][2];
        let v = m[1][0] * fx + m[1][1] * fy + m[1][2];
        assert!(
            (u - 105.0).abs() < 1e-2 && (v - 140.0).abs() < 1e-2,
            "{u},{v}"
        );
    }
}
