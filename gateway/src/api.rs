//! Request and response bodies of the HTTP API, with their OpenAPI schemas.
//!
//! Unknown fields in request bodies are ignored (as the seed's FastAPI server does), so
//! clients written for newer versions keep working.

use std::collections::BTreeMap;

use lipsync_schemas::{InputSource, Stage, Status, TaskRecord};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{RefOr, schema::SchemaType};

/// Lowest accepted `inference_steps`.
pub const MIN_STEPS: u32 = 1;
/// Highest accepted `inference_steps`.
pub const MAX_STEPS: u32 = 100;
/// Lowest accepted `guidance_scale`.
pub const MIN_GUIDANCE: f64 = 1.0;
/// Highest accepted `guidance_scale`.
pub const MAX_GUIDANCE: f64 = 5.0;

/// `POST /sync` JSON body (the seed's fields plus `webhook_url`, direct uploads and
/// `output_upload_url`). Each input is given by exactly one of its URL and its upload id.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct SyncRequest {
    /// http(s) URL of the video whose mouth is re-rendered (or give `video_upload_id`).
    #[serde(default)]
    #[schema(example = "https://example.com/video.mp4", nullable)]
    pub video_url: Option<String>,
    /// http(s) URL of the audio, any media with an audio stream (or give
    /// `audio_upload_id`).
    #[serde(default)]
    #[schema(example = "https://example.com/audio.wav", nullable)]
    pub audio_url: Option<String>,
    /// Instead of `video_url`: the `upload_id` of a `POST /uploads` whose URL the video
    /// was PUT to (same tenant; each upload serves one task).
    #[serde(default)]
    #[schema(nullable)]
    pub video_upload_id: Option<String>,
    /// Instead of `audio_url`: the `upload_id` of an uploaded audio.
    #[serde(default)]
    #[schema(nullable)]
    pub audio_upload_id: Option<String>,
    /// Name of a model the server has configured (see `GET /docs`); default: the first
    /// configured model. File paths are never opened.
    #[serde(default)]
    #[schema(nullable)]
    pub inference_ckpt_path: Option<String>,
    /// DDIM steps, 1-100 (default from the server config, 20).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100, nullable)]
    pub inference_steps: Option<u32>,
    /// Classifier-free guidance scale, 1.0-5.0 (default from the server config, 1.5).
    #[serde(default)]
    #[schema(minimum = 1.0, maximum = 5.0, nullable)]
    pub guidance_scale: Option<f64>,
    /// Noise seed (non-negative); default: chosen by the server.
    #[serde(default)]
    #[schema(minimum = 0, nullable)]
    pub seed: Option<u64>,
    /// Where to POST the final task record (HMAC-SHA256 signed); needs a configured secret.
    #[serde(default)]
    #[schema(nullable)]
    pub webhook_url: Option<String>,
    /// An http(s) URL (e.g. a presigned S3 PUT URL) the result video is PUT to once it is
    /// stored, checked like `video_url`. The task fails with `output_upload_failed` when
    /// it cannot be uploaded after retries; the result stays downloadable either way.
    /// Never shown back with its query string.
    #[serde(default)]
    #[schema(nullable)]
    pub output_upload_url: Option<String>,
}

/// `POST /sync` multipart body: files instead of URLs. Each input is a file part or, on
/// servers with direct uploads, its `*_upload_id` text field.
#[derive(Debug, ToSchema)]
#[allow(dead_code)]
pub struct SyncUpload {
    /// The video file (or give `video_upload_id`).
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    pub video: Option<String>,
    /// The audio file (or give `audio_upload_id`).
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    pub audio: Option<String>,
    /// As in the JSON body: a direct upload in place of the `video` file.
    pub video_upload_id: Option<String>,
    /// As in the JSON body: a direct upload in place of the `audio` file.
    pub audio_upload_id: Option<String>,
    /// As in the JSON body.
    pub inference_ckpt_path: Option<String>,
    /// As in the JSON body.
    #[schema(minimum = 1, maximum = 100)]
    pub inference_steps: Option<u32>,
    /// As in the JSON body.
    #[schema(minimum = 1.0, maximum = 5.0)]
    pub guidance_scale: Option<f64>,
    /// As in the JSON body.
    #[schema(minimum = 0)]
    pub seed: Option<u64>,
    /// As in the JSON body.
    pub webhook_url: Option<String>,
    /// As in the JSON body.
    pub output_upload_url: Option<String>,
}

