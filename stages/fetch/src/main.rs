//! `lipsync-fetch`: the fetch stage binary, plus `get`, a debugging download through the
//! same guard, limits and streaming path as the stage.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use lipsync_runtime::config::{Config, ConfigArgs, EXIT_USAGE, load_or_exit};

/// Download, probe and validate the inputs of lip-sync tasks.
#[derive(Parser)]
#[command(name = "lipsync-fetch", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the stage (the default).
    Serve,
    /// Download one URL with the stage's guard and limits, then print size and speed.
    Get {
        /// http(s) URL.
        url: String,
        /// Where to write the body (default: discard).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let cfg: Config = load_or_exit(&cli.config);
    if let Err(e) = cfg.fetch.url_policy() {
        eprintln!("error: invalid configuration: {e}");
        std::process::exit(EXIT_USAGE);
    }
    lipsync_runtime::telemetry::init(&cfg.log, &cfg.trace);
    match cli.command {
        None | Some(Cmd::Serve) => {
            lipsync_runtime::serve("lipsync-fetch", cfg, lipsync_fetch::run).await;
        }
        Some(Cmd::Get { url, out }) => {
            if let Err(e) = get(&cfg, &url, out).await {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}

async fn get(cfg: &Config, url: &str, out: Option<PathBuf>) -> anyhow::Result<()> {
    use lipsync_fetch::download::{DownloadLimits, download_to};
    use lipsync_fetch::guard::ClientOptions;
    let client = cfg
        .fetch
        .url_policy()
        .map_err(anyhow::Error::msg)?
        .client(&ClientOptions {
            connect_timeout: Duration::from_secs(cfg.fetch.connect_timeout_s),
            read_timeout: Duration::from_secs(cfg.fetch.read_timeout_s),
            total_timeout: Some(Duration::from_secs(cfg.fetch.total_timeout_s)),
            max_redirects: cfg.fetch.max_redirects,
        })?;
    let limits = DownloadLimits {
        max_bytes: cfg.fetch.max_bytes,
        total_timeout: Duration::from_secs(cfg.fetch.total_timeout_s),
        read_timeout: Duration::from_secs(cfg.fetch.read_timeout_s),
    };
    let start = Instant::now();
    let info = match out {
        Some(p) => {
            let f = tokio::fs::File::create(&p).await?;
            download_to(&client, url, &limits, f, |_, _| {}).await?
        }
        None => download_to(&client, url, &limits, tokio::io::sink(), |_, _| {}).await?,
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} bytes in {secs:.3} s ({:.1} MB/s)",
        info.bytes,
        info.bytes as f64 / secs / 1e6
    );
    Ok(())
}
