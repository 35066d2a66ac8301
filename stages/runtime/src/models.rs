//! The model manifest (`models/manifest.toml`): profiles, their files, sha256 sums and I/O
//! contracts. Stages resolve the configured profile at start-up and refuse a profile whose
//! files are missing or differ from the manifest (`model_unavailable`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;

use crate::config::ModelsConfig;

/// Errors resolving a model profile; all map to `model_unavailable`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The manifest cannot be read or parsed.
    #[error("model manifest {0}: {1}")]
    Manifest(String, String),
    /// No such profile, or `auto` found none installed.
    #[error("model profile `{0}` is not available: {1}")]
    Profile(String, String),
    /// A file is missing or its checksum differs.
    #[error("model file {0}: {1}")]
    File(String, String),
}

/// A tensor of a model's contract.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TensorSpec {
    /// ONNX name.
    pub name: String,
    /// `float32`, `int64`, ...
    pub dtype: String,
    /// Fixed sizes as integers, symbolic sizes as strings.
    pub shape: Vec<toml::Value>,
}

/// One model file of a profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ModelSpec {
    /// File name relative to the profile directory.
    pub file: String,
    /// Expected sha256 (empty: taken from the lock file).
    #[serde(default)]
    pub sha256: String,
    /// Inputs.
    #[serde(default)]
    pub inputs: Vec<TensorSpec>,
    /// Outputs.
    #[serde(default)]
    pub outputs: Vec<TensorSpec>,
}

/// Face-crop geometry of a profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct FaceSpec {
    /// Warped crop-box width.
    pub crop_width: u32,
    /// Warped crop-box height.
    pub crop_height: u32,
    /// Three template points in crop-box pixels.
    pub template: [[f64; 2]; 3],
    /// Fill value of warped pixels outside the frame.
    #[serde(default)]
    pub warp_fill: u8,
    /// Translation EMA weight of the previous bias.
    #[serde(default)]
    pub smoothing: f64,
}

/// DDIM scheduler settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct SchedulerSpec {
    /// Training steps (1000).
    pub num_train_timesteps: u32,
    /// First beta.
    pub beta_start: f64,
    /// Last beta.
    pub beta_end: f64,
    /// `scaled_linear`.
    pub beta_schedule: String,
    /// Added to every timestep (1).
    #[serde(default)]
    pub steps_offset: u32,
    /// `leading`.
    #[serde(default)]
    pub timestep_spacing: String,
    /// Whether the final alpha product is 1.
    #[serde(default)]
    pub set_alpha_to_one: bool,
    /// DDIM eta.
    #[serde(default)]
    pub eta: f64,
}

/// Inference defaults of a profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct InferenceSpec {
    /// Default DDIM steps.
    pub default_steps: u32,
    /// Default guidance.
    pub default_guidance_scale: f64,
    /// Default seed.
    #[serde(default)]
    pub default_seed: u64,
    /// Frames per UNet call.
    pub frames_per_chunk: usize,
}

/// The mask file of a profile.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct MaskSpec {
    /// File name relative to the profile directory.
    pub file: String,
    /// Drawn size.
    pub size: u32,
    /// Expected sha256 (empty: lock file).
    #[serde(default)]
    pub sha256: String,
}

/// VAE settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VaeSpec {
    /// Latent scaling factor (0.18215).
    pub scaling_factor: f64,
}

/// One profile of the manifest.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Profile {
    /// Human description.
    #[serde(default)]
    pub description: String,
    /// Real weights (false: random test weights, warn loudly).
    pub real: bool,
    /// Directory relative to the manifest's folder.
    pub dir: String,
    /// Lock file with sha256 sums, relative to `dir`.
    #[serde(default)]
    pub lock_file: Option<String>,
    /// Square model resolution.
    pub resolution: u32,
    /// VAE.
    pub vae: VaeSpec,
    /// Scheduler.
    pub scheduler: SchedulerSpec,
    /// Inference defaults.
    pub inference: InferenceSpec,
    /// Face-crop geometry.
    pub face: FaceSpec,
    /// Mask.
    pub mask: MaskSpec,
    /// Model files by role: whisper_encoder, vae_encoder, vae_decoder, unet.
    pub models: BTreeMap<String, ModelSpec>,
    /// Everything else (audio recipe, ...), kept for stages that need it.
    #[serde(flatten)]
    pub extra: BTreeMap<String, toml::Value>,
}

/// The parsed manifest.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Layout version.
    pub schema_version: u32,
    /// Profiles by name.
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Deserialize, Default)]
struct Lock {
    #[serde(default)]
    models: BTreeMap<String, LockEntry>,
    #[serde(default)]
    mask: Option<LockEntry>,
    /// Per role: the external-data file of a graph over 2 GB (the exporter's UNet).
    #[serde(default)]
    external_data: BTreeMap<String, LockEntry>,
}

