//! The `lipsync` CLI end to end against a real gateway on a real nats-server: submit by
//! URL and by file upload, status, queue, cancel, typed errors, and `--wait --out` with a
//! fake pipeline (the test drives the task record and puts the result artifact; the CLI
//! follows the WebSocket, with an API key, and downloads the file); batches from pairs and
//! a CSV with `-q` and `--webhook-url`, `ls` over `GET /tasks` pages, the auth exit code,
//! `--timeout`, Ctrl-C (an injected interrupt) detaching or cancelling, and a batch
//! `--wait --out-dir` whose worst outcome sets the exit code. Retries of 429/503 are tested
//! against a stand-in server in client/tests/standin.rs.

mod gateway_common;

use std::time::Duration;

use gateway_common::{Env, try_json};
use lipsync_client::{Cli, ClientError, EXIT_OK, EXIT_TASK_FAILED};
use lipsync_runtime::{ArtifactStore, NatsArtifacts};
use lipsync_schemas::{ErrorCode, Stage, TaskError, names};
use lipsync_tests::wait_for;
use serde_json::Value;

/// Runs the CLI in-process with `args` (after `lipsync --server <gw>`); returns the
/// outcome and what it printed. (Progress bars are hidden: stderr is not a terminal.)
async fn cli(env: &Env, args: &[&str]) -> (Result<i32, ClientError>, String) {
    let server = env.url("");
    let mut argv = vec!["lipsync", "--server", server.as_str()];
    argv.extend_from_slice(args);
    let parsed = Cli::try_from_args(argv).expect("valid command line");
    let mut out = Vec::new();
    let res = lipsync_client::run(parsed, &mut out).await;
    (res, String::from_utf8(out).expect("utf-8 output"))
}

async fn cli_json(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (res, out) = cli(env, &all).await;
    assert_eq!(res.expect("command succeeds"), EXIT_OK, "{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test]
async fn submit_urls_then_status_queue_and_cancel() {
    let env = Env::start().await;
    let v = cli_json(
        &env,
        &[
            "submit",
            "--video",
            "https://example.com/face.mp4",
            "--audio",
            "https://example.com/speech.wav",
            "--steps",
            "7",
            "--guidance",
            "2.0",
            "--seed",
            "42",
        ],
    )
    .await;
    let id = v["task_id"].as_str().unwrap().to_owned();
    assert_eq!(v["status"], "queued");
    assert_eq!(v["queue_position"], 0);

    let t = cli_json(&env, &["status", &id]).await;
    assert_eq!(t["task_id"], id.as_str());
    assert_eq!(t["status"], "queued");
    assert_eq!(t["request"]["video_url"], "https://example.com/face.mp4");
    assert_eq!(t["request"]["inference_steps"], 7);
    assert_eq!(t["request"]["guidance_scale"], 2.0);
    assert_eq!(t["request"]["seed"], 42);

    // The text form names the status.
    let (res, text) = cli(&env, &["status", &id]).await;
    assert_eq!(res.unwrap(), EXIT_OK);
    assert!(text.contains(&format!("task {id}: queued")), "{text}");

    let q = wait_for(Duration::from_secs(5), || async {
        let q = cli_json(&env, &["queue"]).await;
        (q["queue_length"] == 1).then_some(q)
    })
    .await
    .unwrap();
    assert_eq!(q["queued_tasks"][0]["task_id"], id.as_str());
    let (_, text) = cli(&env, &["queue"]).await;
    assert!(text.starts_with("1 task(s) waiting"), "{text}");

    let c = cli_json(&env, &["cancel", &id]).await;
    assert_eq!(c["status"], "failed");
    assert_eq!(c["error"]["code"], "cancelled");
    let t = cli_json(&env, &["status", &id]).await;
    assert_eq!(t["error"]["code"], "cancelled");

    // --wait on a cancelled task ends at once with the cancel exit code.
    let (res, text) = cli(&env, &["status", &id, "--wait"]).await;
    assert_eq!(res.unwrap(), lipsync_client::EXIT_CANCELLED);
    assert!(text.contains("(cancelled)"), "{text}");
    env.stop().await;
}

#[tokio::test]
async fn submit_uploads_files_as_multipart() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let video: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let audio: Vec<u8> = (0..50_000u32).map(|i| (i % 7) as u8).collect();
    let vpath = dir.path().join("face.mp4");
    let apath = dir.path().join("speech.wav");
    std::fs::write(&vpath, &video).unwrap();
    std::fs::write(&apath, &audio).unwrap();
    let v = cli_json(
        &env,
        &[
            "submit",
            "--video",
            vpath.to_str().unwrap(),
            "--audio",
            apath.to_str().unwrap(),
            "--steps",
            "3",
        ],
    )
    .await;
    let id = v["task_id"].as_str().unwrap().to_owned();
    let t = cli_json(&env, &["status", &id]).await;
    assert_eq!(
        t["request"]["video_url"],
        Value::Null,
        "an upload has no URL"
    );
    assert_eq!(t["request"]["inference_steps"], 3);
    let store = NatsArtifacts::new(env.topo.artifacts.clone());
    for (name, want) in [
        (names::artifact::VIDEO, &video),
        (names::artifact::AUDIO_ORIGINAL, &audio),
    ] {
        let mut got = Vec::new();
        let mut r = store.get(&names::artifact_key(&id, name)).await.unwrap();
        tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got)
            .await
            .unwrap();
        assert_eq!(&got, want, "{name} stored as uploaded");
    }
    env.stop().await;
}

