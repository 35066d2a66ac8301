//! NATS names: stream, subjects, consumers, buckets. These are part of the wire contract
//! (docs/architecture.md §3): every binary and every deployment manifest uses exactly these.

use crate::Stage;

/// The one work stream; subjects `lipsync.work.<stage>`, work-queue retention.
pub const WORK_STREAM: &str = "LIPSYNC_WORK";
/// Prefix of every work subject.
pub const WORK_SUBJECT_PREFIX: &str = "lipsync.work";
/// Wildcard covering all work subjects (the stream's subject list).
pub const WORK_SUBJECT_WILDCARD: &str = "lipsync.work.>";
/// KV bucket: task id -> task record (JSON).
pub const TASKS_BUCKET: &str = "lipsync_tasks";
/// KV bucket: Idempotency-Key -> task id, TTL 24 h.
pub const IDEMPOTENCY_BUCKET: &str = "lipsync_idempotency";
/// Object store bucket holding inputs, intermediates and outputs, keys `<task_id>/<name>`.
pub const ARTIFACTS_BUCKET: &str = "lipsync_artifacts";
/// Stream that keeps JetStream's max-deliveries advisories of the work consumers, so a
/// job whose every delivery crashed is failed even if no process was alive to hear it.
pub const ADVISORY_STREAM: &str = "LIPSYNC_ADVISORIES";
/// Subjects of those advisories (one per work consumer).
pub const MAX_DELIVERIES_ADVISORIES: &str =
    "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.LIPSYNC_WORK.*";
/// Durable consumer of [`ADVISORY_STREAM`] shared by every stage process.
pub const REAPER_CONSUMER: &str = "reaper";
/// Header carrying the work-item schema version.
pub const SCHEMA_VERSION_HEADER: &str = "Lipsync-Schema";

/// Subject of a stage's work queue: `lipsync.work.<stage>`.
pub fn work_subject(stage: Stage) -> String {
    format!("{WORK_SUBJECT_PREFIX}.{}", stage.as_str())
}

/// Durable consumer name of a stage: the stage's name.
pub fn consumer_name(stage: Stage) -> &'static str {
    stage.as_str()
}

/// `Nats-Msg-Id` of a work message: `<task_id>:<stage>`, so a double publish is dropped by
/// the stream's duplicate window.
pub fn msg_id(task_id: &str, stage: Stage) -> String {
    format!("{task_id}:{}", stage.as_str())
}

/// Artifact key of a task's named object: `<task_id>/<name>`.
pub fn artifact_key(task_id: &str, name: &str) -> String {
    format!("{task_id}/{name}")
}

/// Artifact key of an intermediate written by one delivery attempt of a stage:
/// `<task_id>/<stage>-<attempt>/<name>`. A later attempt never overwrites what an earlier
/// one handed on, so a stage reading it can never see it change.
pub fn attempt_key(task_id: &str, stage: Stage, attempt: u32, name: &str) -> String {
    format!("{task_id}/{}-{attempt}/{name}", stage.as_str())
}

/// Well-known artifact names.
pub mod artifact {
    /// The original video as downloaded or uploaded.
    pub const VIDEO: &str = "input_video";
    /// The original audio input as downloaded or uploaded.
    pub const AUDIO_ORIGINAL: &str = "input_audio";
    /// The audio brought to 16 kHz mono PCM WAV by the fetch stage.
    pub const AUDIO_16K: &str = "audio_16k.wav";
    /// Face track (per-frame box, landmarks, affine), JSON.
    pub const FACE_TRACK: &str = "face_track.json";
    /// Whisper encoder features.
    pub const AUDIO_FEATURES: &str = "audio_features.bin";
    /// Generated face crops.
    pub const CROPS: &str = "crops.mkv";
    /// The final result video.
    pub const RESULT: &str = "result.mp4";
    /// The blend-mask video.
    pub const MASK: &str = "mask.mp4";
}
