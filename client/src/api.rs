//! The HTTP side of the gateway API: submit (JSON with URLs, or a multipart upload of two
//! files), task, task list, queue, cancel and output downloads.
//!
//! Answers 429 (rate limited, tenant quota) and 503 (work queue full, NATS unavailable)
//! are retried up to [`Client::with_retries`] times, waiting what the server's
//! `Retry-After` says (capped at [`MAX_RETRY_WAIT`]), else an exponential backoff.
//!
//! Answers are kept as raw JSON next to the few typed fields the client acts on, so
//! `--json` prints exactly what the server sent and newer servers' extra fields pass
//! through.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::TryStreamExt;
use indicatif::ProgressBar;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::multipart::{Form, Part};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::error::{ClientError, Result};

/// An input given on the command line: an http(s) URL the server downloads, or a local
/// file that is uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Downloaded by the server.
    Url(String),
    /// Uploaded by the client.
    File(PathBuf),
}

impl Input {
    /// `http://` or `https://` (any case) is a URL; anything else a file path.
    pub fn parse(arg: &str) -> Self {
        let lower = arg.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            Input::Url(arg.to_owned())
        } else {
            Input::File(PathBuf::from(arg))
        }
    }
}

/// The body of a `POST /sync`.
enum SyncBody<'a> {
    /// JSON: each input a URL or a direct upload's id.
    Json(JsonInput, JsonInput),
    /// A multipart form of the two files.
    Files(&'a Path, &'a Path),
}

/// One input of a JSON `POST /sync`.
enum JsonInput {
    /// `<name>_url`.
    Url(String),
    /// `<name>_upload_id`.
    Upload(String),
}

impl JsonInput {
    fn field(&self, name: &str) -> String {
        match self {
            JsonInput::Url(_) => format!("{name}_url"),
            JsonInput::Upload(_) => format!("{name}_upload_id"),
        }
    }

    fn value(&self) -> &str {
        match self {
            JsonInput::Url(v) | JsonInput::Upload(v) => v,
        }
    }
}

/// Optional request parameters (`None`: the server's default).
#[derive(Debug, Clone, Default)]
pub struct Params {
    /// `inference_steps`.
    pub steps: Option<u32>,
    /// `guidance_scale`.
    pub guidance: Option<f64>,
    /// `seed`.
    pub seed: Option<u64>,
    /// `inference_ckpt_path` (a model name the server has configured).
    pub model: Option<String>,
    /// `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// `webhook_url`: the server POSTs the signed final record there.
    pub webhook_url: Option<String>,
}

/// Longest wait between two tries of a refused request, whatever `Retry-After` says.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(120);
/// Default number of retries of a 429/503 answer.
pub const DEFAULT_RETRIES: u32 = 5;

/// A task as the gateway shows it (`GET /task/{id}`, WebSocket messages).
#[derive(Debug, Clone)]
pub struct Task {
    /// The typed fields.
    pub view: TaskFields,
    /// The whole JSON object as received.
    pub raw: Value,
}

/// The fields of a task the client acts on.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskFields {
    /// Task id.
    pub task_id: String,
    /// `queued`, `processing`, `completed` or `failed`.
    pub status: String,
    /// Current (or last) stage.
    #[serde(default)]
    pub stage: Option<String>,
    /// 0.0-1.0.
    #[serde(default)]
    pub progress: f64,
    /// Human-readable state.
    #[serde(default)]
    pub message: String,
    /// Tasks ahead of this one not yet on the GPU.
    #[serde(default)]
    pub queue_position: Option<u64>,
    /// Result video path (relative to the server) once completed.
    #[serde(default)]
    pub output_video_url: Option<String>,
    /// Mask video path once completed.
    #[serde(default)]
    pub output_mask_url: Option<String>,
    /// Set when failed.
    #[serde(default)]
    pub error: Option<TaskErrorFields>,
    /// Notices such as "a test model is in use".
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// `error` of a failed task.
#[derive(Debug, Clone, Deserialize)]
pub struct TaskErrorFields {
    /// Machine-readable code, e.g. `no_face_detected`, `cancelled`.
    pub code: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
}

impl Task {
    /// Parses a task JSON object.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] when required fields are missing.
    pub fn from_value(raw: Value) -> Result<Self> {
        let view = TaskFields::deserialize(&raw)
            .map_err(|e| ClientError::Protocol(format!("task record: {e}")))?;
        Ok(Task { view, raw })
    }

    /// `completed` or `failed`.
    pub fn is_terminal(&self) -> bool {
        matches!(self.view.status.as_str(), "completed" | "failed")
    }
}