#[tokio::test]
async fn usage_and_api_errors_are_typed() {
    let env = Env::start().await;
    let (res, _) = cli(
        &env,
        &[
            "submit",
            "--video",
            "https://example.com/v.mp4",
            "--audio",
            "a.wav",
        ],
    )
    .await;
    let e = res.unwrap_err();
    assert!(matches!(e, ClientError::Usage(_)), "{e}");
    assert_eq!(e.exit_code(), lipsync_client::EXIT_USAGE);

    let (res, _) = cli(&env, &["status", "00000000-0000-4000-8000-000000000000"]).await;
    match res.unwrap_err() {
        ClientError::Api { status, code, .. } => {
            assert_eq!((status, code.as_str()), (404, "not_found"));
        }
        other => panic!("unexpected {other}"),
    }
    let (res, _) = cli(
        &env,
        &[
            "submit",
            "--video",
            "https://example.com/v.mp4",
            "--audio",
            "https://example.com/a.wav",
            "--steps",
            "1000",
        ],
    )
    .await;
    assert!(
        matches!(res, Err(ClientError::Api { status: 422, .. })),
        "{res:?}"
    );
    // Direct uploads need the s3 backend; this gateway has the nats one.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.wav");
    std::fs::write(&file, b"audio").unwrap();
    let (res, _) = cli(
        &env,
        &[
            "submit",
            "--direct-upload",
            "--video",
            "https://example.com/v.mp4",
            "--audio",
            file.to_str().unwrap(),
        ],
    )
    .await;
    match res.unwrap_err() {
        ClientError::Api { code, .. } => assert_eq!(code, "uploads_unavailable"),
        other => panic!("unexpected {other}"),
    }
    env.stop().await;
}

#[tokio::test]
async fn direct_upload_puts_files_in_the_bucket_and_submits_their_ids() {
    let s3 = lipsync_tests::S3Server::start().await.unwrap();
    let env = Env::start_with(|c| {
        s3.config(c);
        c.outputs.presign = true;
        c.gateway.api_keys = vec!["k-123".into()];
    })
    .await;
    let store = s3.store().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let video: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let audio: Vec<u8> = (0..40_000u32).map(|i| (i % 11) as u8).collect();
    let vpath = dir.path().join("face.mp4");
    let apath = dir.path().join("speech.wav");
    std::fs::write(&vpath, &video).unwrap();
    std::fs::write(&apath, &audio).unwrap();
    let server = env.url("");
    // `lipsync --json submit --direct-upload <args>` with the key.
    let submit = |args: Vec<String>| {
        let mut argv: Vec<String> = [
            "lipsync",
            "--server",
            &server,
            "--api-key",
            "k-123",
            "--json",
            "submit",
            "--direct-upload",
        ]
        .map(str::to_owned)
        .to_vec();
        argv.extend(args);
        async move {
            let mut out = Vec::new();
            let res = lipsync_client::run(Cli::try_from_args(argv).unwrap(), &mut out).await;
            (res, String::from_utf8(out).unwrap())
        }
    };
    let files = strings(&[
        "--idempotency-key",
        "direct-1",
        "--video",
        vpath.to_str().unwrap(),
        "--audio",
        apath.to_str().unwrap(),
    ]);
    let stored = |key: String| {
        let store = &store;
        async move {
            let mut got = Vec::new();
            let mut r = store.get(&key).await.unwrap();
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut got)
                .await
                .unwrap();
            got
        }
    };

    // Two files: both go to the bucket, the record names their upload keys.
    let (res, out) = submit(files.clone()).await;
    assert_eq!(res.unwrap(), EXIT_OK, "{out}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (rec, _) = env.tasks.get(&id).await.unwrap().unwrap();
    let key = |s: &lipsync_schemas::InputSource| match s {
        lipsync_schemas::InputSource::Artifact(k) if k.starts_with("uploads/") => k.clone(),
        other => panic!("not a direct upload: {other:?}"),
    };
    assert_eq!(stored(key(&rec.request.video)).await, video);
    assert_eq!(stored(key(&rec.request.audio)).await, audio);

    // A re-run with the same key uploads anew: refused, not a second task.
    let (res, out) = submit(files).await;
    match res {
        Err(ClientError::Api { code, .. }) => assert_eq!(code, "idempotency_conflict", "{out}"),
        other => panic!("unexpected {other:?}: {out}"),
    }

    // A file and a URL mix (no idempotency key: a new task).
    let (res, out) = submit(strings(&[
        "--video",
        vpath.to_str().unwrap(),
        "--audio",
        "https://example.com/speech.wav",
    ]))
    .await;
    assert_eq!(res.unwrap(), EXIT_OK, "{out}");
    let id2 = serde_json::from_str::<Value>(&out).unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(id2, id);
    let (rec, _) = env.tasks.get(&id2).await.unwrap().unwrap();
    assert_eq!(stored(key(&rec.request.video)).await, video);
    assert_eq!(
        rec.request.audio,
        lipsync_schemas::InputSource::Url("https://example.com/speech.wav".into())
    );
    env.stop().await;
}

