//! Tenants and API keys (`Authorization: Bearer <key>`; `?access_token=` on WebSocket
//! routes only), the per-key token-bucket rate limit and the per-address limit of failed
//! authentications.
//!
//! Keys come from `gateway.api_keys` (tenant `default`, role `user`), `gateway.keys`
//! (tenant + role, the key plain, as a SHA-256 hex digest or in a file) and
//! `gateway.api_keys_file`. Only SHA-256 digests are kept in memory; a presented key is
//! compared with every configured digest in constant time.
//!
//! With no key configured the API is open (the seed's behaviour): every caller sees every
//! task, and the rate limit applies per client address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lipsync_runtime::config::{GatewayConfig, KeyRole};
use lipsync_schemas::TaskRecord;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// Buckets kept before idle ones are dropped.
const MAX_BUCKETS: usize = 10_000;

/// Who a request is: rate-limit and idempotency identity, tenant and role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    /// `key:<digest prefix>` or `ip:<address>` (open service).
    pub(crate) id: String,
    /// The key's tenant; `None` when the service is open.
    pub(crate) tenant: Option<String>,
    /// An admin key.
    pub(crate) admin: bool,
}

impl Caller {
    /// Whether this caller sees every task (admin, or an open service).
    pub(crate) fn sees_all(&self) -> bool {
        self.admin || self.tenant.is_none()
    }

    /// Whether the caller may see and manage `rec`.
    pub(crate) fn may_access(&self, rec: &TaskRecord) -> bool {
        self.sees_all() || (rec.owner.is_some() && rec.owner == self.tenant)
    }
}

/// A configured key (only its digest).
#[derive(Clone)]
struct Key {
    digest: [u8; 32],
    tenant: String,
    admin: bool,
}

