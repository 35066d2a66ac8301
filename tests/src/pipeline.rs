//! The whole service for end-to-end tests: a real nats-server, the real stage binaries
//! and gateway binary (from the workspace's target directory; `make test` builds them),
//! a loopback HTTP server with test media, and helpers to submit and follow tasks.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use lipsync_runtime::ArtifactStore;
use serde_json::Value;

use crate::{NatsServer, S3Server, free_port, wait_for, workspace_root};

/// Every stage binary, in pipeline order.
pub const STAGES: [&str; 5] = ["fetch", "face", "audio", "infer", "mux"];

/// Directory of the workspace's debug binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("debug")
}

/// Path of a binary, failing with a hint when it was not built.
pub fn binary(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not built: run `cargo build --workspace --bins` (make test does)",
            p.display()
        );
    }
    Ok(p)
}

/// Run ffmpeg with `args`, panicking with its stderr on failure.
pub fn ffmpeg(args: &[&str]) {
    let out = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y"])
        .args(args)
        .output()
        .expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test portrait (public-domain astronaut from scikit-image), fetched by set-up.
pub fn portrait() -> PathBuf {
    workspace_root().join("tests/assets/generated/astronaut.png")
}

/// A folder of test media served over loopback HTTP.
pub struct MediaServer {
    /// Where the files are.
    pub root: PathBuf,
    /// Server address.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl MediaServer {
    /// Serve a fresh temp folder.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let root = dir.path().to_path_buf();
        let app = Router::new()
            .route("/{name}", get(serve))
            .with_state(root.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Ok(Self {
            root,
            addr,
            _dir: dir,
        })
    }

    /// URL of a file in the folder.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// Path of a file in the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// A clip of the portrait: `secs` seconds at `fps`, scaled to `w`x`h`, with a slow pan
    /// so frames differ; with a sine sound track when `sound`.
    pub fn face_clip(&self, name: &str, secs: f64, w: u32, h: u32, fps: u32, sound: bool) {
        let out = self.path(name);
        let secs_s = format!("{secs}");
        let vf = format!(
            "scale={}:{},crop={w}:{h}:'(iw-{w})/2+sin(t)*4':'(ih-{h})/2',setsar=1",
            w + 16,
            h + 16
        );
        let fps_s = fps.to_string();
        let portrait = portrait();
        let mut args: Vec<&str> = vec!["-loop", "1", "-framerate", &fps_s, "-i"];
        args.push(portrait.to_str().expect("utf-8 path"));
        if sound {
            args.extend(["-f", "lavfi", "-i", "sine=frequency=330:sample_rate=44100"]);
        }
        args.extend(["-t", &secs_s, "-vf", &vf, "-r", &fps_s]);
        args.extend([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
        ]);
        if sound {
            args.extend(["-c:a", "aac", "-shortest"]);
        }
        args.push(out.to_str().expect("utf-8 path"));
        ffmpeg(&args);
    }

    /// Speech-like audio: a tone sweep of `secs` seconds as 44.1 kHz WAV.
    pub fn audio(&self, name: &str, secs: f64) {
        let src = format!("sine=frequency=220:sample_rate=44100:duration={secs}");
        let out = self.path(name);
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            &src,
            "-af",
            "volume='0.5+0.5*sin(2*PI*3*t)':eval=frame",
            out.to_str().expect("utf-8 path"),
        ]);
    }
}

