//! The mux stage on a real nats-server with hand-made inputs: pixels change only inside
//! the face region, frames without a face pass through, the mask shows the face, the
//! task completes with both URLs and its intermediates are gone; ping-pong beyond the
//! video, odd sizes, the original audio track, and a SIGKILL mid-encode that completes
//! exactly once.

mod common;

use std::process::{Command, Stdio};

use common::*;
use lipsync_runtime::media::{LengthMode, source_frame};
use lipsync_schemas::{Stage, Status, names};
use tokio_util::sync::CancellationToken;

/// Pixels of the crop box grown by `margin` on each side.
fn face_rect(w: u32, h: u32, margin: i32) -> (usize, usize, usize, usize) {
    let (tx, ty) = box_origin(w, h);
    let c = |v: f32, d: i32, max: u32| (v as i32 + d).clamp(0, max as i32) as usize;
    (
        c(tx, -margin, w),
        c(ty, -margin, h),
        c(tx + CROP_W as f32 * SCALE, margin + 1, w),
        c(ty + CROP_H as f32 * SCALE, margin + 1, h),
    )
}

fn assert_completed(rec: &lipsync_schemas::TaskRecord) {
    assert_eq!(rec.status, Status::Completed, "{:?}", rec.error);
    assert_eq!(rec.stage, Some(Stage::Mux));
    assert!((rec.progress - 1.0).abs() < 1e-9);
    assert_eq!(rec.message, "completed");
    let tid = &rec.task_id;
    assert_eq!(
        rec.output_video_url.as_deref(),
        Some(format!("/outputs/{tid}/result.mp4").as_str())
    );
    assert_eq!(
        rec.output_mask_url.as_deref(),
        Some(format!("/outputs/{tid}/mask.mp4").as_str())
    );
    assert!(rec.finished_at.is_some() && rec.end_time.is_some());
    assert!(rec.stages["mux"].finished_at.is_some());
}

