//! Direct uploads (`POST /uploads`): the client gets a presigned `PUT` URL of an object in
//! the S3 bucket, sends the file there itself (not through the gateway), and names the
//! upload in `POST /sync` as `video_upload_id` / `audio_upload_id`.
//!
//! - Keys are `uploads/<tenant>/<upload_id>`: the tenant part comes from the caller's key
//!   (`_` on an open service), the id is a random UUID v4. A task's input is resolved from
//!   the caller's own tenant, so another tenant's id is simply not found.
//! - `POST /sync` checks the object exists and is not empty, and claims the upload for
//!   the task (one task per upload: the object is deleted with the task's inputs); a
//!   refused submission gives the claim back, so the client can submit again.
//! - A presigned `PUT` cannot cap the size: the fetch stage refuses an object larger than
//!   `fetch.max_bytes` (`input_too_large`) before reading it.
//! - Objects never named in a task stay until the retention sweep (`artifacts.ttl_s`).
//! - Only the `s3` backend has presigned URLs; with `nats` the route and the id fields
//!   answer `uploads_unavailable` (409).

use axum::Extension;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lipsync_runtime::artifacts::Presign;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::api::{UploadRequest, UploadResponse};
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Result};

/// Key prefix of direct uploads.
pub(crate) const PREFIX: &str = "uploads";

fn unavailable() -> ApiError {
    ApiError::UploadsUnavailable(
        "direct uploads need the s3 artifact backend (artifacts.backend = \"s3\"); send the \
         files as multipart/form-data to POST /sync instead"
            .into(),
    )
}

/// The tenant's folder: the tenant name when it is plain (`[A-Za-z0-9_-]`, at most 64
/// characters), else `x.` and a digest of it (a `.` never appears in a plain name);
/// `_` for the open service.
fn tenant_segment(tenant: Option<&str>) -> String {
    match tenant {
        None => "_".to_owned(),
        Some(t)
            if !t.is_empty()
                && t.len() <= 64
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            t.to_owned()
        }
        Some(t) => {
            let digest = Sha256::digest(t.as_bytes());
            format!("x.{}", hex::encode(&digest[..16]))
        }
    }
}

/// The artifact key of upload `id` of `caller`'s tenant.
pub(crate) fn key_of(caller: &Caller, id: &uuid::Uuid) -> String {
    format!(
        "{PREFIX}/{}/{}",
        tenant_segment(caller.tenant.as_deref()),
        id.hyphenated()
    )
}

/// `POST /uploads`.
#[utoipa::path(
    post,
    path = "/uploads",
    operation_id = "create_upload",
    tag = "tasks",
    request_body(
        content((UploadRequest = "application/json")),
        description = "Optional; an empty body is the same as `{}`. Unknown fields are ignored."
    ),
    responses(
        (status = 201, description = "PUT the file's bytes to `upload_url`, then submit `POST /sync` with `video_upload_id` / `audio_upload_id`", body = UploadResponse),
        (status = 400, description = "Body is not valid JSON", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 403, description = "Cross-origin request refused", body = ErrorBody),
        (status = 409, description = "Direct uploads are not available (the server does not use the s3 artifact backend)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid field", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Backend unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    req: Request,
) -> Result<Response> {
    let limit = state.gw.max_json_body_bytes;
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| crate::submit::body_error(e, limit))?;
    let parsed: UploadRequest = if body.iter().all(u8::is_ascii_whitespace) {
        UploadRequest::default()
    } else {
        crate::submit::json_object(&body)?
    };
    if state.artifacts.backend() != "s3" {
        return Err(unavailable());
    }
    let id = uuid::Uuid::new_v4();
    let key = key_of(&caller, &id);
    let (url, valid) = state
        .artifacts
        .presign(Presign::Put, &key)
        .await
        .map_err(|e| ApiError::Unavailable(format!("presign: {e}")))?
        .ok_or_else(unavailable)?;
    state.metrics.uploads_issued.inc();
    tracing::info!(
        upload_id = %id,
        tenant = caller.tenant.as_deref().unwrap_or("-"),
        "upload URL issued"
    );
    let answer = UploadResponse {
        upload_id: id.to_string(),
        upload_url: url.to_string(),
        method: "PUT".into(),
        expires_in_s: valid.as_secs(),
        max_bytes: state.fetch_max_bytes,
        kind: parsed.kind,
    };
    Ok((StatusCode::CREATED, axum::Json(answer)).into_response())
}

/// The artifact key of the upload a `/sync` body names in `field`, after checking that
/// it exists (and is not empty) in the caller's tenant.
pub(crate) async fn resolve(
    state: &AppState,
    caller: &Caller,
    field: &str,
    raw: &str,
) -> Result<String> {
    if state.artifacts.backend() != "s3" {
        return Err(unavailable());
    }
    let id = uuid::Uuid::try_parse(raw.trim()).map_err(|_| {
        ApiError::InvalidRequest(format!(
            "{field} must be the upload_id of a POST /uploads (a UUID)"
        ))
    })?;
    let key = key_of(caller, &id);
    let not_found = || {
        ApiError::UploadNotFound(format!(
            "{field}: no upload with this id (not uploaded yet, expired, already used or \
             another tenant's)"
        ))
    };
    let meta = state
        .artifacts
        .info(&key)
        .await
        .map_err(|e| ApiError::Unavailable(format!("upload info: {e}")))?
        .ok_or_else(not_found)?;
    if meta.size == 0 {
        return Err(ApiError::InvalidRequest(format!(
            "{field}: the uploaded file is empty"
        )));
    }
    Ok(key)
}

/// The idempotency-bucket key that marks upload `key` as used by a task.
fn claim_key(key: &str) -> String {
    format!("upload.{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// Claim each upload key for one task; an upload another task claimed is not found.
/// On error nothing stays claimed.
pub(crate) async fn claim(state: &AppState, keys: &[String]) -> Result<()> {
    use async_nats::jetstream::kv::CreateErrorKind;
    for (i, k) in keys.iter().enumerate() {
        let res = state
            .idempotency
            .create(claim_key(k), bytes::Bytes::from_static(b"1"))
            .await;
        if let Err(e) = res {
            release(state, &keys[..i]).await;
            return Err(if e.kind() == CreateErrorKind::AlreadyExists {
                ApiError::UploadNotFound(
                    "this upload was already used by another task; create a new one".into(),
                )
            } else {
                ApiError::Unavailable(format!("upload claim: {e}"))
            });
        }
    }
    Ok(())
}

/// Give claims back (the submission was refused).
pub(crate) async fn release(state: &AppState, keys: &[String]) {
    for k in keys {
        if let Err(e) = state.idempotency.delete(claim_key(k)).await {
            tracing::warn!(error = %e, "could not release an upload claim");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tenant_segment;

    #[test]
    fn tenant_folders_are_plain_or_digests() {
        assert_eq!(tenant_segment(None), "_");
        assert_eq!(tenant_segment(Some("acme-1_b")), "acme-1_b");
        let odd = tenant_segment(Some("a/../b"));
        assert!(odd.starts_with("x.") && odd.len() == 34, "{odd}");
        assert_ne!(tenant_segment(Some("a b")), tenant_segment(Some("a c")));
        assert!(tenant_segment(Some(&"a".repeat(65))).starts_with("x."));
    }
}
