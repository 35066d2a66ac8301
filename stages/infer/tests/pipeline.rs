//! The pipeline on the real ONNX Runtime path with the `tiny` profile, without NATS:
//! stopping between steps, passthrough frames, output length per length mode.

mod common;

use common::{Go, clip, config, decode, track};
use lipsync_infer::image::{invert_affine, resize_lanczos, warp_affine};
use lipsync_infer::pipeline::Control;
use lipsync_infer::{InferError, InferStage, synthetic};
use lipsync_runtime::media::LengthMode;

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}

struct StopAt {
    at: u64,
    seen: u64,
}

impl Control for StopAt {
    fn step(&mut self, done: u64, _total: u64) -> bool {
        self.seen = done;
        done < self.at
    }
}

#[test]
fn stops_at_the_step_where_it_was_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let video = clip(dir.path(), 20);
    let stage = InferStage::new(&config()).unwrap();
    let params = stage.params(50, 1.5, 3);
    let g = params.geometry;
    let track = track(&g, 20);
    let features = synthetic::features(20, 1);
    let before = stage.unet_runs();
    let mut control = StopAt { at: 3, seen: 0 };
    let res = stage.run_blocking(
        &params,
        &video,
        &track,
        &features,
        &dir.path().join("c.mkv"),
        &mut control,
    );
    assert!(matches!(res, Err(InferError::Stopped)), "{res:?}");
    assert_eq!(control.seen, 3);
    // One UNet call per step (CFG runs as a batch of 2): exactly three ran.
    assert_eq!(stage.unet_runs() - before, 3);
}

#[test]
fn frames_without_a_face_keep_their_warped_crop() {
    let dir = tempfile::tempdir().unwrap();
    let video = clip(dir.path(), 20);
    let stage = InferStage::new(&config()).unwrap();
    let params = stage.params(2, 1.5, 3);
    let g = params.geometry;
    let mut track = track(&g, 20);
    // Frame 5 has no face; frames 16..20 (the whole second chunk) neither.
    track.frames[5].present = false;
    for f in &mut track.frames[16..] {
        f.present = false;
    }
    let features = synthetic::features(20, 1);
    let out = dir.path().join("c.mkv");
    let before = stage.unet_runs();
    let report = stage
        .run_blocking(&params, &video, &track, &features, &out, &mut Go)
        .unwrap();
    assert_eq!(report.output_frames, 20);
    assert_eq!(report.chunks_generated, 1, "the faceless chunk is skipped");
    assert_eq!(stage.unet_runs() - before, 2);

    // The warped crop of frame 5, computed here from the decoded frame.
    let mut reader = lipsync_runtime::media::FrameReader::open(&video).unwrap();
    let mut frame = Vec::new();
    for _ in 0..=5 {
        assert!(reader.read_into(&mut frame).unwrap());
    }
    let inv = invert_affine(&track.frames[5].affine).unwrap();
    let mut warped = Vec::new();
    warp_affine(
        &frame,
        320,
        240,
        &inv,
        (g.crop_w, g.crop_h),
        g.fill,
        &mut warped,
    );
    let want = resize_lanczos(&warped, g.crop_w, g.crop_h, 3, g.resolution, g.resolution);

    let fb = g.frame_bytes();
    let crops = decode(&out);
    assert_eq!(crops.len(), 20 * fb);
    let got = &crops[5 * fb..6 * fb];
    // Near-lossless codec (the test pattern's sharp text is its worst case).
    let psnr = psnr(got, &want);
    assert!(psnr > 40.0, "passthrough crop PSNR {psnr:.1} dB");
    // A generated neighbour differs from its warped crop inside the mask.
    let gen4 = &crops[4 * fb..5 * fb];
    let diff: u64 = gen4
        .iter()
        .zip(got)
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum();
    assert!(diff > 0);
}

#[test]
fn output_length_follows_the_length_mode() {
    let dir = tempfile::tempdir().unwrap();
    let video = clip(dir.path(), 12);
    let mut cfg = config();
    for (mode, audio_frames, want) in [
        (LengthMode::Pingpong, 30, 30),
        (LengthMode::Cut, 30, 12),
        (LengthMode::Loop, 5, 5),
    ] {
        cfg.infer.length_mode = mode;
        let stage = InferStage::new(&cfg).unwrap();
        let params = stage.params(1, 1.0, 3);
        let g = params.geometry;
        let track = track(&g, 12);
        let features = synthetic::features(audio_frames, 1);
        let out = dir.path().join(format!("{mode:?}.mkv"));
        let report = stage
            .run_blocking(&params, &video, &track, &features, &out, &mut Go)
            .unwrap();
        assert_eq!(report.output_frames, want, "{mode:?}");
        assert_eq!(
            decode(&out).len(),
            want as usize * g.frame_bytes(),
            "{mode:?}"
        );
    }
}

struct PanicAt(u64);
impl Control for PanicAt {
    fn step(&mut self, done: u64, _: u64) -> bool {
        assert!(done < self.0, "injected fault at step {done}");
        true
    }
}

#[test]
fn a_panic_in_the_pipeline_fails_that_run_and_the_engine_serves_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let video = clip(dir.path(), 20);
    let cfg = config();
    assert_eq!(
        cfg.infer.gpu_workers, 1,
        "one engine: the second run needs it back"
    );
    let stage = InferStage::new(&cfg).unwrap();
    let params = stage.params(3, 1.5, 3);
    let g = params.geometry;
    let track = track(&g, 20);
    let features = synthetic::features(20, 1);
    let out = dir.path().join("c.mkv");
    let res = stage.run_blocking(&params, &video, &track, &features, &out, &mut PanicAt(2));
    match res {
        Err(e @ InferError::Panicked(_)) => {
            use lipsync_runtime::StageError;
            assert!(e.retryable(), "a panic is worth another delivery");
        }
        other => panic!("expected a panic error, got {other:?}"),
    }
    // The engine went back to the pool: the same stage runs a whole job.
    let report = stage
        .run_blocking(&params, &video, &track, &features, &out, &mut Go)
        .unwrap();
    assert_eq!(report.output_frames, 20);
}