/// Drives the record of `id` like the pipeline would, then completes it with a result.
async fn fake_pipeline(env: &Env, id: &str, result: &[u8]) {
    env.tasks
        .mark_started(id, Stage::Fetch, 1, 0)
        .await
        .unwrap();
    env.tasks
        .mark_started(id, Stage::Infer, 1, 0)
        .await
        .unwrap();
    env.tasks
        .progress(id, Stage::Infer, 0.5, "infer: step 10/20")
        .await
        .unwrap();
    let store = NatsArtifacts::new(env.topo.artifacts.clone());
    store
        .put(
            &names::artifact_key(id, names::artifact::RESULT),
            &mut &result[..],
        )
        .await
        .unwrap();
    env.complete(id, 1.0).await;
}

/// Fails `id` at the face stage as a clip without a face would.
async fn fail_no_face(env: &Env, id: &str) {
    env.tasks
        .fail(
            id,
            Some(Stage::Face),
            TaskError::new(ErrorCode::NoFaceDetected, "no face in frame 0"),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn submit_wait_follows_and_downloads_the_result_with_an_api_key() {
    let env = Env::start_with(|c| c.gateway.api_keys = vec!["k-123".into()]).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("result.mp4");
    let server = env.url("");
    let argv = vec![
        "lipsync".to_owned(),
        "--server".into(),
        server,
        "--api-key".into(),
        "k-123".into(),
        "submit".into(),
        "--video".into(),
        "https://example.com/face.mp4".into(),
        "--audio".into(),
        "https://example.com/speech.wav".into(),
        "--wait".into(),
        "--out".into(),
        out.to_str().unwrap().into(),
    ];
    let run = tokio::spawn(async move {
        let mut buf = Vec::new();
        let code = lipsync_client::run(Cli::try_from_args(argv).unwrap(), &mut buf).await;
        (code, String::from_utf8(buf).unwrap())
    });
    // The task appears in the queue; its WebSocket client shows up in the gateway metrics.
    let http = reqwest::Client::new();
    let id = wait_for(Duration::from_secs(10), || async {
        let r = http
            .get(env.url("/queue"))
            .bearer_auth("k-123")
            .send()
            .await
            .ok()?;
        let q: Value = r.json().await.ok()?;
        q["queued_tasks"][0]["task_id"].as_str().map(str::to_owned)
    })
    .await
    .unwrap();
    ws_clients(&env, 1).await;
    let result: Vec<u8> = (0..150_000u32).map(|i| (i * 31 % 256) as u8).collect();
    fake_pipeline(&env, &id, &result).await;
    let (code, text) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the CLI returns after completion")
        .unwrap();
    assert_eq!(code.unwrap(), EXIT_OK, "{text}");
    assert!(text.contains(&format!("task {id}: completed")), "{text}");
    assert!(text.contains("saved result to"), "{text}");
    assert_eq!(std::fs::read(&out).unwrap(), result);
    assert!(!dir.path().join("result.mp4.part").exists());
    env.stop().await;
}

#[tokio::test]
async fn wait_reports_a_failed_task() {
    let env = Env::start().await;
    let id = env.submit_ok().await;
    let server = env.url("");
    let wait_id = id.clone();
    let run = tokio::spawn(async move {
        let argv = ["lipsync", "--server", &server, "--quiet", "--json"]
            .into_iter()
            .chain(["status", wait_id.as_str(), "--wait"]);
        let mut buf = Vec::new();
        let code = lipsync_client::run(Cli::try_from_args(argv).unwrap(), &mut buf).await;
        (code, String::from_utf8(buf).unwrap())
    });
    env.tasks
        .mark_started(&id, Stage::Face, 1, 0)
        .await
        .unwrap();
    fail_no_face(&env, &id).await;
    let (code, text) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the CLI returns after the failure")
        .unwrap();
    assert_eq!(code.unwrap(), EXIT_TASK_FAILED, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["code"], "no_face_detected");
    env.stop().await;
}

/// Runs the CLI in-process with `args` after `lipsync --server <gw>`, with `interrupt`
/// standing for Ctrl-C; returns the outcome and what it printed.
async fn cli_interruptible(
    server: String,
    args: Vec<String>,
    interrupt: impl std::future::Future<Output = ()> + Send,
) -> (Result<i32, ClientError>, String) {
    let mut argv = vec!["lipsync".to_owned(), "--server".into(), server];
    argv.extend(args);
    let mut out = Vec::new();
    let res = lipsync_client::run_with_interrupt(
        Cli::try_from_args(argv).expect("valid command line"),
        &mut out,
        interrupt,
    )
    .await;
    (res, String::from_utf8(out).expect("utf-8 output"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

async fn ws_clients(env: &Env, n: usize) {
    let want = format!("lipsync_websocket_clients {n}");
    wait_for(Duration::from_secs(10), || async {
        let text = env
            .http
            .get(env.url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines().any(|l| l == want).then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("{n} WebSocket client(s) follow the tasks"));
}

/// Runs the CLI with `args` until it follows the task over a WebSocket, then interrupts it
/// (Ctrl-C); returns the outcome and what it printed.
async fn interrupted(env: &Env, args: &[&str]) -> (Result<i32, ClientError>, String) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(cli_interruptible(env.url(""), strings(args), async move {
        let _ = rx.await;
    }));
    ws_clients(env, 1).await;
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the CLI returns after the interrupt")
        .unwrap()
}

#[tokio::test]
async fn batch_submit_from_pairs_and_csv_prints_ids_and_sets_the_webhook() {
    let env = Env::start_with(|c| {
        c.gateway.webhook_secret = "hook-secret".into();
        c.gateway.webhook_allow_private_networks = true;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("tasks.csv");
    std::fs::write(
        &csv,
        "video,audio\nhttps://example.com/c.mp4,https://example.com/c.wav\n# skipped\nhttps://example.com/d.mp4,https://example.com/d.wav\n",
    )
    .unwrap();
    let (res, out) = cli(
        &env,
        &[
            "-q",
            "submit",
            "--video",
            "https://example.com/a.mp4",
            "--audio",
            "https://example.com/a.wav",
            "--video",
            "https://example.com/b.mp4",
            "--audio",
            "https://example.com/b.wav",
            "--csv",
            csv.to_str().unwrap(),
            "--webhook-url",
            "http://127.0.0.1:9/hook",
            "--steps",
            "4",
        ],
    )
    .await;
    assert_eq!(res.unwrap(), EXIT_OK, "{out}");
    let ids: Vec<&str> = out.lines().collect();
    assert_eq!(ids.len(), 4, "-q prints one id per task: {out}");
    for (id, name) in ids.iter().zip(["a", "b", "c", "d"]) {
        let t = cli_json(&env, &["status", id]).await;
        assert_eq!(
            t["request"]["video_url"],
            format!("https://example.com/{name}.mp4").as_str()
        );
        assert_eq!(t["request"]["inference_steps"], 4);
        assert_eq!(t["request"]["webhook_url"], "http://127.0.0.1:9/hook");
    }
    env.stop().await;
}

#[tokio::test]
async fn ls_lists_the_callers_tasks_across_pages() {
    let env = Env::start().await;
    let mut want = std::collections::BTreeSet::new();
    for _ in 0..3 {
        want.insert(env.submit_ok().await);
    }
    // The index follows the KV watch: wait until it lists all three.
    let out = wait_for(Duration::from_secs(10), || async {
        let (res, out) = cli(&env, &["-q", "ls", "--all", "--limit", "2"]).await;
        (res.ok() == Some(EXIT_OK) && out.lines().count() == 3).then_some(out)
    })
    .await
    .expect("ls --all lists three tasks");
    let got: std::collections::BTreeSet<String> = out.lines().map(str::to_owned).collect();
    assert_eq!(got, want);
    // One page of two, with the cursor of the next one.
    let page = cli_json(&env, &["ls", "--limit", "2"]).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 2);
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let rest = cli_json(&env, &["ls", "--limit", "2", "--cursor", &cursor]).await;
    assert_eq!(rest["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next_cursor"], Value::Null);
    env.stop().await;
}

#[tokio::test]
async fn a_wrong_api_key_exits_with_the_auth_code() {
    let env = Env::start_with(|c| c.gateway.api_keys = vec!["k-123".into()]).await;
    let server = env.url("");
    let (res, _) = cli_interruptible(
        server,
        strings(&["--api-key", "wrong", "--quiet", "ls"]),
        std::future::pending(),
    )
    .await;
    let e = res.unwrap_err();
    assert_eq!(e.exit_code(), lipsync_client::EXIT_AUTH, "{e}");
    env.stop().await;
}

#[tokio::test]
async fn timeout_interrupt_and_cancel_on_interrupt() {
    let env = Env::start().await;
    let id = env.submit_ok().await;

    // --timeout: the task stays queued; the wait ends with the timeout code.
    let (res, out) = cli_interruptible(
        env.url(""),
        strings(&["--quiet", "status", &id, "--timeout", "1s"]),
        std::future::pending(),
    )
    .await;
    assert_eq!(res.unwrap(), lipsync_client::EXIT_TIMEOUT, "{out}");

    // Ctrl-C while waiting: detaches, prints the id, the task keeps going.
    let (res, out) = interrupted(&env, &["status", &id, "--wait"]).await;
    assert_eq!(res.unwrap(), lipsync_client::EXIT_INTERRUPTED, "{out}");
    assert!(out.contains(&format!("task {id} detached")), "{out}");
    let t = cli_json(&env, &["status", &id]).await;
    assert_eq!(t["status"], "queued", "detaching leaves the task alone");

    // --cancel-on-interrupt: the task is cancelled.
    ws_clients(&env, 0).await;
    let (res, out) = interrupted(&env, &["status", &id, "--wait", "--cancel-on-interrupt"]).await;
    assert_eq!(res.unwrap(), lipsync_client::EXIT_CANCELLED, "{out}");
    let t = cli_json(&env, &["status", &id]).await;
    assert_eq!(t["error"]["code"], "cancelled");
    // Waiting on a cancelled task reports the cancel code.
    let (res, _) = cli(&env, &["status", &id, "--wait"]).await;
    assert_eq!(res.unwrap(), lipsync_client::EXIT_CANCELLED);
    env.stop().await;
}

#[tokio::test]
async fn batch_wait_saves_results_to_out_dir_and_reports_the_worst_outcome() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let args = strings(&[
        "--quiet",
        "submit",
        "--video",
        "https://example.com/a.mp4",
        "--audio",
        "https://example.com/a.wav",
        "--video",
        "https://example.com/b.mp4",
        "--audio",
        "https://example.com/b.wav",
        "--out-dir",
        out_dir.to_str().unwrap(),
    ]);
    let run = tokio::spawn(cli_interruptible(env.url(""), args, std::future::pending()));
    let ids = wait_for(Duration::from_secs(10), || async {
        let q = try_json(&env.http, env.url("/queue")).await?;
        let ids: Vec<String> = q["queued_tasks"]
            .as_array()?
            .iter()
            .filter_map(|t| t["task_id"].as_str().map(str::to_owned))
            .collect();
        (ids.len() == 2).then_some(ids)
    })
    .await
    .expect("both tasks are queued");
    ws_clients(&env, 2).await;
    let result: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    fake_pipeline(&env, &ids[0], &result).await;
    fail_no_face(&env, &ids[1]).await;
    let (res, out) = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the CLI returns when both tasks ended")
        .unwrap();
    assert_eq!(res.unwrap(), EXIT_TASK_FAILED, "one task failed: {out}");
    let printed: std::collections::BTreeSet<&str> = out.lines().collect();
    assert_eq!(
        printed,
        ids.iter().map(String::as_str).collect(),
        "-q prints each id once"
    );
    assert_eq!(
        std::fs::read(out_dir.join(format!("{}.mp4", ids[0]))).unwrap(),
        result
    );
    assert!(!out_dir.join(format!("{}.mp4", ids[1])).exists());
    env.stop().await;
}
