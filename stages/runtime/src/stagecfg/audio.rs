//! `[audio]` section: settings of the audio stage.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the audio stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AudioConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9103`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process (one encoder session each). Default 2.
    pub concurrency: usize,
    /// Seconds shared by consecutive 30 s encoder windows, cross-faded linearly in the
    /// output; removes the feature jump (lip twitch) at every 30 s boundary of the
    /// reference (LatentSync issues #121, #132, #151). 0 reproduces the reference exactly;
    /// at most 15. Rounded to 20 ms positions. Default 0.
    pub window_overlap_s: f64,
    /// Element type of the stored features: `f16` (half the size; the reference runs
    /// the encoder in fp16 on GPU) or `f32`. Default `f16`.
    pub features_dtype: String,
    /// Execution provider of the encoder: `auto` (CUDA when the binary was built with the
    /// `cuda` feature and ONNX Runtime offers it, else CPU), `cpu` or `cuda` (refuse to
    /// start without CUDA). Default `auto`.
    pub device: String,
    /// ONNX Runtime intra-op threads per encoder session; 0 lets ONNX Runtime choose
    /// (all cores). Default 0.
    pub intra_threads: usize,
    /// The ONNX Runtime shared library; empty: the `ORT_DYLIB_PATH` environment variable.
    /// Default empty.
    pub ort_dylib_path: Option<PathBuf>,
    /// The ffmpeg binary, used when the 16 kHz input is not a plain 16-bit mono WAV and
    /// by the `mel`/`features` commands. Default `ffmpeg` (from PATH).
    pub ffmpeg: PathBuf,
}

impl Default for AudioConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9103)),
            concurrency: 2,
            window_overlap_s: 0.0,
            features_dtype: "f16".into(),
            device: "auto".into(),
            intra_threads: 0,
            ort_dylib_path: None,
            ffmpeg: PathBuf::from("ffmpeg"),
        }
    }
}
