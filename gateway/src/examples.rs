//! The served OpenAPI document's examples: one for every request body and every JSON or
//! text response, built from the API's own types and errors (so each one serialises
//! exactly as the server answers), the WebSocket message schemas on the two socket
//! operations (`x-websocket-messages`), and the webhook (OpenAPI 3.1 `webhooks`).
//! Video bodies (`video/mp4`) are bytes and carry no example.

use axum::http::StatusCode;
use lipsync_runtime::config::GatewayConfig;
use lipsync_schemas::{
    ErrorCode, InputSource, Stage, StageTiming, Status, TaskError, TaskRecord, TaskRequest,
};
use serde_json::{Value, json};

use crate::api::{
    HealthResponse, ProgressEventView, QueueResponse, QueuedTask, ReadyResponse, SyncResponse,
    TaskList, TaskView, UploadKind, UploadResponse,
};
use crate::error::ApiError;

const TASK_ID: &str = "3f1c2a9e-7b4d-4c1a-9e2f-5a6b7c8d9e0f";
const CREATED: f64 = 1_764_633_600.0;

fn to_json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Sample task records in the states a client meets.
struct Samples {
    queued: TaskRecord,
    processing: TaskRecord,
    completed: TaskRecord,
    cancelled: TaskRecord,
}

impl Samples {
    fn new(model: &str) -> Self {
        let request = TaskRequest {
            video: InputSource::Url("https://example.com/video.mp4".into()),
            audio: InputSource::Url("https://example.com/audio.wav".into()),
            model: model.to_owned(),
            inference_steps: 20,
            guidance_scale: 1.5,
            seed: Some(1),
            webhook_url: None,
            output_upload_url: None,
        };
        let queued = TaskRecord::new(
            TASK_ID.into(),
            request,
            CREATED,
            "2025-12-02T00:00:00Z".into(),
        );
        let timing = |start: f64, end: Option<f64>| StageTiming {
            started_at: Some(CREATED + start),
            finished_at: end.map(|e| CREATED + e),
            attempts: 1,
            ..Default::default()
        };
        let mut processing = queued.clone();
        processing.status = Status::Processing;
        processing.stage = Some(Stage::Infer);
        processing.progress = 0.55;
        processing.message = "denoising: window 3 of 8".into();
        processing.started_at = Some("2025-12-02T00:00:01Z".into());
        for (s, a, b) in [("fetch", 1.0, 2.0), ("face", 2.0, 9.0), ("audio", 2.0, 3.0)] {
            processing.stages.insert(s.into(), timing(a, Some(b)));
        }
        let on_gpu = |mut t: StageTiming| {
            t.provider = Some("cuda:0".into());
            t
        };
        processing
            .stages
            .insert("infer".into(), on_gpu(timing(9.0, None)));
        let mut completed = processing.clone();
        completed.status = Status::Completed;
        completed.stage = Some(Stage::Mux);
        completed.progress = 1.0;
        completed.message = "completed".into();
        completed.finished_at = Some("2025-12-02T00:01:05Z".into());
        completed.end_time = Some(CREATED + 65.0);
        completed.output_video_url = Some(format!("/outputs/{TASK_ID}/result.mp4"));
        completed.output_mask_url = Some(format!("/outputs/{TASK_ID}/mask.mp4"));
        completed
            .stages
            .insert("infer".into(), on_gpu(timing(9.0, Some(58.0))));
        completed
            .stages
            .insert("mux".into(), timing(58.0, Some(65.0)));
        let mut cancelled = processing.clone();
        cancelled.status = Status::Failed;
        cancelled.message = "cancelled".into();
        cancelled.finished_at = Some("2025-12-02T00:00:20Z".into());
        cancelled.end_time = Some(CREATED + 20.0);
        cancelled.error = Some(TaskError::new(
            ErrorCode::Cancelled,
            "cancelled by the client",
        ));
        Self {
            queued,
            processing,
            completed,
            cancelled,
        }
    }

    fn view(r: &TaskRecord, position: Option<u64>) -> Value {
        to_json(&TaskView::from_record(r, position))
    }
}

