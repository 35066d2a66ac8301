//! The face stage on a real nats-server: the track artifact and the join, typed failures
//! (no face with its frame, unreadable media), and a SIGKILL of the real binary mid-job
//! that ends, after redelivery, in exactly one track and one infer job.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Place, no_face_clip, render, root};
use futures::TryStreamExt;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{ArtifactStore, NatsArtifacts};
use lipsync_schemas::{ErrorCode, FaceJob, FaceTrack, Stage, Status, TaskRecord, names};
use lipsync_tests::{NatsServer, new_record, topology, wait_for};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

struct Env {
    nats: NatsServer,
    cfg: lipsync_runtime::Config,
    store: TaskStore,
    artifacts: NatsArtifacts,
    js: async_nats::jetstream::Context,
}

impl Env {
    async fn new() -> Self {
        let nats = NatsServer::start().await.unwrap();
        let mut cfg = nats.config();
        cfg.face.listen = "127.0.0.1:0".parse().unwrap();
        cfg.face.models_dir = root().join("models/generated/face");
        cfg.face.det_size = 320;
        cfg.models.manifest = root().join("models/manifest.toml");
        cfg.models.profile = "tiny".into();
        cfg.nats.ack_wait_s = 3;
        let topo = topology(&cfg).await.unwrap();
        Self {
            store: TaskStore::new(topo.tasks.clone()),
            artifacts: NatsArtifacts::new(topo.artifacts.clone()),
            js: topo.js.clone(),
            nats,
            cfg,
        }
    }

    /// Creates a task whose audio part is already done, stores `video` and publishes
    /// the face job.
    async fn submit(&self, video: &Path) -> String {
        let tid = uuid::Uuid::new_v4().to_string();
        let mut rec = new_record(&tid);
        lipsync_tests::set_done(&mut rec, Stage::Audio, names::artifact::AUDIO_FEATURES);
        self.store.create(&rec).await.unwrap();
        let key = names::artifact_key(&tid, names::artifact::VIDEO);
        self.artifacts.put_file(&key, video).await.unwrap();
        lipsync_runtime::publish_work(
            &self.js,
            &FaceJob {
                v: 1,
                task_id: tid.clone(),
                video: key,
                video_stream: None,
            },
        )
        .await
        .unwrap();
        tid
    }

    async fn wait_record(
        &self,
        tid: &str,
        secs: u64,
        pred: impl Fn(&TaskRecord) -> bool,
    ) -> TaskRecord {
        lipsync_tests::wait_record(&self.store, tid, Duration::from_secs(secs), pred)
            .await
            .unwrap()
    }

    async fn track(&self, tid: &str) -> FaceTrack {
        let key =
            lipsync_tests::output_key(&self.store, tid, Stage::Face, names::artifact::FACE_TRACK)
                .await;
        let mut body = Vec::new();
        self.artifacts
            .get(&key)
            .await
            .unwrap()
            .read_to_end(&mut body)
            .await
            .unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    async fn infer_jobs(&self) -> u64 {
        let stream = self.js.get_stream(names::WORK_STREAM).await.unwrap();
        let subject = names::work_subject(Stage::Infer);
        let mut info = stream.info_with_subjects(&subject).await.unwrap();
        let mut n = 0;
        while let Some((s, count)) = info.try_next().await.unwrap() {
            if s == subject {
                n += count as u64;
            }
        }
        n
    }
}

fn face_clip(dir: &Path, frames: usize) -> std::path::PathBuf {
    render(dir, "face.mp4", 400, 400, frames, |i| {
        Some(Place::at(0.75, 5.0 + i as f64, 10.0))
    })
}

#[tokio::test]
async fn stage_stores_the_track_and_publishes_infer_once() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let video = face_clip(dir.path(), 12);
    let shutdown = CancellationToken::new();
    let server = lipsync_face::start(&env.cfg, shutdown.clone())
        .await
        .unwrap();

    let tid = env.submit(&video).await;
    let rec = env.wait_record(&tid, 60, |r| r.join.face_done).await;
    assert!(rec.join.infer_published);
    let track = env.track(&tid).await;
    assert_eq!(
        (track.width, track.height, track.frame_count),
        (400, 400, 12)
    );
    assert_eq!(
        (track.crop_w, track.crop_h, track.resolution),
        (210, 280, 256)
    );
    assert!(track.frames.iter().all(|f| f.present));
    wait_for(Duration::from_secs(10), || async {
        (env.infer_jobs().await == 1).then_some(())
    })
    .await
    .unwrap();

