//! WebSockets. `GET /task/{task_id}/ws` sends the current record (`TaskView` JSON) at
//! once, then every change in order, and closes (code 1000) after a terminal state.
//! `GET /ws` sends a `ProgressEvent` for every change of every task.
//!
//! Both read the process's one task watch through a broadcast channel. A socket that falls
//! behind the channel is resynced (the task's record is read from KV; `/ws` gets a snapshot
//! of all active tasks) instead of slowing anyone else. Sockets close on shutdown.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use lipsync_schemas::{ProgressEvent, TaskRecord};
use tokio::sync::broadcast::error::RecvError;

use crate::AppState;
use crate::error::Result;
use crate::routes::{load, view};

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

async fn close(mut socket: WebSocket, reason: &'static str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason.into(),
        })))
        .await;
}

/// `GET /task/{task_id}/ws`.
pub(crate) async fn task_ws(
    State(state): State<AppState>,
    Path(task_id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response> {
    // Unknown ids answer 404 before the upgrade.
    load(&state, &task_id).await?;
    Ok(small_buffers(upgrade).on_upgrade(move |socket| follow_task(state, task_id, socket)))
}

async fn follow_task(state: AppState, task_id: String, mut socket: WebSocket) {
    let _gauge = ClientGauge::new(&state.metrics.ws_clients);
    // Subscribe before reading the current record, so no change falls in between.
    let mut changes_rx = state.index.subscribe();
    let Ok((rec, mut sent_rev)) = load(&state, &task_id).await else {
        return close(socket, "task unavailable").await;
    };
    if !send_json(&mut socket, &view(&state, &rec)).await {
        return;
    }
    if rec.status.is_terminal() {
        return close(socket, "task finished").await;
    }
    loop {
        let next: Option<(Arc<TaskRecord>, u64)> = tokio::select! {
            _ = state.shutdown.cancelled() => return close(socket, "server shutting down").await,
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => None,
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
        if !send_json(&mut socket, &view(&state, &rec)).await {
            return;
        }
        if rec.status.is_terminal() {
            return close(socket, "task finished").await;
        }
    }
}

/// `GET /ws`: progress events of all tasks.
pub(crate) async fn all_ws(State(state): State<AppState>, upgrade: WebSocketUpgrade) -> Response {
    small_buffers(upgrade).on_upgrade(move |socket| follow_all(state, socket))
}

async fn follow_all(state: AppState, mut socket: WebSocket) {
    let _gauge = ClientGauge::new(&state.metrics.ws_clients);
    let mut changes_rx = state.index.subscribe();
    loop {
        let events: Vec<ProgressEvent> = tokio::select! {
            _ = state.shutdown.cancelled() => return close(socket, "server shutting down").await,
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
            change = changes_rx.recv() => match change {
                Ok(c) => c.record.iter().map(|r| ProgressEvent::from(r.as_ref())).collect(),
                Err(RecvError::Lagged(_)) => state
                    .index
                    .active()
                    .iter()
                    .map(|r| ProgressEvent::from(r.as_ref()))
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
/// 128 KiB defaults) keep thousands of idle sockets cheap.
fn small_buffers(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade.read_buffer_size(4096).write_buffer_size(4096)
}
