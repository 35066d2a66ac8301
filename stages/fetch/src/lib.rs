//! lipsync fetch stage: SSRF-guarded streaming download ([`guard`], the shared
//! `lipsync-netguard` crate re-exported; [`download`]),
//! probing, validation and audio conversion of the inputs ([`probe`]), and the stage
//! handler that ties them to the work queue ([`FetchStage`]).

pub mod download;
pub use lipsync_netguard as guard;
pub mod probe;
mod stage;

pub use stage::FetchStage;

use lipsync_runtime::{Config, StageServer, StageSpec};
use tokio_util::sync::CancellationToken;

/// Start the fetch stage (tests use the returned server's address and `wait`).
pub async fn start(cfg: &Config, shutdown: CancellationToken) -> anyhow::Result<StageServer> {
    let stage = FetchStage::new(&cfg.fetch)
        .map_err(|e| anyhow::anyhow!("invalid fetch configuration: {e}"))?;
    if cfg.fetch.allow_private_networks {
        tracing::warn!(
            "fetch.allow_private_networks is on: downloads from private and loopback addresses are allowed"
        );
    }
    lipsync_runtime::start_stage(
        cfg,
        StageSpec {
            name: "lipsync-fetch",
            listen: cfg.fetch.listen,
            concurrency: cfg.fetch.concurrency,
            device: None,
        },
        stage,
        shutdown,
    )
    .await
}

/// Run the fetch stage until `shutdown` is cancelled and the stage has drained.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(&cfg, shutdown).await?.wait().await
}
