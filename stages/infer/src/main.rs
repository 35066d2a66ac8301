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
        /// DeepCache intervals to run one after the other on the same clip, printed side
        /// by side (e.g. `0,3`: exact, then the reference's demo setting). Default: the
        /// configured `infer.deepcache_interval` only.
        #[arg(long, value_delimiter = ',')]
        deepcache: Vec<u32>,
        /// Run at this model resolution instead of the profile's (the graphs take any
        /// multiple of 8; the crop box scales with it): e.g. the tiny profile at 512 px to
        /// time LatentSync 1.6's latent size. For benchmarks only.
        #[arg(long)]
        resolution: Option<usize>,
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
    lipsync_runtime::telemetry::init(&cfg.log, &cfg.trace);
    match cli.command {
        None | Some(Cmd::Serve) => {
            lipsync_runtime::serve("lipsync-infer", cfg, lipsync_infer::run).await;
        }
        Some(Cmd::Bench {
            video,
            steps,
            guidance,
            out,
            deepcache,
            resolution,
        }) => {
            let res = tokio::task::spawn_blocking(move || {
                bench(&cfg, &video, steps, guidance, out, &deepcache, resolution)
            })
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
    intervals: &[u32],
    resolution: Option<usize>,
) -> anyhow::Result<()> {
    use lipsync_infer::engine::{Device, Engine, EngineExtras, EngineOptions};
    use lipsync_infer::mask::Mask;
    use lipsync_infer::pipeline::{self, JobInputs};
    use lipsync_runtime::media::FrameReader;

    let started = std::time::Instant::now();
    // Profile, geometry and job parameters as the stage resolves them (one engine loaded
    // there too; the runs below use their own, with each DeepCache interval).
    let mut stage_cfg = cfg.clone();
    stage_cfg.infer.gpu_workers = 1;
    let stage = lipsync_infer::InferStage::new(&stage_cfg)?;
    let load_s = started.elapsed().as_secs_f64();
    let mut reader = FrameReader::open(video)?;
    let (w, h) = (reader.geometry.width, reader.geometry.height);
    let mut buf = Vec::new();
    let mut n = 0usize;
    while reader.read_into(&mut buf)? {
        n += 1;
    }
    let mut params = stage.params(steps, guidance, 1247);
    if let Some(r) = resolution {
        anyhow::ensure!(
            r >= 64 && r.is_multiple_of(8),
            "--resolution must be a multiple of 8, at least 64"
        );
        let g = &mut params.geometry;
        let scale = r as f64 / g.resolution as f64;
        g.crop_w = (g.crop_w as f64 * scale).round() as usize;
        g.crop_h = (g.crop_h as f64 * scale).round() as usize;
        g.resolution = r;
    }
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
    let profile = stage.profile().clone();
    let mask = Mask::load(
        &profile.mask_path(),
        profile.profile.mask.size as usize,
        g.resolution,
    )?;
    let device: Device = cfg
        .infer
        .device
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    let opts = EngineOptions {
        device,
        intra_threads: cfg.infer.intra_threads,
        dylib: cfg.infer.ort_dylib_path.clone(),
    };
    let base = EngineExtras::from_config(cfg)?;
    let intervals = if intervals.is_empty() {
        vec![base.deepcache_interval]
    } else {
        intervals.to_vec()
    };
    let tmp = tempfile::tempdir()?;
    let scratch = cfg
        .artifacts
        .scratch_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    println!("profile            {}", stage.profile().name);
    println!("provider           {}", stage.provider());
    println!("model load         {load_s:.2} s");
    let mut rows = Vec::new();
    for (k, &interval) in intervals.iter().enumerate() {
        let extras = EngineExtras {
            deepcache_interval: interval,
            ..base.clone()
        };
        let mut engine = Engine::load_with(&profile, &opts, &extras, 0)?;
        let out = match (&out, k) {
            (Some(o), 0) => o.clone(),
            _ => tmp.path().join(format!("crops-{k}.mkv")),
        };
        let inputs = JobInputs {
            video,
            track: &track,
            features: &features,
            mask: &mask,
        };
        let report = pipeline::run(
            &mut engine,
            &profile.profile.scheduler,
            &params,
            &inputs,
            &scratch,
            &out,
            &mut Quiet,
        )?;
        let size = std::fs::metadata(&out)?.len();
        let seconds = report.output_frames as f64 / 25.0;
        println!("== deepcache interval {interval}");
        println!(
            "frames             {} ({seconds:.1} s at 25 fps, {}x{} px crops)",
            report.output_frames, g.resolution, g.resolution
        );
        println!("chunks             {}", report.chunks_generated);
        println!(
            "unet steps         {} (guidance {guidance}, {steps} steps/chunk; schedule {})",
            report.unet_steps,
            report.unet_schedule.first().map_or("-", String::as_str)
        );
        println!("ms per unet step   {:.2}", report.unet_time_ms_per_step());
        let dc = report.deepcache;
        let ms = |d: std::time::Duration, n: u64| d.as_secs_f64() * 1e3 / n.max(1) as f64;
        if interval > 0 {
            println!(
                "ms per full step   {:.2} ({} runs)",
                ms(dc.full_busy, dc.full_runs),
                dc.full_runs
            );
            println!(
                "ms per shallow     {:.2} ({} runs)",
                ms(dc.shallow_busy, dc.shallow_runs),
                dc.shallow_runs
            );
        }
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
        let spos = report.wall_time.as_secs_f64() / seconds.max(1e-9);
        println!("s per output s     {spos:.3}");
        println!(
            "duty cycle         {:.1} % (model time / wall time)",
            report.duty_cycle() * 100.0
        );
        println!(
            "crops artifact     {:.2} MB ({:.2} MB per output second)",
            size as f64 / 1e6,
            size as f64 / 1e6 / seconds.max(1e-9)
        );
        rows.push((
            interval,
            report.unet_time_ms_per_step(),
            spos,
            report.duty_cycle(),
        ));
    }
    if rows.len() > 1 {
        println!("== side by side (ms per UNet step, seconds per output second, duty cycle)");
        let exact = rows.iter().find(|r| r.0 == 0).map(|r| r.1);
        for (interval, step, spos, duty) in &rows {
            let name = if *interval == 0 {
                "exact".to_owned()
            } else {
                format!("deepcache {interval}")
            };
            let speedup = exact.map_or(String::new(), |e| format!("  {:.2}x", e / step.max(1e-9)));
            println!(
                "{name:<13} {step:9.2} ms/step  {spos:7.3} s/s  {:5.1} %{speedup}",
                duty * 100.0
            );
        }
    }
    Ok(())
}
