//! Gateway REST routes against a real nats-server: submit, task, queue, cancel,
//! validation, idempotency, outputs with Range, auth, rate limit, typed errors, docs.

mod gateway_common;

use std::time::Duration;

use gateway_common::{Env, error_code, valid_body};
use lipsync_runtime::{ArtifactStore, NatsArtifacts};
use lipsync_schemas::names;
use lipsync_tests::wait_for;
use serde_json::{Value, json};

#[tokio::test]
async fn submit_queue_positions_get_and_cancel() {
    let env = Env::start().await;
    let mut ids = Vec::new();
    for expected in 0..3u64 {
        let r = env.submit(valid_body()).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "queued");
        assert_eq!(v["queue_position"], expected, "{v}");
        assert!(v["message"].is_string());
        ids.push(v["task_id"].as_str().unwrap().to_owned());
    }
    // Each accepted task has its work item in the stream.
    let mut stream = env.topo.js.get_stream(names::WORK_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 3);

    let (s, q) = env.get_json("/queue").await;
    assert_eq!(s, 200);
    assert_eq!(q["queue_length"], 3);
    assert_eq!(q["is_processing"], false);
    let listed: Vec<&str> = q["queued_tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(q["queued_tasks"][2]["position"], 2);

    let (s, t) = env.get_json(&format!("/task/{}", ids[1])).await;
    assert_eq!(s, 200);
    assert_eq!(t["status"], "queued");
    assert_eq!(t["progress"], 0.0);
    assert_eq!(t["queue_position"], 1);
    assert_eq!(t["output_video_url"], Value::Null);
    assert_eq!(t["output_mask_url"], Value::Null);
    assert_eq!(t["request"]["inference_steps"], 20);
    // The served profile is the default model (tiny here: no real weights installed).
    assert_eq!(t["request"]["inference_ckpt_path"], "tiny");
    assert!(t["start_time"].as_f64().unwrap() > 1.7e9);

    // Cancel the middle one: failed/cancelled, the others move up.
    let r = env
        .http
        .delete(env.url(&format!("/task/{}", ids[1])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["code"], "cancelled");
    let last = ids[2].clone();
    wait_for(Duration::from_secs(5), || {
        let env = &env;
        let last = last.clone();
        async move {
            let (_, t) = env.get_json(&format!("/task/{last}")).await;
            (t["queue_position"] == 1).then_some(())
        }
    })
    .await
    .unwrap();
    // Cancelling again is harmless; a completed task cannot be cancelled.
    let r = env
        .http
        .delete(env.url(&format!("/task/{}", ids[1])))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    env.complete(&ids[0], 1.0).await;
    let r = env
        .http
        .delete(env.url(&format!("/task/{}", ids[0])))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 409).await, "task_finished");
    let r = env
        .http
        .delete(env.url("/task/00000000-0000-4000-8000-000000000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "not_found");
    env.stop().await;
}

#[tokio::test]
async fn invalid_requests_get_typed_errors() {
    let env = Env::start_with(|c| c.gateway.max_json_body_bytes = 4096).await;
    let base = valid_body();
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"audio_url": "https://e.com/a.wav"}),
            "missing video_url",
        ),
        (
            json!({"video_url": "https://e.com/v.mp4"}),
            "missing audio_url",
        ),
        (json!([]), "array body"),
        (json!("x"), "string body"),
        (with("video_url", json!(5)), "url as number"),
        (with("video_url", json!("ftp://e.com/v.mp4")), "ftp scheme"),
        (with("video_url", json!("not a url")), "no scheme"),
        (
            with("audio_url", json!("http://user:pw@e.com/a")),
            "userinfo",
        ),
        (with("inference_steps", json!(0)), "steps 0"),
        (with("inference_steps", json!(101)), "steps 101"),
        (with("inference_steps", json!(-1)), "steps negative"),
        (with("inference_steps", json!("20")), "steps as string"),
        (with("inference_steps", json!(1e12)), "steps huge"),
        (with("guidance_scale", json!(0.5)), "guidance low"),
        (with("guidance_scale", json!(5.5)), "guidance high"),
        (with("guidance_scale", json!(-1.0)), "guidance negative"),
        (with("guidance_scale", json!("NaN")), "guidance NaN string"),
        (with("seed", json!(-5)), "negative seed"),
        (with("seed", json!(1.5)), "fractional seed"),
        (
            with("inference_ckpt_path", json!("/etc/passwd")),
            "path ckpt",
        ),
        (
            with("inference_ckpt_path", json!("../../etc/passwd")),
            "traversal ckpt",
        ),
        (
            with("webhook_url", json!("https://e.com/hook")),
            "webhook without secret",
        ),
    ];
    for (body, what) in cases {
        let r = env.submit(body).await;
        let status = r.status().as_u16();
        assert_eq!(status, 422, "{what}");
        assert_eq!(error_code(r, 422).await, "invalid_request", "{what}");
    }
    let raw = |body: &'static str, ctype: &'static str| {
        env.http
            .post(env.url("/sync"))
            .header("content-type", ctype)
            .body(body)
            .send()
    };
    let r = raw("{\"video_url\": ", "application/json").await.unwrap();
    assert_eq!(error_code(r, 400).await, "invalid_json");
    let r = raw(
        r#"{"video_url":"https://e.com/v","audio_url":"https://e.com/a","guidance_scale":NaN}"#,
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(error_code(r, 400).await, "invalid_json");
    let r = raw("video_url=x", "text/plain").await.unwrap();
    assert_eq!(error_code(r, 415).await, "unsupported_media_type");
    let huge = format!(
        r#"{{"video_url":"https://e.com/{}","audio_url":"https://e.com/a"}}"#,
        "v".repeat(100_000)
    );
    let r = env
        .http
        .post(env.url("/sync"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 413).await, "payload_too_large");

    // Unknown fields are ignored; explicit nulls mean defaults.
    let mut b = valid_body();
    b["something_new"] = json!({"x": 1});
    b["seed"] = Value::Null;
    b["inference_ckpt_path"] = json!("tiny");
    b["inference_steps"] = json!(5);
    b["guidance_scale"] = json!(1.0);
    let r = env.submit(b).await;
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, t) = env.get_json(&format!("/task/{id}")).await;
    assert_eq!(t["request"]["inference_ckpt_path"], "tiny");
    assert_eq!(t["request"]["inference_steps"], 5);
    env.stop().await;
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let env = Env::start_with(|c| c.fetch.allow_private_networks = false).await;
    let mut b = valid_body();
    b["video_url"] = json!("http://127.0.0.1:8080/v.mp4");
    let r = env.submit(b).await;
    assert_eq!(error_code(r, 422).await, "url_not_allowed");
    let mut b = valid_body();
    b["audio_url"] = json!("http://169.254.169.254/latest/meta-data");
    let r = env.submit(b).await;
    assert_eq!(error_code(r, 422).await, "url_not_allowed");
    env.stop().await;
}

