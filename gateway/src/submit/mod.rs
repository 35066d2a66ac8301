//! `POST /sync`: intake (JSON: [`json`], or multipart: [`upload`]), validation
//! ([`validate`]), idempotency claim ([`idempotency`]), tenant quotas, KV create of the
//! task record (owned by the caller's tenant), publish `work.fetch`, answer. The answer
//! comes only after the record and the work item are both durable; a failed publish
//! fails the record (no phantom queued task) and answers 503.
//!
//! Unknown fields are ignored.

mod idempotency;
mod json;
mod upload;
mod validate;

pub(crate) use json::{body_error, json_object};

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use lipsync_runtime::tasks::now;
use lipsync_schemas::{
    ErrorCode, FetchJob, InputSource, TaskError, TaskRecord, TaskRequest, WORK_VERSION,
};
use tracing::Instrument;

use crate::AppState;
use crate::api::{SyncRequest, SyncResponse};
use crate::auth::Caller;
use crate::error::{ApiError, Result};
use crate::router::RequestId;
use idempotency::Claim;
use validate::Params;

/// Seconds a client over a task quota is told to wait.
const QUOTA_RETRY_S: u64 = 10;

/// `POST /sync` handler (JSON or multipart).
#[utoipa::path(
    post,
    path = "/sync",
    operation_id = "submit_sync",
    tag = "tasks",
    request_body(
        content(
            (SyncRequest = "application/json"),
            (crate::api::SyncUpload = "multipart/form-data"),
        ),
        description = "URLs or direct-upload ids (JSON), or files (multipart). Unknown fields are ignored."
    ),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Same key + same body within 24 h returns the same task; a different body answers 409"),
    ),
    responses(
        (status = 200, description = "Task accepted and queued (or an idempotent replay)", body = SyncResponse),
        (status = 400, description = "Body is not valid JSON or multipart", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = crate::error::ErrorBody),
        (status = 403, description = "Cross-origin request refused", body = crate::error::ErrorBody),
        (status = 408, description = "Upload not finished within the upload deadline", body = crate::error::ErrorBody),
        (status = 409, description = "Idempotency-Key reused with a different body, or an upload id given while direct uploads are unavailable (`uploads_unavailable`)", body = crate::error::ErrorBody),
        (status = 413, description = "Body too large", body = crate::error::ErrorBody),
        (status = 415, description = "Neither JSON nor multipart", body = crate::error::ErrorBody),
        (status = 422, description = "Invalid field (`invalid_request`, `url_not_allowed`), or an upload id that names no upload of this tenant (`upload_not_found`)", body = crate::error::ErrorBody),
        (status = 429, description = "Rate limited or tenant quota exhausted (see Retry-After)", body = crate::error::ErrorBody),
        (status = 503, description = "Work queue full or backend unavailable", body = crate::error::ErrorBody),
        (status = 507, description = "The media store is full (`artifacts.max_bytes`); see Retry-After", body = crate::error::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn sync(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    request_id: Option<Extension<RequestId>>,
    req: Request,
) -> Result<Response> {
    let request_id = request_id.map(|r| r.0.0).unwrap_or_default();
    let idem = idempotency::key_of(req.headers())?;
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    let task_id = uuid::Uuid::new_v4().to_string();
    let (video, audio, params, hash, uploaded, direct) = if ctype.starts_with("multipart/form-data")
    {
        let mut uploaded = Vec::new();
        match upload::intake(&state, &caller, &task_id, req, &mut uploaded).await {
            Ok(u) => (u.video, u.audio, u.params, u.hash, uploaded, u.direct),
            Err(e) => {
                upload::cleanup(&state, &uploaded).await;
                return Err(e);
            }
        }
    } else if ctype.starts_with("application/json") || ctype.contains("+json") {
        let t = json::intake(&state, &caller, req).await?;
        (t.video, t.audio, t.params, t.hash, Vec::new(), t.uploads)
    } else {
        return Err(ApiError::UnsupportedMediaType(
            "use Content-Type application/json or multipart/form-data".into(),
        ));
    };
    let sub = Submission {
        caller: &caller,
        request_id: &request_id,
        task_id,
        video,
        audio,
        params,
        hash,
        direct,
    };
    let res = accept(&state, idem, sub, &uploaded).await;
    if res.is_err() {
        upload::cleanup(&state, &uploaded).await;
    }
    res
}

/// A checked submission.
struct Submission<'a> {
    caller: &'a Caller,
    request_id: &'a str,
    task_id: String,
    video: InputSource,
    audio: InputSource,
    params: Params,
    hash: String,
    /// Keys of direct uploads (`*_upload_id`): claimed for this task, never deleted here
    /// (a refused submission may be sent again with the same ids).
    direct: Vec<String>,
}

/// The caller's tenant quotas (only when keys are configured).
fn check_quota(state: &AppState, caller: &Caller) -> Result<()> {
    let Some(tenant) = caller.tenant.as_deref() else {
        return Ok(());
    };
    let gw = &state.gw;
    if gw.tenant_max_queued == 0 && gw.tenant_max_in_flight == 0 {
        return Ok(());
    }
    let (queued, processing) = state
        .index
        .count_active(|r| r.owner.as_deref() == Some(tenant));
    if gw.tenant_max_queued > 0 && queued >= gw.tenant_max_queued as usize {
        return Err(ApiError::QuotaExceeded {
            message: format!(
                "tenant quota: at most {} queued tasks (gateway.tenant_max_queued)",
                gw.tenant_max_queued
            ),
            retry_after_s: QUOTA_RETRY_S,
        });
    }
    if gw.tenant_max_in_flight > 0 && processing >= gw.tenant_max_in_flight as usize {
        return Err(ApiError::QuotaExceeded {
            message: format!(
                "tenant quota: at most {} tasks processing (gateway.tenant_max_in_flight)",
                gw.tenant_max_in_flight
            ),
            retry_after_s: QUOTA_RETRY_S,
        });
    }
    Ok(())
}

async fn accept(
    state: &AppState,
    idem: Option<String>,
    sub: Submission<'_>,
    uploaded: &[String],
) -> Result<Response> {
    let Submission {
        caller,
        request_id,
        task_id,
        video,
        audio,
        params,
        hash,
        direct,
    } = sub;
    let idem_key = idem.map(|k| idempotency::kv_key(&caller.id, &k));
    if let Some(k) = &idem_key
        && let Claim::Replay(answer) = idempotency::claim(state, k, &task_id, &hash).await?
    {
        // Nothing of this request is used: its uploads go.
        upload::cleanup(state, uploaded).await;
        return answer;
    }
    if let Err(e) = crate::uploads::claim(state, &direct).await {
        if let Some(k) = &idem_key {
            idempotency::release(state, k).await;
        }
        return Err(e);
    }
    let undo_idem = || async {
        if let Some(k) = &idem_key {
            idempotency::release(state, k).await;
        }
        crate::uploads::release(state, &direct).await;
    };
    if let Err(e) = check_quota(state, caller) {
        undo_idem().await;
        upload::cleanup(state, uploaded).await;
        return Err(e);
    }
    // New tasks keep out of a (nearly) full media store; running tasks keep its rest.
    if let Ok(Some(usage)) = state.artifacts.usage().await
        && usage.refuses_new_tasks()
    {
        undo_idem().await;
        upload::cleanup(state, uploaded).await;
        return Err(ApiError::StorageFull);
    }
    // Admission happens here only: hand-offs between stages always have room.
    if let Err(e) = lipsync_runtime::admission::admit(&state.js, &state.nats).await {
        undo_idem().await;
        upload::cleanup(state, uploaded).await;
        return Err(match e {
            lipsync_runtime::admission::AdmitError::Full { .. } => {
                ApiError::QueueFull { retry_after_s: 5 }
            }
            other => ApiError::Unavailable(other.to_string()),
        });
    }
    let (epoch, rfc) = now();
    let mut record = TaskRecord::new(
        task_id.clone(),
        TaskRequest {
            video: video.clone(),
            audio: audio.clone(),
            model: params.model,
            inference_steps: params.inference_steps,
            guidance_scale: params.guidance_scale,
            seed: params.seed,
            webhook_url: params.webhook_url,
            output_upload_url: params.output_upload_url,
        },
        epoch,
        rfc,
    );
    record.artifacts = uploaded.to_vec();
    record.owner = caller.tenant.clone();
    let revision = match state.tasks.create(&record).await {
        Ok(r) => r,
        Err(e) => {
            undo_idem().await;
            upload::cleanup(state, uploaded).await;
            return Err(ApiError::Unavailable(format!("task create: {e}")));
        }
    };
    state.index.apply(revision, record.clone());
    let job = FetchJob {
        v: WORK_VERSION,
        task_id: task_id.clone(),
        video,
        audio,
    };
    // The root of the task's trace: every stage's job span descends from it.
    let trace_id = lipsync_runtime::runner::trace_id(&task_id);
    let span = tracing::info_span!(
        parent: None,
        "task",
        task_id = %task_id,
        trace_id = %trace_id,
        tenant = caller.tenant.as_deref().unwrap_or("-")
    );
    lipsync_runtime::telemetry::root_trace(&span, &trace_id);
    let published = lipsync_runtime::publish_work(&state.js, &job)
        .instrument(span)
        .await;
    if let Err(e) = published {
        tracing::warn!(task_id = %task_id, request_id, error = %e, "work.fetch publish failed");
        let err = TaskError::new(
            ErrorCode::Internal,
            "the task could not be queued (work queue full or unavailable); submit it again later",
        );
        if let Err(e) = state.tasks.fail(&task_id, None, err).await {
            tracing::error!(task_id = %task_id, error = %e, "could not fail an unqueued task");
        }
        undo_idem().await;
        upload::cleanup(state, uploaded).await;
        return Err(ApiError::QueueFull { retry_after_s: 5 });
    }
    state.metrics.submitted.inc();
    tracing::info!(
        task_id = %task_id,
        trace_id = %trace_id,
        request_id,
        tenant = caller.tenant.as_deref().unwrap_or("-"),
        "task queued"
    );
    let queue_position = state.index.position(&record.task_id).or(Some(0));
    Ok(Json(SyncResponse {
        task_id,
        queue_position,
        status: "queued".into(),
        message: "task queued".into(),
    })
    .into_response())
}