#[tokio::test]
async fn pastes_the_face_encodes_and_completes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (w, h, n) = (320, 240, 50);
    let video = clip(d, "v.mp4", w, h, 2.0);
    let absent = |i: usize| (10..15).contains(&i);
    let face_track = track(w, h, n, absent);
    let out_frames = 48;
    let crop_file = crops(d, out_frames);
    let tone = wav(d, "a16k.wav", 1.92, 16000, 1);
    let e = env().await;
    let shutdown = CancellationToken::new();
    let stage = lipsync_mux::start(&e.cfg, shutdown.clone()).await.unwrap();
    let tid = e
        .submit(&Task {
            video: &video,
            track: &face_track,
            crops: &crop_file,
            wav16k: &tone,
            original_audio: &tone,
            output_frames: out_frames,
            mode: "cut",
        })
        .await;
    let rec = e.ended(&tid).await;
    assert_completed(&rec);

    // Intermediates are gone (deleted right after the completion), outputs stay, the
    // local copies exist.
    for name in [
        names::artifact::VIDEO,
        names::artifact::AUDIO_ORIGINAL,
        names::artifact::AUDIO_16K,
        names::artifact::FACE_TRACK,
        names::artifact::AUDIO_FEATURES,
        names::artifact::CROPS,
    ] {
        lipsync_tests::wait_for(std::time::Duration::from_secs(10), || async {
            (!e.exists(&tid, name).await).then_some(())
        })
        .await
        .unwrap_or_else(|_| panic!("{name} still stored"));
    }
    assert!(e.exists(&tid, names::artifact::RESULT).await);
    assert!(e.exists(&tid, names::artifact::MASK).await);
    let local = e.outputs.path().join(&tid);
    assert!(local.join("result.mp4").metadata().unwrap().len() > 0);
    assert!(local.join("mask.mp4").metadata().unwrap().len() > 0);

    // Container facts: size, rate, frame count, audio length.
    let result = e.download(&tid, names::artifact::RESULT, d).await;
    let p = probe(&result);
    let streams = p["streams"].as_array().unwrap();
    let v = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(320), Some(240))
    );
    assert_eq!(v["codec_name"], "h264");
    assert_eq!(v["pix_fmt"], "yuv420p");
    assert_eq!(v["r_frame_rate"], "25/1");
    assert_eq!(v["nb_read_frames"], out_frames.to_string());
    let a = streams.iter().find(|s| s["codec_type"] == "audio").unwrap();
    assert_eq!(a["codec_name"], "aac");
    assert_eq!(a["sample_rate"], "16000");
    let secs: f64 = a["duration"].as_str().unwrap().parse().unwrap();
    assert!(
        (secs - out_frames as f64 / 25.0).abs() < 0.1,
        "audio {secs} s"
    );

    // Pixels: unchanged outside the grown box and on faceless frames, the crop colour
    // inside the box.
    let (_, _, input) = frames(&video);
    let (fw, _, output) = frames(&result);
    assert_eq!(output.len(), out_frames);
    let outer = face_rect(w, h, 6);
    let inner = face_rect(w, h, -20);
    for (k, out) in output.iter().enumerate() {
        let src = &input[source_frame(k, n, LengthMode::Cut)];
        let outside = mad(out, src, fw, outer, false);
        assert!(outside < 2.5, "frame {k}: outside differs by {outside}");
        if absent(k) {
            let all = mad(out, src, fw, outer, true);
            assert!(all < 2.5, "faceless frame {k} changed by {all}");
        } else {
            let m = mean_rgb(out, fw, inner);
            for c in 0..3 {
                assert!(
                    (m[c] - f64::from(CROP_RGB[c])).abs() < 12.0,
                    "frame {k}: {m:?}"
                );
            }
        }
    }

    // Mask: white in the face, black elsewhere and on faceless frames.
    let mask = e.download(&tid, names::artifact::MASK, d).await;
    let (mw, mh, masks) = frames(&mask);
    assert_eq!((mw, mh, masks.len()), (320, 240, out_frames));
    let black = vec![0u8; mw * mh * 3];
    for (k, m) in masks.iter().enumerate() {
        let outside = mad(m, &black, mw, outer, false);
        assert!(outside < 2.0, "mask frame {k} outside {outside}");
        let inside = mean_rgb(m, mw, inner)[0];
        if absent(k) {
            assert!(inside < 3.0, "mask frame {k} inside {inside}");
        } else {
            assert!(inside > 240.0, "mask frame {k} inside {inside}");
        }
    }
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn pingpong_beyond_the_video_odd_size_and_original_audio() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // 1 s of a 321x241 video, 2.4 s of output: forward, backward, forward.
    let (w, h, n) = (321, 241, 25);
    let video = clip(d, "odd.mp4", w, h, 1.0);
    let face_track = track(w, h, n, |_| false);
    let out_frames = 60;
    let crop_file = crops(d, out_frames);
    let tone = wav(d, "a16k.wav", 2.4, 16000, 1);
    let original = wav(d, "orig.wav", 2.6, 44100, 2);
    let mut e = env().await;
    e.cfg.mux.audio = "original".into();
    e.cfg.mux.delete_intermediates = false;
    let shutdown = CancellationToken::new();
    let stage = lipsync_mux::start(&e.cfg, shutdown.clone()).await.unwrap();
    let tid = e
        .submit(&Task {
            video: &video,
            track: &face_track,
            crops: &crop_file,
            wav16k: &tone,
            original_audio: &original,
            output_frames: out_frames,
            mode: "pingpong",
        })
        .await;
    let rec = e.ended(&tid).await;
    assert_completed(&rec);
    assert!(
        e.exists(&tid, names::artifact::CROPS).await,
        "kept when configured"
    );

    let result = e.download(&tid, names::artifact::RESULT, d).await;
    let p = probe(&result);
    let streams = p["streams"].as_array().unwrap();
    let v = streams.iter().find(|s| s["codec_type"] == "video").unwrap();
    assert_eq!(
        (v["width"].as_u64(), v["height"].as_u64()),
        (Some(320), Some(240))
    );
    assert_eq!(v["nb_read_frames"], out_frames.to_string());
    let a = streams.iter().find(|s| s["codec_type"] == "audio").unwrap();
    assert_eq!(
        (a["sample_rate"].as_str(), a["channels"].as_u64()),
        (Some("44100"), Some(2))
    );
    let secs: f64 = a["duration"].as_str().unwrap().parse().unwrap();
    assert!(
        (secs - 2.4).abs() < 0.1,
        "audio {secs} s trimmed to the video"
    );

    // Each output frame shows the ping-pong source frame (testsrc2 moves every frame).
    let (_, _, input) = frames(&video);
    let (fw, _, output) = frames(&result);
    let outer = face_rect(320, 240, 6);
    let crop_in = |f: &Vec<u8>| -> Vec<u8> {
        f.chunks_exact(w as usize * 3)
            .take(240)
            .flat_map(|row| row[..320 * 3].to_vec())
            .collect()
    };
    for (k, out) in output.iter().enumerate() {
        let src = source_frame(k, n, LengthMode::Pingpong);
        let right = mad(out, &crop_in(&input[src]), fw, outer, false);
        let wrong = mad(out, &crop_in(&input[(src + 3) % n]), fw, outer, false);
        // 4:4:4 source re-encoded as 4:2:0: more chroma loss than in the test above.
        assert!(
            right < 5.0 && right * 2.0 < wrong,
            "frame {k} (source {src}): {right} vs {wrong}"
        );
    }
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn inconsistent_crops_fail_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let video = clip(d, "v.mp4", 160, 128, 1.0);
    let face_track = track(160, 128, 25, |_| false);
    let crop_file = crops(d, 20);
    let tone = wav(d, "a.wav", 1.0, 16000, 1);
    let e = env().await;
    let shutdown = CancellationToken::new();
    let stage = lipsync_mux::start(&e.cfg, shutdown.clone()).await.unwrap();
    let tid = e
        .submit(&Task {
            video: &video,
            track: &face_track,
            crops: &crop_file,
            wav16k: &tone,
            original_audio: &tone,
            output_frames: 25,
            mode: "cut",
        })
        .await;
    let rec = e.ended(&tid).await;
    assert_eq!(rec.status, Status::Failed);
    let err = rec.error.unwrap();
    assert!(
        err.message.contains("20 frames, 25 expected"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("/tmp"), "{}", err.message);
    // A failed task keeps nothing: its intermediates are deleted right after the
    // failure is recorded.
    lipsync_tests::wait_for(std::time::Duration::from_secs(10), || async {
        (!e.exists(&tid, names::artifact::CROPS).await).then_some(())
    })
    .await
    .expect("the failed task's crops are still stored");
    shutdown.cancel();
    stage.wait().await.unwrap();
}

