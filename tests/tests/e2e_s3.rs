//! The client-facing features of the s3 artifact backend, on a real S3-compatible server
//! (`lipsync-s3-test-server`): presigned result downloads (`outputs.presign`), direct
//! uploads (`POST /uploads`, `*_upload_id`), `output_upload_url` and the retention sweep.
//!
//! The gateway-level cases run an in-process gateway (no stages); the end-to-end case runs
//! one pipeline for all of its scenarios (each start costs seconds) with a second gateway
//! and the mux stage spawned here with their output (log and stderr) in files, which are
//! searched for presigned URLs' signatures afterwards.

mod gateway_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gateway_common::{Env, Gw, error_code};
use lipsync_runtime::ArtifactStore;
use lipsync_runtime::artifacts::Presign;
use lipsync_runtime::config::{ApiKeyConfig, KeyRole};
use lipsync_schemas::names;
use lipsync_tests::pipeline::{Pipeline, binary};
use lipsync_tests::{S3Server, free_port, metric_value, wait_for, wait_gone};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

const TASK_TIMEOUT: Duration = Duration::from_secs(120);

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

async fn read_all(store: &dyn ArtifactStore, key: &str) -> Vec<u8> {
    let mut buf = Vec::new();
    store
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .read_to_end(&mut buf)
        .await
        .unwrap();
    buf
}

/// A client that does not follow redirects (to see the 307s).
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn key(tenant: &str, key: &str) -> ApiKeyConfig {
    ApiKeyConfig {
        tenant: tenant.into(),
        role: KeyRole::User,
        key: key.into(),
        key_sha256: String::new(),
        key_file: None,
    }
}

/// `POST /uploads` as `bearer`; the answer's JSON.
async fn create_upload(
    http: &reqwest::Client,
    base: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> Value {
    let mut r = http.post(format!("{base}/uploads"));
    if let Some(b) = bearer {
        r = r.bearer_auth(b);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "PUT", "{v}");
    assert!(v["expires_in_s"].as_u64().unwrap() > 0, "{v}");
    assert!(v["max_bytes"].as_u64().unwrap() > 0, "{v}");
    uuid::Uuid::parse_str(v["upload_id"].as_str().unwrap()).unwrap();
    v
}

/// PUT `bytes` to a presigned URL with a plain client (no API key).
async fn put(url: &str, bytes: Vec<u8>) {
    let r = reqwest::Client::new()
        .put(url)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT answered {}", r.status());
}

/// `POST /sync` as a multipart form of `(name, file name, value)` parts.
async fn sync_form(
    http: &reqwest::Client,
    base: &str,
    bearer: &str,
    parts: &[(&str, Option<&str>, &str)],
) -> reqwest::Response {
    let boundary = "e2es3boundary";
    let mut form = String::new();
    for (name, file, value) in parts {
        let filename = file
            .map(|f| format!("; filename=\"{f}\""))
            .unwrap_or_default();
        form.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n{value}\r\n"
        ));
    }
    form.push_str(&format!("--{boundary}--\r\n"));
    http.post(format!("{base}/sync"))
        .bearer_auth(bearer)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(form)
        .send()
        .await
        .unwrap()
}

