//! The task record stored in KV `lipsync_tasks` (docs/architecture.md §5) and served by `GET /task/{id}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Stage, TaskError};

/// Current version of the task record layout.
pub const TASK_RECORD_VERSION: u32 = 1;

/// The seed's status words; nothing else may ever appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted, not yet started.
    Queued,
    /// A stage is working on it.
    Processing,
    /// Done; outputs are available.
    Completed,
    /// Failed or cancelled; see `error`.
    Failed,
}

impl Status {
    /// `completed` or `failed`: the record will never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed)
    }

    /// The wire word.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Processing => "processing",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }
}

/// Where an input comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputSource {
    /// A remote http(s) URL, downloaded by the fetch stage.
    Url(String),
    /// An upload already in the artifact store under this key.
    Artifact(String),
}

/// The client's request parameters as accepted by the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// Video input.
    pub video: InputSource,
    /// Audio input (any media with an audio stream).
    pub audio: InputSource,
    /// Configured model name the task runs with.
    pub model: String,
    /// Number of DDIM steps (1-100).
    pub inference_steps: u32,
    /// Classifier-free guidance scale (1.0-5.0).
    pub guidance_scale: f64,
    /// Noise seed; `None` means a server-chosen seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Where to POST the final record, if anywhere.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// A client-given (presigned) URL the mux stage PUTs the result video to once it is
    /// stored. It usually carries a signature in its query: it is never served back or
    /// logged in full (see [`redact_url`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_upload_url: Option<String>,
}

/// A URL as it may be shown: `scheme://host[:port]/path`, without userinfo, query or
/// fragment (where signatures and credentials live). Unparsable input gives `None`.
pub fn redact_url(raw: &str) -> Option<String> {
    let (scheme, rest) = raw.split_once("://")?;
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let host = authority.rsplit('@').next().unwrap_or_default();
    if scheme.is_empty() || host.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{host}{path}"))
}

/// When a stage started and finished work on this task (epoch seconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    /// First moment the stage worked on the task.
    #[serde(default)]
    pub started_at: Option<f64>,
    /// Moment the stage finished its part.
    #[serde(default)]
    pub finished_at: Option<f64>,
    /// Delivery attempts the stage needed.
    #[serde(default)]
    pub attempts: u32,
    /// Execution provider of the process that ran it (`cuda:0`, `cpu`; infer only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Stream sequence of the work message that owns this stage's run; a second message
    /// for the same stage (a re-publish after the duplicate window) is recognised by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_seq: Option<u64>,
    /// Set once the stage is done: what it produced and what it handed on. Written before
    /// the next work is published, so a redelivery re-publishes instead of running again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<StageDone>,
}

/// What a finished stage produced (artifact keys by name) and the work it handed on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageDone {
    /// Artifact keys by well-known name (`names::artifact`).
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    /// The work items published after this stage, in order.
    #[serde(default)]
    pub next: Vec<NextWork>,
}

/// One stored work item: its stage, version and JSON body (re-published as it is).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NextWork {
    /// The stage whose queue takes it.
    pub stage: Stage,
    /// Work-item version.
    pub version: u32,
    /// The item as JSON.
    pub body: serde_json::Value,
}

impl NextWork {
    /// Store a work item.
    pub fn of<W: crate::WorkItem>(item: &W) -> Self {
        Self {
            stage: W::STAGE,
            version: item.version(),
            body: serde_json::to_value(item).expect("work items serialise"),
        }
    }
}

/// What the fetch stage learned about the inputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MediaSummary {
    /// Video width in pixels (after rotation).
    pub width: u32,
    /// Video height in pixels (after rotation).
    pub height: u32,
    /// Video frame rate as probed.
    pub fps: f64,
    /// Video duration in seconds.
    pub video_duration_s: f64,
    /// Audio duration in seconds.
    pub audio_duration_s: f64,
    /// The validated video stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_stream: Option<crate::VideoStream>,
}

/// Progress of the face/audio join (docs/architecture.md §4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinState {
    /// The face stage stored its track.
    #[serde(default)]
    pub face_done: bool,
    /// The audio stage stored its features.
    #[serde(default)]
    pub audio_done: bool,
    /// `work.infer` was published (by whichever finished last).
    #[serde(default)]
    pub infer_published: bool,
}

