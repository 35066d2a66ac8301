//! schemathesis (PyPI, installed in the venv by `make setup-test`) against the served
//! `/openapi.json` of an in-process gateway: no 5xx, every status, content type, header and
//! body conforms to the document. Bounded: 40 examples per operation, about 10 s.
//! It follows the backend matrix (`LIPSYNC_TEST_ARTIFACTS`): on `s3` the gateway has a
//! bucket and `outputs.presign`, so `POST /uploads` answers 201 and the upload-id fields
//! of `POST /sync` reach the bucket.
//!
//! The checks `positive_data_acceptance` / `negative_data_rejection` are left out: the
//! URL fields are checked by the SSRF policy and the `url` crate's WHATWG parser, which no
//! JSON-schema pattern can state exactly (e.g. `http://0` parses as 0.0.0.0).

mod gateway_common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use gateway_common::Env;
use lipsync_tests::pipeline::test_backend;
use lipsync_tests::{S3Server, workspace_root};

fn schemathesis() -> PathBuf {
    let python = std::env::var("LIPSYNC_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".venv/bin/python"));
    let bin = python
        .parent()
        .expect("python has a directory")
        .join("schemathesis");
    assert!(
        bin.exists(),
        "{} missing: run `make setup-test` (scripts/requirements-test.txt installs schemathesis)",
        bin.display()
    );
    bin
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_or_schema_violation() {
    let s3 = match test_backend() {
        "s3" => Some(S3Server::start().await.unwrap()),
        _ => None,
    };
    let env = Env::start_with(|c| {
        if let Some(s3) = &s3 {
            s3.config(c);
            c.outputs.presign = true;
        }
    })
    .await;
    let base = env.url("");
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(schemathesis())
            .arg("run")
            .arg(format!("{base}/openapi.json"))
            .args(["--url", &base])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_headers_conformance,response_schema_conformance",
                "--max-examples",
                "40",
                "--workers",
                "2",
                "--seed",
                "1",
                "--no-color",
            ])
            .env("NO_PROXY", "*")
            .env("SCHEMATHESIS_HOOKS", "")
            .current_dir(tempfile::tempdir().unwrap().path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("schemathesis finishes within 240 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "schemathesis failed:\n{stdout}\n{stderr}"
    );
    if s3.is_some() {
        // The run did reach the bucket-backed operation, not only its refusals.
        let text = env.metrics().await;
        assert!(
            lipsync_tests::metric_value(&text, "lipsync_uploads_issued_total") > 0.0,
            "{text}"
        );
    }
    env.stop().await;
}
