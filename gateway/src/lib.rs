//! lipsync HTTP gateway: the seed-compatible REST API (`POST /sync`, `GET /task/{id}`,
//! `GET /queue`, `GET /outputs/{id}/{file}`), WebSocket progress, cancellation,
//! idempotency, uploads (multipart, or direct to the bucket with `POST /uploads`), signed
//! webhooks, metrics and the OpenAPI docs (docs/architecture.md §5-§6). With the `s3`
//! artifact backend it also runs the retention sweep (`artifacts.s3.sweep_interval_s`).
//!
//! It produces `lipsync.work.fetch` (one `FetchJob` per accepted task) and reads/writes
//! the KV buckets `lipsync_tasks` and `lipsync_idempotency` and the object store
//! `lipsync_artifacts`. One watch on `lipsync_tasks` per process feeds the queue index,
//! the WebSockets and the webhooks ([`index`]).
//!
//! # Layout
//! - [`error`]: `ApiError`, the exhaustive status mapping and JSON error bodies;
//! - [`api`]: request/response bodies and their OpenAPI schemas;
//! - `router`: the one place the router and every layer (auth, origin check, request
//!   ids and access log, concurrency limit, timeouts, metrics, CORS) are put together;
//! - `server`: the connection loop (header-read and idle timeouts, connection cap);
//! - `tasks`, `health`, `submit` (JSON intake, upload, idempotency, validation),
//!   `outputs`, `uploads`, `ws`: handlers; `auth`: tenants, API keys and rate limits;
//! - `metrics`, `webhook`, `docs`: what their names say.
//!
//! Handlers share the task helpers of [`AppState`]: [`AppState::load`] (index, else
//! KV), `load_for` (the same, answering 404 for another tenant's task) and `view`.
//!
//! Run with `lipsync-gateway [--config FILE] [--set gateway.listen=0.0.0.0:8000]`; tests
//! call [`start`] with `gateway.listen = 127.0.0.1:0`.

pub mod api;
mod auth;
mod docs;
pub mod error;
mod examples;
mod health;
pub mod index;
mod metrics;
mod outputs;
mod router;
mod server;
mod submit;
mod tasks;
mod uploads;
mod webhook;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, kv};
use axum::Router;
use lipsync_netguard::{PolicySettings, UrlPolicy};
use lipsync_runtime::artifacts::ArtifactStore;
use lipsync_runtime::config::GatewayConfig;
use lipsync_runtime::{Config, TaskStore};
use lipsync_schemas::TaskRecord;
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
    /// NATS settings (the admission limit).
    pub(crate) nats: lipsync_runtime::config::NatsConfig,
    pub(crate) tasks: TaskStore,
    pub(crate) idempotency: kv::Store,
    pub(crate) artifacts: Arc<dyn ArtifactStore>,
    pub(crate) js: jetstream::Context,
    pub(crate) client: async_nats::Client,
    pub(crate) index: TaskIndex,
    pub(crate) metrics: metrics::GatewayMetrics,
    pub(crate) policy: UrlPolicy,
    pub(crate) webhook_policy: UrlPolicy,
    /// `outputs.presign`: redirect output downloads to presigned URLs (s3 only).
    pub(crate) outputs_presign: bool,
    /// `fetch.max_bytes`: told to direct-upload clients.
    pub(crate) fetch_max_bytes: u64,
    pub(crate) auth: auth::Auth,
    pub(crate) requests: Arc<tokio::sync::Semaphore>,
    pub(crate) ws: ws::Sockets,
    pub(crate) stages: health::StageLiveness,
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

    /// A record by id from the index, else from KV (records the index has not seen yet
    /// or evicted). Malformed ids are simply unknown.
    pub(crate) async fn load(&self, task_id: &str) -> error::Result<(Arc<TaskRecord>, u64)> {
        if !lipsync_runtime::tasks::valid_key(task_id) {
            return Err(unknown_task());
        }
        if let Some(hit) = self.index.get(task_id) {
            return Ok(hit);
        }
        match self.tasks.get(task_id).await {
            Ok(Some((rec, rev))) => {
                self.index.apply(rev, rec.clone());
                Ok((Arc::new(rec), rev))
            }
            Ok(None) => Err(unknown_task()),
            Err(e) => Err(ApiError::Unavailable(e.to_string())),
        }
    }

    /// [`load`](Self::load) for `caller`: another tenant's task is answered exactly as an
    /// unknown id (404, same body).
    pub(crate) async fn load_for(
        &self,
        caller: &auth::Caller,
        task_id: &str,
    ) -> error::Result<(Arc<TaskRecord>, u64)> {
        let (rec, rev) = self.load(task_id).await?;
        if !caller.may_access(&rec) {
            return Err(unknown_task());
        }
        Ok((rec, rev))
    }

    /// The public view of a record with its current queue position.
    pub(crate) fn view(&self, rec: &TaskRecord) -> api::TaskView {
        api::TaskView::from_record(rec, self.index.position(&rec.task_id))
    }

    /// Connect to NATS, bootstrap the topology (no stage consumer), start the task watch
    /// (and webhook delivery) and return the state. Background work stops on `shutdown`.
    ///
    /// # Errors
    /// NATS unreachable, topology conflicts, an invalid network policy in `fetch.*` or
    /// `gateway.webhook_*`, or unreadable key/secret files.
    pub async fn connect(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let policy = cfg.fetch.url_policy().map_err(anyhow::Error::msg)?;
        let webhook_policy = webhook_policy(cfg)?;
        let auth = auth::Auth::from_config(&cfg.gateway)?;
        let webhook_secret = auth::webhook_secret(&cfg.gateway)?;
        let client = lipsync_runtime::nats::connect(&cfg.nats, "lipsync-gateway").await?;
        let js = jetstream::new(client.clone());
        let (topo, _) =
            lipsync_runtime::nats::bootstrap(&js, &cfg.nats, &cfg.tasks, &cfg.artifacts).await?;
        let index = TaskIndex::new(Duration::from_secs(cfg.tasks.ttl_s.max(1)));
        let metrics = metrics::GatewayMetrics::new()?;
        let state = AppState(Arc::new(Inner {
            nats: cfg.nats.clone(),
            gw: GatewayConfig {
                webhook_secret,
                ..gateway_settings(cfg)
            },
            tasks: TaskStore::new(topo.tasks.clone()),
            idempotency: topo.idempotency.clone(),
            artifacts: lipsync_runtime::artifacts::open(&cfg.artifacts, &topo)?,
            js: topo.js.clone(),
            client,
            index: index.clone(),
            metrics,
            policy,
            webhook_policy,
            outputs_presign: cfg.outputs.presign,
            fetch_max_bytes: cfg.fetch.max_bytes,
            auth,
            requests: Arc::new(tokio::sync::Semaphore::new(
                cfg.gateway.max_concurrent_requests.max(1),
            )),
            ws: ws::Sockets::default(),
            stages: health::StageLiveness::default(),
            shutdown: shutdown.clone(),
        }));
        if state.artifacts.backend() == "s3" && cfg.artifacts.s3.sweep_interval_s > 0 {
            tokio::spawn(sweep_loop(
                state.artifacts.clone(),
                state.metrics.clone(),
                Duration::from_secs(cfg.artifacts.ttl_s),
                Duration::from_secs(cfg.artifacts.s3.sweep_interval_s),
                shutdown.clone(),
            ));
        }
        let hooks = webhook::Webhooks::new(&state)?;
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

/// The retention sweep of the s3 backend: every `every` (the first one after `every`),
/// delete the objects older than `ttl`. Errors are logged and the next round runs as
/// planned; stops on `shutdown`.
async fn sweep_loop(
    artifacts: Arc<dyn ArtifactStore>,
    metrics: metrics::GatewayMetrics,
    ttl: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let round = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = artifacts.sweep(ttl) => r,
        };
        match round {
            Ok(n) => {
                metrics.sweeps.with_label_values(&["ok"]).inc();
                metrics.swept.inc_by(n);
                tracing::info!(
                    deleted = n,
                    older_than_s = ttl.as_secs(),
                    "artifact retention sweep"
                )
            }
            Err(e) => {
                metrics.sweeps.with_label_values(&["error"]).inc();
                tracing::warn!(error = %e, "artifact retention sweep failed")
            }
        }
    }
}