/// The task record. Field names of the seed API (`status`, `progress`, `message`,
/// `output_video_url`, `output_mask_url`, `queue_position`) and of its public
/// implementation (`start_time`, `end_time`) are kept as they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Layout version of this record.
    #[serde(default = "default_version")]
    pub schema_version: u32,
    /// UUID v4.
    pub task_id: String,
    /// Seed status word.
    pub status: Status,
    /// The stage currently (or last) working on the task.
    #[serde(default)]
    pub stage: Option<Stage>,
    /// 0.0-1.0, never decreasing.
    pub progress: f64,
    /// Human-readable state.
    pub message: String,
    /// Tasks ahead of this one not yet on the GPU (0-based); filled in when served.
    #[serde(default)]
    pub queue_position: Option<u64>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time the first stage started.
    #[serde(default)]
    pub started_at: Option<String>,
    /// RFC 3339 time the task ended.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Creation time, epoch seconds (public implementation's field).
    pub start_time: f64,
    /// End time, epoch seconds (public implementation's field).
    #[serde(default)]
    pub end_time: Option<f64>,
    /// `/outputs/{task_id}/result.mp4` once completed.
    #[serde(default)]
    pub output_video_url: Option<String>,
    /// `/outputs/{task_id}/mask.mp4` once completed.
    #[serde(default)]
    pub output_mask_url: Option<String>,
    /// Set when `status` is `failed`.
    #[serde(default)]
    pub error: Option<TaskError>,
    /// The accepted request.
    pub request: TaskRequest,
    /// A client asked to cancel; stages stop at their next check.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Face/audio join state.
    #[serde(default)]
    pub join: JoinState,
    /// Per-stage timings.
    #[serde(default)]
    pub stages: BTreeMap<String, StageTiming>,
    /// Probe results of the inputs.
    #[serde(default)]
    pub media: Option<MediaSummary>,
    /// Artifact keys this task owns (for cleanup).
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// Notices for the client (e.g. a test model is in use).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Tenant that submitted the task (API key tenant); `None` when the gateway has no
    /// keys configured (open service) or for records written before tenants existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// With `request.output_upload_url`: whether the result was uploaded there (`true`
    /// once the target answered 2xx, `false` when every try failed); `None` without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_uploaded: Option<bool>,
}

fn default_version() -> u32 {
    TASK_RECORD_VERSION
}

impl TaskRecord {
    /// The artifact key a finished stage recorded under `name`.
    pub fn output_of(&self, stage: Stage, name: &str) -> Option<&str> {
        self.stages
            .get(stage.as_str())?
            .done
            .as_ref()?
            .outputs
            .get(name)
            .map(String::as_str)
    }

    /// Whether `stage` recorded itself done.
    pub fn stage_done(&self, stage: Stage) -> bool {
        self.stages
            .get(stage.as_str())
            .is_some_and(|t| t.done.is_some())
    }

    /// A fresh `queued` record.
    pub fn new(task_id: String, request: TaskRequest, now_epoch: f64, now_rfc3339: String) -> Self {
        Self {
            schema_version: TASK_RECORD_VERSION,
            task_id,
            status: Status::Queued,
            stage: None,
            progress: 0.0,
            message: "queued".to_owned(),
            queue_position: None,
            created_at: now_rfc3339,
            started_at: None,
            finished_at: None,
            start_time: now_epoch,
            end_time: None,
            output_video_url: None,
            output_mask_url: None,
            error: None,
            request,
            cancel_requested: false,
            join: JoinState::default(),
            stages: BTreeMap::new(),
            media: None,
            artifacts: Vec::new(),
            warnings: Vec::new(),
            owner: None,
            output_uploaded: None,
        }
    }

    /// Raise progress, never lowering it and clamping into 0..=1.
    pub fn raise_progress(&mut self, p: f64) {
        if p.is_finite() {
            self.progress = self.progress.max(p.clamp(0.0, 1.0));
        }
    }

    /// Whether the task has not yet reached the GPU stage (counts for the queue).
    pub fn waiting_for_gpu(&self) -> bool {
        !self.status.is_terminal()
            && !self.stages.contains_key(Stage::Infer.as_str())
            && !self.cancel_requested
    }

    /// Whether the task is on the GPU right now.
    pub fn on_gpu(&self) -> bool {
        !self.status.is_terminal()
            && self
                .stages
                .get(Stage::Infer.as_str())
                .is_some_and(|t| t.finished_at.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn redacted_urls_lose_userinfo_query_and_fragment() {
        let r = |s: &str| redact_url(s);
        assert_eq!(
            r("https://b.s3.example.com/k/result.mp4?X-Amz-Signature=abc&X-Amz-Credential=x")
                .as_deref(),
            Some("https://b.s3.example.com/k/result.mp4")
        );
        assert_eq!(
            r("http://u:p@127.0.0.1:9000/b/k#frag").as_deref(),
            Some("http://127.0.0.1:9000/b/k")
        );
        assert_eq!(r("http://h?sig=1").as_deref(), Some("http://h/"));
        assert_eq!(r("not a url"), None);
        assert_eq!(r("http://?x"), None);
    }
}
