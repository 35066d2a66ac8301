//! The runner's ownership of a job's lifecycle, against a real nats-server with
//! in-process stages: panics, undecodable work, idempotent re-publishing, duplicate
//! messages, stalled leases with their tool processes, and a lost NATS connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{Handler, JobCtx, JobError, Outcome, StageServer, StageSpec};
use lipsync_schemas::{ErrorCode, FaceJob, FetchJob, InputSource, NextWork, Stage, Status, names};
use lipsync_tests::{NatsServer, new_record, topology, wait_for};
use tokio_util::sync::CancellationToken;

/// What the face test handler does on a given attempt.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Panic in the handler on the first attempt.
    PanicAsync,
    /// Panic on a blocking thread on the first attempt.
    PanicBlocking,
    /// First attempt: start a long tool process and stop reporting progress.
    StallWithTool,
    /// Report progress for a long time (several ack waits).
    Long,
    /// First attempt: stop reporting progress, and return success once stopped.
    StallThenSucceed,
}

#[derive(Default)]
struct Seen {
    calls: AtomicUsize,
    tool_pid: AtomicU32,
    stopped: AtomicBool,
}

struct Face {
    mode: Mode,
    seen: Arc<Seen>,
}

#[async_trait]
impl Handler for Face {
    type Job = FaceJob;
    async fn handle(&self, ctx: JobCtx, _job: FaceJob) -> Result<Outcome, JobError> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let first = ctx.attempt == 1;
        match self.mode {
            Mode::PanicAsync if first => panic!("handler bug"),
            Mode::PanicBlocking if first => {
                ctx.run_blocking("test work", |_| -> () { panic!("thread bug") })
                    .await?;
            }
            Mode::StallWithTool if first => {
                ctx.progress(0.1, "starting a tool").await?;
                let seen = self.seen.clone();
                ctx.run_blocking("tool", move |_| {
                    let mut child = std::process::Command::new("sleep")
                        .arg("60")
                        .spawn()
                        .expect("sleep");
                    seen.tool_pid.store(child.id(), Ordering::SeqCst);
                    let _tracked = lipsync_runtime::jobscope::track(child.id());
                    // Blocks until the process ends: only the runner's kill ends it early.
                    let _ = child.wait();
                })
                .await?;
            }
            Mode::StallThenSucceed if first => {
                ctx.progress(0.1, "waiting").await?;
                ctx.interrupted().cancelled().await;
            }
            Mode::Long => {
                // Progress without touching NATS, so only the runner can stop it.
                for _ in 0..400 {
                    if ctx.interrupted().is_cancelled() {
                        self.seen.stopped.store(true, Ordering::SeqCst);
                        return Err(JobError::Interrupted);
                    }
                    ctx.alive();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ => ctx.progress(1.0, "done").await?,
        }
        Ok(Outcome::join([]))
    }
}

/// A fetch-like stage that hands on one face job.
struct Fetch {
    seen: Arc<Seen>,
    delay: Duration,
}

#[async_trait]
impl Handler for Fetch {
    type Job = FetchJob;
    async fn handle(&self, ctx: JobCtx, _job: FetchJob) -> Result<Outcome, JobError> {
        self.seen.calls.fetch_add(1, Ordering::SeqCst);
        let mut left = self.delay;
        while !left.is_zero() {
            let step = left.min(Duration::from_millis(100));
            tokio::time::sleep(step).await;
            left -= step;
            ctx.progress(1.0 - left.as_secs_f64(), "fetching").await?;
        }
        let key = ctx
            .store_artifact_bytes(names::artifact::VIDEO, b"video")
            .await?;
        let face = FaceJob {
            v: lipsync_schemas::WORK_VERSION,
            task_id: ctx.task_id.clone(),
            video: key.clone(),
            video_stream: None,
        };
        Ok(Outcome::next(
            [(names::artifact::VIDEO, key)],
            vec![NextWork::of(&face)],
        ))
    }
}

struct Env {
    nats: NatsServer,
    cfg: lipsync_runtime::Config,
    store: TaskStore,
    js: async_nats::jetstream::Context,
}

async fn env(tweak: impl FnOnce(&mut lipsync_runtime::Config)) -> Env {
    let nats = NatsServer::start().await.unwrap();
    let mut cfg = nats.config();
    tweak(&mut cfg);
    let topo = topology(&cfg).await.unwrap();
    Env {
        store: TaskStore::new(topo.tasks.clone()),
        js: topo.js.clone(),
        nats,
        cfg,
    }
}

impl Env {
    async fn start<H: Handler>(&self, handler: H, shutdown: &CancellationToken) -> StageServer {
        lipsync_runtime::start_stage(
            &self.cfg,
            StageSpec {
                name: "test-stage",
                listen: "127.0.0.1:0".parse().unwrap(),
                concurrency: 2,
                device: None,
            },
            handler,
            shutdown.clone(),
        )
        .await
        .unwrap()
    }