#[tokio::test]
async fn unknown_ids_routes_methods_and_huge_headers_are_typed_4xx() {
    let env = Env::start().await;
    for path in [
        "/task/nope",
        "/task/00000000-0000-4000-8000-000000000000",
        "/task/..%2F..%2Fetc%2Fpasswd",
        "/task/a.b",
        "/outputs/..%2F..%2Fx/result.mp4",
        "/nothing/here",
        "/task/../../etc/passwd",
    ] {
        let r = env.http.get(env.url(path)).send().await.unwrap();
        assert_eq!(error_code(r, 404).await, "not_found", "{path}");
    }
    let r = env.http.put(env.url("/sync")).send().await.unwrap();
    assert_eq!(error_code(r, 405).await, "method_not_allowed");
    let r = env.http.get(env.url("/sync")).send().await.unwrap();
    assert_eq!(error_code(r, 405).await, "method_not_allowed");
    // A WebSocket route without an upgrade.
    let id = env.submit_ok().await;
    let r = env
        .http
        .get(env.url(&format!("/task/{id}/ws")))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert!((400..500).contains(&s), "{s}");
    let _ = error_code(r, s).await;

    // A 10 MB header: hyper refuses it (431 or a closed connection), never a 5xx, and the
    // server keeps serving.
    let big = "x".repeat(10 * 1024 * 1024);
    match env
        .http
        .get(env.url("/queue"))
        .header("x-big", big)
        .send()
        .await
    {
        Ok(r) => {
            let s = r.status().as_u16();
            assert!((400..500).contains(&s), "huge header gave {s}");
        }
        Err(e) => eprintln!("huge header: connection refused by the server: {e}"),
    }
    let (s, _) = env.get_json("/health").await;
    assert_eq!(s, 200);
    env.stop().await;
}