/// What a direct upload will hold (informational; echoed back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UploadKind {
    /// A video input (`video_upload_id`).
    Video,
    /// An audio input (`audio_upload_id`).
    Audio,
}

/// `POST /uploads` JSON body (optional: an empty body is the same as `{}`).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct UploadRequest {
    /// What the upload is for; informational, echoed in the answer.
    #[serde(default)]
    #[schema(nullable)]
    pub kind: Option<UploadKind>,
}

/// `POST /uploads` answer: where to PUT the file, then pass `upload_id` to `POST /sync`
/// as `video_upload_id` or `audio_upload_id`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UploadResponse {
    /// The upload's id (UUID v4), valid for this tenant only.
    pub upload_id: String,
    /// Presigned URL to send the file's bytes to with one `PUT` (body = the file, no
    /// multipart); no API key needed. Treat it as a secret.
    pub upload_url: String,
    /// Always `PUT`.
    pub method: String,
    /// Seconds the URL stays valid.
    pub expires_in_s: u64,
    /// Largest file a task accepts (`fetch.max_bytes`); a larger upload fails the task
    /// with `input_too_large`.
    pub max_bytes: u64,
    /// The `kind` of the request, if given.
    #[schema(nullable)]
    pub kind: Option<UploadKind>,
}

/// `POST /sync` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SyncResponse {
    /// The new task's id (UUID v4).
    pub task_id: String,
    /// Tasks ahead of this one that have not reached the GPU (0-based); null if this task
    /// (an idempotent replay) is past that point.
    #[schema(nullable)]
    pub queue_position: Option<u64>,
    /// Status word: `queued` for a new task.
    #[schema(schema_with = status_schema)]
    pub status: String,
    /// Human-readable note.
    pub message: String,
}

/// Error of a failed task.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskErrorView {
    /// Machine-readable code (closed set, e.g. `no_face_detected`, `cancelled`).
    #[schema(schema_with = task_error_code_schema)]
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// Whether submitting again may help.
    pub retryable: bool,
    /// For `no_face_detected`: first frame without a face.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frame_index: Option<u64>,
    /// For `no_face_detected`: that frame's time in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_s: Option<f64>,
}

/// When one stage worked on a task (epoch seconds).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StageTimingView {
    /// First moment the stage worked on the task.
    #[schema(nullable)]
    pub started_at: Option<f64>,
    /// Moment the stage finished its part.
    #[schema(nullable)]
    pub finished_at: Option<f64>,
    /// Delivery attempts the stage needed (more than 1 after a crash or a retry).
    pub attempts: u32,
    /// Execution provider it ran on (`cuda:0`, `cpu`); set by the stages that run models
    /// on an accelerator (infer), null for the others.
    #[serde(default)]
    #[schema(nullable)]
    pub provider: Option<String>,
}

/// The accepted request parameters of a task.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RequestView {
    /// Video URL, or null for an upload.
    #[schema(nullable)]
    pub video_url: Option<String>,
    /// Audio URL, or null for an upload.
    #[schema(nullable)]
    pub audio_url: Option<String>,
    /// Model name.
    pub inference_ckpt_path: String,
    /// DDIM steps.
    pub inference_steps: u32,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Seed, null when chosen by the server.
    #[schema(nullable)]
    pub seed: Option<u64>,
    /// Webhook target, if any.
    #[schema(nullable)]
    pub webhook_url: Option<String>,
    /// The `output_upload_url` as `scheme://host/path`, without its query (where a
    /// presigned URL's signature is), or null when none was given.
    #[serde(default)]
    #[schema(nullable)]
    pub output_upload_url: Option<String>,
}

