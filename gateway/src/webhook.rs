//! Webhook delivery: when a task with a `webhook_url` ends, POST its final record
//! (the `TaskView` JSON) signed with HMAC-SHA256 over `"<timestamp>.<body>"`:
//!
//! - `X-Lipsync-Timestamp: <unix seconds>`
//! - `X-Lipsync-Signature: sha256=<hex>`
//! - `X-Lipsync-Task-Id: <task id>`
//!
//! Retried with exponential backoff (1 s, 2 s, 4 s ... capped at 60 s) up to
//! `gateway.webhook_max_attempts` attempts; only 2xx counts as delivered. Requests go through the
//! SSRF guard with the webhook policy (`gateway.webhook_allow_private_networks`,
//! `gateway.webhook_allow_cidrs`, `gateway.webhook_allowed_ports`), separate from the
//! download policy.
//!
//! One delivery per task across all gateways: the gateway that wins the KV `create` of
//! `webhook.<task_id>` in `lipsync_idempotency` delivers; the others skip. A gateway that
//! was down when the task ended delivers on its next start (the watch replays current
//! records), for tasks that ended less than 23 h ago (the key lives 24 h). A gateway that
//! dies in the middle of the retries leaves the delivery unfinished (at most once from then
//! on); the key's value says `pending` or `delivered`/`failed` for operators.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use hmac::{Hmac, Mac};
use lipsync_netguard::{ClientOptions, GuardedClient};
use lipsync_schemas::TaskRecord;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::api::TaskView;

/// Records that ended longer ago than this are not delivered on start-up.
const MAX_AGE_S: f64 = 23.0 * 3600.0;
/// Longest backoff between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Signature header value for `body` sent at `timestamp`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Clone)]
pub(crate) struct Webhooks(Arc<Inner>);

struct Inner {
    client: GuardedClient,
    secret: Vec<u8>,
    attempts: u32,
    kv: kv::Store,
    started: Mutex<HashSet<String>>,
    shutdown: CancellationToken,
}

impl Webhooks {
    /// `None` when no secret is configured (webhooks are then refused at submit).
    pub(crate) fn new(state: &AppState) -> anyhow::Result<Option<Self>> {
        let policy = &state.webhook_policy;
        if state.gw.webhook_secret.is_empty() {
            return Ok(None);
        }
        let timeout = Duration::from_secs(state.gw.webhook_timeout_s.max(1));
        let client = policy.client(&ClientOptions {
            connect_timeout: timeout,
            read_timeout: timeout,
            total_timeout: Some(timeout),
            max_redirects: 0,
        })?;
        Ok(Some(Self(Arc::new(Inner {
            client,
            secret: state.gw.webhook_secret.as_bytes().to_vec(),
            attempts: state.gw.webhook_max_attempts.max(1),
            kv: state.idempotency.clone(),
            started: Mutex::default(),
            shutdown: state.shutdown.clone(),
        }))))
    }

    /// Called for every applied record change; starts a delivery for newly ended tasks.
    pub(crate) fn on_change(&self, rec: &TaskRecord) {
        let Some(url) = rec.request.webhook_url.clone() else {
            return;
        };
        if !rec.status.is_terminal() {
            return;
        }
        let now = lipsync_runtime::tasks::now().0;
        if rec.end_time.is_some_and(|t| now - t > MAX_AGE_S) {
            return;
        }
        {
            let mut started = self.0.started.lock().unwrap_or_else(|e| e.into_inner());
            if !started.insert(rec.task_id.clone()) {
                return;
            }
            if started.len() > 100_000 {
                started.clear();
            }
        }
        let this = self.clone();
        let rec = rec.clone();
        tokio::spawn(async move { this.deliver(rec, url).await });
    }

    async fn deliver(&self, rec: TaskRecord, url: String) {
        let key = format!("webhook.{}", rec.task_id);
        match self.0.kv.create(&key, "pending".into()).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return,
            Err(e) => {
                tracing::warn!(task_id = %rec.task_id, error = %e, "webhook claim failed, not delivering");
                return;
            }
        }
        let body = match serde_json::to_vec(&TaskView::from_record(&rec, None)) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(task_id = %rec.task_id, error = %e, "webhook body");
                return;
            }
        };
        let mut backoff = Duration::from_secs(1);
        let mut outcome = "failed";
        for attempt in 1..=self.0.attempts {
            match self.post(&url, &rec.task_id, &body).await {
                Ok(()) => {
                    tracing::info!(task_id = %rec.task_id, attempt, "webhook delivered");
                    outcome = "delivered";
                    break;
                }
                Err(e) => {
                    tracing::warn!(task_id = %rec.task_id, attempt, error = %e, "webhook attempt failed");
                }
            }
            if attempt == self.0.attempts {
                break;
            }
            tokio::select! {
                _ = self.0.shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        let _ = self.0.kv.put(&key, outcome.into()).await;
    }

    async fn post(&self, url: &str, task_id: &str, body: &[u8]) -> Result<(), String> {
        let ts = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
        let sig = sign(&self.0.secret, ts, body);
        let resp = self
            .0
            .client
            .post(url)
            .map_err(|e| e.to_string())?
            .header("content-type", "application/json")
            .header("x-lipsync-timestamp", ts.to_string())
            .header("x-lipsync-signature", sig)
            .header("x-lipsync-task-id", task_id)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("status {}", resp.status()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_over_timestamp_dot_body() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac k
        let s = sign(b"k", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            s,
            "sha256=1b6ad1bc9bf48c52ce01939866d5877c6cc4e87ddad27e16673cb8c4964394a3"
        );
        assert_ne!(s, sign(b"k", 1_700_000_001, br#"{"a":1}"#));
    }
}
