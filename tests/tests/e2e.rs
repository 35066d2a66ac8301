//! End to end: the real binaries on a real nats-server with the tiny models and a real
//! face clip, driven through the gateway like a client would.

use std::time::{Duration, Instant};

use lipsync_tests::otlp::{OtlpReceiver, render};
use lipsync_tests::pipeline::{Pipeline, frames, probe};
use lipsync_tests::wait_for;

const TASK_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test]
async fn one_task_completes_and_changes_only_the_face() {
    // Every process exports its spans to this receiver (OTLP/HTTP).
    let otlp = OtlpReceiver::start().await.unwrap();
    let endpoint = otlp.endpoint();
    let p = Pipeline::start_with(&[
        ("LIPSYNC_TRACE__OTLP_ENDPOINT", endpoint.as_str()),
        ("LIPSYNC_TRACE__EXPORT_INTERVAL_MS", "200"),
    ])
    .await
    .unwrap();
    p.media.face_clip("face.mp4", 2.0, 512, 512, 25, false);
    p.media.audio("voice.wav", 2.6);
    // Beside it, an HLS playlist and an ffconcat list named `.mp4` whose entries point at
    // a canary: no stage may follow them.
    let canary = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let seg = format!("http://{}/seg.ts", canary.local_addr().unwrap());
    canary.set_nonblocking(true).unwrap();
    std::fs::write(
        p.media.path("hls.mp4"),
        format!("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{seg}\n#EXT-X-ENDLIST\n"),
    )
    .unwrap();
    std::fs::write(
        p.media.path("concat.mp4"),
        format!("ffconcat version 1.0\nfile '{seg}'\n"),
    )
    .unwrap();
    let mut lying = Vec::new();
    for name in ["hls.mp4", "concat.mp4"] {
        lying.push(p.submit_media(name, "voice.wav").await.unwrap());
    }
    let t0 = Instant::now();
    let id = p.submit_media("face.mp4", "voice.wav").await.unwrap();
    let rec = p.wait_done(&id, TASK_TIMEOUT).await.unwrap();
    for l in &lying {
        let r = p.wait_done(l, TASK_TIMEOUT).await.unwrap();
        assert_eq!(r["status"], "failed", "{r}");
        assert_eq!(r["error"]["code"], "unsupported_media", "{r}");
    }
    assert!(
        canary.accept().is_err(),
        "a stage connected to the playlist's canary"
    );
    eprintln!("task done in {:.1} s: {rec}", t0.elapsed().as_secs_f64());
    assert_eq!(rec["status"], "completed", "{rec}");
    assert_eq!(rec["progress"], 1.0);
    assert_eq!(rec["output_video_url"], format!("/outputs/{id}/result.mp4"));
    assert_eq!(rec["output_mask_url"], format!("/outputs/{id}/mask.mp4"));
    // Every stage's timing is in the public view, in pipeline order.
    let stage = |s: &str| {
        let t = &rec["stages"][s];
        let (a, b) = (t["started_at"].as_f64(), t["finished_at"].as_f64());
        let (a, b) = (a.expect(s), b.expect(s));
        assert!(a <= b && t["attempts"].as_u64() >= Some(1), "{s}: {t}");
        (a, b)
    };
    let (fetch, face, audio, infer, mux) = (
        stage("fetch"),
        stage("face"),
        stage("audio"),
        stage("infer"),
        stage("mux"),
    );
    // A stage records its finish when its message is acked, just after it handed the
    // work on, so the next stage may start a moment before: allow 1 s of overlap.
    let after = |next: f64, prev: (f64, f64)| next >= prev.0 && next + 1.0 >= prev.1;
    assert!(after(face.0, fetch) && after(audio.0, fetch), "{rec}");
    assert!(after(infer.0, face) && after(infer.0, audio), "{rec}");
    assert!(after(mux.0, infer), "{rec}");
    // The stage that runs the diffusion model says what it ran on, in the record and in
    // its /readyz; the others record none.
    assert_eq!(rec["stages"]["infer"]["provider"], "cpu", "{rec}");
    assert_eq!(rec["stages"]["fetch"]["provider"], serde_json::Value::Null);
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", p.ops("infer")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["device"]["provider"], "cpu", "{ready}");
    assert_eq!(ready["device"]["profile"], "tiny", "{ready}");
    assert_eq!(ready["device"]["real_weights"], false, "{ready}");

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

    one_trace_in_causal_order(&otlp, &id).await;

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

/// The task is one trace: the gateway's root span, then one span per stage, each the
/// child of the span that handed it its work, each starting after its parent.
async fn one_trace_in_causal_order(otlp: &OtlpReceiver, task_id: &str) {
    let trace_id = lipsync_runtime::runner::trace_id(task_id);
    const STAGES: [&str; 5] = ["fetch", "face", "audio", "infer", "mux"];
    let spans = wait_for(Duration::from_secs(30), || {
        let spans = otlp.trace(&trace_id);
        let has = |n: &str| spans.iter().any(|s| s.name == n);
        let done = (has("task") && STAGES.iter().all(|s| has(s))).then_some(spans);
        async move { done }
    })
    .await
    .unwrap_or_else(|e| panic!("trace {trace_id}: {e}; received {:#?}", otlp.spans()));
    eprintln!("trace {trace_id}:\n{}", render(&spans));
    // Of a stage run more than once, the last attempt is the one that handed on.
    let span = |name: &str| {
        spans
            .iter()
            .filter(|s| s.name == name)
            .max_by_key(|s| s.attributes.get("attempt").cloned().unwrap_or_default())
            .unwrap()
    };
    let root = span("task");
    assert_eq!(root.service, "lipsync-gateway");
    assert_eq!(root.parent_span_id, "", "{root:?}");
    assert_eq!(root.attributes["task_id"], task_id);
    for s in STAGES {
        let j = span(s);
        assert_eq!(j.service, format!("lipsync-{s}"), "{j:?}");
        assert_eq!(j.attributes["task_id"], task_id, "{j:?}");
        assert_eq!(j.attributes["trace_id"], trace_id, "{j:?}");
        assert!(j.end_ns >= j.start_ns, "{j:?}");
    }
    let child_of = |child: &str, parents: &[&str]| {
        let c = span(child);
        let p = parents
            .iter()
            .map(|p| span(p))
            .find(|p| p.span_id == c.parent_span_id)
            .unwrap_or_else(|| panic!("{child}'s parent is none of {parents:?}: {c:?}"));
        assert!(c.start_ns >= p.start_ns, "{child} starts before {}", p.name);
    };
    child_of("fetch", &["task"]);
    child_of("face", &["fetch"]);
    child_of("audio", &["fetch"]);
    // Whichever of face and audio finished last published the infer job.
    child_of("infer", &["face", "audio"]);
    child_of("mux", &["infer"]);
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

/// The task record straight from KV (with per-stage timings, which the API omits).
async fn record(p: &Pipeline, id: &str) -> lipsync_schemas::TaskRecord {
    let topo = lipsync_tests::topology(&p.nats.config()).await.unwrap();
    let store = lipsync_runtime::TaskStore::new(topo.tasks.clone());
    store.get(id).await.unwrap().unwrap().0
}

fn span(r: &lipsync_schemas::TaskRecord, stage: &str) -> (f64, f64) {
    let t = &r.stages[stage];
    (t.started_at.unwrap(), t.finished_at.unwrap())
}

#[tokio::test]
async fn ten_tasks_share_one_gpu_in_submission_order() {
    let p = Pipeline::start().await.unwrap();
    p.media.face_clip("face.mp4", 1.2, 512, 512, 25, false);
    p.media.audio("voice.wav", 1.2);
    let mut ids = Vec::new();
    let mut positions = Vec::new();
    for _ in 0..10 {
        let v = p
            .submit(serde_json::json!({
                "video_url": p.media.url("face.mp4"),
                "audio_url": p.media.url("voice.wav"),
                "inference_steps": 4,
            }))
            .await
            .unwrap();
        positions.push(v["queue_position"].as_u64().unwrap());
        ids.push(v["task_id"].as_str().unwrap().to_owned());
    }
    // Positions are distinct and count the tasks ahead not yet on the GPU.
    let mut sorted = positions.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 10, "positions not distinct: {positions:?}");
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let q: serde_json::Value = reqwest::get(format!("{}/queue", p.base()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = q["queued_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    let order: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|i| listed.contains(i))
        .collect();
    assert_eq!(listed, order, "queue not in submission order");

    for id in &ids {
        let rec = p.wait_done(id, TASK_TIMEOUT).await.unwrap();
        assert_eq!(rec["status"], "completed", "{rec}");
    }
    let mut recs = Vec::new();
    for id in &ids {
        recs.push(record(&p, id).await);
    }
    // Only one task was in infer at any moment.
    let mut infer: Vec<(f64, f64)> = recs.iter().map(|r| span(r, "infer")).collect();
    infer.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in infer.windows(2) {
        assert!(w[0].1 <= w[1].0 + 1e-3, "infer overlapped: {w:?}");
    }
    // Face/audio work of some task ran while another task was on the GPU.
    let overlapped = recs.iter().any(|a| {
        let (fs, fe) = span(a, "face");
        let (as_, ae) = span(a, "audio");
        recs.iter().any(|b| {
            let (is, ie) = span(b, "infer");
            a.task_id != b.task_id && ((fs < ie && fe > is) || (as_ < ie && ae > is))
        })
    });
    assert!(overlapped, "preprocessing never overlapped inference");
    // Every task went through every stage exactly once.
    for r in &recs {
        for s in ["fetch", "face", "audio", "infer", "mux"] {
            assert_eq!(r.stages[s].attempts, 1, "{} {s}", r.task_id);
        }
    }
}

#[tokio::test]
async fn websocket_progress_rises_to_completion_then_closes() {
    use futures::StreamExt;
    let p = Pipeline::start().await.unwrap();
    p.media.face_clip("face.mp4", 1.2, 512, 512, 25, false);
    p.media.audio("voice.wav", 1.2);
    let id = p.submit_media("face.mp4", "voice.wav").await.unwrap();
    let url = format!("ws://127.0.0.1:{}/task/{id}/ws", p.gateway_port);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut progress = Vec::new();
    let mut last_status = String::new();
    let deadline = Instant::now() + TASK_TIMEOUT;
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline.into(), ws.next()).await {
        match msg.unwrap() {
            tokio_tungstenite::tungstenite::Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                progress.push(v["progress"].as_f64().unwrap());
                last_status = v["status"].as_str().unwrap().to_owned();
            }
            tokio_tungstenite::tungstenite::Message::Close(_) => break,
            _ => {}
        }
    }
    assert_eq!(last_status, "completed");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(*progress.last().unwrap(), 1.0);
    // Updates came through every band, not only the final one.
    assert!(
        progress.iter().any(|&x| x > 0.25 && x < 0.9),
        "{progress:?}"
    );
    assert!(progress.len() >= 5, "{progress:?}");
}

#[tokio::test]
async fn seed_guide_snippets_complete_against_the_whole_service() {
    let p = Pipeline::start().await.unwrap();
    p.media.face_clip("face.mp4", 1.2, 512, 512, 25, false);
    p.media.audio("voice.wav", 1.2);
    let work = tempfile::tempdir().unwrap();
    let python = std::env::var("LIPSYNC_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = lipsync_tests::workspace_root().join("tests/seed_client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args(["--base", &p.base()])
        .args(["--video-url", &p.media.url("face.mp4")])
        .args(["--audio-url", &p.media.url("voice.wav")])
        .args(["--until", "completed", "--poll-scale", "0.05"])
        .arg("--workdir")
        .arg(work.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("FINAL_STATUS=completed"), "{stdout}");
    // Snippet 3 saved both files; they are playable videos.
    for f in ["result_video.mp4", "result_mask.mp4", "result.mp4"] {
        let path = work.path().join(f);
        if path.exists() {
            let pr = probe(&path).unwrap();
            assert!(pr.frames > 0 && (pr.fps - 25.0).abs() < 0.01, "{f}: {pr:?}");
        }
    }
    assert!(
        work.path().join("result_mask.mp4").exists(),
        "mask not downloaded"
    );

    // Every binary exports its series after the run (with a `stage` label).
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TASK_ID="))
        .unwrap()
        .to_owned();
    assert_eq!(p.task(&id).await.unwrap()["status"], "completed");
    for s in ["fetch", "face", "audio", "infer", "mux"] {
        let m = p.metrics(s).await.unwrap();
        for series in [
            format!("lipsync_jobs_started_total{{stage=\"{s}\"}} 1"),
            format!("lipsync_jobs_succeeded_total{{stage=\"{s}\"}} 1"),
            format!("lipsync_job_duration_seconds_count{{stage=\"{s}\"}} 1"),
            format!("lipsync_jobs_in_flight{{stage=\"{s}\"}} 0"),
        ] {
            assert!(m.contains(&series), "{s} lacks `{series}`:\n{m}");
        }
    }
    let infer = p.metrics("infer").await.unwrap();
    for name in [
        "lipsync_infer_steps_per_second",
        "lipsync_infer_seconds_per_output_second",
        "lipsync_infer_idle_seconds_total",
    ] {
        assert!(infer.contains(name), "infer lacks {name}");
    }
    let gw = reqwest::get(format!("{}/metrics", p.base()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "lipsync_http_requests_total",
        "lipsync_tasks_submitted_total",
        "lipsync_queue_length",
        "lipsync_stage_backlog",
    ] {
        assert!(gw.contains(name), "gateway lacks {name}");
    }
}
