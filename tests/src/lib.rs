//! Test harness: a real nats-server with JetStream on a random port and a temporary
//! store per test, readiness waits without bare sleeps, explicit shutdown.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod otlp;
pub mod pipeline;
pub mod s3;

pub use s3::S3Server;

/// Path of the nats-server binary: `LIPSYNC_NATS_SERVER_BIN`, else the project venv, else
/// `nats-server` on PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LIPSYNC_NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let venv = workspace_root().join(".venv/bin/nats-server");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("nats-server")
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent")
        .to_path_buf()
}

/// Writes `clip.mp4` in `dir`: `frames` frames of ffmpeg's moving test pattern at
/// `width x height`, 25 fps, yuv420p.
pub fn pattern_clip(dir: &Path, width: u32, height: u32, frames: usize) -> PathBuf {
    let out = dir.join("clip.mp4");
    let ok = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i"])
        .arg(format!(
            "testsrc2=size={width}x{height}:rate=25,trim=end_frame={frames}"
        ))
        .args(["-pix_fmt", "yuv420p"])
        .arg(&out)
        .status()
        .expect("ffmpeg");
    assert!(ok.success());
    out
}

/// A free TCP port on loopback (bound and released; good enough for a child server).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// `artifacts.max_bytes` of every test service (1 GiB).
pub const TEST_ARTIFACT_BYTES: i64 = 1 << 30;

/// A nats-server child process with JetStream and its own store directory.
pub struct NatsServer {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    /// JetStream store directory (kept across [`NatsServer::restart`]).
    pub store: tempfile::TempDir,
}

impl NatsServer {
    /// Start a server on a random port and wait until JetStream answers.
    pub async fn start() -> Result<Self> {
        let store = tempfile::tempdir()?;
        let port = free_port();
        let mut s = Self {
            child: None,
            port,
            store,
        };
        s.spawn().await?;
        Ok(s)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> Result<()> {
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} (run `make setup`)", bin.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let url = self.url();
        wait_child_ready(
            &mut self.child,
            "nats-server",
            self.port,
            timeout,
            || async {
                match async_nats::connect(url.as_str()).await {
                    Ok(client) => async_nats::jetstream::new(client)
                        .query_account()
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            },
        )
        .await
    }

    /// Stop the server (SIGKILL) and start it again on the same port and store.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Stop the server.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A client connected to this server.
    pub async fn client(&self) -> Result<async_nats::Client> {
        Ok(async_nats::connect(self.url()).await?)
    }

    /// A runtime configuration pointing at this server, with test-friendly timings.
    pub fn config(&self) -> lipsync_runtime::Config {
        let mut cfg = lipsync_runtime::Config::default();
        cfg.nats.url = self.url();
        cfg.nats.connect_timeout_s = 10;
        cfg.runner.pull_expires_s = 1;
        cfg.runner.nak_delay_s = 0.05;
        cfg.runner.nak_delay_max_s = 0.2;
        cfg.runner.shutdown_grace_s = 5;
        cfg.runner.progress_interval_ms = 0;
        // JetStream reserves the object store's cap from the server's disk budget at
        // creation: keep it small so test servers start on a machine with little free disk.
        cfg.artifacts.max_bytes = TEST_ARTIFACT_BYTES;
        cfg.fetch.listen = "127.0.0.1:0".parse().expect("addr");
        cfg.gateway.listen = "127.0.0.1:0".parse().expect("addr");
        cfg
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `ready` until it answers true, failing if `child` exits first or `timeout`
/// passes: how the harness waits for the servers it starts.
pub async fn wait_child_ready<F, Fut>(
    child: &mut Option<Child>,
    name: &str,
    port: u16,
    timeout: Duration,
    mut ready: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(c) = child.as_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("{name} exited early: {status}");
        }
        if ready().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} on port {port} not ready in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The value of one series (`name` or `name{labels}`, as the exposition writes it) in a
/// Prometheus text page; 0 when absent.
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Wait until `key` is gone from `store` (deleted with its task, swept), for at most
/// `timeout`.
pub async fn wait_gone<S>(store: &S, key: &str, timeout: Duration) -> Result<()>
where
    S: lipsync_runtime::ArtifactStore + ?Sized,
{
    wait_for(timeout, || async {
        store.info(key).await.unwrap().is_none().then_some(())
    })
    .await
    .with_context(|| format!("{key} is still stored after {timeout:?}"))
}

/// Poll `f` until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Poll the task record `tid` until `pred` holds or `timeout` passes.
pub async fn wait_record(
    store: &lipsync_runtime::tasks::TaskStore,
    tid: &str,
    timeout: Duration,
    pred: impl Fn(&lipsync_schemas::TaskRecord) -> bool,
) -> Result<lipsync_schemas::TaskRecord> {
    let pred = &pred;
    wait_for(timeout, || async move {
        let (r, _) = store.get(tid).await.ok()??;
        pred(&r).then_some(r)
    })
    .await
    .with_context(|| format!("task {tid} did not reach the expected state"))
}

/// Bootstrap the topology on `cfg`'s server and return its handles.
pub async fn topology(cfg: &lipsync_runtime::Config) -> Result<lipsync_runtime::nats::Topology> {
    let client = lipsync_runtime::nats::connect(&cfg.nats, "test").await?;
    let js = async_nats::jetstream::new(client);
    let (topo, _) =
        lipsync_runtime::nats::bootstrap(&js, &cfg.nats, &cfg.tasks, &cfg.artifacts).await?;
    Ok(topo)
}

/// A new queued task record with URL inputs.
pub fn new_record(task_id: &str) -> lipsync_schemas::TaskRecord {
    let (epoch, rfc) = lipsync_runtime::tasks::now();
    lipsync_schemas::TaskRecord::new(
        task_id.to_owned(),
        lipsync_schemas::TaskRequest {
            video: lipsync_schemas::InputSource::Url("http://example.com/v.mp4".into()),
            audio: lipsync_schemas::InputSource::Url("http://example.com/a.wav".into()),
            model: "tiny".into(),
            inference_steps: 20,
            guidance_scale: 1.5,
            seed: Some(1),
            webhook_url: None,
            output_upload_url: None,
        },
        epoch,
        rfc,
    )
}

/// Mark `stage` of `rec` done as the runner records it, with its output `name` under
/// the plain key `<task>/<name>`, and fetch done with the video, so that a test can start
/// a task in the middle (say, audio done, face next).
pub fn set_done(rec: &mut lipsync_schemas::TaskRecord, stage: lipsync_schemas::Stage, name: &str) {
    use lipsync_schemas::{Stage, StageDone, names};
    let tid = rec.task_id.clone();
    for (s, n) in [(Stage::Fetch, names::artifact::VIDEO), (stage, name)] {
        let t = rec.stages.entry(s.as_str().to_owned()).or_default();
        let done = t.done.get_or_insert_with(StageDone::default);
        done.outputs
            .insert(n.to_owned(), names::artifact_key(&tid, n));
    }
    match stage {
        Stage::Face => rec.join.face_done = true,
        Stage::Audio => rec.join.audio_done = true,
        _ => {}
    }
}

/// The artifact key a finished stage of task `tid` recorded for `name`.
pub async fn output_key(
    store: &lipsync_runtime::tasks::TaskStore,
    tid: &str,
    stage: lipsync_schemas::Stage,
    name: &str,
) -> String {
    let (rec, _) = store
        .get(tid)
        .await
        .expect("task store")
        .expect("task record");
    rec.output_of(stage, name)
        .unwrap_or_else(|| panic!("{stage} of {tid} recorded no {name}: {:?}", rec.stages))
        .to_owned()
}
