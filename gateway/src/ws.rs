//! WebSockets. `GET /task/{task_id}/ws` sends the current record (`TaskView` JSON) at
//! once, then its changes in order, and closes (code 1000) after a terminal state, which is
//! always sent. `lipsync_tasks` keeps one revision per task, so a change already superseded
//! when the watch reads it (after the watch's consumer was recreated: a reconnect, a missed
//! heartbeat) is skipped: a client sees the current state, never an older one after a newer.
//! `GET /ws` sends a `ProgressEventView` for every change of every task.
//!
//! Both read the process's one task watch through a broadcast channel. A socket that falls
//! behind the channel is resynced (the task's record is read from KV; `/ws` gets a snapshot
//! of all active tasks) instead of slowing anyone else. Sockets close on shutdown.
//!
//! Tenancy: `/task/{id}/ws` answers 404 for another tenant's task; `/ws` streams every
//! task to admins (and on an open service), and only the caller's own tasks otherwise.
//!
//! Limits: a client message larger than `gateway.ws_max_message_bytes` closes the socket
//! with 1009 (message too big); at most `gateway.ws_max_per_key` sockets per key (429)
//! and `gateway.ws_max_total` in all (503); the server pings every
//! `gateway.ws_ping_interval_s` and closes a peer that did not answer the previous ping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use lipsync_schemas::TaskRecord;

use crate::api::ProgressEventView;
use tokio::sync::broadcast::error::RecvError;

use crate::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, ErrorBody, Result};

/// Open sockets, in total and per caller.
#[derive(Default)]
pub(crate) struct Sockets {
    total: AtomicUsize,
    per_key: Mutex<HashMap<String, usize>>,
}

/// One open socket's place in [`Sockets`]; freed on drop.
pub(crate) struct Slot {
    state: AppState,
    key: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let s = &self.state.ws;
        s.total.fetch_sub(1, Ordering::SeqCst);
        let mut m = s.per_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

fn take_slot(state: &AppState, caller: &Caller) -> Result<Slot> {
    let s = &state.ws;
    let mut m = s.per_key.lock().unwrap_or_else(|e| e.into_inner());
    let mine = m.get(&caller.id).copied().unwrap_or(0);
    if mine >= state.gw.ws_max_per_key {
        return Err(ApiError::RateLimited { retry_after_s: 5 });
    }
    if s.total.fetch_add(1, Ordering::SeqCst) >= state.gw.ws_max_total {
        s.total.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::Unavailable(
            "too many WebSockets (gateway.ws_max_total)".into(),
        ));
    }
    m.insert(caller.id.clone(), mine + 1);
    Ok(Slot {
        state: state.clone(),
        key: caller.id.clone(),
    })
}

/// What a received client frame means for the loop.
enum Incoming {
    /// Keep going (a pong, a text the server ignores).
    Alive,
    /// The peer closed or the connection broke.
    Gone,
    /// The peer sent a message over the size limit.
    TooBig,
}

fn classify(msg: Option<std::result::Result<Message, axum::Error>>) -> Incoming {
    match msg {
        Some(Ok(Message::Close(_))) | None => Incoming::Gone,
        Some(Ok(_)) => Incoming::Alive,
        Some(Err(e)) => {
            let text = e.to_string().to_ascii_lowercase();
            if text.contains("too long") || text.contains("too big") || text.contains("limit") {
                Incoming::TooBig
            } else {
                Incoming::Gone
            }
        }
    }
}

async fn close_with(mut socket: WebSocket, code: u16, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Ping bookkeeping of one socket.
struct Pinger {
    interval: tokio::time::Interval,
    answered: bool,
}

impl Pinger {
    fn new(state: &AppState) -> Self {
        let every = Duration::from_secs(state.gw.ws_ping_interval_s.max(1));
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            interval,
            answered: true,
        }
    }

    /// On a tick: `false` when the previous ping went unanswered (dead peer), else sends
    /// the next ping.
    async fn tick(&mut self, socket: &mut WebSocket) -> bool {
        if !self.answered {
            return false;
        }
        self.answered = false;
        socket
            .send(Message::Ping(axum::body::Bytes::from_static(b"lipsync")))
            .await
            .is_ok()
    }
}

