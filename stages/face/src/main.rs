//! `lipsync-face`: the face stage binary (`serve`, the default, consumes
//! `lipsync.work.face`), plus `track`, a debugging command that runs the same tracking
//! on a local video and writes the face track (and optionally a preview video).
//!
//! Run with `lipsync-face` or `lipsync-face track input.mp4 --out track.json
//! --preview preview.mp4`.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};
use lipsync_runtime::config::{Config, ConfigArgs, EXIT_USAGE, load_or_exit};

/// Face detection, landmarks and alignment track for lip-sync tasks.
#[derive(Parser)]
#[command(name = "lipsync-face", version)]
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
    /// Track the face of a local video with the configured detector and policies.
    Track {
        /// Input video (any format ffmpeg reads).
        video: PathBuf,
        /// Where to write the face track JSON.
        #[arg(long)]
        out: PathBuf,
        /// Also write a video with boxes, landmarks and crop boxes drawn.
        #[arg(long)]
        preview: Option<PathBuf>,
        /// Model profile whose crop geometry to use (default: the configured one).
        #[arg(long)]
        profile: Option<String>,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let cfg: Config = load_or_exit(&cli.config);
    if let Err(e) = lipsync_face::FaceSettings::from_config(&cfg.face) {
        eprintln!("error: {e}");
        std::process::exit(EXIT_USAGE);
    }
    lipsync_runtime::telemetry::init(&cfg.log, &cfg.trace);
    match cli.command {
        None | Some(Cmd::Serve) => {
            lipsync_runtime::serve("lipsync-face", cfg, lipsync_face::run).await;
        }
        Some(Cmd::Track {
            video,
            out,
            preview,
            profile,
        }) => {
            let res =
                tokio::task::spawn_blocking(move || track(&cfg, &video, &out, preview, profile))
                    .await
                    .map_err(anyhow::Error::from)
                    .and_then(|r| r);
            if let Err(e) = res {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

fn track(
    cfg: &Config,
    video: &std::path::Path,
    out: &std::path::Path,
    preview: Option<PathBuf>,
    profile: Option<String>,
) -> anyhow::Result<()> {
    let settings = lipsync_face::FaceSettings::from_config(&cfg.face)?;
    let geometries = lipsync_face::Geometries::load(&cfg.models)?;
    let geometry = geometries.for_model(profile.as_deref().unwrap_or(geometries.default_profile()));
    let mut detector = settings.build_detector()?;
    let start = Instant::now();
    let track = lipsync_face::pipeline::track_file(
        video,
        detector.as_mut(),
        &geometry,
        &settings.track,
        &mut |p| {
            eprint!("\rframe {}", p.frames);
            Ok(())
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!();
    std::fs::write(out, serde_json::to_vec_pretty(&track)?)?;
    let missing = track.frames.iter().filter(|f| !f.present).count();
    let bridged = track.frames.iter().filter(|f| f.interpolated).count();
    println!(
        "{} frames {}x{} in {secs:.2} s ({:.1} frames/s), detector {}, profile {}, {missing} without a face, {bridged} bridged",
        track.frame_count,
        track.width,
        track.height,
        track.frame_count as f64 / secs,
        track.detector,
        geometry.profile,
    );
    if let Some(p) = preview {
        lipsync_face::preview::write_preview(video, &track, &p)?;
        println!("preview written to {}", p.display());
    }
    Ok(())
}