/// A gateway client (cheap to clone).
#[derive(Clone)]
pub struct Client {
    base: url::Url,
    http: reqwest::Client,
    /// For presigned upload URLs: no API key (it is not the bucket's to see).
    upload_http: reqwest::Client,
    api_key: Option<String>,
    retries: u32,
    on_retry: std::sync::Arc<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base.as_str())
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `server` (e.g. `http://localhost:8000`), sending `api_key` as a bearer
    /// token when given.
    ///
    /// # Errors
    /// [`ClientError::Usage`] for a server address that is not an http(s) URL.
    pub fn new(server: &str, api_key: Option<String>) -> Result<Self> {
        let mut base = url::Url::parse(server)
            .map_err(|e| ClientError::Usage(format!("--server `{server}`: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(ClientError::Usage(format!(
                "--server `{server}` must be an http:// or https:// URL"
            )));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let mut headers = HeaderMap::new();
        if let Some(k) = &api_key {
            let v = HeaderValue::from_str(&format!("Bearer {k}"))
                .map_err(|_| ClientError::Usage("--api-key must be visible ASCII".into()))?;
            headers.insert(AUTHORIZATION, v);
        }
        let builder = || {
            reqwest::Client::builder()
                .user_agent(concat!("lipsync-cli/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(std::time::Duration::from_secs(10))
        };
        let http = builder()
            .default_headers(headers)
            .build()
            .map_err(|e| self_transport(server, e))?;
        let upload_http = builder().build().map_err(|e| self_transport(server, e))?;
        Ok(Self {
            base,
            http,
            upload_http,
            api_key,
            retries: DEFAULT_RETRIES,
            on_retry: std::sync::Arc::new(|msg| eprintln!("{msg}")),
        })
    }

    /// Retries of a request answered 429 or 503 (0: none).
    pub fn with_retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Where retry notices go (default: stderr).
    pub fn on_retry(mut self, f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        self.on_retry = std::sync::Arc::new(f);
        self
    }

    /// The server's base URL.
    pub fn base(&self) -> &url::Url {
        &self.base
    }

    /// The API key, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// `path` (absolute like `/outputs/..` or relative) resolved against the server URL,
    /// keeping a base path prefix such as `https://host/lipsync/`.
    pub fn url(&self, path: &str) -> Result<url::Url> {
        if path.starts_with("http://") || path.starts_with("https://") {
            return url::Url::parse(path).map_err(|e| ClientError::Protocol(e.to_string()));
        }
        self.base
            .join(path.trim_start_matches('/'))
            .map_err(|e| ClientError::Protocol(format!("bad path `{path}`: {e}")))
    }

    fn transport(&self, e: reqwest::Error) -> ClientError {
        self_transport(self.base.as_str(), e)
    }

    /// Sends a request and returns the JSON body of a 2xx answer, or the API error;
    /// 429 and 503 are retried (the request must be clonable: no streaming body).
    async fn send_json(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        self.send_json_with(|| {
            let r = req.try_clone().ok_or_else(|| {
                ClientError::Protocol("internal: request body cannot be retried".into())
            });
            async move { r }
        })
        .await
    }

    /// Like [`Self::send_json`], building the request anew for every try (uploads).
    async fn send_json_with<F, Fut>(&self, mut make: F) -> Result<Value>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::RequestBuilder>>,
    {
        let mut attempt = 0u32;
        loop {
            let resp = make().await?.send().await.map_err(|e| self.transport(e))?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = resp.bytes().await.map_err(|e| self.transport(e))?;
            if status.is_success() {
                return serde_json::from_slice(&body)
                    .map_err(|e| ClientError::Protocol(format!("answer is not JSON: {e}")));
            }
            let err = api_error(status.as_u16(), &body);
            if !matches!(status.as_u16(), 429 | 503) || attempt >= self.retries {
                return Err(err);
            }
            attempt += 1;
            let wait = retry_wait(retry_after, attempt);
            (self.on_retry)(&format!(
                "server busy: {err}; retry {attempt}/{} in {:.0} s",
                self.retries,
                wait.as_secs_f64().ceil()
            ));
            tokio::time::sleep(wait).await;
        }
    }

    /// `POST /sync`: JSON for two URLs, multipart for two files (uploaded streaming,
    /// `upload_bar` advanced by the bytes sent). With `direct`, each file goes to the
    /// server's bucket first ([`Self::direct_upload`]) and the request is JSON naming the
    /// upload ids, so a URL and a file may be mixed. Returns the answer (`task_id`,
    /// `queue_position`, `status`, `message`).
    ///
    /// # Errors
    /// One URL and one file without `direct` ([`ClientError::Usage`]), unreadable files,
    /// a failed direct upload, or the server's refusal.
    pub async fn submit(
        &self,
        video: &Input,
        audio: &Input,
        params: &Params,
        direct: bool,
        upload_bar: &ProgressBar,
    ) -> Result<Value> {
        upload_bar.set_position(0);
        upload_bar.set_length(0);
        let body = match (video, audio) {
            _ if direct => SyncBody::Json(
                self.json_input(video, "video", upload_bar).await?,
                self.json_input(audio, "audio", upload_bar).await?,
            ),
            (Input::Url(v), Input::Url(a)) => {
                SyncBody::Json(JsonInput::Url(v.clone()), JsonInput::Url(a.clone()))
            }
            (Input::File(v), Input::File(a)) => SyncBody::Files(v, a),
            _ => {
                return Err(ClientError::Usage(
                    "give two URLs (the server downloads them) or two files (uploaded); \
                     mixing a URL and a file needs --direct-upload"
                        .into(),
                ));
            }
        };
        let answer = self
            .send_json_with(|| self.submit_request(&body, params, upload_bar))
            .await?;
        if answer.get("task_id").and_then(Value::as_str).is_none() {
            return Err(ClientError::Protocol("submit answer has no task_id".into()));
        }
        Ok(answer)
    }

    /// A URL as it is; a file uploaded directly (its upload id).
    async fn json_input(&self, input: &Input, kind: &str, bar: &ProgressBar) -> Result<JsonInput> {
        Ok(match input {
            Input::Url(u) => JsonInput::Url(u.clone()),
            Input::File(f) => JsonInput::Upload(self.direct_upload(f, kind, bar).await?),
        })
    }

    /// A direct upload: `POST /uploads` (`kind` is `video` or `audio`), then one `PUT` of
    /// the file, streaming, to the presigned URL it answers (sent without the API key;
    /// `bar` advanced by the bytes sent). Returns the upload id for `POST /sync`.
    ///
    /// # Errors
    /// The server's refusal (`uploads_unavailable` without the s3 backend), an unreadable
    /// file, or a failed `PUT` (the URL, a secret, is never part of the error).
    pub async fn direct_upload(
        &self,
        path: &Path,
        kind: &str,
        bar: &ProgressBar,
    ) -> Result<String> {
        // The file first: an unreadable one asks the server for nothing.
        let (len, body) = file_body(path, bar).await?;
        let req = self
            .http
            .post(self.url("/uploads")?)
            .json(&serde_json::json!({ "kind": kind }));
        let ticket = self.send_json(req).await?;
        let field = |name: &str| {
            ticket
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| ClientError::Protocol(format!("POST /uploads answer has no {name}")))
        };
        let (id, url) = (field("upload_id")?, field("upload_url")?);
        let host = url::Url::parse(&url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let resp = self
            .upload_http
            .put(&url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .send()
            .await
            .map_err(|e| self_transport(&format!("upload host {host}"), e.without_url()))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ClientError::Protocol(format!(
                "the upload of {} to {host} was answered HTTP {}",
                path.display(),
                status.as_u16()
            )));
        }
        Ok(id)
    }

    /// One `POST /sync` request (built again for each retry: a multipart upload restarts).
    async fn submit_request(
        &self,
        body: &SyncBody<'_>,
        params: &Params,
        upload_bar: &ProgressBar,
    ) -> Result<reqwest::RequestBuilder> {
        let mut req = self.http.post(self.url("/sync")?);
        if let Some(k) = &params.idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let fields = [
            ("inference_steps", params.steps.map(Value::from)),
            ("guidance_scale", params.guidance.map(Value::from)),
            ("seed", params.seed.map(Value::from)),
            ("inference_ckpt_path", params.model.clone().map(Value::from)),
            ("webhook_url", params.webhook_url.clone().map(Value::from)),
        ];
        Ok(match body {
            SyncBody::Json(v, a) => {
                let mut obj = serde_json::Map::new();
                obj.insert(v.field("video"), v.value().into());
                obj.insert(a.field("audio"), a.value().into());
                for (k, v) in fields {
                    if let Some(v) = v {
                        obj.insert(k.into(), v);
                    }
                }
                req.json(&obj)
            }
            SyncBody::Files(v, a) => {
                upload_bar.set_position(0);
                upload_bar.set_length(0);
                let mut form = Form::new()
                    .part("video", file_part(v, upload_bar).await?)
                    .part("audio", file_part(a, upload_bar).await?);
                for (k, v) in fields {
                    match v {
                        Some(Value::String(s)) => form = form.text(k, s),
                        Some(v) => form = form.text(k, v.to_string()),
                        None => {}
                    }
                }
                req.multipart(form)
            }
        })
    }

    /// `GET /task/{id}`.
    ///
    /// # Errors
    /// Unknown id (`not_found`), transport errors.
    pub async fn task(&self, id: &str) -> Result<Task> {
        let url = self.url(&format!("/task/{}", encode(id)))?;
        Task::from_value(self.send_json(self.http.get(url)).await?)
    }

    /// `DELETE /task/{id}`: cancel; returns the record.
    ///
    /// # Errors
    /// Unknown id, an already completed task (`task_finished`), transport errors.
    pub async fn cancel(&self, id: &str) -> Result<Task> {
        let url = self.url(&format!("/task/{}", encode(id)))?;
        Task::from_value(self.send_json(self.http.delete(url)).await?)
    }

    /// `GET /tasks?limit=&cursor=`: one page of the caller's tasks, newest first.
    /// Returns the tasks and the cursor of the next page (`None`: last page).
    ///
    /// # Errors
    /// Transport errors, a bad cursor, an answer without `tasks`.
    pub async fn list(
        &self,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<(Vec<Task>, Option<String>, Value)> {
        let mut url = self.url("/tasks")?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(l) = limit {
                q.append_pair("limit", &l.to_string());
            }
            if let Some(c) = cursor {
                q.append_pair("cursor", c);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let raw = self.send_json(self.http.get(url)).await?;
        let tasks = raw
            .get("tasks")
            .and_then(Value::as_array)
            .ok_or_else(|| ClientError::Protocol("task list has no `tasks` array".into()))?
            .iter()
            .cloned()
            .map(Task::from_value)
            .collect::<Result<Vec<_>>>()?;
        let next = raw
            .get("next_cursor")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok((tasks, next, raw))
    }

    /// `GET /queue`.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn queue(&self) -> Result<Value> {
        self.send_json(self.http.get(self.url("/queue")?)).await
    }

    /// Downloads `path` (an `output_*_url`) to `dest`: written to `<dest>.part` and renamed
    /// when complete; a broken transfer is resumed with a `Range` request (up to 5 tries).
    /// Returns the byte count.
    ///
    /// # Errors
    /// HTTP errors, a transfer that keeps failing, or local I/O.
    pub async fn download(&self, path: &str, dest: &Path, bar: &ProgressBar) -> Result<u64> {
        const TRIES: u32 = 5;
        let url = self.url(path)?;
        let part = part_path(dest);
        let mut file = tokio::fs::File::create(&part)
            .await
            .map_err(|e| ClientError::io(format!("cannot create {}", part.display()), e))?;
        let mut have: u64 = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.download_from(&url, &mut file, &mut have, bar).await {
                Ok(()) => break,
                Err(e @ ClientError::Transport { .. }) if attempt < TRIES => {
                    bar.println(format!(
                        "download interrupted ({e}), resuming at byte {have}"
                    ));
                    tokio::time::sleep(std::time::Duration::from_millis(500 * u64::from(attempt)))
                        .await;
                }
                Err(e) => {
                    drop(file);
                    let _ = tokio::fs::remove_file(&part).await;
                    return Err(e);
                }
            }
        }
        file.flush()
            .await
            .and(file.sync_all().await)
            .map_err(|e| ClientError::io(format!("cannot write {}", part.display()), e))?;
        drop(file);
        tokio::fs::rename(&part, dest)
            .await
            .map_err(|e| ClientError::io(format!("cannot rename to {}", dest.display()), e))?;
        Ok(have)
    }

    async fn download_from(
        &self,
        url: &url::Url,
        file: &mut tokio::fs::File,
        have: &mut u64,
        bar: &ProgressBar,
    ) -> Result<()> {
        use tokio::io::AsyncSeekExt;
        let mut req = self.http.get(url.clone());
        if *have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        let status = resp.status().as_u16();
        let io_err = |e| ClientError::io("cannot write the download", e);
        match status {
            206 => {}
            200 => {
                // Whole file (first request, or the server ignored the range): restart.
                *have = 0;
                file.set_len(0).await.map_err(io_err)?;
                file.seek(std::io::SeekFrom::Start(0))
                    .await
                    .map_err(io_err)?;
                bar.set_position(0);
                if let Some(len) = resp.content_length() {
                    bar.set_length(len);
                }
            }
            _ => {
                let body = resp.bytes().await.unwrap_or_default();
                return Err(api_error(status, &body));
            }
        }
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.try_next().await.map_err(|e| self.transport(e))? {
            file.write_all(&chunk).await.map_err(io_err)?;
            *have += chunk.len() as u64;
            bar.set_position(*have);
        }
        Ok(())
    }
}

