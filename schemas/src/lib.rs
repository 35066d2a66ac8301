//! Wire types of the lipsync service: work items, the task record, progress events, the
//! closed error-code enum and the NATS names. No I/O lives here.

mod error;
pub mod names;
mod task;
mod track;
mod work;

pub use error::{ErrorCode, TaskError};
pub use task::{
    InputSource, JoinState, MediaSummary, NextWork, StageDone, StageTiming, Status,
    TASK_RECORD_VERSION, TaskRecord, TaskRequest, redact_url,
};
pub use track::{FACE_TRACK_VERSION, FaceFrame, FaceTrack};
pub use work::{
    AudioJob, DecodeError, FaceJob, FetchJob, InferJob, LengthMode, MIN_WORK_VERSION, MuxJob,
    VideoStream, WORK_VERSION, WorkItem, decode, salvage_task_id,
};

use serde::{Deserialize, Serialize};

/// A pipeline stage. Also the name of its consumer and the last part of its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Download, probe and validate inputs.
    Fetch,
    /// Face detection and alignment track.
    Face,
    /// Whisper features.
    Audio,
    /// Diffusion inference on the GPU.
    Infer,
    /// Paste back, encode, publish outputs.
    Mux,
}

impl Stage {
    /// Every stage in pipeline order.
    pub const ALL: [Stage; 5] = [
        Stage::Fetch,
        Stage::Face,
        Stage::Audio,
        Stage::Infer,
        Stage::Mux,
    ];

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Face => "face",
            Stage::Audio => "audio",
            Stage::Infer => "infer",
            Stage::Mux => "mux",
        }
    }

    /// The progress band `[from, to)` the stage reports into (docs/architecture.md §5).
    pub fn progress_band(self) -> (f64, f64) {
        match self {
            Stage::Fetch => (0.0, 0.10),
            Stage::Face | Stage::Audio => (0.10, 0.25),
            Stage::Infer => (0.25, 0.90),
            Stage::Mux => (0.90, 1.0),
        }
    }

    /// Map a fraction of this stage's own work onto overall progress.
    pub fn progress_at(self, fraction: f64) -> f64 {
        let (lo, hi) = self.progress_band();
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        lo + (hi - lo) * f
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown stage `{s}`"))
    }
}
