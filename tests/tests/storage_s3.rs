//! The S3 artifact backend against a real S3-compatible server (`lipsync-s3-test-server`,
//! s3s + s3s-fs; tests/README.md): round trips and typed errors, a 1 GiB multipart put
//! in flat memory, exact ranged reads, presigned URLs (and the server refusing tampered
//! and expired ones), nothing left behind by failed or abandoned puts, a put that outlives
//! a server restart, and credentials that never show in output, errors or logs.

use std::future::Future;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use lipsync_runtime::artifacts::S3Artifacts;
use lipsync_runtime::config::S3Config;
use lipsync_runtime::{ArtifactError, ArtifactStore};
use lipsync_tests::pipeline::{MediaServer, binary};
use lipsync_tests::{NatsServer, S3Server, free_port, wait_for};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

const MIB: u64 = 1 << 20;

/// Byte `pos` onwards of a fixed pseudo-random sequence (splitmix64 of the word index).
fn pattern_at(pos: u64, out: &mut [u8]) {
    let mut i = 0;
    while i < out.len() {
        let p = pos + i as u64;
        let mut z = (p / 8).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let word = (z ^ (z >> 31)).to_le_bytes();
        let off = (p % 8) as usize;
        let n = (8 - off).min(out.len() - i);
        out[i..i + n].copy_from_slice(&word[off..off + n]);
        i += n;
    }
}

fn pattern(len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    pattern_at(0, &mut v);
    v
}

type Gate = Pin<Box<dyn Future<Output = ()> + Send>>;

/// `len` bytes of [`pattern_at`], generated as they are read (never held whole) and
/// hashed on the way; optionally failing after `fail_at` bytes or waiting at `gate_at`
/// bytes until the gate opens.
struct Source {
    pos: u64,
    len: u64,
    sha: Sha256,
    fail_at: Option<u64>,
    gate: Option<(u64, Gate)>,
}

impl Source {
    fn new(len: u64) -> Self {
        Self {
            pos: 0,
            len,
            sha: Sha256::new(),
            fail_at: None,
            gate: None,
        }
    }

    /// Fails with an I/O error once `at` bytes were read.
    fn failing_at(mut self, at: u64) -> Self {
        self.fail_at = Some(at);
        self
    }

    /// Stops at byte `at` until `open` completes (forever if it never does).
    fn gated_at(mut self, at: u64, open: impl Future<Output = ()> + Send + 'static) -> Self {
        self.gate = Some((at, Box::pin(open)));
        self
    }

    /// SHA-256 of everything read so far.
    fn digest(&self) -> String {
        hex::encode(self.sha.clone().finalize())
    }
}

impl AsyncRead for Source {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let mut end = this.len;
        if let Some((at, gate)) = this.gate.as_mut() {
            if this.pos == *at {
                match gate.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => this.gate = None,
                }
            } else {
                end = end.min(*at);
            }
        }
        if let Some(at) = this.fail_at {
            if this.pos >= at {
                return Poll::Ready(Err(std::io::Error::other("the source broke")));
            }
            end = end.min(at);
        }
        let n = (buf.remaining() as u64).min(end - this.pos) as usize;
        let out = buf.initialize_unfilled_to(n);
        pattern_at(this.pos, out);
        this.sha.update(&*out);
        buf.advance(n);
        this.pos += n as u64;
        Poll::Ready(Ok(()))
    }
}

/// SHA-256 and length of an artifact, streamed.
async fn sha_of(store: &dyn ArtifactStore, key: &str) -> (String, u64) {
    let mut r = store.get(key).await.unwrap();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        len += n as u64;
    }
    (hex::encode(sha.finalize()), len)
}

async fn read_all(mut r: lipsync_runtime::artifacts::ArtifactReader) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.unwrap();
    v
}

/// Test-friendly retries: a request to a dead server gives up within seconds.
fn quick(mut cfg: S3Config) -> S3Config {
    cfg.max_retries = 2;
    cfg.retry_timeout_s = 5;
    cfg
}

/// Peak resident memory of this process (`VmHWM`) in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

/// Stored part files of unfinished multipart uploads (`.upload_id-<id>.part-N`).
fn stored_parts(s3: &S3Server) -> usize {
    s3.pending_uploads()
        .iter()
        .filter(|n| n.starts_with(".upload_id-"))
        .count()
}