fn unknown_task() -> ApiError {
    ApiError::NotFound("no such task".into())
}

/// The webhook policy (`gateway.webhook_*`, NAT64 prefixes from `fetch.nat64_prefixes`).
fn webhook_policy(cfg: &Config) -> anyhow::Result<UrlPolicy> {
    UrlPolicy::from_settings(&PolicySettings {
        section: "gateway.webhook",
        allow_private_networks: cfg.gateway.webhook_allow_private_networks,
        allow_cidrs: &cfg.gateway.webhook_allow_cidrs,
        allowed_ports: &cfg.gateway.webhook_allowed_ports,
        nat64_prefixes: &cfg.fetch.nat64_prefixes,
        max_url_len: cfg.fetch.max_url_len,
    })
    .map_err(anyhow::Error::msg)
}

/// The gateway's router with every route and middleware.
pub fn app(state: AppState) -> Router {
    router::router(state)
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
    let gw = &cfg.gateway;
    if state.auth.is_open() {
        if gw.listen.ip().is_loopback() {
            tracing::warn!(
                "no API keys configured: the API is open to every local client (seed behaviour)"
            );
        } else {
            tracing::warn!(
                listen = %gw.listen,
                "!!! NO API KEYS CONFIGURED AND LISTENING ON A NON-LOOPBACK ADDRESS: the API \
                 (every task, every result, cancellation) is open to anyone who can reach \
                 this address. Configure gateway.keys / gateway.api_keys_file, or listen on \
                 127.0.0.1. !!!"
            );
        }
    }
    let listener = TcpListener::bind(gw.listen)
        .await
        .with_context(|| format!("cannot listen on {}", gw.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), "gateway listening");
    if let Some(m) = gw.metrics_listen {
        let l = TcpListener::bind(m)
            .await
            .with_context(|| format!("cannot listen on {m} (gateway.metrics_listen)"))?;
        tracing::info!(addr = %l.local_addr()?, "metrics listening");
        let metrics = router::metrics_router(state.clone());
        let token = shutdown.clone();
        tokio::spawn(async move {
            let res = axum::serve(l, metrics)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    let router = app(state.clone());
    let client = state.client.clone();
    let limits = server::Limits {
        header_read_timeout: Duration::from_secs(gw.header_read_timeout_s.max(1)),
        idle_timeout: Duration::from_secs(gw.idle_timeout_s.max(1)),
        max_connections: gw.max_connections,
    };
    let join = tokio::spawn(async move {
        let res = server::serve(listener, router, limits, shutdown).await;
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