async fn sync(http: &reqwest::Client, base: &str, bearer: &str, body: Value) -> reqwest::Response {
    http.post(format!("{base}/sync"))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn gateway_uploads_presigns_and_serves_ranges_on_s3() {
    let s3 = S3Server::start().await.unwrap();
    let store = s3.store().unwrap();
    let env = Env::start_with(|c| {
        s3.config(c);
        c.outputs.presign = true;
        c.gateway.keys = vec![key("acme", "acme-key"), key("beta", "beta-key")];
        c.gateway.tenant_max_queued = 1;
    })
    .await;
    let base = env.url("");
    let http = &env.http;

    // Direct uploads: a presigned PUT per file, with or without a body.
    let video = create_upload(
        http,
        &base,
        Some("acme-key"),
        Some(json!({"kind": "video"})),
    )
    .await;
    assert_eq!(video["kind"], "video");
    let audio = create_upload(http, &base, Some("acme-key"), None).await;
    assert_eq!(audio["kind"], Value::Null);
    let r = http.post(env.url("/uploads")).send().await.unwrap();
    assert_eq!(r.status(), 401, "uploads need a key like /sync");
    let r = http
        .post(env.url("/uploads"))
        .bearer_auth("acme-key")
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 400).await, "invalid_json");
    let r = http
        .post(env.url("/uploads"))
        .bearer_auth("acme-key")
        .json(&json!({"kind": "image"}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_request");
    // Issued URLs are counted, refused requests are not.
    let text = env.metrics().await;
    assert_eq!(
        metric_value(&text, "lipsync_uploads_issued_total"),
        2.0,
        "{text}"
    );
    let (vid, aid) = (
        video["upload_id"].as_str().unwrap().to_owned(),
        audio["upload_id"].as_str().unwrap().to_owned(),
    );
    let body = json!({"video_upload_id": vid, "audio_upload_id": aid});
    // Not uploaded yet: not found.
    let r = sync(http, &base, "acme-key", body.clone()).await;
    assert_eq!(error_code(r, 422).await, "upload_not_found");
    put(
        video["upload_url"].as_str().unwrap(),
        b"video bytes".to_vec(),
    )
    .await;
    put(
        audio["upload_url"].as_str().unwrap(),
        b"audio bytes".to_vec(),
    )
    .await;
    let video_key = format!("uploads/acme/{vid}");
    assert_eq!(read_all(&store, &video_key).await, b"video bytes");

    // Another tenant's ids are unknown to it; bad combinations are typed.
    let r = sync(http, &base, "beta-key", body.clone()).await;
    assert_eq!(error_code(r, 422).await, "upload_not_found");
    let cases = [
        (
            json!({"video_upload_id": vid, "video_url": "https://e.com/v.mp4", "audio_upload_id": aid}),
            "invalid_request",
        ),
        (json!({"audio_upload_id": aid}), "invalid_request"),
        (
            json!({"video_upload_id": "not-a-uuid", "audio_upload_id": aid}),
            "invalid_request",
        ),
        (
            json!({"video_upload_id": uuid::Uuid::new_v4().to_string(), "audio_upload_id": aid}),
            "upload_not_found",
        ),
        (
            json!({"video_upload_id": vid, "audio_upload_id": aid, "output_upload_url": "ftp://e.com/x"}),
            "invalid_request",
        ),
    ];
    for (b, code) in cases {
        let r = sync(http, &base, "acme-key", b.clone()).await;
        assert_eq!(error_code(r, 422).await, code, "{b}");
    }
    let with_idem = || {
        http.post(env.url("/sync"))
            .bearer_auth("acme-key")
            .header("idempotency-key", "k1")
            .json(&body)
    };
    let r = with_idem().send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (rec, _) = env.tasks.get(&first).await.unwrap().unwrap();
    assert_eq!(
        rec.request.video,
        lipsync_schemas::InputSource::Artifact(video_key.clone())
    );
    // A replay of the same request is the same task; any other use of the uploads is
    // refused (one task per upload).
    let r = with_idem().send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["task_id"], first.as_str());
    let r = sync(http, &base, "acme-key", body.clone()).await;
    assert_eq!(error_code(r, 422).await, "upload_not_found");
    // A refused submission gives its uploads back: over the tenant quota (one queued
    // task), then again once the first task is cancelled.
    let v2 = create_upload(http, &base, Some("acme-key"), None).await;
    let a2 = create_upload(http, &base, Some("acme-key"), None).await;
    put(v2["upload_url"].as_str().unwrap(), b"v2".to_vec()).await;
    put(a2["upload_url"].as_str().unwrap(), b"a2".to_vec()).await;
    let body2 = json!({"video_upload_id": v2["upload_id"], "audio_upload_id": a2["upload_id"]});
    let r = sync(http, &base, "acme-key", body2.clone()).await;
    assert_eq!(error_code(r, 429).await, "quota_exceeded");
    let r = http
        .delete(env.url(&format!("/task/{first}")))
        .bearer_auth("acme-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The cancelled task's uploads went with it.
    wait_gone(&store, &video_key, Duration::from_secs(5))
        .await
        .unwrap();
    let r = wait_for(Duration::from_secs(5), || async {
        let r = sync(http, &base, "acme-key", body2.clone()).await;
        (r.status() == 200).then_some(r)
    })
    .await
    .expect("the refused submission's uploads are usable again");
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The multipart form reads and checks output_upload_url too.
    let r = sync_form(
        http,
        &base,
        "acme-key",
        &[
            ("video", Some("v.mp4"), "v"),
            ("audio", Some("a.wav"), "a"),
            ("output_upload_url", None, "ftp://e.com/result.mp4"),
        ],
    )
    .await;
    assert_eq!(error_code(r, 422).await, "invalid_request");
    // A form may name a direct upload in place of a file (as beta, whose quota is free).
    let b_audio = create_upload(http, &base, Some("beta-key"), None).await;
    put(
        b_audio["upload_url"].as_str().unwrap(),
        b"beta audio".to_vec(),
    )
    .await;
    let b_aid = b_audio["upload_id"].as_str().unwrap();
    let video_file = ("video", Some("v.mp4"), "beta video");
    let cases = [
        (
            vec![
                video_file,
                ("audio", Some("a.wav"), "a"),
                ("audio_upload_id", None, b_aid),
            ],
            "invalid_request",
        ),
        (vec![video_file], "invalid_request"),
        // acme's upload (already used, and not beta's).
        (
            vec![video_file, ("audio_upload_id", None, aid.as_str())],
            "upload_not_found",
        ),
    ];
    for (parts, code) in cases {
        let r = sync_form(http, &base, "beta-key", &parts).await;
        assert_eq!(error_code(r, 422).await, code, "{parts:?}");
    }
    let with_upload = [video_file, ("audio_upload_id", None, b_aid)];
    let r = sync_form(http, &base, "beta-key", &with_upload).await;
    assert_eq!(r.status(), 200);
    let bid = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (rec, _) = env.tasks.get(&bid).await.unwrap().unwrap();
    assert_eq!(
        rec.request.audio,
        lipsync_schemas::InputSource::Artifact(format!("uploads/beta/{b_aid}"))
    );
    let video_part = names::artifact_key(&bid, names::artifact::VIDEO);
    assert_eq!(
        rec.request.video,
        lipsync_schemas::InputSource::Artifact(video_part.clone())
    );
    assert_eq!(read_all(&store, &video_part).await, b"beta video");
    // The upload now serves that task only.
    let r = sync_form(http, &base, "beta-key", &with_upload).await;
    assert_eq!(error_code(r, 422).await, "upload_not_found");
    // The record shows no URL for uploaded inputs.
    let t: Value = http
        .get(env.url(&format!("/task/{id}")))
        .bearer_auth("acme-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["request"]["video_url"], Value::Null, "{t}");

    // Outputs: presigned (307) here, streamed with ranges by a gateway without presign.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    store
        .put(
            &names::artifact_key(&id, "result.mp4"),
            &mut data.as_slice(),
        )
        .await
        .unwrap();
    env.complete(&id, 1.0).await;
    let nr = no_redirects();
    let out = env.url(&format!("/outputs/{id}/result.mp4"));
    let r = wait_for(Duration::from_secs(5), || async {
        let r = nr.get(&out).bearer_auth("acme-key").send().await.ok()?;
        (r.status() != 404).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s3.url()), "{location}");
    let r = nr.get(&out).bearer_auth("beta-key").send().await.unwrap();
    assert_eq!(r.status(), 404, "another tenant's output is unknown");
    let alias = nr
        .get(env.url(&format!("/results/{id}/output.mp4")))
        .bearer_auth("acme-key")
        .send()
        .await
        .unwrap();
    assert_eq!(alias.status(), StatusCode::TEMPORARY_REDIRECT);
    let body = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256(&body), sha256(&data));
    let part = reqwest::Client::new()
        .get(&location)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.bytes().await.unwrap().as_ref(), &data[1000..2000]);

    let mut plain_cfg = env.cfg.clone();
    plain_cfg.outputs.presign = false;
    let plain = Gw::start(&plain_cfg).await;
    let url = plain.url(&format!("/outputs/{id}/result.mp4"));
    let r = wait_for(Duration::from_secs(5), || async {
        let r = nr.get(&url).bearer_auth("acme-key").send().await.ok()?;
        (r.status() != 404).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "300000");
    assert_eq!(sha256(&r.bytes().await.unwrap()), sha256(&data));
    let r = nr
        .get(&url)
        .bearer_auth("acme-key")
        .header("range", "bytes=299990-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.headers()["content-range"], "bytes 299990-299999/300000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[299_990..]);
    plain.stop().await;
    env.stop().await;
}

#[tokio::test]
async fn nats_backend_has_no_direct_uploads_and_ignores_presign() {
    let env = Env::start_with(|c| c.outputs.presign = true).await;
    let r = env.http.post(env.url("/uploads")).send().await.unwrap();
    assert_eq!(error_code(r, 409).await, "uploads_unavailable");
    let r = env
        .submit(json!({
            "video_upload_id": uuid::Uuid::new_v4().to_string(),
            "audio_url": "https://example.com/a.wav",
        }))
        .await;
    assert_eq!(error_code(r, 409).await, "uploads_unavailable");
    // presign is ignored: the bytes come through the gateway.
    let id = env.submit_ok().await;
    let store = lipsync_runtime::NatsArtifacts::new(env.topo.artifacts.clone());
    store
        .put(&names::artifact_key(&id, "result.mp4"), &mut &b"result"[..])
        .await
        .unwrap();
    env.complete(&id, 1.0).await;
    let url = env.url(&format!("/outputs/{id}/result.mp4"));
    let nr = no_redirects();
    let r = wait_for(Duration::from_secs(5), || async {
        let r = nr.get(&url).send().await.ok()?;
        (r.status() != 404).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"result");
    env.stop().await;
}

#[tokio::test]
async fn the_retention_sweep_deletes_old_objects_and_keeps_new_ones() {
    let mut s3 = S3Server::start().await.unwrap();
    let store = s3.store().unwrap();
    // At store level: nothing is older than an hour, everything is older than zero.
    store.put("t/fresh", &mut &b"x"[..]).await.unwrap();
    assert_eq!(store.sweep(Duration::from_secs(3600)).await.unwrap(), 0);
    assert!(store.info("t/fresh").await.unwrap().is_some());
    // Modification times have whole seconds.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(store.sweep(Duration::ZERO).await.unwrap(), 1);
    assert!(store.info("t/fresh").await.unwrap().is_none());

    // The gateway's sweep: every second, objects older than 2 s go.
    store.put("t/old", &mut &b"old"[..]).await.unwrap();
    let env = Env::start_with(|c| {
        s3.config(c);
        c.artifacts.ttl_s = 2;
        c.artifacts.s3.sweep_interval_s = 1;
        // A round against a dead server fails at once instead of retrying for minutes.
        c.artifacts.s3.max_retries = 0;
    })
    .await;
    wait_gone(&store, "t/old", Duration::from_secs(15))
        .await
        .expect("the sweep deletes an object older than artifacts.ttl_s");
    store.put("t/new", &mut &b"new"[..]).await.unwrap();
    // At least one more round runs before it is 2 s old.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(store.info("t/new").await.unwrap().is_some());
    let text = env.metrics().await;
    assert!(
        metric_value(&text, "lipsync_artifact_swept_objects_total") >= 1.0,
        "{text}"
    );
    assert!(
        metric_value(&text, "lipsync_artifact_sweeps_total{outcome=\"ok\"}") >= 2.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "lipsync_artifact_sweeps_total{outcome=\"error\"}"),
        0.0,
        "{text}"
    );
    // A round that cannot reach the bucket is counted as an error; the loop goes on.
    s3.kill();
    wait_for(Duration::from_secs(15), || async {
        let text = env.metrics().await;
        (metric_value(&text, "lipsync_artifact_sweeps_total{outcome=\"error\"}") >= 2.0)
            .then_some(())
    })
    .await
    .expect("failed sweep rounds are counted, and the next ones still run");
    env.stop().await;
}

/// A process spawned here (beside the pipeline's) with its output in a file.
struct Logged {
    child: Child,
    log: PathBuf,
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Logged {
    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Spawn `lipsync-<name>` with the pipeline's environment (as `Pipeline::start_with`
/// sets it), `extra`, its listen port and an info-level log (stdout and stderr) into `dir`.
fn spawn_logged(
    p: &Pipeline,
    s3: &S3Server,
    name: &str,
    port: u16,
    extra: &[(&str, String)],
    dir: &Path,
) -> Logged {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(binary(&format!("lipsync-{name}")).unwrap());
    cmd.current_dir(lipsync_tests::workspace_root())
        .env_remove("LIPSYNC_TEST_ARTIFACTS")
        .envs(p.env().iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("LIPSYNC_LOG__FILTER", "info")
        .env(
            format!("LIPSYNC_{}__LISTEN", name.to_uppercase()),
            format!("127.0.0.1:{port}"),
        )
        .envs(s3.env())
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        // The log goes to stdout; panics and start-up errors to stderr: both in the file.
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    Logged {
        child: cmd.spawn().unwrap(),
        log,
    }
}

async fn wait_ready(url: String) {
    wait_for(Duration::from_secs(60), || async {
        let r = reqwest::get(&url).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{url}: {e}"));
}

/// The task as `bearer` sees it.
async fn task(base: &str, bearer: &str, id: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{base}/task/{id}"))
        .bearer_auth(bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn wait_done(base: &str, bearer: &str, id: &str) -> Value {
    wait_for(TASK_TIMEOUT, || async {
        let t = task(base, bearer, id).await;
        matches!(t["status"].as_str(), Some("completed" | "failed")).then_some(t)
    })
    .await
    .unwrap_or_else(|e| panic!("task {id}: {e}"))
}

#[tokio::test]
async fn pipeline_on_s3_with_direct_uploads_presigned_results_and_output_uploads() {
    // Always on the s3 backend, whatever LIPSYNC_TEST_ARTIFACTS says: this server's
    // settings come last in every process's environment.
    let s3 = S3Server::start().await.unwrap();
    let mut extra = s3.env();
    for (k, v) in [
        ("LIPSYNC_OUTPUTS__PRESIGN", "true"),
        ("LIPSYNC_FETCH__MAX_BYTES", "4000000"),
        ("LIPSYNC_NATS__MAX_DELIVER", "3"),
    ] {
        extra.push((k.into(), v.into()));
    }
    let extra_refs: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut p = Pipeline::start_with(&extra_refs).await.unwrap();
    let store = s3.store().unwrap();
    let logs = tempfile::tempdir().unwrap();
    // A gateway with tenants and without presign, and a mux with quick upload retries,
    // both logging at info level into files.
    std::fs::write(
        logs.path().join("keys"),
        "acme user acme-key\nbeta user beta-key\n",
    )
    .unwrap();
    let gw_port = free_port();
    let gateway = spawn_logged(
        &p,
        &s3,
        "gateway",
        gw_port,
        &[
            (
                "LIPSYNC_GATEWAY__API_KEYS_FILE",
                logs.path().join("keys").to_string_lossy().into_owned(),
            ),
            ("LIPSYNC_NATS__MAX_DELIVER", "3".into()),
        ],
        logs.path(),
    );
    p.kill("mux");
    let mux_port = free_port();
    let mux = spawn_logged(
        &p,
        &s3,
        "mux",
        mux_port,
        &[
            ("LIPSYNC_MUX__UPLOAD_TRIES", "2".into()),
            ("LIPSYNC_MUX__UPLOAD_BACKOFF_MS", "50".into()),
            ("LIPSYNC_MUX__UPLOAD_TIMEOUT_S", "20".into()),
            ("LIPSYNC_NATS__MAX_DELIVER", "3".into()),
        ],
        logs.path(),
    );
    let gw = format!("http://127.0.0.1:{gw_port}");
    wait_ready(format!("{gw}/readyz")).await;
    wait_ready(format!("http://127.0.0.1:{mux_port}/readyz")).await;

    p.media.face_clip("face.mp4", 1.2, 512, 512, 25, false);
    p.media.audio("voice.wav", 1.2);
    let face = std::fs::read(p.media.path("face.mp4")).unwrap();
    let voice = std::fs::read(p.media.path("voice.wav")).unwrap();
    assert!(face.len() < 4_000_000 && voice.len() < 4_000_000);
    let http = reqwest::Client::new();

    // 1. Direct uploads (tenant acme).
    let v = create_upload(&http, &gw, Some("acme-key"), Some(json!({"kind": "video"}))).await;
    let a = create_upload(&http, &gw, Some("acme-key"), Some(json!({"kind": "audio"}))).await;
    put(v["upload_url"].as_str().unwrap(), face.clone()).await;
    put(a["upload_url"].as_str().unwrap(), voice.clone()).await;
    let (vid, aid) = (
        v["upload_id"].as_str().unwrap(),
        a["upload_id"].as_str().unwrap(),
    );
    let body =
        json!({"video_upload_id": vid, "audio_upload_id": aid, "inference_steps": 4, "seed": 7});
    let r = sync(&http, &gw, "beta-key", body.clone()).await;
    assert_eq!(error_code(r, 422).await, "upload_not_found");
    // The open gateway of the pipeline is another tenant (`_`) too.
    let r = http
        .post(format!("{}/sync", p.base()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "upload_not_found");
    let r = sync(&http, &gw, "acme-key", body).await;
    assert_eq!(r.status(), 200);
    let uploaded_task = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // 2. An upload over fetch.max_bytes is refused by the fetch stage.
    let big = create_upload(&http, &gw, Some("acme-key"), None).await;
    put(big["upload_url"].as_str().unwrap(), vec![0u8; 4_000_001]).await;
    let r = sync(
        &http,
        &gw,
        "acme-key",
        json!({"video_upload_id": big["upload_id"], "audio_url": p.media.url("voice.wav")}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let big_task = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // 3. output_upload_url: a presigned PUT of the test server, and a dead port.
    let target = format!("client/{}/result.mp4", uuid::Uuid::new_v4());
    let (put_url, _) = store.presign(Presign::Put, &target).await.unwrap().unwrap();
    let good_sig = put_url
        .query_pairs()
        .find(|(k, _)| k == "X-Amz-Signature")
        .map(|(_, v)| v.into_owned())
        .expect("a signature in the presigned URL");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let canary = format!("canary-{}", uuid::Uuid::new_v4().simple());
    let dead_url = format!("http://127.0.0.1:{dead}/bucket/result.mp4?X-Amz-Signature={canary}");
    let mut ids = Vec::new();
    for url in [put_url.as_str(), dead_url.as_str()] {
        let r = sync(
            &http,
            &gw,
            "acme-key",
            json!({
                "video_url": p.media.url("face.mp4"),
                "audio_url": p.media.url("voice.wav"),
                "inference_steps": 4,
                "seed": 7,
                "output_upload_url": url,
            }),
        )
        .await;
        assert_eq!(r.status(), 200);
        let answer = r.text().await.unwrap();
        assert!(
            !answer.contains(&good_sig) && !answer.contains(&canary),
            "{answer}"
        );
        let v: Value = serde_json::from_str(&answer).unwrap();
        ids.push(v["task_id"].as_str().unwrap().to_owned());
    }
    let (good_task, dead_task) = (ids[0].clone(), ids[1].clone());

    // 1. The uploaded inputs made a result; the pipeline's gateway presigns it.
    let t = wait_done(&gw, "acme-key", &uploaded_task).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["output_uploaded"], Value::Null, "{t}");
    let result_key = names::artifact_key(&uploaded_task, "result.mp4");
    let stored = read_all(&store, &result_key).await;
    let nr = no_redirects();
    let r = nr
        .get(format!("{}/outputs/{uploaded_task}/result.mp4", p.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let got = reqwest::get(&location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256(&got), sha256(&stored));
    let part = http
        .get(&location)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.bytes().await.unwrap().as_ref(), &stored[100..200]);
    // The gateway without presign streams it, ranges included.
    let r = http
        .get(format!("{gw}/outputs/{uploaded_task}/result.mp4"))
        .bearer_auth("acme-key")
        .header("range", "bytes=0-99")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &stored[..100]);
    // The uploads went with the task's inputs.
    for id in [vid, aid] {
        let k = format!("uploads/acme/{id}");
        wait_gone(&store, &k, Duration::from_secs(10))
            .await
            .unwrap_or_else(|_| panic!("{k} was not deleted with the task"));
    }

    // 2. Typed refusal of the oversized upload.
    let t = wait_done(&gw, "acme-key", &big_task).await;
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["error"]["code"], "input_too_large", "{t}");

    // 3a. The result was PUT to the presigned URL.
    let t = wait_done(&gw, "acme-key", &good_task).await;
    assert_eq!(t["status"], "completed", "{t}");
    assert_eq!(t["output_uploaded"], true, "{t}");
    let shown = t["request"]["output_upload_url"].as_str().unwrap();
    assert_eq!(shown, put_url.as_str().split('?').next().unwrap());
    let result = read_all(&store, &names::artifact_key(&good_task, "result.mp4")).await;
    assert_eq!(sha256(&read_all(&store, &target).await), sha256(&result));

    // 3b. A dead target: retries, then output_upload_failed; the result stays served.
    let t = wait_done(&gw, "acme-key", &dead_task).await;
    eprintln!("dead output_upload_url: {t}");
    assert_eq!(t["status"], "failed", "{t}");
    assert_eq!(t["error"]["code"], "output_upload_failed", "{t}");
    assert_eq!(t["error"]["retryable"], true, "{t}");
    assert_eq!(t["output_uploaded"], false, "{t}");
    assert_eq!(t["stages"]["mux"]["attempts"], 3, "{t}");
    assert_eq!(
        t["output_video_url"],
        format!("/outputs/{dead_task}/result.mp4"),
        "{t}"
    );
    assert_eq!(
        t["request"]["output_upload_url"],
        format!("http://127.0.0.1:{dead}/bucket/result.mp4")
    );
    let r = http
        .get(format!("{gw}/outputs/{dead_task}/result.mp4"))
        .bearer_auth("acme-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.bytes().await.unwrap().is_empty());

    // Signatures appear in no answer and no log line.
    let list = http
        .get(format!("{gw}/tasks"))
        .bearer_auth("acme-key")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains(&dead_task), "{list}");
    let mut seen = vec![("GET /tasks".to_owned(), list)];
    for id in [&good_task, &dead_task] {
        seen.push((
            format!("GET /task/{id}"),
            task(&gw, "acme-key", id).await.to_string(),
        ));
    }
    seen.push(("gateway log".into(), gateway.text()));
    seen.push(("mux log".into(), mux.text()));
    let mux_log = mux.text();
    assert!(
        mux_log.contains("output upload failed") && mux_log.contains("uploaded"),
        "the mux log names the failed and the done uploads:\n{mux_log}"
    );
    assert!(
        gateway.text().contains("upload URL issued"),
        "{}",
        gateway.text()
    );
    for (what, text) in &seen {
        assert!(
            !text.contains(&canary),
            "{what} shows the signature: {text}"
        );
        assert!(
            !text.contains(&good_sig),
            "{what} shows the signature: {text}"
        );
    }
    drop(gateway);
    drop(mux);
}
