//! JSON intake of `POST /sync`: read the body within `gateway.max_json_body_bytes`,
//! parse it (syntax errors 400, data errors 422) and check the URLs, upload ids and
//! parameters.

use axum::extract::Request;
use lipsync_schemas::InputSource;

use super::validate::{Params, RawParams, check_url, hash_of, validate};
use crate::AppState;
use crate::api::SyncRequest;
use crate::auth::Caller;
use crate::error::{ApiError, Result};

/// A checked JSON submission.
pub(super) struct JsonTask {
    pub(super) video: InputSource,
    pub(super) audio: InputSource,
    pub(super) params: Params,
    pub(super) hash: String,
    /// Keys of the direct uploads it names (claimed for the task on acceptance).
    pub(super) uploads: Vec<String>,
}

/// One input given by its URL or its upload id (exactly one of them).
async fn source(
    state: &AppState,
    caller: &Caller,
    name: &str,
    url: Option<&str>,
    upload_id: Option<&str>,
) -> Result<InputSource> {
    match (url, upload_id) {
        (Some(u), None) => Ok(InputSource::Url(check_url(
            state,
            &format!("{name}_url"),
            u,
        )?)),
        (None, Some(id)) => Ok(InputSource::Artifact(
            crate::uploads::resolve(state, caller, &format!("{name}_upload_id"), id).await?,
        )),
        (Some(_), Some(_)) => Err(ApiError::InvalidRequest(format!(
            "give either {name}_url or {name}_upload_id, not both"
        ))),
        (None, None) => Err(ApiError::InvalidRequest(format!(
            "missing field `{name}_url` (or `{name}_upload_id`)"
        ))),
    }
}

pub(super) async fn intake(state: &AppState, caller: &Caller, req: Request) -> Result<JsonTask> {
    let limit = state.gw.max_json_body_bytes;
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| body_error(e, limit))?;
    let sr = parse_json(&body)?;
    let video = source(
        state,
        caller,
        "video",
        sr.video_url.as_deref(),
        sr.video_upload_id.as_deref(),
    )
    .await?;
    let audio = source(
        state,
        caller,
        "audio",
        sr.audio_url.as_deref(),
        sr.audio_upload_id.as_deref(),
    )
    .await?;
    let params = validate(
        state,
        RawParams {
            model: sr.inference_ckpt_path,
            steps: sr.inference_steps,
            guidance: sr.guidance_scale,
            seed: sr.seed,
            webhook_url: sr.webhook_url,
            output_upload_url: sr.output_upload_url,
        },
    )?;
    // One upload may serve as both inputs (a video with its own sound track).
    let mut uploads: Vec<String> = [&video, &audio]
        .into_iter()
        .filter_map(|s| match s {
            InputSource::Artifact(k) => Some(k.clone()),
            InputSource::Url(_) => None,
        })
        .collect();
    uploads.dedup();
    // Requests naming URLs only hash as before; upload keys are appended.
    let hash = hash_of(&(&sr.video_url, &sr.audio_url, &params), &uploads);
    Ok(JsonTask {
        video,
        audio,
        params,
        hash,
        uploads,
    })
}

pub(crate) fn body_error(e: axum::Error, limit: usize) -> ApiError {
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

pub(super) fn parse_json(body: &[u8]) -> Result<SyncRequest> {
    json_object(body)
}

/// A JSON object body as `T`: 400 `invalid_json` for bad syntax, 422 `invalid_request`
/// for wrong types, unknown fields or a body that is not an object.
pub(crate) fn json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    let parsed = serde_json::from_slice::<T>(body).map_err(|e| {
        let msg = e.to_string();
        match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidRequest(msg),
            _ => ApiError::InvalidJson(format!("body is not valid JSON: {msg}")),
        }
    })?;
    // Every field has a default, so serde would also take an array (`[]`): only objects.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "invalid type: the body must be a JSON object".into(),
        ));
    }
    Ok(parsed)
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
        let ok = parse_json(br#"{"video_url":"http://a/v","audio_url":"http://a/a","extra":1}"#)
            .unwrap();
        assert_eq!(ok.inference_steps, None);
    }
}
