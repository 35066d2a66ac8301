//! Multipart intake of `POST /sync`: files instead of URLs. Each file streams into the
//! artifact store (`<task_id>/input_video`, `<task_id>/input_audio`), both together capped
//! at `gateway.max_upload_bytes`. On the s3 backend either input may instead be named by
//! a text field `video_upload_id` / `audio_upload_id` (a direct upload, as in JSON).
//!
//! Limits, before and while reading: a `Content-Length` over the cap (plus room for the
//! text fields) is refused with 413 before a byte is read; at most
//! `gateway.multipart_max_fields` fields; text fields of at most 8 KiB; the whole upload
//! within `gateway.upload_timeout_s` (408 after it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use bytes::Bytes;
use futures::StreamExt;
use lipsync_schemas::{InputSource, names};
use sha2::{Digest, Sha256};
use tokio_util::io::StreamReader;

use super::validate::{Params, RawParams, hash_of, validate};
use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, Result};

/// Longest accepted text field of a multipart body.
const MAX_TEXT_FIELD: usize = 8192;
/// Room for the boundaries, part headers and text fields on top of the file cap.
const FORM_OVERHEAD: u64 = 1 << 20;

/// A stored upload.
pub(super) struct Uploaded {
    pub(super) video: InputSource,
    pub(super) audio: InputSource,
    pub(super) params: Params,
    pub(super) hash: String,
    /// Keys of the direct uploads it names (claimed for the task on acceptance).
    pub(super) direct: Vec<String>,
}

/// Refuse a declared body larger than the upload cap before reading it.
pub(super) fn precheck(state: &AppState, req: &Request) -> Result<()> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(n) = declared
        && n > state.gw.max_upload_bytes.saturating_add(FORM_OVERHEAD)
    {
        return Err(ApiError::PayloadTooLarge {
            limit: state.gw.max_upload_bytes,
        });
    }
    Ok(())
}

/// Read the multipart body within the upload deadline. Keys written are pushed onto
/// `uploaded` as they are created (the caller deletes them on failure).
pub(super) async fn intake(
    state: &AppState,
    caller: &Caller,
    task_id: &str,
    req: Request,
    uploaded: &mut Vec<String>,
) -> Result<Uploaded> {
    precheck(state, &req)?;
    let mp = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::InvalidJson(format!("invalid multipart body: {}", e.body_text())))?;
    let deadline = Duration::from_secs(state.gw.upload_timeout_s.max(1));
    match tokio::time::timeout(deadline, read_form(state, caller, task_id, mp, uploaded)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the upload did not finish within {} s",
            deadline.as_secs()
        ))),
    }
}

fn mp_err(e: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::InvalidJson(format!("invalid multipart body: {}", e.body_text()))
}

async fn read_form(
    state: &AppState,
    caller: &Caller,
    task_id: &str,
    mut mp: Multipart,
    uploaded: &mut Vec<String>,
) -> Result<Uploaded> {
    let cap = state.gw.max_upload_bytes;
    let max_fields = state.gw.multipart_max_fields.max(2);
    let mut fields = 0usize;
    let mut total: u64 = 0;
    let mut video = None;
    let mut audio = None;
    let mut text = HashMap::<String, String>::new();
    while let Some(field) = mp.next_field().await.map_err(mp_err)? {
        fields += 1;
        if fields > max_fields {
            return Err(ApiError::InvalidRequest(format!(
                "too many multipart fields (at most {max_fields})"
            )));
        }
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
    // Empty and `null` text fields mean "not given" (form encoders write None that way).
    let num = |k: &str| {
        text.get(k)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty() && *s != "null")
    };
    let video = input(state, caller, "video", video, num("video_upload_id")).await?;
    let audio = input(state, caller, "audio", audio, num("audio_upload_id")).await?;
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
        RawParams {
            model: num("inference_ckpt_path").map(str::to_owned),
            steps,
            guidance,
            seed,
            webhook_url: num("webhook_url").map(str::to_owned),
            output_upload_url: num("output_upload_url").map(str::to_owned),
        },
    )?;
    let hash = hash_of(&params, &[video.hash, audio.hash]);
    // One upload may serve as both inputs (a video with its own sound track).
    let mut direct: Vec<String> = [&video.direct, &audio.direct]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    direct.dedup();
    Ok(Uploaded {
        video: InputSource::Artifact(video.key),
        audio: InputSource::Artifact(audio.key),
        params,
        hash,
        direct,
    })
}

/// One input of a form: a stored file part or a direct upload.
struct FormInput {
    key: String,
    /// What the request hash takes: the file's SHA-256, or the upload's key.
    hash: String,
    /// The key again when it is a direct upload (claimed for the task).
    direct: Option<String>,
}

/// The `name` input from its file part (`(key, sha256)`) or its `{name}_upload_id`
/// field: exactly one of them.
async fn input(
    state: &AppState,
    caller: &Caller,
    name: &str,
    file: Option<(String, String)>,
    upload_id: Option<&str>,
) -> Result<FormInput> {
    match (file, upload_id) {
        (Some((key, digest)), None) => Ok(FormInput {
            key,
            hash: digest,
            direct: None,
        }),
        (None, Some(id)) => {
            let key =
                crate::uploads::resolve(state, caller, &format!("{name}_upload_id"), id).await?;
            Ok(FormInput {
                key: key.clone(),
                hash: key.clone(),
                direct: Some(key),
            })
        }
        (Some(_), Some(_)) => Err(ApiError::InvalidRequest(format!(
            "give either a `{name}` file or `{name}_upload_id`, not both"
        ))),
        (None, None) => Err(ApiError::InvalidRequest(format!(
            "multipart body needs a `{name}` file (or `{name}_upload_id`)"
        ))),
    }
}

async fn read_text(mut field: axum::extract::multipart::Field<'_>, name: &str) -> Result<String> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(mp_err)? {
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
        Err(lipsync_runtime::ArtifactError::Full(_)) => Err(ApiError::StorageFull),
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
    }
}

/// Delete the uploads of a refused submission.
pub(super) async fn cleanup(state: &AppState, keys: &[String]) {
    for k in keys {
        if let Err(e) = state.artifacts.delete(k).await {
            tracing::warn!(key = %k, error = %e, "could not delete an upload");
        }
    }
}
