//! Validation of the task parameters shared by JSON and multipart bodies, and the hash
//! an Idempotency-Key is bound to.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::api::{MAX_GUIDANCE, MAX_STEPS, MIN_GUIDANCE, MIN_STEPS};
use crate::error::{ApiError, Result};

/// Validated, normalised parameters (also what the idempotency hash covers).
#[derive(Debug, Clone, Serialize)]
pub(super) struct Params {
    pub(super) model: String,
    pub(super) inference_steps: u32,
    pub(super) guidance_scale: f64,
    pub(super) seed: Option<u64>,
    pub(super) webhook_url: Option<String>,
    /// Checked against the download policy; absent from the hash's input when not given
    /// (the hashes of earlier requests stay the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) output_upload_url: Option<String>,
}

/// The optional parameters of a submission as given (JSON or form fields).
pub(super) struct RawParams {
    pub(super) model: Option<String>,
    pub(super) steps: Option<u32>,
    pub(super) guidance: Option<f64>,
    pub(super) seed: Option<u64>,
    pub(super) webhook_url: Option<String>,
    pub(super) output_upload_url: Option<String>,
}

/// Whether `raw` starts like the documented pattern `^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9]`.
pub(super) fn looks_like_http_url(raw: &str) -> bool {
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

/// Check a URL against the download policy (`fetch.*`); returns it normalised.
pub(super) fn check_url(state: &AppState, field: &str, raw: &str) -> Result<String> {
    if !looks_like_http_url(raw) {
        return Err(ApiError::InvalidRequest(format!(
            "{field} must be an http:// or https:// URL with a host"
        )));
    }
    match state.policy.check_url(raw) {
        Ok(u) => Ok(u.to_string()),
        Err(
            e @ (lipsync_netguard::GuardError::AddressNotAllowed { .. }
            | lipsync_netguard::GuardError::PortNotAllowed { .. }),
        ) => Err(ApiError::UrlNotAllowed(format!("{field}: {e}"))),
        Err(e) => Err(ApiError::InvalidRequest(format!("{field}: {e}"))),
    }
}

/// The model a request names: the default for none, a configured name, or one of the
/// seed guide's checkpoint paths (`gateway.model_aliases`, taken as the default model and
/// never opened).
pub(super) fn model_of(state: &AppState, requested: Option<String>) -> Result<String> {
    let gw = &state.gw;
    let default = || {
        gw.models
            .first()
            .cloned()
            .ok_or_else(|| ApiError::InvalidRequest("no model is configured on this server".into()))
    };
    match requested {
        None => default(),
        Some(m) if gw.models.iter().any(|c| c == &m) => Ok(m),
        Some(m) if gw.model_aliases.iter().any(|a| a == &m) => default(),
        Some(m) => {
            let shown: String = m.chars().take(64).collect();
            Err(ApiError::InvalidRequest(format!(
                "inference_ckpt_path `{shown}` is not a configured model; use one of: {}",
                gw.models.join(", ")
            )))
        }
    }
}

pub(super) fn validate(state: &AppState, raw: RawParams) -> Result<Params> {
    let RawParams {
        model,
        steps,
        guidance,
        seed,
        webhook_url,
        output_upload_url,
    } = raw;
    let gw = &state.gw;
    let model = model_of(state, model)?;
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
        Some(u) => Some(check_webhook_url(state, &u)?),
    };
    let output_upload_url = output_upload_url
        .map(|u| check_url(state, "output_upload_url", &u))
        .transpose()?;
    Ok(Params {
        model,
        inference_steps,
        guidance_scale,
        seed,
        webhook_url,
        output_upload_url,
    })
}

/// Webhook URLs are checked against the webhook policy (`gateway.webhook_*`).
fn check_webhook_url(state: &AppState, raw: &str) -> Result<String> {
    if !looks_like_http_url(raw) {
        return Err(ApiError::InvalidRequest(
            "webhook_url must be an http:// or https:// URL with a host".into(),
        ));
    }
    match state.webhook_policy.check_url(raw) {
        Ok(u) => Ok(u.to_string()),
        Err(
            e @ (lipsync_netguard::GuardError::AddressNotAllowed { .. }
            | lipsync_netguard::GuardError::PortNotAllowed { .. }),
        ) => Err(ApiError::UrlNotAllowed(format!("webhook_url: {e}"))),
        Err(e) => Err(ApiError::InvalidRequest(format!("webhook_url: {e}"))),
    }
}

pub(super) fn hash_of<T: Serialize>(params: &T, file_hashes: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(params).unwrap_or_default());
    for f in file_hashes {
        h.update(b"\n");
        h.update(f.as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::looks_like_http_url;

    #[test]
    fn http_url_prefix() {
        assert!(looks_like_http_url("HTTPS://a"));
        assert!(looks_like_http_url("http://10.0.0.1/x"));
        assert!(!looks_like_http_url(" http://a"));
        assert!(!looks_like_http_url("http://"));
        assert!(!looks_like_http_url("http://-a"));
        assert!(!looks_like_http_url("ftp://a"));
    }
}
