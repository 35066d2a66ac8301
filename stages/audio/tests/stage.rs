//! The audio stage on a real nats-server: a task's 16 kHz WAV artifact becomes the feature
//! artifact with the right T, the join flag is set and, once the face part is done, one
//! inference job is queued; bad audio fails the task with typed errors; and the real
//! binary, SIGKILLed mid-job, is redelivered and still ends in exactly one inference job.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lipsync_runtime::features::AudioFeatures;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{ArtifactStore, NatsArtifacts};
use lipsync_schemas::{
    AudioJob, ErrorCode, InferJob, Stage, Status, TaskRecord, WORK_VERSION, names,
};
use lipsync_tests::pipeline::ffmpeg;
use lipsync_tests::{NatsServer, new_record, topology, wait_for};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn manifest() -> PathBuf {
    root().join("models/manifest.toml").canonicalize().unwrap()
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
    cfg.nats.ack_wait_s = 2;
    cfg.audio.listen = "127.0.0.1:0".parse().unwrap();
    cfg.audio.concurrency = 1;
    cfg.models.profile = "tiny".into();
    cfg.models.manifest = manifest();
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
    /// Creates a task whose 16 kHz audio is `wav`, optionally with the face part done,
    /// and queues its audio job.
    async fn submit(&self, wav: &Path, face_done: bool) -> String {
        let tid = uuid::Uuid::new_v4().to_string();
        let mut rec = new_record(&tid);
        if face_done {
            lipsync_tests::set_done(&mut rec, Stage::Face, names::artifact::FACE_TRACK);
        }
        self.store.create(&rec).await.unwrap();
        let key = names::artifact_key(&tid, names::artifact::AUDIO_16K);
        self.artifacts.put_file(&key, wav).await.unwrap();
        lipsync_runtime::publish_work(
            &self.js,
            &AudioJob {
                v: WORK_VERSION,
                task_id: tid.clone(),
                audio_16k: key,
            },
        )
        .await
        .unwrap();
        tid
    }

    async fn wait(&self, tid: &str, secs: u64, pred: impl Fn(&TaskRecord) -> bool) -> TaskRecord {
        let pred = &pred;
        wait_for(Duration::from_secs(secs), || {
            let store = self.store.clone();
            async move {
                let (r, _) = store.get(tid).await.ok()??;
                pred(&r).then_some(r)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("task {tid}: {e}"))
    }

    async fn features(&self, tid: &str) -> AudioFeatures {
        let key = lipsync_tests::output_key(
            &self.store,
            tid,
            Stage::Audio,
            names::artifact::AUDIO_FEATURES,
        )
        .await;
        let mut r = self.artifacts.get(&key).await.unwrap();
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).await.unwrap();
        AudioFeatures::read_from(&bytes[..]).unwrap()
    }

    /// Inference jobs of `tid` in the work stream (read without consuming).
    async fn infer_jobs(&self, tid: &str) -> usize {
        let stream = self.js.get_stream(names::WORK_STREAM).await.unwrap();
        let subject = names::work_subject(Stage::Infer);
        let (mut n, mut seq) = (0, 1);
        while let Ok(m) = stream.get_first_raw_message_by_subject(&subject, seq).await {
            let job: InferJob = serde_json::from_slice(&m.payload).unwrap();
            n += usize::from(job.task_id == tid);
            seq = m.sequence + 1;
        }
        n
    }
}

/// `seconds` of pink noise as 16 kHz mono 16-bit WAV.
fn noise_wav(dir: &Path, seconds: f64) -> PathBuf {
    let p = dir.join(format!("noise_{seconds}.wav"));
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        &format!("anoisesrc=d={seconds}:c=pink:r=16000:a=0.3:seed=7"),
        "-ac",
        "1",
        "-ar",
        "16000",
        "-c:a",
        "pcm_s16le",
        p.to_str().unwrap(),
    ]);
    p
}

