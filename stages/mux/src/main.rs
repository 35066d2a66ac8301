//! `lipsync-mux`: the mux stage binary (consumes `lipsync.work.mux`), plus `render`, the
//! same pipeline on local files without NATS (benchmarks, debugging).
//!
//! Run with `lipsync-mux` (config from `--config`, `LIPSYNC_MUX__*`), or
//! `lipsync-mux render --video v.mp4 --track t.json --crops c.mkv --audio a.wav \
//!   --frames 250 --out result.mp4 --mask mask.mp4`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lipsync_mux::render::{Progress, RenderJob, RenderOptions, render};
use lipsync_runtime::config::{Config, ConfigArgs, EXIT_USAGE, load_or_exit};
use lipsync_runtime::media::LengthMode;

/// Paste generated faces back, encode the result and mask videos, complete tasks.
#[derive(Parser)]
#[command(name = "lipsync-mux", version)]
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
    /// Render one result from local files with the `[mux]` encoder settings.
    Render {
        #[arg(long)]
        video: PathBuf,
        /// Face track JSON.
        #[arg(long)]
        track: PathBuf,
        /// Generated crops (R x R, one frame per output frame).
        #[arg(long)]
        crops: PathBuf,
        #[arg(long)]
        audio: PathBuf,
        /// Output frame count.
        #[arg(long)]
        frames: usize,
        /// pingpong, loop or cut.
        #[arg(long, default_value = "pingpong")]
        mode: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        mask: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let cfg: Config = load_or_exit(&cli.config);
    if let Err(e) = lipsync_mux::MuxStage::from_config(&cfg) {
        eprintln!("error: invalid configuration: {e}");
        std::process::exit(EXIT_USAGE);
    }
    lipsync_runtime::telemetry::init(&cfg.log, &cfg.trace);
    match cli.command {
        None | Some(Cmd::Serve) => {
            lipsync_runtime::serve("lipsync-mux", cfg, lipsync_mux::run).await;
        }
        Some(Cmd::Render {
            video,
            track,
            crops,
            audio,
            frames,
            mode,
            out,
            mask,
        }) => {
            let run = || -> anyhow::Result<()> {
                let mode: LengthMode = serde_json::from_value(serde_json::Value::String(mode))?;
                let track = serde_json::from_slice(&std::fs::read(&track)?)?;
                let opts = RenderOptions::from_config(&cfg.mux).map_err(anyhow::Error::msg)?;
                let job = RenderJob {
                    video: &video,
                    track: &track,
                    crops: &crops,
                    audio: &audio,
                    output_frames: frames,
                    mode,
                    result: &out,
                    mask: &mask,
                };
                let stats = render(&job, &opts, &Progress::default())?;
                let (cpu, hwm_kb) = own_usage();
                println!(
                    "{} frames ({} with a face) in {:.3} s: {:.1} frames/s, {} video decode(s); \
                     this process: cpu {cpu:.2} s, peak rss {hwm_kb} kB; \
                     ping-pong window {} frames ({} bytes)",
                    stats.frames,
                    stats.faces,
                    stats.secs,
                    stats.frames as f64 / stats.secs.max(1e-9),
                    stats.video_decodes,
                    stats.window_frames,
                    stats.window_bytes
                );
                Ok(())
            };
            if let Err(e) = tokio::task::block_in_place(run) {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// CPU seconds (user + system) and peak RSS (kB) of this process alone, without the
/// ffmpeg children (Linux `/proc`; zeros elsewhere).
fn own_usage() -> (f64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name: state is field 3; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}
