//! The stage runtime against a real nats-server: bootstrap, task records, artifacts and
//! the stage runner's delivery semantics.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{
    ArtifactStore, Change, Handler, JobCtx, JobError, NatsArtifacts, Outcome, StageSpec, Updated,
};
use lipsync_schemas::{ErrorCode, FaceJob, Stage, Status, names};
use lipsync_tests::{NatsServer, new_record, topology, wait_for};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

fn id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[tokio::test]
async fn bootstrap_is_idempotent_and_reports_changes() {
    let nats = NatsServer::start().await.unwrap();
    let mut cfg = nats.config();
    let client = nats.client().await.unwrap();
    let js = async_nats::jetstream::new(client);
    let run = |cfg: lipsync_runtime::Config| {
        let js = js.clone();
        async move {
            lipsync_runtime::nats::bootstrap(&js, &cfg.nats, &cfg.tasks, &cfg.artifacts)
                .await
                .unwrap()
                .1
        }
    };
    cfg.nats.face_max_in_flight = 7;
    let first = run(cfg.clone()).await;
    // Work stream, 5 consumers, advisory stream + reaper, 2 KV buckets, object store.
    assert_eq!(first.created.len(), 11, "{first:?}");
    let mut stream = js.get_stream(names::WORK_STREAM).await.unwrap();
    let created_at = stream.info().await.unwrap().created;

    let second = run(cfg.clone()).await;
    assert!(second.is_noop(), "second run changed something: {second:?}");
    let mut stream = js.get_stream(names::WORK_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().created, created_at);

    // A replica with other local settings reports the difference and changes nothing,
    // so replicas never flip-flop the shared consumers.
    let mut other = cfg.clone();
    other.nats.max_queued_jobs = 42;
    other.nats.face_max_in_flight = 1;
    let differs = run(other).await;
    assert!(differs.is_noop(), "{differs:?}");
    assert_eq!(differs.differs.len(), 2, "{differs:?}");
    let stream = js.get_stream(names::WORK_STREAM).await.unwrap();
    let info = stream.consumer_info("face").await.unwrap();
    assert_eq!(info.config.max_ack_pending, 7);

    // The one process that applies the topology changes it.
    cfg.nats.apply_topology = true;
    cfg.nats.max_queued_jobs = 42;
    cfg.nats.max_deliver = 9;
    let third = run(cfg.clone()).await;
    assert!(third.created.is_empty());
    // The stream's limit and every consumer's max_deliver.
    assert_eq!(third.updated.len(), 6, "{third:?}");
    let mut stream = js.get_stream(names::WORK_STREAM).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.max_messages,
        42 * 3 + 64,
        "admission limit plus room for the hand-offs"
    );
    let info = stream.consumer_info("face").await.unwrap();
    assert_eq!(info.config.max_deliver, 9);
    assert_eq!(info.config.max_ack_pending, 7);
    let info = stream.consumer_info("infer").await.unwrap();
    assert_eq!(info.config.max_ack_pending, cfg.nats.infer_max_in_flight);
    assert!(run(cfg).await.is_noop());
}

#[tokio::test]
async fn task_updates_are_compare_and_set() {
    let nats = NatsServer::start().await.unwrap();
    let topo = topology(&nats.config()).await.unwrap();
    let store = TaskStore::new(topo.tasks.clone());
    let tid = id();
    store.create(&new_record(&tid)).await.unwrap();
    assert!(matches!(
        store.create(&new_record(&tid)).await,
        Err(lipsync_runtime::tasks::TaskStoreError::Exists(_))
    ));

    // 20 concurrent writers each append one warning: none is lost.
    let mut joins = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        let tid = tid.clone();
        joins.push(tokio::spawn(async move {
            store
                .update(&tid, |r| {
                    r.warnings.push(format!("w{i}"));
                    Change::Write
                })
                .await
                .unwrap()
        }));
    }
    for j in joins {
        assert!(matches!(j.await.unwrap(), Updated::Written(_)));
    }
    let (rec, _) = store.get(&tid).await.unwrap().unwrap();
    assert_eq!(rec.warnings.len(), 20);

    // A finished task can no longer be changed by a stale attempt.
    store
        .fail(
            &tid,
            Some(Stage::Face),
            lipsync_schemas::TaskError::new(ErrorCode::NoFaceDetected, "none"),
        )
        .await
        .unwrap();
    let after = store.mark_started(&tid, Stage::Infer, 2, 0).await.unwrap();
    let rec = after.record().unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert!(!rec.stages.contains_key("infer"));
    assert_eq!(rec.error.as_ref().unwrap().code, ErrorCode::NoFaceDetected);

    assert!(store.get("../etc/passwd").await.unwrap().is_none());
    assert!(store.get(&id()).await.unwrap().is_none());
}

