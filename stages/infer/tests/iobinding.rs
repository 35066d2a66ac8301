//! The DDIM loop of a chunk through IO binding (`Engine::denoise`: bound values, the
//! `ddim_step` graph on the provider) against the host loop it replaced (a host UNet run per
//! step, `ddim::guide`, `Ddim::step`), on the tiny profile with the real ONNX Runtime on the
//! CPU: CFG (guidance 1.5, batch 2), guidance 1 (batch 1) and DeepCache interval 3 give the
//! same final latents and the same decoded crops. Tolerance: 1e-6 absolute on the latents
//! and on the decoded images; both loops do the same float operations in the same order, so
//! the observed difference is 0.

use std::path::PathBuf;

use lipsync_infer::InferError;
use lipsync_infer::InferStage;
use lipsync_infer::ddim::{Ddim, deepcache_full_step, guide};
use lipsync_infer::engine::{DeepFeature, Device, Engine, EngineExtras, EngineOptions};
use lipsync_infer::noise::Gaussian;
use lipsync_runtime::Config;

const TOL: f32 = 1e-6;

fn stage() -> InferStage {
    let mut cfg = Config::default();
    cfg.models.profile = "tiny".into();
    cfg.models.manifest =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/manifest.toml");
    cfg.infer.intra_threads = 1;
    InferStage::new(&cfg).unwrap()
}

fn engine(stage: &InferStage, interval: u32) -> Engine {
    let opts = EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
        dylib: None,
    };
    let extras = EngineExtras {
        deepcache_interval: interval,
        manifest: None,
        tensorrt_cache: None,
    };
    Engine::load_with(stage.profile(), &opts, &extras, 0).unwrap()
}

/// A chunk's first UNet input `[b, 13, f, h, w]` (both batch items alike) and audio embeds
/// `[b*f, 50, 384]` (all-zero rows for the unconditional item with `b = 2`), seeded.
fn chunk(b: usize, f: usize, hw: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let item = Gaussian::new(seed, 0).vec_f32(13 * f * hw);
    let sample = item.repeat(b);
    let cond = Gaussian::new(seed, 1).vec_f32(f * 50 * 384);
    let audio = if b == 2 {
        let mut a = vec![0f32; cond.len()];
        a.extend_from_slice(&cond);
        a
    } else {
        cond
    };
    (sample, audio)
}

