//! Tenants against a real nats-server and the real gateway: isolation (another tenant's
//! task is an unknown id on every route), admin keys, `GET /tasks` pages, `/queue`
//! without other tenants' ids, quotas (429 + Retry-After), the `Origin` check,
//! `access_token` only on WebSocket routes, rate-limited failed authentications,
//! request ids, the seed's checkpoint paths and the OpenAPI bearer scheme.

mod gateway_common;

use std::time::Duration;

use futures::StreamExt;
use gateway_common::{Env, error_code, valid_body};
use lipsync_runtime::config::{ApiKeyConfig, KeyRole};
use lipsync_runtime::{ArtifactStore, Change, NatsArtifacts};
use lipsync_schemas::{Status, names};
use serde_json::{Value, json};
use sha2::Digest;

const A: &str = "key-of-tenant-a";
const B: &str = "key-of-tenant-b";
const ADMIN: &str = "key-of-the-operator";
const UNKNOWN: &str = "00000000-0000-4000-8000-000000000000";

fn keys(c: &mut lipsync_runtime::Config) {
    c.gateway.keys = vec![
        ApiKeyConfig {
            tenant: "a".into(),
            key: A.into(),
            ..Default::default()
        },
        ApiKeyConfig {
            tenant: "b".into(),
            // Hashed keys work the same.
            key_sha256: hex::encode(sha2::Sha256::digest(B.as_bytes())),
            ..Default::default()
        },
        ApiKeyConfig {
            tenant: "ops".into(),
            key: ADMIN.into(),
            role: KeyRole::Admin,
            ..Default::default()
        },
    ];
    c.gateway.auth_failures_per_min = 0;
}

