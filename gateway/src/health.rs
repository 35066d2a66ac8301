//! `/health`, `/healthz` (alive) and `/readyz`: NATS connected, task index loaded, and
//! whether every stage has a live consumer.
//!
//! A stage is live when its durable pull consumer (named after the stage, on stream
//! `LIPSYNC_WORK`) has a waiting pull request (an idle worker asks for work at least every
//! `runner.pull_expires_s`) or messages in flight (a busy worker holds them and sends
//! progress). Consumer info is read at most every 2 s. By default `/readyz` only reports
//! the stages (a stage outage must not take the API, and so the status of existing
//! tasks, out of the load balancer); `gateway.readyz_requires_stages` makes it answer 503.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lipsync_schemas::{Stage, names};

use crate::AppState;
use crate::api::{HealthResponse, ReadyResponse};

/// Consumer info is refreshed at most this often.
const REFRESH: Duration = Duration::from_secs(2);

/// Cached liveness of the stage consumers.
#[derive(Clone, Default)]
pub(crate) struct StageLiveness(Arc<Mutex<Option<Snapshot>>>);

/// When the liveness was read, and per stage whether it is live.
type Snapshot = (Instant, BTreeMap<String, bool>);

impl StageLiveness {
    async fn get(&self, state: &AppState) -> BTreeMap<String, bool> {
        if let Some((at, v)) = &*self.0.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < REFRESH
        {
            return v.clone();
        }
        let mut live = BTreeMap::new();
        let stream = state.js.get_stream(names::WORK_STREAM).await.ok();
        for stage in Stage::ALL {
            let ok = match &stream {
                Some(s) => match s.consumer_info(names::consumer_name(stage)).await {
                    Ok(info) => info.num_waiting > 0 || info.num_ack_pending > 0,
                    Err(_) => false,
                },
                None => false,
            };
            live.insert(stage.as_str().to_owned(), ok);
        }
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), live.clone()));
        live
    }
}

/// `GET /health` (the public implementation's liveness answer).
#[utoipa::path(get, path = "/health", tag = "operations", operation_id = "get_health",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub(crate) async fn health() -> Json<HealthResponse> {
    Json(HealthResponse {
        status: "healthy".into(),
    })
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", operation_id = "get_liveness",
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub(crate) async fn healthz() -> Json<HealthResponse> {
    health().await
}

/// `GET /readyz`: NATS connected, the task index loaded, and the stages' consumers.
#[utoipa::path(get, path = "/readyz", tag = "operations", operation_id = "get_readiness",
    responses(
        (status = 200, description = "Ready (stages reported)", body = ReadyResponse),
        (status = 503, description = "Not ready", body = ReadyResponse),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    let nats = state.client.connection_state() == async_nats::connection::State::Connected;
    let index_loaded = state.index.is_loaded();
    let stages = if nats {
        state.stages.get(&state).await
    } else {
        Stage::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), false))
            .collect()
    };
    let stages_live = stages.values().all(|v| *v);
    let ready = nats && index_loaded && (stages_live || !state.gw.readyz_requires_stages);
    let body = ReadyResponse {
        status: if ready { "ready" } else { "not_ready" }.into(),
        nats,
        index_loaded,
        stages_live,
        stages,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}
