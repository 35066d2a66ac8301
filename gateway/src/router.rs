//! The router, built in one place: every route, and the cross-cutting layers (outermost
//! first): CORS, panics to JSON 500, request id + access log, metrics, JSON error
//! bodies, request timeout, concurrency limit, `Origin` check; then, on the protected
//! routes, authentication and the per-key rate limit.

use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::AppState;
use crate::error::ApiError;

/// Header carrying the request id (taken from the client when sane, else generated).
pub(crate) const REQUEST_ID: &str = "x-request-id";

/// The request id of a request (an extension set by the access-log layer).
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub(crate) String);

/// Builds the full router.
pub(crate) fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route(
            "/sync",
            post(crate::submit::sync).layer(DefaultBodyLimit::disable()),
        )
        .route("/uploads", post(crate::uploads::create))
        .route("/tasks", get(crate::tasks::list_tasks))
        .route(
            "/task/{task_id}",
            get(crate::tasks::get_task).delete(crate::tasks::cancel_task),
        )
        .route("/task/{task_id}/ws", get(crate::ws::task_ws))
        .route("/ws", get(crate::ws::all_ws))
        .route("/queue", get(crate::tasks::queue))
        .route("/outputs/{task_id}/{file}", get(crate::outputs::output))
        .route(
            "/results/{task_id}/output.mp4",
            get(crate::outputs::result_alias),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require,
        ));
    let mut open = Router::new()
        .route("/health", get(crate::health::health))
        .route("/healthz", get(crate::health::healthz))
        .route("/readyz", get(crate::health::readyz))
        .merge(crate::docs::router(&state.gw));
    if state.gw.metrics_listen.is_none() {
        open = open.route(
            "/metrics",
            get(crate::metrics::render).route_layer(middleware::from_fn_with_state(
                state.clone(),
                crate::auth::require_admin,
            )),
        );
    }
    let timeout = Duration::from_secs(state.gw.request_timeout_s.max(1));
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), check_origin))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_concurrency,
        ))
        .layer(middleware::from_fn(move |req, next| {
            with_timeout(timeout, req, next)
        }))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .layer(cors(&state.gw.cors_origins))
        .with_state(state)
}

/// The router of `gateway.metrics_listen`: `/metrics` only.
pub(crate) fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(crate::metrics::render))
        .fallback(not_found)
        .with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::RANGE,
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static(REQUEST_ID),
        ])
        .expose_headers([
            header::CONTENT_RANGE,
            header::ETAG,
            header::RETRY_AFTER,
            header::ACCEPT_RANGES,
            header::HeaderName::from_static(REQUEST_ID),
        ]);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

/// Whether a request changes state or opens a WebSocket (what the `Origin` check covers).
fn needs_origin_check(req: &Request) -> bool {
    let m = req.method();
    if m == Method::POST || m == Method::DELETE || m == Method::PUT || m == Method::PATCH {
        return true;
    }
    req.headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Whether `origin` is the request's own origin (same host and port as `Host`).
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let Ok(url) = url::Url::parse(origin) else {
        return false;
    };
    let Some(oh) = url.host_str() else {
        return false;
    };
    let authority = match url.port() {
        Some(p) => format!("{oh}:{p}"),
        None => oh.to_owned(),
    };
    let default_port = match url.scheme() {
        "https" => ":443",
        _ => ":80",
    };
    host.eq_ignore_ascii_case(&authority)
        || host.eq_ignore_ascii_case(&format!("{authority}{default_port}"))
        || format!("{host}{default_port}").eq_ignore_ascii_case(&authority)
}

/// Browser safety: a state-changing request or WebSocket upgrade that carries an `Origin`
/// other than the server's own, `gateway.allowed_origins` or `gateway.cors_origins` is
/// refused with 403. Requests without `Origin` (curl, SDKs) pass.
async fn check_origin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if needs_origin_check(&req)
        && let Some(origin) = req.headers().get(header::ORIGIN)
    {
        let origin = origin.to_str().unwrap_or("null").trim();
        let gw = &state.gw;
        let listed = gw
            .allowed_origins
            .iter()
            .chain(gw.cors_origins.iter())
            .any(|o| o == "*" || o.trim_end_matches('/').eq_ignore_ascii_case(origin));
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        if !listed && !same_origin(origin, host) {
            return ApiError::Forbidden(
                "cross-origin request refused (Origin not allowed; see gateway.allowed_origins)"
                    .into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// At most `gateway.max_concurrent_requests` requests in handlers at once (health
/// probes excepted, so that a saturated gateway still answers them).
async fn limit_concurrency(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if matches!(path, "/health" | "/healthz" | "/readyz") {
        return next.run(req).await;
    }
    let Ok(_permit) = state.requests.clone().acquire_owned().await else {
        return ApiError::Unavailable("request limiter closed".into()).into_response();
    };
    next.run(req).await
}

/// Time limit for everything except uploads and WebSockets (which live long by design;
/// uploads have their own deadline, `gateway.upload_timeout_s`).
async fn with_timeout(limit: Duration, req: Request, next: Next) -> Response {
    let long_lived = req.uri().path().ends_with("/ws")
        || req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("multipart/"))
        || req.uri().path().starts_with("/outputs/")
        || req.uri().path().starts_with("/results/");
    if long_lived {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

fn sane_request_id(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?.trim();
    (!s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)))
    .then(|| s.to_owned())
}

/// Request id (kept from `x-request-id` when sane, else a new UUID), returned in the
/// answer, and one access-log line per request (`gateway.access_log`).
async fn access_log(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(sane_request_id)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = crate::metrics::method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let started = Instant::now();
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    if state.gw.access_log {
        tracing::info!(
            target: "lipsync_gateway::access",
            method,
            route = route.as_deref().unwrap_or("unmatched"),
            status = resp.status().as_u16(),
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            request_id = %id,
            "request"
        );
    }
    resp
}

/// Turns any error answer without a JSON body (rejections of extractors, layers) into
/// the standard error body, keeping the status and headers.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut err = ApiError::from_status(status);
    if status.is_client_error() && !text.is_empty() {
        let msg = String::from_utf8_lossy(&text).trim().to_lowercase();
        err = match err {
            ApiError::InvalidJson(_) => ApiError::InvalidJson(msg),
            ApiError::InvalidRequest(_) => ApiError::InvalidRequest(msg),
            ApiError::NotFound(_) => ApiError::NotFound(msg),
            ApiError::UnsupportedMediaType(_) => ApiError::UnsupportedMediaType(msg),
            other => other,
        };
    }
    let mut new = err.into_response();
    *new.status_mut() = status;
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            new.headers_mut().insert(k.clone(), v.clone());
        }
    }
    new
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::same_origin;

    #[test]
    fn same_origin_compares_host_and_port() {
        assert!(same_origin("http://127.0.0.1:8000", Some("127.0.0.1:8000")));
        assert!(same_origin(
            "https://api.example.com",
            Some("api.example.com")
        ));
        assert!(same_origin("http://a.example", Some("a.example:80")));
        assert!(!same_origin("http://evil.example", Some("api.example.com")));
        assert!(!same_origin("http://127.0.0.1:9", Some("127.0.0.1:8000")));
        assert!(!same_origin("null", Some("127.0.0.1:8000")));
        assert!(!same_origin("http://a", None));
    }
}