async fn serve(State(root): State<PathBuf>, UrlPath(name): UrlPath<String>) -> impl IntoResponse {
    if name.contains('/') || name.contains("..") {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(root.join(&name)).await {
        Ok(b) => b.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Which artifact backend the end-to-end tests run on: `LIPSYNC_TEST_ARTIFACTS`, `nats`
/// (the default) or `s3` (a [`S3Server`] per pipeline). `make test` runs the e2e suites
/// once with each.
///
/// # Panics
/// Any other value.
pub fn test_backend() -> &'static str {
    match std::env::var("LIPSYNC_TEST_ARTIFACTS").as_deref() {
        Err(_) | Ok("" | "nats") => "nats",
        Ok("s3") => "s3",
        Ok(other) => panic!("LIPSYNC_TEST_ARTIFACTS must be nats or s3, not {other:?}"),
    }
}

/// The running service.
pub struct Pipeline {
    /// The NATS server.
    pub nats: NatsServer,
    /// The S3-compatible server holding the artifacts when [`test_backend`] is `s3`.
    pub s3: Option<S3Server>,
    /// Test media over HTTP.
    pub media: MediaServer,
    /// Gateway port on 127.0.0.1.
    pub gateway_port: u16,
    /// Where the mux stage also writes outputs (`outputs/{task_id}/`).
    pub outputs: tempfile::TempDir,
    ports: BTreeMap<String, u16>,
    procs: BTreeMap<String, Vec<(u16, Child)>>,
    env: Vec<(String, String)>,
    http: reqwest::Client,
    /// Each process's log (stdout: `info` and up, less the access log), printed when a
    /// test fails or times out.
    logs: tempfile::TempDir,
    spawned: usize,
}

/// Lines of each process's log a failing test prints.
const LOG_TAIL_LINES: usize = 40;

/// Log folders of this process's running pipelines, for the SIGTERM report.
static LOG_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A folder for one pipeline's process logs: a fresh one under `LIPSYNC_TEST_LOG_DIR`,
/// kept after the test, when that is set; otherwise a temporary one. Registered for the
/// SIGTERM report (see [`report_on_sigterm`]).
fn log_dir() -> Result<tempfile::TempDir> {
    let dir = match std::env::var_os("LIPSYNC_TEST_LOG_DIR") {
        Some(parent) => {
            std::fs::create_dir_all(&parent)?;
            tempfile::Builder::new()
                .prefix("pipeline-")
                .disable_cleanup(true)
                .tempdir_in(parent)?
        }
        None => tempfile::tempdir()?,
    };
    report_on_sigterm();
    LOG_DIRS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(dir.path().to_owned());
    Ok(dir)
}

/// Once per test process: on SIGTERM (nextest's timeout signal) print the log tails of
/// every running pipeline, then exit. A hung test so shows its processes' logs, as a
/// failing one does (a timeout is no panic, so `Drop` alone would show nothing).
fn report_on_sigterm() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        std::thread::spawn(move || {
            rt.block_on(async {
                use tokio::signal::unix::{SignalKind, signal};
                if let Ok(mut term) = signal(SignalKind::terminate()) {
                    term.recv().await;
                }
            });
            let _ = writeln!(
                std::io::stderr(),
                "SIGTERM: the test timed out or was stopped; its processes' logs follow"
            );
            let dirs = LOG_DIRS.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for d in &dirs {
                print_log_tails(d);
            }
            std::process::exit(143);
        });
    });
}

/// The end of every process's log in `dir` on stderr (written to the stream itself: the
/// test harness's output capture, which `eprintln!` goes through, is never shown for a
/// process that exits).
fn print_log_tails(dir: &Path) {
    let mut err = std::io::stderr().lock();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        let _ = writeln!(
            err,
            "---- {} (last {} of {} lines)",
            f.display(),
            lines.len() - from,
            lines.len()
        );
        for l in &lines[from..] {
            let _ = writeln!(err, "{l}");
        }
    }
}

impl Pipeline {
    /// Start nats-server, every stage binary and the gateway; wait until all are ready.
    pub async fn start() -> Result<Self> {
        Self::start_with(&[]).await
    }

    /// Like [`Pipeline::start`] with extra `LIPSYNC_*` environment for every process.
    /// Artifacts live on the backend [`test_backend`] names.
    pub async fn start_with(extra_env: &[(&str, &str)]) -> Result<Self> {
        let nats = NatsServer::start().await?;
        let s3 = match test_backend() {
            "s3" => Some(S3Server::start().await?),
            _ => None,
        };
        let media = MediaServer::start().await?;
        let outputs = tempfile::tempdir()?;
        let mut env: Vec<(String, String)> = vec![
            ("LIPSYNC_NATS__URL".into(), nats.url()),
            ("LIPSYNC_NATS__ACK_WAIT_S".into(), "8".into()),
            (
                "LIPSYNC_ARTIFACTS__MAX_BYTES".into(),
                crate::TEST_ARTIFACT_BYTES.to_string(),
            ),
            ("LIPSYNC_RUNNER__NAK_DELAY_S".into(), "0.2".into()),
            ("LIPSYNC_RUNNER__NAK_DELAY_MAX_S".into(), "1".into()),
            ("LIPSYNC_RUNNER__PULL_EXPIRES_S".into(), "1".into()),
            ("LIPSYNC_RUNNER__PROGRESS_INTERVAL_MS".into(), "100".into()),
            ("LIPSYNC_RUNNER__SHUTDOWN_GRACE_S".into(), "5".into()),
            (
                "LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS".into(),
                "true".into(),
            ),
            ("LIPSYNC_MODELS__PROFILE".into(), "tiny".into()),
            ("LIPSYNC_FACE__INTRA_THREADS".into(), "1".into()),
            // Progress (and so the job's lease) after every 2 frames on loaded runs.
            ("LIPSYNC_FACE__BATCH_SIZE".into(), "2".into()),
            ("LIPSYNC_AUDIO__INTRA_THREADS".into(), "1".into()),
            ("LIPSYNC_INFER__INTRA_THREADS".into(), "1".into()),
            (
                "LIPSYNC_MUX__LOCAL_DIR".into(),
                outputs.path().to_string_lossy().into_owned(),
            ),
            (
                "LIPSYNC_LOG__FILTER".into(),
                "info,lipsync_gateway::access=warn,async_nats=warn".into(),
            ),
        ];
        if let Some(s3) = &s3 {
            env.extend(s3.env());
        }
        for (k, v) in extra_env {
            env.push(((*k).into(), (*v).into()));
        }
        let mut ports = BTreeMap::new();
        for s in STAGES {
            ports.insert(s.to_owned(), free_port());
        }
        let gateway_port = free_port();
        ports.insert("gateway".into(), gateway_port);
        let mut p = Self {
            nats,
            s3,
            media,
            gateway_port,
            outputs,
            ports,
            procs: BTreeMap::new(),
            env,
            logs: log_dir()?,
            spawned: 0,
            // Below the gateway's header-read timeout (10 s), so a connection left idle
            // while the test blocks (making media) is never reused after the server
            // closed it.
            http: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
        };
        for s in STAGES {
            p.spawn(s)?;
        }
        p.spawn("gateway")?;
        for s in STAGES.iter().copied().chain(["gateway"]) {
            p.wait_ready(s).await?;
        }
        Ok(p)
    }