/// `Retry-After` in seconds (the gateway's form); an HTTP date is not parsed (`None`:
/// the backoff applies).
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The wait before retry `attempt` (1-based): the server's `Retry-After` if it sent one,
/// else 1, 2, 4 ... s; never above [`MAX_RETRY_WAIT`].
fn retry_wait(retry_after: Option<Duration>, attempt: u32) -> Duration {
    let backoff = Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6));
    retry_after.unwrap_or(backoff).min(MAX_RETRY_WAIT)
}

fn self_transport(server: &str, source: reqwest::Error) -> ClientError {
    ClientError::Transport {
        server: server.to_owned(),
        source,
    }
}

/// Percent-encodes a path segment (task ids are UUIDs; anything else is passed safely).
fn encode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// The API error of a non-2xx answer (`{error: {code, message}}`, or a generic one).
fn api_error(status: u16, body: &[u8]) -> ClientError {
    #[derive(Deserialize)]
    struct Body {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        code: String,
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => ClientError::Api {
            status,
            code: b.error.code,
            message: b.error.message,
        },
        Err(_) => ClientError::Api {
            status,
            code: "http_error".into(),
            message: String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned(),
        },
    }
}

/// A file's length and a streaming body of it whose bytes advance `bar`.
async fn file_body(path: &Path, bar: &ProgressBar) -> Result<(u64, reqwest::Body)> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ClientError::io(format!("cannot open {}", path.display()), e))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ClientError::io(format!("cannot read {}", path.display()), e))?
        .len();
    bar.inc_length(len);
    let counted = bar.clone();
    let stream = ReaderStream::new(file).inspect_ok(move |chunk| counted.inc(chunk.len() as u64));
    Ok((len, reqwest::Body::wrap_stream(stream)))
}

