//! HTTP hardening of the real gateway: slowloris clients are cut at the header timeout
//! while `/healthz` keeps answering, an oversized WebSocket message closes with 1009,
//! WebSocket caps, random methods leave `/metrics` bounded, `/readyz` reports the stage
//! consumers, and `--print-config` prints no secret.

mod gateway_common;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use gateway_common::{Env, error_code};
use lipsync_tests::pipeline::binary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test]
async fn slowloris_is_cut_at_the_header_timeout_while_healthz_answers() {
    let env = Env::start_with(|c| c.gateway.header_read_timeout_s = 1).await;
    // 20 clients that send a request head one header line at a time, forever.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(env.gw.addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let dribble = tokio::spawn(async move {
        let mut closed = 0;
        // Keep dribbling until every server side has closed (bounded by the outer timeout).
        while closed < slow.len() {
            closed = 0;
            for s in slow.iter_mut() {
                let _ = s.write_all(b"X-Slow: 1\r\n").await;
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
                    Ok(Ok(_)) => closed += 1, // an error answer, then the close
                    Err(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        closed
    });
    // Meanwhile the health endpoint answers.
    for _ in 0..10 {
        let r = env.http.get(env.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let closed = tokio::time::timeout(Duration::from_secs(30), dribble)
        .await
        .expect("every slowloris connection is closed by the server")
        .unwrap();
    assert_eq!(closed, 20);
    let r = env.http.get(env.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    env.stop().await;
}

#[tokio::test]
async fn oversized_websocket_message_closes_with_1009_and_caps_hold() {
    let env = Env::start_with(|c| {
        c.gateway.ws_max_message_bytes = 1024;
        c.gateway.ws_max_per_key = 2;
    })
    .await;
    let url = format!("ws://{}/ws", env.gw.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    // Small messages are fine (and ignored).
    ws.send(Message::Text("hello".into())).await.unwrap();
    ws.send(Message::Text("x".repeat(4096).into()))
        .await
        .unwrap();
    let code = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the server answers the oversized message");
        match msg {
            Some(Ok(Message::Close(Some(frame)))) => break frame.code,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, CloseCode::Size);

    // Two sockets per client (the open service counts per address), the third is 429.
    let (_a, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (_b, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 429)
        }
        other => panic!("expected 429, got {other:?}"),
    }
    env.stop().await;
}

#[tokio::test]
async fn random_methods_leave_metrics_bounded() {
    let env = Env::start().await;
    let mut tasks = Vec::new();
    for worker in 0..8u32 {
        let http = env.http.clone();
        let base = env.url("");
        tasks.push(tokio::spawn(async move {
            for i in 0..1250u32 {
                let n = worker * 100_000 + i;
                let method = reqwest::Method::from_bytes(format!("M{n:X}Q").as_bytes()).unwrap();
                let path = match i % 4 {
                    0 => "/sync".to_owned(),
                    1 => format!("/task/{n}"),
                    2 => format!("/nope/{n}"),
                    _ => "/queue".to_owned(),
                };
                let r = http
                    .request(method, format!("{base}{path}"))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_client_error(), "{}", r.status());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = env.metrics().await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("lipsync_http_requests_total{"))
        .collect();
    assert!(
        series.len() <= 20,
        "{} series:\n{}",
        series.len(),
        series.join("\n")
    );
    assert!(text.contains("method=\"other\""), "{text}");
    let histograms = text
        .lines()
        .filter(|l| l.starts_with("lipsync_http_request_duration_seconds_count{"))
        .count();
    assert!(histograms <= 10, "{histograms} latency series");
    env.stop().await;
}

#[tokio::test]
async fn readyz_reports_stage_consumers() {
    let env = Env::start().await;
    let (s, v) = env.get_json("/readyz").await;
    // No stage runs here: reported, but the gateway itself is ready.
    assert_eq!(s, 200);
    assert_eq!(v["stages_live"], false);
    assert_eq!(v["stages"]["infer"], false);
    env.stop().await;
    let env = Env::start_with(|c| c.gateway.readyz_requires_stages = true).await;
    let r = env.http.get(env.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["status"], "not_ready");
    env.stop().await;
}

#[tokio::test]
async fn metrics_can_require_an_admin_key() {
    let env = Env::start_with(|c| {
        c.gateway.api_keys = vec!["user-key".into()];
        c.gateway.metrics_require_admin = true;
        c.gateway.keys = vec![lipsync_runtime::config::ApiKeyConfig {
            tenant: "ops".into(),
            key: "admin-key".into(),
            role: lipsync_runtime::config::KeyRole::Admin,
            ..Default::default()
        }];
    })
    .await;
    let get = |key: Option<&'static str>| {
        let env = &env;
        async move {
            let mut r = env.http.get(env.url("/metrics"));
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r.send().await.unwrap()
        }
    };
    assert_eq!(error_code(get(None).await, 401).await, "unauthorized");
    assert_eq!(
        error_code(get(Some("user-key")).await, 403).await,
        "forbidden"
    );
    assert_eq!(get(Some("admin-key")).await.status(), 200);
    env.stop().await;
}

#[test]
fn print_config_shows_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hook");
    std::fs::write(&secret_file, "secret-from-file").unwrap();
    let out = std::process::Command::new(binary("lipsync-gateway").unwrap())
        .args(["--print-config", "--config", "/dev/null"])
        .args(["--set", "gateway.webhook_secret=hook-secret-value"])
        .args(["--set", "gateway.api_keys=[\"plain-secret-key\"]"])
        .args([
            "--set",
            "gateway.keys=[{tenant=\"acme\",key=\"tenant-secret-key\"},{tenant=\"b\",key_sha256=\"00ff\"}]",
        ])
        .args(["--set", "nats.url=nats://user:nats-password@nats:4222"])
        .arg("--set")
        .arg(format!(
            "gateway.webhook_secret_file=\"{}\"",
            secret_file.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [
        "hook-secret-value",
        "plain-secret-key",
        "tenant-secret-key",
        "00ff",
        "nats-password",
        "secret-from-file",
    ] {
        assert!(!text.contains(secret), "{secret} printed:\n{text}");
    }
    assert!(text.contains("<redacted>"));
    assert!(text.contains("acme"), "tenants stay visible");
    assert!(
        text.contains(&secret_file.display().to_string()),
        "file paths stay visible"
    );
}
