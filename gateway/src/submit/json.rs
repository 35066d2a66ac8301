//! JSON intake of `POST /sync`: read the body within `gateway.max_json_body_bytes`,
//! parse it (syntax errors 400, data errors 422) and check the URLs and parameters.

use axum::extract::Request;
use lipsync_schemas::InputSource;

use super::validate::{Params, check_url, hash_of, validate};
use crate::AppState;
use crate::api::SyncRequest;
use crate::error::{ApiError, Result};

/// A checked JSON submission.
pub(super) struct JsonTask {
    pub(super) video: InputSource,
    pub(super) audio: InputSource,
    pub(super) params: Params,
    pub(super) hash: String,
}

pub(super) async fn intake(state: &AppState, req: Request) -> Result<JsonTask> {
    let limit = state.gw.max_json_body_bytes;
    let body = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| body_error(e, limit))?;
    let sr = parse_json(&body)?;
    let video = check_url(state, "video_url", &sr.video_url)?;
    let audio = check_url(state, "audio_url", &sr.audio_url)?;
    let params = validate(
        state,
        sr.inference_ckpt_path,
        sr.inference_steps,
        sr.guidance_scale,
        sr.seed,
        sr.webhook_url,
    )?;
    let hash = hash_of(&(&sr.video_url, &sr.audio_url, &params), &[]);
    Ok(JsonTask {
        video: InputSource::Url(video),
        audio: InputSource::Url(audio),
        params,
        hash,
    })
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

pub(super) fn parse_json(body: &[u8]) -> Result<SyncRequest> {
    serde_json::from_slice::<SyncRequest>(body).map_err(|e| {
        let msg = e.to_string();
        match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidRequest(msg),
            _ => ApiError::InvalidJson(format!("body is not valid JSON: {msg}")),
        }
    })
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