fn samples_of(wav: &Path) -> usize {
    hound::WavReader::open(wav).unwrap().len() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_are_stored_and_the_join_completes() {
    let env = env().await;
    let shutdown = CancellationToken::new();
    let server = lipsync_audio::start(&env.cfg, shutdown.clone())
        .await
        .unwrap();
    let speech = root().join("tests/assets/generated/speech_16k.wav");
    assert!(speech.exists(), "run `make setup`");

    // Face not done yet: features and the audio flag, no inference job.
    let tid = env.submit(&speech, false).await;
    let rec = env.wait(&tid, 60, |r| r.join.audio_done).await;
    assert!(!rec.join.infer_published);
    assert_eq!(rec.status, Status::Processing);
    let key = rec
        .output_of(Stage::Audio, names::artifact::AUDIO_FEATURES)
        .expect("features recorded")
        .to_owned();
    assert!(rec.artifacts.contains(&key), "{:?}", rec.artifacts);
    let f = env.features(&tid).await;
    assert_eq!(
        (f.t, f.layers, f.dim),
        (samples_of(&speech) / 160 / 2, 5, 384)
    );
    assert!(f.data.iter().all(|v| v.is_finite()));
    assert_eq!(env.infer_jobs(&tid).await, 0);

    // Face already done: the audio stage's completion publishes the one inference job.
    let wav = noise_wav(env.nats.store.path(), 31.3);
    let tid = env.submit(&wav, true).await;
    let rec = env.wait(&tid, 60, |r| r.join.infer_published).await;
    assert!(rec.join.audio_done && rec.join.face_done);
    assert_eq!(env.features(&tid).await.t, 3130 / 2);
    assert_eq!(env.infer_jobs(&tid).await, 1);

    shutdown.cancel();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audio_fails_the_task_with_typed_errors() {
    let env = env().await;
    let shutdown = CancellationToken::new();
    let server = lipsync_audio::start(&env.cfg, shutdown.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();

    let short = noise_wav(dir.path(), 0.02);
    let text = dir.path().join("text.wav");
    std::fs::write(&text, b"RIFF but not really a wav file".repeat(40)).unwrap();
    for (input, what) in [(short, "too short"), (text, "not a wav")] {
        let tid = env.submit(&input, true).await;
        let rec = env.wait(&tid, 60, |r| r.status == Status::Failed).await;
        let err = rec.error.expect("error recorded");
        assert_eq!(
            err.code,
            ErrorCode::UnsupportedMedia,
            "{what}: {}",
            err.message
        );
        assert!(!err.retryable, "{what}");
        assert!(
            !err.message.contains('/'),
            "{what}: path in {}",
            err.message
        );
        assert!(!rec.join.audio_done);
        assert_eq!(env.infer_jobs(&tid).await, 0);
    }

    // A missing artifact is not retried forever either.
    let tid = uuid::Uuid::new_v4().to_string();
    env.store.create(&new_record(&tid)).await.unwrap();
    lipsync_runtime::publish_work(
        &env.js,
        &AudioJob {
            v: WORK_VERSION,
            task_id: tid.clone(),
            audio_16k: names::artifact_key(&tid, names::artifact::AUDIO_16K),
        },
    )
    .await
    .unwrap();
    let rec = env.wait(&tid, 60, |r| r.status == Status::Failed).await;
    assert_eq!(rec.error.unwrap().code, ErrorCode::Internal);

    shutdown.cancel();
    server.wait().await.unwrap();
}

/// A `lipsync-audio` process with its own config file and log.
struct Binary {
    child: Child,
    log: PathBuf,
}

impl Binary {
    fn start(dir: &Path, env: &Env, name: &str) -> Self {
        let cfg = dir.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[nats]\nurl = \"{}\"\nack_wait_s = 2\n\n[runner]\npull_expires_s = 1\nnak_delay_s = 0.05\nnak_delay_max_s = 0.2\nshutdown_grace_s = 5\n\n[audio]\nlisten = \"127.0.0.1:0\"\nconcurrency = 1\n\n[models]\nprofile = \"tiny\"\nmanifest = \"{}\"\n",
                env.nats.url(),
                manifest().display()
            ),
        )
        .unwrap();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_lipsync-audio"))
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "ORT_DYLIB_PATH",
                std::env::var("ORT_DYLIB_PATH").unwrap_or_default(),
            )
            .env("RUST_LOG", "lipsync_audio=debug,lipsync_runtime=info")
            .arg("--config")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child, log }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then wait for a clean exit.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..300 {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "exit {st}:\n{}", self.tail());
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("lipsync-audio did not stop on SIGTERM:\n{}", self.tail());
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_is_redelivered_and_publishes_one_infer_job() {
    let env = env().await;
    let dir = tempfile::tempdir().unwrap();
    // Three minutes of audio: seconds of work for the (debug) binary.
    let wav = noise_wav(dir.path(), 180.0);
    let tid = env.submit(&wav, true).await;

    let mut first = Binary::start(dir.path(), &env, "first");
    let rec = env
        .wait(&tid, 60, |r| {
            r.stages.get("audio").is_some_and(|s| s.attempts >= 1)
        })
        .await;
    assert!(!rec.join.audio_done, "the job finished before the kill");
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let killed_log = first.tail();
    drop(first);

    let second = Binary::start(dir.path(), &env, "second");
    let rec = wait_for(Duration::from_secs(120), || {
        let store = env.store.clone();
        let tid = tid.clone();
        async move {
            let (r, _) = store.get(&tid).await.ok()??;
            r.join.infer_published.then_some(r)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nfirst:\n{killed_log}\nsecond:\n{}", second.tail()));
    assert!(rec.stages["audio"].attempts >= 2, "{:?}", rec.stages);
    assert_eq!(env.features(&tid).await.t, 180 * 100 / 2);
    assert_eq!(env.infer_jobs(&tid).await, 1);
    second.stop();

    // Nothing else happened to the task: one inference job, no failure.
    let (rec, _) = env.store.get(&tid).await.unwrap().unwrap();
    assert_ne!(rec.status, Status::Failed, "{:?}", rec.error);
}