    shutdown.cancel();
    server.wait().await.unwrap();
}

#[tokio::test]
async fn no_face_and_unreadable_media_fail_with_typed_errors() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let server = lipsync_face::start(&env.cfg, shutdown.clone())
        .await
        .unwrap();

    let tid = env.submit(&no_face_clip(dir.path(), 4)).await;
    let rec = env
        .wait_record(&tid, 60, |r| r.status == Status::Failed)
        .await;
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::NoFaceDetected);
    assert_eq!(err.frame_index, Some(0));
    assert_eq!(err.time_s, Some(0.0));

    let text = dir.path().join("text.mp4");
    std::fs::write(&text, b"no video here\n".repeat(100)).unwrap();
    let tid = env.submit(&text).await;
    let rec = env
        .wait_record(&tid, 60, |r| r.status == Status::Failed)
        .await;
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::UnsupportedMedia, "{}", err.message);
    assert!(
        !err.message.contains("/tmp"),
        "no server paths: {}",
        err.message
    );
    assert_eq!(env.infer_jobs().await, 0);

    shutdown.cancel();
    server.wait().await.unwrap();
}

fn spawn_binary(env: &Env, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_lipsync-face"))
        .env("LIPSYNC_NATS__URL", env.nats.url())
        .env("LIPSYNC_NATS__ACK_WAIT_S", "3")
        .env("LIPSYNC_FACE__LISTEN", "127.0.0.1:0")
        .env(
            "LIPSYNC_FACE__MODELS_DIR",
            root().join("models/generated/face"),
        )
        .env("LIPSYNC_FACE__DET_SIZE", "320")
        .env("LIPSYNC_FACE__BATCH_SIZE", "4")
        .env(
            "LIPSYNC_MODELS__MANIFEST",
            root().join("models/manifest.toml"),
        )
        .env("LIPSYNC_MODELS__PROFILE", "tiny")
        .env("LIPSYNC_RUNNER__PROGRESS_INTERVAL_MS", "0")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("lipsync-face binary starts")
}

#[tokio::test]
async fn sigkill_mid_job_is_redelivered_and_completes_once() {
    let env = Env::new().await;
    let dir = tempfile::tempdir().unwrap();
    let video = face_clip(dir.path(), 150);
    let log = dir.path().join("face.log");
    let mut child = spawn_binary(&env, &log);

    let tid = env.submit(&video).await;
    // Wait until the binary is tracking, then kill it without warning.
    let seen = wait_for(Duration::from_secs(60), || async {
        let (r, _) = env.store.get(&tid).await.ok()??;
        r.message.contains("tracking faces: frame").then_some(())
    })
    .await;
    if seen.is_err() {
        let _ = child.kill();
        panic!(
            "binary never reported progress: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let rec = env.store.get(&tid).await.unwrap().unwrap().0;
    assert!(!rec.join.face_done, "killed before finishing");

    // A fresh worker picks the job up after ack_wait and finishes it.
    let shutdown = CancellationToken::new();
    let server = lipsync_face::start(&env.cfg, shutdown.clone())
        .await
        .unwrap();
    let rec = env.wait_record(&tid, 120, |r| r.join.face_done).await;
    assert_ne!(rec.status, Status::Failed, "{:?}", rec.error);
    let track = env.track(&tid).await;
    assert_eq!(track.frame_count, 150);
    assert!(track.frames.iter().all(|f| f.present));
    wait_for(Duration::from_secs(10), || async {
        (env.infer_jobs().await == 1).then_some(())
    })
    .await
    .unwrap();
    // The face message is settled (acked, nothing pending) and one infer job exists.
    wait_for(Duration::from_secs(20), || async {
        let stream = env.js.get_stream(names::WORK_STREAM).await.ok()?;
        let info = stream.consumer_info("face").await.ok()?;
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(env.infer_jobs().await, 1);

    shutdown.cancel();
    server.wait().await.unwrap();
}
