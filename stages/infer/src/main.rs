//! `lipsync-infer`: the inference stage binary (consumes `lipsync.work.infer`, produces
//! `lipsync.work.mux`), plus `bench`, which runs the same pipeline on a local clip with a
//! synthetic face track and random audio features and prints its timings.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lipsync_infer::pipeline::Control;
use lipsync_runtime::config::{Config, ConfigArgs, load_or_exit};

/// Run LatentSync inference for lip-sync tasks.
#[derive(Parser)]
#[command(name = "lipsync-infer", version)]
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
    /// Run the pipeline once on a local video (synthetic track, random audio) and print
    /// ms per UNet step, per chunk and the duty cycle.
    Bench {
        /// Input video.
        video: PathBuf,
        /// DDIM steps.
        #[arg(long, default_value_t = 20)]
        steps: u32,
        /// Guidance scale (> 1 runs classifier-free guidance).
        #[arg(long, default_value_t = 1.5)]
        guidance: f64,
        /// Where to write the crops (default: a temporary file).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

struct Quiet;
impl Control for Quiet {
    fn step(&mut self, _: u64, _: u64) -> bool {
        true
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let cfg: Config = load_or_exit(&cli.config);
    lipsync_runtime::telemetry::init(&cfg.log);
    match cli.command {
        None | Some(Cmd::Serve) => {
            lipsync_runtime::serve("lipsync-infer", cfg, lipsync_infer::run).await;
        }
        Some(Cmd::Bench {
            video,
            steps,
            guidance,
            out,
        }) => {
            let res =
                tokio::task::spawn_blocking(move || bench(&cfg, &video, steps, guidance, out))
                    .await
                    .expect("bench thread");
            if let Err(e) = res {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

fn bench(
    cfg: &Config,
    video: &std::path::Path,
    steps: u32,
    guidance: f64,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use lipsync_runtime::media::FrameReader;
    let started = std::time::Instant::now();
    let stage = lipsync_infer::InferStage::new(cfg)?;
    let load_s = started.elapsed().as_secs_f64();
    let mut reader = FrameReader::open(video)?;
    let (w, h) = (reader.geometry.width, reader.geometry.height);
    let mut buf = Vec::new();
    let mut n = 0usize;
    while reader.read_into(&mut buf)? {
        n += 1;
    }
    let params = stage.params(steps, guidance, 1247);
    let g = params.geometry;
    let track = lipsync_infer::synthetic::face_track(
        w,
        h,
        n,
        g.crop_w as u32,
        g.crop_h as u32,
        g.resolution as u32,
    );
    let features = lipsync_infer::synthetic::features(n, 1);
    let tmp = tempfile::tempdir()?;
    let out = out.unwrap_or_else(|| tmp.path().join("crops.mkv"));
    let report = stage.run_blocking(&params, video, &track, &features, &out, &mut Quiet)?;
    let size = std::fs::metadata(&out)?.len();
    let seconds = report.output_frames as f64 / 25.0;
    println!("profile            {}", stage.profile().name);
    println!("provider           {}", stage.provider());
    println!("model load         {load_s:.2} s");
    println!(
        "frames             {} ({seconds:.1} s at 25 fps, {}x{} px crops)",
        report.output_frames, g.resolution, g.resolution
    );
    println!("chunks             {}", report.chunks_generated);
    println!(
        "unet steps         {} (guidance {guidance}, {steps} steps/chunk)",
        report.unet_steps
    );
    println!("ms per unet step   {:.2}", report.unet_time_ms_per_step());
    println!(
        "ms per chunk       {:.1} (model time: vae encode + steps + vae decode)",
        report.model_ms_per_chunk()
    );
    println!(
        "model time         {:.2} s",
        report.model_time.as_secs_f64()
    );
    println!(
        "model waited       {:.2} s (for prepared chunks)",
        report.model_wait.as_secs_f64()
    );
    println!("wall time          {:.2} s", report.wall_time.as_secs_f64());
    println!(
        "duty cycle         {:.1} % (model time / wall time)",
        report.duty_cycle() * 100.0
    );
    println!(
        "crops artifact     {:.2} MB ({:.2} MB per output second)",
        size as f64 / 1e6,
        size as f64 / 1e6 / seconds.max(1e-9)
    );
    Ok(())
}
