//! `[infer]` section: settings of the infer stage.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::media::LengthMode;

/// Settings of the infer stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9104`.
    pub listen: SocketAddr,
    /// GPU workers in this process: jobs handled at once (one per GPU, device ids
    /// 0..gpu_workers) and the consumer's `max_ack_pending`. Default 1.
    pub gpu_workers: usize,
    /// Execution provider: `auto` (CUDA when the binary was built with the `cuda` feature
    /// and ONNX Runtime offers it, else CPU), `cpu` or `cuda` (refuse to start without
    /// CUDA). Default `auto`.
    pub device: String,
    /// ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime choose (all cores).
    /// Default 0.
    pub intra_threads: usize,
    /// The ONNX Runtime shared library; empty: the `ORT_DYLIB_PATH` environment variable.
    /// Default empty.
    pub ort_dylib_path: Option<PathBuf>,
    /// How the video is fitted to the audio length: `pingpong` (the reference), `loop` or
    /// `cut`. Default `pingpong`.
    pub length_mode: LengthMode,
    /// Sample the VAE posterior (seeded, like the reference) instead of taking its mean.
    /// Default false (the mean: deterministic and slightly sharper).
    pub vae_sample: bool,
    /// Video codec of the generated-crops artifact: `x264` (libx264 yuv444p at
    /// `crops_crf`, near-lossless) or `ffv1` (lossless, larger). Default `x264`.
    pub crops_codec: String,
    /// x264 constant rate factor of the crops artifact (lower: larger, closer to lossless).
    /// Default 8.
    pub crops_crf: u32,
    /// Chunks prepared ahead of the model (bounded queue between the CPU threads and the
    /// model thread). Default 2.
    pub prefetch_chunks: usize,
}

impl Default for InferConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9104)),
            gpu_workers: 1,
            device: "auto".into(),
            intra_threads: 0,
            ort_dylib_path: None,
            length_mode: LengthMode::Pingpong,
            vae_sample: false,
            crops_codec: "x264".into(),
            crops_crf: 8,
            prefetch_chunks: 2,
        }
    }
}