#[tokio::test]
async fn idempotency_key_replays_or_conflicts() {
    let env = Env::start().await;
    let post = |key: &'static str, body: Value| {
        env.http
            .post(env.url("/sync"))
            .header("idempotency-key", key)
            .json(&body)
            .send()
    };
    let r1: Value = post("k-1", valid_body())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let r2 = post("k-1", valid_body()).await.unwrap();
    assert_eq!(r2.status(), 200);
    let r2: Value = r2.json().await.unwrap();
    assert_eq!(r1["task_id"], r2["task_id"]);
    assert_eq!(r2["queue_position"], 0);
    let mut other = valid_body();
    other["inference_steps"] = json!(7);
    let r3 = post("k-1", other.clone()).await.unwrap();
    assert_eq!(error_code(r3, 409).await, "idempotency_conflict");
    let r4: Value = post("k-2", other).await.unwrap().json().await.unwrap();
    assert_ne!(r4["task_id"], r1["task_id"]);
    let (_, q) = env.get_json("/queue").await;
    assert_eq!(q["queue_length"], 2, "{q}");
    env.stop().await;
}

#[tokio::test]
async fn full_work_queue_answers_503_and_leaves_no_queued_phantom() {
    let env = Env::start_with(|c| c.nats.max_queued_jobs = 2).await;
    env.submit_ok().await;
    env.submit_ok().await;
    let r = env.submit(valid_body()).await;
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_code(r, 503).await, "queue_full");
    wait_for(Duration::from_secs(5), || async {
        let (_, q) = env.get_json("/queue").await;
        (q["queue_length"] == 2).then_some(())
    })
    .await
    .unwrap();
    env.stop().await;
}

#[tokio::test]
async fn outputs_stream_with_range_etag_and_only_listed_files() {
    let env = Env::start().await;
    let id = env.submit_ok().await;
    let store = NatsArtifacts::new(env.topo.artifacts.clone());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    store
        .put(
            &names::artifact_key(&id, "result.mp4"),
            &mut data.as_slice(),
        )
        .await
        .unwrap();
    // Not listed by the record yet.
    let r = env
        .http
        .get(env.url(&format!("/outputs/{id}/result.mp4")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 404).await, "not_found");
    env.complete(&id, 1.0).await;
    let url = env.url(&format!("/outputs/{id}/result.mp4"));
    let full = wait_for(Duration::from_secs(5), || async {
        let r = env.http.get(&url).send().await.ok()?;
        (r.status() == 200).then_some(r)
    })
    .await
    .unwrap();
    assert_eq!(full.headers()["content-type"], "video/mp4");
    assert_eq!(full.headers()["content-length"], "300000");
    assert_eq!(full.headers()["accept-ranges"], "bytes");
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(full.bytes().await.unwrap().as_ref(), data.as_slice());

    let r = env
        .http
        .get(&url)
        .header("range", "bytes=200000-200999")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 200000-200999/300000");
    assert_eq!(r.headers()["content-length"], "1000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[200_000..201_000]);
    let r = env
        .http
        .get(&url)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[299_990..]);
    let r = env
        .http
        .get(&url)
        .header("range", "bytes=300000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-range"], "bytes */300000");
    assert_eq!(error_code(r, 416).await, "range_not_satisfiable");
    let r = env
        .http
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    // The public implementation's alias.
    let r = env
        .http
        .get(env.url(&format!("/results/{id}/output.mp4")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 300_000);
    // The mask is not listed; other names never map to a key.
    for f in [
        "mask.mp4",
        "input_video",
        "..%2Finput_video",
        "result.mp4%00",
    ] {
        let r = env
            .http
            .get(env.url(&format!("/outputs/{id}/{f}")))
            .send()
            .await
            .unwrap();
        assert_eq!(error_code(r, 404).await, "not_found", "{f}");
    }
    env.stop().await;
}

