//! `POST /sync`: validate, (idempotency claim), KV create of the task record, publish
//! `work.fetch`, answer. The answer comes only after the record and the work item are both
//! durable; a failed publish fails the record (no phantom queued task) and answers 503.
//!
//! JSON bodies are limited to `gateway.max_json_body_bytes`; multipart uploads stream each
//! file into the artifact store (`<task_id>/input_video`, `<task_id>/input_audio`), both
//! files together capped at `gateway.max_upload_bytes`. Unknown fields are ignored.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use lipsync_runtime::tasks::now;
use lipsync_schemas::{
    ErrorCode, FetchJob, InputSource, TaskError, TaskRecord, TaskRequest, WORK_VERSION, names,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::io::StreamReader;

use crate::AppState;
use crate::api::{MAX_GUIDANCE, MAX_STEPS, MIN_GUIDANCE, MIN_STEPS, SyncRequest, SyncResponse};
use crate::auth::Caller;
use crate::error::{ApiError, Result};

/// Longest accepted Idempotency-Key.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Longest accepted text field of a multipart body.
const MAX_TEXT_FIELD: usize = 8192;
/// How long a replay waits for the first request's record to appear.
const REPLAY_WAIT: Duration = Duration::from_secs(5);

/// Validated, normalised parameters (also what the idempotency hash covers).
#[derive(Debug, Clone, Serialize)]
struct Params {
    model: String,
    inference_steps: u32,
    guidance_scale: f64,
    seed: Option<u64>,
    webhook_url: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct IdemValue {
    task_id: String,
    body_hash: String,
}

/// `POST /sync` handler (JSON or multipart).
#[utoipa::path(
    post,
    path = "/sync",
    tag = "tasks",
    request_body(
        content(
            (SyncRequest = "application/json"),
            (crate::api::SyncUpload = "multipart/form-data"),
        ),
        description = "URLs (JSON) or files (multipart). Unknown fields are ignored."
    ),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Same key + same body within 24 h returns the same task; a different body answers 409"),
    ),
    responses(
        (status = 200, description = "Task accepted and queued (or an idempotent replay)", body = SyncResponse),
        (status = 400, description = "Body is not valid JSON or multipart", body = crate::error::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = crate::error::ErrorBody),
        (status = 409, description = "Idempotency-Key reused with a different body", body = crate::error::ErrorBody),
        (status = 413, description = "Body too large", body = crate::error::ErrorBody),
        (status = 415, description = "Neither JSON nor multipart", body = crate::error::ErrorBody),
        (status = 422, description = "Invalid field", body = crate::error::ErrorBody),
        (status = 429, description = "Rate limited", body = crate::error::ErrorBody),
        (status = 503, description = "Work queue full or backend unavailable", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn sync(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Caller>>,
    req: Request,
) -> Result<Response> {
    let caller = caller.map(|c| c.0.0).unwrap_or_default();
    let idem = idempotency_key(req.headers())?;
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_ascii_lowercase();
    if ctype.starts_with("multipart/form-data") {
        let task_id = uuid::Uuid::new_v4().to_string();
        let mp = Multipart::from_request(req, &state).await.map_err(|e| {
            ApiError::InvalidJson(format!("invalid multipart body: {}", e.body_text()))
        })?;
        let mut uploaded = Vec::new();
        let res = upload(&state, &task_id, mp, &mut uploaded).await;
        let (video, audio, params, hash) = match res {
            Ok(v) => v,
            Err(e) => {
                cleanup(&state, &uploaded).await;
                return Err(e);
            }
        };
        accept(
            &state, &caller, idem, task_id, video, audio, params, hash, uploaded,
        )
        .await
    } else if ctype.starts_with("application/json") || ctype.contains("+json") {
        let limit = state.gw.max_json_body_bytes;
        let body = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| body_error(e, limit))?;
        let sr = parse_json(&body)?;
        let video = check_url(&state, "video_url", &sr.video_url)?;
        let audio = check_url(&state, "audio_url", &sr.audio_url)?;
        let params = validate(
            &state,
            sr.inference_ckpt_path,
            sr.inference_steps,
            sr.guidance_scale,
            sr.seed,
            sr.webhook_url,
        )?;
        let hash = hash_of(&(&sr.video_url, &sr.audio_url, &params), &[]);
        let task_id = uuid::Uuid::new_v4().to_string();
        accept(
            &state,
            &caller,
            idem,
            task_id,
            InputSource::Url(video),
            InputSource::Url(audio),
            params,
            hash,
            Vec::new(),
        )
        .await
    } else {
        Err(ApiError::UnsupportedMediaType(
            "use Content-Type application/json or multipart/form-data".into(),
        ))
    }
}

fn body_error(e: axum::Error, limit: usize) -> ApiError {
    match e
        .into_inner()
        .downcast::<http_body_util::LengthLimitError>()
    {
        Ok(_) => ApiError::PayloadTooLarge {
            limit: limit as u64,
        },
        Err(e) => ApiError::InvalidJson(format!("could not read the body: {e}")),
    }
}

fn parse_json(body: &[u8]) -> Result<SyncRequest> {
    serde_json::from_slice::<SyncRequest>(body).map_err(|e| {
        let msg = e.to_string();
        match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidRequest(msg),
            _ => ApiError::InvalidJson(format!("body is not valid JSON: {msg}")),
        }
    })
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let s = v
        .to_str()
        .map_err(|_| ApiError::InvalidRequest("Idempotency-Key must be visible ASCII".into()))?;
    if s.is_empty() || s.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::InvalidRequest(format!(
            "Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    Ok(Some(s.to_owned()))
}

/// Whether `raw` starts like the documented pattern `^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9]`.
fn looks_like_http_url(raw: &str) -> bool {
    let lower = raw.get(..8).unwrap_or(raw).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        &raw[8..]
    } else if lower.starts_with("http://") {
        &raw[7..]
    } else {
        return false;
    };
    rest.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
}

fn check_url(state: &AppState, field: &str, raw: &str) -> Result<String> {
    if !looks_like_http_url(raw) {
        return Err(ApiError::InvalidRequest(format!(
            "{field} must be an http:// or https:// URL with a host"
        )));
    }
    match state.policy.check_url(raw) {
        Ok(u) => Ok(u.to_string()),
        Err(e)
            if matches!(
                e,
                lipsync_fetch::guard::GuardError::AddressNotAllowed { .. }
            ) =>
        {
            Err(ApiError::UrlNotAllowed(format!("{field}: {e}")))
        }
        Err(e) => Err(ApiError::InvalidRequest(format!("{field}: {e}"))),
    }
}

fn validate(
    state: &AppState,
    model: Option<String>,
    steps: Option<u32>,
    guidance: Option<f64>,
    seed: Option<u64>,
    webhook_url: Option<String>,
) -> Result<Params> {
    let gw = &state.gw;
    let model = match model {
        None => gw.models.first().cloned().ok_or_else(|| {
            ApiError::InvalidRequest("no model is configured on this server".into())
        })?,
        Some(m) if gw.models.iter().any(|c| c == &m) => m,
        Some(m) => {
            let shown: String = m.chars().take(64).collect();
            return Err(ApiError::InvalidRequest(format!(
                "inference_ckpt_path `{shown}` is not a configured model; use one of: {}",
                gw.models.join(", ")
            )));
        }
    };
    let inference_steps = steps.unwrap_or(gw.default_steps);
    if !(MIN_STEPS..=MAX_STEPS).contains(&inference_steps) {
        return Err(ApiError::InvalidRequest(format!(
            "inference_steps must be between {MIN_STEPS} and {MAX_STEPS}"
        )));
    }
    let guidance_scale = guidance.unwrap_or(gw.default_guidance);
    if !guidance_scale.is_finite() || !(MIN_GUIDANCE..=MAX_GUIDANCE).contains(&guidance_scale) {
        return Err(ApiError::InvalidRequest(format!(
            "guidance_scale must be between {MIN_GUIDANCE} and {MAX_GUIDANCE}"
        )));
    }
    let webhook_url = match webhook_url {
        None => None,
        Some(_) if gw.webhook_secret.is_empty() => {
            return Err(ApiError::InvalidRequest(
                "webhook_url is not available: the server has no webhook secret configured".into(),
            ));
        }
        Some(u) => Some(check_url(state, "webhook_url", &u)?),
    };
    Ok(Params {
        model,
        inference_steps,
        guidance_scale,
        seed,
        webhook_url,
    })
}

fn hash_of<T: Serialize>(params: &T, file_hashes: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(params).unwrap_or_default());
    for f in file_hashes {
        h.update(b"\n");
        h.update(f.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Stream a multipart body into the artifact store; returns the inputs, the parameters
/// and the idempotency hash. Keys written are pushed onto `uploaded` as they are created.
async fn upload(
    state: &AppState,
    task_id: &str,
    mut mp: Multipart,
    uploaded: &mut Vec<String>,
) -> Result<(InputSource, InputSource, Params, String)> {
    let mp_err = |e: axum::extract::multipart::MultipartError| {
        ApiError::InvalidJson(format!("invalid multipart body: {}", e.body_text()))
    };
    let cap = state.gw.max_upload_bytes;
    let mut total: u64 = 0;
    let mut video = None;
    let mut audio = None;
    let mut text = std::collections::HashMap::<String, String>::new();
    while let Some(field) = mp.next_field().await.map_err(mp_err)? {
        let name = field.name().unwrap_or_default().to_owned();
        let artifact = match name.as_str() {
            "video" => names::artifact::VIDEO,
            "audio" => names::artifact::AUDIO_ORIGINAL,
            _ => {
                let value = read_text(field, &name).await?;
                if text.insert(name.clone(), value).is_some() {
                    return Err(ApiError::InvalidRequest(format!(
                        "field `{name}` given twice"
                    )));
                }
                continue;
            }
        };
        let slot = if name == "video" {
            &mut video
        } else {
            &mut audio
        };
        if slot.is_some() {
            return Err(ApiError::InvalidRequest(format!(
                "field `{name}` given twice"
            )));
        }
        let key = names::artifact_key(task_id, artifact);
        uploaded.push(key.clone());
        let (size, digest) = store_field(state, &key, field, cap - total.min(cap)).await?;
        total += size;
        if size == 0 {
            return Err(ApiError::InvalidRequest(format!("file `{name}` is empty")));
        }
        *slot = Some((key, digest));
    }
    let (Some((video_key, video_hash)), Some((audio_key, audio_hash))) = (video, audio) else {
        return Err(ApiError::InvalidRequest(
            "multipart body needs both a `video` and an `audio` file".into(),
        ));
    };
    // Empty and `null` text fields mean "not given" (form encoders write None that way).
    let num = |k: &str| {
        text.get(k)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty() && *s != "null")
    };
    let parse_err = |k: &str| ApiError::InvalidRequest(format!("{k} is not a valid number"));
    let steps = num("inference_steps")
        .map(|s| s.parse::<u32>().map_err(|_| parse_err("inference_steps")))
        .transpose()?;
    let guidance = num("guidance_scale")
        .map(|s| s.parse::<f64>().map_err(|_| parse_err("guidance_scale")))
        .transpose()?;
    let seed = num("seed")
        .map(|s| s.parse::<u64>().map_err(|_| parse_err("seed")))
        .transpose()?;
    let params = validate(
        state,
        num("inference_ckpt_path").map(str::to_owned),
        steps,
        guidance,
        seed,
        num("webhook_url").map(str::to_owned),
    )?;
    let hash = hash_of(&params, &[video_hash, audio_hash]);
    Ok((
        InputSource::Artifact(video_key),
        InputSource::Artifact(audio_key),
        params,
        hash,
    ))
}

async fn read_text(mut field: axum::extract::multipart::Field<'_>, name: &str) -> Result<String> {
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| ApiError::InvalidJson(format!("invalid multipart body: {}", e.body_text())))?
    {
        buf.extend_from_slice(&chunk);
        if buf.len() > MAX_TEXT_FIELD {
            return Err(ApiError::InvalidRequest(format!(
                "field `{name}` is too long"
            )));
        }
    }
    String::from_utf8(buf)
        .map_err(|_| ApiError::InvalidRequest(format!("field `{name}` is not UTF-8")))
}

#[derive(Default)]
struct Count {
    n: u64,
    exceeded: bool,
    hasher: Sha256,
}

/// Stream one file field into the artifact store with a byte cap; returns (size, sha256).
async fn store_field(
    state: &AppState,
    key: &str,
    field: axum::extract::multipart::Field<'_>,
    cap: u64,
) -> Result<(u64, String)> {
    let count = Arc::new(Mutex::new(Count::default()));
    let c2 = count.clone();
    let stream = field.map(move |chunk: std::result::Result<Bytes, _>| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        let mut c = c2.lock().unwrap_or_else(|e| e.into_inner());
        c.n += chunk.len() as u64;
        if c.n > cap {
            c.exceeded = true;
            return Err(std::io::Error::other("upload too large"));
        }
        c.hasher.update(&chunk);
        Ok(chunk)
    });
    let mut reader = StreamReader::new(Box::pin(stream));
    let res = state.artifacts.put(key, &mut reader).await;
    let mut c = count.lock().unwrap_or_else(|e| e.into_inner());
    if c.exceeded {
        return Err(ApiError::PayloadTooLarge {
            limit: state.gw.max_upload_bytes,
        });
    }
    match res {
        Ok(_) => {
            let digest = hex::encode(std::mem::take(&mut c.hasher).finalize());
            Ok((c.n, digest))
        }
        Err(lipsync_runtime::ArtifactError::Io(e)) => {
            Err(ApiError::InvalidJson(format!("upload interrupted: {e}")))
        }
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
    }
}

async fn cleanup(state: &AppState, keys: &[String]) {
    for k in keys {
        if let Err(e) = state.artifacts.delete(k).await {
            tracing::warn!(key = %k, error = %e, "could not delete an upload");
        }
    }
}

fn idem_kv_key(caller: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(caller.as_bytes());
    h.update(b"\n");
    h.update(key.as_bytes());
    format!("idem.{}", hex::encode(h.finalize()))
}

#[allow(clippy::too_many_arguments)]
async fn accept(
    state: &AppState,
    caller: &str,
    idem: Option<String>,
    task_id: String,
    video: InputSource,
    audio: InputSource,
    params: Params,
    hash: String,
    uploaded: Vec<String>,
) -> Result<Response> {
    let idem_key = idem.map(|k| idem_kv_key(caller, &k));
    if let Some(k) = &idem_key {
        let value = serde_json::to_vec(&IdemValue {
            task_id: task_id.clone(),
            body_hash: hash.clone(),
        })
        .unwrap_or_default();
        match state.idempotency.create(k, value.into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                cleanup(state, &uploaded).await;
                return replay(state, k, &hash).await;
            }
            Err(e) => {
                cleanup(state, &uploaded).await;
                return Err(ApiError::Unavailable(format!("idempotency create: {e}")));
            }
        }
    }
    let undo_idem = || async {
        if let Some(k) = &idem_key {
            let _ = state.idempotency.delete(k).await;
        }
    };
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
        },
        epoch,
        rfc,
    );
    record.artifacts = uploaded.clone();
    let revision = match state.tasks.create(&record).await {
        Ok(r) => r,
        Err(e) => {
            undo_idem().await;
            cleanup(state, &uploaded).await;
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
    if let Err(e) = lipsync_runtime::publish_work(&state.js, &job).await {
        tracing::warn!(task_id = %task_id, error = %e, "work.fetch publish failed");
        let err = TaskError::new(
            ErrorCode::Internal,
            "the task could not be queued (work queue full or unavailable); submit it again later",
        );
        if let Err(e) = state.tasks.fail(&task_id, None, err).await {
            tracing::error!(task_id = %task_id, error = %e, "could not fail an unqueued task");
        }
        undo_idem().await;
        return Err(ApiError::QueueFull { retry_after_s: 5 });
    }
    state.metrics.submitted.inc();
    tracing::info!(task_id = %task_id, "task queued");
    let queue_position = state.index.position(&record.task_id).or(Some(0));
    Ok(Json(SyncResponse {
        task_id,
        queue_position,
        status: "queued".into(),
        message: "task queued".into(),
    })
    .into_response())
}

async fn replay(state: &AppState, kv_key: &str, hash: &str) -> Result<Response> {
    let in_progress = || {
        ApiError::IdempotencyConflict(
            "a request with this Idempotency-Key is still being processed; retry shortly".into(),
        )
    };
    let raw = state
        .idempotency
        .get(kv_key)
        .await
        .map_err(|e| ApiError::Unavailable(format!("idempotency get: {e}")))?
        .ok_or_else(in_progress)?;
    let prev: IdemValue = serde_json::from_slice(&raw)
        .map_err(|e| ApiError::Internal(format!("idempotency value: {e}")))?;
    if prev.body_hash != hash {
        return Err(ApiError::IdempotencyConflict(
            "this Idempotency-Key was already used with a different request".into(),
        ));
    }
    let deadline = tokio::time::Instant::now() + REPLAY_WAIT;
    loop {
        if let Some((rec, rev)) = state
            .tasks
            .get(&prev.task_id)
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
        {
            state.index.apply(rev, rec.clone());
            return Ok(Json(SyncResponse {
                task_id: rec.task_id.clone(),
                queue_position: state.index.position(&rec.task_id),
                status: rec.status.as_str().into(),
                message: "existing task for this Idempotency-Key".into(),
            })
            .into_response());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(in_progress());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_syntax_and_data_errors_are_told_apart() {
        assert!(matches!(parse_json(b"{"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(
            parse_json(b"{\"video_url\": NaN}"),
            Err(ApiError::InvalidJson(_))
        ));
        assert!(matches!(
            parse_json(b"[]"),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(matches!(
            parse_json(
                br#"{"video_url":"http://a/v","audio_url":"http://a/a","inference_steps":-1}"#
            ),
            Err(ApiError::InvalidRequest(_))
        ));
        assert!(super::looks_like_http_url("HTTPS://a"));
        assert!(super::looks_like_http_url("http://10.0.0.1/x"));
        assert!(!super::looks_like_http_url(" http://a"));
        assert!(!super::looks_like_http_url("http://"));
        assert!(!super::looks_like_http_url("http://-a"));
        assert!(!super::looks_like_http_url("ftp://a"));
        let ok = parse_json(br#"{"video_url":"http://a/v","audio_url":"http://a/a","extra":1}"#)
            .unwrap();
        assert_eq!(ok.inference_steps, None);
    }
}