    async fn task(&self) -> String {
        let tid = uuid::Uuid::new_v4().to_string();
        self.store.create(&new_record(&tid)).await.unwrap();
        tid
    }

    /// Starts the face test handler in `mode`; returns what it saw, its shutdown token and
    /// the server.
    async fn start_face(&self, mode: Mode) -> (Arc<Seen>, CancellationToken, StageServer) {
        let seen = Arc::new(Seen::default());
        let shutdown = CancellationToken::new();
        let server = self
            .start(
                Face {
                    mode,
                    seen: seen.clone(),
                },
                &shutdown,
            )
            .await;
        (seen, shutdown, server)
    }

    /// A new task with its face job published.
    async fn face_task(&self) -> String {
        let tid = self.task().await;
        self.face_job(&tid).await;
        tid
    }

    async fn face_job(&self, tid: &str) {
        lipsync_runtime::publish_work(
            &self.js,
            &FaceJob {
                v: 1,
                task_id: tid.to_owned(),
                video: names::artifact_key(tid, names::artifact::VIDEO),
                video_stream: None,
            },
        )
        .await
        .unwrap();
    }

    /// A raw message on a stage's subject with no Msg-Id (as a re-publish after the
    /// duplicate window would arrive).
    async fn raw(&self, stage: Stage, body: Vec<u8>) {
        self.js
            .publish(names::work_subject(stage), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn wait(
        &self,
        tid: &str,
        pred: impl Fn(&lipsync_schemas::TaskRecord) -> bool,
    ) -> lipsync_schemas::TaskRecord {
        lipsync_tests::wait_record(&self.store, tid, Duration::from_secs(60), pred)
            .await
            .unwrap()
    }

    async fn subject_count(&self, stage: Stage) -> u64 {
        use futures::TryStreamExt;
        let stream = self.js.get_stream(names::WORK_STREAM).await.unwrap();
        let subject = names::work_subject(stage);
        let mut info = stream.info_with_subjects(&subject).await.unwrap();
        let mut n = 0;
        while let Some((s, count)) = info.try_next().await.unwrap() {
            if s == subject {
                n += count as u64;
            }
        }
        n
    }

    async fn idle(&self, consumer: &str) {
        let js = self.js.clone();
        let consumer = consumer.to_owned();
        wait_for(Duration::from_secs(30), || {
            let js = js.clone();
            let consumer = consumer.clone();
            async move {
                let stream = js.get_stream(names::WORK_STREAM).await.ok()?;
                let info = stream.consumer_info(&consumer).await.ok()?;
                (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
            }
        })
        .await
        .unwrap();
    }
}

async fn metrics(server: &StageServer) -> String {
    reqwest::get(format!("http://{}/metrics", server.ops_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Asserts that the metrics `body` counts `n` job events `event` of `stage`.
#[track_caller]
fn assert_event(body: &str, event: &str, stage: &str, n: u64) {
    let series = format!(r#"lipsync_job_events_total{{event="{event}",stage="{stage}"}} {n}"#);
    assert!(body.contains(&series), "{body}");
}

async fn stop(shutdown: &CancellationToken, server: StageServer) {
    shutdown.cancel();
    server.wait().await.unwrap();
}

fn face_done(r: &lipsync_schemas::TaskRecord) -> bool {
    r.stage_done(Stage::Face)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_fails_only_that_attempt_and_the_worker_goes_on() {
    for mode in [Mode::PanicAsync, Mode::PanicBlocking] {
        let e = env(|_| {}).await;
        let (seen, shutdown, server) = e.start_face(mode).await;
        let tid = e.face_task().await;
        let rec = e.wait(&tid, face_done).await;
        assert_eq!(rec.stages["face"].attempts, 2, "retried once");
        assert_eq!(rec.status, Status::Processing);
        // The same worker serves the next task (whose first attempt panics too).
        let next = e.face_task().await;
        let rec = e.wait(&next, face_done).await;
        assert_eq!(rec.stages["face"].attempts, 2);
        assert_eq!(seen.calls.load(Ordering::SeqCst), 4);
        let body = metrics(&server).await;
        assert_event(&body, "panicked", "face", 2);
        stop(&shutdown, server).await;
    }
}

#[tokio::test]
async fn undecodable_work_fails_its_task_typed() {
    let e = env(|_| {}).await;
    let (seen, shutdown, server) = e.start_face(Mode::Long).await;
    let tid = e.task().await;
    let body = serde_json::json!({"v": 99, "task_id": tid, "video": "x"});
    e.raw(Stage::Face, serde_json::to_vec(&body).unwrap()).await;
    e.raw(Stage::Face, b"\x00 not json at all".to_vec()).await;
    let rec = e.wait(&tid, |r| r.status == Status::Failed).await;
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::Internal);
    assert!(err.message.contains("version 99"), "{}", err.message);
    e.idle("face").await;
    assert_eq!(e.subject_count(Stage::Face).await, 0, "nothing left behind");
    assert_eq!(seen.calls.load(Ordering::SeqCst), 0);
    let body = metrics(&server).await;
    assert_event(&body, "undecodable", "face", 2);
    stop(&shutdown, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_stage_republishes_and_a_second_message_never_runs_twice() {
    let e = env(|_| {}).await;
    let seen = Arc::new(Seen::default());
    let shutdown = CancellationToken::new();
    let server = e
        .start(
            Fetch {
                seen: seen.clone(),
                delay: Duration::from_millis(1500),
            },
            &shutdown,
        )
        .await;
    let tid = e.task().await;
    let job = FetchJob {
        v: 1,
        task_id: tid.clone(),
        video: InputSource::Url("http://example.com/v.mp4".into()),
        audio: InputSource::Url("http://example.com/a.wav".into()),
    };
    let body = serde_json::to_vec(&job).unwrap();
    // Two messages for the same stage while the first runs (a re-publish after the
    // duplicate window): the second is dropped, the handler runs once.
    e.raw(Stage::Fetch, body.clone()).await;
    e.wait(&tid, |r| r.stages.contains_key("fetch")).await;
    e.raw(Stage::Fetch, body.clone()).await;
    let rec = e.wait(&tid, |r| r.stage_done(Stage::Fetch)).await;
    e.idle("fetch").await;
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
    let key = rec
        .output_of(Stage::Fetch, names::artifact::VIDEO)
        .unwrap()
        .to_owned();
    assert_eq!(
        key,
        names::attempt_key(&tid, Stage::Fetch, 1, "input_video")
    );
    assert!(rec.artifacts.contains(&key));
    assert_eq!(e.subject_count(Stage::Face).await, 1);
    // The handed-on work carries the task's trace context.
    let stream = e.js.get_stream(names::WORK_STREAM).await.unwrap();
    let face = stream
        .get_last_raw_message_by_subject(&names::work_subject(Stage::Face))
        .await
        .unwrap();
    let tp = face.headers.get("traceparent").unwrap().as_str().to_owned();
    assert!(
        tp.starts_with(&format!("00-{}-", lipsync_runtime::runner::trace_id(&tid))),
        "{tp}"
    );

    // A redelivery after the stage is done re-publishes the recorded work (dropped by
    // the Msg-Id window here) and acknowledges without running.
    e.raw(Stage::Fetch, body).await;
    e.idle("fetch").await;
    assert_eq!(seen.calls.load(Ordering::SeqCst), 1);
    assert_eq!(e.subject_count(Stage::Face).await, 1);
    let body = metrics(&server).await;
    assert_event(&body, "duplicate", "fetch", 1);
    assert_event(&body, "republished", "fetch", 1);
    stop(&shutdown, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_job_is_stopped_with_its_tool_and_retried() {
    let e = env(|c| {
        c.nats.ack_wait_s = 4;
        c.runner.stall_timeout_s = 1.5;
    })
    .await;
    let (seen, shutdown, server) = e.start_face(Mode::StallWithTool).await;
    let tid = e.face_task().await;
    let rec = e.wait(&tid, face_done).await;
    assert_eq!(rec.stages["face"].attempts, 2);
    // The tool was killed, not left to run its 60 s.
    let pid = seen.tool_pid.load(Ordering::SeqCst);
    assert!(pid > 0);
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false);
    assert!(!alive, "tool process {pid} still runs");
    let body = metrics(&server).await;
    assert_event(&body, "stalled", "face", 1);
    stop(&shutdown, server).await;
}

/// A stopped job's tools are dead, so its result is not trusted even when it reports
/// success after the stop: the attempt counts as stalled and the job runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_returned_after_a_stall_stop_is_not_recorded() {
    let e = env(|c| {
        c.nats.ack_wait_s = 4;
        c.runner.stall_timeout_s = 1.5;
    })
    .await;
    let (seen, shutdown, server) = e.start_face(Mode::StallThenSucceed).await;
    let tid = e.face_task().await;
    let rec = e.wait(&tid, face_done).await;
    assert_eq!(rec.stages["face"].attempts, 2);
    assert_eq!(seen.calls.load(Ordering::SeqCst), 2);
    let body = metrics(&server).await;
    assert_event(&body, "stalled", "face", 1);
    stop(&shutdown, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_nats_stops_the_job_and_readyz_follows_the_connection() {
    let mut e = env(|c| {
        c.nats.ack_wait_s = 2;
    })
    .await;
    let (seen, shutdown, server) = e.start_face(Mode::Long).await;
    let ready = |addr: std::net::SocketAddr| async move {
        reqwest::get(format!("http://{addr}/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(ready(server.ops_addr).await, 200);
    let tid = e.face_task().await;
    e.wait(&tid, |r| r.stages.contains_key("face")).await;
    e.nats.kill();
    let addr = server.ops_addr;
    wait_for(Duration::from_secs(10), || async move {
        (ready(addr).await == 503).then_some(())
    })
    .await
    .expect("readyz never reported the lost connection");
    // Longer than ack_wait: the job stops (its message belongs to someone else now).
    let s = seen.clone();
    wait_for(Duration::from_secs(15), || {
        let s = s.clone();
        async move { s.stopped.load(Ordering::SeqCst).then_some(()) }
    })
    .await
    .expect("the job went on without NATS");
    e.nats.restart().await.unwrap();
    wait_for(Duration::from_secs(30), || async move {
        (ready(addr).await == 200).then_some(())
    })
    .await
    .expect("readyz never recovered");
    stop(&shutdown, server).await;
}

/// Log lines captured as JSON.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Chatty;

#[async_trait]
impl Handler for Chatty {
    type Job = FaceJob;
    async fn handle(&self, ctx: JobCtx, _job: FaceJob) -> Result<Outcome, JobError> {
        tracing::info!(marker = "async", "working");
        ctx.run_blocking("chatty", |_| tracing::info!(marker = "blocking", "working"))
            .await?;
        Ok(Outcome::join([]))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_of_a_job_names_its_task_stage_and_attempt() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("info")
        .with_writer(move || writer.clone())
        .init();
    let e = env(|_| {}).await;
    let shutdown = CancellationToken::new();
    let server = e.start(Chatty, &shutdown).await;
    let tid = e.face_task().await;
    e.wait(&tid, face_done).await;
    e.idle("face").await;
    stop(&shutdown, server).await;

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let of_job: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["marker"].is_string() || l["fields"]["message"] == "job done")
        .collect();
    assert_eq!(of_job.len(), 3, "{text}");
    for l in of_job {
        let span = &l["span"];
        assert_eq!(span["task_id"], tid.as_str(), "{l}");
        assert_eq!(span["stage"], "face", "{l}");
        assert_eq!(span["attempt"], 1, "{l}");
        assert_eq!(
            span["trace_id"],
            lipsync_runtime::runner::trace_id(&tid).as_str(),
            "{l}"
        );
    }
}
