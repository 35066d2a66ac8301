//! End to end under faults and bad input: SIGKILL of each stage mid-job, a nats-server
//! restart, a gateway restart, two face replicas, and typed failures for bad media while
//! a good task beside them completes.

use std::time::Duration;

use lipsync_tests::pipeline::{Pipeline, ffmpeg, probe};

const TASK_TIMEOUT: Duration = Duration::from_secs(300);

async fn record(p: &Pipeline, id: &str) -> lipsync_schemas::TaskRecord {
    let topo = lipsync_tests::topology(&p.nats.config()).await.unwrap();
    let store = lipsync_runtime::TaskStore::new(topo.tasks.clone());
    store.get(id).await.unwrap().unwrap().0
}

/// Follow the task's record until `stage` runs: `true` at the first revision where it
/// has started and not finished, `false` when it finished (or the task ended) before a
/// revision showed it running. Some jobs (audio, fetch on S3) take about 0.1 s, so a
/// poll can miss them; the watch sees each write as it happens.
async fn catch_in_stage(tasks: &async_nats::jetstream::kv::Store, id: &str, stage: &str) -> bool {
    use futures::StreamExt;
    let mut watch = tasks.watch(id).await.unwrap();
    let seen = tokio::time::timeout(TASK_TIMEOUT, async {
        while let Some(entry) = watch.next().await {
            let entry = entry.unwrap();
            let Ok(r) = serde_json::from_slice::<lipsync_schemas::TaskRecord>(&entry.value) else {
                continue;
            };
            match r.stages.get(stage) {
                Some(t) if t.finished_at.is_some() => return false,
                Some(t) if t.started_at.is_some() => return true,
                _ if r.status.is_terminal() => return false,
                _ => {}
            }
        }
        panic!("the watch of {id} ended");
    })
    .await;
    seen.unwrap_or_else(|_| panic!("{stage} never ran on {id}"))
}

/// Rounds per stage before the test gives up on landing a kill mid-job.
const KILL_TRIES: usize = 4;

#[tokio::test]
async fn sigkill_of_each_stage_mid_job_loses_and_doubles_nothing() {
    let mut p = Pipeline::start().await.unwrap();
    // Long enough that every stage is caught mid-job.
    p.media.face_clip("face.mp4", 6.0, 512, 512, 25, false);
    p.media.audio("voice.wav", 6.0);
    let topo = lipsync_tests::topology(&p.nats.config()).await.unwrap();
    for stage in ["fetch", "face", "audio", "infer", "mux"] {
        // A round whose job ended before the kill landed (it ran once, nothing to
        // redeliver) proves nothing: it is run again with a new task.
        let mut tries = 0;
        loop {
            tries += 1;
            let id = p
                .submit(serde_json::json!({
                    "video_url": p.media.url("face.mp4"),
                    "audio_url": p.media.url("voice.wav"),
                    "inference_steps": 10,
                }))
                .await
                .unwrap()["task_id"]
                .as_str()
                .unwrap()
                .to_owned();
            let caught = catch_in_stage(&topo.tasks, &id, stage).await;
            if caught {
                p.kill(stage);
                p.spawn(stage).unwrap();
                p.wait_ready(stage).await.unwrap();
            }
            let rec = p.wait_done(&id, TASK_TIMEOUT).await.unwrap();
            assert_eq!(rec["status"], "completed", "after killing {stage}: {rec}");
            let r = record(&p, &id).await;
            if r.stages[stage].attempts < 2 {
                assert!(
                    tries < KILL_TRIES,
                    "{stage}: no kill landed mid-job in {KILL_TRIES} rounds: {:?}",
                    r.stages
                );
                continue;
            }
            // Downstream stages ran once: no doubled work.
            let later: &[&str] = match stage {
                "fetch" => &["face", "audio", "infer", "mux"],
                "face" | "audio" => &["infer", "mux"],
                "infer" => &["mux"],
                _ => &[],
            };
            for s in later {
                assert_eq!(r.stages[*s].attempts, 1, "{s} after killing {stage}");
            }
            break;
        }
    }
    // Nothing is left pending in any consumer.
    let js = async_nats::jetstream::new(p.nats.client().await.unwrap());
    let stream = js
        .get_stream(lipsync_schemas::names::WORK_STREAM)
        .await
        .unwrap();
    for s in ["fetch", "face", "audio", "infer", "mux"] {
        let info = stream.consumer_info(s).await.unwrap();
        assert_eq!(
            (info.num_pending, info.num_ack_pending),
            (0, 0),
            "{s} has leftover work"
        );
    }
}

#[tokio::test]
async fn nats_and_gateway_restarts_lose_no_task_and_face_replicas_share_work() {
    let mut p = Pipeline::start().await.unwrap();
    p.spawn("face").unwrap(); // a second face replica
    p.media.face_clip("face.mp4", 3.0, 512, 512, 25, false);
    p.media.audio("voice.wav", 3.0);
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(p.submit_media("face.mp4", "voice.wav").await.unwrap());
    }
    let topo = lipsync_tests::topology(&p.nats.config()).await.unwrap();
    assert!(
        catch_in_stage(&topo.tasks, &ids[0], "infer").await,
        "infer finished before the restart"
    );
    // nats-server restarts on the same port and file store.
    p.nats.restart().await.unwrap();
    // The gateway restarts too: state lives in KV.
    p.restart("gateway").await.unwrap();
    for id in &ids {
        let rec = p.wait_done(id, TASK_TIMEOUT).await.unwrap();
        assert_eq!(rec["status"], "completed", "{rec}");
    }
}