/// A task as served by `GET /task/{task_id}`, the WebSockets and webhooks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// UUID v4.
    pub task_id: String,
    /// `queued`, `processing`, `completed` or `failed` (a cancelled task is `failed` with
    /// `error.code = "cancelled"`).
    #[schema(schema_with = status_schema)]
    pub status: String,
    /// Stage working on the task now (or last): fetch, face, audio, infer, mux.
    #[schema(schema_with = stage_schema)]
    pub stage: Option<String>,
    /// 0.0-1.0, never decreasing.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub progress: f64,
    /// Human-readable state.
    pub message: String,
    /// Tasks ahead of this one not yet on the GPU (0-based); null once it reached the GPU.
    #[schema(nullable)]
    pub queue_position: Option<u64>,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// RFC 3339 time the first stage started.
    #[schema(nullable)]
    pub started_at: Option<String>,
    /// RFC 3339 end time.
    #[schema(nullable)]
    pub finished_at: Option<String>,
    /// Creation time, epoch seconds.
    pub start_time: f64,
    /// End time, epoch seconds.
    #[schema(nullable)]
    pub end_time: Option<f64>,
    /// `/outputs/{task_id}/result.mp4` once completed (also on a task that failed with
    /// `output_upload_failed`: its result was stored).
    #[schema(nullable)]
    pub output_video_url: Option<String>,
    /// `/outputs/{task_id}/mask.mp4` once completed (as `output_video_url`).
    #[schema(nullable)]
    pub output_mask_url: Option<String>,
    /// With an `output_upload_url`: true once the result was uploaded there, false when
    /// every try failed; null without one (or before the upload).
    #[serde(default)]
    #[schema(nullable)]
    pub output_uploaded: Option<bool>,
    /// Set when `status` is `failed`.
    #[schema(nullable)]
    pub error: Option<TaskErrorView>,
    /// The accepted request.
    pub request: RequestView,
    /// Notices (e.g. a test model is in use).
    pub warnings: Vec<String>,
    /// Per-stage timings so far, keyed by stage name (fetch, face, audio, infer, mux).
    #[serde(default)]
    pub stages: BTreeMap<String, StageTimingView>,
}

