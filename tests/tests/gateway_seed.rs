//! The seed guide's four Python snippets (`tests/seed_client.py`, run with the venv's
//! python from `LIPSYNC_PYTHON`) against an in-process gateway.

mod gateway_common;

use std::process::Stdio;
use std::time::Duration;

use gateway_common::Env;
use lipsync_runtime::{ArtifactStore, Change, NatsArtifacts};
use lipsync_schemas::{Status, names};
use lipsync_tests::{wait_for, workspace_root};
use serde_json::Value;

fn python() -> String {
    std::env::var("LIPSYNC_PYTHON").unwrap_or_else(|_| {
        let venv = workspace_root().join(".venv/bin/python");
        assert!(
            venv.exists(),
            "no python: set LIPSYNC_PYTHON or run `make setup` (needs `requests`)"
        );
        venv.display().to_string()
    })
}

fn seed_cmd(base: &str, until: &str, workdir: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(python());
    cmd.arg(workspace_root().join("tests/seed_client.py"))
        .args(["--base", base, "--until", until, "--poll-scale", "0.02"])
        .arg("--workdir")
        .arg(workdir)
        .env("NO_PROXY", "*")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn seed_snippets_submit_poll_and_queue() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out = seed_cmd(&env.url(""), "queued", dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("队列位置: 1"), "{stdout}");
    assert!(stdout.contains("状态: queued, 进度: 0.0%"), "{stdout}");
    assert!(stdout.contains("队列长度: 1"), "{stdout}");
    assert!(stdout.contains("FINAL_STATUS=queued"), "{stdout}");
    env.stop().await;
}

#[tokio::test]
async fn seed_snippets_download_the_result() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let child = seed_cmd(&env.url(""), "completed", dir.path())
        .spawn()
        .unwrap();
    // Play the pipeline: wait for the task, store outputs, complete it.
    let id = wait_for(Duration::from_secs(20), || async {
        let (_, q) = env.get_json("/queue").await;
        q["queued_tasks"][0]["task_id"].as_str().map(str::to_owned)
    })
    .await
    .unwrap();
    let store = NatsArtifacts::new(env.topo.artifacts.clone());
    let video = b"fake mp4 result".repeat(1000);
    let mask = b"fake mask".repeat(100);
    store
        .put(
            &names::artifact_key(&id, "result.mp4"),
            &mut video.as_slice(),
        )
        .await
        .unwrap();
    store
        .put(&names::artifact_key(&id, "mask.mp4"), &mut mask.as_slice())
        .await
        .unwrap();
    env.tasks
        .update(&id, |r| {
            r.status = Status::Completed;
            r.progress = 1.0;
            r.message = "completed".into();
            r.output_video_url = Some(format!("/outputs/{}/result.mp4", r.task_id));
            r.output_mask_url = Some(format!("/outputs/{}/mask.mp4", r.task_id));
            Change::Write
        })
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("seed client finishes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("FINAL_STATUS=completed"), "{stdout}");
    assert_eq!(
        std::fs::read(dir.path().join("result_video.mp4")).unwrap(),
        video
    );
    assert_eq!(
        std::fs::read(dir.path().join("result_mask.mp4")).unwrap(),
        mask
    );
    let (_, t): (u16, Value) = env.get_json(&format!("/task/{id}")).await;
    assert_eq!(t["status"], "completed");
    env.stop().await;
}
