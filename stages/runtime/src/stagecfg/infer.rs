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
    /// DeepCache: 0 runs the exact UNet at every DDIM step; n > 0 runs the full UNet (which
    /// also returns its deep feature) at steps 0, n, 2n, ... of each chunk and the shallow
    /// step that reuses that feature in between, as the reference's DeepCache helper does
    /// (its demos use 3: about 2x fewer UNet FLOPs, an approximation). Needs the profile's
    /// DeepCache graphs (`make models`). At most 50. Default 0.
    pub deepcache_interval: u32,
    /// Put ONNX Runtime's TensorRT execution provider before CUDA (needs a binary built with
    /// the `tensorrt` feature and TensorRT 10 libraries from the PyPI `tensorrt` wheels on
    /// the library path). The first start builds engines (minutes) into
    /// `tensorrt_cache_dir`; later starts reuse them. Default false.
    pub tensorrt: bool,
    /// TensorRT engine and timing cache folder; empty: `.local/trt-cache`. Default empty.
    pub tensorrt_cache_dir: Option<PathBuf>,
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
            deepcache_interval: 0,
            tensorrt: false,
            tensorrt_cache_dir: None,
        }
    }
}
