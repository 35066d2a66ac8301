//! The real `lipsync-infer` binary killed with SIGKILL in the middle of a job: the job is
//! redelivered after the ack wait, runs again from the start and completes exactly once.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use lipsync_infer::synthetic;
use lipsync_runtime::NatsArtifacts;
use lipsync_runtime::tasks::TaskStore;
use lipsync_schemas::{Status, TaskRecord, names};
use lipsync_tests::{NatsServer, new_record, pattern_clip, topology, wait_for, workspace_root};

fn spawn(nats: &NatsServer) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lipsync-infer"))
        .env("LIPSYNC_NATS__URL", nats.url())
        .env("LIPSYNC_NATS__ACK_WAIT_S", "8")
        .env("LIPSYNC_INFER__LISTEN", "127.0.0.1:0")
        .env("LIPSYNC_MODELS__PROFILE", "tiny")
        .env(
            "LIPSYNC_MODELS__MANIFEST",
            workspace_root().join("models/manifest.toml"),
        )
        .env("LIPSYNC_RUNNER__PROGRESS_INTERVAL_MS", "0")
        .env("LIPSYNC_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("lipsync-infer binary")
}

async fn wait(store: &TaskStore, tid: &str, pred: impl Fn(&TaskRecord) -> bool) -> TaskRecord {
    let pred = &pred;
    wait_for(Duration::from_secs(120), || async move {
        let (r, _) = store.get(tid).await.ok()??;
        pred(&r).then_some(r)
    })
    .await
    .unwrap_or_else(|e| panic!("task {tid}: {e}"))
}

#[tokio::test]
async fn sigkill_mid_job_is_redelivered_and_completes_once() {
    let nats = NatsServer::start().await.unwrap();
    let mut cfg = nats.config();
    // 8 s: the stall limit (0.75 x ack_wait) leaves room for a loaded machine's slow
    // start of a job; redelivery after the kill waits that long too.
    cfg.nats.ack_wait_s = 8;
    let topo = topology(&cfg).await.unwrap();
    let store = TaskStore::new(topo.tasks.clone());
    let artifacts = NatsArtifacts::new(topo.artifacts.clone());

    let dir = tempfile::tempdir().unwrap();
    let video = pattern_clip(dir.path(), 160, 120, 16);
    let track = synthetic::face_track(160, 120, 16, 210, 280, 256);
    let features = synthetic::features(24, 3);

    let mut child = spawn(&nats);
    let tid = uuid::Uuid::new_v4().to_string();
    let mut rec = new_record(&tid);
    rec.request.inference_steps = 40;
    store.create(&rec).await.unwrap();
    let job = synthetic::store_inputs(&artifacts, &tid, &video, &track, &features)
        .await
        .unwrap();
    lipsync_runtime::publish_work(&topo.js, &job).await.unwrap();

    // Kill it after a few denoising steps.
    wait(&store, &tid, |r| r.progress > 0.26).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_at = store.get(&tid).await.unwrap().unwrap().0;
    assert!(
        killed_at
            .stages
            .get("infer")
            .is_some_and(|t| t.finished_at.is_none())
    );

    let mut child = spawn(&nats);
    let done = wait(&store, &tid, |r| {
        r.status.is_terminal()
            || r.stages
                .get("infer")
                .is_some_and(|t| t.finished_at.is_some())
    })
    .await;
    assert_eq!(done.status, Status::Processing, "{:?}", done.error);
    assert!(done.stages["infer"].attempts >= 2, "{:?}", done.stages);
    assert!(done.progress >= killed_at.progress);

    // Exactly one mux job, with the full output length.
    let stream = topo.js.get_stream(names::WORK_STREAM).await.unwrap();
    let mut info = stream.info_with_subjects("lipsync.work.mux").await.unwrap();
    let mut n = 0;
    while let Some(Ok((_, count))) = info.next().await {
        n += count;
    }
    assert_eq!(n, 1);
    let msg = stream
        .get_last_raw_message_by_subject("lipsync.work.mux")
        .await
        .unwrap();
    let mux: lipsync_schemas::MuxJob = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(mux.output_frames, 24);
    let info = lipsync_runtime::ArtifactStore::info(&artifacts, &mux.crops)
        .await
        .unwrap()
        .expect("crops stored");
    assert!(info.size > 0);
    let _ = child.kill();
    let _ = child.wait();
}