async fn req(env: &Env, method: &str, path: &str, key: &str) -> reqwest::Response {
    env.http
        .request(method.parse().unwrap(), env.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

async fn submit_as(env: &Env, key: &str) -> String {
    let r = env
        .http
        .post(env.url("/sync"))
        .bearer_auth(key)
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["task_id"].as_str().unwrap().to_owned()
}

/// Status and body text of a request (the body of a 404 must not tell the cases apart).
async fn answer(env: &Env, method: &str, path: &str, key: &str) -> (u16, String) {
    let r = req(env, method, path, key).await;
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn tenants_see_only_their_tasks_and_others_look_unknown() {
    let env = Env::start_with(keys).await;
    let a1 = submit_as(&env, A).await;
    let a2 = submit_as(&env, A).await;
    let b1 = submit_as(&env, B).await;
    // A's first task completes with a result in the artifact store.
    let store = NatsArtifacts::new(env.topo.artifacts.clone());
    let video = vec![7u8; 1000];
    store
        .put(
            &names::artifact_key(&a1, names::artifact::RESULT),
            &mut video.as_slice(),
        )
        .await
        .unwrap();
    env.tasks
        .update(&a1, |r| {
            r.status = Status::Completed;
            r.progress = 1.0;
            r.output_video_url = Some(format!("/outputs/{}/result.mp4", r.task_id));
            Change::Write
        })
        .await
        .unwrap();
    // The record stores its owner.
    let (rec, _) = env.tasks.get(&a1).await.unwrap().unwrap();
    assert_eq!(rec.owner.as_deref(), Some("a"));

    // B gets exactly the unknown-id answer for every route on A's task.
    for (method, path) in [
        ("GET", "/task/{}"),
        ("DELETE", "/task/{}"),
        ("GET", "/outputs/{}/result.mp4"),
        ("GET", "/results/{}/output.mp4"),
    ] {
        let theirs = answer(&env, method, &path.replace("{}", &a1), B).await;
        let unknown = answer(&env, method, &path.replace("{}", UNKNOWN), B).await;
        assert_eq!(theirs.0, 404, "{method} {path}: {theirs:?}");
        assert_eq!(theirs, unknown, "{method} {path}");
    }
    // Watching: the upgrade is refused with the same 404.
    for id in [&a1, &UNKNOWN.to_owned()] {
        let url = format!("ws://{}/task/{id}/ws?access_token={B}", env.gw.addr);
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 404, "{id}")
            }
            other => panic!("{id}: expected 404, got {other:?}"),
        }
    }
    // The refused cancel changed nothing.
    let (rec, _) = env.tasks.get(&a2).await.unwrap().unwrap();
    assert_eq!(rec.status, Status::Queued);

    // A can read, download and watch its task.
    let (s, t) = {
        let r = req(&env, "GET", &format!("/task/{a1}"), A).await;
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!((s.as_u16(), t["status"].as_str()), (200, Some("completed")));
    let r = req(&env, "GET", &format!("/outputs/{a1}/result.mp4"), A).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 1000);
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/task/{a2}/ws?access_token={A}",
        env.gw.addr
    ))
    .await
    .expect("A watches its own task");
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.to_text().unwrap().contains(&a2));
    drop(ws);

    // Lists: each tenant its own, the admin all.
    let list = |key: &'static str| {
        let env = &env;
        async move {
            let r = req(env, "GET", "/tasks", key).await;
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            let mut ids: Vec<String> = v["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["task_id"].as_str().unwrap().to_owned())
                .collect();
            ids.sort();
            ids
        }
    };
    let mut mine = vec![a1.clone(), a2.clone()];
    mine.sort();
    assert_eq!(list(A).await, mine);
    assert_eq!(list(B).await, vec![b1.clone()]);
    let mut all = vec![a1.clone(), a2.clone(), b1.clone()];
    all.sort();
    assert_eq!(list(ADMIN).await, all);

    // Pages: limit 1, then the cursor, newest first, no repeats.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/tasks?limit=1&cursor={c}"),
            None => "/tasks?limit=1".into(),
        };
        let v: Value = req(&env, "GET", &path, ADMIN).await.json().await.unwrap();
        let page = v["tasks"].as_array().unwrap();
        assert!(page.len() <= 1);
        seen.extend(
            page.iter()
                .map(|t| t["task_id"].as_str().unwrap().to_owned()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0], b1, "newest first");
    let r = req(&env, "GET", "/tasks?limit=0", A).await;
    assert_eq!(error_code(r, 422).await, "invalid_request");

    // The queue: seed fields, other tenants' tasks by position only.
    let q: Value = req(&env, "GET", "/queue", B).await.json().await.unwrap();
    assert_eq!(q["queue_length"], 2, "{q}");
    assert_eq!(q["is_processing"], false);
    let tasks = q["queued_tasks"].as_array().unwrap();
    assert_eq!(tasks[0]["task_id"], Value::Null);
    assert_eq!(tasks[0]["position"], 0);
    assert_eq!(tasks[1]["task_id"], b1.as_str());
    assert_eq!(tasks[1]["position"], 1);
    let q: Value = req(&env, "GET", "/queue", ADMIN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(q["queued_tasks"][0]["task_id"], a2.as_str());

    // The admin reads and cancels anyone's task.
    let r = req(&env, "GET", &format!("/task/{b1}"), ADMIN).await;
    assert_eq!(r.status(), 200);
    let r = req(&env, "DELETE", &format!("/task/{a2}"), ADMIN).await;
    assert_eq!(r.status(), 200);
    let r = req(&env, "DELETE", &format!("/task/{b1}"), B).await;
    assert_eq!(r.status(), 200);
    env.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The task id of the next event.
async fn next_id(ws: &mut Ws) -> String {
    let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    v["task_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn all_tasks_ws_is_filtered_for_users() {
    let env = Env::start_with(keys).await;
    let url = |key: &str| format!("ws://{}/ws?access_token={key}", env.gw.addr);
    let (mut ws_b, _) = tokio_tungstenite::connect_async(url(B)).await.unwrap();
    let (mut ws_admin, _) = tokio_tungstenite::connect_async(url(ADMIN)).await.unwrap();
    let a1 = submit_as(&env, A).await;
    let b1 = submit_as(&env, B).await;
    // B's first event is its own task: A's was filtered out.
    assert_eq!(next_id(&mut ws_b).await, b1);
    assert_eq!(next_id(&mut ws_admin).await, a1);
    assert_eq!(next_id(&mut ws_admin).await, b1);
    env.stop().await;
}

#[tokio::test]
async fn quotas_answer_429_with_retry_after() {
    let env = Env::start_with(|c| {
        keys(c);
        c.gateway.tenant_max_queued = 2;
    })
    .await;
    submit_as(&env, A).await;
    submit_as(&env, A).await;
    let r = env
        .http
        .post(env.url("/sync"))
        .bearer_auth(A)
        .json(&valid_body())
        .send()
        .await
        .unwrap();
    let retry = r.headers().get("retry-after").cloned();
    assert_eq!(error_code(r, 429).await, "quota_exceeded");
    assert!(retry.unwrap().to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Another tenant is not affected.
    submit_as(&env, B).await;
    env.stop().await;

    // Requests per second, per key.
    let env = Env::start_with(|c| {
        keys(c);
        c.gateway.rate_limit_per_s = 1;
        c.gateway.rate_limit_burst = 2;
    })
    .await;
    let mut limited = None;
    for _ in 0..10 {
        let r = req(&env, "GET", "/queue", A).await;
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the per-key rate limit is reached");
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_code(r, 429).await, "rate_limited");
    // B has its own bucket.
    assert_eq!(req(&env, "GET", "/queue", B).await.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn browser_and_token_rules() {
    let env = Env::start_with(|c| {
        keys(c);
        c.gateway.allowed_origins = vec!["https://app.example".into()];
        c.gateway.auth_failures_per_min = 4;
    })
    .await;
    // A cross-origin POST is refused, an allowed or same origin passes.
    let post = |origin: Option<String>| {
        let env = &env;
        async move {
            let mut r = env
                .http
                .post(env.url("/sync"))
                .bearer_auth(A)
                .json(&valid_body());
            if let Some(o) = origin {
                r = r.header("origin", o);
            }
            r.send().await.unwrap()
        }
    };
    let r = post(Some("https://evil.example".into())).await;
    assert_eq!(error_code(r, 403).await, "forbidden");
    assert_eq!(post(Some("https://app.example".into())).await.status(), 200);
    assert_eq!(
        post(Some(format!("http://{}", env.gw.addr))).await.status(),
        200
    );
    assert_eq!(post(None).await.status(), 200);
    // A cross-origin WebSocket upgrade too.
    let mut ws_req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws?access_token={ADMIN}",
            env.gw.addr
        ))
        .unwrap();
    ws_req
        .headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(ws_req).await.is_err());

    // access_token is a WebSocket-only credential.
    let r = env
        .http
        .get(env.url(&format!("/queue?access_token={A}")))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(r, 401).await, "unauthorized");

    // Request ids: returned, kept when sane.
    let r = env
        .http
        .get(env.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = env.http.get(env.url("/healthz")).send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"].len(), 36);

    // Failed authentications are rate limited per address: after 4 (the access_token
    // attempt above was one), even a good key waits.
    for _ in 0..3 {
        let r = req(&env, "GET", "/queue", "wrong").await;
        assert_eq!(error_code(r, 401).await, "unauthorized");
    }
    let r = req(&env, "GET", "/queue", "wrong").await;
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_code(r, 429).await, "rate_limited");
    let r = req(&env, "GET", "/queue", A).await;
    assert_eq!(r.status(), 429);
    env.stop().await;
}

#[tokio::test]
async fn seed_checkpoint_paths_are_aliases_of_the_default_model() {
    let env = Env::start().await;
    for path in ["checkpoints/unet.ckpt", "checkpoints/latentsync_unet.pt"] {
        let mut body = valid_body();
        body["inference_ckpt_path"] = json!(path);
        let r = env.submit(body).await;
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().await.unwrap();
        let (_, t) = env
            .get_json(&format!("/task/{}", v["task_id"].as_str().unwrap()))
            .await;
        assert_eq!(t["request"]["inference_ckpt_path"], "tiny", "{path}");
    }
    let mut body = valid_body();
    body["inference_ckpt_path"] = json!("checkpoints/other.ckpt");
    assert_eq!(
        error_code(env.submit(body).await, 422).await,
        "invalid_request"
    );
    // The document declares the bearer scheme, so /docs can send a key.
    let (_, doc) = env.get_json("/openapi.json").await;
    let scheme = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer");
    assert!(doc["paths"]["/tasks"]["get"].is_object());
    assert!(
        doc["paths"]["/sync"]["post"]["security"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.get("bearer").is_some())
    );
    env.stop().await;
}
