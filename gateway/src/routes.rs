//! The router, the small handlers (`GET /task`, `DELETE /task`, `GET /queue`, health) and
//! the cross-cutting layers: metrics, auth + rate limit, request timeout, panics and the
//! rule that every error answer is JSON `{error: {code, message}}`.

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use lipsync_runtime::Updated;
use lipsync_schemas::{Status, TaskRecord};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::AppState;
use crate::api::{HealthResponse, QueueResponse, QueuedTask, ReadyResponse, TaskView};
use crate::error::{ApiError, ErrorBody, Result};

/// Builds the full router.
pub(crate) fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route(
            "/sync",
            axum::routing::post(crate::submit::sync).layer(DefaultBodyLimit::disable()),
        )
        .route("/task/{task_id}", get(get_task).delete(cancel_task))
        .route("/task/{task_id}/ws", get(crate::ws::task_ws))
        .route("/ws", get(crate::ws::all_ws))
        .route("/queue", get(queue))
        .route("/outputs/{task_id}/{file}", get(crate::outputs::output))
        .route(
            "/results/{task_id}/output.mp4",
            get(crate::outputs::result_alias),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require,
        ));
    let open = Router::new()
        .route("/health", get(health))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(crate::metrics::render))
        .merge(crate::docs::router(&state.gw));
    let timeout = Duration::from_secs(state.gw.request_timeout_s.max(1));
    Router::new()
        .merge(protected)
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(move |req, next| {
            with_timeout(timeout, req, next)
        }))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::track,
        ))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("handler panicked".into()).into_response()
        }))
        .layer(cors(&state.gw.cors_origins))
        .with_state(state)
}

fn cors(origins: &[String]) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::POST,
            axum::http::Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::RANGE,
            header::HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([
            header::CONTENT_RANGE,
            header::ETAG,
            header::RETRY_AFTER,
            header::ACCEPT_RANGES,
        ]);
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<header::HeaderValue> = origins
            .iter()
            .filter_map(|o| header::HeaderValue::from_str(o).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}

/// Time limit for everything except uploads and WebSockets (which live long by design).
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

/// A record by id from the index, else from KV (records the index has not seen yet or
/// evicted). Malformed ids are simply unknown.
pub(crate) async fn load(
    state: &AppState,
    task_id: &str,
) -> Result<(std::sync::Arc<TaskRecord>, u64)> {
    let unknown = || ApiError::NotFound("no such task".into());
    if !lipsync_runtime::tasks::valid_key(task_id) {
        return Err(unknown());
    }
    if let Some(hit) = state.index.get(task_id) {
        return Ok(hit);
    }
    match state.tasks.get(task_id).await {
        Ok(Some((rec, rev))) => {
            state.index.apply(rev, rec.clone());
            Ok((std::sync::Arc::new(rec), rev))
        }
        Ok(None) => Err(unknown()),
        Err(e) => Err(ApiError::Unavailable(e.to_string())),
    }
}

/// The public view of a record with its current queue position.
pub(crate) fn view(state: &AppState, rec: &TaskRecord) -> TaskView {
    TaskView::from_record(rec, state.index.position(&rec.task_id))
}

/// `GET /task/{task_id}`.
#[utoipa::path(
    get,
    path = "/task/{task_id}",
    tag = "tasks",
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task", body = TaskView),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown or malformed id", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Backend unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn get_task(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
) -> Result<Json<TaskView>> {
    let (rec, _) = load(&state, &task_id).await?;
    Ok(Json(view(&state, &rec)))
}

/// `DELETE /task/{task_id}`: cancel.
#[utoipa::path(
    delete,
    path = "/task/{task_id}",
    tag = "tasks",
    params(("task_id" = String, Path, description = "Task id")),
    responses(
        (status = 200, description = "Cancelled (or already failed): the record", body = TaskView),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 404, description = "Unknown or malformed id", body = ErrorBody),
        (status = 409, description = "Already completed", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
        (status = 503, description = "Backend unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn cancel_task(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
) -> Result<Json<TaskView>> {
    if !lipsync_runtime::tasks::valid_key(&task_id) {
        return Err(ApiError::NotFound("no such task".into()));
    }
    let updated = state
        .tasks
        .cancel(&task_id)
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    match updated {
        Updated::Missing => Err(ApiError::NotFound("no such task".into())),
        Updated::Unchanged(rec) if rec.status == Status::Completed => Err(ApiError::TaskFinished),
        Updated::Written(rec) | Updated::Unchanged(rec) => {
            tracing::info!(task_id = %task_id, "task cancelled");
            Ok(Json(TaskView::from_record(&rec, None)))
        }
    }
}

/// `GET /queue`.
#[utoipa::path(
    get,
    path = "/queue",
    tag = "tasks",
    responses(
        (status = 200, description = "Tasks not yet on the GPU, in submission order", body = QueueResponse),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    )
)]
pub(crate) async fn queue(State(state): State<AppState>) -> Json<QueueResponse> {
    let snap = state.index.queue();
    Json(QueueResponse {
        queue_length: snap.waiting.len() as u64,
        is_processing: snap.is_processing,
        queued_tasks: snap
            .waiting
            .into_iter()
            .enumerate()
            .map(|(i, task_id)| QueuedTask {
                task_id,
                position: i as u64,
            })
            .collect(),
    })
}

/// `GET /health` (the public implementation's liveness answer).
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub(crate) async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "healthy".into(),
    })
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub(crate) async fn healthz() -> Json<HealthResponse> {
    health().await
}

/// `GET /readyz`: NATS connected and the task index loaded.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = ReadyResponse),
        (status = 503, description = "Not ready", body = ReadyResponse),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let nats = state.client.connection_state() == async_nats::connection::State::Connected;
    let index_loaded = state.index.is_loaded();
    let ready = nats && index_loaded;
    let body = ReadyResponse {
        status: if ready { "ready" } else { "not_ready" }.into(),
        nats,
        index_loaded,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