#[derive(Debug, Deserialize)]
struct LockEntry {
    file: String,
    sha256: String,
    #[serde(default)]
    bytes: Option<u64>,
}

/// A profile resolved to absolute, verified file paths.
#[derive(Debug, Clone)]
pub struct ResolvedProfile {
    /// Profile name.
    pub name: String,
    /// Its manifest entry.
    pub profile: Profile,
    /// Absolute directory.
    pub dir: PathBuf,
}

impl ResolvedProfile {
    /// Path of a model role's file.
    pub fn model_path(&self, role: &str) -> Option<PathBuf> {
        self.profile
            .models
            .get(role)
            .map(|m| self.dir.join(&m.file))
    }
    /// Path of the mask file.
    pub fn mask_path(&self) -> PathBuf {
        self.dir.join(&self.profile.mask.file)
    }
    /// The warning every task of a test profile carries.
    pub fn warning(&self) -> Option<String> {
        (!self.profile.real).then(|| {
            format!(
                "model profile `{}` has random test weights: the mouth region is noise, not a real lip-sync result",
                self.name
            )
        })
    }
}

impl Manifest {
    /// Read and parse a manifest.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Manifest(path.display().to_string(), e.to_string()))?;
        toml::from_str(&text)
            .map_err(|e| ModelError::Manifest(path.display().to_string(), e.to_string()))
    }
}

/// Sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Check one profile's files against the manifest and its lock file. `roles` limits the
/// check to the models a stage loads (empty: all of them).
pub fn verify(
    manifest_path: &Path,
    name: &str,
    roles: &[&str],
) -> Result<ResolvedProfile, ModelError> {
    let manifest = Manifest::load(manifest_path)?;
    let profile = manifest
        .profiles
        .get(name)
        .cloned()
        .ok_or_else(|| ModelError::Profile(name.into(), "not in the manifest".into()))?;
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let dir = base.join(&profile.dir);
    let lock: Lock = match &profile.lock_file {
        Some(l) if dir.join(l).exists() => {
            let text = std::fs::read_to_string(dir.join(l))
                .map_err(|e| ModelError::File(l.clone(), e.to_string()))?;
            toml::from_str(&text).map_err(|e| ModelError::File(l.clone(), e.to_string()))?
        }
        _ => Lock::default(),
    };
    let check = |file: &str, want: &str, locked: Option<&LockEntry>| -> Result<(), ModelError> {
        let path = dir.join(file);
        if !path.exists() {
            return Err(ModelError::File(
                file.into(),
                format!(
                    "missing from {} (run `make models` or `make setup`)",
                    dir.display()
                ),
            ));
        }
        let want = if want.is_empty() {
            locked
                .filter(|l| l.file == file)
                .map(|l| l.sha256.as_str())
                .unwrap_or("")
        } else {
            want
        };
        if want.is_empty() {
            return Err(ModelError::File(file.into(), "no sha256 recorded".into()));
        }
        let got = sha256_file(&path).map_err(|e| ModelError::File(file.into(), e.to_string()))?;
        if got != want {
            return Err(ModelError::File(
                file.into(),
                format!("sha256 {got} differs from the manifest's {want}"),
            ));
        }
        Ok(())
    };
    for (role, spec) in &profile.models {
        if roles.is_empty() || roles.contains(&role.as_str()) {
            check(&spec.file, &spec.sha256, lock.models.get(role))?;
            // The weights of a graph stored with external data: a truncated or swapped
            // file would otherwise load as garbage weights.
            if let Some(data) = lock.external_data.get(role) {
                let path = dir.join(&data.file);
                let len = std::fs::metadata(&path).map(|m| m.len()).ok();
                if let (Some(want), Some(got)) = (data.bytes, len)
                    && want != got
                {
                    return Err(ModelError::File(
                        data.file.clone(),
                        format!("{got} bytes, the lock file says {want}"),
                    ));
                }
                check(&data.file, "", Some(data))?;
            }
        }
    }
    check(&profile.mask.file, &profile.mask.sha256, lock.mask.as_ref())?;
    let dir = dir.canonicalize().unwrap_or(dir);
    Ok(ResolvedProfile {
        name: name.into(),
        profile,
        dir,
    })
}

