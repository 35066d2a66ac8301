//! DeepCache on the tiny profile (real ONNX Runtime, its generated DeepCache pair): the
//! schedule of full and shallow steps per chunk is the reference helper's, interval 0 is
//! the exact path, a full step at every step (interval 1) gives exactly the exact output,
//! and a profile without the pair refuses a DeepCache interval.

mod common;

use std::path::Path;

use common::{Go, clip, config, decode, track};
use lipsync_infer::crops::CropsCodec;
use lipsync_infer::engine::{Device, Engine, EngineExtras, EngineOptions};
use lipsync_infer::mask::Mask;
use lipsync_infer::pipeline::{self, JobInputs, Report};
use lipsync_infer::{InferStage, synthetic};

/// Runs `frames` frames with `steps` DDIM steps at DeepCache `interval`; returns the report
/// and the decoded (lossless) crops.
fn run(
    stage: &InferStage,
    video: &Path,
    frames: usize,
    steps: u32,
    interval: u32,
) -> (Report, Vec<u8>) {
    let cfg = config();
    let profile = stage.profile();
    let opts = EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
        dylib: None,
    };
    let extras = EngineExtras {
        deepcache_interval: interval,
        manifest: Some(cfg.models.manifest.clone()),
        tensorrt_cache: None,
    };
    let mut engine = Engine::load_with(profile, &opts, &extras, 0).unwrap();
    assert_eq!(engine.deepcache_interval(), interval);
    let mut params = stage.params(steps, 1.5, 11);
    params.codec = CropsCodec::Ffv1;
    let g = params.geometry;
    let mask = Mask::load(
        &profile.mask_path(),
        profile.profile.mask.size as usize,
        g.resolution,
    )
    .unwrap();
    let track = track(&g, frames);
    let features = synthetic::features(frames, 1);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("crops.mkv");
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
        dir.path(),
        &out,
        &mut Go,
    )
    .unwrap();
    (report, decode(&out))
}

#[test]
fn interval_3_runs_full_steps_at_0_3_6_of_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    // 37 frames: chunks of 16, 16 and 5; each restarts the schedule.
    let video = clip(dir.path(), 37);
    let stage = InferStage::new(&config()).unwrap();
    let (exact, exact_crops) = run(&stage, &video, 37, 20, 0);
    assert_eq!(exact.unet_schedule, vec!["E".repeat(20); 3]);
    assert_eq!(exact.deepcache.full_runs + exact.deepcache.shallow_runs, 0);

    let (dc, dc_crops) = run(&stage, &video, 37, 20, 3);
    assert_eq!(dc.unet_schedule, vec!["FSSFSSFSSFSSFSSFSSFS".to_owned(); 3]);
    assert_eq!(dc.deepcache.full_runs, 3 * 7);
    assert_eq!(dc.deepcache.shallow_runs, 3 * 13);
    assert_eq!(
        dc.unet_steps, 60,
        "one UNet call per step either way (CFG batched)"
    );
    assert_eq!(dc.output_frames, 37);
    assert_eq!(dc_crops.len(), exact_crops.len());
    assert_ne!(dc_crops, exact_crops, "cached steps are an approximation");
}

#[test]
fn a_full_step_every_step_is_the_exact_output() {
    let dir = tempfile::tempdir().unwrap();
    let video = clip(dir.path(), 18);
    let stage = InferStage::new(&config()).unwrap();
    let (exact, exact_crops) = run(&stage, &video, 18, 6, 0);
    let (every, every_crops) = run(&stage, &video, 18, 6, 1);
    assert_eq!(every.unet_schedule, vec!["FFFFFF".to_owned(); 2]);
    assert_eq!(exact.unet_schedule, vec!["EEEEEE".to_owned(); 2]);
    // Same weights, same inputs: the full graph's noise prediction is the plain UNet's.
    assert!(
        exact_crops == every_crops,
        "interval 1 must equal interval 0 bit for bit"
    );
    // Interval 2 on 6 steps: F S F S F S.
    let (two, _) = run(&stage, &video, 18, 6, 2);
    assert_eq!(two.unet_schedule, vec!["FSFSFS".to_owned(); 2]);
}

#[test]
fn a_profile_without_the_deepcache_pair_refuses_an_interval() {
    let stage = InferStage::new(&config()).unwrap();
    let mut profile = stage.profile().clone();
    let dir = tempfile::tempdir().unwrap();
    profile.dir = dir.path().to_path_buf(); // no files at all here
    let opts = EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
        dylib: None,
    };
    let extras = EngineExtras {
        deepcache_interval: 3,
        manifest: None,
        tensorrt_cache: None,
    };
    let err = Engine::load_with(&profile, &opts, &extras, 0)
        .err()
        .expect("must refuse");
    let msg = err.to_string();
    assert!(msg.contains("deepcache_interval = 3"), "{msg}");
    assert!(msg.contains("make models"), "{msg}");
}

#[test]
fn the_stage_takes_the_interval_from_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let video = clip(dir.path(), 16);
    let mut cfg = config();
    cfg.infer.deepcache_interval = 3;
    let stage = InferStage::new(&cfg).unwrap();
    let params = stage.params(7, 1.5, 5);
    let g = params.geometry;
    let track = track(&g, 16);
    let features = synthetic::features(16, 1);
    let report = stage
        .run_blocking(
            &params,
            &video,
            &track,
            &features,
            &dir.path().join("c.mkv"),
            &mut Go,
        )
        .unwrap();
    assert_eq!(report.unet_schedule, vec!["FSSFSSF".to_owned()]);
    assert_eq!(
        lipsync_infer::engine::provider_info().map(|i| i.deepcache_interval),
        Some(3)
    );
}