struct ClientGauge(prometheus::IntGauge);

impl ClientGauge {
    fn new(g: &prometheus::IntGauge) -> Self {
        g.inc();
        Self(g.clone())
    }
}

impl Drop for ClientGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn send_json<T: serde::Serialize>(socket: &mut WebSocket, value: &T) -> bool {
    match serde_json::to_string(value) {
        Ok(s) => socket.send(Message::Text(s.into())).await.is_ok(),
        Err(_) => false,
    }
}

async fn close(socket: WebSocket, reason: &'static str) {
    close_with(socket, axum::extract::ws::close_code::NORMAL, reason).await
}

async fn too_big(socket: WebSocket) {
    close_with(
        socket,
        axum::extract::ws::close_code::SIZE,
        "message too big",
    )
    .await
}

async fn dead_peer(socket: WebSocket) {
    close_with(socket, axum::extract::ws::close_code::AWAY, "no pong").await
}

/// `GET /task/{task_id}/ws`.
#[utoipa::path(
    get,
    path = "/task/{task_id}/ws",
    operation_id = "watch_task",
    tag = "tasks",
    params(
        ("task_id" = String, Path, description = "Task id"),
        ("access_token" = Option<String>, Query, description = "API key, for clients that cannot set headers on a WebSocket"),
    ),
    responses(
        (status = 101, description = "WebSocket: text messages, each a `TaskView` (the record at once, then each change in order; a change superseded before the gateway read it is skipped); closes 1000 after `completed`/`failed`, 1009 on a client message over `gateway.ws_max_message_bytes`"),
        (status = 400, description = "Not a WebSocket upgrade request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 403, description = "Cross-origin WebSocket refused", body = ErrorBody),
        (status = 404, description = "Unknown or malformed id, or another tenant's task", body = ErrorBody),
        (status = 429, description = "Too many sockets for this key (`gateway.ws_max_per_key`)", body = ErrorBody),
        (status = 503, description = "Too many sockets in all (`gateway.ws_max_total`) or backend unavailable", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn task_ws(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(task_id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response> {
    // Unknown ids (and other tenants' tasks) answer 404 before the upgrade.
    state.load_for(&caller, &task_id).await?;
    let slot = take_slot(&state, &caller)?;
    Ok(limits(&state, upgrade).on_upgrade(move |socket| follow_task(state, task_id, socket, slot)))
}

async fn follow_task(state: AppState, task_id: String, mut socket: WebSocket, _slot: Slot) {
    let _gauge = ClientGauge::new(&state.metrics.ws_clients);
    let mut pinger = Pinger::new(&state);
    // Subscribe before reading the current record, so no change falls in between.
    let mut changes_rx = state.index.subscribe();
    let Ok((rec, mut sent_rev)) = state.load(&task_id).await else {
        return close(socket, "task unavailable").await;
    };
    if !send_json(&mut socket, &state.view(&rec)).await {
        return;
    }
    if rec.status.is_terminal() {
        return close(socket, "task finished").await;
    }
    loop {
        let next: Option<(Arc<TaskRecord>, u64)> = tokio::select! {
            _ = state.shutdown.cancelled() => return close(socket, "server shutting down").await,
            _ = pinger.interval.tick() => {
                if !pinger.tick(&mut socket).await {
                    return dead_peer(socket).await;
                }
                None
            }
            msg = socket.recv() => match classify(msg) {
                Incoming::Gone => return,
                Incoming::TooBig => return too_big(socket).await,
                Incoming::Alive => {
                    pinger.answered = true;
                    None
                }
            },
            change = changes_rx.recv() => match change {
                Ok(c) if c.task_id == task_id => match c.record {
                    Some(r) => Some((r, c.revision)),
                    None => return close(socket, "task deleted").await,
                },
                Ok(_) => None,
                Err(RecvError::Lagged(n)) => {
                    tracing::debug!(task_id = %task_id, skipped = n, "websocket lagged, resyncing");
                    match state.tasks.get(&task_id).await {
                        Ok(Some((r, rev))) => Some((Arc::new(r), rev)),
                        Ok(None) => return close(socket, "task deleted").await,
                        Err(_) => None,
                    }
                }
                Err(RecvError::Closed) => return close(socket, "server shutting down").await,
            },
        };
        let Some((rec, rev)) = next else { continue };
        if rev <= sent_rev {
            continue;
        }
        sent_rev = rev;
        if !send_json(&mut socket, &state.view(&rec)).await {
            return;
        }
        if rec.status.is_terminal() {
            return close(socket, "task finished").await;
        }
    }
}

/// `GET /ws`: progress events of all tasks (admins, open service) or of the caller's own.
#[utoipa::path(
    get,
    path = "/ws",
    operation_id = "watch_all_tasks",
    tag = "tasks",
    params(
        ("access_token" = Option<String>, Query, description = "API key, for clients that cannot set headers on a WebSocket"),
    ),
    responses(
        (status = 101, description = "WebSocket: text messages, each a `ProgressEventView`, for every change of every task the key may see"),
        (status = 400, description = "Not a WebSocket upgrade request", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 403, description = "Cross-origin WebSocket refused", body = ErrorBody),
        (status = 429, description = "Too many sockets for this key (`gateway.ws_max_per_key`)", body = ErrorBody),
        (status = 503, description = "Too many sockets in all (`gateway.ws_max_total`)", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn all_ws(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    upgrade: WebSocketUpgrade,
) -> Result<Response> {
    let slot = take_slot(&state, &caller)?;
    Ok(limits(&state, upgrade).on_upgrade(move |socket| follow_all(state, caller, socket, slot)))
}

async fn follow_all(state: AppState, caller: Caller, mut socket: WebSocket, _slot: Slot) {
    let _gauge = ClientGauge::new(&state.metrics.ws_clients);
    let mut pinger = Pinger::new(&state);
    let mut changes_rx = state.index.subscribe();
    let visible = |r: &TaskRecord| caller.may_access(r);
    loop {
        let events: Vec<ProgressEventView> = tokio::select! {
            _ = state.shutdown.cancelled() => return close(socket, "server shutting down").await,
            _ = pinger.interval.tick() => {
                if !pinger.tick(&mut socket).await {
                    return dead_peer(socket).await;
                }
                continue;
            }
            msg = socket.recv() => match classify(msg) {
                Incoming::Gone => return,
                Incoming::TooBig => return too_big(socket).await,
                Incoming::Alive => {
                    pinger.answered = true;
                    continue;
                }
            },
            change = changes_rx.recv() => match change {
                Ok(c) => c
                    .record
                    .iter()
                    .filter(|r| visible(r))
                    .map(|r| ProgressEventView::from(r.as_ref()))
                    .collect(),
                Err(RecvError::Lagged(_)) => state
                    .index
                    .active()
                    .iter()
                    .filter(|r| visible(r))
                    .map(|r| ProgressEventView::from(r.as_ref()))
                    .collect(),
                Err(RecvError::Closed) => return close(socket, "server shutting down").await,
            },
        };
        for e in &events {
            if !send_json(&mut socket, e).await {
                return;
            }
        }
    }
}

/// Progress sockets carry small JSON records: 4 KiB read/write buffers (instead of the
/// 128 KiB defaults) keep thousands of idle sockets cheap; clients send nothing large.
fn limits(state: &AppState, upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    let max = state.gw.ws_max_message_bytes.max(125);
    upgrade
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_message_size(max)
        .max_frame_size(max)
}
