//! `lipsync-fetch`: the fetch stage binary.

use clap::Parser;
use lipsync_runtime::config::{Config, ConfigArgs, EXIT_USAGE, load_or_exit};

/// Download, probe and validate the inputs of lip-sync tasks.
#[derive(Parser)]
#[command(name = "lipsync-fetch", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let cfg: Config = load_or_exit(&cli.config);
    if let Err(e) = lipsync_fetch::url_policy(&cfg.fetch) {
        eprintln!("error: invalid configuration: {e}");
        std::process::exit(EXIT_USAGE);
    }
    lipsync_runtime::telemetry::init(&cfg.log);
    let shutdown = lipsync_runtime::shutdown::install();
    if let Err(e) = lipsync_fetch::run(cfg, shutdown).await {
        tracing::error!(error = %e, "lipsync-fetch failed");
        std::process::exit(1);
    }
}