/// The host loop the pipeline ran before IO binding: latents into the UNet input, a host
/// UNet run, the guidance mix and the DDIM update on the host.
fn host_loop(
    engine: &mut Engine,
    ddim: &Ddim,
    mut sample: Vec<f32>,
    shape: [usize; 5],
    audio: &[f32],
    guidance: f32,
) -> (Vec<f32>, String) {
    let [b, _, f, h, w] = shape;
    let block = 4 * f * h * w;
    let item = 13 * f * h * w;
    let mut latents = sample[..block].to_vec();
    let interval = engine.deepcache_interval();
    let mut cached: Option<DeepFeature> = None;
    let mut kinds = String::new();
    for (i, &t) in ddim.timesteps().iter().enumerate() {
        for k in 0..b {
            sample[k * item..k * item + block].copy_from_slice(&latents);
        }
        let mut eps = match cached.as_ref() {
            _ if interval == 0 => {
                kinds.push('E');
                engine.unet(&sample, shape, t, audio).unwrap()
            }
            Some(deep) if !deepcache_full_step(interval, i) => {
                kinds.push('S');
                engine.unet_shallow(&sample, shape, t, audio, deep).unwrap()
            }
            _ => {
                kinds.push('F');
                let (eps, deep) = engine.unet_full(&sample, shape, t, audio).unwrap();
                cached = Some(deep);
                eps
            }
        };
        if b == 2 {
            let (uncond, cond) = eps.split_at_mut(block);
            guide(uncond, cond, guidance);
            eps.truncate(block);
        }
        ddim.step(i, &eps, &mut latents);
    }
    (latents, kinds)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// `[4, f, h, w]` / 0.18215 -> `[f, 4, h, w]`, decoded.
fn decode(engine: &mut Engine, latents: &[f32], f: usize, h: usize, w: usize) -> Vec<f32> {
    let hw = h * w;
    let mut frames_first = vec![0f32; latents.len()];
    for c in 0..4 {
        for fr in 0..f {
            for p in 0..hw {
                frames_first[(fr * 4 + c) * hw + p] = latents[(c * f + fr) * hw + p] / 0.18215;
            }
        }
    }
    engine.vae_decode(&frames_first, f, h, w).unwrap()
}

/// Runs both loops on one chunk and compares latents and decoded crops.
fn same_as_the_host_loop(interval: u32, guidance: f32, f: usize, steps: u32, want_kinds: &str) {
    let stage = stage();
    let mut engine = engine(&stage, interval);
    let ddim = Ddim::new(&stage.profile().profile.scheduler, steps).unwrap();
    let r = stage.profile().profile.resolution as usize;
    let (h, w) = (r / 8, r / 8);
    let b = if guidance > 1.0 { 2 } else { 1 };
    let shape = [b, 13, f, h, w];
    let (sample, audio) = chunk(b, f, h * w, 7 + u64::from(interval));

    let (want, host_kinds) = host_loop(&mut engine, &ddim, sample.clone(), shape, &audio, guidance);
    let mut kinds = String::new();
    let mut seen = Vec::new();
    let got = engine
        .denoise(
            &ddim,
            sample,
            shape,
            audio,
            guidance,
            &mut kinds,
            &mut |i| {
                seen.push(i);
                true
            },
            None,
        )
        .unwrap();
    assert_eq!(kinds, want_kinds);
    assert_eq!(host_kinds, want_kinds);
    assert_eq!(
        seen,
        (0..steps as usize).collect::<Vec<_>>(),
        "after_step once per step"
    );
    assert_eq!(got.len(), 4 * f * h * w);
    assert!(got.iter().all(|x| x.is_finite()));
    let d = max_diff(&got, &want);
    eprintln!("interval {interval} guidance {guidance} F={f}: max |latent diff| {d:e}");
    assert!(d <= TOL, "latents differ by {d}");
    // The loop did move the latents (not a pass-through).
    assert!(
        max_diff(
            &got,
            &chunk(b, f, h * w, 7 + u64::from(interval)).0[..4 * f * h * w]
        ) > 0.1
    );

    let img_got = decode(&mut engine, &got, f, h, w);
    let img_want = decode(&mut engine, &want, f, h, w);
    let d = max_diff(&img_got, &img_want);
    assert!(d <= TOL, "decoded crops differ by {d}");
}

#[test]
fn cfg_batch_matches_the_host_loop() {
    same_as_the_host_loop(0, 1.5, 16, 20, &"E".repeat(20));
}

#[test]
fn guidance_1_matches_the_host_loop() {
    same_as_the_host_loop(0, 1.0, 5, 20, &"E".repeat(20));
}

#[test]
fn deepcache_interval_3_matches_the_host_loop() {
    same_as_the_host_loop(3, 1.5, 16, 20, "FSSFSSFSSFSSFSSFSSFS");
    same_as_the_host_loop(3, 1.0, 3, 7, "FSSFSSF");
}

#[test]
fn a_stop_after_a_step_ends_the_loop() {
    let stage = stage();
    let mut engine = engine(&stage, 0);
    let ddim = Ddim::new(&stage.profile().profile.scheduler, 20).unwrap();
    let (sample, audio) = chunk(2, 4, 32 * 32, 3);
    let mut kinds = String::new();
    let runs_before = engine.unet_runs;
    let err = engine
        .denoise(
            &ddim,
            sample,
            [2, 13, 4, 32, 32],
            audio,
            1.5,
            &mut kinds,
            &mut |i| i < 3,
            None,
        )
        .unwrap_err();
    assert!(matches!(err, InferError::Stopped), "{err}");
    assert_eq!(kinds, "EEEE");
    assert_eq!(engine.unet_runs - runs_before, 4);
}
