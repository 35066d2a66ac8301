//! Gateway WebSockets, several gateways on one NATS, restarts, webhooks and uploads.

mod gateway_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use gateway_common::{Env, Gw, error_code, try_json, valid_body};
use lipsync_runtime::{ArtifactStore, NatsArtifacts};
use lipsync_schemas::{FetchJob, InputSource, Stage, names};
use lipsync_tests::wait_for;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Next JSON text message, or `None` on close.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("websocket message within 10 s")?
            .ok()?;
        match msg {
            Message::Text(t) => return Some(serde_json::from_str(&t).unwrap()),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

async fn drive_to_completion(env: &Env, id: &str) {
    env.tasks
        .mark_started(id, Stage::Fetch, 1, 0)
        .await
        .unwrap();
    for f in [0.25, 0.5, 1.0] {
        env.tasks
            .progress(id, Stage::Fetch, f, &format!("fetch {f}"))
            .await
            .unwrap();
    }
    env.tasks
        .mark_started(id, Stage::Infer, 1, 0)
        .await
        .unwrap();
    env.complete(id, 2.0).await;
}

#[tokio::test]
async fn task_ws_sends_ordered_updates_and_closes_after_completion() {
    let env = Env::start().await;
    let id = env.submit_ok().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(env.gw.ws_url(&format!("/task/{id}/ws")))
        .await
        .unwrap();
    let first = next_json(&mut ws).await.unwrap();
    assert_eq!(first["status"], "queued");
    assert_eq!(first["queue_position"], 0);

    drive_to_completion(&env, &id).await;
    let mut seen = vec![first];
    while let Some(v) = next_json(&mut ws).await {
        seen.push(v);
    }
    let last = seen.last().unwrap();
    assert_eq!(last["status"], "completed", "{seen:?}");
    let progress: Vec<f64> = seen
        .iter()
        .map(|v| v["progress"].as_f64().unwrap())
        .collect();
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    // The writes arrive in order and the terminal record always does: queued, started,
    // 3 progress, infer started, completed. The bucket keeps one revision per task, so a
    // write superseded before the gateway's watch read it (when the watch's consumer is
    // recreated) may be missing, but nothing comes twice, late or out of order.
    let messages: Vec<&str> = seen
        .iter()
        .map(|v| v["message"].as_str().unwrap())
        .collect();
    let written = [
        "queued",
        "fetch: started",
        "fetch 0.25",
        "fetch 0.5",
        "fetch 1",
        "infer: started",
        "completed",
    ];
    let mut rest = written.iter();
    assert!(
        messages.iter().all(|m| rest.any(|w| w == m)),
        "{messages:?} is not an ordered subsequence of {written:?}"
    );
    assert_eq!(messages.first(), Some(&"queued"), "{messages:?}");
    assert_eq!(messages.last(), Some(&"completed"), "{messages:?}");
    // A finished task: the record at once, then close.
    let (mut ws, _) = tokio_tungstenite::connect_async(env.gw.ws_url(&format!("/task/{id}/ws")))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await.unwrap()["status"], "completed");
    assert!(next_json(&mut ws).await.is_none());
    // Unknown task: 404 before the upgrade.
    let err = tokio_tungstenite::connect_async(env.gw.ws_url("/task/nope/ws"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    env.stop().await;
}

#[tokio::test]
async fn all_tasks_ws_streams_progress_events() {
    let env = Env::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(env.gw.ws_url("/ws"))
        .await
        .unwrap();
    let id = env.submit_ok().await;
    let ev = next_json(&mut ws).await.unwrap();
    assert_eq!(ev["task_id"], id.as_str());
    assert_eq!(ev["status"], "queued");
    env.tasks.cancel(&id).await.unwrap();
    let ev = next_json(&mut ws).await.unwrap();
    assert_eq!(ev["status"], "failed");
    assert_eq!(ev["error_code"], "cancelled");
    let text = env.metrics().await;
    assert!(text.contains("lipsync_websocket_clients 1"), "{text}");
    ws.send(Message::Close(None)).await.unwrap();
    env.stop().await;
}

#[tokio::test]
async fn two_gateways_see_every_update_and_a_restart_loses_nothing() {
    let env = Env::start().await;
    let gw2 = Gw::start(&env.cfg).await;
    let id = env.submit_ok().await;
    let id2 = env.submit_ok().await;
    // The second gateway knows the task (watch or KV fallback) with the same position.
    let r: Value = env
        .http
        .get(gw2.url(&format!("/task/{id2}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["queue_position"], 1);
    let (mut ws, _) = tokio_tungstenite::connect_async(gw2.ws_url(&format!("/task/{id}/ws")))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await.unwrap()["status"], "queued");
    drive_to_completion(&env, &id).await;
    let mut last = Value::Null;
    while let Some(v) = next_json(&mut ws).await {
        last = v;
    }
    assert_eq!(last["status"], "completed");
    wait_for(Duration::from_secs(5), || async {
        let q = try_json(&env.http, gw2.url("/queue")).await?;
        (q["queue_length"] == 1 && q["queued_tasks"][0]["task_id"] == id2.as_str()).then_some(())
    })
    .await
    .unwrap();

    // Restart: stop both, start a fresh one: every task is still there.
    gw2.stop().await;
    let Env {
        nats,
        cfg,
        gw,
        http,
        ..
    } = env;
    gw.stop().await;
    let gw3 = Gw::start(&cfg).await;
    let t: Value = http
        .get(gw3.url(&format!("/task/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(t["status"], "completed");
    let q: Value = http
        .get(gw3.url("/queue"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(q["queue_length"], 1);
    assert_eq!(q["queued_tasks"][0]["task_id"], id2.as_str());
    gw3.stop().await;
    drop(nats);
}

#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<Vec<(axum::http::HeaderMap, bytes::Bytes)>>>);

async fn hook_server(hooks: Hooks, fail_first: bool) -> std::net::SocketAddr {
    let calls = Arc::new(Mutex::new(0u32));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: bytes::Bytes| {
            let hooks = hooks.clone();
            let calls = calls.clone();
            async move {
                let n = {
                    let mut c = calls.lock().unwrap();
                    *c += 1;
                    *c
                };
                if fail_first && n == 1 {
                    return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                }
                hooks.0.lock().unwrap().push((headers, body));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn webhook_is_signed_retried_and_delivered_once_across_gateways() {
    use hmac::Mac;
    let secret = "whsec-test";
    let env = Env::start_with(|c| {
        c.gateway.webhook_secret = secret.into();
        c.gateway.webhook_allow_private_networks = true;
        c.gateway.webhook_max_attempts = 3;
    })
    .await;
    let gw2 = Gw::start(&env.cfg).await;
    let hooks = Hooks::default();
    let addr = hook_server(hooks.clone(), true).await;
    let mut body = valid_body();
    body["webhook_url"] = json!(format!("http://{addr}/hook"));
    let r = env.submit(body).await;
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    drive_to_completion(&env, &id).await;
    wait_for(Duration::from_secs(15), || async {
        (!hooks.0.lock().unwrap().is_empty()).then_some(())
    })
    .await
    .unwrap();
    // Give a duplicate the chance to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = hooks.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "delivered exactly once by two gateways");
    let (headers, body) = &got[0];
    let ts = headers["x-lipsync-timestamp"].to_str().unwrap();
    let sig = headers["x-lipsync-signature"].to_str().unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    assert_eq!(
        sig,
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["task_id"], id.as_str());
    assert_eq!(v["status"], "completed");
    gw2.stop().await;
    env.stop().await;
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "lipsyncboundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match filename {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn multipart_upload_streams_into_the_artifact_store() {
    let env = Env::start_with(|c| c.gateway.max_upload_bytes = 600_000).await;
    let video: Vec<u8> = (0..400_000u32).map(|i| (i % 253) as u8).collect();
    let audio = vec![7u8; 1000];
    let (ctype, body) = multipart(&[
        ("inference_steps", None, b"5"),
        ("video", Some("v.mp4"), &video),
        ("audio", Some("a.wav"), &audio),
        ("inference_ckpt_path", None, b"tiny"),
    ]);
    let r = env
        .http
        .post(env.url("/sync"))
        .header("content-type", ctype.clone())
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, t) = env.get_json(&format!("/task/{id}")).await;
    assert_eq!(t["request"]["video_url"], Value::Null);
    assert_eq!(t["request"]["inference_steps"], 5);
    assert_eq!(t["request"]["inference_ckpt_path"], "tiny");
    let store = NatsArtifacts::new(env.topo.artifacts.clone());
    let key = names::artifact_key(&id, names::artifact::VIDEO);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v");
    store.get_to_file(&key, &p).await.unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), video);
    // The fetch job points at the uploads.
    let stream = env.topo.js.get_stream(names::WORK_STREAM).await.unwrap();
    let msg = stream
        .get_last_raw_message_by_subject(&names::work_subject(Stage::Fetch))
        .await
        .unwrap();
    let job: FetchJob = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(job.video, InputSource::Artifact(key));

    // Over the cap: 413 and nothing left behind.
    let big = vec![1u8; 700_000];
    let (ctype, body) = multipart(&[("video", Some("v.mp4"), &big), ("audio", Some("a"), &audio)]);
    let r = env
        .http
        .post(env.url("/sync"))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 413).await, "payload_too_large");
    // Missing audio: 422.
    let (ctype, body) = multipart(&[("video", Some("v.mp4"), &audio)]);
    let r = env
        .http
        .post(env.url("/sync"))
        .header("content-type", ctype)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 422).await, "invalid_request");
    let (_, q) = env.get_json("/queue").await;
    assert_eq!(q["queue_length"], 1);
    env.stop().await;
}