/// Add the examples, the socket messages and the webhook to a generated document.
pub(crate) fn add(doc: &mut Value, gw: &GatewayConfig) {
    let model = gw
        .models
        .first()
        .cloned()
        .unwrap_or_else(|| "latentsync-1.5".into());
    let samples = Samples::new(&model);
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for item in paths.values_mut().filter_map(Value::as_object_mut) {
            for op in item.values_mut() {
                let Some(id) = op.get("operationId").and_then(Value::as_str) else {
                    continue;
                };
                let id = id.to_owned();
                let bodies = op
                    .get_mut("requestBody")
                    .and_then(|b| b.get_mut("content"))
                    .and_then(Value::as_object_mut);
                for (ct, media) in bodies.into_iter().flatten() {
                    if let Some(ex) = request_example(&id, ct, gw, &model) {
                        media["example"] = ex;
                    }
                }
                let responses = op.get_mut("responses").and_then(Value::as_object_mut);
                for (status, resp) in responses.into_iter().flatten() {
                    let status: u16 = status.parse().unwrap_or(0);
                    let content = resp.get_mut("content").and_then(Value::as_object_mut);
                    for (ct, media) in content.into_iter().flatten() {
                        if let Some(ex) = response_example(&id, status, ct, &samples) {
                            media["example"] = ex;
                        }
                    }
                }
            }
        }
    }
    let socket = |path: &str, schema: &str, example: Value| {
        json!({
            "direction": "server to client",
            "format": "one JSON text message per change",
            "schema": {"$ref": format!("#/components/schemas/{schema}")},
            "example": example,
            "path": path,
        })
    };
    let task_msg = socket(
        "/task/{task_id}/ws",
        "TaskView",
        Samples::view(&samples.processing, None),
    );
    let all_msg = socket(
        "/ws",
        "ProgressEventView",
        to_json(&ProgressEventView::from(&samples.processing)),
    );
    for (path, msg) in [("/task/{task_id}/ws", task_msg), ("/ws", all_msg)] {
        if let Some(op) = doc
            .get_mut("paths")
            .and_then(|p| p.get_mut(path))
            .and_then(|p| p.get_mut("get"))
            .and_then(Value::as_object_mut)
        {
            op.insert("x-websocket-messages".into(), msg);
        }
    }
    doc["webhooks"] = webhooks(&samples);
}

fn request_example(id: &str, content_type: &str, gw: &GatewayConfig, model: &str) -> Option<Value> {
    if id == "create_upload" && content_type == "application/json" {
        return Some(json!({"kind": "video"}));
    }
    if id != "submit_sync" {
        return None;
    }
    let mut ex = match content_type {
        "application/json" => json!({
            "video_url": "https://example.com/video.mp4",
            "audio_url": "https://example.com/audio.wav",
        }),
        "multipart/form-data" => json!({
            "video": "(the video file's bytes)",
            "audio": "(the audio file's bytes)",
        }),
        _ => return None,
    };
    ex["inference_ckpt_path"] = json!(model);
    ex["inference_steps"] = json!(20);
    ex["guidance_scale"] = json!(1.5);
    ex["seed"] = json!(1);
    if !gw.webhook_secret.is_empty() {
        ex["webhook_url"] = json!("https://hooks.example.com/lipsync");
    }
    Some(ex)
}

fn response_example(id: &str, status: u16, content_type: &str, s: &Samples) -> Option<Value> {
    if content_type == "video/mp4" {
        return None;
    }
    Some(match (id, status) {
        ("submit_sync", 200) => to_json(&SyncResponse {
            task_id: TASK_ID.into(),
            queue_position: Some(2),
            status: "queued".into(),
            message: "task queued".into(),
        }),
        ("create_upload", 201) => to_json(&UploadResponse {
            upload_id: "9b2e4f6a-1c3d-4e5f-8a7b-6c5d4e3f2a1b".into(),
            upload_url: "https://bucket.s3.example.com/lipsync/uploads/acme/\
                9b2e4f6a-1c3d-4e5f-8a7b-6c5d4e3f2a1b?X-Amz-Algorithm=AWS4-HMAC-SHA256&\
                X-Amz-Expires=3600&X-Amz-Signature=..."
                .into(),
            method: "PUT".into(),
            expires_in_s: 3600,
            max_bytes: 2 << 30,
            kind: Some(UploadKind::Video),
        }),
        ("get_task", 200) => Samples::view(&s.processing, None),
        ("cancel_task", 200) => Samples::view(&s.cancelled, None),
        ("list_tasks", 200) => to_json(&TaskList {
            tasks: vec![
                TaskView::from_record(&s.completed, None),
                TaskView::from_record(&s.queued, Some(0)),
            ],
            next_cursor: Some(format!("{:016x}.{TASK_ID}", CREATED as u64)),
        }),
        ("get_queue", 200) => to_json(&QueueResponse {
            queue_length: 2,
            is_processing: true,
            queued_tasks: vec![
                QueuedTask {
                    task_id: Some(TASK_ID.into()),
                    position: 0,
                },
                QueuedTask {
                    task_id: None,
                    position: 1,
                },
            ],
        }),
        ("get_health" | "get_liveness", 200) => to_json(&HealthResponse {
            status: "healthy".into(),
        }),
        ("get_readiness", 200 | 503) => {
            let ok = status == 200;
            to_json(&ReadyResponse {
                status: if ok { "ready" } else { "not_ready" }.into(),
                nats: true,
                index_loaded: true,
                stages_live: ok,
                stages: Stage::ALL
                    .iter()
                    .map(|st| (st.as_str().to_owned(), ok || *st != Stage::Infer))
                    .collect(),
            })
        }
        ("get_metrics", 200) => json!(
            "# HELP lipsync_queue_length Tasks that have not reached the GPU yet\n\
             # TYPE lipsync_queue_length gauge\n\
             lipsync_queue_length 2\n"
        ),
        (_, 100..=399) => return None,
        (id, status) => to_json(&error_example(id, status).body()),
    })
}

