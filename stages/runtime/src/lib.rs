//! Shared plumbing of every lipsync binary: layered configuration, NATS connection and
//! topology bootstrap, the stage runner, the artifact store, task records, telemetry,
//! the operations endpoint and graceful shutdown.

pub mod artifacts;
pub mod config;
pub mod features;
pub mod join;
pub mod media;
pub mod metrics;
pub mod models;
pub mod nats;
pub mod ops;
pub mod runner;
pub mod shutdown;
mod stagecfg;
pub mod tasks;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use lipsync_schemas::WorkItem;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub use artifacts::{ArtifactError, ArtifactMeta, ArtifactStore, NatsArtifacts};
pub use config::{Config, ConfigArgs};
pub use runner::{Handler, JobCtx, JobError, Runner, publish_work};
pub use tasks::{Change, TaskStore, Updated};

/// What a stage binary needs to know about itself.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Binary name for logs and the NATS connection.
    pub name: &'static str,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Jobs at once in this process.
    pub concurrency: usize,
    /// The consumer's `max_ack_pending` (the GPU stage: number of GPU workers).
    pub max_ack_pending: i64,
}

/// A started stage: its operations address and the running task.
pub struct StageServer {
    /// Where `/metrics`, `/healthz` and `/readyz` answer.
    pub ops_addr: SocketAddr,
    /// NATS client (tests use it to inspect state).
    pub client: async_nats::Client,
    join: tokio::task::JoinHandle<Result<(), String>>,
}

impl StageServer {
    /// Wait until the stage stopped (after its shutdown token was cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.join
            .await
            .map_err(|e| anyhow::anyhow!("stage task panicked: {e}"))?
            .map_err(|e| anyhow::anyhow!(e))
    }
}

/// Connect, bootstrap the topology and this stage's consumer, serve the operations
/// endpoint and run `handler` until `shutdown` is cancelled.
pub async fn start_stage<H: Handler>(
    cfg: &Config,
    spec: StageSpec,
    handler: H,
    shutdown: CancellationToken,
) -> anyhow::Result<StageServer> {
    let stage = H::Job::STAGE;
    let registry = Registry::new();
    let metrics = metrics::StageMetrics::register(&registry)?;
    let ready = ops::Readiness::default();
    let (ops_addr, ops_task) = ops::serve(
        spec.listen,
        ops::router(spec.name, registry, ready.clone()),
        shutdown.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", spec.listen))?;
    tracing::info!(service = spec.name, addr = %ops_addr, "operations endpoint listening");

    let client = nats::connect(&cfg.nats, spec.name).await?;
    let js = async_nats::jetstream::new(client.clone());
    let (topo, report) = nats::bootstrap(
        &js,
        &cfg.nats,
        &cfg.tasks,
        &cfg.artifacts,
        Some((stage, spec.max_ack_pending)),
    )
    .await?;
    if !report.updated.is_empty() {
        tracing::warn!(changes = ?report.updated, "existing topology settings were changed");
    }
    ready.set(true);

    let runner = Runner {
        handler: Arc::new(handler),
        concurrency: spec.concurrency,
        js: topo.js.clone(),
        tasks: TaskStore::new(topo.tasks.clone()),
        artifacts: Arc::new(NatsArtifacts::new(topo.artifacts.clone())),
        metrics,
        nats: cfg.nats.clone(),
        runner: cfg.runner.clone(),
    };
    let drain_client = client.clone();
    let join = tokio::spawn(async move {
        let res = runner.run(shutdown).await;
        ready.set(false);
        if let Err(e) = drain_client.flush().await {
            tracing::debug!(error = %e, "flush on shutdown failed");
        }
        let _ = drain_client.drain().await;
        let _ = ops_task.await;
        res
    });
    Ok(StageServer {
        ops_addr,
        client,
        join,
    })
}

/// The serve mode of every stage binary: install the signal handlers, run `run` until
/// SIGINT/SIGTERM has drained it, and exit 1 with the error logged if it fails.
pub async fn serve<F, Fut>(name: &str, cfg: Config, run: F)
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let shutdown = shutdown::install();
    if let Err(e) = run(cfg, shutdown).await {
        tracing::error!(error = %e, service = name, "failed");
        std::process::exit(1);
    }
}
