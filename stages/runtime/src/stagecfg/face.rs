//! `[face]` section: settings of the face stage.
//!
//! Choice-valued keys are strings here (the face crate parses and validates them at
//! start-up and refuses unknown values with exit code 64); see each key for the values.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the face stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaceConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9102`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process. Default 2.
    pub concurrency: usize,
    /// Face detector: `retinaface` (RetinaFace mobilenet0.25, 5 landmarks incl. mouth
    /// corners, MIT; the default), `blazeface` (MediaPipe BlazeFace short range 128 px,
    /// Apache-2.0), `blazeface-back` (MediaPipe BlazeFace 256 px) or `insightface` (SCRFD
    /// det_10g + 2d106det, the LatentSync pair; needs `insightface_det_model` and
    /// `insightface_landmark_model`; non-commercial licence). Default `retinaface`.
    pub detector: String,
    /// Folder holding the set-up's detector files (`make setup` writes them).
    /// Default `models/generated/face`.
    pub models_dir: PathBuf,
    /// InsightFace SCRFD `det_10g.onnx`, supplied by the user (only for
    /// `detector = "insightface"`). Default none.
    pub insightface_det_model: Option<PathBuf>,
    /// InsightFace `2d106det.onnx`, supplied by the user (only for
    /// `detector = "insightface"`). Default none.
    pub insightface_landmark_model: Option<PathBuf>,
    /// Detector input size in pixels: frames are scaled (aspect kept) to fit a square of
    /// this side (RetinaFace; BlazeFace has fixed 128/256 inputs, SCRFD uses
    /// `insightface_det_size`). Default 640.
    pub det_size: u32,
    /// SCRFD input size for `detector = "insightface"` (a multiple of 32; LatentSync
    /// uses 512). Default 512.
    pub insightface_det_size: u32,
    /// Where the three alignment anchors (eyebrow centres, nose) come from: `mesh`
    /// (means of MediaPipe face-mesh points from a second pass over each face,
    /// `face_mesh_468.onnx` in `models_dir`; follows each person's brows and is steadier,
    /// see stages/face/README.md) or `five-point` (derived from the detector's eyes and
    /// nose tip with fixed proportions). Ignored for `detector = "insightface"`, whose
    /// 106 points give the reference's anchors. Default `mesh`.
    pub anchors: String,
    /// RetinaFace only: detect every found face a second time in a 224x224 crop around it
    /// (about 125 px wide there), which makes the landmarks of small faces in large frames
    /// several times steadier, for about 25 % more detector time. Default true.
    pub refine_landmarks: bool,
    /// Frames per detector call (RetinaFace runs them as one batch). Default 8.
    pub batch_size: usize,
    /// Decoded batches buffered between the decoder thread and the detector. Default 2.
    pub queue_batches: usize,
    /// Minimum detector score of a usable face (LatentSync: 0.5). Default 0.5.
    pub min_score: f32,
    /// Minimum box width in frame pixels (LatentSync: 50). Default 50.
    pub min_width: f32,
    /// Minimum box height in frame pixels (LatentSync: 80). Default 80.
    pub min_height: f32,
    /// Smallest accepted box width/height ratio (LatentSync: 0.2). Default 0.2.
    pub min_aspect: f32,
    /// Largest accepted box width/height ratio (LatentSync: 1.5). Default 1.5.
    pub max_aspect: f32,
    /// IoU above which overlapping detections are suppressed (NMS). Default 0.4.
    pub nms_iou: f32,
    /// Which face to follow when several pass the filters: `largest` (LatentSync's rule,
    /// per frame), `index` (the `select_index`-th face counted from the left, per frame)
    /// or `track` (start with the largest, then follow it by IoU). Default `largest`.
    pub select: String,
    /// Face position for `select = "index"`, 0 = leftmost. Default 0.
    pub select_index: usize,
    /// Minimum IoU with the previous box for `select = "track"` to keep following a face;
    /// after `max_gap_frames` frames without a match the largest face is taken again.
    /// Default 0.3.
    pub track_min_iou: f32,
    /// Frames without a usable face: `fail` (the task fails with `no_face_detected`,
    /// naming the first such frame and its time; LatentSync's behaviour) or
    /// `passthrough` (those frames are marked absent and left untouched later).
    /// Default `fail`.
    pub on_missing: String,
    /// Gaps of at most this many frames without a face are bridged: interior gaps by
    /// linear interpolation of the neighbouring frames, gaps at the start or end by the
    /// nearest detected frame; bridged frames count as present (`interpolated = true`).
    /// 0 disables bridging. Default 5 (0.2 s).
    pub max_gap_frames: usize,
    /// Execution provider: `auto` (CUDA when this build has the `cuda` feature and the
    /// library supports it, else CPU), `cpu` or `cuda`. Default `auto`.
    pub device: String,
    /// ONNX Runtime intra-op threads; 0 lets ONNX Runtime choose (all cores). Default 0.
    pub intra_threads: usize,
    /// Path of the ONNX Runtime shared library; none uses `ORT_DYLIB_PATH` (set by
    /// `.local/env.sh`). Default none.
    pub ort_dylib_path: Option<PathBuf>,
}

impl Default for FaceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9102)),
            concurrency: 2,
            detector: "retinaface".into(),
            models_dir: PathBuf::from("models/generated/face"),
            insightface_det_model: None,
            insightface_landmark_model: None,
            det_size: 640,
            insightface_det_size: 512,
            anchors: "mesh".into(),
            refine_landmarks: true,
            batch_size: 8,
            queue_batches: 2,
            min_score: 0.5,
            min_width: 50.0,
            min_height: 80.0,
            min_aspect: 0.2,
            max_aspect: 1.5,
            nms_iou: 0.4,
            select: "largest".into(),
            select_index: 0,
            track_min_iou: 0.3,
            on_missing: "fail".into(),
            max_gap_frames: 5,
            device: "auto".into(),
            intra_threads: 0,
            ort_dylib_path: None,
        }
    }
}
