//! `lipsync-audio`: the audio stage binary (the default), plus `mel` and `features`, which
//! run the stage's own code path on one file and write `.npy` arrays for inspection.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lipsync_audio::encoder::OrtEncoder;
use lipsync_audio::windows::{DIM, LAYERS, encode_all};
use lipsync_audio::{Settings, extract, mel::N_MELS};
use lipsync_runtime::config::{Config, ConfigArgs, EXIT_USAGE, load_or_exit};

/// Whisper log-mel and encoder features of lip-sync tasks.
#[derive(Parser)]
#[command(name = "lipsync-audio", version)]
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
    /// Write the log-mel of a whole file (float32, 80 x frames, before any windowing).
    Mel {
        /// Any audio or video file (decoded to 16 kHz mono like the stage does).
        audio: PathBuf,
        /// Output `.npy`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write the encoder features of a file (float32, T x 5 x 384).
    Features {
        /// Any audio or video file.
        audio: PathBuf,
        /// Output `.npy`.
        #[arg(long)]
        out: PathBuf,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let cfg: Config = load_or_exit(&cli.config);
    if let Err(e) = Settings::from_config(&cfg.audio) {
        eprintln!("error: {e}");
        std::process::exit(EXIT_USAGE);
    }
    lipsync_runtime::telemetry::init(&cfg.log, &cfg.trace);
    let result = match cli.command {
        None | Some(Cmd::Serve) => {
            let shutdown = lipsync_runtime::shutdown::install();
            lipsync_audio::run(cfg, shutdown).await
        }
        Some(Cmd::Mel { audio, out }) => mel(&cfg, &audio, &out),
        Some(Cmd::Features { audio, out }) => features(&cfg, &audio, &out),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn mel(cfg: &Config, audio: &Path, out: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    let spec = extract::mel_of_file(&cfg.audio.ffmpeg, audio)?;
    let secs = start.elapsed().as_secs_f64();
    let array = ndarray::Array2::from_shape_vec((N_MELS, spec.frames), spec.normalized())?;
    ndarray_npy::write_npy(out, &array).context("writing the .npy file")?;
    eprintln!(
        "mel: {} frames ({:.2} s of audio) in {secs:.3} s",
        spec.frames,
        spec.frames as f64 / 100.0
    );
    Ok(())
}

fn features(cfg: &Config, audio: &Path, out: &Path) -> anyhow::Result<()> {
    let settings = Settings::from_config(&cfg.audio)?;
    let profile = lipsync_runtime::models::resolve(&cfg.models, &["whisper_encoder"])?;
    let model = profile
        .model_path("whisper_encoder")
        .context("the profile has no whisper_encoder")?;
    let mut encoder = OrtEncoder::load(&model, &settings.encoder)?;
    let start = Instant::now();
    let spec = extract::mel_of_file(&cfg.audio.ffmpeg, audio)?;
    let mut data = Vec::new();
    let t = encode_all(
        &spec,
        settings.overlap_positions,
        &mut encoder,
        |_, _| Ok(()),
        |rows| {
            data.extend_from_slice(rows);
            Ok(())
        },
    )?;
    let secs = start.elapsed().as_secs_f64();
    let array = ndarray::Array3::from_shape_vec((t, LAYERS, DIM), data)?;
    ndarray_npy::write_npy(out, &array).context("writing the .npy file")?;
    let audio_s = spec.frames as f64 / 100.0;
    eprintln!(
        "features: T={t} ({audio_s:.2} s of audio, profile {}) in {secs:.3} s, real-time factor {:.4}",
        profile.name,
        secs / audio_s.max(1e-9)
    );
    Ok(())
}