struct Chunky {
    left: usize,
    state: u32,
}

impl tokio::io::AsyncRead for Chunky {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = buf.remaining().min(self.left).min(8192);
        for _ in 0..n {
            self.state = self
                .state
                .wrapping_mul(1_664_525)
                .wrapping_add(1_013_904_223);
            buf.put_slice(&[(self.state >> 24) as u8]);
        }
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn artifacts_stream_in_and_out() {
    let nats = NatsServer::start().await.unwrap();
    let topo = topology(&nats.config()).await.unwrap();
    let store = NatsArtifacts::new(topo.artifacts.clone());
    let size = 20 * 1024 * 1024 + 17;
    let meta = store
        .put(
            "t1/blob",
            &mut Chunky {
                left: size,
                state: 7,
            },
        )
        .await
        .unwrap();
    assert_eq!(meta.size, size as u64);
    assert!(meta.digest.is_some());

    let mut expect = Vec::with_capacity(size);
    Chunky {
        left: size,
        state: 7,
    }
    .read_to_end(&mut expect)
    .await
    .unwrap();
    let mut got = Vec::new();
    store
        .get("t1/blob")
        .await
        .unwrap()
        .read_to_end(&mut got)
        .await
        .unwrap();
    assert!(got == expect, "artifact bytes differ");

    assert_eq!(
        store.info("t1/blob").await.unwrap().unwrap().size,
        size as u64
    );
    store.delete("t1/blob").await.unwrap();
    assert!(store.info("t1/blob").await.unwrap().is_none());
    assert!(matches!(
        store.get("t1/blob").await,
        Err(lipsync_runtime::ArtifactError::NotFound(_))
    ));
    store.delete("t1/never").await.unwrap();
}

/// What the test handler does, chosen per task by its seed.
#[derive(Clone, Copy)]
enum Behaviour {
    Succeed,
    Permanent,
    AlwaysTransient,
    TransientOnce,
    Slow,
}

struct TestHandler {
    calls: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
}

fn behaviour(seed: Option<u64>) -> Behaviour {
    match seed {
        Some(1) => Behaviour::Permanent,
        Some(2) => Behaviour::AlwaysTransient,
        Some(3) => Behaviour::TransientOnce,
        Some(4) => Behaviour::Slow,
        _ => Behaviour::Succeed,
    }
}

#[async_trait]
impl Handler for TestHandler {
    type Job = FaceJob;
    async fn handle(&self, ctx: JobCtx, _job: FaceJob) -> Result<Outcome, JobError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let res = async {
            match behaviour(ctx.record.request.seed) {
                Behaviour::Succeed => {
                    for i in 1..=4 {
                        ctx.progress(i as f64 / 4.0, "working").await?;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(())
                }
                Behaviour::Permanent => Err(JobError::permanent(
                    ErrorCode::UnsupportedMedia,
                    "the video cannot be read",
                )),
                Behaviour::AlwaysTransient => Err(JobError::transient("backend down")),
                Behaviour::TransientOnce if ctx.attempt == 1 => Err(JobError::transient("flaky")),
                Behaviour::TransientOnce => Ok(()),
                Behaviour::Slow => {
                    for _ in 0..400 {
                        ctx.check().await?;
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    Ok(())
                }
            }
        }
        .await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        res.map(|()| Outcome::join([]))
    }
}

struct Harness {
    nats: NatsServer,
    cfg: lipsync_runtime::Config,
    store: TaskStore,
    js: async_nats::jetstream::Context,
    calls: Arc<AtomicUsize>,
    max_running: Arc<AtomicUsize>,
}

impl Harness {
    async fn new(max_deliver: i64) -> Self {
        let nats = NatsServer::start().await.unwrap();
        let mut cfg = nats.config();
        cfg.nats.max_deliver = max_deliver;
        let topo = topology(&cfg).await.unwrap();
        Self {
            store: TaskStore::new(topo.tasks.clone()),
            js: topo.js.clone(),
            nats,
            cfg,
            calls: Arc::default(),
            max_running: Arc::default(),
        }
    }

