//! Validated settings from the `[face]` and `[models]` configuration sections, the
//! detector factory and the crop geometry of model profiles.

use std::path::{Path, PathBuf};

use lipsync_runtime::config::{FaceConfig, ModelsConfig};
use lipsync_runtime::models::{Manifest, Profile};

use crate::align::Geometry;
use crate::detect::mesh::MeshAnchors;
use crate::detect::session::{Device, SessionOptions};
use crate::detect::{BlazeFace, Detector, DetectorKind, InsightFace, RetinaFace};
use crate::error::{FaceError, Result};
use crate::pipeline::TrackSettings;
use crate::select::{Filters, Policy};
use crate::track::OnMissing;

/// RetinaFace file in `face.models_dir`.
pub const RETINAFACE_FILE: &str = "retinaface_mnet025.onnx";
/// BlazeFace short-range file in `face.models_dir`.
pub const BLAZEFACE_FRONT_FILE: &str = "face_detection_front_128x128_barracuda.onnx";
/// BlazeFace full-range file in `face.models_dir`.
pub const BLAZEFACE_BACK_FILE: &str = "face_detection_back_256x256_barracuda.onnx";
/// Face-mesh file in `face.models_dir` (for `face.anchors = "mesh"`).
pub const FACE_MESH_FILE: &str = "face_mesh_468.onnx";

/// Everything the stage needs to build detectors and track videos.
#[derive(Debug, Clone)]
pub struct FaceSettings {
    /// Detector choice.
    pub detector: DetectorKind,
    /// Folder of the set-up's detector files.
    pub models_dir: PathBuf,
    /// Session options.
    pub session: SessionOptions,
    /// Detector input size.
    pub det_size: u32,
    /// SCRFD input size (InsightFace).
    pub insightface_det_size: u32,
    /// NMS IoU.
    pub nms_iou: f32,
    /// RetinaFace second pass on face crops.
    pub refine: bool,
    /// Anchors from the face mesh (`face.anchors = "mesh"`).
    pub mesh_anchors: bool,
    /// Tracking settings.
    pub track: TrackSettings,
}

impl FaceSettings {
    /// Validates `cfg`.
    ///
    /// # Errors
    /// [`FaceError::Config`] naming the bad key.
    pub fn from_config(cfg: &FaceConfig) -> Result<Self> {
        let detector = match cfg.detector.as_str() {
            "retinaface" => DetectorKind::RetinaFace,
            "blazeface" => DetectorKind::BlazeFaceFront,
            "blazeface-back" => DetectorKind::BlazeFaceBack,
            "insightface" => {
                let need = |p: &Option<PathBuf>, key: &str| {
                    p.clone().ok_or_else(|| {
                        FaceError::Config(format!(
                            "face.detector = \"insightface\" needs face.{key} (the user-supplied InsightFace file)"
                        ))
                    })
                };
                DetectorKind::InsightFace {
                    det: need(&cfg.insightface_det_model, "insightface_det_model")?,
                    landmarks: need(
                        &cfg.insightface_landmark_model,
                        "insightface_landmark_model",
                    )?,
                }
            }
            other => {
                return Err(FaceError::Config(format!(
                    "face.detector: `{other}` is not one of retinaface, blazeface, blazeface-back, insightface"
                )));
            }
        };
        if !(32..=4096).contains(&cfg.det_size) {
            return Err(FaceError::Config(
                "face.det_size must be within 32..=4096".into(),
            ));
        }
        if !(32..=4096).contains(&cfg.insightface_det_size)
            || !cfg.insightface_det_size.is_multiple_of(32)
        {
            return Err(FaceError::Config(
                "face.insightface_det_size must be a multiple of 32 within 32..=4096".into(),
            ));
        }
        let mesh_anchors = match cfg.anchors.as_str() {
            "five-point" => false,
            // InsightFace has the reference's own 106 points: its anchors come from them.
            "mesh" => !matches!(detector, DetectorKind::InsightFace { .. }),
            other => {
                return Err(FaceError::Config(format!(
                    "face.anchors: `{other}` is not one of five-point, mesh"
                )));
            }
        };
        if cfg.batch_size == 0 || cfg.batch_size > 256 {
            return Err(FaceError::Config(
                "face.batch_size must be within 1..=256".into(),
            ));
        }
        // NaN fails too: a comparison with NaN is never `Less` or `Equal`.
        if cfg
            .min_aspect
            .partial_cmp(&cfg.max_aspect)
            .is_none_or(|o| o.is_gt())
        {
            return Err(FaceError::Config(
                "face.min_aspect must not exceed face.max_aspect".into(),
            ));
        }
        Ok(Self {
            detector,
            models_dir: cfg.models_dir.clone(),
            session: SessionOptions {
                device: Device::parse(&cfg.device)?,
                intra_threads: cfg.intra_threads,
                library: cfg.ort_dylib_path.clone(),
            },
            det_size: cfg.det_size,
            insightface_det_size: cfg.insightface_det_size,
            nms_iou: cfg.nms_iou,
            refine: cfg.refine_landmarks,
            mesh_anchors,
            track: TrackSettings {
                filters: Filters {
                    min_score: cfg.min_score,
                    min_width: cfg.min_width,
                    min_height: cfg.min_height,
                    min_aspect: cfg.min_aspect,
                    max_aspect: cfg.max_aspect,
                },
                policy: Policy::parse(
                    &cfg.select,
                    cfg.select_index,
                    cfg.track_min_iou,
                    cfg.max_gap_frames.max(1),
                )?,
                on_missing: OnMissing::parse(&cfg.on_missing)?,
                max_gap: cfg.max_gap_frames,
                batch_size: cfg.batch_size,
                queue_batches: cfg.queue_batches,
                decode: Default::default(),
            },
        })
    }

