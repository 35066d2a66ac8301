//! `Idempotency-Key`: the same key and the same body within the key's lifetime (24 h,
//! the `lipsync_idempotency` bucket) return the same task; a different body answers 409.
//! Keys are scoped by caller, so two tenants never share one.

use std::time::Duration;

use async_nats::jetstream::kv;
use axum::Json;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::api::SyncResponse;
use crate::error::{ApiError, Result};

/// Longest accepted Idempotency-Key.
const MAX_IDEMPOTENCY_KEY: usize = 255;
/// How long a replay waits for the first request's record to appear.
const REPLAY_WAIT: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct IdemValue {
    task_id: String,
    body_hash: String,
}

/// The request's Idempotency-Key, if any (validated).
pub(super) fn key_of(headers: &HeaderMap) -> Result<Option<String>> {
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

/// The KV key of a caller's Idempotency-Key.
pub(super) fn kv_key(caller: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(caller.as_bytes());
    h.update(b"\n");
    h.update(key.as_bytes());
    format!("idem.{}", hex::encode(h.finalize()))
}

/// What claiming a key gave.
pub(super) enum Claim {
    /// This request owns the key now.
    New,
    /// The key was used before: the answer to send (a replay or a conflict).
    Replay(Result<Response>),
}

/// Claim `kv_key` for `task_id` and `hash`.
pub(super) async fn claim(
    state: &AppState,
    kv_key: &str,
    task_id: &str,
    hash: &str,
) -> Result<Claim> {
    let value = serde_json::to_vec(&IdemValue {
        task_id: task_id.to_owned(),
        body_hash: hash.to_owned(),
    })
    .unwrap_or_default();
    match state.idempotency.create(kv_key, value.into()).await {
        Ok(_) => Ok(Claim::New),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
            Ok(Claim::Replay(replay(state, kv_key, hash).await))
        }
        Err(e) => Err(ApiError::Unavailable(format!("idempotency create: {e}"))),
    }
}

/// Give a claimed key back (the submission failed).
pub(super) async fn release(state: &AppState, kv_key: &str) {
    let _ = state.idempotency.delete(kv_key).await;
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
