//! The infer stage against a real nats-server with the `tiny` model profile and a real
//! clip (ffmpeg test pattern, synthetic face track, random audio features): a task runs
//! through to a mux job, progress rises per step, seeds reproduce bit for bit, the audio
//! changes the crops, and cancellation stops the job.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use lipsync_infer::synthetic;
use lipsync_runtime::features::AudioFeatures;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{ArtifactStore, NatsArtifacts, StageServer};
use lipsync_schemas::{FaceTrack, MuxJob, Stage, Status, TaskRecord, names};
use lipsync_tests::{NatsServer, new_record, pattern_clip, topology, wait_for, workspace_root};
use tokio_util::sync::CancellationToken;

const W: u32 = 160;
const H: u32 = 120;

struct Env {
    _nats: NatsServer,
    _dir: tempfile::TempDir,
    store: TaskStore,
    artifacts: NatsArtifacts,
    js: async_nats::jetstream::Context,
    kv: async_nats::jetstream::kv::Store,
    video: PathBuf,
    video_frames: usize,
    stage: StageServer,
    shutdown: CancellationToken,
}

async fn env(video_frames: usize) -> Env {
    let nats = NatsServer::start().await.unwrap();
    let mut cfg = nats.config();
    cfg.models.profile = "tiny".into();
    cfg.models.manifest = workspace_root().join("models/manifest.toml");
    cfg.infer.listen = "127.0.0.1:0".parse().unwrap();
    let topo = topology(&cfg).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let video = pattern_clip(dir.path(), W, H, video_frames);
    let shutdown = CancellationToken::new();
    let stage = lipsync_infer::start(&cfg, shutdown.clone()).await.unwrap();
    Env {
        store: TaskStore::new(topo.tasks.clone()),
        artifacts: NatsArtifacts::new(topo.artifacts.clone()),
        js: topo.js.clone(),
        kv: topo.tasks.clone(),
        _nats: nats,
        _dir: dir,
        video,
        video_frames,
        stage,
        shutdown,
    }
}

impl Env {
    fn track(&self) -> FaceTrack {
        synthetic::face_track(W, H, self.video_frames, 210, 280, 256)
    }

    async fn submit(
        &self,
        steps: u32,
        seed: Option<u64>,
        track: &FaceTrack,
        features: &AudioFeatures,
    ) -> String {
        let tid = uuid::Uuid::new_v4().to_string();
        let mut rec = new_record(&tid);
        rec.request.inference_steps = steps;
        rec.request.seed = seed;
        self.store.create(&rec).await.unwrap();
        let job = synthetic::store_inputs(&self.artifacts, &tid, &self.video, track, features)
            .await
            .unwrap();
        lipsync_runtime::publish_work(&self.js, &job).await.unwrap();
        tid
    }

    async fn wait(&self, tid: &str, pred: impl Fn(&TaskRecord) -> bool) -> TaskRecord {
        let pred = &pred;
        wait_for(Duration::from_secs(120), || async move {
            let (r, _) = self.store.get(tid).await.ok()??;
            pred(&r).then_some(r)
        })
        .await
        .unwrap_or_else(|e| panic!("task {tid}: {e}"))
    }

    async fn done(&self, tid: &str) -> TaskRecord {
        self.wait(tid, |r| {
            r.status == Status::Failed
                || r.stages
                    .get("infer")
                    .is_some_and(|t| t.finished_at.is_some())
        })
        .await
    }

    /// The mux jobs waiting in the work stream (nothing consumes them here).
    async fn mux_jobs(&self) -> Vec<MuxJob> {
        let stream = self.js.get_stream(names::WORK_STREAM).await.unwrap();
        let mut info = stream.info_with_subjects("lipsync.work.mux").await.unwrap();
        let mut n = 0;
        while let Some(Ok((_, count))) = info.next().await {
            n += count;
        }
        let mut jobs = Vec::new();
        if n > 0 {
            let msg = stream
                .get_last_raw_message_by_subject("lipsync.work.mux")
                .await
                .unwrap();
            let last: MuxJob = serde_json::from_slice(&msg.payload).unwrap();
            // Older ones are not needed by these tests; count them as copies of the last.
            jobs = vec![last; n];
        }
        jobs
    }

    /// Decoded RGB24 crops of a task.
    async fn crops(&self, tid: &str) -> Vec<u8> {
        let file = self._dir.path().join(format!("{tid}.mkv"));
        self.artifacts
            .get_to_file(
                &lipsync_tests::output_key(&self.store, tid, Stage::Infer, names::artifact::CROPS)
                    .await,
                &file,
            )
            .await
            .unwrap();
        let out = Command::new("ffmpeg")
            .args(["-nostdin", "-v", "error", "-i"])
            .arg(&file)
            .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.stage.wait().await.unwrap();
    }
}

