//! Scale-out end to end with the real binaries: two replicas of face, infer and mux
//! share the work, the admission limit refuses only at the entry (every accepted task
//! completes), a SIGKILLed infer replica's job finishes on the survivor, and a job whose
//! every delivery crashes ends its task even when no replica was alive to see it.

use std::collections::BTreeMap;
use std::time::Duration;

use lipsync_schemas::{Stage, names};
use lipsync_tests::pipeline::Pipeline;
use lipsync_tests::wait_for;

const TIMEOUT: Duration = Duration::from_secs(300);

/// A stage metric's value in one process (0 when unreachable or absent).
async fn metric(http: &reqwest::Client, ops: &str, name: &str, stage: &str) -> f64 {
    let Ok(r) = http.get(format!("{ops}/metrics")).send().await else {
        return 0.0;
    };
    let body = r.text().await.unwrap_or_default();
    lipsync_tests::metric_value(&body, &format!("{name}{{stage=\"{stage}\"}}"))
}

async fn in_flight(http: &reqwest::Client, ops: &str, stage: &str) -> f64 {
    metric(http, ops, "lipsync_jobs_in_flight", stage).await
}

async fn succeeded(http: &reqwest::Client, ops: &str, stage: &str) -> f64 {
    metric(http, ops, "lipsync_jobs_succeeded_total", stage).await
}

async fn record(p: &Pipeline, id: &str) -> lipsync_schemas::TaskRecord {
    let topo = lipsync_tests::topology(&p.nats.config()).await.unwrap();
    let store = lipsync_runtime::TaskStore::new(topo.tasks.clone());
    store.get(id).await.unwrap().unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_work_admission_refuses_at_the_entry_and_a_kill_loses_nothing() {
    let mut p = Pipeline::start_with(&[
        ("LIPSYNC_NATS__MAX_QUEUED_JOBS", "6"),
        ("LIPSYNC_FACE__CONCURRENCY", "1"),
        ("LIPSYNC_MUX__CONCURRENCY", "1"),
    ])
    .await
    .unwrap();
    for s in ["face", "infer", "mux"] {
        p.spawn(s).unwrap();
        p.wait_all_ready(s).await.unwrap();
    }
    p.media.face_clip("face.mp4", 2.0, 512, 512, 25, false);
    p.media.audio("voice.wav", 2.0);
    let http = reqwest::Client::new();

    // Twice as many tasks as the admission limit, as fast as possible.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..12 {
        let r = http
            .post(format!("{}/sync", p.base()))
            .json(&serde_json::json!({
                "video_url": p.media.url("face.mp4"),
                "audio_url": p.media.url("voice.wav"),
                "inference_steps": 30,
                "seed": 3,
            }))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body: serde_json::Value = r.json().await.unwrap();
        match status {
            200 => accepted.push(body["task_id"].as_str().unwrap().to_owned()),
            503 => {
                assert_eq!(body["error"]["code"], "queue_full", "{body}");
                refused += 1;
            }
            other => panic!("POST /sync answered {other}: {body}"),
        }
    }
    assert!(refused > 0, "the admission limit never refused");
    assert!(accepted.len() >= 3, "only {} accepted", accepted.len());

    // Watch the replicas: both of a stage busy at the same moment, and the queue view.
    let mut both_busy: BTreeMap<&str, bool> = BTreeMap::new();
    let mut killed = false;
    let mut queue_checked = false;
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let mut done = 0;
        for id in &accepted {
            let t = p.task(id).await.unwrap();
            if matches!(t["status"].as_str(), Some("completed" | "failed")) {
                done += 1;
            }
        }
        if done == accepted.len() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "tasks did not finish");
        for stage in ["face", "infer"] {
            let ops = p.replica_ops(stage);
            if ops.len() == 2
                && in_flight(&http, &ops[0], stage).await > 0.0
                && in_flight(&http, &ops[1], stage).await > 0.0
            {
                both_busy.insert(stage, true);
                if stage == "infer" && !queue_checked {
                    // Two tasks on the GPU (one per replica): the queue says processing
                    // and numbers the waiting ones from 0.
                    let q = p.queue().await.unwrap();
                    assert_eq!(q["is_processing"], true, "{q}");
                    let positions: Vec<u64> = q["queued_tasks"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t["position"].as_u64().unwrap())
                        .collect();
                    assert_eq!(positions, (0..positions.len() as u64).collect::<Vec<_>>());
                    assert_eq!(q["queue_length"].as_u64().unwrap(), positions.len() as u64);
                    queue_checked = true;
                }
            }
        }
        // SIGKILL the first infer replica while it holds a job (after both were busy).
        if !killed && both_busy.get("infer") == Some(&true) {
            let ops = p.replica_ops("infer");
            if in_flight(&http, &ops[0], "infer").await > 0.0 {
                p.kill_replica("infer", 0);
                killed = true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        both_busy.get("face"),
        Some(&true),
        "face replicas never overlapped"
    );
    assert_eq!(
        both_busy.get("infer"),
        Some(&true),
        "infer replicas never overlapped"
    );
    assert!(killed, "no moment to kill an infer replica mid-job");

    // Every accepted task completed once; the killed job was redelivered.
    let mut redelivered = 0;
    for id in &accepted {
        let t = p.task(id).await.unwrap();
        assert_eq!(t["status"], "completed", "{t}");
        let r = record(&p, id).await;
        assert_eq!(r.stages["mux"].attempts, 1, "mux ran twice: {:?}", r.stages);
        if r.stages["infer"].attempts >= 2 {
            redelivered += 1;
        }
    }
    assert_eq!(redelivered, 1, "exactly the killed job ran again");
    // Both mux replicas (and the surviving infer) served tasks.
    for ops in p.replica_ops("mux") {
        assert!(
            succeeded(&http, &ops, "mux").await > 0.0,
            "{ops} served nothing"
        );
    }
    for ops in p.replica_ops("face") {
        assert!(
            succeeded(&http, &ops, "face").await > 0.0,
            "{ops} served nothing"
        );
    }
    let q = p.queue().await.unwrap();
    assert_eq!(q["queue_length"], 0, "{q}");
    assert_eq!(q["is_processing"], false, "{q}");
}

