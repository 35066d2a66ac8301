//! End to end: the real binaries on a real nats-server with the tiny models and a real
//! face clip, driven through the gateway like a client would.

use std::time::{Duration, Instant};

use lipsync_tests::pipeline::{Pipeline, frames, probe};

const TASK_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test]
async fn one_task_completes_and_changes_only_the_face() {
    let p = Pipeline::start().await.unwrap();
    p.media.face_clip("face.mp4", 2.0, 512, 512, 25, false);
    p.media.audio("voice.wav", 2.6);
    let t0 = Instant::now();
    let id = p.submit_media("face.mp4", "voice.wav").await.unwrap();
    let rec = p.wait_done(&id, TASK_TIMEOUT).await.unwrap();
    eprintln!("task done in {:.1} s: {rec}", t0.elapsed().as_secs_f64());
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(rec["progress"], 1.0);
    assert_eq!(rec["output_video_url"], format!("/outputs/{id}/result.mp4"));
    assert_eq!(rec["output_mask_url"], format!("/outputs/{id}/mask.mp4"));

    let dir = tempfile::tempdir().unwrap();
    let result = dir.path().join("result.mp4");
    let mask = dir.path().join("mask.mp4");
    p.download(rec["output_video_url"].as_str().unwrap(), &result)
        .await
        .unwrap();
    p.download(rec["output_mask_url"].as_str().unwrap(), &mask)
        .await
        .unwrap();
    let r = probe(&result).unwrap();
    assert_eq!(r.size, (512, 512));
    assert!((r.fps - 25.0).abs() < 0.01, "{r:?}");
    // 2.6 s of audio: T = 130 positions -> 67 frames (audio longer than video: ping-pong).
    assert_eq!(r.frames, 67, "{r:?}");
    let audio = r.audio_s.expect("audio track");
    assert!((audio - 67.0 / 25.0).abs() < 0.1, "audio {audio} s");
    // The local copy the seed describes (outputs/{task_id}/).
    assert!(p.outputs.path().join(&id).join("result.mp4").exists());

    // Pixels outside the (dilated) blend mask equal the input within codec noise;
    // inside, the tiny model's noise changed them.
    let (w, h, out) = frames(&result).unwrap();
    let (_, _, masks) = frames(&mask).unwrap();
    let (_, _, input) = frames(&p.media.path("face.mp4")).unwrap();
    assert_eq!(out.len(), masks.len());
    let (mut outside, mut outside_err, mut inside, mut inside_err) = (0u64, 0f64, 0u64, 0f64);
    let (wu, hu) = (w as usize, h as usize);
    for k in 0..out.len() {
        let src = lipsync_runtime::media::source_frame(
            k,
            input.len(),
            lipsync_runtime::media::LengthMode::Pingpong,
        );
        let near = dilate(&masks[k], wu, hu, 4);
        for (p, &m) in near.iter().enumerate() {
            let i = p * 3;
            let d = (0..3)
                .map(|c| (out[k][i + c] as f64 - input[src][i + c] as f64).abs())
                .sum::<f64>()
                / 3.0;
            if m {
                inside += 1;
                inside_err += d;
            } else {
                outside += 1;
                outside_err += d;
            }
        }
    }
    let outside_mean = outside_err / outside as f64;
    let inside_mean = inside_err / inside.max(1) as f64;
    eprintln!("mean abs diff outside {outside_mean:.2}, inside {inside_mean:.2}");
    assert!(inside > 0 && outside > 0);
    assert!(
        outside_mean < 3.0,
        "outside the mask the frame changed: {outside_mean}"
    );
    assert!(
        inside_mean > outside_mean * 3.0,
        "the face region did not change"
    );
}

/// Pixels within `r` of a mask pixel above 8 (separable max filter on an RGB frame).
fn dilate(rgb: &[u8], w: usize, h: usize, r: usize) -> Vec<bool> {
    let on: Vec<bool> = rgb.chunks_exact(3).map(|p| p[0] > 8).collect();
    let mut rows = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = (x.saturating_sub(r)..(x + r + 1).min(w)).any(|xx| on[y * w + xx]);
        }
    }
    let mut out = vec![false; w * h];
    for y in 0..h {
        for x in 0..w {
            out[y * w + x] = (y.saturating_sub(r)..(y + r + 1).min(h)).any(|yy| rows[yy * w + x]);
        }
    }
    out
}