#[tokio::test]
async fn runs_a_task_to_mux_with_progress_per_step() {
    let e = env(20).await;
    // 40 output frames from 20 video frames: ping-pong, 3 chunks (16, 16, 8).
    let features = synthetic::features(40, 1);
    let mut track = e.track();
    track.frames[3].present = false;
    let tid = uuid::Uuid::new_v4().to_string();
    let mut watch = e.kv.watch(&tid).await.unwrap();
    let progress = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some(Ok(entry)) = watch.next().await {
            let Ok(r) = serde_json::from_slice::<TaskRecord>(&entry.value) else {
                continue;
            };
            seen.push(r.progress);
            if r.stages
                .get("infer")
                .is_some_and(|t| t.finished_at.is_some())
                || r.status.is_terminal()
            {
                break;
            }
        }
        seen
    });
    // Same submission path as `submit`, with the id watched above and no seed.
    let mut rec = new_record(&tid);
    rec.request.inference_steps = 3;
    rec.request.seed = None;
    e.store.create(&rec).await.unwrap();
    let job = synthetic::store_inputs(&e.artifacts, &tid, &e.video, &track, &features)
        .await
        .unwrap();
    lipsync_runtime::publish_work(&e.js, &job).await.unwrap();

    let rec = e.done(&tid).await;
    assert_eq!(rec.status, Status::Processing, "{:?}", rec.error);
    assert_eq!(rec.request.seed, Some(1247), "default seed recorded");
    assert!(
        rec.warnings
            .iter()
            .any(|w| w.contains("random test weights")),
        "{:?}",
        rec.warnings
    );
    assert!((rec.progress - 0.90).abs() < 1e-9, "{}", rec.progress);

    let seen = tokio::time::timeout(Duration::from_secs(10), progress)
        .await
        .unwrap()
        .unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {seen:?}"
    );
    let mut steps: Vec<f64> = seen
        .iter()
        .copied()
        .filter(|p| *p > 0.25 && *p < 0.90)
        .collect();
    steps.dedup();
    // 3 chunks x 3 steps, minus the last (0.90), each a distinct value.
    assert!(steps.len() >= 8, "{seen:?}");

    let jobs = e.mux_jobs().await;
    assert_eq!(jobs.len(), 1);
    let mux = &jobs[0];
    assert_eq!(mux.task_id, tid);
    assert_eq!(mux.output_frames, 40);
    assert_eq!(mux.length_mode, lipsync_schemas::LengthMode::Pingpong);
    assert_eq!(
        mux.crops,
        names::attempt_key(&tid, Stage::Infer, 1, names::artifact::CROPS)
    );
    assert_eq!(mux.video, job.video);
    assert_eq!(
        mux.audio_16k,
        names::artifact_key(&tid, names::artifact::AUDIO_16K)
    );
    assert_eq!(e.crops(&tid).await.len(), 40 * 256 * 256 * 3);
    assert!(rec.artifacts.contains(&mux.crops));
    e.stop().await;
}

#[tokio::test]
async fn same_seed_same_crops_other_audio_other_crops() {
    let e = env(16).await;
    let track = e.track();
    let audio_x = synthetic::features(16, 1);
    let audio_y = synthetic::features(16, 2);
    let a = e.submit(2, Some(99), &track, &audio_x).await;
    let b = e.submit(2, Some(99), &track, &audio_x).await;
    let c = e.submit(2, Some(99), &track, &audio_y).await;
    for t in [&a, &b, &c] {
        let r = e.done(t).await;
        assert_eq!(r.status, Status::Processing, "{:?}", r.error);
    }
    let (ca, cb, cc) = (e.crops(&a).await, e.crops(&b).await, e.crops(&c).await);
    assert_eq!(ca.len(), 16 * 256 * 256 * 3);
    assert!(ca == cb, "same seed and inputs gave different crops");
    let differing = ca.iter().zip(&cc).filter(|(x, y)| x != y).count();
    assert!(
        differing > ca.len() / 100,
        "other audio changed only {differing} bytes"
    );
    e.stop().await;
}

#[tokio::test]
async fn cancellation_stops_the_job() {
    let e = env(16).await;
    let track = e.track();
    let features = synthetic::features(16, 1);
    // 500 steps: minutes of work if it were not stopped.
    let long = e.submit(500, Some(1), &track, &features).await;
    e.wait(&long, |r| r.progress > 0.2510).await;
    e.store.cancel(&long).await.unwrap();
    // The single GPU worker is free again: a short task behind it runs to the end.
    let short = e.submit(1, Some(1), &track, &features).await;
    let r = e.done(&short).await;
    assert_eq!(r.status, Status::Processing, "{:?}", r.error);

    let long_rec = e.store.get(&long).await.unwrap().unwrap().0;
    assert_eq!(long_rec.status, Status::Failed);
    assert!(long_rec.progress < 0.5, "{}", long_rec.progress);
    let crops = names::attempt_key(&long, Stage::Infer, 1, names::artifact::CROPS);
    assert!(e.artifacts.info(&crops).await.unwrap().is_none());
    let jobs = e.mux_jobs().await;
    assert_eq!(jobs.len(), 1, "only the short task reached mux");
    assert_eq!(jobs[0].task_id, short);
    e.stop().await;
}

#[tokio::test]
async fn a_task_for_another_model_fails_typed() {
    let e = env(16).await;
    let track = e.track();
    let features = synthetic::features(16, 1);
    let tid = e.submit(2, Some(1), &track, &features).await;
    // A second task whose record names a profile this stage does not run.
    let other = uuid::Uuid::new_v4().to_string();
    let mut rec = new_record(&other);
    rec.request.model = "latentsync-1.6".into();
    e.store.create(&rec).await.unwrap();
    let job = synthetic::store_inputs(&e.artifacts, &other, &e.video, &track, &features)
        .await
        .unwrap();
    lipsync_runtime::publish_work(&e.js, &job).await.unwrap();
    let r = e.wait(&other, |r| r.status == Status::Failed).await;
    let err = r.error.unwrap();
    assert_eq!(err.code, lipsync_schemas::ErrorCode::ModelUnavailable);
    assert!(err.message.contains("latentsync-1.6"), "{}", err.message);
    assert_eq!(e.done(&tid).await.status, Status::Processing);
    e.stop().await;
}
