//! Shared plumbing of every lipsync binary: layered configuration, NATS connection and
//! topology bootstrap, the stage runner, the artifact store, task records, telemetry,
//! the operations endpoint and graceful shutdown.

pub mod admission;
pub mod artifacts;
pub mod config;
pub mod errors;
pub mod features;
pub mod jobscope;
pub mod media;
pub mod metrics;
pub mod models;
pub mod nats;
pub mod ops;
pub mod reaper;
pub mod runner;
pub mod shutdown;
mod stagecfg;
pub mod tasks;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub use artifacts::{ArtifactError, ArtifactMeta, ArtifactStore, NatsArtifacts, S3Artifacts};
pub use config::{Config, ConfigArgs};
pub use errors::StageError;
pub use runner::{Blocking, Handler, JobCtx, JobError, Outcome, Runner, publish_work};
pub use tasks::{Change, TaskStore, Updated};

/// What a stage binary needs to know about itself.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Binary name for logs and the NATS connection.
    pub name: &'static str,
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
    /// Jobs at once in this process (the GPU stage: its number of GPU workers). The
    /// cluster-wide ceiling is the deployment's `nats.<stage>_max_in_flight`.
    pub concurrency: usize,
    /// What this process runs its jobs on, shown by `/readyz` as `device` (a JSON object;
    /// its `provider`, e.g. `cuda:0` or `cpu`, is also recorded in each task's stage
    /// timing). None for stages that need no accelerator.
    pub device: Option<serde_json::Value>,
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

/// Connect, bootstrap the topology, serve the operations endpoint and run `handler` (and
/// the max-deliveries reaper) until `shutdown` is cancelled. `/readyz` is ready while the
/// runner runs and NATS is connected.
pub async fn start_stage<H: Handler>(
    cfg: &Config,
    spec: StageSpec,
    handler: H,
    shutdown: CancellationToken,
) -> anyhow::Result<StageServer> {
    // Every ffmpeg/ffprobe run of this process gets the configured limits, and the
    // scratch an earlier process of this stage left (crash, kill) goes before work starts.
    media::tool::configure(media::tool::settings_from(&cfg.fetch));
    let scratch_root = cfg
        .artifacts
        .scratch_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    media::scratch::clean_scratch(
        &scratch_root,
        <H::Job as lipsync_schemas::WorkItem>::STAGE.as_str(),
    );
    let registry = Registry::new();
    let metrics = metrics::StageMetrics::register(&registry)?;
    let ready = ops::Readiness::default();
    let (ops_addr, ops_task) = ops::serve(
        spec.listen,
        ops::router(spec.name, registry, ready.clone(), spec.device.clone()),
        shutdown.clone(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", spec.listen))?;
    tracing::info!(service = spec.name, addr = %ops_addr, "operations endpoint listening");

    let client = nats::connect(&cfg.nats, spec.name).await?;
    let js = async_nats::jetstream::new(client.clone());
    let (topo, report) = nats::bootstrap(&js, &cfg.nats, &cfg.tasks, &cfg.artifacts).await?;
    if !report.updated.is_empty() {
        tracing::warn!(changes = ?report.updated, "existing topology settings were changed");
    }
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    {
        // Ready while running and connected (a worker cut off from NATS takes no work).
        let (client, ready, running, stop) = (
            client.clone(),
            ready.clone(),
            running.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                let connected =
                    client.connection_state() == async_nats::connection::State::Connected;
                ready.set(connected && running.load(std::sync::atomic::Ordering::SeqCst));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                }
            }
            ready.set(false);
        });
    }

    let artifacts = artifacts::open(&cfg.artifacts, &topo)?;
    let tasks = TaskStore::new(topo.tasks.clone());
    tokio::spawn(reaper::run(
        topo.js.clone(),
        tasks.clone(),
        artifacts.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let runner = Runner {
        handler: Arc::new(handler),
        concurrency: spec.concurrency,
        client: client.clone(),
        js: topo.js.clone(),
        tasks,
        artifacts,
        metrics,
        nats: cfg.nats.clone(),
        runner: cfg.runner.clone(),
        provider: spec
            .device
            .as_ref()
            .and_then(|d| d.get("provider"))
            .and_then(|p| p.as_str())
            .map(str::to_owned),
        scratch_root: cfg
            .artifacts
            .scratch_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir),
    };
    let drain_client = client.clone();
    let join = tokio::spawn(async move {
        let res = runner.run(shutdown).await;
        running.store(false, std::sync::atomic::Ordering::SeqCst);
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
    let result = run(cfg, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, service = name, "failed");
    }
    telemetry::shutdown();
    if result.is_err() {
        std::process::exit(1);
    }
}