#[tokio::test]
async fn bad_inputs_fail_typed_while_good_tasks_complete() {
    let p = Pipeline::start().await.unwrap();
    let m = &p.media;
    m.face_clip("face.mp4", 1.2, 512, 512, 25, false);
    m.audio("voice.wav", 1.2);
    m.audio("short.wav", 0.2);
    m.audio("long.wav", 2.5);
    m.audio("half.wav", 0.6);
    // 4K (the default size limit, accepted) and one pixel row wider than it allows.
    m.face_clip("uhd.mp4", 0.4, 3840, 2160, 25, false);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:s=4096x2160:r=25:d=0.2",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",
        m.path("toolarge.mp4").to_str().unwrap(),
    ]);
    // Odd width, 60 fps, a sound track (valid), rotated phone video, variable frame rate.
    m.face_clip("odd.mp4", 1.0, 513, 512, 25, true);
    m.face_clip("fps60.mp4", 1.0, 512, 512, 60, false);
    let rotated = m.path("rotated.mp4");
    ffmpeg(&[
        "-i",
        m.path("face.mp4").to_str().unwrap(),
        "-c",
        "copy",
        "-metadata:s:v:0",
        "rotate=90",
        rotated.to_str().unwrap(),
    ]);
    let vfr = m.path("vfr.mp4");
    ffmpeg(&[
        "-i",
        m.path("face.mp4").to_str().unwrap(),
        "-vf",
        "setpts='if(lt(N,10),N*0.02/TB,(N*0.05)/TB)'",
        "-fps_mode",
        "vfr",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        vfr.to_str().unwrap(),
    ]);
    // No face, 1x1, corrupt, wrong extension (a WAV named .mp4 as the video).
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25:duration=1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        m.path("noface.mp4").to_str().unwrap(),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "color=c=gray:s=16x16:r=25:d=1,scale=1:1",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv444p",
        m.path("tiny.mkv").to_str().unwrap(),
    ]);
    let good = std::fs::read(m.path("face.mp4")).unwrap();
    std::fs::write(m.path("corrupt.mp4"), &good[..good.len() / 3]).unwrap();
    std::fs::copy(m.path("voice.wav"), m.path("audio-as-video.mp4")).unwrap();
    // A real MP4 under a misleading extension: the content decides, not the name.
    std::fs::copy(m.path("face.mp4"), m.path("face-named.webm")).unwrap();

    let cases: &[(&str, &str, Result<(), &str>)] = &[
        ("noface.mp4", "voice.wav", Err("no_face_detected")),
        ("face.mp4", "short.wav", Err("unsupported_media")),
        // A 1x1 video is valid media without a face.
        ("tiny.mkv", "voice.wav", Err("no_face_detected")),
        ("corrupt.mp4", "voice.wav", Err("unsupported_media")),
        ("audio-as-video.mp4", "voice.wav", Err("no_video_stream")),
        ("face.mp4", "long.wav", Ok(())),
        // Video longer than audio: cut to the audio (0.6 s = 30 positions -> 17 frames).
        ("face.mp4", "half.wav", Ok(())),
        ("uhd.mp4", "half.wav", Ok(())),
        // Over the resolution limit: refused at probe time (input_too_large is for bytes).
        ("toolarge.mp4", "voice.wav", Err("unsupported_media")),
        ("face-named.webm", "voice.wav", Ok(())),
        ("long.wav", "face.mp4", Err("no_video_stream")),
        ("odd.mp4", "voice.wav", Ok(())),
        ("fps60.mp4", "voice.wav", Ok(())),
        ("rotated.mp4", "voice.wav", Ok(())),
        ("vfr.mp4", "voice.wav", Ok(())),
    ];
    let mut ids = Vec::new();
    for (v, a, want) in cases {
        ids.push((p.submit_media(v, a).await.unwrap(), *v, *a, *want));
    }
    let dir = tempfile::tempdir().unwrap();
    for (id, v, a, want) in ids {
        let rec = p.wait_done(&id, TASK_TIMEOUT).await.unwrap();
        match want {
            Ok(()) => {
                assert_eq!(rec["status"], "completed", "{v}+{a}: {rec}");
                if a == "half.wav" {
                    // Cut to the audio, at the input's size.
                    let out = dir.path().join(format!("{id}.mp4"));
                    p.download(rec["output_video_url"].as_str().unwrap(), &out)
                        .await
                        .unwrap();
                    let r = probe(&out).unwrap();
                    let size = if v == "uhd.mp4" {
                        (3840, 2160)
                    } else {
                        (512, 512)
                    };
                    assert_eq!((r.size, r.frames), (size, 17), "{v}+{a}: {r:?}");
                }
            }
            Err(code) => {
                assert_eq!(rec["status"], "failed", "{v}+{a}: {rec}");
                assert_eq!(rec["error"]["code"], code, "{v}+{a}: {rec}");
                let msg = rec["message"].as_str().unwrap();
                assert!(!msg.is_empty() && !msg.contains("/tmp"), "{v}+{a}: {msg}");
            }
        }
    }
}
