//! The face/audio join under a race: face and audio finishing at the same moment must
//! yield exactly one inference job per task. Two stage runners (face and audio) run
//! in-process with test handlers that meet at a per-task barrier and then return their
//! join outcome together; the inference queue is read back afterwards.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{Change, Handler, JobCtx, JobError, Outcome, StageSpec};
use lipsync_schemas::{AudioJob, FaceJob, InferJob, Stage, StageDone, WORK_VERSION, names};
use lipsync_tests::{NatsServer, new_record, topology, wait_for};
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;

/// Per-task barriers.
#[derive(Default)]
struct Meeting {
    barriers: Mutex<HashMap<String, Arc<Barrier>>>,
}

impl Meeting {
    fn barrier(&self, task: &str) -> Arc<Barrier> {
        self.barriers
            .lock()
            .unwrap()
            .entry(task.to_owned())
            .or_insert_with(|| Arc::new(Barrier::new(2)))
            .clone()
    }

    async fn complete(&self, ctx: &JobCtx, part: Stage) -> Result<Outcome, JobError> {
        self.barrier(&ctx.task_id).wait().await;
        let name = match part {
            Stage::Face => names::artifact::FACE_TRACK,
            _ => names::artifact::AUDIO_FEATURES,
        };
        Ok(Outcome::join([(name, ctx.artifact_key(name))]))
    }
}

struct FakeFace(Arc<Meeting>);
struct FakeAudio(Arc<Meeting>);

#[async_trait]
impl Handler for FakeFace {
    type Job = FaceJob;
    async fn handle(&self, ctx: JobCtx, _job: FaceJob) -> Result<Outcome, JobError> {
        self.0.complete(&ctx, Stage::Face).await
    }
}

#[async_trait]
impl Handler for FakeAudio {
    type Job = AudioJob;
    async fn handle(&self, ctx: JobCtx, _job: AudioJob) -> Result<Outcome, JobError> {
        self.0.complete(&ctx, Stage::Audio).await
    }
}

/// Every inference job in the work stream (read without consuming).
async fn infer_jobs(js: &async_nats::jetstream::Context) -> Vec<InferJob> {
    let stream = js.get_stream(names::WORK_STREAM).await.unwrap();
    let subject = names::work_subject(Stage::Infer);
    let mut out = Vec::new();
    let mut seq = 1;
    while let Ok(m) = stream.get_first_raw_message_by_subject(&subject, seq).await {
        out.push(serde_json::from_slice(&m.payload).unwrap());
        seq = m.sequence + 1;
    }
    out
}

fn spec(name: &'static str, concurrency: usize) -> StageSpec {
    StageSpec {
        name,
        listen: "127.0.0.1:0".parse().unwrap(),
        concurrency,
        device: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simultaneous_face_and_audio_publish_one_infer_job() {
    let nats = NatsServer::start().await.unwrap();
    let cfg = nats.config();
    let topo = topology(&cfg).await.unwrap();
    let store = TaskStore::new(topo.tasks.clone());
    let meeting = Arc::new(Meeting::default());
    let shutdown = CancellationToken::new();
    // Both stages take many tasks at once, so each barrier meets its partner quickly.
    let tasks = 40;
    let face = lipsync_runtime::start_stage(
        &cfg,
        spec("test-face", tasks),
        FakeFace(meeting.clone()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let audio = lipsync_runtime::start_stage(
        &cfg,
        spec("test-audio", tasks),
        FakeAudio(meeting.clone()),
        shutdown.clone(),
    )
    .await
    .unwrap();

    let mut ids = Vec::new();
    for _ in 0..tasks {
        let tid = uuid::Uuid::new_v4().to_string();
        store.create(&new_record(&tid)).await.unwrap();
        // Fetch is done: its video is what the inference job will name.
        store
            .update(&tid, |r| {
                r.stages.entry("fetch".into()).or_default().done = Some(StageDone {
                    outputs: [(
                        names::artifact::VIDEO.to_owned(),
                        names::artifact_key(&tid, names::artifact::VIDEO),
                    )]
                    .into(),
                    next: Vec::new(),
                });
                Change::Write
            })
            .await
            .unwrap();
        let face_job = FaceJob {
            v: WORK_VERSION,
            task_id: tid.clone(),
            video: names::artifact_key(&tid, names::artifact::VIDEO),
            video_stream: None,
        };
        let audio_job = AudioJob {
            v: WORK_VERSION,
            task_id: tid.clone(),
            audio_16k: names::artifact_key(&tid, names::artifact::AUDIO_16K),
        };
        let (a, b) = tokio::join!(
            lipsync_runtime::publish_work(&topo.js, &face_job),
            lipsync_runtime::publish_work(&topo.js, &audio_job)
        );
        a.unwrap();
        b.unwrap();
        ids.push(tid);
    }

    for tid in &ids {
        let s = store.clone();
        let tid = tid.clone();
        wait_for(Duration::from_secs(60), move || {
            let s = s.clone();
            let tid = tid.clone();
            async move {
                let (r, _) = s.get(&tid).await.ok()??;
                (r.join.face_done && r.join.audio_done && r.join.infer_published).then_some(())
            }
        })
        .await
        .unwrap();
    }

    // The queue holds exactly one inference job per task, naming both parts' outputs.
    let jobs = infer_jobs(&topo.js).await;
    assert_eq!(jobs.len(), ids.len());
    for tid in &ids {
        let n = jobs.iter().filter(|j| &j.task_id == tid).count();
        assert_eq!(n, 1, "task {tid}: {n} infer jobs");
        let job = jobs.iter().find(|j| &j.task_id == tid).unwrap();
        assert_eq!(
            job.audio_features,
            names::attempt_key(tid, Stage::Audio, 1, names::artifact::AUDIO_FEATURES)
        );
        assert_eq!(
            job.face_track,
            names::attempt_key(tid, Stage::Face, 1, names::artifact::FACE_TRACK)
        );
    }
    // Both orders of finishing happened at least once across the tasks is likely but
    // not guaranteed; what matters is that no task got zero or two.
    shutdown.cancel();
    face.wait().await.unwrap();
    audio.wait().await.unwrap();
}