#[tokio::test]
async fn round_trip_typed_not_found_and_prefix() {
    let s3 = S3Server::start().await.unwrap();
    let store = s3.store().unwrap();
    assert_eq!(store.backend(), "s3");
    assert_eq!(store.usage().await.unwrap(), None);

    let body = pattern(300_001);
    let meta = store.put("t1/video.mp4", &mut &body[..]).await.unwrap();
    assert_eq!(meta.size, body.len() as u64);
    let digest = meta.digest.clone().expect("an ETag");
    let info = store.info("t1/video.mp4").await.unwrap().expect("stored");
    assert_eq!(info.size, body.len() as u64);
    assert_eq!(info.digest.as_deref(), Some(digest.as_str()));
    assert!(info.modified.is_some(), "{info:?}");
    assert_eq!(
        read_all(store.get("t1/video.mp4").await.unwrap()).await,
        body
    );
    // On disk where S3 would keep it: the bucket, then the key.
    assert_eq!(
        std::fs::read(s3.bucket_dir().join("t1/video.mp4")).unwrap(),
        body
    );

    // A second put replaces the object.
    let small = pattern(10);
    store.put("t1/video.mp4", &mut &small[..]).await.unwrap();
    assert_eq!(
        read_all(store.get("t1/video.mp4").await.unwrap()).await,
        small
    );

    store.delete("t1/video.mp4").await.unwrap();
    assert!(store.info("t1/video.mp4").await.unwrap().is_none());
    let err = store.get("t1/video.mp4").await.err().expect("gone");
    assert!(
        matches!(&err, ArtifactError::NotFound(k) if k == "t1/video.mp4"),
        "{err:?}"
    );
    let err = store.get_range("t1/video.mp4", 0, 1).await.err().unwrap();
    assert!(matches!(err, ArtifactError::NotFound(_)), "{err:?}");
    // Deleting what is not there is no error.
    store.delete("t1/video.mp4").await.unwrap();
    store.delete("never/was").await.unwrap();

    // A prefix puts keys under it and lists them without it.
    let mut cfg = s3.s3_config();
    cfg.prefix = "/deploy-a/".into();
    let prefixed = S3Artifacts::from_config(&cfg).unwrap();
    prefixed.put("t2/audio.wav", &mut &body[..]).await.unwrap();
    store.put("outside", &mut &small[..]).await.unwrap();
    assert_eq!(
        std::fs::read(s3.bucket_dir().join("deploy-a/t2/audio.wav")).unwrap(),
        body
    );
    assert_eq!(prefixed.keys().await.unwrap(), vec!["t2/audio.wav"]);
    let mut all = store.keys().await.unwrap();
    all.sort();
    assert_eq!(all, vec!["deploy-a/t2/audio.wav", "outside"]);
    assert!(prefixed.info("outside").await.unwrap().is_none());
    assert_eq!(
        read_all(store.get("deploy-a/t2/audio.wav").await.unwrap()).await,
        body
    );
    prefixed.delete("t2/audio.wav").await.unwrap();
    assert!(prefixed.keys().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_goes_up_in_parts_and_back_in_flat_memory() {
    let s3 = S3Server::start().await.unwrap();
    let cfg = s3.s3_config();
    let store = S3Artifacts::from_config(&cfg).unwrap();
    let size = 1u64 << 30;
    let bound = (cfg.upload_concurrency as u64 + 2) * cfg.part_size_bytes + 64 * MIB;

    // Reset the peak to the current resident size where the kernel allows it.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = peak_rss();
    let started = Instant::now();
    let mut src = Source::new(size);
    let meta = store.put("big/blob", &mut src).await.unwrap();
    let up = started.elapsed();
    assert_eq!(meta.size, size);
    let parts = size.div_ceil(cfg.part_size_bytes);
    let etag = meta.digest.expect("an ETag");
    assert!(
        etag.ends_with(&format!("-{parts}")),
        "not a multipart ETag of {parts} parts: {etag}"
    );
    let info = store.info("big/blob").await.unwrap().unwrap();
    assert_eq!(info.size, size);
    assert_eq!(s3.pending_uploads(), Vec::<String>::new());

    let started = Instant::now();
    let (sha, len) = sha_of(&store, "big/blob").await;
    let down = started.elapsed();
    assert_eq!(len, size);
    assert_eq!(sha, src.digest(), "the object came back different");
    let growth = peak_rss().saturating_sub(before);
    eprintln!(
        "1 GiB: up {up:.1?}, down {down:.1?}; peak RSS grew by {:.1} MiB (bound {} MiB; parts of {} MiB, {} at once)",
        growth as f64 / MIB as f64,
        bound / MIB,
        cfg.part_size_bytes / MIB,
        cfg.upload_concurrency
    );
    assert!(
        growth < bound,
        "peak RSS grew by {growth} bytes moving 1 GiB, bound {bound}"
    );
    store.delete("big/blob").await.unwrap();
}

#[tokio::test]
async fn ranged_reads_return_exactly_the_bytes() {
    let s3 = S3Server::start().await.unwrap();
    let mut cfg = s3.s3_config();
    cfg.part_size_bytes = 5 * MIB;
    let store = S3Artifacts::from_config(&cfg).unwrap();
    // One object in one request, one in parts (ranges across a part boundary).
    for (key, size) in [("one", 1_000_003usize), ("parts", 12 * MIB as usize + 7)] {
        let body = pattern(size);
        store.put(key, &mut &body[..]).await.unwrap();
        let n = size as u64;
        let cases = [
            (n / 2, 1000),
            (5 * MIB - 10, 20),
            (0, n),
            (n - 100, 1000), // past the end: the rest
            (1, u64::MAX),
            (n, 10), // at the end: nothing
            (n + 5, 10),
            (7, 0),
        ];
        for (start, len) in cases {
            let got = read_all(store.get_range(key, start, len).await.unwrap()).await;
            let from = (start as usize).min(size);
            let to = start.saturating_add(len).min(n) as usize;
            let want = &body[from..to.max(from)];
            assert_eq!(got.len(), want.len(), "{key} [{start}, +{len})");
            assert!(got == want, "{key} [{start}, +{len}) differs");
        }
    }
}

fn tamper_signature(url: &reqwest::Url) -> reqwest::Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "X-Amz-Signature" {
                let mut s = v.into_owned();
                let last = s.pop().unwrap();
                s.push(if last == '0' { '1' } else { '0' });
                s
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    let mut out = url.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

#[tokio::test]
async fn presigned_get_downloads_and_the_server_refuses_tampered_and_expired_urls() {
    let s3 = S3Server::start().await.unwrap();
    let store = s3.store().unwrap();
    let body = pattern(2 * MIB as usize + 3);
    store.put("t/out.mp4", &mut &body[..]).await.unwrap();
    store.put("t/other.mp4", &mut &b"other"[..]).await.unwrap();
    let (url, valid) = store
        .presign(lipsync_runtime::artifacts::Presign::Get, "t/out.mp4")
        .await
        .unwrap()
        .expect("S3 presigns");
    assert_eq!(valid, Duration::from_secs(s3.s3_config().presign_expiry_s));
    assert!(url.query().unwrap().contains("X-Amz-Signature="), "{url}");
    let http = reqwest::Client::new();
    let r = http.get(url.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap() == body);

    // One character of the signature changed.
    let r = http.get(tamper_signature(&url)).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("SignatureDoesNotMatch"));
    // The same signature for another key.
    let mut other = url.clone();
    other.set_path(&url.path().replace("out.mp4", "other.mp4"));
    assert_eq!(http.get(other).send().await.unwrap().status(), 403);
    // Not signed at all.
    let mut bare = url.clone();
    bare.set_query(None);
    assert_eq!(http.get(bare).send().await.unwrap().status(), 403);
    // A GET URL does not allow a PUT.
    let r = http.put(url.clone()).body("x").send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(read_all(store.get("t/out.mp4").await.unwrap()).await == body);

    // Expired: valid for 2 s (the signing time has one-second resolution).
    let mut cfg = s3.s3_config();
    cfg.presign_expiry_s = 2;
    let short = S3Artifacts::from_config(&cfg).unwrap();
    let (url, _) = short
        .presign(lipsync_runtime::artifacts::Presign::Get, "t/out.mp4")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(http.get(url.clone()).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("expired"));
}

#[tokio::test]
async fn presigned_put_uploads_with_a_plain_http_put() {
    let s3 = S3Server::start().await.unwrap();
    let store = s3.store().unwrap();
    let (url, _) = store
        .presign(lipsync_runtime::artifacts::Presign::Put, "t/in/video.mp4")
        .await
        .unwrap()
        .unwrap();
    let body = pattern(3 * MIB as usize + 11);
    let http = reqwest::Client::new();
    let r = http
        .put(url.clone())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert!(read_all(store.get("t/in/video.mp4").await.unwrap()).await == body);
    // The URL names its key: a tampered one writes nothing.
    let r = http
        .put(tamper_signature(&url))
        .body("evil")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(read_all(store.get("t/in/video.mp4").await.unwrap()).await == body);
    // A PUT URL does not allow reading.
    assert_eq!(http.get(url).send().await.unwrap().status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_abandoned_puts_leave_no_object_and_no_upload() {
    let s3 = S3Server::start().await.unwrap();
    let store = s3.store().unwrap();

    // The source fails after 20 MiB: two parts went up, the third was being read.
    let mut src = Source::new(100 * MIB).failing_at(20 * MIB);
    let err = store.put("t/broken", &mut src).await.unwrap_err();
    assert!(matches!(err, ArtifactError::Io(_)), "{err:?}");
    assert!(store.info("t/broken").await.unwrap().is_none());
    assert!(store.keys().await.unwrap().is_empty());
    // The upload was aborted before the put returned: its record is gone. The part
    // being sent when the source broke was cancelled; the server drops its partial
    // write as it notices the closed connection.
    let records = |s3: &S3Server| {
        s3.pending_uploads()
            .into_iter()
            .filter(|n| n.starts_with(".upload-"))
            .collect::<Vec<_>>()
    };
    assert_eq!(records(&s3), Vec::<String>::new());
    wait_for(Duration::from_secs(10), || async {
        s3.pending_uploads().is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("left behind: {:?}", s3.pending_uploads()));

    // The caller drops the put half way: the source stalls after 20 MiB.
    let store2 = store.clone();
    let put = tokio::spawn(async move {
        let mut src = Source::new(100 * MIB).gated_at(20 * MIB, std::future::pending());
        store2.put("t/dropped", &mut src).await
    });
    wait_for(Duration::from_secs(30), || async {
        (stored_parts(&s3) >= 2).then_some(())
    })
    .await
    .expect("parts of the abandoned put reached the server");
    put.abort();
    assert!(put.await.unwrap_err().is_cancelled());
    wait_for(Duration::from_secs(10), || async {
        s3.pending_uploads().is_empty().then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("left behind: {:?}", s3.pending_uploads()));
    assert!(store.keys().await.unwrap().is_empty());
    assert!(store.info("t/dropped").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_survives_a_server_restart_mid_upload() {
    let mut s3 = S3Server::start().await.unwrap();
    let mut cfg = s3.s3_config();
    cfg.part_size_bytes = 5 * MIB;
    let store = S3Artifacts::from_config(&cfg).unwrap();
    let size = 200 * MIB;
    let (open_tx, open_rx) = tokio::sync::oneshot::channel::<()>();
    let put = tokio::spawn({
        let store = store.clone();
        async move {
            let mut src = Source::new(size).gated_at(40 * MIB, async move {
                let _ = open_rx.await;
            });
            let r = store.put("t/survivor", &mut src).await;
            (r, src.digest())
        }
    });
    // Some parts are on the server's disk, more are in flight or queued.
    wait_for(Duration::from_secs(30), || async {
        (stored_parts(&s3) >= 3).then_some(())
    })
    .await
    .expect("parts reached the server");
    assert!(!put.is_finished(), "the put ended before the restart");
    s3.kill();
    let down = Instant::now();
    let parts_before = stored_parts(&s3);
    // The rest of the source goes up against a dead server: refused connections.
    open_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s3.start_again().await.unwrap();
    eprintln!(
        "server down for {:.1?} with {parts_before} of 40 parts stored",
        down.elapsed()
    );
    let (r, digest) = tokio::time::timeout(Duration::from_secs(120), put)
        .await
        .expect("the put finished")
        .unwrap();
    let meta = r.expect("the put survived the restart");
    assert_eq!(meta.size, size);
    let etag = meta.digest.unwrap();
    assert!(etag.ends_with("-40"), "{etag}");
    let (sha, len) = sha_of(&store, "t/survivor").await;
    assert_eq!(len, size);
    assert_eq!(sha, digest);
    assert_eq!(s3.pending_uploads(), Vec::<String>::new());
}

const CANARY_ID: &str = "AKIDCANARY7Q3Z";
const CANARY_SECRET: &str = "SECRET-CANARY-b7f1c2d9e4";
const CANARY_TOKEN: &str = "TOKEN-CANARY-5a8e0f";

#[track_caller]
fn assert_clean(what: &str, text: &str) {
    for c in [CANARY_ID, CANARY_SECRET, CANARY_TOKEN] {
        assert!(
            !text.contains(c),
            "{what} shows a credential ({c}):\n{text}"
        );
    }
}

fn canary_env(s3: &S3Server) -> Vec<(String, String)> {
    let mut env = s3.env();
    for (k, v) in &mut env {
        if k.ends_with("ACCESS_KEY_ID") {
            *v = CANARY_ID.into();
        } else if k.ends_with("SECRET_ACCESS_KEY") {
            *v = CANARY_SECRET.into();
        }
    }
    env
}

#[tokio::test]
async fn print_config_and_debug_forms_hold_no_credentials() {
    let s3 = S3Server::start().await.unwrap();
    let out = Command::new(binary("lipsync-fetch").unwrap())
        .arg("--print-config")
        .envs(canary_env(&s3))
        .env("LIPSYNC_ARTIFACTS__S3__SESSION_TOKEN", CANARY_TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean("--print-config", &text);
    // It did read the S3 settings from the environment.
    assert!(text.contains(&s3.url()), "{text}");
    for k in ["access_key_id", "secret_access_key", "session_token"] {
        assert!(
            text.lines()
                .any(|l| l.trim().starts_with(k) && l.contains("<redacted>")),
            "{k} not shown redacted:\n{text}"
        );
    }

    let mut cfg = lipsync_runtime::Config::default();
    s3.config(&mut cfg);
    cfg.artifacts.s3.access_key_id = CANARY_ID.into();
    cfg.artifacts.s3.secret_access_key = CANARY_SECRET.into();
    cfg.artifacts.s3.session_token = CANARY_TOKEN.into();
    assert_clean("Config's Debug", &format!("{cfg:?}"));
    assert_clean("Config's Debug", &format!("{cfg:#?}"));
    let store = S3Artifacts::from_config(&cfg.artifacts.s3).unwrap();
    assert_clean("the store's Debug", &format!("{store:?}"));
}

#[tokio::test]
async fn errors_hold_no_credentials() {
    // The server knows the id with another secret.
    let s3 = S3Server::start_with(CANARY_ID, "the-right-secret")
        .await
        .unwrap();
    let mut cfg = quick(s3.s3_config());
    cfg.access_key_id = CANARY_ID.into();
    cfg.secret_access_key = CANARY_SECRET.into();
    cfg.session_token = CANARY_TOKEN.into();
    cfg.part_size_bytes = 5 * MIB;
    let store = S3Artifacts::from_config(&cfg).unwrap();
    let small = pattern(100);
    let big = pattern(6 * MIB as usize);
    let mut seen = Vec::new();
    for e in [
        store.put("t/small", &mut &small[..]).await.unwrap_err(),
        store.put("t/big", &mut &big[..]).await.unwrap_err(),
        store.info("t/small").await.unwrap_err(),
        store.get("t/small").await.err().unwrap(),
        store.keys().await.unwrap_err(),
    ] {
        assert!(matches!(e, ArtifactError::Backend(_)), "{e:?}");
        seen.push(format!("{e}\n{e:?}"));
    }
    let denied = seen.join("\n");
    assert_clean("errors of a wrong secret", &denied);
    // The errors do say what went wrong.
    assert!(denied.contains("403"), "{denied}");

    // Nobody listening.
    let mut cfg = cfg.clone();
    cfg.endpoint = format!("http://127.0.0.1:{}", free_port());
    cfg.max_retries = 1;
    cfg.retry_timeout_s = 1;
    let dead = S3Artifacts::from_config(&cfg).unwrap();
    let e = dead.put("t/small", &mut &small[..]).await.unwrap_err();
    assert_clean("error of a closed port", &format!("{e}\n{e:?}"));
    assert!(e.to_string().contains("t/small"), "{e}");

    // Credential files missing, empty, or one half of the pair missing.
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, CANARY_SECRET).unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let mut cases = Vec::new();
    let mut c = s3.s3_config();
    c.access_key_id = CANARY_ID.into();
    c.secret_access_key = String::new();
    c.secret_access_key_file = Some(dir.path().join("missing"));
    cases.push(c.clone());
    c.secret_access_key_file = Some(empty.clone());
    cases.push(c.clone());
    c.access_key_id = String::new();
    c.access_key_id_file = Some(dir.path().join("missing-id"));
    c.secret_access_key_file = Some(secret_file.clone());
    cases.push(c.clone());
    c.access_key_id_file = None;
    c.secret_access_key = CANARY_SECRET.into();
    c.secret_access_key_file = None;
    cases.push(c.clone());
    for c in cases {
        let e = S3Artifacts::from_config(&c).unwrap_err();
        assert_clean("a credential error", &format!("{e:#}\n{e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_logs_of_a_stage_refused_by_s3_hold_no_credentials() {
    let nats = NatsServer::start().await.unwrap();
    let s3 = S3Server::start_with(CANARY_ID, "the-right-secret")
        .await
        .unwrap();
    let media = MediaServer::start().await.unwrap();
    media.face_clip("face.mp4", 0.4, 64, 64, 25, false);
    media.audio("voice.wav", 0.4);
    let logs = tempfile::tempdir().unwrap();
    let gateway_port = free_port();
    let mut children = Vec::new();
    for name in ["fetch", "gateway"] {
        let port = if name == "gateway" {
            gateway_port
        } else {
            free_port()
        };
        let out = std::fs::File::create(logs.path().join(format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(logs.path().join(format!("{name}.err"))).unwrap();
        let child = Command::new(binary(&format!("lipsync-{name}")).unwrap())
            .current_dir(lipsync_tests::workspace_root())
            .envs(canary_env(&s3))
            .env("LIPSYNC_ARTIFACTS__S3__SESSION_TOKEN", CANARY_TOKEN)
            .env("LIPSYNC_ARTIFACTS__S3__MAX_RETRIES", "1")
            .env("LIPSYNC_ARTIFACTS__S3__RETRY_TIMEOUT_S", "2")
            .env("LIPSYNC_NATS__URL", nats.url())
            .env(
                "LIPSYNC_ARTIFACTS__MAX_BYTES",
                lipsync_tests::TEST_ARTIFACT_BYTES.to_string(),
            )
            .env("LIPSYNC_FETCH__ALLOW_PRIVATE_NETWORKS", "true")
            .env("LIPSYNC_MODELS__PROFILE", "tiny")
            .env("LIPSYNC_RUNNER__NAK_DELAY_S", "0.2")
            .env("LIPSYNC_RUNNER__NAK_DELAY_MAX_S", "0.5")
            .env("LIPSYNC_LOG__FILTER", "debug")
            .env(
                format!("LIPSYNC_{}__LISTEN", name.to_uppercase()),
                format!("127.0.0.1:{port}"),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        children.push(KillOnDrop(name, child));
    }
    let read_logs = || {
        let mut all = String::new();
        for f in ["fetch.out", "fetch.err", "gateway.out", "gateway.err"] {
            all.push_str(&std::fs::read_to_string(logs.path().join(f)).unwrap_or_default());
        }
        all
    };
    let children = std::sync::Mutex::new(children);
    // A process that exits (a bad configuration, say) fails the test at once.
    let alive = || {
        for c in children.lock().unwrap().iter_mut() {
            if let Ok(Some(status)) = c.1.try_wait() {
                panic!("lipsync-{} exited ({status}):\n{}", c.0, read_logs());
            }
        }
    };
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{gateway_port}");
    let task: serde_json::Value = wait_for(Duration::from_secs(60), || async {
        alive();
        let r = http
            .post(format!("{base}/sync"))
            .json(&serde_json::json!({
                "video_url": media.url("face.mp4"),
                "audio_url": media.url("voice.wav"),
                "inference_steps": 4,
            }))
            .send()
            .await
            .ok()?;
        if r.status().is_success() {
            r.json().await.ok()
        } else {
            None
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the gateway took no task:\n{}", read_logs()));
    let id = task["task_id"].as_str().unwrap().to_owned();
    // The fetch stage downloads the media and is refused by the bucket.
    wait_for(Duration::from_secs(60), || async {
        alive();
        let l = read_logs();
        (l.contains("403") || l.contains("SignatureDoesNotMatch")).then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("the refusal was never logged:\n{}", read_logs()));
    // A moment for retries and their log lines.
    tokio::time::sleep(Duration::from_secs(2)).await;
    alive();
    let record = http
        .get(format!("{base}/task/{id}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    drop(children);
    let all = read_logs();
    assert!(all.lines().count() > 10, "few debug lines:\n{all}");
    assert_clean("the stage logs", &all);
    assert_clean("the task record", &record);
}

/// A named child process, SIGKILLed on drop.
struct KillOnDrop(&'static str, std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.1.kill();
        let _ = self.1.wait();
    }
}