    /// The artifact backend in use: `nats` or `s3`.
    pub fn backend(&self) -> &'static str {
        if self.s3.is_some() { "s3" } else { "nats" }
    }

    /// The runtime configuration the processes run with, as far as storage goes: this
    /// pipeline's NATS server and artifact backend.
    pub fn config(&self) -> lipsync_runtime::Config {
        let mut cfg = self.nats.config();
        if let Some(s3) = &self.s3 {
            s3.config(&mut cfg);
        }
        cfg
    }

    /// The artifact store the stages write to, whichever the backend.
    pub async fn artifacts(&self) -> Result<Arc<dyn ArtifactStore>> {
        let cfg = self.config();
        let topo = crate::topology(&cfg).await?;
        lipsync_runtime::artifacts::open(&cfg.artifacts, &topo)
    }

    /// The `LIPSYNC_*` environment every process of the pipeline gets.
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Gateway base URL.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }

    /// Operations address of a process (`/metrics`, `/readyz`).
    pub fn ops(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}", self.ports[name])
    }

    /// Start one more process of `name` (a stage or `gateway`). A second replica of a
    /// stage gets its own operations port.
    pub fn spawn(&mut self, name: &str) -> Result<()> {
        let bin = binary(&format!("lipsync-{name}"))?;
        let replicas = self.procs.get(name).map_or(0, |v| v.len());
        let port = if replicas == 0 {
            self.ports[name]
        } else {
            free_port()
        };
        let listen_key = format!("LIPSYNC_{}__LISTEN", name.to_uppercase());
        self.spawned += 1;
        let log = std::fs::File::create(
            self.logs
                .path()
                .join(format!("{:02}-lipsync-{name}.log", self.spawned)),
        )?;
        let mut cmd = Command::new(bin);
        cmd.current_dir(workspace_root())
            .env(listen_key, format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::inherit());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn lipsync-{name}"))?;
        self.procs
            .entry(name.to_owned())
            .or_default()
            .push((port, child));
        Ok(())
    }

    /// Operations addresses of every running process of `name`, in start order.
    pub fn replica_ops(&self, name: &str) -> Vec<String> {
        self.procs
            .get(name)
            .map(|v| {
                v.iter()
                    .map(|(port, _)| format!("http://127.0.0.1:{port}"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// SIGKILL the `i`-th running process of `name` (start order), leaving the others.
    pub fn kill_replica(&mut self, name: &str, i: usize) {
        if let Some(v) = self.procs.get_mut(name)
            && i < v.len()
        {
            let (_, mut c) = v.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait until every running process of `name` answers `/readyz` with 200.
    pub async fn wait_all_ready(&self, name: &str) -> Result<()> {
        for url in self.replica_ops(name) {
            self.wait_url_ready(&url)
                .await
                .with_context(|| format!("a lipsync-{name} replica is not ready"))?;
        }
        Ok(())
    }

    /// Wait until the first process of `name` answers `/readyz` with 200.
    pub async fn wait_ready(&self, name: &str) -> Result<()> {
        self.wait_url_ready(&self.ops(name))
            .await
            .with_context(|| format!("lipsync-{name} not ready"))
    }

    async fn wait_url_ready(&self, ops: &str) -> Result<()> {
        let url = format!("{ops}/readyz");
        let http = self.http.clone();
        wait_for(Duration::from_secs(60), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await
    }

    /// SIGKILL every process of `name`.
    pub fn kill(&mut self, name: &str) {
        for (_, mut c) in self.procs.remove(name).unwrap_or_default() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL `name` and start it again, waiting until it is ready.
    pub async fn restart(&mut self, name: &str) -> Result<()> {
        self.kill(name);
        self.spawn(name)?;
        self.wait_ready(name).await
    }

    /// Submit through the seed API; returns the whole answer.
    pub async fn submit(&self, body: Value) -> Result<Value> {
        let r = self
            .http
            .post(format!("{}/sync", self.base()))
            .json(&body)
            .send()
            .await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("POST /sync answered {status}: {v}");
        }
        Ok(v)
    }

    /// Submit `video` and `audio` (names in the media folder); returns the task id.
    pub async fn submit_media(&self, video: &str, audio: &str) -> Result<String> {
        let v = self
            .submit(serde_json::json!({
                "video_url": self.media.url(video),
                "audio_url": self.media.url(audio),
                "inference_steps": 4,
                "seed": 7,
            }))
            .await?;
        Ok(v["task_id"].as_str().context("task_id")?.to_owned())
    }

    /// The task record as the gateway serves it.
    pub async fn task(&self, id: &str) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}/task/{id}", self.base()))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Poll until the task is completed or failed.
    pub async fn wait_done(&self, id: &str, timeout: Duration) -> Result<Value> {
        wait_for(timeout, || async {
            let t = self.task(id).await.ok()?;
            matches!(t["status"].as_str(), Some("completed" | "failed")).then_some(t)
        })
        .await
        .with_context(|| format!("task {id} did not finish"))
    }

    /// Download a path of the gateway (e.g. the task's `output_video_url`) to `dest`.
    pub async fn download(&self, path: &str, dest: &Path) -> Result<()> {
        let r = self
            .http
            .get(format!("{}{path}", self.base()))
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("GET {path}: {}", r.status());
        }
        tokio::fs::write(dest, r.bytes().await?).await?;
        Ok(())
    }

    /// `GET /queue` as JSON.
    pub async fn queue(&self) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}/queue", self.base()))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Scrape a process's metrics.
    pub async fn metrics(&self, name: &str) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.ops(name)))
            .send()
            .await?
            .text()
            .await?)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let names: Vec<String> = self.procs.keys().cloned().collect();
        for n in names {
            self.kill(&n);
        }
        if std::thread::panicking() {
            print_log_tails(self.logs.path());
        }
        LOG_DIRS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|d| d != self.logs.path());
    }
}

