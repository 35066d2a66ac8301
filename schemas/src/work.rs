//! Versioned work items, one per stage. Messages carry artifact keys, never media bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{InputSource, Stage};

/// Current work-item version written by this build.
pub const WORK_VERSION: u32 = 1;
/// Oldest work-item version this build still reads.
pub const MIN_WORK_VERSION: u32 = 1;

fn v1() -> u32 {
    WORK_VERSION
}

/// Work for the fetch stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchJob {
    /// Work-item version.
    #[serde(default = "v1")]
    pub v: u32,
    /// Task the work belongs to.
    pub task_id: String,
    /// Video input.
    pub video: InputSource,
    /// Audio input.
    pub audio: InputSource,
}

/// The video stream fetch validated (container index and display size): the later
/// stages decode exactly this stream and deliver frames at this size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VideoStream {
    /// Container stream index (`-map 0:<index>`).
    pub index: u32,
    /// Width in pixels after rotation.
    pub width: u32,
    /// Height in pixels after rotation.
    pub height: u32,
}

/// Work for the face stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaceJob {
    /// Work-item version.
    #[serde(default = "v1")]
    pub v: u32,
    /// Task the work belongs to.
    pub task_id: String,
    /// Artifact key of the original video.
    pub video: String,
    /// The validated video stream (absent in work from before it was recorded: the
    /// first video stream that is not an attached picture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_stream: Option<VideoStream>,
}

/// Work for the audio stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioJob {
    /// Work-item version.
    #[serde(default = "v1")]
    pub v: u32,
    /// Task the work belongs to.
    pub task_id: String,
    /// Artifact key of the 16 kHz mono WAV.
    pub audio_16k: String,
}

/// Work for the inference stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferJob {
    /// Work-item version.
    #[serde(default = "v1")]
    pub v: u32,
    /// Task the work belongs to.
    pub task_id: String,
    /// Artifact key of the original video.
    pub video: String,
    /// Artifact key of the face track.
    pub face_track: String,
    /// Artifact key of the audio features.
    pub audio_features: String,
    /// The validated video stream (absent in work from before it was recorded: the
    /// first video stream that is not an attached picture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_stream: Option<VideoStream>,
}

/// Work for the mux stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MuxJob {
    /// Work-item version.
    #[serde(default = "v1")]
    pub v: u32,
    /// Task the work belongs to.
    pub task_id: String,
    /// Artifact key of the original video.
    pub video: String,
    /// Artifact key of the face track.
    pub face_track: String,
    /// Artifact key of the generated crops.
    pub crops: String,
    /// Artifact key of the original audio input.
    pub audio_original: String,
    /// Artifact key of the 16 kHz mono WAV.
    pub audio_16k: String,
    /// Number of output frames (the crops artifact has exactly this many).
    #[serde(default)]
    pub output_frames: u64,
    /// How output frames map to video frames (the runtime's `media::frame_map`).
    #[serde(default)]
    pub length_mode: LengthMode,
    /// The validated video stream (absent in work from before it was recorded: the
    /// first video stream that is not an attached picture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_stream: Option<VideoStream>,
}

/// How the video is fitted to the audio length. Wire words `pingpong`, `loop`, `cut`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LengthMode {
    /// Forward, backward, forward, ... (the reference's behaviour).
    #[default]
    Pingpong,
    /// Forward, forward, ...
    Loop,
    /// Never repeat: the output is cut to the shorter of video and audio.
    Cut,
}

impl LengthMode {
    /// The wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            LengthMode::Pingpong => "pingpong",
            LengthMode::Loop => "loop",
            LengthMode::Cut => "cut",
        }
    }
}

/// Implemented by every work item: which stage consumes it and which task it serves.
pub trait WorkItem: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stage whose queue carries this item.
    const STAGE: Stage;
    /// The task the item belongs to.
    fn task_id(&self) -> &str;
    /// The item's version.
    fn version(&self) -> u32;
}

macro_rules! work_item {
    ($t:ty, $stage:expr) => {
        impl WorkItem for $t {
            const STAGE: Stage = $stage;
            fn task_id(&self) -> &str {
                &self.task_id
            }
            fn version(&self) -> u32 {
                self.v
            }
        }
    };
}

work_item!(FetchJob, Stage::Fetch);
work_item!(FaceJob, Stage::Face);
work_item!(AudioJob, Stage::Audio);
work_item!(InferJob, Stage::Infer);
work_item!(MuxJob, Stage::Mux);

/// Why a work message could not be read.
#[derive(Debug)]
pub enum DecodeError {
    /// Not JSON of the item's shape.
    Malformed(serde_json::Error),
    /// A version this build does not read.
    UnsupportedVersion(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Malformed(e) => write!(f, "malformed work item: {e}"),
            DecodeError::UnsupportedVersion(v) => write!(
                f,
                "unsupported work item version {v} (this build reads {MIN_WORK_VERSION}..={WORK_VERSION})"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The task id of a work message that does not decode as its item, if the body is JSON
/// with a plausible `task_id` string (so its task can be failed instead of lost).
pub fn salvage_task_id(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Loose {
        task_id: String,
    }
    let l: Loose = serde_json::from_slice(bytes).ok()?;
    let ok = !l.task_id.is_empty()
        && l.task_id.len() <= 128
        && l.task_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    ok.then_some(l.task_id)
}

/// Parse a work item and check its version.
pub fn decode<T: WorkItem>(bytes: &[u8]) -> Result<T, DecodeError> {
    let item: T = serde_json::from_slice(bytes).map_err(DecodeError::Malformed)?;
    let v = item.version();
    if !(MIN_WORK_VERSION..=WORK_VERSION).contains(&v) {
        return Err(DecodeError::UnsupportedVersion(v));
    }
    Ok(item)
}
