//! The per-binary operations endpoint: `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Readiness flag flipped by the binary once NATS is reachable and the topology exists.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Mark ready or not ready.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    /// Current state.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct OpsState {
    registry: Registry,
    ready: Readiness,
    name: &'static str,
    device: Option<serde_json::Value>,
}

/// Routes `/metrics`, `/healthz` and `/readyz` for a binary called `name`; `/readyz`
/// also shows `device` (what the process runs its jobs on) when given.
pub fn router(
    name: &'static str,
    registry: Registry,
    ready: Readiness,
    device: Option<serde_json::Value>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(OpsState {
            registry,
            ready,
            name,
            device,
        })
}

async fn metrics(State(s): State<OpsState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(&s.registry),
    )
}

async fn healthz(State(s): State<OpsState>) -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok", "service": s.name}))
}

async fn readyz(State(s): State<OpsState>) -> impl IntoResponse {
    let (code, status) = if s.ready.get() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    let mut body = serde_json::json!({"status": status, "service": s.name});
    if let Some(d) = &s.device {
        body["device"] = d.clone();
    }
    (code, axum::Json(body))
}

/// Bind `addr` and serve `router` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, handle))
}