/// Messages on `subject` in `stream`.
async fn count(js: &async_nats::jetstream::Context, stream: &str, subject: &str) -> u64 {
    use futures::TryStreamExt;
    let stream = js.get_stream(stream).await.unwrap();
    let mut info = stream.info_with_subjects(subject).await.unwrap();
    let mut n = 0;
    while let Some((_, c)) = info.try_next().await.unwrap() {
        n += c as u64;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_every_delivery_crashes_fails_its_task() {
    let mut p = Pipeline::start_with(&[("LIPSYNC_NATS__MAX_DELIVER", "2")])
        .await
        .unwrap();
    p.media.face_clip("face.mp4", 6.0, 512, 512, 25, false);
    p.media.audio("voice.wav", 6.0);
    let id = p.submit_media("face.mp4", "voice.wav").await.unwrap();
    for attempt in 1..=2u32 {
        wait_for(TIMEOUT, || async {
            let r = record(&p, &id).await;
            r.stages
                .get("face")
                .is_some_and(|t| t.attempts == attempt && t.done.is_none())
                .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("face attempt {attempt} never ran: {e}"));
        p.kill("face");
        if attempt == 1 {
            p.spawn("face").unwrap();
            p.wait_ready("face").await.unwrap();
        }
    }
    // No stage process at all is alive when the last delivery's lease runs out.
    for s in ["fetch", "audio", "infer", "mux"] {
        p.kill(s);
    }
    // Past the last lease (ack_wait 8 s) with nobody alive: nothing can have ended it.
    // JetStream gives up on the message when a replica asks for work again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(
        record(&p, &id).await.status,
        lipsync_schemas::Status::Processing
    );
    let js = async_nats::jetstream::new(p.nats.client().await.unwrap());

    // The first stage process to come back ends the task.
    p.spawn("face").unwrap();
    p.wait_ready("face").await.unwrap();
    let t = p.wait_done(&id, TIMEOUT).await.unwrap();
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["error"]["code"], "retries_exhausted", "{t}");
    let face = names::work_subject(Stage::Face);
    wait_for(Duration::from_secs(10), || {
        let js = js.clone();
        let face = face.clone();
        async move { (count(&js, names::WORK_STREAM, &face).await == 0).then_some(()) }
    })
    .await
    .expect("the exhausted message stayed in the work stream");
    // The reaper removes the advisory just after it failed the task.
    wait_for(Duration::from_secs(10), || {
        let js = js.clone();
        async move {
            (count(
                &js,
                names::ADVISORY_STREAM,
                names::MAX_DELIVERIES_ADVISORIES,
            )
            .await
                == 0)
                .then_some(())
        }
    })
    .await
    .expect("the advisory was handled");
    let r = record(&p, &id).await;
    assert!(
        r.artifacts.is_empty() || {
            let store = p.artifacts().await.unwrap();
            let mut any = false;
            for k in &r.artifacts {
                any |= store.info(k).await.unwrap().is_some();
            }
            !any
        },
        "the failed task kept its artifacts: {:?}",
        r.artifacts
    );
    // On S3 the bucket itself can be listed: no object of the task is left, whether its
    // record named it or not.
    if let Some(s3) = &p.s3 {
        let keys = s3.store().unwrap().keys().await.unwrap();
        let left: Vec<&String> = keys.iter().filter(|k| k.starts_with(&id)).collect();
        assert!(left.is_empty(), "objects of the failed task left: {left:?}");
    }
}
