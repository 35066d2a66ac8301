//! Shared set-up of the gateway tests: a nats-server, an in-process gateway on
//! 127.0.0.1:0 and an HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use lipsync_gateway::Gateway;
use lipsync_runtime::tasks::TaskStore;
use lipsync_runtime::{Change, Config};
use lipsync_schemas::Status;
use lipsync_tests::{NatsServer, topology, wait_for};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A gateway under test.
pub struct Gw {
    pub addr: SocketAddr,
    pub token: CancellationToken,
    pub gateway: Option<Gateway>,
}

impl Gw {
    pub async fn start(cfg: &Config) -> Self {
        let token = CancellationToken::new();
        let gateway = lipsync_gateway::start(cfg, token.clone()).await.unwrap();
        let addr = gateway.addr;
        let gw = Self {
            addr,
            token,
            gateway: Some(gateway),
        };
        // Ready = NATS connected and the index loaded (the stages, which these tests do
        // not run, are only reported unless `gateway.readyz_requires_stages`).
        let http = reqwest::Client::new();
        let url = gw.url("/readyz");
        wait_for(Duration::from_secs(10), || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http.get(url).send().await.ok()?;
                let v: Value = r.json().await.ok()?;
                (v["nats"] == true && v["index_loaded"] == true).then_some(())
            }
        })
        .await
        .unwrap();
        gw
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(g) = self.gateway.take() {
            tokio::time::timeout(Duration::from_secs(10), g.wait())
                .await
                .expect("gateway stops within 10 s")
                .unwrap();
        }
    }
}

/// NATS + one gateway + a task store on the same server.
pub struct Env {
    pub nats: NatsServer,
    pub cfg: Config,
    pub gw: Gw,
    pub tasks: TaskStore,
    pub topo: lipsync_runtime::nats::Topology,
    pub http: reqwest::Client,
}

impl Env {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let nats = NatsServer::start().await.unwrap();
        let mut cfg = nats.config();
        cfg.fetch.allow_private_networks = true;
        tweak(&mut cfg);
        let topo = topology(&cfg).await.unwrap();
        let gw = Gw::start(&cfg).await;
        Self {
            nats,
            cfg,
            gw,
            tasks: TaskStore::new(topo.tasks.clone()),
            topo,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.gw.url(path)
    }

    pub async fn submit(&self, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/sync"))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Submit a valid task and return its id.
    pub async fn submit_ok(&self) -> String {
        let r = self.submit(valid_body()).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        v["task_id"].as_str().unwrap().to_owned()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The gateway's Prometheus text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Marks `id` completed with its result under `/outputs`, ended `secs` after it started.
    pub async fn complete(&self, id: &str, secs: f64) {
        self.tasks
            .update(id, |r| {
                r.status = Status::Completed;
                r.progress = 1.0;
                r.message = "completed".into();
                r.output_video_url = Some(format!("/outputs/{}/result.mp4", r.task_id));
                r.end_time = Some(r.start_time + secs);
                Change::Write
            })
            .await
            .unwrap();
    }

    pub async fn stop(self) {
        self.gw.stop().await;
    }
}

/// GET `url` as JSON; `None` while it fails (for polling).
pub async fn try_json(http: &reqwest::Client, url: String) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

pub fn valid_body() -> Value {
    json!({
        "video_url": "https://example.com/video.mp4",
        "audio_url": "https://example.com/audio.wav",
    })
}

/// Asserts the standard error body and returns its code.
pub async fn error_code(r: reqwest::Response, status: u16) -> String {
    assert_eq!(r.status().as_u16(), status, "unexpected status");
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    v["error"]["code"].as_str().unwrap().to_owned()
}