/// Resolve `models.profile`: a named profile must verify; `auto` takes the best installed
/// real profile (1.6, then 1.5) and falls back to `tiny` with a loud warning.
pub fn resolve(cfg: &ModelsConfig, roles: &[&str]) -> Result<ResolvedProfile, ModelError> {
    if cfg.profile != "auto" {
        return verify(&cfg.manifest, &cfg.profile, roles);
    }
    for name in ["latentsync-1.6", "latentsync-1.5"] {
        if let Ok(p) = verify(&cfg.manifest, name, roles) {
            return Ok(p);
        }
    }
    let p = verify(&cfg.manifest, "tiny", roles)
        .map_err(|e| ModelError::Profile("auto".into(), format!("no profile installed: {e}")))?;
    tracing::warn!(
        profile = "tiny",
        "no real LatentSync weights installed: using the random-weight test profile; results are NOT real lip-sync"
    );
    Ok(p)
}

/// Name of the profile this deployment serves, without checksumming anything (cheap; for
/// the gateway's default model): a named profile as configured; for `auto`, the first
/// real profile whose files are all present, else `tiny`.
pub fn service_profile_name(cfg: &ModelsConfig) -> String {
    if cfg.profile != "auto" {
        return cfg.profile.clone();
    }
    if let Ok(m) = Manifest::load(&cfg.manifest) {
        let base = cfg.manifest.parent().unwrap_or(Path::new("."));
        for name in ["latentsync-1.6", "latentsync-1.5"] {
            if let Some(p) = m.profiles.get(name) {
                let dir = base.join(&p.dir);
                if p.models.values().all(|f| dir.join(&f.file).is_file()) {
                    return name.to_owned();
                }
            }
        }
    }
    "tiny".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/manifest.toml")
    }

    #[test]
    fn shipped_manifest_parses_with_every_profile() {
        let m = Manifest::load(&manifest()).unwrap();
        for name in ["tiny", "latentsync-1.5", "latentsync-1.6"] {
            let p = &m.profiles[name];
            for role in ["whisper_encoder", "vae_encoder", "vae_decoder", "unet"] {
                assert!(p.models.contains_key(role), "{name} lacks {role}");
            }
            assert_eq!(p.vae.scaling_factor, 0.18215);
        }
        assert_eq!(m.profiles["latentsync-1.6"].resolution, 512);
        assert_eq!(m.profiles["latentsync-1.6"].face.crop_width, 420);
        assert_eq!(m.profiles["latentsync-1.5"].face.crop_height, 280);
        assert!(!m.profiles["tiny"].real);
    }

    #[test]
    fn missing_or_tampered_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(manifest()).unwrap();
        let mpath = dir.path().join("manifest.toml");
        std::fs::write(&mpath, text).unwrap();
        let err = verify(&mpath, "tiny", &[]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let err = verify(&mpath, "nope", &[]).unwrap_err();
        assert!(matches!(err, ModelError::Profile(..)));

        // A file with the wrong checksum.
        let tiny = dir.path().join("generated/tiny");
        std::fs::create_dir_all(&tiny).unwrap();
        std::fs::write(tiny.join("unet.onnx"), b"garbage").unwrap();
        std::fs::write(
            tiny.join("manifest.lock.toml"),
            format!(
                "[models.unet]\nfile = \"unet.onnx\"\nsha256 = \"{}\"\n",
                "0".repeat(64)
            ),
        )
        .unwrap();
        let err = verify(&mpath, "tiny", &["unet"]).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");

        // A graph with external data: its data file is checked too.
        let unet_sha = sha256_file(&tiny.join("unet.onnx")).unwrap();
        let data = b"weights".repeat(10);
        let lock = |bytes: usize, sha: &str| {
            format!(
                "[models.unet]\nfile = \"unet.onnx\"\nsha256 = \"{unet_sha}\"\n\n\
                 [external_data.unet]\nfile = \"unet.onnx.data\"\nsha256 = \"{sha}\"\nbytes = {bytes}\n"
            )
        };
        let data_path = tiny.join("unet.onnx.data");
        std::fs::write(&data_path, &data).unwrap();
        let data_sha = sha256_file(&data_path).unwrap();
        let lock_path = tiny.join("manifest.lock.toml");
        std::fs::write(&lock_path, lock(data.len(), &data_sha)).unwrap();
        let ok = verify(&mpath, "tiny", &["unet"]);
        // Only the mask is missing now: the UNet and its data passed.
        assert!(ok.unwrap_err().to_string().contains("mask"));
        std::fs::write(&data_path, &data[..data.len() - 1]).unwrap();
        let err = verify(&mpath, "tiny", &["unet"]).unwrap_err();
        assert!(err.to_string().contains("the lock file says 70"), "{err}");
        std::fs::write(&data_path, b"Weights".repeat(10)).unwrap();
        let err = verify(&mpath, "tiny", &["unet"]).unwrap_err();
        assert!(
            err.to_string().contains("unet.onnx.data") && err.to_string().contains("differs"),
            "{err}"
        );
        std::fs::remove_file(&data_path).unwrap();
        let err = verify(&mpath, "tiny", &["unet"]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