/// Token buckets by name.
struct Buckets {
    rate_per_s: f64,
    burst: f64,
    map: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Buckets {
    fn new(rate_per_s: f64, burst: f64) -> Self {
        Self {
            rate_per_s,
            burst: burst.max(1.0),
            map: Mutex::default(),
        }
    }

    /// Refill `name`'s bucket; `take` one token when `take`. `Err(seconds)` while empty.
    fn check(&self, name: &str, take: bool) -> Result<(), u64> {
        if self.rate_per_s <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > MAX_BUCKETS {
            let (rate, burst) = (self.rate_per_s, self.burst);
            map.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = map.entry(name.to_owned()).or_insert((self.burst, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * self.rate_per_s).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            if take {
                *tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(((1.0 - *tokens) / self.rate_per_s).ceil().max(1.0) as u64)
        }
    }
}

pub(crate) struct Auth {
    keys: Vec<Key>,
    requests: Buckets,
    failures: Buckets,
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

fn parse_hex_digest(hex_str: &str, what: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(hex_str.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .with_context(|| format!("{what}: not a 64-digit hex SHA-256"))?;
    let mut d = [0u8; 32];
    d.copy_from_slice(&bytes);
    Ok(d)
}

fn read_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)
        .with_context(|| format!("{what}: cannot read {}", path.display()))?;
    let s = s.trim_end_matches(['\n', '\r', ' ', '\t']).to_owned();
    anyhow::ensure!(!s.is_empty(), "{what}: {} is empty", path.display());
    Ok(s)
}

/// The webhook secret: `webhook_secret_file` when set, else `webhook_secret`.
pub(crate) fn webhook_secret(cfg: &GatewayConfig) -> anyhow::Result<String> {
    match &cfg.webhook_secret_file {
        Some(p) => read_secret(p, "gateway.webhook_secret_file"),
        None => Ok(cfg.webhook_secret.clone()),
    }
}

fn parse_keys_file(text: &str, path: &Path) -> anyhow::Result<Vec<Key>> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let what = format!("gateway.api_keys_file {} line {}", path.display(), n + 1);
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [tenant, role, key] = parts[..] else {
            anyhow::bail!("{what}: expected `<tenant> <user|admin> <key or sha256:hex>`");
        };
        let admin = match role {
            "user" => false,
            "admin" => true,
            other => anyhow::bail!("{what}: unknown role `{other}` (user or admin)"),
        };
        let digest = match key.strip_prefix("sha256:") {
            Some(h) => parse_hex_digest(h, &what)?,
            None => digest(key.as_bytes()),
        };
        keys.push(Key {
            digest,
            tenant: tenant.to_owned(),
            admin,
        });
    }
    Ok(keys)
}

impl Auth {
    /// Keys from the configuration (reading the key files).
    ///
    /// # Errors
    /// A key entry without exactly one of `key`/`key_sha256`/`key_file`, an empty tenant,
    /// a bad digest or an unreadable file.
    pub(crate) fn from_config(cfg: &GatewayConfig) -> anyhow::Result<Self> {
        let mut keys: Vec<Key> = cfg
            .api_keys
            .iter()
            .filter(|k| !k.is_empty())
            .map(|k| Key {
                digest: digest(k.as_bytes()),
                tenant: "default".into(),
                admin: false,
            })
            .collect();
        for (i, k) in cfg.keys.iter().enumerate() {
            let what = format!("gateway.keys[{i}]");
            anyhow::ensure!(!k.tenant.trim().is_empty(), "{what}: tenant is empty");
            let given = usize::from(!k.key.is_empty())
                + usize::from(!k.key_sha256.is_empty())
                + usize::from(k.key_file.is_some());
            anyhow::ensure!(
                given == 1,
                "{what}: give exactly one of key, key_sha256, key_file"
            );
            let digest = if !k.key.is_empty() {
                digest(k.key.as_bytes())
            } else if !k.key_sha256.is_empty() {
                parse_hex_digest(&k.key_sha256, &what)?
            } else {
                let path = k.key_file.as_deref().unwrap_or(Path::new(""));
                digest(read_secret(path, &what)?.as_bytes())
            };
            keys.push(Key {
                digest,
                tenant: k.tenant.trim().to_owned(),
                admin: k.role == KeyRole::Admin,
            });
        }
        if let Some(path) = &cfg.api_keys_file {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("gateway.api_keys_file: cannot read {}", path.display())
            })?;
            keys.extend(parse_keys_file(&text, path)?);
        }
        let fail_rate = f64::from(cfg.auth_failures_per_min) / 60.0;
        Ok(Self {
            keys,
            requests: Buckets::new(
                f64::from(cfg.rate_limit_per_s),
                f64::from(cfg.rate_limit_burst),
            ),
            failures: Buckets::new(fail_rate, f64::from(cfg.auth_failures_per_min)),
        })
    }

    /// Whether no key is configured (open service).
    pub(crate) fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The caller of a presented key, or `None` if no configured key matches. Every
    /// configured key is compared (SHA-256 digests, constant time).
    fn check(&self, presented: &str) -> Option<Caller> {
        let d = digest(presented.as_bytes());
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(&d)) && found.is_none() {
                found = Some(k);
            }
        }
        found.map(|k| Caller {
            id: format!("key:{}", hex::encode(&d[..8])),
            tenant: Some(k.tenant.clone()),
            admin: k.admin,
        })
    }

    /// Take a request token for `caller`; `Err(seconds)` until the next one.
    fn take(&self, caller: &str) -> Result<(), u64> {
        self.requests.check(caller, true)
    }
}

fn bearer(req: &Request) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// `access_token` query parameter: browsers cannot set headers on WebSockets, so it is
/// accepted on WebSocket routes only (elsewhere it would end up in access logs and
/// browser histories).
fn query_token(req: &Request) -> Option<String> {
    if !req.uri().path().ends_with("/ws") {
        return None;
    }
    let q = req.uri().query()?;
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.into_owned())
}

/// The client address of a request (`local` when unknown).
pub(crate) fn client_ip(req: &Request) -> String {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "local".into())
}