    /// Builds a detector.
    ///
    /// # Errors
    /// [`FaceError::Model`] when its files are missing or cannot be loaded.
    pub fn build_detector(&self) -> Result<Box<dyn Detector>> {
        let min_score = self.track.filters.min_score;
        let dir = &self.models_dir;
        let det: Box<dyn Detector> = match &self.detector {
            DetectorKind::RetinaFace => Box::new(RetinaFace::new(
                &dir.join(RETINAFACE_FILE),
                &self.session,
                self.det_size,
                min_score,
                self.nms_iou,
                self.refine,
            )?),
            DetectorKind::BlazeFaceFront => Box::new(BlazeFace::new(
                &dir.join(BLAZEFACE_FRONT_FILE),
                &self.session,
                false,
                min_score,
                self.nms_iou,
            )?),
            DetectorKind::BlazeFaceBack => Box::new(BlazeFace::new(
                &dir.join(BLAZEFACE_BACK_FILE),
                &self.session,
                true,
                min_score,
                self.nms_iou,
            )?),
            DetectorKind::InsightFace { det, landmarks } => Box::new(InsightFace::new(
                det,
                landmarks,
                &self.session,
                self.insightface_det_size,
                min_score,
                self.nms_iou,
            )?),
        };
        Ok(if self.mesh_anchors {
            Box::new(MeshAnchors::new(
                det,
                &dir.join(FACE_MESH_FILE),
                &self.session,
            )?)
        } else {
            det
        })
    }
}

/// Crop geometry of every profile in the manifest, and the configured default.
#[derive(Debug, Clone)]
pub struct Geometries {
    manifest: Manifest,
    default: String,
}

impl Geometries {
    /// Reads the manifest and picks the configured profile: a named one, or for `auto`
    /// the first real profile (1.6, then 1.5) whose files are present, else `tiny`. Only
    /// file presence is checked here: the face stage needs the geometry, not the weights
    /// (the infer stage verifies checksums).
    ///
    /// # Errors
    /// [`FaceError::Model`] when the manifest cannot be read or names no such profile.
    pub fn load(cfg: &ModelsConfig) -> Result<Self> {
        let manifest =
            Manifest::load(&cfg.manifest).map_err(|e| FaceError::Model(e.to_string()))?;
        let base = cfg.manifest.parent().unwrap_or(Path::new("."));
        let default = if cfg.profile == "auto" {
            ["latentsync-1.6", "latentsync-1.5"]
                .into_iter()
                .find(|n| {
                    manifest
                        .profiles
                        .get(*n)
                        .is_some_and(|p| p.real && files_present(base, p))
                })
                .unwrap_or("tiny")
                .to_owned()
        } else {
            cfg.profile.clone()
        };
        if !manifest.profiles.contains_key(&default) {
            return Err(FaceError::Model(format!(
                "model profile `{default}` is not in the manifest"
            )));
        }
        Ok(Self { manifest, default })
    }

    /// The default profile's name.
    pub fn default_profile(&self) -> &str {
        &self.default
    }

    /// Geometry for a task's model: the profile of that name if the manifest has it,
    /// else the configured default.
    pub fn for_model(&self, model: &str) -> Geometry {
        let (name, p) = match self.manifest.profiles.get_key_value(model) {
            Some((n, p)) => (n.clone(), p),
            None => (self.default.clone(), &self.manifest.profiles[&self.default]),
        };
        Geometry {
            profile: name,
            crop_w: p.face.crop_width,
            crop_h: p.face.crop_height,
            resolution: p.resolution,
            template: p.face.template,
            smoothing: p.face.smoothing,
        }
    }
}

fn files_present(base: &Path, p: &Profile) -> bool {
    let dir = base.join(&p.dir);
    p.models.values().all(|m| dir.join(&m.file).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_choices_name_the_key() {
        let cfg = FaceConfig::default();
        let s = FaceSettings::from_config(&cfg).unwrap();
        assert_eq!(s.detector, DetectorKind::RetinaFace);
        assert_eq!(s.track.on_missing, OnMissing::Fail);
        for (key, mutate) in [
            (
                "face.detector",
                Box::new(|c: &mut FaceConfig| c.detector = "x".into())
                    as Box<dyn Fn(&mut FaceConfig)>,
            ),
            (
                "face.select",
                Box::new(|c: &mut FaceConfig| c.select = "x".into()),
            ),
            (
                "face.on_missing",
                Box::new(|c: &mut FaceConfig| c.on_missing = "x".into()),
            ),
            (
                "face.device",
                Box::new(|c: &mut FaceConfig| c.device = "tpu".into()),
            ),
            (
                "insightface_det_model",
                Box::new(|c: &mut FaceConfig| c.detector = "insightface".into()),
            ),
        ] {
            let mut c = FaceConfig::default();
            mutate(&mut c);
            let err = FaceSettings::from_config(&c).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn geometry_comes_from_the_manifest() {
        let cfg = ModelsConfig {
            profile: "tiny".into(),
            manifest: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/manifest.toml"),
        };
        let g = Geometries::load(&cfg).unwrap();
        let tiny = g.for_model("tiny");
        assert_eq!((tiny.crop_w, tiny.crop_h, tiny.resolution), (210, 280, 256));
        assert_eq!(tiny.smoothing, 0.2);
        let big = g.for_model("latentsync-1.6");
        assert_eq!((big.crop_w, big.crop_h, big.resolution), (420, 560, 512));
        assert_eq!(big.template[2], [210.0, 224.0]);
        assert_eq!(g.for_model("unknown").profile, "tiny");
    }
}
