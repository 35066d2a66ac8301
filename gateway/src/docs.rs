//! `/openapi.json` (OpenAPI 3.1 generated from the handler types with utoipa), `/docs`
//! (Swagger UI, vendored into the binary) and `/redoc` (our page + the ReDoc bundle from
//! the npm package `redoc`, embedded from `gateway/assets/redoc/`). Nothing loads from a CDN.

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::AppState;

const REDOC_JS: &[u8] = include_bytes!("../assets/redoc/redoc.standalone.js");

const REDOC_HTML: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lipsync API - ReDoc</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<redoc spec-url="/openapi.json"></redoc>
<script src="/redoc/redoc.standalone.js"></script>
</body>
</html>
"#;

const DESCRIPTION: &str = "Self-hosted lip-sync service (LatentSync). Submit a video and an \
audio with `POST /sync`, follow the task with `GET /task/{task_id}` (or the WebSocket \
`GET /task/{task_id}/ws`, which sends the task record at once and on every change and \
closes after `completed`/`failed`; `GET /ws` streams progress events of all tasks), and \
download `output_video_url`.\n\n\
Errors are JSON `{\"error\": {\"code\", \"message\"}}`. Unknown request fields are ignored. \
When the server has API keys configured, send `Authorization: Bearer <key>` (WebSockets may \
use `?access_token=<key>`); `/health`, `/healthz`, `/readyz`, `/metrics` and the docs are \
always open.\n\n\
Webhooks: `webhook_url` receives a POST of the final task record with headers \
`X-Lipsync-Timestamp` and `X-Lipsync-Signature: sha256=<hex HMAC-SHA256 of \
\"<timestamp>.<body>\">`.";

#[derive(OpenApi)]
#[openapi(
    info(title = "lipsync", description = DESCRIPTION, license(name = "Apache-2.0")),
    paths(
        crate::submit::sync,
        crate::routes::get_task,
        crate::routes::cancel_task,
        crate::routes::queue,
        crate::outputs::output,
        crate::outputs::result_alias,
        crate::routes::health,
        crate::routes::healthz,
        crate::routes::readyz,
        metrics_doc,
    ),
    components(schemas(crate::error::ErrorBody, crate::error::ErrorDetail, crate::error::ApiErrorCode)),
    tags(
        (name = "tasks", description = "Submit, follow, cancel"),
        (name = "outputs", description = "Result videos"),
        (name = "operations", description = "Health and metrics"),
    )
)]
struct ApiDoc;

/// `GET /metrics` (documentation only; the handler lives in `metrics`).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
#[allow(dead_code)]
fn metrics_doc() {}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi()))
        .route("/redoc", get(|| async { Html(REDOC_HTML) }))
        .route(
            "/redoc/redoc.standalone.js",
            get(|| async {
                (
                    [
                        (
                            header::CONTENT_TYPE,
                            "application/javascript; charset=utf-8",
                        ),
                        (header::CACHE_CONTROL, "public, max-age=86400"),
                    ],
                    REDOC_JS,
                )
                    .into_response()
            }),
        )
}
