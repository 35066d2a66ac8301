//! `GET /outputs/{task_id}/{file}` (and the `/results/{task_id}/output.mp4` alias): a
//! task's result or mask video streamed from the artifact store, with Content-Length,
//! ETag (the object digest), `If-None-Match` and single-range `Range` requests.
//!
//! Only `result.mp4` and `mask.mp4` are served, and only when the task record lists them;
//! the key is built from the validated id and that fixed name, so no path can escape.
//! A range is read from the chunks that hold it (the artifact store's ranged read), never
//! from byte 0; multi-range requests get the whole file (RFC 9110 allows it).
//!
//! With `outputs.presign = true` and the `s3` backend the route answers, after the same
//! checks, 307 Temporary Redirect to a presigned GET URL of the object (`Cache-Control:
//! no-store`: the URL expires), so the bytes (and ranges) come from the bucket.

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use lipsync_runtime::artifacts::Presign;
use lipsync_schemas::names;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Result};

/// Parses a single `bytes=` range against `size`: `Ok(None)` = serve everything,
/// `Err(())` = unsatisfiable.
pub(crate) fn parse_range(value: &str, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let Ok(start) = a.parse::<u64>() else {
            return Ok(None);
        };
        let end = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            match b.parse::<u64>() {
                Ok(e) if e >= start => e.min(size.saturating_sub(1)),
                _ => return Ok(None),
            }
        };
        if start >= size {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

/// `GET /outputs/{task_id}/{file}`.
#[utoipa::path(
    get,
    path = "/outputs/{task_id}/{file}",
    operation_id = "get_output",
    tag = "outputs",
    params(
        ("task_id" = String, Path, description = "Task id"),
        ("file" = String, Path, description = "`result.mp4` or `mask.mp4`"),
        ("Range" = Option<String>, Header, description = "e.g. `bytes=0-1023`"),
    ),
    responses(
        (status = 200, description = "The whole video", content_type = "video/mp4", body = Vec<u8>),
        (status = 206, description = "A byte range", content_type = "video/mp4", body = Vec<u8>),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 307, description = "With `outputs.presign` on the s3 backend: the video is at the presigned URL in `Location` (valid `artifacts.s3.presign_expiry_s`; Range works there)",
            headers(("Location" = String, description = "Presigned GET URL of the video"))),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown task (or another tenant's), file not produced (yet) or expired", body = ErrorBody),
        (status = 416, description = "Range not satisfiable", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Backend unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn output(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((task_id, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response> {
    serve(&state, &caller, &task_id, &file, &headers).await
}

/// `GET /results/{task_id}/output.mp4`: alias of the result video.
#[utoipa::path(
    get,
    path = "/results/{task_id}/output.mp4",
    operation_id = "get_result_legacy",
    tag = "outputs",
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The whole video", content_type = "video/mp4", body = Vec<u8>),
        (status = 206, description = "A byte range", content_type = "video/mp4", body = Vec<u8>),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 307, description = "With `outputs.presign` on the s3 backend: the video is at the presigned URL in `Location`",
            headers(("Location" = String, description = "Presigned GET URL of the video"))),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown task (or another tenant's) or no result (yet)", body = ErrorBody),
        (status = 416, description = "Range not satisfiable", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Backend unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn result_alias(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    serve(&state, &caller, &task_id, names::artifact::RESULT, &headers).await
}

async fn serve(
    state: &AppState,
    caller: &Caller,
    task_id: &str,
    file: &str,
    headers: &HeaderMap,
) -> Result<Response> {
    let not_found = || ApiError::NotFound("no such output".into());
    let (rec, _) = state.load_for(caller, task_id).await?;
    let listed = match file {
        names::artifact::RESULT => rec.output_video_url.is_some(),
        names::artifact::MASK => rec.output_mask_url.is_some(),
        _ => false,
    };
    if !listed {
        return Err(not_found());
    }
    let key = names::artifact_key(&rec.task_id, file);
    let meta = state
        .artifacts
        .info(&key)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
        .ok_or_else(not_found)?;
    if state.outputs_presign
        && let Some(resp) = redirect(state, &key).await?
    {
        return Ok(resp);
    }
    let etag = match &meta.digest {
        Some(d) => format!("\"{}\"", d.replace('"', "")),
        None => format!(
            "W/\"{}-{}\"",
            meta.size,
            meta.modified.as_deref().unwrap_or("")
        ),
    };
    let etag_value = HeaderValue::from_str(&etag).map_err(|e| ApiError::Internal(e.to_string()))?;
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        && (inm.trim() == "*" || inm.split(',').any(|t| t.trim() == etag))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let size = meta.size;
    let if_range_ok = headers
        .get(header::IF_RANGE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.trim() == etag);
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if if_range_ok => {
            parse_range(r, size).map_err(|()| ApiError::RangeNotSatisfiable { size })?
        }
        _ => None,
    };
    let (status, start, len) = match range {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e - s + 1),
        None => (StatusCode::OK, 0, size),
    };
    let reader = match range {
        Some(_) => state.artifacts.get_range(&key, start, len).await,
        None => state.artifacts.get(&key).await,
    }
    .map_err(|e| match e {
        lipsync_runtime::ArtifactError::NotFound(_) => not_found(),
        other => ApiError::Unavailable(other.to_string()),
    })?;
    let body = Body::from_stream(ReaderStream::new(reader.take(len)));
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "video/mp4")
        .header(header::CONTENT_LENGTH, len)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, etag_value)
        .header(header::CACHE_CONTROL, "private, max-age=3600");
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", start + len - 1),
        );
    }
    resp.body(body)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// 307 to a presigned GET URL of `key`, when the backend has such URLs.
async fn redirect(state: &AppState, key: &str) -> Result<Option<Response>> {
    let Some((url, _)) = state
        .artifacts
        .presign(Presign::Get, key)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?
    else {
        return Ok(None);
    };
    let location =
        HeaderValue::from_str(url.as_str()).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Some(
        (
            StatusCode::TEMPORARY_REDIRECT,
            [
                (header::LOCATION, location),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
        )
            .into_response(),
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-1000", 100), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=50-1000", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
        assert_eq!(parse_range("bytes=5-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=x-1", 100), Ok(None));
    }
}