/// ffprobe facts of a result file.
#[derive(Debug)]
pub struct Probe {
    /// Width, height.
    pub size: (u32, u32),
    /// Video frame rate.
    pub fps: f64,
    /// Number of video frames.
    pub frames: u64,
    /// Audio stream duration in seconds, if any.
    pub audio_s: Option<f64>,
}

/// Probe a result video (counting frames).
pub fn probe(path: &Path) -> Result<Probe> {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-of",
            "json",
        ])
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!("ffprobe: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let streams = v["streams"].as_array().context("streams")?;
    let video = streams
        .iter()
        .find(|s| s["codec_type"] == "video")
        .context("no video stream")?;
    let rate = video["avg_frame_rate"].as_str().unwrap_or("0/1");
    let (n, d) = rate.split_once('/').unwrap_or((rate, "1"));
    let fps = n.parse::<f64>().unwrap_or(0.0) / d.parse::<f64>().unwrap_or(1.0).max(1e-9);
    let audio_s = streams
        .iter()
        .find(|s| s["codec_type"] == "audio")
        .and_then(|a| a["duration"].as_str())
        .and_then(|d| d.parse().ok());
    Ok(Probe {
        size: (
            video["width"].as_u64().unwrap_or(0) as u32,
            video["height"].as_u64().unwrap_or(0) as u32,
        ),
        fps,
        frames: video["nb_read_frames"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        audio_s,
    })
}

/// Decode every frame of a video as RGB24 (small test clips only).
pub fn frames(path: &Path) -> Result<(u32, u32, Vec<Vec<u8>>)> {
    let mut r = lipsync_runtime::media::FrameReader::open(path)?;
    let (w, h) = (r.geometry.width, r.geometry.height);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while r.read_into(&mut buf)? {
        out.push(buf.clone());
    }
    Ok((w, h, out))
}
