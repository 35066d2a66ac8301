//! The fetch stage end to end on a real nats-server: media served over loopback HTTP,
//! typed failures for bad input, and a SIGKILL mid-download that ends in exactly one
//! completed fetch.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{ArtifactStore, NatsArtifacts};
use lipsync_schemas::{ErrorCode, FetchJob, InputSource, Stage, Status, TaskRecord, names};
use lipsync_tests::pipeline::ffmpeg;
use lipsync_tests::{NatsServer, new_record, topology, wait_for};
use tokio_util::sync::CancellationToken;

struct Media {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn media() -> Media {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let p = |n: &str| root.join(n).to_str().unwrap().to_owned();
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25:duration=2",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-shortest",
        &p("video.mp4"),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25:duration=2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        &p("silent.mp4"),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=300:duration=1.5",
        "-ar",
        "44100",
        &p("audio.wav"),
    ]);
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=320x240:rate=25:duration=12",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        &p("long.mp4"),
    ]);
    std::fs::write(
        root.join("text.mp4"),
        b"this is not a video, just text\n".repeat(100),
    )
    .unwrap();
    Media { _dir: dir, root }
}

#[derive(Clone)]
struct Files {
    root: PathBuf,
    hits: Arc<AtomicUsize>,
}

async fn serve_file(State(f): State<Files>, UrlPath(name): UrlPath<String>) -> Response {
    f.hits.fetch_add(1, Ordering::SeqCst);
    if name == "slow.mp4" {
        // The video in 2 KiB pieces every 20 ms (~100 KB/s): long enough to kill.
        let data = tokio::fs::read(f.root.join("video.mp4")).await.unwrap();
        let len = data.len();
        let stream = futures::stream::unfold(0usize, move |off| {
            let data = data.clone();
            async move {
                if off >= data.len() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let end = (off + 2048).min(data.len());
                Some((
                    Ok::<_, std::io::Error>(bytes::Bytes::copy_from_slice(&data[off..end])),
                    end,
                ))
            }
        });
        return Response::builder()
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    match tokio::fs::read(f.root.join(&name)).await {
        Ok(b) => b.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn file_server(root: &Path) -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route("/{name}", get(serve_file))
        .with_state(Files {
            root: root.to_path_buf(),
            hits: hits.clone(),
        });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (addr, hits)
}

struct Env {
    nats: NatsServer,
    cfg: lipsync_runtime::Config,
    store: TaskStore,
    artifacts: NatsArtifacts,
    js: async_nats::jetstream::Context,
}

async fn env() -> Env {
    let nats = NatsServer::start().await.unwrap();
    let mut cfg = nats.config();
    cfg.fetch.allow_private_networks = true;
    cfg.fetch.max_duration_s = 10.0;
    cfg.fetch.read_timeout_s = 5;
    let topo = topology(&cfg).await.unwrap();
    Env {
        store: TaskStore::new(topo.tasks.clone()),
        artifacts: NatsArtifacts::new(topo.artifacts.clone()),
        js: topo.js.clone(),
        nats,
        cfg,
    }
}

impl Env {
    async fn submit(&self, video: &str, audio: &str) -> String {
        let tid = uuid::Uuid::new_v4().to_string();
        let mut rec = new_record(&tid);
        rec.request.video = InputSource::Url(video.into());
        rec.request.audio = InputSource::Url(audio.into());
        self.store.create(&rec).await.unwrap();
        lipsync_runtime::publish_work(
            &self.js,
            &FetchJob {
                v: 1,
                task_id: tid.clone(),
                video: rec.request.video.clone(),
                audio: rec.request.audio.clone(),
            },
        )
        .await
        .unwrap();
        tid
    }

    async fn wait(&self, tid: &str, pred: impl Fn(&TaskRecord) -> bool) -> TaskRecord {
        let store = self.store.clone();
        let pred = &pred;
        wait_for(Duration::from_secs(60), || {
            let store = store.clone();
            let tid = tid.to_owned();
            async move {
                let (r, _) = store.get(&tid).await.ok()??;
                pred(&r).then_some(r)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("task {tid}: {e}"))
    }

    async fn fetched(&self, tid: &str) -> TaskRecord {
        self.wait(tid, |r| {
            r.status == Status::Failed
                || r.stages
                    .get("fetch")
                    .is_some_and(|t| t.finished_at.is_some())
        })
        .await
    }

    /// Messages on a subject still in the work stream (nothing consumes face/audio here).
    async fn queued(&self, stage: &str) -> u64 {
        let stream = self.js.get_stream(names::WORK_STREAM).await.unwrap();
        let info = stream
            .info_with_subjects(format!("lipsync.work.{stage}"))
            .await
            .unwrap();
        use futures::TryStreamExt;
        let subjects: Vec<(String, usize)> = info.try_collect().await.unwrap();
        subjects.iter().map(|(_, n)| *n as u64).sum()
    }
}

#[tokio::test]
async fn fetches_validates_and_hands_over() {
    let m = media();
    let (addr, _) = file_server(&m.root).await;
    let e = env().await;
    let shutdown = CancellationToken::new();
    let stage = lipsync_fetch::start(&e.cfg, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{addr}");

    // A video file with sound is a valid audio input too.
    let ok = e
        .submit(&format!("{base}/video.mp4"), &format!("{base}/audio.wav"))
        .await;
    let ok2 = e
        .submit(&format!("{base}/silent.mp4"), &format!("{base}/video.mp4"))
        .await;
    let rec = e.fetched(&ok).await;
    assert_eq!(rec.status, Status::Processing, "{:?}", rec.error);
    let media = rec.media.clone().unwrap();
    assert_eq!((media.width, media.height), (320, 240));
    assert!((media.fps - 25.0).abs() < 1e-6);
    assert!((media.audio_duration_s - 1.5).abs() < 0.1, "{media:?}");
    // The validated stream travels to the stages that decode the video.
    let validated = lipsync_schemas::VideoStream {
        index: 0,
        width: 320,
        height: 240,
    };
    assert_eq!(media.video_stream, Some(validated));
    let next = &rec.stages["fetch"].done.as_ref().unwrap().next;
    let face = next.iter().find(|w| w.stage == Stage::Face).unwrap();
    assert_eq!(
        face.body["video_stream"],
        serde_json::to_value(validated).unwrap()
    );
    assert!((rec.progress - 0.10).abs() < 1e-9);
    let rec2 = e.fetched(&ok2).await;
    assert_eq!(rec2.status, Status::Processing, "{:?}", rec2.error);

    // Originals and the 16 kHz WAV are in the artifact store.
    let v = e
        .artifacts
        .info(rec.output_of(Stage::Fetch, names::artifact::VIDEO).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        v.size,
        std::fs::metadata(m.root.join("video.mp4")).unwrap().len()
    );
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("a.wav");
    e.artifacts
        .get_to_file(
            rec.output_of(Stage::Fetch, names::artifact::AUDIO_16K)
                .unwrap(),
            &wav,
        )
        .await
        .unwrap();
    let probe = lipsync_fetch::probe::probe(&wav).await.unwrap();
    let a = probe.primary_audio().unwrap();
    assert_eq!((a.sample_rate, a.channels), (16000, 1));

    // One face job and one audio job per task.
    assert_eq!(e.queued("face").await, 2);
    assert_eq!(e.queued("audio").await, 2);

    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn bad_inputs_fail_typed_and_the_stage_keeps_serving() {
    let m = media();
    let (addr, _) = file_server(&m.root).await;
    let e = env().await;
    let shutdown = CancellationToken::new();
    let stage = lipsync_fetch::start(&e.cfg, shutdown.clone())
        .await
        .unwrap();
    let base = format!("http://{addr}");
    let cases = [
        ("missing.mp4", "audio.wav", ErrorCode::DownloadFailed),
        ("text.mp4", "audio.wav", ErrorCode::UnsupportedMedia),
        ("audio.wav", "audio.wav", ErrorCode::NoVideoStream),
        ("video.mp4", "silent.mp4", ErrorCode::NoAudioStream),
        ("long.mp4", "audio.wav", ErrorCode::InputTooLong),
        ("video.mp4", "text.mp4", ErrorCode::UnsupportedMedia),
    ];
    let mut ids = Vec::new();
    for (v, a, code) in cases {
        ids.push((
            e.submit(&format!("{base}/{v}"), &format!("{base}/{a}"))
                .await,
            code,
            v,
            a,
        ));
    }
    let good = e
        .submit(&format!("{base}/video.mp4"), &format!("{base}/audio.wav"))
        .await;
    for (tid, code, v, a) in ids {
        let rec = e.fetched(&tid).await;
        assert_eq!(rec.status, Status::Failed, "{v}+{a}");
        let err = rec.error.unwrap();
        assert_eq!(err.code, code, "{v}+{a}: {}", err.message);
        assert!(
            !err.message.contains("/tmp"),
            "path leaked: {}",
            err.message
        );
        // A failed download leaves no partial input behind.
        if code == ErrorCode::DownloadFailed {
            assert!(
                e.artifacts
                    .info(&names::attempt_key(
                        &tid,
                        Stage::Fetch,
                        1,
                        names::artifact::VIDEO
                    ))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
    }
    let rec = e.fetched(&good).await;
    assert_eq!(rec.status, Status::Processing, "{:?}", rec.error);
    assert_eq!(e.queued("face").await, 1);
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn private_addresses_are_refused_by_default() {
    let m = media();
    let (addr, hits) = file_server(&m.root).await;
    let mut e = env().await;
    e.cfg.fetch.allow_private_networks = false;
    let shutdown = CancellationToken::new();
    let stage = lipsync_fetch::start(&e.cfg, shutdown.clone())
        .await
        .unwrap();
    let tid = e
        .submit(
            &format!("http://{addr}/video.mp4"),
            &format!("http://localhost:{}/audio.wav", addr.port()),
        )
        .await;
    let rec = e.fetched(&tid).await;
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(rec.error.unwrap().code, ErrorCode::UrlNotAllowed);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the target was contacted");
    shutdown.cancel();
    stage.wait().await.unwrap();
}

#[tokio::test]
async fn an_upload_larger_than_max_bytes_is_refused_typed() {
    let m = media();
    let (addr, _) = file_server(&m.root).await;
    let mut e = env().await;
    let video = m.root.join("video.mp4");
    let size = std::fs::metadata(&video).unwrap().len();
    // One byte under the upload: a download of it would be refused the same way.
    e.cfg.fetch.max_bytes = size - 1;
    let shutdown = CancellationToken::new();
    let stage = lipsync_fetch::start(&e.cfg, shutdown.clone())
        .await
        .unwrap();
    let key = format!("uploads/_/{}", uuid::Uuid::new_v4());
    e.artifacts.put_file(&key, &video).await.unwrap();
    let tid = uuid::Uuid::new_v4().to_string();
    let mut rec = new_record(&tid);
    rec.request.video = InputSource::Artifact(key.clone());
    rec.request.audio = InputSource::Url(format!("http://{addr}/audio.wav"));
    e.store.create(&rec).await.unwrap();
    lipsync_runtime::publish_work(
        &e.js,
        &FetchJob {
            v: 1,
            task_id: tid.clone(),
            video: rec.request.video.clone(),
            audio: rec.request.audio.clone(),
        },
    )
    .await
    .unwrap();
    let rec = e.fetched(&tid).await;
    assert_eq!(rec.status, Status::Failed);
    let err = rec.error.unwrap();
    assert_eq!(err.code, ErrorCode::InputTooLarge, "{}", err.message);
    assert!(!err.retryable);
    assert!(
        err.message.contains(&format!("{size} bytes")) && err.message.contains("video"),
        "{}",
        err.message
    );
    // The failed task's inputs go with it, the upload included.
    lipsync_tests::wait_gone(&e.artifacts, &key, Duration::from_secs(10))
        .await
        .unwrap();
    shutdown.cancel();
    stage.wait().await.unwrap();
}

fn spawn_fetch(e: &Env) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_lipsync-fetch"))
        .env("LIPSYNC_NATS__URL", e.nats.url())
        .env("LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS", "true")
        .env("LIPSYNC_FETCH__LISTEN", "127.0.0.1:0")
        .env("LIPSYNC_NATS__ACK_WAIT_S", "3")
        // The test's own bootstrap made the consumer first: this process applies its
        // settings (ack_wait 3 s) as the deployment's one topology owner would.
        .env("LIPSYNC_NATS__APPLY_TOPOLOGY", "true")
        // As the topology owner it also applies `artifacts.max_bytes`: the test cap, not
        // the 16 GiB default, which JetStream refuses where the disk has less free.
        .env(
            "LIPSYNC_ARTIFACTS__MAX_BYTES",
            lipsync_tests::TEST_ARTIFACT_BYTES.to_string(),
        )
        .env("LIPSYNC_LOG__FILTER", "warn")
        .stdout(std::process::Stdio::null())
        // Its warnings and a start-up failure land in the test's captured output.
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("lipsync-fetch binary")
}

#[tokio::test]
async fn sigkill_mid_download_completes_once() {
    let m = media();
    let (addr, hits) = file_server(&m.root).await;
    let mut e = env().await;
    e.cfg.nats.ack_wait_s = 3;
    // The binary applies ack_wait 3 s to the consumer.
    let mut child = spawn_fetch(&e);
    let base = format!("http://{addr}");
    let tid = e
        .submit(&format!("{base}/slow.mp4"), &format!("{base}/audio.wav"))
        .await;
    e.wait(&tid, |r| r.progress > 0.005).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let first_hits = hits.load(Ordering::SeqCst);
    assert!(first_hits >= 1);

    let mut child = spawn_fetch(&e);
    // The redelivered job downloads again and completes, exactly once.
    let rec = e.fetched(&tid).await;
    assert_eq!(rec.status, Status::Processing, "{:?}", rec.error);
    assert!(rec.stages["fetch"].attempts >= 2, "{:?}", rec.stages);
    assert!(
        hits.load(Ordering::SeqCst) > first_hits,
        "not downloaded again"
    );
    // The stored input is the whole file, not the part from the killed attempt.
    let v = e
        .artifacts
        .info(rec.output_of(Stage::Fetch, names::artifact::VIDEO).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        v.size,
        std::fs::metadata(m.root.join("video.mp4")).unwrap().len()
    );
    // Give a duplicate publish the chance to show up, then count: one job per stage.
    let ok = e
        .submit(&format!("{base}/video.mp4"), &format!("{base}/audio.wav"))
        .await;
    e.fetched(&ok).await;
    assert_eq!(e.queued("face").await, 2);
    assert_eq!(e.queued("audio").await, 2);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn invalid_config_exits_64_and_print_config_shows_layers() {
    let bin = env!("CARGO_BIN_EXE_lipsync-fetch");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("c.toml");
    std::fs::write(&f, "[fetch]\nmax_bytes = 123\nconcurrency = 3\n").unwrap();
    let out = Command::new(bin)
        .arg("--config")
        .arg(&f)
        .args(["--set", "fetch.concurrency=9", "--print-config"])
        .env("LIPSYNC_FETCH__MAX_REDIRECTS", "2")
        .env("LIPSYNC_FETCH__CONCURRENCY", "5")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: toml::Table = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let fetch = cfg["fetch"].as_table().unwrap();
    assert_eq!(fetch["max_bytes"].as_integer(), Some(123), "file layer");
    assert_eq!(fetch["max_redirects"].as_integer(), Some(2), "env layer");
    assert_eq!(
        fetch["concurrency"].as_integer(),
        Some(9),
        "cli wins over env and file"
    );

    std::fs::write(&f, "[fetch]\nmax_bytes = \"lots\"\n").unwrap();
    let out = Command::new(bin).arg("--config").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_bytes"));

    std::fs::write(&f, "[fetch]\nallow_cidrs = [\"not-a-net\"]\n").unwrap();
    let out = Command::new(bin).arg("--config").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(64));

    let out = Command::new(bin)
        .env("LIPSYNC_NATS__NO_SUCH_KEY", "1")
        .arg("--print-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "unknown env keys are rejected");

    // Trace export only speaks OTLP/HTTP: another scheme is a usage error, not silence.
    let out = Command::new(bin)
        .env("LIPSYNC_TRACE__OTLP_ENDPOINT", "grpc://collector:4317")
        .env("LIPSYNC_NATS__URL", "nats://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("trace.otlp_endpoint"));
}