fn spawn_mux(e: &Env) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lipsync-mux"))
        .env("LIPSYNC_NATS__URL", e.nats.url())
        .env("LIPSYNC_NATS__ACK_WAIT_S", "3")
        .env("LIPSYNC_MUX__LISTEN", "127.0.0.1:0")
        .env("LIPSYNC_MUX__PRESET", "slow")
        .env("LIPSYNC_RUNNER__PROGRESS_INTERVAL_MS", "0")
        .env("LIPSYNC_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("lipsync-mux binary")
}

#[tokio::test]
async fn sigkill_mid_encode_completes_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (w, h, n) = (640, 480, 150);
    let video = clip(d, "v.mp4", w, h, 6.0);
    let face_track = track(w, h, n, |_| false);
    let crop_file = crops(d, n);
    let tone = wav(d, "a.wav", 6.0, 16000, 1);
    let mut e = env().await;
    e.cfg.nats.ack_wait_s = 3;
    let mut child = spawn_mux(&e);
    let tid = e
        .submit(&Task {
            video: &video,
            track: &face_track,
            crops: &crop_file,
            wav16k: &tone,
            original_audio: &tone,
            output_frames: n,
            mode: "cut",
        })
        .await;
    // Every write of the record, as seen by a watcher.
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut watch = e.store.bucket().watch(&tid).await.unwrap();
    let seen = statuses.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(Ok(entry)) = watch.next().await {
            if let Ok(r) = serde_json::from_slice::<lipsync_schemas::TaskRecord>(&entry.value) {
                seen.lock().unwrap().push(r.status);
            }
        }
    });
    // Mid-encode: some frames written, far from done.
    let rec = e
        .wait(&tid, |r| r.progress > 0.91 || r.status.is_terminal())
        .await;
    assert!(
        !rec.status.is_terminal(),
        "finished before the kill: {:?}",
        rec.status
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let mut second = spawn_mux(&e);
    let rec = e.ended(&tid).await;
    assert_completed(&rec);
    assert!(rec.stages["mux"].attempts >= 2, "{:?}", rec.stages["mux"]);
    // The record was written completed exactly once (every later write is refused).
    let writes = statuses.lock().unwrap().clone();
    assert_eq!(
        writes.iter().filter(|s| **s == Status::Completed).count(),
        1,
        "{writes:?}"
    );
    let result = e.download(&tid, names::artifact::RESULT, d).await;
    assert_eq!(
        probe(&result)["streams"][0]["nb_read_frames"],
        n.to_string()
    );
    // SIGTERM: clean exit.
    let pid = second.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(second.wait().unwrap().success());
}
