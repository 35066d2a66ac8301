//! `lipsync-gateway`: the HTTP API of lipsync (port 8000 by default). Reads the shared
//! configuration (`--config`, `LIPSYNC_GATEWAY__*`, `--set gateway.key=value`), connects
//! to NATS, and serves until SIGINT/SIGTERM.
//!
//! Run with `lipsync-gateway --config configs/default.toml`.

use clap::Parser;
use lipsync_runtime::{Config, ConfigArgs, config, shutdown, telemetry};

/// lipsync HTTP gateway.
#[derive(Debug, Parser)]
#[command(name = "lipsync-gateway", version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cfg: Config = config::load_or_exit(&cli.config);
    telemetry::init(&cfg.log, &cfg.trace);
    let token = shutdown::install();
    let result = lipsync_gateway::run(cfg, token).await;
    telemetry::shutdown();
    result
}
