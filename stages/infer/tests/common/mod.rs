//! Shared set-up of the infer pipeline tests on the `tiny` profile: its config, test
//! clips, a face track over them, decoded crops and a control that never stops.

use std::path::{Path, PathBuf};
use std::process::Command;

use lipsync_infer::frames::CropGeometry;
use lipsync_infer::pipeline::Control;
use lipsync_infer::synthetic;
use lipsync_runtime::Config;
use lipsync_schemas::FaceTrack;

/// Width of the test clips.
pub const W: u32 = 320;
/// Height of the test clips.
pub const H: u32 = 240;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `tiny` profile on one intra-op thread.
pub fn config() -> Config {
    let mut cfg = Config::default();
    cfg.models.profile = "tiny".into();
    cfg.models.manifest = root().join("models/manifest.toml");
    cfg.infer.intra_threads = 1;
    cfg
}

/// A `W x H` test clip of `frames` frames in `dir`.
pub fn clip(dir: &Path, frames: usize) -> PathBuf {
    lipsync_tests::pattern_clip(dir, W, H, frames)
}

/// A synthetic face track of `frames` frames of a test clip, for crops of geometry `g`.
pub fn track(g: &CropGeometry, frames: usize) -> FaceTrack {
    synthetic::face_track(
        W,
        H,
        frames,
        g.crop_w as u32,
        g.crop_h as u32,
        g.resolution as u32,
    )
}

/// Decoded RGB24 frames of a crops file.
pub fn decode(path: &Path) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
        .output()
        .expect("ffmpeg");
    assert!(out.status.success());
    out.stdout
}

/// Runs every step.
pub struct Go;

impl Control for Go {
    fn step(&mut self, _: u64, _: u64) -> bool {
        true
    }
}
