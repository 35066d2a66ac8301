//! API keys (`Authorization: Bearer <key>`, constant-time compare) and the per-key token
//! bucket rate limit. With no keys configured the API is open and the limit applies per
//! client address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lipsync_runtime::config::GatewayConfig;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// Buckets kept before idle ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// Who a request is, for rate limiting and idempotency scoping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller(pub(crate) String);

pub(crate) struct Auth {
    keys: Vec<[u8; 32]>,
    rate_per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

impl Auth {
    pub(crate) fn new(cfg: &GatewayConfig) -> Self {
        Self {
            keys: cfg.api_keys.iter().map(|k| digest(k.as_bytes())).collect(),
            rate_per_s: f64::from(cfg.rate_limit_per_s),
            burst: f64::from(cfg.rate_limit_burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// The caller id of a presented key, or `None` if no configured key matches. Every
    /// configured key is compared (SHA-256 digests, constant time).
    fn check(&self, presented: &str) -> Option<String> {
        let d = digest(presented.as_bytes());
        let mut hit = subtle::Choice::from(0);
        for k in &self.keys {
            hit |= k.ct_eq(&d);
        }
        bool::from(hit).then(|| format!("key:{}", hex::encode(&d[..8])))
    }

    /// Take a token for `caller`; `Err(seconds)` until the next one.
    fn take(&self, caller: &str) -> Result<(), u64> {
        if self.rate_per_s <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > MAX_BUCKETS {
            let (rate, burst) = (self.rate_per_s, self.burst);
            buckets.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets
            .entry(caller.to_owned())
            .or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.rate_per_s).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate_per_s).ceil().max(1.0) as u64)
        }
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// `access_token` query parameter: browsers cannot set headers on WebSockets.
fn query_token(req: &Request) -> Option<String> {
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

/// Middleware of the protected routes: authenticate, then rate-limit.
pub(crate) async fn require(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = if state.auth.keys.is_empty() {
        let ip = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_string())
            .unwrap_or_else(|| "local".into());
        format!("ip:{ip}")
    } else {
        let presented = bearer(&req)
            .map(str::to_owned)
            .or_else(|| query_token(&req));
        match presented.and_then(|p| state.auth.check(&p)) {
            Some(c) => c,
            None => {
                let mut resp = ApiError::Unauthorized.into_response();
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                return resp;
            }
        }
    };
    if let Err(retry_after_s) = state.auth.take(&caller) {
        return ApiError::RateLimited { retry_after_s }.into_response();
    }
    req.extensions_mut().insert(Caller(caller));
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly_and_bucket_refills() {
        let cfg = GatewayConfig {
            api_keys: vec!["secret-1".into(), "other".into()],
            rate_limit_per_s: 1,
            rate_limit_burst: 2,
            ..GatewayConfig::default()
        };
        let a = Auth::new(&cfg);
        assert!(a.check("secret-1").is_some());
        assert!(a.check("other").is_some());
        assert!(a.check("secret-").is_none());
        assert!(a.check("").is_none());
        assert!(a.take("x").is_ok());
        assert!(a.take("x").is_ok());
        assert_eq!(a.take("x"), Err(1));
        assert!(a.take("y").is_ok());
    }
}
