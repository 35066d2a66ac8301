//! `/openapi.json` (OpenAPI 3.1 generated from the handler types with utoipa), `/docs`
//! (Swagger UI, vendored into the binary) and `/redoc` (our page + the ReDoc bundle from
//! the npm package `redoc`, embedded from `gateway/assets/redoc/`). Nothing loads from a CDN.

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use lipsync_runtime::config::GatewayConfig;
use serde_json::{Value, json};

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
`GET /task/{task_id}/ws`, which sends the task record at once and then its changes in order and \
closes after `completed`/`failed`; `GET /ws` streams progress events of all tasks), and \
download `output_video_url`. Inputs are URLs, files (multipart `POST /sync`) or, on \
servers with the s3 artifact backend, direct uploads: `POST /uploads` gives a presigned \
`PUT` URL and an `upload_id` to pass as `video_upload_id` / `audio_upload_id`. \
`output_upload_url` (e.g. a presigned PUT URL of your own bucket) receives the result \
video when it is ready; it is never shown back with its query.\n\n\
Errors are JSON `{\"error\": {\"code\", \"message\"}}`. Unknown request fields are ignored. \
When the server has API keys configured, send `Authorization: Bearer <key>` (the \
`bearer` security scheme; WebSocket routes also accept `?access_token=<key>`, no other route \
does). Keys belong to tenants: a key sees and manages only its tenant's tasks (`GET /tasks` \
lists them), another tenant's task answers 404 like an unknown id, and `GET /queue` shows \
other tenants' waiting tasks by position only; admin keys see all. Tenant quotas and rate \
limits answer 429 with `Retry-After`. `/health`, `/healthz`, `/readyz` and the docs are \
always open; `/metrics` may need an admin key. Browsers: state-changing requests and \
WebSockets from another origin are refused (403) unless the origin is allowed.\n\n\
Webhooks: `webhook_url` receives a POST of the final task record with headers \
`X-Lipsync-Timestamp` and `X-Lipsync-Signature: sha256=<hex HMAC-SHA256 of \
\"<timestamp>.<body>\">`.";

#[derive(OpenApi)]
#[openapi(
    info(title = "lipsync", description = DESCRIPTION, license(name = "Apache-2.0")),
    paths(
        crate::submit::sync,
        crate::uploads::create,
        crate::tasks::list_tasks,
        crate::tasks::get_task,
        crate::tasks::cancel_task,
        crate::ws::task_ws,
        crate::ws::all_ws,
        crate::tasks::queue,
        crate::outputs::output,
        crate::outputs::result_alias,
        crate::health::health,
        crate::health::healthz,
        crate::health::readyz,
        metrics_doc,
    ),
    components(schemas(
        crate::error::ErrorBody,
        crate::error::ErrorDetail,
        crate::error::ApiErrorCode,
        crate::api::TaskView,
        crate::api::ProgressEventView,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "tasks", description = "Submit, follow, cancel"),
        (name = "outputs", description = "Result videos"),
        (name = "operations", description = "Health and metrics"),
    )
)]
struct ApiDoc;

/// Declares the `bearer` security scheme (API keys), so `/docs` can send a key.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("API key: `Authorization: Bearer <key>`"))
                    .build(),
            ),
        );
    }
}

/// `GET /metrics` (documentation only; the handler lives in `metrics`).
#[utoipa::path(get, path = "/metrics", tag = "operations", operation_id = "get_metrics",
    responses(
        (status = 200, description = "Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "Missing or wrong API key (with `gateway.metrics_require_admin`)", body = crate::error::ErrorBody),
        (status = 403, description = "Not an admin key (with `gateway.metrics_require_admin`)", body = crate::error::ErrorBody),
        (status = 429, description = "Too many failed authentications", body = crate::error::ErrorBody),
    ),
    security((), ("bearer" = [])))]
#[allow(dead_code)]
fn metrics_doc() {}

/// The OpenAPI document of the API as generated from the handler types.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as served: [`openapi`] narrowed to this server's configuration (the
/// configured model names; `webhook_url` only when a webhook secret is set), so that
/// every request the schema allows is one the server accepts, with an example for every
/// request and response (`crate::examples`), the WebSocket messages and the webhook.
pub fn openapi_for(gw: &GatewayConfig) -> Value {
    let mut doc = serde_json::to_value(openapi()).unwrap_or(Value::Null);
    crate::examples::add(&mut doc, gw);
    let mut models: Vec<Value> = gw.models.iter().map(|m| json!(m)).collect();
    models.push(Value::Null);
    let url = json!({
        "type": "string",
        "minLength": 8,
        "pattern": "^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9]",
    });
    if let Some(params) = doc["paths"]["/sync"]["post"]["parameters"].as_array_mut() {
        for p in params.iter_mut().filter(|p| p["name"] == "Idempotency-Key") {
            p["schema"] = json!({
                "type": "string",
                "minLength": 1,
                "maxLength": 255,
                "pattern": "^[!-~]([ -~]*[!-~])?$",
            });
        }
    }
    for schema in ["SyncRequest", "SyncUpload"] {
        let props = &mut doc["components"]["schemas"][schema]["properties"];
        if !props.is_object() {
            continue;
        }
        let desc = props["inference_ckpt_path"]["description"].clone();
        props["inference_ckpt_path"] = json!({
            "type": ["string", "null"], "enum": models, "description": desc,
        });
        if gw.webhook_secret.is_empty() {
            props["webhook_url"] = json!({
                "type": "null",
                "description": "Not available: this server has no webhook secret configured",
            });
        } else {
            let mut w = url.clone();
            w["type"] = json!(["string", "null"]);
            props["webhook_url"] = w;
        }
        let mut nullable_url = url.clone();
        nullable_url["type"] = json!(["string", "null"]);
        let described = |mut v: Value, old: &Value| {
            if let Some(d) = old.get("description") {
                v["description"] = d.clone();
            }
            v
        };
        props["output_upload_url"] = described(nullable_url.clone(), &props["output_upload_url"]);
        if schema == "SyncRequest" {
            props["video_url"] = described(nullable_url.clone(), &props["video_url"]);
            props["audio_url"] = described(nullable_url.clone(), &props["audio_url"]);
            for id in ["video_upload_id", "audio_upload_id"] {
                props[id] = described(
                    json!({"type": ["string", "null"], "format": "uuid"}),
                    &props[id],
                );
            }
        }
    }
    doc
}

pub(crate) fn router(gw: &GatewayConfig) -> Router<AppState> {
    Router::new()
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", openapi_for(gw)))
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