/// The error an operation answers with `status` in the situation its description names.
fn error_example(id: &str, status: u16) -> ApiError {
    let socket = id.starts_with("watch_");
    let output = id == "get_output" || id == "get_result_legacy";
    match (id, status) {
        ("submit_sync", 400) => ApiError::InvalidJson(
            "body is not valid JSON: expected value at line 1 column 1".into(),
        ),
        ("submit_sync", 408) => {
            ApiError::RequestTimeout("the upload did not finish within 300 s".into())
        }
        ("submit_sync", 409) => ApiError::IdempotencyConflict(
            "this Idempotency-Key was used with a different body".into(),
        ),
        ("cancel_task", 409) => ApiError::TaskFinished,
        ("create_upload", 409) => ApiError::UploadsUnavailable(
            "direct uploads need the s3 artifact backend (artifacts.backend = \"s3\")".into(),
        ),
        ("create_upload", 400) => ApiError::InvalidJson(
            "body is not valid JSON: expected value at line 1 column 1".into(),
        ),
        ("submit_sync", 413) => ApiError::PayloadTooLarge { limit: 2 << 30 },
        ("submit_sync", 415) => ApiError::UnsupportedMediaType(
            "Content-Type must be application/json or multipart/form-data".into(),
        ),
        ("submit_sync", 422) => {
            ApiError::InvalidRequest("inference_steps: must be between 1 and 100".into())
        }
        ("list_tasks", 422) => ApiError::InvalidRequest("limit must be at least 1".into()),
        ("submit_sync", 429) => ApiError::QuotaExceeded {
            message: "tenant quota: at most 100 queued tasks (gateway.tenant_max_queued)".into(),
            retry_after_s: 10,
        },
        ("submit_sync", 503) => ApiError::QueueFull { retry_after_s: 5 },
        ("submit_sync", 507) => ApiError::StorageFull,
        ("get_metrics", 403) => ApiError::Forbidden("an admin key is required".into()),
        (_, 403) => ApiError::Forbidden(
            "cross-origin request refused (Origin not allowed; see gateway.allowed_origins)".into(),
        ),
        (_, 404) if output => ApiError::NotFound("no such output".into()),
        (_, 404) => ApiError::NotFound("no such task".into()),
        (_, 416) if output => ApiError::RangeNotSatisfiable { size: 1 << 20 },
        (_, 429) if socket => ApiError::RateLimited { retry_after_s: 5 },
        (_, 503) if socket => {
            ApiError::Unavailable("too many WebSockets (gateway.ws_max_total)".into())
        }
        (_, status) => ApiError::from_status(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        ),
    }
}