#[tokio::test]
async fn api_keys_and_rate_limit() {
    let env = Env::start_with(|c| {
        c.gateway.api_keys = vec!["k1-secret".into()];
        c.gateway.rate_limit_per_s = 1;
        c.gateway.rate_limit_burst = 3;
    })
    .await;
    let r = env.http.get(env.url("/queue")).send().await.unwrap();
    assert_eq!(error_code(r, 401).await, "unauthorized");
    let r = env
        .http
        .get(env.url("/queue"))
        .bearer_auth("k1-secreT")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "unauthorized");
    for p in [
        "/health",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/redoc",
    ] {
        let r = env.http.get(env.url(p)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{p} must stay open");
    }
    let mut limited = None;
    for _ in 0..10 {
        let r = env
            .http
            .get(env.url("/queue"))
            .bearer_auth("k1-secret")
            .send()
            .await
            .unwrap();
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let r = limited.expect("rate limit reached");
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_code(r, 429).await, "rate_limited");
    env.stop().await;
}

#[tokio::test]
async fn health_metrics_and_docs() {
    let env = Env::start().await;
    let (s, v) = env.get_json("/health").await;
    assert_eq!((s, v), (200, json!({"status": "healthy"})));
    let (s, v) = env.get_json("/readyz").await;
    assert_eq!(s, 200);
    assert_eq!(v["status"], "ready");
    env.submit_ok().await;

    let (s, doc) = env.get_json("/openapi.json").await;
    assert_eq!(s, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    for p in [
        "/sync",
        "/task/{task_id}",
        "/queue",
        "/outputs/{task_id}/{file}",
        "/results/{task_id}/output.mp4",
        "/health",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }
    let expected: Value = serde_json::from_str(
        &lipsync_gateway::openapi_for(&lipsync_gateway::gateway_settings(&env.cfg)).to_string(),
    )
    .unwrap();
    assert_eq!(doc, expected);
    let models = &doc["components"]["schemas"]["SyncRequest"]["properties"]["inference_ckpt_path"];
    // No real weights here: `auto` serves the tiny profile, which is the default model.
    assert_eq!(models["enum"][0], "tiny");

    let r = env.http.get(env.url("/docs/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("swagger"));
    let r = env
        .http
        .get(env.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().len() > 100_000);
    let r = env.http.get(env.url("/redoc")).send().await.unwrap();
    let html = r.text().await.unwrap();
    assert!(html.contains("/redoc/redoc.standalone.js") && !html.contains("cdn."));
    let r = env
        .http
        .get(env.url("/redoc/redoc.standalone.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().len() > 500_000);

    let text = env.metrics().await;
    for needle in [
        "lipsync_http_requests_total{code=\"200\",method=\"POST\",route=\"/sync\"} 1",
        "lipsync_http_request_duration_seconds_bucket",
        "lipsync_tasks_submitted_total 1",
        "lipsync_queue_length 1",
        "lipsync_websocket_clients 0",
        "lipsync_stage_backlog{stage=\"fetch\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
    env.stop().await;
}

#[tokio::test]
async fn router_answers_oneshot_requests() {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    let nats = lipsync_tests::NatsServer::start().await.unwrap();
    let cfg = nats.config();
    let token = tokio_util::sync::CancellationToken::new();
    let state = lipsync_gateway::AppState::connect(&cfg, token.clone())
        .await
        .unwrap();
    let app = lipsync_gateway::app(state);
    let req = |method: &str, uri: &str, body: &str| {
        axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap()
    };
    let resp = app
        .clone()
        .oneshot(req("POST", "/sync", &valid_body().to_string()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let id = v["task_id"].as_str().unwrap();
    let resp = app
        .clone()
        .oneshot(req("GET", &format!("/task/{id}"), ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .clone()
        .oneshot(req("POST", "/sync", "{}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let resp = app.oneshot(req("GET", "/health", "")).await.unwrap();
    assert_eq!(resp.status(), 200);
    token.cancel();
}
