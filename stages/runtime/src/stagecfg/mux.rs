//! `[mux]` section: settings of the mux stage.
//!
//! Choice-valued keys are strings here (the mux crate parses and validates them at
//! start-up and refuses unknown values with exit code 64); see each key for the values.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Settings of the mux stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuxConfig {
    /// Address of the health/metrics endpoint. Default `127.0.0.1:9105`.
    pub listen: SocketAddr,
    /// Jobs handled at once per process. Each job runs a decoder and two x264 encoders,
    /// so more than 2 rarely helps on one machine. Default 2.
    pub concurrency: usize,
    /// x264 constant rate factor of the result video (0 = lossless, 51 = worst; the
    /// reference's final encode uses 18). Default 18.
    pub crf: u8,
    /// x264 preset of the result video: `ultrafast` ... `placebo`. Default `medium`.
    pub preset: String,
    /// x264 threads of the result encoder; 0 lets x264 choose (1.5 per core). Each
    /// thread holds frames in flight, so on many-core machines a limit bounds memory
    /// (about 600 MB at 1080p with the default on 2 cores). Default 0.
    pub encoder_threads: u32,
    /// x264 constant rate factor of the mask video. Default 23.
    pub mask_crf: u8,
    /// x264 preset of the mask video (mostly flat grey; `ultrafast` keeps its CPU and
    /// memory small; it runs with 2 threads). Default `ultrafast`.
    pub mask_preset: String,
    /// Audio track of the result: `resampled` (the 16 kHz mono copy the model heard, as
    /// the reference does) or `original` (the user's audio track at its original rate and
    /// channels). Both are encoded as AAC and trimmed to the video length.
    /// Default `resampled`.
    pub audio: String,
    /// AAC bit rate, e.g. `128k`; none lets ffmpeg choose for the channel layout.
    /// Default none.
    pub audio_bitrate: Option<String>,
    /// Also write `{local_dir}/{task_id}/result.mp4` and `mask.mp4` on local disk (the
    /// seed's `outputs/` folder; `make up` sets `outputs`). The gateway serves the
    /// artifact-store copies either way. Default none (artifact store only).
    pub local_dir: Option<PathBuf>,
    /// Delete the task's intermediate artifacts (inputs, 16 kHz audio, face track,
    /// audio features, crops) once the task is completed. Default true.
    pub delete_intermediates: bool,
    /// Memory of the window a backward ping-pong lap is re-decoded into (RGB frames of
    /// W*H*3 bytes; at least one frame). Nothing is spooled to disk: each window re-runs
    /// the forward decode up to its last frame, so a backward lap of n frames decodes
    /// about n^2 / (2K) + n frames for K frames per window (K = 86 at 1080p with the
    /// default). Larger windows cost memory, smaller ones decode time. Default 512 MiB.
    pub pingpong_window_bytes: u64,
    /// Time limit of one PUT of the result to a task's `output_upload_url` (connect to
    /// last byte answered), in seconds. Uploads go through the download policy's SSRF
    /// guard (`fetch.allow_private_networks`, `fetch.allow_cidrs`, `fetch.allowed_ports`,
    /// `fetch.nat64_prefixes`; `fetch.connect_timeout_s` and `fetch.read_timeout_s`),
    /// which the gateway also checks the URL against. Default 600.
    pub upload_timeout_s: u64,
    /// PUTs of the result per delivery of the mux job before it counts as failed (a
    /// retryable failure: the job is delivered again up to `nats.max_deliver` times,
    /// re-uploading the stored result without rendering again; after the last one the
    /// task fails with `output_upload_failed`, its result still downloadable). 4xx answers
    /// other than 408/429 and refused URLs are not retried. At least 1. Default 3.
    pub upload_tries: u32,
    /// Wait before the second PUT in milliseconds, doubled for each further one (at most
    /// 30 s). Default 1000.
    pub upload_backoff_ms: u64,
}

impl Default for MuxConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9105)),
            concurrency: 2,
            crf: 18,
            preset: "medium".into(),
            encoder_threads: 0,
            mask_crf: 23,
            mask_preset: "ultrafast".into(),
            audio: "resampled".into(),
            audio_bitrate: None,
            local_dir: None,
            delete_intermediates: true,
            pingpong_window_bytes: 512 << 20,
            upload_timeout_s: 600,
            upload_tries: 3,
            upload_backoff_ms: 1000,
        }
    }
}
