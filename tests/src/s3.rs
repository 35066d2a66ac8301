//! A real S3-compatible server for tests: `lipsync-s3-test-server` (s3s + s3s-fs, see
//! tests/README.md) as a child process on a free loopback port, over a temporary root
//! folder that outlives restarts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lipsync_runtime::artifacts::S3Artifacts;

use crate::free_port;

/// The bucket every test server creates.
pub const TEST_BUCKET: &str = "lipsync-test";

/// An S3-compatible server child process with its own root folder and one bucket.
pub struct S3Server {
    child: Option<Child>,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// Root folder: one folder per bucket, in-progress multipart parts at the top
    /// (`.upload_id-*`); kept across [`S3Server::restart`].
    pub root: tempfile::TempDir,
    /// The bucket.
    pub bucket: String,
    /// Access key id requests are signed with.
    pub access_key: String,
    /// Its secret.
    pub secret_key: String,
}

impl S3Server {
    /// Start a server with fresh random credentials; returns once it answers.
    pub async fn start() -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let secret = uuid::Uuid::new_v4().simple().to_string();
        Self::start_with(&format!("LIPSYNCTEST{}", &id[..12]), &secret).await
    }

    /// Start a server that accepts only `access_key` / `secret_key`.
    pub async fn start_with(access_key: &str, secret_key: &str) -> Result<Self> {
        let mut s = Self {
            child: None,
            port: free_port(),
            root: tempfile::tempdir()?,
            bucket: TEST_BUCKET.into(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
        };
        s.spawn().await?;
        Ok(s)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Folder of the bucket's objects.
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.path().join(&self.bucket)
    }

    /// Names of the files of unfinished multipart uploads in the root ([`pending_uploads`]).
    pub fn pending_uploads(&self) -> Vec<String> {
        pending_uploads(self.root.path())
    }

    async fn spawn(&mut self) -> Result<()> {
        let bin = crate::pipeline::binary("lipsync-s3-test-server")?;
        let child = Command::new(&bin)
            .arg("--root")
            .arg(self.root.path())
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--bucket", &self.bucket])
            .env("LIPSYNC_S3_TEST_ACCESS_KEY", &self.access_key)
            .env("LIPSYNC_S3_TEST_SECRET_KEY", &self.secret_key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(20)).await
    }

    /// Until the server accepts connections (it binds, opens the root, then serves).
    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let port = self.port;
        crate::wait_child_ready(
            &mut self.child,
            "S3 test server",
            port,
            timeout,
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await
    }

    /// Stop the server (SIGKILL) and start it again on the same port and root.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Start the server again after [`S3Server::kill`] (same port and root).
    pub async fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("the S3 test server is running");
        }
        self.spawn().await
    }

    /// Stop the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `LIPSYNC_ARTIFACTS__*` environment of a stage process using this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("BACKEND", "s3".to_owned()),
            ("S3__ENDPOINT", self.url()),
            ("S3__BUCKET", self.bucket.clone()),
            ("S3__PATH_STYLE", "true".into()),
            ("S3__ACCESS_KEY_ID", self.access_key.clone()),
            ("S3__SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("LIPSYNC_ARTIFACTS__{k}"), v))
        .collect()
    }

    /// Point `cfg`'s artifacts at this server (as [`S3Server::env`] does for a process).
    pub fn config(&self, cfg: &mut lipsync_runtime::Config) {
        cfg.artifacts.backend = lipsync_runtime::config::ArtifactBackend::S3;
        let s3 = &mut cfg.artifacts.s3;
        s3.endpoint = self.url();
        s3.bucket = self.bucket.clone();
        s3.path_style = true;
        s3.access_key_id = self.access_key.clone();
        s3.secret_access_key = self.secret_key.clone();
    }

    /// The `artifacts.s3` section of this server with the defaults otherwise.
    pub fn s3_config(&self) -> lipsync_runtime::config::S3Config {
        let mut cfg = lipsync_runtime::Config::default();
        self.config(&mut cfg);
        cfg.artifacts.s3
    }

    /// A store on this server with the default settings.
    pub fn store(&self) -> Result<S3Artifacts> {
        S3Artifacts::from_config(&self.s3_config())
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Names of the files s3s-fs keeps in `root` for multipart uploads neither completed nor
/// aborted: upload records (`.upload-<id>.json`), stored parts (`.upload_id-<id>.part-N`),
/// the object attributes of the upload (`.bucket-*.object-*.upload-<id>.metadata.json`)
/// and part writes under way (`.tmp.*`).
pub fn pending_uploads(root: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(".upload") || n.contains(".upload-") || n.starts_with(".tmp."))
        .collect();
    out.sort();
    out
}