/// A streaming multipart file part whose bytes advance `bar`.
async fn file_part(path: &Path, bar: &ProgressBar) -> Result<Part> {
    let (len, body) = file_body(path, bar).await?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upload".into());
    Part::stream_with_length(body, len)
        .file_name(name)
        .mime_str("application/octet-stream")
        .map_err(|e| ClientError::Protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_urls_and_files() {
        assert_eq!(
            Input::parse("https://x/v.mp4"),
            Input::Url("https://x/v.mp4".into())
        );
        assert_eq!(Input::parse("HTTP://x"), Input::Url("HTTP://x".into()));
        assert_eq!(Input::parse("v.mp4"), Input::File("v.mp4".into()));
        assert_eq!(Input::parse("./http:/x"), Input::File("./http:/x".into()));
    }

    #[test]
    fn urls_keep_a_base_path() {
        let c = Client::new("https://h.example/lipsync", None).unwrap();
        assert_eq!(
            c.url("/outputs/a/result.mp4").unwrap().as_str(),
            "https://h.example/lipsync/outputs/a/result.mp4"
        );
        let c = Client::new("http://localhost:8000", None).unwrap();
        assert_eq!(
            c.url("/queue").unwrap().as_str(),
            "http://localhost:8000/queue"
        );
        assert!(Client::new("ftp://x", None).is_err());
    }

    #[test]
    fn api_errors_parse_or_fall_back() {
        let e = api_error(
            404,
            br#"{"error":{"code":"not_found","message":"no such task"}}"#,
        );
        assert_eq!(e.to_string(), "no such task (not_found, HTTP 404)");
        let e = api_error(502, b"bad gateway");
        assert_eq!(e.to_string(), "bad gateway (http_error, HTTP 502)");
    }

    #[test]
    fn retry_waits_follow_retry_after_or_back_off() {
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(
            retry_wait(Some(Duration::from_secs(3)), 1),
            Duration::from_secs(3)
        );
        assert_eq!(retry_wait(Some(Duration::from_secs(0)), 4), Duration::ZERO);
        assert_eq!(
            retry_wait(Some(Duration::from_secs(9999)), 1),
            MAX_RETRY_WAIT
        );
        assert_eq!(retry_wait(None, 1), Duration::from_secs(1));
        assert_eq!(retry_wait(None, 3), Duration::from_secs(4));
        assert_eq!(retry_wait(None, 30), Duration::from_secs(64));
    }

    #[test]
    fn part_file_name() {
        assert_eq!(
            part_path(Path::new("out/r.mp4")),
            Path::new("out/r.mp4.part")
        );
    }
}