    async fn start(
        &self,
        concurrency: usize,
        shutdown: CancellationToken,
    ) -> lipsync_runtime::StageServer {
        lipsync_runtime::start_stage(
            &self.cfg,
            StageSpec {
                name: "test-face",
                listen: "127.0.0.1:0".parse().unwrap(),
                concurrency,
                device: None,
            },
            TestHandler {
                calls: self.calls.clone(),
                running: Arc::default(),
                max_running: self.max_running.clone(),
            },
            shutdown,
        )
        .await
        .unwrap()
    }

    async fn submit(&self, seed: u64) -> String {
        let tid = id();
        let mut rec = new_record(&tid);
        rec.request.seed = Some(seed);
        self.store.create(&rec).await.unwrap();
        lipsync_runtime::publish_work(
            &self.js,
            &FaceJob {
                v: 1,
                task_id: tid.clone(),
                video: names::artifact_key(&tid, names::artifact::VIDEO),
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
        pred: impl Fn(&lipsync_schemas::TaskRecord) -> bool,
    ) -> lipsync_schemas::TaskRecord {
        lipsync_tests::wait_record(&self.store, tid, Duration::from_secs(20), pred)
            .await
            .unwrap()
    }

    async fn consumer_idle(&self) {
        let js = self.js.clone();
        wait_for(Duration::from_secs(20), || {
            let js = js.clone();
            async move {
                let stream = js.get_stream(names::WORK_STREAM).await.ok()?;
                let info = stream.consumer_info("face").await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
            }
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn runner_success_records_stage_and_acks() {
    let h = Harness::new(5).await;
    let shutdown = CancellationToken::new();
    let stage = h.start(2, shutdown.clone()).await;
    let tid = h.submit(0).await;
    let rec = h
        .wait_record(&tid, |r| {
            r.stages
                .get("face")
                .is_some_and(|t| t.finished_at.is_some())
        })
        .await;
    assert_eq!(rec.status, Status::Processing);
    assert_eq!(rec.stage, Some(Stage::Face));
    assert!((rec.progress - Stage::Face.progress_at(1.0)).abs() < 1e-9);
    assert_eq!(rec.stages["face"].attempts, 1);
    h.consumer_idle().await;

    // Metrics of the run are served on the stage's own endpoint.
    let body = reqwest::get(format!("http://{}/metrics", stage.ops_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        body.contains("lipsync_jobs_succeeded_total{stage=\"face\"} 1"),
        "{body}"
    );
    let ready = reqwest::get(format!("http://{}/readyz", stage.ops_addr))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    shutdown.cancel();
    stage.wait().await.unwrap();
    assert_eq!(h.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn runner_permanent_error_fails_task_once() {
    let h = Harness::new(5).await;
    let shutdown = CancellationToken::new();
    let stage = h.start(2, shutdown.clone()).await;
    let tid = h.submit(1).await;
    let rec = h.wait_record(&tid, |r| r.status == Status::Failed).await;
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::UnsupportedMedia);
    assert_eq!(rec.message, "the video cannot be read");
    assert!(rec.end_time.is_some());
    h.consumer_idle().await;
    assert_eq!(
        h.calls.load(Ordering::SeqCst),
        1,
        "terminated, not redelivered"
    );
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn runner_transient_errors_retry_then_exhaust() {
    let h = Harness::new(3).await;
    let shutdown = CancellationToken::new();
    let stage = h.start(2, shutdown.clone()).await;
    let flaky = h.submit(3).await;
    let broken = h.submit(2).await;
    let rec = h
        .wait_record(&flaky, |r| {
            r.stages
                .get("face")
                .is_some_and(|t| t.finished_at.is_some())
        })
        .await;
    assert_eq!(rec.stages["face"].attempts, 2);
    assert_eq!(rec.status, Status::Processing);
    let rec = h.wait_record(&broken, |r| r.status == Status::Failed).await;
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::RetriesExhausted);
    assert!(err.message.contains("3 attempts"), "{}", err.message);
    h.consumer_idle().await;
    // flaky: 2 calls; broken: exactly max_deliver = 3 calls.
    assert_eq!(h.calls.load(Ordering::SeqCst), 5);
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn runner_skips_cancelled_tasks_and_stops_running_ones() {
    let h = Harness::new(5).await;
    // Cancelled before any stage ran: the handler is never called.
    let early = h.submit(0).await;
    h.store.cancel(&early).await.unwrap();
    let shutdown = CancellationToken::new();
    let stage = h.start(1, shutdown.clone()).await;
    h.consumer_idle().await;
    assert_eq!(h.calls.load(Ordering::SeqCst), 0);
    let rec = h.wait_record(&early, |r| r.status == Status::Failed).await;
    assert_eq!(rec.error.unwrap().code, ErrorCode::Cancelled);
    assert!(!rec.stages.contains_key("face"));

    // Cancelled while running: the job stops at its next check.
    let slow = h.submit(4).await;
    h.wait_record(&slow, |r| r.stages.contains_key("face"))
        .await;
    h.store.cancel(&slow).await.unwrap();
    h.consumer_idle().await;
    let rec = h.wait_record(&slow, |r| r.status == Status::Failed).await;
    assert_eq!(rec.error.unwrap().code, ErrorCode::Cancelled);
    assert!(rec.stages["face"].finished_at.is_none());
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn one_permit_runner_handles_one_job_at_a_time() {
    let h = Harness::new(5).await;
    let shutdown = CancellationToken::new();
    let stage = h.start(1, shutdown.clone()).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(h.submit(0).await);
    }
    for tid in &ids {
        h.wait_record(tid, |r| {
            r.stages
                .get("face")
                .is_some_and(|t| t.finished_at.is_some())
        })
        .await;
    }
    assert_eq!(h.max_running.load(Ordering::SeqCst), 1);
    assert_eq!(h.calls.load(Ordering::SeqCst), 4);
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn shutdown_returns_interrupted_job_to_the_queue() {
    let mut h = Harness::new(5).await;
    h.cfg.runner.shutdown_grace_s = 0;
    let shutdown = CancellationToken::new();
    let stage = h.start(1, shutdown.clone()).await;
    let tid = h.submit(4).await;
    h.wait_record(&tid, |r| r.stages.contains_key("face")).await;
    shutdown.cancel();
    stage.wait().await.unwrap();

    // A fresh process gets the job again at once (NAK without delay), well before
    // ack_wait (60 s) would have expired.
    let shutdown = CancellationToken::new();
    let stage = h.start(1, shutdown.clone()).await;
    let rec = h
        .wait_record(&tid, |r| {
            r.stages.get("face").is_some_and(|t| t.attempts >= 2)
        })
        .await;
    assert_eq!(rec.status, Status::Processing);
    h.store.cancel(&tid).await.unwrap();
    h.consumer_idle().await;
    shutdown.cancel();
    stage.wait().await.unwrap();
    drop(h.nats);
}
