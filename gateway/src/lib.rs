//! lipsync HTTP gateway: the seed-compatible REST API (`POST /sync`, `GET /task/{id}`,
//! `GET /queue`, `GET /outputs/{id}/{file}`), WebSocket progress, cancellation,
//! idempotency, uploads, signed webhooks, metrics and the OpenAPI docs (docs/architecture.md §5-§6).
//!
//! It produces `lipsync.work.fetch` (one `FetchJob` per accepted task) and reads/writes
//! the KV buckets `lipsync_tasks` and `lipsync_idempotency` and the object store
//! `lipsync_artifacts`. One watch on `lipsync_tasks` per process feeds the queue index,
//! the WebSockets and the webhooks ([`index`]).
//!
//! # Layout
//! - [`error`]: `ApiError`, the exhaustive status mapping and JSON error bodies;
//! - [`api`]: request/response bodies and their OpenAPI schemas;
//! - `routes`, `submit`, `outputs`, `ws`: handlers; `auth`: API keys and rate limit;
//! - `metrics`, `webhook`, `docs`: what their names say.
//!
//! Run with `lipsync-gateway [--config FILE] [--set gateway.listen=0.0.0.0:8000]`; tests
//! call [`start`] with `gateway.listen = 127.0.0.1:0`.

pub mod api;
mod auth;
mod docs;
pub mod error;
pub mod index;
mod metrics;
mod outputs;
mod routes;
mod submit;
mod webhook;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use axum::Router;
use lipsync_fetch::guard::{IpNet, UrlPolicy};
use lipsync_runtime::artifacts::{ArtifactStore, NatsArtifacts};
use lipsync_runtime::config::GatewayConfig;
use lipsync_runtime::{Config, TaskStore};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use docs::{openapi, openapi_for};
pub use error::{ApiError, ApiErrorCode};
pub use index::TaskIndex;

/// Shared state of the gateway's handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The shared state behind [`AppState`] (fields are internal).
pub struct Inner {
    pub(crate) gw: GatewayConfig,
    pub(crate) tasks: TaskStore,
    pub(crate) idempotency: kv::Store,
    pub(crate) artifacts: Arc<dyn ArtifactStore>,
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    pub(crate) index: TaskIndex,
    pub(crate) metrics: metrics::GatewayMetrics,
    pub(crate) policy: UrlPolicy,
    pub(crate) auth: auth::Auth,
    pub(crate) shutdown: CancellationToken,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// The task index of this process.
    pub fn index(&self) -> &TaskIndex {
        &self.index
    }

    /// Connect to NATS, bootstrap the topology (no stage consumer), start the task watch
    /// (and webhook delivery) and return the state. Background work stops on `shutdown`.
    ///
    /// # Errors
    /// NATS unreachable, topology conflicts, or an invalid network policy in `fetch.*`.
    pub async fn connect(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let policy = url_policy(cfg)?;
        let client = lipsync_runtime::nats::connect(&cfg.nats, "lipsync-gateway").await?;
        let js = jetstream::new(client.clone());
        let (topo, _) =
            lipsync_runtime::nats::bootstrap(&js, &cfg.nats, &cfg.tasks, &cfg.artifacts, None)
                .await?;
        let index = TaskIndex::new(Duration::from_secs(cfg.tasks.ttl_s.max(1)));
        let metrics = metrics::GatewayMetrics::new()?;
        let state = AppState(Arc::new(Inner {
            gw: gateway_settings(cfg),
            tasks: TaskStore::new(topo.tasks.clone()),
            idempotency: topo.idempotency.clone(),
            artifacts: Arc::new(NatsArtifacts::new(topo.artifacts.clone())),
            js: topo.js.clone(),
            client,
            index: index.clone(),
            metrics,
            policy: policy.clone(),
            auth: auth::Auth::new(&cfg.gateway),
            shutdown: shutdown.clone(),
        }));
        let hooks = webhook::Webhooks::new(&state, &policy)?;
        let watch_state = state.clone();
        tokio::spawn(index.run_watch(topo.tasks, shutdown, move |rec| {
            watch_state.metrics.observe_record(rec);
            if let Some(h) = &hooks {
                h.on_change(rec);
            }
        }));
        Ok(state)
    }
}

fn url_policy(cfg: &Config) -> anyhow::Result<UrlPolicy> {
    let allow_cidrs = cfg
        .fetch
        .allow_cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map_err(|e| anyhow::anyhow!("fetch.allow_cidrs `{c}`: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(UrlPolicy {
        allow_private_networks: cfg.fetch.allow_private_networks,
        allow_cidrs,
        max_url_len: cfg.fetch.max_url_len,
        ..UrlPolicy::default()
    })
}

/// The gateway's router with every route and middleware.
pub fn app(state: AppState) -> Router {
    routes::router(state)
}

/// A running gateway.
pub struct Gateway {
    /// Bound address.
    pub addr: SocketAddr,
    /// Its state (tests inspect the index).
    pub state: AppState,
    join: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Gateway {
    /// Wait until the server stopped (after its shutdown token was cancelled).
    ///
    /// # Errors
    /// The server failed or its task panicked.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.join.await.context("gateway task panicked")??;
        Ok(())
    }
}

/// Connect, bind `cfg.gateway.listen` and serve until `shutdown`; returns at once with
/// the bound address (tests bind `127.0.0.1:0`).
///
/// # Errors
/// NATS unreachable, bootstrap failed, or the address cannot be bound.
pub async fn start(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<Gateway> {
    let state = AppState::connect(cfg, shutdown.clone()).await?;
    if cfg.gateway.api_keys.is_empty() {
        tracing::warn!(
            "no gateway.api_keys configured: the API is open to anyone who can reach it"
        );
    }
    let listener = TcpListener::bind(cfg.gateway.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.gateway.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "gateway listening");
    let router = app(state.clone());
    let client = state.client.clone();
    let join = tokio::spawn(async move {
        let res = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
        let _ = client.flush().await;
        res
    });
    Ok(Gateway { addr, state, join })
}

/// Serve until `shutdown` is cancelled.
///
/// # Errors
/// As [`start`], or the server failing while running.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let gw = start(&cfg, shutdown).await?;
    gw.wait().await
}

/// The gateway section with the model list settled: the profile this deployment serves
/// (`models.profile`, or what `auto` finds installed) comes first and is the default for
/// requests that name none; an empty `gateway.models` allows only that profile.
pub fn gateway_settings(cfg: &Config) -> GatewayConfig {
    let mut gw = cfg.gateway.clone();
    let served = lipsync_runtime::models::service_profile_name(&cfg.models);
    gw.models.retain(|m| m != &served);
    gw.models.insert(0, served);
    gw
}