impl TaskView {
    /// The public view of a record with the queue position filled in.
    pub fn from_record(r: &TaskRecord, queue_position: Option<u64>) -> Self {
        let url = |s: &InputSource| match s {
            InputSource::Url(u) => Some(u.clone()),
            InputSource::Artifact(_) => None,
        };
        TaskView {
            task_id: r.task_id.clone(),
            status: r.status.as_str().to_owned(),
            stage: r.stage.map(|s| s.as_str().to_owned()),
            progress: r.progress,
            message: r.message.clone(),
            queue_position,
            created_at: r.created_at.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
            start_time: r.start_time,
            end_time: r.end_time,
            output_video_url: r.output_video_url.clone(),
            output_mask_url: r.output_mask_url.clone(),
            output_uploaded: r.output_uploaded,
            error: r.error.as_ref().map(|e| TaskErrorView {
                code: e.code.as_str().to_owned(),
                message: e.message.clone(),
                retryable: e.retryable,
                frame_index: e.frame_index,
                time_s: e.time_s,
            }),
            request: RequestView {
                video_url: url(&r.request.video),
                audio_url: url(&r.request.audio),
                inference_ckpt_path: r.request.model.clone(),
                inference_steps: r.request.inference_steps,
                guidance_scale: r.request.guidance_scale,
                seed: r.request.seed,
                webhook_url: r.request.webhook_url.clone(),
                output_upload_url: r
                    .request
                    .output_upload_url
                    .as_deref()
                    .and_then(lipsync_schemas::redact_url),
            },
            warnings: r.warnings.clone(),
            stages: r
                .stages
                .iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        StageTimingView {
                            started_at: t.started_at,
                            finished_at: t.finished_at,
                            attempts: t.attempts,
                            provider: t.provider.clone(),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// A message of `GET /ws`: one task changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProgressEventView {
    /// The task.
    pub task_id: String,
    /// Status after the change.
    #[schema(schema_with = status_schema)]
    pub status: String,
    /// Stage after the change.
    #[schema(schema_with = stage_schema)]
    pub stage: Option<String>,
    /// Progress after the change, 0.0-1.0.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub progress: f64,
    /// Human-readable state.
    pub message: String,
    /// The error code once the task failed.
    #[schema(schema_with = nullable_task_error_code_schema)]
    pub error_code: Option<String>,
}

impl From<&TaskRecord> for ProgressEventView {
    fn from(r: &TaskRecord) -> Self {
        Self {
            task_id: r.task_id.clone(),
            status: r.status.as_str().to_owned(),
            stage: r.stage.map(|s| s.as_str().to_owned()),
            progress: r.progress,
            message: r.message.clone(),
            error_code: r.error.as_ref().map(|e| e.code.as_str().to_owned()),
        }
    }
}

/// One waiting task in `GET /queue`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueuedTask {
    /// Task id; null for another tenant's task (its position only).
    #[schema(nullable)]
    pub task_id: Option<String>,
    /// 0-based position in submission order.
    pub position: u64,
}

/// `GET /queue` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QueueResponse {
    /// Tasks that have not reached the GPU yet.
    pub queue_length: u64,
    /// Whether a task is on the GPU now.
    pub is_processing: bool,
    /// The waiting tasks in submission order.
    pub queued_tasks: Vec<QueuedTask>,
}

/// `GET /tasks` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    /// The tasks of this page, newest first.
    pub tasks: Vec<TaskView>,
    /// Pass as `?cursor=` for the next page; null after the last one.
    #[schema(nullable)]
    pub next_cursor: Option<String>,
}

/// `GET /health` answer (the public implementation's shape).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// Always `healthy` while the process serves requests.
    pub status: String,
}

/// `GET /readyz` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyResponse {
    /// `ready` or `not_ready`.
    pub status: String,
    /// Whether NATS is connected.
    pub nats: bool,
    /// Whether the task index finished its initial load.
    pub index_loaded: bool,
    /// Whether every stage has a live consumer (a worker waiting for or holding work).
    pub stages_live: bool,
    /// Per stage (fetch, face, audio, infer, mux): whether it has a live consumer.
    pub stages: BTreeMap<String, bool>,
}

fn enum_schema(values: &[&str], nullable: bool) -> RefOr<Schema> {
    let ty = if nullable {
        SchemaType::from_iter([Type::String, Type::Null])
    } else {
        SchemaType::Type(Type::String)
    };
    let mut vals: Vec<Option<&str>> = values.iter().copied().map(Some).collect();
    if nullable {
        vals.push(None);
    }
    ObjectBuilder::new()
        .schema_type(ty)
        .enum_values(Some(vals))
        .into()
}

fn status_schema() -> RefOr<Schema> {
    let all = [
        Status::Queued,
        Status::Processing,
        Status::Completed,
        Status::Failed,
    ];
    let names: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
    enum_schema(&names, false)
}

fn stage_schema() -> RefOr<Schema> {
    let names: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
    enum_schema(&names, true)
}

fn task_error_code_names() -> Vec<&'static str> {
    lipsync_schemas::ErrorCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect()
}

fn task_error_code_schema() -> RefOr<Schema> {
    enum_schema(&task_error_code_names(), false)
}

fn nullable_task_error_code_schema() -> RefOr<Schema> {
    enum_schema(&task_error_code_names(), true)
}