/// OpenAPI 3.1 `webhooks`: the POST a task's `webhook_url` receives when it ends.
fn webhooks(s: &Samples) -> Value {
    let header = |name: &str, description: &str, example: &str| {
        json!({
            "name": name,
            "in": "header",
            "required": true,
            "description": description,
            "schema": {"type": "string"},
            "example": example,
        })
    };
    json!({
        "task_finished": {
            "post": {
                "operationId": "task_finished",
                "summary": "A task ended (completed or failed)",
                "description": "Sent once per task to its `webhook_url` (needs \
                    `gateway.webhook_secret`), retried with backoff until a 2xx answer or \
                    `gateway.webhook_attempts`. Verify `X-Lipsync-Signature` (HMAC-SHA256 \
                    with the shared secret over `<timestamp>.<body>`) and reject old \
                    timestamps.",
                "parameters": [
                    header("X-Lipsync-Timestamp", "Unix seconds when this attempt was signed", "1764633665"),
                    header("X-Lipsync-Signature", "`sha256=` and the hex HMAC-SHA256 of `<timestamp>.<body>`", "sha256=5d41402abc4b2a76b9719d911017c592ae8f7f3e0b4f9b5c2a1d3e4f5a6b7c8d"),
                    header("X-Lipsync-Task-Id", "The task id (also in the body)", TASK_ID),
                ],
                "requestBody": {
                    "required": true,
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/TaskView"},
                        "example": Samples::view(&s.completed, None),
                    }},
                },
                "responses": {
                    "2XX": {"description": "Delivered: no further attempts"},
                    "default": {"description": "Anything else (or no answer): retried"},
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPERATIONS: [&str; 15] = [
        "cancel_task",
        "create_upload",
        "get_health",
        "get_liveness",
        "get_metrics",
        "get_output",
        "get_queue",
        "get_readiness",
        "get_result_legacy",
        "get_task",
        "list_tasks",
        "submit_sync",
        "watch_all_tasks",
        "watch_task",
        "task_finished",
    ];

    fn contents(v: Option<&Value>) -> Vec<(String, Value)> {
        v.and_then(|c| c.get("content"))
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    #[test]
    fn every_operation_is_named_and_every_body_has_a_consistent_example() {
        let gw = GatewayConfig {
            models: vec!["tiny".into()],
            ..Default::default()
        };
        let doc = crate::docs::openapi_for(&gw);
        let mut ids = Vec::new();
        let mut ops: Vec<(String, Value)> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                ops.push((format!("{method} {path}"), op.clone()));
            }
        }
        for (name, item) in doc["webhooks"].as_object().unwrap() {
            ops.push((format!("webhook {name}"), item["post"].clone()));
        }
        for (what, op) in &ops {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no id"));
            ids.push(id.to_owned());
            for (ct, media) in contents(op.get("requestBody")) {
                assert!(media.get("example").is_some(), "{what} request {ct}");
            }
            for (status, resp) in op["responses"].as_object().unwrap() {
                for (ct, media) in contents(Some(resp)) {
                    if ct == "video/mp4" {
                        continue;
                    }
                    let ex = media
                        .get("example")
                        .unwrap_or_else(|| panic!("{what} {status} {ct}: no example"));
                    let Ok(code) = status.parse::<u16>() else {
                        continue;
                    };
                    let is_error = media["schema"]["$ref"] == "#/components/schemas/ErrorBody";
                    assert_eq!(
                        is_error,
                        code >= 400 && id != "get_readiness",
                        "{what} {status}"
                    );
                    if is_error {
                        // The example error is one this status carries.
                        let e = error_example(id, code);
                        assert_eq!(e.status_code().as_u16(), code, "{what} {status}");
                        assert_eq!(ex["error"]["code"], to_json(&e.code()), "{what} {status}");
                    }
                }
            }
        }
        ids.sort();
        let mut want: Vec<String> = OPERATIONS.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(ids, want);
        // The socket messages and the webhook body name schemas the document has.
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for path in ["/task/{task_id}/ws", "/ws"] {
            let r = doc["paths"][path]["get"]["x-websocket-messages"]["schema"]["$ref"]
                .as_str()
                .unwrap();
            assert!(
                schemas.contains_key(r.trim_start_matches("#/components/schemas/")),
                "{r}"
            );
        }
        let codes = &schemas["ApiErrorCode"]["enum"];
        assert!(
            codes.as_array().unwrap().contains(&json!("storage_full")),
            "{codes}"
        );
    }

    #[test]
    fn queue_example_shows_other_tenants_as_positions_only() {
        let s = Samples::new("tiny");
        let q = response_example("get_queue", 200, "application/json", &s).unwrap();
        assert_eq!(q["queued_tasks"][0]["task_id"], TASK_ID);
        assert_eq!(q["queued_tasks"][1]["task_id"], Value::Null);
    }
}