/// Authenticate a request: `Ok(caller)` or the error answer (401, or 429 once the
/// client address has too many failed attempts).
pub(crate) fn authenticate(state: &AppState, req: &Request) -> Result<Caller, Box<Response>> {
    let ip = client_ip(req);
    if state.auth.is_open() {
        return Ok(Caller {
            id: format!("ip:{ip}"),
            tenant: None,
            admin: false,
        });
    }
    // An address over its failure budget is refused before its key is even looked at.
    if let Err(retry_after_s) = state.auth.failures.check(&ip, false) {
        return Err(Box::new(
            ApiError::RateLimited { retry_after_s }.into_response(),
        ));
    }
    let presented = bearer(req).map(str::to_owned).or_else(|| query_token(req));
    match presented.and_then(|p| state.auth.check(&p)) {
        Some(c) => Ok(c),
        None => {
            let _ = state.auth.failures.check(&ip, true);
            let mut resp = ApiError::Unauthorized.into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            Err(Box::new(resp))
        }
    }
}

/// Middleware of the protected routes: authenticate, then rate-limit per key.
pub(crate) async fn require(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = match authenticate(&state, &req) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    if let Err(retry_after_s) = state.auth.take(&caller.id) {
        return ApiError::RateLimited { retry_after_s }.into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Middleware of `/metrics` on the API port with `metrics_require_admin`: admin keys only.
pub(crate) async fn require_admin(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if state.gw.metrics_require_admin && !state.auth.is_open() {
        match authenticate(&state, &req) {
            Ok(c) if c.admin => {}
            Ok(_) => return ApiError::Forbidden("an admin key is required".into()).into_response(),
            Err(resp) => return *resp,
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use lipsync_runtime::config::ApiKeyConfig;

    #[test]
    fn keys_match_exactly_and_bucket_refills() {
        let cfg = GatewayConfig {
            api_keys: vec!["secret-1".into(), "other".into()],
            rate_limit_per_s: 1,
            rate_limit_burst: 2,
            ..GatewayConfig::default()
        };
        let a = Auth::from_config(&cfg).unwrap();
        assert!(a.check("secret-1").is_some());
        assert!(a.check("other").is_some());
        assert!(a.check("secret-").is_none());
        assert!(a.check("").is_none());
        assert!(a.take("x").is_ok());
        assert!(a.take("x").is_ok());
        assert_eq!(a.take("x"), Err(1));
        assert!(a.take("y").is_ok());
    }

    #[test]
    fn tenants_roles_hashes_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("k");
        std::fs::write(&key_file, "from-file\n").unwrap();
        let list = dir.path().join("keys");
        std::fs::write(
            &list,
            format!(
                "# tenant role key\nbeta user beta-key\nops admin sha256:{}\n",
                hex::encode(digest(b"ops-key"))
            ),
        )
        .unwrap();
        let cfg = GatewayConfig {
            keys: vec![
                ApiKeyConfig {
                    tenant: "acme".into(),
                    key_sha256: hex::encode(digest(b"acme-key")),
                    ..Default::default()
                },
                ApiKeyConfig {
                    tenant: "filed".into(),
                    key_file: Some(key_file),
                    role: KeyRole::Admin,
                    ..Default::default()
                },
            ],
            api_keys_file: Some(list),
            ..GatewayConfig::default()
        };
        let a = Auth::from_config(&cfg).unwrap();
        let acme = a.check("acme-key").unwrap();
        assert_eq!(acme.tenant.as_deref(), Some("acme"));
        assert!(!acme.admin);
        assert!(a.check("from-file").unwrap().admin);
        assert_eq!(a.check("beta-key").unwrap().tenant.as_deref(), Some("beta"));
        assert!(a.check("ops-key").unwrap().admin);
        assert!(a.check("sha256:x").is_none());

        let bad = GatewayConfig {
            keys: vec![ApiKeyConfig {
                tenant: "x".into(),
                key: "a".into(),
                key_sha256: "b".into(),
                ..Default::default()
            }],
            ..GatewayConfig::default()
        };
        assert!(Auth::from_config(&bad).is_err());
    }
}
